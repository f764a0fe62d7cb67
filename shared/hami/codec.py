"""A pod, as the Kubernetes API returns it (a dict), into an allocation request.

Pure: no I/O, no clock (the caller passes ``now``). Used by the binder (every pending pod
with our scheduler name) and the admission webhook (to refuse what the binder could not
parse, with the same words).

- Containers: init containers first in spec order, then app containers (the device
  annotations are aligned with this order, REFERENCE §4). Each container's HAMi
  resources (REFERENCE §1) are read from ``resources.limits``, falling back to
  ``requests`` as HAMi's scheduler does (its webhook looks at ``limits`` only), and
  resolved by :func:`shared.hami.resources.resolve_device_ask`.
- Quantities, as HAMi reads them: a count, ``gpumem`` and ``gpucores`` are whole
  numbers of any Kubernetes spelling (``2k`` is 2000, ``1e3`` is 1000); ``gpumem`` is
  that number of MiB, so ``16Gi`` is 17179869184 MiB, which HAMi cannot hold (int32)
  and we refuse naming the fix. A ``gpumem-percentage`` that is not a positive whole
  number is ignored (the memory default applies); above 100 it is clamped.
  CPU and memory *requests* (falling back to limits, as the API server defaults them)
  become the container's node resources.
- ``nvidia.com/priority``: the pod's priority is the highest (lowest number) of its
  containers'; default 1.
- Annotations (REFERENCE §2) and the pod's nodeSelector, required node affinity and
  tolerations become :class:`~shared.schemas.Constraints`. ``nvidia.com/numa-bind`` is
  read with Go's ``ParseBool``; a value it does not take is ignored, as in HAMi.

Every problem found is collected and raised together as one :class:`PodSpecError`, each
part naming the container or annotation and what is allowed, e.g.
``container "train": nvidia.com/gpu must be a whole number, got "1.5"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from shared import limits
from shared.config import NodeSettings, ResourceNames
from shared.devices.base import RequestError
from shared.devices.registry import REGISTRY, family_filter_annotations, to_device_ask
from shared.hami import annotations as ann
from shared.hami.quantity import QuantityError, mib, milli, parse_quantity
from shared.hami.resources import resolve_device_ask
from shared.schemas import (
    AllocRequested,
    Constraints,
    ContainerAsk,
    DeviceAsk,
    Quota,
    ScoringWeights,
    SelectorRequirement,
    Toleration,
)

# HAMi's two, then the ones this project adds (docs/placement.md).
NODE_POLICIES = ("binpack", "spread", "random", "bestfit", "fgd", "frag")
GPU_POLICIES = ("binpack", "spread", "topology-aware", "mutex", "numa")
VGPU_MODES = ("hami-core", "mig", "mps")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")

QUOTA_MEMORY = "limits.nvidia.com/gpumem"  # with the default resource names
QUOTA_CORES = "limits.nvidia.com/gpucores"

_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool
INT32_MAX = (1 << 31) - 1


class PodSpecError(ValueError):
    """The pod asks for something HAMi cannot schedule; ``problems`` lists each reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def _resource(res: Mapping[str, Any], name: str) -> Any:
    limits = res.get("limits") or {}
    if name in limits:
        return limits[name]
    return (res.get("requests") or {}).get(name)


def _whole(value: Any, what: str, problems: list[str]) -> int | None:
    """A non-negative whole-number quantity, or None (and a problem) when it is not."""
    try:
        q = parse_quantity(value)
    except QuantityError:
        problems.append(f"{what} must be a whole number, got {value!r}")
        return None
    if q.denominator != 1:
        problems.append(f"{what} must be a whole number, got {value!r}")
        return None
    if q < 0:
        problems.append(f"{what} must not be negative, got {value!r}")
        return None
    return int(q)


def _percentage(value: Any) -> int | None:
    """``gpumem-percentage`` as HAMi's scheduler reads it: a whole number, else ignored
    (HAMi's ``AsInt64`` fails on "50.5" and "abc"); 0 or less is ignored too (the memory
    default applies), above 100 is clamped later."""
    if value is None:
        return None
    try:
        q = parse_quantity(value)
    except QuantityError:
        return None
    if q.denominator != 1 or q <= 0:
        return None
    return int(q)


