"""Enflame GCU: HAMi's ``pkg/device/enflame``: DRS slices (``Enflame``) and whole GCUs (``GCU``).

DRS (Dynamic Resource Slicing, device type ``Enflame``): gcushare-device-plugin writes
the node annotation ``enflame.com/gcu-drs-capacity`` =
``{"devices": [{"index": "0", "minor": "0", "capacity": 6}], "profiles": {"3g.20gb": "1"}}``;
each card offers ``capacity`` slices and the node's profile menu (``<slices>g.<GB>gb`` ->
profile ID). A container asks for one slice of one card, either by profile size
(``enflame.com/drs-gcu: 3`` = the 3-slice profile, exactly) or by spec
(``enflame.com/gcu-memory`` and/or ``enflame.com/gcu-core``: the smallest profile holding
that much memory and core share). The fit picks the profile once for the node, then a
card with the profile's slices, memory and core share free; a node offering no matching
profile answers ``ModeNotFit``. The pod annotations tell gcushare which card, which
profile and how many slices; it creates the DRS instance and answers Allocate with
``ENFLAME_VISIBLE_DEVICES=<index>`` and ``TOPS_VISIBLE_DEVICES=DRS-<instance UUID>``.
The older shared-vGCU resources (``enflame.com/vgcu``, ``enflame.com/vgcu-percentage``)
are no longer read: HAMi accepts ``vgcu`` only as a configured alias of ``drs-gcu``.

Whole GCUs (``enflame.com/gcu``, device type ``GCU``) are exclusive: a busy card is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    ALLOCATED_CARDS_INSUFFICIENT_REQUEST,
    CARD_INSUFFICIENT_CORE,
    CARD_INSUFFICIENT_MEMORY,
    CARD_NOT_HEALTH,
    CARD_TIME_SLICING_EXHAUSTED,
    CARD_TYPE_MISMATCH,
    CARD_UUID_MISMATCH,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
    INT32_MAX,
    Admitted,
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    FitResult,
    Grant,
    PodInfo,
    RequestError,
    ResourceNames,
    capacity_int,
    exact,
    go_json,
    quantity,
    whole,
    with_limits,
)

MODE_NOT_FIT = "ModeNotFit"  # HAMi's common.ModeNotFit: no profile of the node fits the ask

DRS_CAPACITY = "enflame.com/gcu-drs-capacity"  # gcushare's node annotation
ASSIGNED = "enflame.com/gcu-assigned"
ASSIGNED_ID = "enflame.com/gcu-assigned-id"
ASSIGNED_INDEX = "enflame.com/gcu-assigned-index"
ASSIGNED_MINOR = "enflame.com/gcu-assigned-minor"
REQUEST_SIZE = "enflame.com/gcu-request-size"
ASSIGNED_CONTAINERS = "assigned-containers"

# The ask's mode, in Ask.mem_percent (HAMi's MemPercentagereq): a profile size in
# memreq (``drs-gcu``), or memory/core figures to find the smallest profile for.
MODE_DIRECT = 0
MODE_BY_SPEC = -1

INT32_MIN = -(1 << 31)
_INT64 = 1 << 63


def clamp_int32(n: int) -> int:
    """``n`` saturated to the int32 range (HAMi's clampToInt32)."""
    return max(INT32_MIN, min(INT32_MAX, n))


def _float_int(v: float) -> int | None:
    """A float's integer part, or None when it is not finite or outside int64."""
    if not math.isfinite(v) or not -_INT64 <= v < _INT64:
        return None
    return int(v)


def custom_int(custom: Mapping[str, Any] | None, key: str) -> int:
    """An integer of a card's or grant's customInfo (numbers or decimal strings; 0 when
    absent, unreadable, not finite or outside int64), as HAMi's readCustomInfoInt."""
    raw = (custom or {}).get(key)
    if isinstance(raw, bool) or raw is None:
        return 0
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        return _float_int(raw) or 0
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            return 0
    return 0


def custom_str(custom: Mapping[str, Any] | None, key: str) -> str:
    """A customInfo value as text ("" when absent; numbers without a fraction)."""
    raw = (custom or {}).get(key)
    if raw is None:
        return ""
    if isinstance(raw, float):
        got = _float_int(raw)
        return str(got) if got is not None else str(raw)
    return str(raw)


def parse_capacity(raw: Any) -> int:
    """A device's ``capacity`` in the DRS annotation: a number or a decimal string, at
    most int32 (larger ones saturate); not finite, beyond int64 or not a number is a
    :class:`ValueError` (HAMi's parseDRSCapacity)."""
    if isinstance(raw, bool):
        raise ValueError(f"unknown capacity type: {type(raw).__name__}")
    if isinstance(raw, int):
        return clamp_int32(raw)
    if isinstance(raw, float):
        got = _float_int(raw)
        if got is None:
            raise ValueError(f"capacity {raw!r} is not a finite int64")
        return clamp_int32(got)
    if isinstance(raw, str):
        return clamp_int32(int(raw.strip()))
    raise ValueError(f"unknown capacity type: {type(raw).__name__}")


def parse_profile(name: str) -> tuple[int, int]:
    """A profile name's (slices, memory GB): ``3g.20gb`` -> (3, 20); (0, 0) when the
    slice part does not read, (slices, 0) when only the memory part does not."""
    parts = name.strip().lower().split(".")
    if len(parts) < 2:
        return 0, 0
    try:
        size = int(parts[0].strip().removesuffix("g"))
    except ValueError:
        return 0, 0
    try:
        mem = int(parts[1].strip().removesuffix("gb"))
    except ValueError:
        return size, 0
    return size, mem


def card_profiles(custom: Mapping[str, Any] | None) -> dict[str, str]:
    """The card's profile menu (name -> ID); IDs that are not text are left out."""
    raw = (custom or {}).get("profiles")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}


