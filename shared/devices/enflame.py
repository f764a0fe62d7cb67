"""Enflame GCU: HAMi's ``pkg/device/enflame``: shared vGCU slices and whole GCUs.

vGCU (``enflame.com/vgcu``, ``enflame.com/vgcu-percentage``): a card is cut into a fixed
number of equal slices (``enflame.com/shared-gcu`` capacity over ``enflame.com/gcu-count``);
a one-card ask's percentage rounds up to a whole number of slices, more than one card is
whole cards. The card's "memory" is 100 percentage points. Whole GCUs
(``enflame.com/gcu``) are exclusive: a busy card is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shared.devices.base import (
    ALLOCATED_CARDS_INSUFFICIENT_REQUEST,
    CARD_TYPE_MISMATCH,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
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
    quantity,
    whole,
    with_limits,
)

SHARED = "enflame.com/shared-gcu"
COUNT_NO_SHARED = "enflame.com/gcu-count"
ASSIGNED = "enflame.com/gcu-assigned"
ASSIGNED_ID = "enflame.com/gcu-assigned-id"


def enflame_allocation(devices: Sequence[Allocated]) -> Allocation:
    out = Allocation(envs={"ENFLAME_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})
    drs = [f"DRS-{d.instance}" for d in devices if d.instance]
    if drs:
        out.envs["TOPS_VISIBLE_DEVICES"] = ",".join(drs)
    return out


@dataclass(frozen=True)
class EnflameVGCU(Family):
    slices: int = 0  # slices per card; 0 = not known yet (HAMi's factor before a node is seen)

    def with_slices(self, slices: int) -> EnflameVGCU:
        return replace(self, slices=slices)

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        r = self.resources
        lim = resources.get("limits") or {}
        n = whole(lim[r.count], r.count)
        out = with_limits(resources)
        if n > 1:
            out["limits"][r.memory_percentage] = 100
            out["limits"][SHARED] = self.slices * n
            return Admitted(out, {})
        pct = (
            whole(lim[r.memory_percentage], r.memory_percentage)
            if r.memory_percentage in lim
            else 100
        )
        pct = max(1, pct)
        if self.slices > 0:
            size = 100 / self.slices
            for i in range(self.slices):
                if size * i < pct <= size * (i + 1):
                    pct = int(size * (i + 1))
                    for part in ("limits", "requests"):
                        out[part][r.memory_percentage] = pct
                        out[part][SHARED] = i + 1
                    break
        return Admitted(out, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        r = self.resources
        raw = quantity(resources, r.count)
        if raw is None:
            return None
        n = whole(raw, r.count)
        if n <= 0:
            return None
        pct = 100
        if (p := quantity(resources, r.memory_percentage)) is not None:
            pct = whole(p, r.memory_percentage)
        return Ask(self.name, n, pct, 0, 0)

    def cards_from_capacity(self, node: str, capacity: Mapping[str, Any]) -> list[Card]:
        cards = capacity_int(capacity, COUNT_NO_SHARED)
        if cards == 0:
            raise RequestError(f"device not found {COUNT_NO_SHARED}")
        return [
            Card(
                id=f"{node}-enflame-{i}",
                index=i,
                type=self.name,
                count=100,
                totalmem=100,
                totalcore=100,
            )
            for i in range(cards)
        ]

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        out = super().pod_annotations(pod, grants, node)
        if out:
            out[ASSIGNED] = "false"
            first = grants[0] if grants else []
            if first:
                out[ASSIGNED_ID] = ",".join(str(g.idx) for g in first)
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """gcushare's answer: ``ENFLAME_VISIBLE_DEVICES`` = the cards, and for a DRS slice
        ``TOPS_VISIBLE_DEVICES`` = ``DRS-<instance UUID>``."""
        return enflame_allocation(devices)


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
        """gcushare's answer: ``ENFLAME_VISIBLE_DEVICES`` = the cards, and for a DRS slice
        ``TOPS_VISIBLE_DEVICES`` = ``DRS-<instance UUID>``."""
        return enflame_allocation(devices)


VGCU = EnflameVGCU(
    name="Enflame",
    vendor="enflame",
    resources=ResourceNames("enflame.com/vgcu", memory_percentage="enflame.com/vgcu-percentage"),
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
FAMILIES = (VGCU, GCU)
