"""HAMi's public interface as pure codecs (no I/O): what pods and nodes carry.

- :mod:`shared.hami.annotations`: the pod annotations HAMi writes (REFERENCE §4: the
  device encoding) and the node registration annotations (§5: JSON and colon forms).
- :mod:`shared.hami.quantity`: Kubernetes resource quantities.
- :mod:`shared.hami.resources`: HAMi's request defaults (§1), the one copy of them.
- :mod:`shared.hami.codec`: a pod spec, as the API returns it, into an
  :class:`~shared.schemas.AllocRequested` (§1 resources, §2 annotations), with errors a
  user understands; and a namespace's ResourceQuotas into a :class:`~shared.schemas.Quota`.
"""
