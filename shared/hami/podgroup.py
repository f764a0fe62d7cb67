"""A pod's coscheduling PodGroup, read as placement's gang. Pure: no I/O.

scheduler-plugins' coscheduling plugin groups pods by a label naming a ``PodGroup``
(``scheduling.x-k8s.io/v1alpha1``) of the pod's namespace: ``scheduling.x-k8s.io/pod-group``.
Releases before its API moved from ``scheduling.sigs.k8s.io`` used the label
``pod-group.scheduling.sigs.k8s.io``; both are read, the current one first. The
PodGroup's ``spec.minMember`` is the gang's size, its ``spec.scheduleTimeoutSeconds``
how long a partial gang may hold its reservations (0 or absent: placement's default,
60 s, coscheduling's own default too). The binder reads the objects
(services/binder/podgroups.py); this module says what they mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GROUP = "scheduling.x-k8s.io"
VERSION = "v1alpha1"
PLURAL = "podgroups"
POD_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
LEGACY_POD_GROUP_LABEL = "pod-group.scheduling.sigs.k8s.io"


class PodGroupError(ValueError):
    """The pod names a PodGroup that is missing or is not a gang; the message says which."""


@dataclass(frozen=True, slots=True)
class Gang:
    """A pod's gang, as placement's request fields want it."""

    namespace: str
    name: str  # the PodGroup's name: ``AllocRequested.gang``
    size: int  # minMember
    timeout: float  # scheduleTimeoutSeconds; 0 = placement's default

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_group_name(pod: Mapping[str, Any]) -> str:
    """The PodGroup a pod's labels name ("" when none)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    for label in (POD_GROUP_LABEL, LEGACY_POD_GROUP_LABEL):
        v = labels.get(label)
        if isinstance(v, str) and v:
            return v
    return ""


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def gang_of(obj: Mapping[str, Any]) -> Gang:
    """A PodGroup object's gang; :class:`PodGroupError` when its spec is not one."""
    meta = obj.get("metadata") or {}
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    spec = obj.get("spec") or {}
    where = f"PodGroup {ns}/{name}"
    size = _int(spec.get("minMember"))
    if size is None or size < 1:
        raise PodGroupError(
            f"invalid {where}: spec.minMember must be an integer of at least 1, "
            f"not {spec.get('minMember')!r}"
        )
    raw = spec.get("scheduleTimeoutSeconds")
    timeout = 0 if raw is None else _int(raw)
    if timeout is None or timeout < 0:
        raise PodGroupError(
            f"invalid {where}: spec.scheduleTimeoutSeconds must be a "
            f"non-negative integer, not {raw!r}"
        )
    return Gang(namespace=ns, name=name, size=size, timeout=float(timeout))
