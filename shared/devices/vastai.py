"""Vastai: HAMi's ``pkg/device/vastai`` (v2.10): whole cards or dies by count.

``vastaitech.com/va: N``. In die mode (the register's ``customInfo.DeviceStrategy`` is
``die``) each registered device is one die of a card (``customInfo.AIC``): every fitting
die is collected, then N are taken, as many as possible from the same card; under the
mutex policy an idle die of a busy card is refused too. The node registers
``hami.io/node-va-register``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    ALLOCATED_CARDS_INSUFFICIENT_REQUEST,
    CARD_NOT_HEALTH,
    CARD_TIME_SLICING_EXHAUSTED,
    CARD_TYPE_MISMATCH,
    CARD_UUID_MISMATCH,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
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
    quantity,
    whole,
)


def die_mode(cards: Sequence[Card]) -> bool:
    return bool(cards) and cards[0].custom.get("DeviceStrategy") == "die"


@dataclass(frozen=True)
class Vastai(Family):
    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        raw = quantity(resources, self.resources.count)
        if raw is None:
            return None
        n = whole(raw, self.resources.count)
        return Ask(self.name, n, 0, 100, 0, whole=True) if n > 0 else None

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        reasons: dict[str, int] = {}
        chosen: list[Grant] = []
        dies = die_mode(cards)
        busy_aic = (
            {c.custom.get("AIC") for c in cards if c.used > 0} if pod.mutex and dies else set()
        )

        def no(r: str) -> None:
            reasons[r] = reasons.get(r, 0) + 1

        for card in reversed(cards):
            if not card.health:
                no(CARD_NOT_HEALTH)
                continue
            if ask.family != self.name:
                no(CARD_TYPE_MISMATCH)
                continue
            if not self.uuid_ok(card, pod):
                no(CARD_UUID_MISMATCH)
                continue
            if card.count <= card.used:
                no(CARD_TIME_SLICING_EXHAUSTED)
                continue
            if pod.mutex and (card.used > 0 or (dies and card.custom.get("AIC") in busy_aic)):
                no(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT)
                continue
            chosen.append(
                Grant(card.index, card.id, ask.family, 0, ask.coresreq, dict(card.custom))
            )
            if not dies and len(chosen) == ask.nums:
                return FitResult(True, chosen, {}, len(cards))
        if dies and len(chosen) >= ask.nums:
            best = chosen[:1] if ask.nums == 1 else best_combination(ask.nums, chosen)
            return FitResult(True, best, {}, len(cards))
        if chosen:
            reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(chosen)
        return FitResult(False, chosen, reasons, len(cards))

    def score(self, grants: Sequence[Sequence[Grant]], cards: Sequence[Card], policy: str) -> float:
        """HAMi's die-mode score: per container, the share of its dies on its busiest card."""
        total = 0.0
        for ctr in grants:
            if not ctr:
                continue
            counts: dict[str, int] = {}
            for g in ctr:
                custom = g.custom or {}
                if custom.get("DeviceStrategy", "die") != "die" or "AIC" not in custom:
                    return 0.0
                counts[str(custom["AIC"])] = counts.get(str(custom["AIC"]), 0) + 1
            total += max(counts.values()) / sum(counts.values())
        return total

    def decode_register(self, value: str) -> list[Card]:
        cards = super().decode_register(value)
        for c in cards:
            c.totalcore = 100
        return cards

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """``VASTAI_VISIBLE_DEVICES`` with the dies' indexes (the vendor plugin's answer is
        not public: device nodes come from its runtime)."""
        return Allocation(envs={"VASTAI_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})


def best_combination(need: int, dies: list[Grant]) -> list[Grant]:
    """HAMi's ``computeBestCombination``: dies from the cards with most fitting dies first."""
    by_card: dict[str, list[Grant]] = {}
    for g in dies:
        by_card.setdefault(str((g.custom or {}).get("AIC", "")), []).append(g)
    out: list[Grant] = []
    for group in sorted(by_card.values(), key=len, reverse=True):  # stable, as Go's SliceStable
        for g in group:
            out.append(g)
            if len(out) == need:
                return out
    return out


FAMILY = Vastai(
    name="Vastai",
    vendor="vastai",
    resources=ResourceNames("vastaitech.com/va"),
    register_annotation="hami.io/node-va-register",
    handshake_annotation="hami.io/node-handshake-va",
    to_allocate_annotation="hami.io/Vastai-devices-to-allocate",
    allocated_annotation="hami.io/Vastai-devices-allocated",
    use_uuid_annotation="vastaitech.com/use-gpuuuid",
    nouse_uuid_annotation="vastaitech.com/nouse-gpuuuid",
    shares_memory=False,
    check_health=True,
)
