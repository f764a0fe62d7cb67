"""What every device family shares: the request, the card view, the fit walk, reasons.

HAMi's scheduler side has one ``Devices`` implementation per vendor, and nearly all of
them walk a node's cards with the same sequence of checks (type, UUID, slots, mutex,
memory, cores, exclusive use, a vendor's own filter) and differ in small hooks. This
module is that walk once, with the hooks as overridable methods of :class:`Family`; a
vendor module subclasses it and changes only what its HAMi counterpart changes.

Pure logic: no I/O, no clock. The numbers are HAMi's (``ContainerDeviceRequest``,
``DeviceUsage``, ``ContainerDevice``): memory in MiB, cores in the vendor's own unit
(percent for most, compute units for AMD's register, a core bitmask for Neuron).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from shared.hami.quantity import QuantityError, parse_quantity

# HAMi's reason codes (pkg/device/common), spelled as HAMi spells them.
CARD_TYPE_MISMATCH = "CardTypeMismatch"
CARD_UUID_MISMATCH = "CardUuidMismatch"
CARD_TIME_SLICING_EXHAUSTED = "CardTimeSlicingExhausted"
CARD_COMPUTE_UNITS_EXHAUSTED = "CardComputeUnitsExhausted"
CARD_INSUFFICIENT_MEMORY = "CardInsufficientMemory"
CARD_INSUFFICIENT_CORE = "CardInsufficientCore"
CARD_NOT_HEALTH = "CardNotHealth"
NUMA_NOT_FIT = "NumaNotFit"
EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT = "ExclusiveDeviceAllocateConflict"
CARD_NOT_FOUND_CUSTOM_FILTER_RULE = "CardNotFoundCustomFilterRule"
ALLOCATED_CARDS_INSUFFICIENT_REQUEST = "AllocatedCardsInsufficientRequest"

# Pod annotation for the per-card policy; "mutex" admits idle cards only.
GPU_SCHEDULER_POLICY = "hami.io/gpu-scheduler-policy"

INT32_MAX = (1 << 31) - 1


class RequestError(ValueError):
    """A container's ask this family refuses; the message names the resource and the fix."""


@dataclass(frozen=True, slots=True)
class ResourceNames:
    """The extended-resource names a family reads from a container's limits."""

    count: str
    memory: str = ""
    memory_percentage: str = ""
    cores: str = ""

    def all(self) -> tuple[str, ...]:
        return tuple(n for n in (self.count, self.memory, self.memory_percentage, self.cores) if n)


@dataclass(frozen=True, slots=True)
class Ask:
    """One container's ask of one family (HAMi's ``ContainerDeviceRequest``).

    ``family`` is the family's HAMi device type (``MLU``, ``Mthreads``, ``Ascend910B3``).
    ``mem_percent`` is HAMi's ``MemPercentagereq``: used only when ``memreq`` is 0.
    """

    family: str
    nums: int
    memreq: int = 0
    mem_percent: int = 0
    coresreq: int = 0
    whole: bool = False  # asked by card count alone: whole cards (Neuron, Moore Threads)


# Card.custom's key for the mode the card registered with (HAMi's DeviceInfo.Mode), as
# placement passes it from the inventory (Ascend: "hami-vnpu-core" on a soft-mode node).
CARD_MODE = "mode"