@dataclass(frozen=True, slots=True)
class Profile:
    """One DRS profile as the fit prices it: its slices, memory and core share."""

    name: str
    id: str
    size: int  # slices
    memory_gb: int
    core_percent: int  # the profile's share of the card's cores
    request_memory_gb: int = 0  # what a by-spec ask asked, in GB
    request_core_percent: int = 0


def node_profiles(cards: Sequence[Card]) -> list[Profile]:
    """Every profile the cards offer, smallest first (slices, then memory).

    A profile's core share is its slices over the card's slices (``maxSlice`` the cards
    registered, else the largest profile), rounded down, so that a card's advertised
    slices add up to at most its 100 %: HAMi's fit must admit every slice it offers
    (six 1-slice workloads on a 6-slice card), which the rounded-up share refused."""
    max_slice = max((custom_int(c.custom, "maxSlice") for c in cards), default=0)
    if max_slice <= 0:
        sizes = [parse_profile(n)[0] for c in cards for n in card_profiles(c.custom)]
        max_slice = max(sizes, default=0)
    if max_slice <= 0:
        return []
    seen: dict[str, Profile] = {}
    for c in cards:
        for name, pid in card_profiles(c.custom).items():
            size, mem = parse_profile(name)
            if size <= 0 or mem <= 0 or name in seen:
                continue
            seen[name] = Profile(name, pid, size, mem, size * 100 // max_slice)
    return sorted(seen.values(), key=lambda p: (p.size, p.memory_gb, p.name))


def memory_gb(raw: int, max_profile_gb: int) -> int:
    """A by-spec memory ask in GB: read as MiB (rounded up to whole GB) when it is more
    than twice the node's largest profile, else as GB already."""
    if raw <= 0:
        return 0
    if max_profile_gb > 0 and raw > max_profile_gb * 2:
        return math.ceil(raw / 1024)
    return raw


def select_profile(cards: Sequence[Card], ask: Ask) -> Profile | None:
    """The profile an ask means on these cards: the one of exactly ``memreq`` slices
    (direct mode), or the smallest holding the asked memory and core share (by spec);
    None when the node has none (``ModeNotFit``)."""
    menu = node_profiles(cards)
    if not menu:
        return None
    if ask.mem_percent == MODE_DIRECT:
        return next((p for p in menu if p.size == ask.memreq), None)
    want_gb = memory_gb(ask.memreq, menu[-1].memory_gb)
    want_core = ask.coresreq
    for p in menu:
        if want_gb > 0 and p.memory_gb < want_gb:
            continue
        if want_core > 0 and p.core_percent < want_core:
            continue
        return Profile(p.name, p.id, p.size, p.memory_gb, p.core_percent, want_gb, want_core)
    return None


def slice_count(grant: Grant) -> int:
    """The slices a grant holds: its ``drsSlice`` (saturated to int32), at least 1."""
    n = clamp_int32(custom_int(grant.custom, "drsSlice"))
    return n if n > 0 else 1


def _value(raw: Any, name: str) -> int:
    """A quantity's ``Value()``: rounded up to a whole number (negatives kept)."""
    return math.ceil(exact(raw, name))


def enflame_allocation(devices: Sequence[Allocated]) -> Allocation:
    """gcushare's answer: ``ENFLAME_VISIBLE_DEVICES`` = the cards' indices, and for a DRS
    slice the node made ``TOPS_VISIBLE_DEVICES`` = ``DRS-<instance UUID>``."""
    out = Allocation(envs={"ENFLAME_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})
    drs = [f"DRS-{d.instance}" for d in devices if d.instance]
    if drs:
        out.envs["TOPS_VISIBLE_DEVICES"] = ",".join(drs)
    return out


@dataclass(frozen=True)
class EnflameDRS(Family):
    """HAMi's ``EnflameDevices``: one DRS profile of one card per container."""

    def asks_for(self, resources: Mapping[str, Any]) -> bool:
        r = self.resources
        return any(quantity(resources, n) is not None for n in (r.count, r.memory, r.cores))

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        """HAMi's webhook: a profile size above 0, or memory above 0 and a core share in
        (0, 100]; each named resource is set in both limits and requests."""
        r = self.resources
        out = with_limits(resources)
        count = quantity(resources, r.count)
        if count is not None:
            if _value(count, r.count) <= 0:
                raise RequestError(f"{r.count} must be greater than 0")
            names: tuple[str, ...] = (r.count,)
        else:
            mem, cores = quantity(resources, r.memory), quantity(resources, r.cores)
            if mem is not None and _value(mem, r.memory) <= 0:
                raise RequestError(f"{r.memory} must be greater than 0")
            if cores is not None and not 0 < _value(cores, r.cores) <= 100:
                raise RequestError(f"{r.cores} must be in range (0,100]")
            names = (r.memory, r.cores)
        for n in names:
            v = quantity(resources, n)
            if v is not None:
                out["limits"].setdefault(n, v)
                out["requests"].setdefault(n, v)
        return Admitted(out, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        """One card always: ``drs-gcu`` is the profile size (direct); else the memory
        (MiB, or GB when small) and core share to find a profile for (by spec). A size
        or memory beyond int32, or a core share outside 0..100, asks nothing."""
        r = self.resources
        count = quantity(resources, r.count)
        if count is not None:
            n = exact(count, r.count)
            if n.denominator == 1 and n > 0:
                return Ask(self.name, 1, int(n), MODE_DIRECT, 0) if n <= INT32_MAX else None
        raw_mem, raw_cores = quantity(resources, r.memory), quantity(resources, r.cores)
        if raw_mem is None and raw_cores is None:
            return None
        mem = _value(raw_mem, r.memory) if raw_mem is not None else 0
        cores = _value(raw_cores, r.cores) if raw_cores is not None else 0
        if mem > INT32_MAX or not 0 <= cores <= 100:
            return None
        return Ask(self.name, 1, mem, MODE_BY_SPEC, cores)

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        """The node's profile for the ask (``ModeNotFit`` when it has none, or one too
        large for int32), then the first card, last to first, that is healthy, of the
        type, allowed by the UUID lists, not mutex-busy and has the profile's slices,
        memory and core share free."""
        reasons: dict[str, int] = {}

        def no(reason: str) -> None:
            reasons[reason] = reasons.get(reason, 0) + 1

        p = select_profile(cards, ask)
        if (
            p is None
            or not 0 < p.size <= INT32_MAX
            or not 0 < p.memory_gb <= INT32_MAX // 1024
            or p.core_percent > INT32_MAX
        ):
            no(MODE_NOT_FIT)
            return FitResult(False, [], reasons, len(cards))
        mem, cores = p.memory_gb * 1024, p.core_percent
        chosen: list[Grant] = []
        for card in reversed(cards):
            if not card.health:
                no(CARD_NOT_HEALTH)
                continue
            if not self.type_ok(card, ask, pod):
                no(CARD_TYPE_MISMATCH)
                continue
            if not self.uuid_ok(card, pod):
                no(CARD_UUID_MISMATCH)
                continue
            if card.count <= card.used:
                no(CARD_TIME_SLICING_EXHAUSTED)
                continue
            if pod.mutex and card.used > 0:
                no(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT)
                continue
            if card.count - card.used < p.size:  # every slice of the profile must be free
                no(CARD_TIME_SLICING_EXHAUSTED)
                continue
            if card.totalmem - card.usedmem < mem:
                no(CARD_INSUFFICIENT_MEMORY)
                continue
            if card.totalcore > 0 and card.totalcore - card.usedcores < cores:
                no(CARD_INSUFFICIENT_CORE)
                continue
            custom = {
                "profileName": p.name,
                "profileID": p.id,
                "minor": custom_str(card.custom, "minor"),
                "index": custom_str(card.custom, "index"),
                "drsSlice": p.size,
                "requestMem": p.request_memory_gb,
                "requestCore": p.request_core_percent,
            }
            chosen.append(Grant(card.index, card.id, ask.family, mem, cores, custom))
            if len(chosen) == ask.nums:
                return FitResult(True, chosen, {}, len(cards))
        if chosen:
            reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(chosen)
        return FitResult(False, chosen, reasons, len(cards))

    def node_cards(
        self, node: str, annotations: Mapping[str, str], capacity: Mapping[str, Any]
    ) -> list[Card]:
        """HAMi's ``GetNodeDevices``: one card per device of the DRS annotation, with
        its slices as slots, the largest profile's memory (GB x 1024 MiB; its slices
        when no profile names a memory), 100 % cores and the profile menu."""
        value = annotations.get(DRS_CAPACITY)
        if value is None:
            raise RequestError(f"annotation not found {DRS_CAPACITY}")
        try:
            spec = json.loads(value)
            devices, profiles = _drs_spec(spec)
        except ValueError as exc:
            raise RequestError(f"failed to parse {DRS_CAPACITY}: {exc}") from None
        sizes = [parse_profile(n) for n in profiles]
        max_slice = max((s for s, _ in sizes), default=0)
        max_gb = max((m for _, m in sizes), default=0)
        if max_slice <= 0:
            raise RequestError(f"no valid drs profiles found on node {node}")
        if max_gb <= 0:
            max_gb = max_slice
        cards: list[Card] = []
        for pos, d in enumerate(devices):
            try:
                index = int(d.get("index", ""))
            except ValueError:
                index = pos
            try:
                slices = parse_capacity(d.get("capacity"))
            except ValueError:
                slices = 0
            if slices <= 0:
                raise RequestError(f"invalid drs capacity on node {node}")
            minor = str(d.get("minor", "")).strip() or str(index)
            cards.append(
                Card(
                    id=f"{node}-enflame-drs-{index}",
                    index=index,
                    type=self.name,
                    count=slices,
                    totalmem=max_gb * 1024,
                    totalcore=100,
                    custom={
                        "minor": minor,
                        "index": str(index),
                        "profiles": dict(profiles),
                        "maxSlice": max_slice,
                    },
                )
            )
        if not cards:
            raise RequestError(f"no drs devices found on node {node}")
        return cards

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        """HAMi's ``PatchAnnotations``: the allocated list, ``gcu-assigned: false``, the
        first card's index (also as ``gcu-assigned-id``), minor and slice count, and
        ``assigned-containers``: per container its slices and profile, for gcushare to
        create the instance. ``gcu-assigned-time`` is a clock value, left to the caller.
        A grant without customInfo (ours, rebuilt from a decision) names its card by
        its index and its minor as the index, as the register does without a minor."""
        out = super().pod_annotations(pod, grants, node)
        if not out:
            return out
        out[ASSIGNED] = "false"
        assigned: dict[str, dict[str, Any]] = {}
        for i, ctr in enumerate(grants):
            if not ctr:
                continue
            g = ctr[0]
            size = slice_count(g)
            entry: dict[str, Any] = {"allocated": False, "request": size}
            for key in ("profileID", "profileName"):
                if v := custom_str(g.custom, key):
                    entry[key] = v
            assigned[f"container-{i}"] = entry
            index = custom_str(g.custom, "index") if g.custom is not None else str(g.idx)
            minor = custom_str(g.custom, "minor") if g.custom is not None else str(g.idx)
            if ASSIGNED_INDEX not in out and index:
                out[ASSIGNED_INDEX] = out[ASSIGNED_ID] = index
            if ASSIGNED_MINOR not in out and minor:
                out[ASSIGNED_MINOR] = minor
            out.setdefault(REQUEST_SIZE, str(size))
        if assigned:
            out[ASSIGNED_CONTAINERS] = go_json(dict(sorted(assigned.items())))
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """gcushare's answer: ``ENFLAME_VISIBLE_DEVICES`` = the card, and
        ``TOPS_VISIBLE_DEVICES`` = ``DRS-<instance UUID>`` of the slice it created."""
        return enflame_allocation(devices)


def _drs_spec(spec: Any) -> tuple[list[Mapping[str, Any]], dict[str, str]]:
    """The annotation's devices and profiles, typed as gcushare writes them (index and
    minor text, profile IDs text); anything else is a :class:`ValueError`, as Go's
    decoding into HAMi's struct refuses it."""
    if not isinstance(spec, Mapping):
        raise ValueError("want an object with devices and profiles")
    devices = spec.get("devices") or []
    profiles = spec.get("profiles") or {}
    if not isinstance(devices, list) or not all(isinstance(d, Mapping) for d in devices):
        raise ValueError("devices: want a list of objects")
    for d in devices:
        for key in ("index", "minor"):
            if key in d and not isinstance(d[key], str):
                raise ValueError(f"devices[].{key}: want a string, got {d[key]!r}")
    if not isinstance(profiles, Mapping) or not all(isinstance(v, str) for v in profiles.values()):
        raise ValueError("profiles: want an object of profile name -> ID string")
    return list(devices), {str(k): v for k, v in profiles.items()}


@dataclass(frozen=True)
class EnflameGCU(Family):
    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        raw = quantity(resources, self.resources.count)
        if raw is None:
            return None
        n = whole(raw, self.resources.count)
        return Ask(self.name, n, 100, 100, 100, whole=True) if n > 0 else None

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        reasons: dict[str, int] = {}
        chosen: list[Grant] = []
        for card in reversed(cards):
            if ask.family != self.name:
                reasons[CARD_TYPE_MISMATCH] = reasons.get(CARD_TYPE_MISMATCH, 0) + 1
                continue
            if card.used > 0:
                reasons[EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT] = (
                    reasons.get(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT, 0) + 1
                )
                continue
            chosen.append(Grant(card.index, card.id, ask.family, ask.memreq, ask.coresreq))
            if len(chosen) == ask.nums:
                return FitResult(True, chosen, {}, len(cards))
        if chosen:
            reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(chosen)
        return FitResult(False, chosen, reasons, len(cards))

    def cards_from_capacity(self, node: str, capacity: Mapping[str, Any]) -> list[Card]:
        n = capacity_int(capacity, self.resources.count)
        if n == 0:
            raise RequestError(f"device not found {self.resources.count}")
        return [
            Card(
                id=f"{node}-GCU-{i}", index=i, type=self.name, count=1, totalmem=100, totalcore=100
            )
            for i in range(n)
        ]

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """``ENFLAME_VISIBLE_DEVICES`` = the cards' indices."""
        return enflame_allocation(devices)


DRS = EnflameDRS(
    name="Enflame",
    vendor="enflame",
    resources=ResourceNames(
        "enflame.com/drs-gcu", memory="enflame.com/gcu-memory", cores="enflame.com/gcu-core"
    ),
    register_annotation=DRS_CAPACITY,
    allocated_annotation="hami.io/enflame-vgpu-devices-allocated",
    use_uuid_annotation="enflame.com/use-gpuuuid",
    nouse_uuid_annotation="enflame.com/nouse-gpuuuid",
)
GCU = EnflameGCU(
    name="GCU",
    vendor="enflame",
    resources=ResourceNames("enflame.com/gcu"),
    to_allocate_annotation="hami.io/enflame-gcu-devices-to-allocate",
    allocated_annotation="hami.io/enflame-gcu-devices-allocated",
)
FAMILIES = (DRS, GCU)