def has_device_resources(container: Mapping[str, Any], names: ResourceNames) -> bool:
    """Whether a container asks for any HAMi NVIDIA resource (count, memory or cores)."""
    res = container.get("resources") or {}
    keys = (names.count, names.memory, names.memory_percentage, names.cores)
    return any(_resource(res, k) is not None for k in keys)


def pod_containers(pod: Mapping[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    """(container, is_init) in HAMi's order: init containers first, then app containers."""
    spec = pod.get("spec") or {}
    return [(c, True) for c in spec.get("initContainers") or []] + [
        (c, False) for c in spec.get("containers") or []
    ]


def container_ask(
    container: Mapping[str, Any],
    init: bool,
    settings: NodeSettings,
    names: ResourceNames,
    problems: list[str],
    annotations: Mapping[str, str] | None = None,
) -> tuple[ContainerAsk, int | None]:
    """One container's ask and its ``nvidia.com/priority`` (None when not given).

    A container that names another vendor's resources asks that device family
    (:mod:`shared.devices`, its rules and the pod's ``annotations``); one container
    asks one family.
    """
    cname = str(container.get("name") or "")
    where = f'container "{cname}"'
    res = container.get("resources") or {}
    raw: dict[str, int | None] = {}
    n_problems = len(problems)
    for key, rname in (
        ("nums", names.count),
        ("mem", names.memory),
        ("cores", names.cores),
        ("priority", names.priority),
    ):
        v = _resource(res, rname)
        raw[key] = None if v is None else _whole(v, f"{where}: {rname}", problems)
    raw["pct"] = _percentage(_resource(res, names.memory_percentage))
    factor = max(1, settings.memory_factor)
    if raw["mem"] is not None and raw["mem"] > INT32_MAX // factor:
        # HAMi keeps the number as MiB in an int32 (after memoryFactor) and drops the
        # container's whole device request beyond it; we say so instead.
        problems.append(
            f"{where}: {names.memory} is in MiB and must be at most {INT32_MAX // factor}"
            + (f" (memoryFactor {factor})" if factor > 1 else "")
            + f", got {_resource(res, names.memory)!r} = {raw['mem']}: write 16384 for 16 GiB"
        )
    devices: list[DeviceAsk] = []
    if len(problems) == n_problems:
        ask = resolve_device_ask(
            nums=raw["nums"], mem=raw["mem"], mem_percent=raw["pct"], cores=raw["cores"],
            settings=settings,
        )
        if ask is not None:
            devices.append(ask)
    _family_ask(container, where, devices, problems, annotations or {})
    cpu_milli = memory_mib = 0
    for key in ("cpu", "memory"):
        v = (res.get("requests") or {}).get(key)
        if v is None:
            v = (res.get("limits") or {}).get(key)
        if v is None:
            continue
        try:
            if key == "cpu":
                cpu_milli = milli(v)
            else:
                memory_mib = mib(v)
        except QuantityError:
            problems.append(f"{where}: {key} {v!r} is not a quantity (examples: 500m, 2Gi)")
    return (
        ContainerAsk(name=cname, init=init, devices=devices, cpu_milli=cpu_milli,
                     memory_mib=memory_mib,
                     # a sidecar (HAMi's IsSidecarContainer): it runs beside the app
                     sidecar=init and container.get("restartPolicy") == "Always"),
        raw["priority"],
    )


def _family_ask(
    container: Mapping[str, Any], where: str, devices: list[DeviceAsk], problems: list[str],
    annotations: Mapping[str, str],
) -> None:
    """Append the container's ask of a non-NVIDIA device family, if it names one."""
    res = container.get("resources") or {}
    if not any(not f.engine_native for f in REGISTRY.container_families(res)):
        return  # NVIDIA only (or nothing): the path above, unchanged
    try:
        got = REGISTRY.container_ask(container, annotations)
    except RequestError as exc:
        problems.append(str(exc))
        return
    if got is None or got[0].engine_native:
        return
    if devices:
        problems.append(f"{where} asks for {devices[0].vendor} and {got[0].name}: "
                        "a container asks one device family; put each in its own container")
        return
    devices.append(to_device_ask(got[1]))


def _list(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def parse_weights(value: str) -> ScoringWeights:
    """``slot=1,core=1,memory=3``: all three keys, non-negative integers, one positive."""
    seen: dict[str, int] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, num = part.partition("=")
        key = key.strip()
        if not eq or key not in ("slot", "core", "memory"):
            raise ValueError(f"{part!r} is not one of slot=N, core=N, memory=N")
        if key in seen:
            raise ValueError(f"{key} is given twice")
        try:
            n = int(num.strip())
        except ValueError:
            raise ValueError(f"{key} must be a whole number, got {num.strip()!r}") from None
        if n < 0:
            raise ValueError(f"{key} must not be negative, got {n}")
        seen[key] = n
    missing = [k for k in ("slot", "core", "memory") if k not in seen]
    if missing:
        raise ValueError(f"all of slot, core and memory are required (missing {', '.join(missing)})")
    if not any(seen.values()):
        raise ValueError("at least one weight must be positive")
    return ScoringWeights(slot=seen["slot"], core=seen["core"], memory=seen["memory"])


def parse_gpu_policy(value: str) -> str:
    chain = [p.lower() for p in _list(value)]
    if not chain:
        raise ValueError("is empty")
    bad = [p for p in chain if p not in GPU_POLICIES]
    if bad:
        raise ValueError(f"unknown {', '.join(repr(b) for b in bad)}; use {', '.join(GPU_POLICIES)} or a comma chain such as binpack,numa")
    return ",".join(chain)


def _affinity(spec: Mapping[str, Any], problems: list[str]) -> list[list[SelectorRequirement]]:
    na = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
    req = na.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms: list[list[SelectorRequirement]] = []
    for term in req.get("nodeSelectorTerms") or []:
        reqs: list[SelectorRequirement] = []
        for e in term.get("matchExpressions") or []:
            op = str(e.get("operator") or "")
            if op not in SELECTOR_OPERATORS:
                problems.append(f"node affinity: unknown operator {op!r} for key {e.get('key')!r}")
                continue
            reqs.append(SelectorRequirement(key=str(e.get("key") or ""), operator=op,
                                            values=[str(v) for v in e.get("values") or []]))
        # matchFields can only name metadata.name; express it on the hostname label the
        # kubelet sets, which is how placement sees a node's identity.
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("operator") in ("In", "NotIn"):
                reqs.append(SelectorRequirement(key="kubernetes.io/hostname",
                                                operator=str(f["operator"]),
                                                values=[str(v) for v in f.get("values") or []]))
            else:
                problems.append(f"node affinity: matchFields on {f.get('key')!r} is not supported")
        terms.append(reqs)
    return terms


def constraints(pod: Mapping[str, Any], problems: list[str]) -> Constraints:
    """The pod's placement options: HAMi annotations (REFERENCE §2) plus node filters."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    a: Mapping[str, str] = meta.get("annotations") or {}
    c = Constraints()
    if ann.NODE_SCHEDULER_POLICY in a:
        v = a[ann.NODE_SCHEDULER_POLICY].strip().lower()
        if v in NODE_POLICIES:
            c.node_policy = v
        else:
            problems.append(
                f"annotation {ann.NODE_SCHEDULER_POLICY}: {a[ann.NODE_SCHEDULER_POLICY]!r} is not "
                f"one of {', '.join(NODE_POLICIES)}"
            )
    if ann.GPU_SCHEDULER_POLICY in a:
        try:
            c.gpu_policy = parse_gpu_policy(a[ann.GPU_SCHEDULER_POLICY])
        except ValueError as exc:
            problems.append(f"annotation {ann.GPU_SCHEDULER_POLICY}: {exc}")
    if ann.DEVICE_SCORING_WEIGHTS in a:
        try:
            c.weights = parse_weights(a[ann.DEVICE_SCORING_WEIGHTS])
        except ValueError as exc:
            problems.append(f"annotation {ann.DEVICE_SCORING_WEIGHTS}: {exc} (example: slot=1,core=1,memory=3)")
    c.use_types = _list(a.get(ann.USE_GPUTYPE, ""))
    c.nouse_types = _list(a.get(ann.NOUSE_GPUTYPE, ""))
    c.use_uuids = _list(a.get(ann.USE_GPUUUID, ""))
    c.nouse_uuids = _list(a.get(ann.NOUSE_GPUUUID, ""))
    c.family_annotations = family_filter_annotations(a)  # other vendors' card filters
    # Go's strconv.ParseBool, exactly; anything else is ignored (not bound), as in HAMi.
    c.numa_bind = a.get(ann.NUMA_BIND) in _TRUE
    if ann.VGPU_MODE in a:
        v = a[ann.VGPU_MODE].strip().lower()
        if v in VGPU_MODES:
            c.vgpu_mode = v
        else:
            problems.append(f"annotation {ann.VGPU_MODE}: {a[ann.VGPU_MODE]!r} is not one of {', '.join(VGPU_MODES)}")
    c.node_selector = {str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()}
    c.affinity = _affinity(spec, problems)
    c.tolerations = [
        Toleration(key=str(t.get("key") or ""), operator=str(t.get("operator") or "Equal"),
                   value=str(t.get("value") or ""), effect=str(t.get("effect") or ""))
        for t in spec.get("tolerations") or []
    ]
    return c


def pod_request(
    pod: Mapping[str, Any],
    settings: NodeSettings | None = None,
    names: ResourceNames | None = None,
    *,
    now: float = 0.0,
) -> AllocRequested:
    """The :class:`AllocRequested` for a pod (uid = pod UID, source ``kube``, pending).

    Raises :class:`PodSpecError` listing every problem found.
    """
    settings = settings or NodeSettings()
    names = names or ResourceNames()
    meta = pod.get("metadata") or {}
    problems: list[str] = []
    containers: list[ContainerAsk] = []
    priority: int | None = None
    for container, init in pod_containers(pod):
        ask, prio = container_ask(container, init, settings, names, problems,
                                  meta.get("annotations") or {})
        containers.append(ask)
        if prio is not None:
            priority = prio if priority is None else min(priority, prio)
    cons = constraints(pod, problems)
    if problems:
        raise PodSpecError(problems)
    req = AllocRequested(
        uid=str(meta.get("uid") or ""),
        name=str(meta.get("name") or ""),
        namespace=str(meta.get("namespace") or ""),
        containers=containers,
        constraints=cons,
        priority=1 if priority is None else priority,
        pending=True,
        source="kube",
        requested_at=now,
        # the pod's scheduling priority (admission resolves priorityClassName into it)
        pod_priority=prio if isinstance(prio := (pod.get("spec") or {}).get("priority"), int) else 0,
        # its queue (docs/queues.md); none: its namespace's default queue
        queue=str((meta.get("labels") or {}).get("hami.io/queue") or ""),
        # consolidation may move it (hami defrag; docs/defrag.md)
        movable=str((meta.get("annotations") or {}).get("hami.io/movable") or "").lower() == "true",
    )
    # Absurd amounts (2**63 MiB, 10,000 cards) are refused here, with the bound named,
    # rather than reaching placement's arithmetic.
    problems = limits.request_problems(
        name=req.name, namespace=req.namespace, containers=req.containers,
        constraints=req.constraints, priority=req.priority, uid=req.uid,
    )
    if problems:
        raise PodSpecError(problems)
    return req


def asks_devices(req: AllocRequested) -> bool:
    return any(c.devices for c in req.containers)


def quota_from_resource_quotas(
    items: list[Mapping[str, Any]],
    settings: NodeSettings | None = None,
    names: ResourceNames | None = None,
) -> Quota | None:
    """A namespace's HAMi quota from its ResourceQuota objects (the tightest wins).

    The keys are ``limits.`` + the memory and cores resource names, as in HAMi
    (``limits.nvidia.com/gpumem``, ``limits.nvidia.com/gpucores`` by default); a value
    that is not a whole number is skipped, as HAMi's ``AsInt64`` skips it.
    ``limits.nvidia.com/gpumem`` is in the same unit users write ``nvidia.com/gpumem`` in,
    so it is multiplied by ``memoryFactor`` like the requests it caps. Returns None when
    no ResourceQuota names a HAMi resource.
    """
    settings = settings or NodeSettings()
    names = names or ResourceNames()
    mem_key, cores_key = "limits." + names.memory, "limits." + names.cores
    mem: Fraction | None = None
    cores: Fraction | None = None
    for rq in items:
        hard = (rq.get("spec") or {}).get("hard") or {}
        for key, value in hard.items():
            try:
                q = parse_quantity(value)
            except QuantityError:
                continue
            if q.denominator != 1:
                continue
            if key == mem_key:
                mem = q if mem is None else min(mem, q)
            elif key == cores_key:
                cores = q if cores is None else min(cores, q)
    if mem is None and cores is None:
        return None
    return Quota(
        memory_mib=None if mem is None else int(mem) * max(1, settings.memory_factor),
        cores=None if cores is None else int(cores),
    )
