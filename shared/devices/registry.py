"""The device-family registry: which family a resource, a card or a container belongs to.

Every family HAMi supports is one entry (NVIDIA among them). Lookups: a family by its
HAMi device type (the ``vendor`` of our cards and asks), by any of its resource names;
a container asks one family (two is a clear error); a pod may ask several families in
different containers (:meth:`Registry.pod_asks`). :func:`allocate_response` is the
``Allocate`` data a node agent backend answers with for a family's cards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices import (
    amd,
    ascend,
    awsneuron,
    biren,
    cambricon,
    enflame,
    hygon,
    iluvatar,
    kunlun,
    metax,
    mthreads,
    nvidia,
    vastai,
)
from shared.devices.base import (
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Family,
    Grant,
    PodInfo,
    RequestError,
    quantity,
)
from shared.schemas import ContainerGrant, DeviceAsk

DEFAULT_FAMILIES: tuple[Family, ...] = (
    nvidia.FAMILY,
    hygon.FAMILY,
    cambricon.FAMILY,
    *iluvatar.FAMILIES,
    mthreads.FAMILY,
    metax.FAMILY,
    *ascend.FAMILIES,
    kunlun.FAMILY,
    *enflame.FAMILIES,
    awsneuron.FAMILY,
    amd.FAMILY,
    biren.FAMILY,
    vastai.FAMILY,
)


class PodAskError(ValueError):
    """The pod's containers ask for devices in ways no family takes; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class ContainerFamilyAsk:
    """One container of a pod (init containers first) and what it asks of which family."""

    name: str
    init: bool
    family: Family | None  # None: the container asks for no device
    ask: Ask | None


class Registry:
    """Families by device type and by resource name; built once, read-only afterwards."""

    def __init__(self, families: Iterable[Family]) -> None:
        self.families: tuple[Family, ...] = tuple(families)
        self._by_name: dict[str, Family] = {}
        self._by_resource: dict[str, Family] = {}
        for f in self.families:
            if f.name in self._by_name:
                raise ValueError(f"two device families named {f.name!r}")
            self._by_name[f.name] = f
            for r in f.resources.all():
                other = self._by_resource.get(r)
                if other is not None:
                    raise ValueError(f"resource {r!r} belongs to both {other.name} and {f.name}")
                self._by_resource[r] = f

    def family(self, name: str) -> Family:
        """The family whose HAMi device type is ``name``; KeyError naming the known ones."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name))
            raise KeyError(f"no device family {name!r} (known: {known})") from None

    def get(self, name: str) -> Family | None:
        return self._by_name.get(name)

    def for_resource(self, resource: str) -> Family | None:
        """The family one of whose resource names is ``resource``."""
        return self._by_resource.get(resource)

    def resource_names(self) -> frozenset[str]:
        return frozenset(self._by_resource)

    def container_families(self, resources: Mapping[str, Any]) -> list[Family]:
        """The families a container's ``resources`` name (limits or requests), in registry order."""
        names = set(resources.get("limits") or {}) | set(resources.get("requests") or {})
        seen = {self._by_resource[n].name for n in names if n in self._by_resource}
        return [f for f in self.families if f.name in seen]

    def container_ask(
        self, container: Mapping[str, Any], annotations: Mapping[str, str] | None = None
    ) -> tuple[Family, Ask] | None:
        """A container's ask of its one family, or None; :class:`RequestError` when it
        names two families or asks for something its family refuses."""
        cname = str(container.get("name") or "")
        res = container.get("resources") or {}
        fams = self.container_families(res)
        if not fams:
            return None
        if len(fams) > 1:
            raise RequestError(
                f'container "{cname}" asks for {" and ".join(f.name for f in fams)}: '
                "a container asks one device family; put each in its own container"
            )
        fam = fams[0]
        if not fam.asks_for(res):
            named = [r for r in fam.resources.all() if quantity(res, r) is not None]
            raise RequestError(
                f'container "{cname}": {", ".join(named)} without {fam.resources.count}: '
                f"say how many {fam.name} cards"
            )
        try:
            ask = fam.parse(res, annotations or {})
        except RequestError as exc:
            raise RequestError(f'container "{cname}": {exc}') from None
        return (fam, ask) if ask is not None else None

    def pod_asks(self, pod: Mapping[str, Any]) -> list[ContainerFamilyAsk]:
        """Every container's (family, ask), init containers first; one
        :class:`PodAskError` listing every container that cannot be parsed."""
        spec = pod.get("spec") or {}
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        out: list[ContainerFamilyAsk] = []
        problems: list[str] = []
        ctrs = [(c, True) for c in spec.get("initContainers") or []] + [
            (c, False) for c in spec.get("containers") or []
        ]
        for c, init in ctrs:
            try:
                got = self.container_ask(c, annotations)
            except RequestError as exc:
                problems.append(str(exc))
                continue
            name = str(c.get("name") or "")
            out.append(
                ContainerFamilyAsk(name, init, got[0] if got else None, got[1] if got else None)
            )
        if problems:
            raise PodAskError(problems)
        return out


