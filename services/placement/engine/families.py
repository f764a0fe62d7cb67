"""Placement's door to the device-family registry: other vendors' fits, by family.

A card carries its family in ``vendor`` (HAMi's device type: ``MLU``, ``Ascend910B3``,
...) and so does an ask; the vector stage already offers a card only to asks of its
own family. For a family whose fit is not placement's own (every family but NVIDIA),
the exact stage hands the node's cards of that family to the family's fit
(:mod:`shared.devices`) instead of HAMi's NVIDIA fit, and the vector stage keeps only
the checks every family makes (slots, the mutex policy), since memory and cores mean
different things per family (256 MiB units, compute units, core bitmasks, fixed sizes).
Adding a vendor is a registry entry; nothing here or in the placer changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.devices import base as dev
from shared.devices.registry import family_of
from shared.schemas import ContainerGrant

from . import hami
from .model import CARD_CORDONED, CARD_REASONS


@dataclass(slots=True)
class FamilyFit(hami.FitResult):
    """A family's answer: also the cores each picked card books, in the card's own unit
    (AMD's compute units, Neuron's core bits), which the placer books instead of the ask's."""

    cores: list[int] = field(default_factory=list)


def booked(memo: dict[str, object] | None, pos: int, default: int) -> int:
    """The cores a family's fit booked on card ``pos`` (see :func:`keep_cores`), else ``default``."""
    got = memo.get("family_cores") if memo is not None else None
    if isinstance(got, dict) and pos in got:
        return int(got.pop(pos))
    return default


def keep_cores(memo: dict[str, object] | None, res: hami.FitResult) -> None:
    """Remember a family fit's per-card cores for the placer's booking (:func:`booked`)."""
    if memo is not None and isinstance(res, FamilyFit):
        memo["family_cores"] = dict(zip(res.picked, res.cores, strict=True))


def foreign(vendor: str) -> bool:
    """Whether asks of ``vendor`` are fitted by their family, not by placement's own fit."""
    fam = family_of(vendor)
    return fam is not None and not fam.engine_native


def fit(
    cards: Sequence[hami.Card],
    visit: Sequence[int],
    req: hami.Request,
    f: hami.Filters,
    granted: object = None,
) -> hami.FitResult | None:
    """The family's fit of ``req`` over the node's cards in ``visit`` order, as
    :func:`.hami.fit` answers; None when placement's own fit applies (NVIDIA, or a
    vendor the registry does not know). ``granted``: the pod's earlier containers'
    grants on this node (a list of :class:`~shared.schemas.ContainerGrant`), which some
    families' rules read (Moore Threads: one card per pod)."""
    fam = family_of(req.vendor)
    if fam is None or fam.engine_native:
        return None
    mine = [p for p in visit if cards[p].vendor == req.vendor]
    res = FamilyFit(ok=False, cards=len(mine))
    cordoned = [p for p in mine if cards[p].cordoned]
    if cordoned:
        res.reasons[CARD_REASONS[CARD_CORDONED]] = len(cordoned)
    offered = [p for p in mine if not cards[p].cordoned]
    # ``visit`` is the order HAMi walks: its device list sorted by policy, walked from
    # the end; a family's fit gets that sorted list and walks it its own way
    listing = offered[::-1]
    by_uuid = {cards[p].id: p for p in listing}
    view = [
        dev.Card(
            id=c.id,
            index=c.index,
            type=c.type,
            count=c.count,
            used=c.used,
            totalmem=c.totalmem,
            usedmem=c.usedmem,
            totalcore=c.totalcore,
            usedcores=c.usedcores,
            numa=c.numa,
            health=c.health,
            # the mode the card registered with, which some fits read (Ascend's soft mode)
            custom={dev.CARD_MODE: c.mode} if c.mode else {},
        )
        for c in (cards[p] for p in listing)
    ]
    pct = 0 if req.memreq > 0 else (100 if req.mempct == hami.UNSET_PCT else req.mempct)
    ask = dev.Ask(req.vendor, req.nums, req.memreq, pct, req.coresreq)
    allocated: dict[str, list[list[dev.Grant]]] = {}
    if isinstance(granted, list):
        per = [
            [
                dev.Grant(d.index, d.uuid, d.vendor, d.mem, d.cores)
                for d in c.devices
                if d.vendor == req.vendor
            ]
            for c in granted
            if isinstance(c, ContainerGrant)
        ]
        allocated[req.vendor] = [g for g in per if g]
    annotations = dict(f.family_annotations)  # the family's use/nouse type and UUID lists
    if f.mutex:
        annotations[dev.GPU_SCHEDULER_POLICY] = "mutex"
    pod = dev.PodInfo(annotations=annotations, allocated=allocated)
    got = fam.fit(view, ask, pod)
    for reason, n in got.reasons.items():
        res.reasons[reason] = res.reasons.get(reason, 0) + n
    res.cards = got.cards + len(cordoned)  # the family's denominator (Kunlun's is its own)
    if got.ok:
        res.ok, res.reasons = True, {}
        res.picked = [by_uuid[g.uuid] for g in got.grants]
        res.mems = [g.usedmem for g in got.grants]
        res.cores = [g.usedcores for g in got.grants]
    return res