@dataclass(slots=True)
class Card:
    """One card as a family's fit sees it (HAMi's ``DeviceUsage``)."""

    id: str
    index: int = 0
    type: str = ""
    count: int = 10  # slots
    used: int = 0
    totalmem: int = 0
    usedmem: int = 0
    totalcore: int = 100
    usedcores: int = 0
    numa: int = 0
    health: bool = True
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one container gets on one card (HAMi's ``ContainerDevice``)."""

    idx: int
    uuid: str
    type: str
    usedmem: int
    usedcores: int
    custom: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What a fit may read of the pod: its annotations and what its earlier containers got.

    ``allocated`` is HAMi's ``PodDevices``: family type -> one grant list per container
    already placed, in container order.
    """

    annotations: Mapping[str, str] = field(default_factory=dict)
    allocated: Mapping[str, Sequence[Sequence[Grant]]] = field(default_factory=dict)

    @property
    def mutex(self) -> bool:
        return "mutex" in self.annotations.get(GPU_SCHEDULER_POLICY, "").split(",")


@dataclass(slots=True)
class FitResult:
    """A fit's answer: the cards chosen, or HAMi's per-reason card counts."""

    ok: bool
    grants: list[Grant]
    reasons: dict[str, int]
    cards: int  # the denominator of HAMi's text: the cards offered to the fit

    @property
    def text(self) -> str:
        """HAMi's ``GenReason`` (``1/2 CardInsufficientMemory, ...``), sorted for stability."""
        return ", ".join(f"{n}/{self.cards} {r}" for r, n in sorted(self.reasons.items()))


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device node for the container (kubelet ``DeviceSpec``)."""

    host_path: str
    container_path: str
    permissions: str = "rw"


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path mounted into the container (kubelet ``Mount``)."""

    host_path: str
    container_path: str
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class Allocated:
    """One card a container was given, as the node agent's ``Allocate`` needs it."""

    uuid: str
    index: int  # the card's index on the node (HAMi's ``Idx``)
    mem: int = 0  # MiB granted
    cores: int = 0  # in the family's core unit
    template: str = ""  # a named profile/template when the family has one (Ascend vNPU)
    card_mem: int = 0  # the card's registered memory (0: unknown, the grant is whole)
    card_cores: int = 0  # the card's registered cores in the same unit (0: 100)
    instance: str = ""  # an instance the node made for the grant (Enflame DRS UUID)
    local_id: str = ""  # the node runtime's own ID of the card ("": the uuid; AMD ROCr UUID)
    bus_id: str = ""  # the card's PCI bus ID, where a vendor file names it (Hygon vdev)

    @property
    def whole(self) -> bool:
        """The grant takes the whole card: all its memory and all its cores."""
        full = self.card_cores or 100
        return (self.card_mem == 0 or self.mem >= self.card_mem) and self.cores >= full


@dataclass(frozen=True, slots=True)
class AllocateContext:
    """What an ``Allocate`` answer may need beyond the cards: whose container it is
    (per-container host paths), the pod's annotations (a mode a vendor reads there,
    Ascend's ``huawei.com/vnpu-mode``) and host paths a node overrides."""

    pod_uid: str = ""
    container: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    hook_path: str = ""  # "": the family's default host hook directory
    driver_path: str = ""  # "": the family's default driver directory (Hygon)
    # card uuid -> the compute units other containers hold there (AMD's CU masks must
    # not overlap: HAMi's plugin rebuilds them from the pods' amd-cu-allocated)
    busy_cus: Mapping[str, frozenset[int]] = field(default_factory=dict)


@dataclass(slots=True)
class Allocation:
    """A family's ``Allocate`` answer for one container, as data (the node agent turns
    it into the kubelet's message). ``files``: host path -> content the node writes
    before answering (Hygon's vdev config); ``annotations``: the response's own."""

    envs: dict[str, str] = field(default_factory=dict)
    devices: list[DeviceSpec] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def dev(host: str, container: str | None = None) -> DeviceSpec:
    """A device node, at the same path in the container unless ``container`` says."""
    return DeviceSpec(host, container or host)


AllocateResponse = Allocation  # the name the registry's callers know


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the webhook leaves: the container's resources and pod annotations to set."""

    resources: Mapping[str, Any]
    annotations: dict[str, str]


def with_limits(resources: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    """A copy of ``resources`` whose ``limits`` dict can be changed (the webhook's edits)."""
    out = dict(resources)
    out["limits"] = dict(resources.get("limits") or {})
    out["requests"] = dict(resources.get("requests") or {})
    return out


# ------------------------------------------------------------------------- quantities


def quantity(limits: Mapping[str, Any], name: str) -> Any:
    """A resource's raw value: limits first, then requests (as HAMi's scheduler reads)."""
    lim = limits.get("limits") or {}
    if name in lim:
        return lim[name]
    return (limits.get("requests") or {}).get(name)


def whole(value: Any, name: str) -> int:
    """A whole-number quantity (``AsInt64``); anything else is a :class:`RequestError`."""
    try:
        q = parse_quantity(value)
    except QuantityError:
        raise RequestError(f"{name} must be a whole number, got {value!r}") from None
    if q.denominator != 1:
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if q < 0:
        raise RequestError(f"{name} must not be negative, got {value!r}")
    if q > INT32_MAX:
        raise RequestError(f"{name} must be at most {INT32_MAX}, got {value!r}")
    return int(q)


def exact(value: Any, name: str) -> Fraction:
    try:
        return parse_quantity(value)
    except QuantityError:
        raise RequestError(f"{name} is not a quantity, got {value!r}") from None


def split_list(value: str) -> list[str]:
    return [p for p in value.split(",") if p]


def go_json(obj: Any) -> str:
    """Go's ``json.Marshal`` text: compact, UTF-8, and ``<``, ``>``, ``&`` escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text


def encode_pod_single_device(per_container: Sequence[Sequence[Grant]]) -> str:
    """HAMi's ``EncodePodSingleDevice``: ``UUID,TYPE,MEM,CORES:`` per card, ``;`` per container."""
    return "".join(
        "".join(f"{g.uuid},{g.type},{g.usedmem},{g.usedcores}:" for g in ctr) + ";"
        for ctr in per_container
    )


# ----------------------------------------------------------------------------- family


@dataclass(frozen=True)
class Family:
    """One device family: names, encodings, request parsing, fit and ``Allocate`` data.

    The defaults are HAMi's common behaviour; a vendor module overrides the methods its
    HAMi counterpart changes. ``name`` is HAMi's device type (the key of ``PodDevices``
    and the TYPE field of pod device annotations); ``vendor`` is our label for it.
    """

    name: str
    vendor: str
    resources: ResourceNames
    register_annotation: str = ""  # "" when HAMi builds the cards from node capacity
    handshake_annotation: str = ""
    to_allocate_annotation: str = ""  # HAMi's InRequestDevices[name]; "" when not written
    allocated_annotation: str = ""  # HAMi's SupportDevices[name]
    use_uuid_annotation: str = ""
    nouse_uuid_annotation: str = ""
    use_type_annotation: str = ""
    nouse_type_annotation: str = ""
    backward: bool = True  # most of HAMi's fits walk the cards last to first
    check_health: bool = False  # a fit that counts CardNotHealth before anything else
    shares_memory: bool = True  # False: no memory/core checks (whole cards only)
    default_cores: int = 0  # cores when the container names none
    engine_native: bool = False  # the placement engine's own fit handles it (NVIDIA)
    # Other pod annotations the fit reads (Ascend's vNPU mode), carried to placement with
    # the card filters (registry.family_filter_annotations)
    fit_annotations: tuple[str, ...] = ()

    # ------------------------------------------------------------- request parsing

    def asks_for(self, resources: Mapping[str, Any]) -> bool:
        """Whether a container's ``resources`` names this family's count resource."""
        return quantity(resources, self.resources.count) is not None

    def memory_mib(self, value: Any) -> int:
        """The family's memory resource in MiB (MiB unless a family says otherwise)."""
        return whole(value, self.resources.memory)

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        """HAMi's webhook (``MutateAdmission``): the container's resources as the webhook
        leaves them (rounded, defaulted) and the pod annotations it sets; raises
        :class:`RequestError` for what the webhook refuses."""
        return Admitted(resources, {})

    def parse(
        self, resources: Mapping[str, Any], annotations: Mapping[str, str] | None = None
    ) -> Ask | None:
        """A container's ask of this family: :meth:`admit`, then :meth:`generate`.

        ``resources`` is a container's ``resources`` (``limits``/``requests``). None when
        the container does not ask for this family; :class:`RequestError` (naming the
        resource) when it asks for something HAMi would refuse.
        """
        if not self.asks_for(resources):
            return None
        return self.generate(self.admit(resources, annotations or {}).resources)

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        """HAMi's ``GenerateResourceRequests``: the numbers the fit works with."""
        raw = quantity(resources, self.resources.count)
        if raw is None:
            return None
        n = whole(raw, self.resources.count)
        if n <= 0:
            return None
        mem = 0
        if self.resources.memory:
            m = quantity(resources, self.resources.memory)
            if m is not None:
                mem = self.memory_mib(m)
        cores = self.default_cores
        if self.resources.cores:
            c = quantity(resources, self.resources.cores)
            if c is not None:
                cores = whole(c, self.resources.cores)
        return Ask(self.name, n, mem, 100 if mem == 0 else 0, cores)

    # ------------------------------------------------------------------------- fit

    def type_ok(self, card: Card, ask: Ask, pod: PodInfo) -> bool:
        """HAMi's ``checkType``: the ask is this family's, and the use/nouse-type
        annotations (a case-insensitive substring of the card type) allow the card."""
        if ask.family != self.name:
            return False
        ctype = card.type.upper()
        if self.use_type_annotation and self.use_type_annotation in pod.annotations:
            return any(
                t.upper() in ctype for t in split_list(pod.annotations[self.use_type_annotation])
            )
        if self.nouse_type_annotation and self.nouse_type_annotation in pod.annotations:
            return not any(
                t.upper() in ctype for t in split_list(pod.annotations[self.nouse_type_annotation])
            )
        return True

    def uuid_ok(self, card: Card, pod: PodInfo) -> bool:
        """HAMi's ``CheckUUID``: the use list wins over the nouse list."""
        if self.use_uuid_annotation and self.use_uuid_annotation in pod.annotations:
            return card.id in pod.annotations[self.use_uuid_annotation].split(",")
        if self.nouse_uuid_annotation and self.nouse_uuid_annotation in pod.annotations:
            return card.id not in pod.annotations[self.nouse_uuid_annotation].split(",")
        return True

    def extra_check(self, card: Card, ask: Ask, pod: PodInfo) -> str | None:
        """A family's own card check after type and UUID (e.g. MetaX QoS); a reason or None."""
        return None

    def custom_filter(self, card: Card, ask: Ask, pod: PodInfo, chosen: Sequence[Grant]) -> bool:
        """HAMi's ``CustomFilterRule``: the last check of a card."""
        return True

    def cores_on(self, card: Card, cores: int) -> int:
        """The card's core units an ask of ``cores`` books (the same unit for most)."""
        return cores

    def exclusive(self, card: Card, cores: int) -> bool:
        """Whether the ask wants the card to itself (HAMi: 100 cores on a 100-core card)."""
        return card.totalcore == 100 and cores == 100

    def memreq_on(self, card: Card, ask: Ask) -> int:
        if ask.memreq > 0:
            return ask.memreq
        return card.totalmem * ask.mem_percent // 100

    def grant(self, card: Card, ask: Ask, mem: int, cores: int) -> Grant:
        return Grant(card.index, card.id, ask.family, mem, cores)

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        """HAMi's common ``Fit``: the first failing check of a card is its reason."""
        reasons: dict[str, int] = {}
        chosen: list[Grant] = []
        need = ask.nums
        cores = min(ask.coresreq, 100) if self.shares_memory else ask.coresreq
        order = reversed(cards) if self.backward else iter(cards)

        def no(reason: str) -> None:
            reasons[reason] = reasons.get(reason, 0) + 1

        for card in order:
            if self.check_health and not card.health:
                no(CARD_NOT_HEALTH)
                continue
            if not self.type_ok(card, ask, pod):
                no(CARD_TYPE_MISMATCH)
                continue
            if not self.uuid_ok(card, pod):
                no(CARD_UUID_MISMATCH)
                continue
            extra = self.extra_check(card, ask, pod)
            if extra is not None:
                no(extra)
                continue
            if card.count <= card.used:
                no(CARD_TIME_SLICING_EXHAUSTED)
                continue
            if pod.mutex and card.used > 0:
                no(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT)
                continue
            mem = 0
            if self.shares_memory:
                mem = self.memreq_on(card, ask)
                if card.totalmem - card.usedmem < mem:
                    no(CARD_INSUFFICIENT_MEMORY)
                    continue
                need_cores = self.cores_on(card, cores)
                if card.totalcore - card.usedcores < need_cores:
                    no(CARD_INSUFFICIENT_CORE)
                    continue
                if self.exclusive(card, cores) and card.used > 0:
                    no(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT)
                    continue
                if card.totalcore != 0 and card.usedcores == card.totalcore and cores == 0:
                    no(CARD_COMPUTE_UNITS_EXHAUSTED)
                    continue
            else:
                need_cores = cores
            if not self.custom_filter(card, ask, pod, chosen):
                no(CARD_NOT_FOUND_CUSTOM_FILTER_RULE)
                continue
            chosen.append(self.grant(card, ask, mem, need_cores))
            need -= 1
            if need == 0:
                return FitResult(True, chosen, {}, len(cards))
        if chosen:
            reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(chosen)
        return FitResult(False, chosen, reasons, len(cards))

    def score(self, grants: Sequence[Sequence[Grant]], cards: Sequence[Card], policy: str) -> float:
        """HAMi's ``ScoreNode``: a node score added for this family's grants (0 for most)."""
        return 0.0

    # ------------------------------------------------------------------ annotations

    def decode_register(self, value: str) -> list[Card]:
        """The node's register annotation (HAMi's ``DeviceInfo`` JSON list) as cards."""
        return decode_device_info(value, self.register_annotation)

    def cards_from_capacity(self, node: str, capacity: Mapping[str, Any]) -> list[Card]:
        """Cards HAMi synthesises from ``node.status.capacity`` (capacity-derived families)."""
        raise NotImplementedError(
            f"{self.vendor} registers its cards in {self.register_annotation}"
        )

    def node_cards(
        self, node: str, annotations: Mapping[str, str], capacity: Mapping[str, Any]
    ) -> list[Card]:
        """HAMi's ``GetNodeDevices``: from the register annotation, or from capacity."""
        if not self.register_annotation:
            return self.cards_from_capacity(node, capacity)
        value = annotations.get(self.register_annotation)
        if value is None:
            raise RequestError(f"annos not found {self.register_annotation}")
        return self.decode_register(value)

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        """HAMi's ``PatchAnnotations`` (without the clock-valued keys, which the caller adds)."""
        if not any(grants):
            return {}
        text = encode_pod_single_device(grants)
        out: dict[str, str] = {}
        if self.to_allocate_annotation:
            out[self.to_allocate_annotation] = text
        if self.allocated_annotation:
            out[self.allocated_annotation] = text
        return out

    # --------------------------------------------------------------------- allocate

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """The env, device nodes, mounts (and files) the node agent answers ``Allocate``
        with for one container's cards of this family, in grant order."""
        return Allocation()


def decode_device_info(value: str, where: str) -> list[Card]:
    """HAMi's ``UnMarshalNodeDevices``: a JSON list of ``DeviceInfo`` objects."""
    try:
        raw = json.loads(value)
    except ValueError:
        raise RequestError(f"{where}: invalid JSON") from None
    if not isinstance(raw, list):
        raise RequestError(f"{where}: invalid JSON, want a list of devices")
    cards = []
    for i, d in enumerate(raw):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not d["id"]:
            raise RequestError(f"{where}[{i}]: a device object with an 'id' is required")
        try:
            cards.append(
                Card(
                    id=d["id"],
                    index=int(d.get("index", 0)),
                    type=str(d.get("type", "")),
                    count=int(d.get("count", 0)),
                    totalmem=int(d.get("devmem", 0)),
                    totalcore=int(d.get("devcore", 0)),
                    numa=int(d.get("numa", 0)),
                    health=bool(d.get("health", False)),
                    custom=dict(d.get("customInfo") or d.get("custominfo") or {}),
                )
            )
        except (TypeError, ValueError):
            raise RequestError(f"{where}[{i}]: numbers must be integers") from None
    if not cards:
        raise RequestError("no device found on node")
    return cards


def capacity_int(capacity: Mapping[str, Any], name: str) -> int:
    v = capacity.get(name)
    if v is None:
        return 0
    q = exact(v, name)
    return int(q)