REGISTRY = Registry(DEFAULT_FAMILIES)


def family_of(name: str) -> Family | None:
    """The default registry's family for a device type (a card's or an ask's ``vendor``)."""
    return REGISTRY.get(name)


def allocate_response(
    family: Family | str, devices: Sequence[Allocated], ctx: AllocateContext | None = None
) -> Allocation:
    """What a node agent's ``Allocate`` answers for one container's cards of ``family``:
    env, device nodes, mounts, host files (data only: the node agent turns it into the
    kubelet message). The one answer per vendor: the node side asks only this."""
    fam = REGISTRY.family(family) if isinstance(family, str) else family
    return fam.allocate(devices, ctx)


def decision_annotations(
    containers: Sequence[ContainerGrant],
    node: str,
    annotations: Mapping[str, str] | None = None,
    registry: Registry = REGISTRY,
) -> dict[str, str]:
    """The pod annotations of every family but NVIDIA for a decision's grants (HAMi's
    ``PatchAnnotations`` of each device type the pod got cards of), ``{}`` when it got
    none. NVIDIA's are the codec's (shared/hami/annotations.py). ``containers`` are in
    pod order; each family sees one grant list per container (empty where the container
    got none of its cards), as HAMi's ``PodDevices`` holds them."""
    names = {g.vendor for c in containers for g in c.devices}
    out: dict[str, str] = {}
    pod = PodInfo(annotations=annotations or {})
    for fam in registry.families:
        if fam.name not in names or fam.engine_native:
            continue
        grants = [
            [
                Grant(g.index, g.uuid, fam.name, g.mem, g.cores)
                for g in c.devices
                if g.vendor == fam.name
            ]
            for c in containers
        ]
        out.update(fam.pod_annotations(pod, grants, node))
    return out


def family_filter_annotations(
    annotations: Mapping[str, str], registry: Registry = REGISTRY
) -> dict[str, str]:
    """The pod annotations that are some family's card filter (its use/nouse type and
    UUID annotations) or that its fit reads (``fit_annotations``), for families other
    than NVIDIA (whose filters the request carries in its own fields)."""
    names = {
        n
        for f in registry.families
        if not f.engine_native
        for n in (
            f.use_type_annotation,
            f.nouse_type_annotation,
            f.use_uuid_annotation,
            f.nouse_uuid_annotation,
            *f.fit_annotations,
        )
        if n
    }
    return {k: str(v) for k, v in annotations.items() if k in names}


def to_device_ask(ask: Ask) -> DeviceAsk:
    """A family's ask as the request schema carries it (``vendor`` = the family's type).

    A percentage is carried only when no MiB are asked, as HAMi reads it; a family that
    asks neither (Neuron: no memory isolation) carries 0 MiB and no percentage, which
    placement reads as the family's fit does (the fit, not the numbers, decides).
    """
    pct = ask.mem_percent if ask.memreq == 0 and ask.mem_percent > 0 else None
    return DeviceAsk(
        vendor=ask.family, nums=ask.nums, mem=ask.memreq, mem_percent=pct, cores=ask.coresreq
    )
