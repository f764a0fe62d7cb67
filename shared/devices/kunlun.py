"""Kunlunxin vXPU: HAMi's ``pkg/device/kunlun`` (``vdevice.go``).

vXPU memory rounds up to a quarter, a half or the whole card (24576, 49152, 98304 MiB);
cores follow memory (``mem * 100 / 98304``); no memory means the whole card. All vXPUs on
one card have the same size (HAMi's ``FitVXPU``: a busy card takes only an ask equal to
its average slice). HAMi picks the cards with a topology search over the node's eight
cards (two groups of four); here a group of four that holds the ask is preferred, then
any cards, and when none fit the reason is HAMi's single ``NumaNotFit``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    NUMA_NOT_FIT,
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
    ResourceNames,
    dev,
    quantity,
    whole,
    with_limits,
)

MAX_MEMORY = 98304
SIZES = (24576, 49152)
GROUP = 4  # cards per interconnect group (HAMi's topology: 0-3 and 4-7)


def trim_memory(mib: int) -> int:
    """HAMi's ``trimMemory``: the smallest vXPU size that holds ``mib``."""
    for size in SIZES:
        if mib <= size:
            return size
    return MAX_MEMORY


def fit_vxpu(card: Card, ask: Ask) -> bool:
    """HAMi's ``FitVXPU``: room for the slice, and one slice size per card."""
    if card.usedmem + ask.memreq > card.totalmem:
        return False
    if card.used == 0:
        return True
    return card.usedmem // card.used == ask.memreq


@dataclass(frozen=True)
class Kunlun(Family):
    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        mem = (resources.get("limits") or {}).get(self.resources.memory)
        if mem is None:
            return Admitted(resources, {})
        size = trim_memory(whole(mem, self.resources.memory))
        out = with_limits(resources)
        out["limits"][self.resources.memory] = size
        out["requests"][self.resources.memory] = size
        return Admitted(out, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        raw = quantity(resources, self.resources.count)
        if raw is None:
            return None
        n = whole(raw, self.resources.count)
        if n <= 0:
            return None
        mem = 0
        if (m := quantity(resources, self.resources.memory)) is not None:
            mem = trim_memory(whole(m, self.resources.memory))
        if mem == 0:
            return Ask(self.name, n, MAX_MEMORY, 100, 100)
        return Ask(self.name, n, mem, 0, mem * 100 // MAX_MEMORY)

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        ok = [
            c
            for c in cards
            if c.health
            and self.type_ok(c, ask, pod)
            and self.uuid_ok(c, pod)
            and c.count > c.used
            and fit_vxpu(c, ask)
        ]
        pick: list[Card] = []
        if ask.nums <= GROUP:
            groups: dict[int, list[Card]] = {}
            for c in ok:
                groups.setdefault(c.index // GROUP, []).append(c)
            # the fullest group that still holds the ask keeps the other group whole
            fitting = [g for g in groups.values() if len(g) >= ask.nums]
            if fitting:
                pick = min(fitting, key=len)[: ask.nums]
        elif len(ok) >= ask.nums:
            pick = ok[: ask.nums]
        if not pick:
            return FitResult(
                False, [], {NUMA_NOT_FIT: 1}, 1
            )  # HAMi: GenReason(reason, len(reason))
        return FitResult(
            True,
            [Grant(c.index, c.id, ask.family, ask.memreq, ask.coresreq) for c in pick],
            {},
            len(cards),
        )

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """``/dev/xpu<N>`` of each card and ``/dev/xpuctrl``; ``XPU_VISIBLE_DEVICES`` the
        host indexes, as HAMi's ``BAIDU_COM_DEVICE_IDX`` names them (the vXPU plugin's
        own answer is not public)."""
        out = Allocation(envs={"XPU_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})
        out.devices = [dev(f"/dev/xpu{d.index}") for d in devices]
        out.devices.append(dev("/dev/xpuctrl"))
        return out


FAMILY = Kunlun(
    name="XPU",
    vendor="kunlunxin",
    resources=ResourceNames("kunlunxin.com/vxpu", "kunlunxin.com/vxpu-memory"),
    register_annotation="hami.io/node-register-xpu",
    handshake_annotation="hami.io/node-handshake-xpu",
    to_allocate_annotation="hami.io/xpu-devices-to-allocate",
    allocated_annotation="hami.io/xpu-devices-allocated",
    use_uuid_annotation="hami.io/use-xpu-uuid",
    nouse_uuid_annotation="hami.io/no-use-xpu-uuid",
)
