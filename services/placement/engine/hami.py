"""HAMi v2.10's fit, scores and reason texts as pure functions over plain tuples.

Each function is one step HAMi's scheduler takes, written from its behaviour so it can
be tested on its own cases: the card score (``DeviceListsScore.ComputeScore``, float32
as HAMi computes it), the order the fit visits cards in for a policy (the device sort,
then the walk from the end of the sorted list), the node score before the pod
(``ComputeDefaultScore``), the node ranking, the per-card checks of the NVIDIA fit with
their reason codes, the fit itself (NUMA binding, topology), and the reason text
(``"2/4 CardInsufficientMemory, 1/4 CardTypeMismatch"``). The vectorised engine
(:mod:`.placer`) is tested against these on random small clusters. No I/O here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

WEIGHT = np.float32(10.0)  # HAMi's util.Weight
UNSET_PCT = 101  # HAMi's "no gpumem-percentage" sentinel

CARD_NOT_HEALTH = "CardNotHealth"
CARD_CORDONED = "CardCordoned"
CARD_TYPE_MISMATCH = "CardTypeMismatch"
CARD_UUID_MISMATCH = "CardUuidMismatch"
CARD_TIME_SLICING = "CardTimeSlicingExhausted"
EXCLUSIVE_CONFLICT = "ExclusiveDeviceAllocateConflict"
QUOTA_NOT_FIT = "ResourceQuotaNotFit"
CARD_MEMORY = "CardInsufficientMemory"
CARD_CORE = "CardInsufficientCore"
CARD_COMPUTE_EXHAUSTED = "CardComputeUnitsExhausted"
NUMA_NOT_FIT = "NumaNotFit"
ALLOCATED_INSUFFICIENT = "AllocatedCardsInsufficientRequest"
NODE_INSUFFICIENT_DEVICE = "NodeInsufficientDevice"


@dataclass(slots=True)  # not frozen: a frozen __init__ is several times slower
class Card:
    """One card as HAMi's fit sees it (``DeviceUsage``); ``vendor`` picks the fit."""

    id: str
    index: int = 0
    type: str = "NVIDIA-A100"
    mode: str = "hami-core"
    numa: int = 0
    health: bool = True
    count: int = 10
    used: int = 0
    totalmem: int = 1000
    usedmem: int = 0
    totalcore: int = 100
    usedcores: int = 0
    cordoned: bool = False
    vendor: str = "NVIDIA"


@dataclass(slots=True)
class Request:
    """One container's ask of one vendor (``ContainerDeviceRequest``).

    ``memreq`` MiB per card, or ``mempct`` % of each card (101: not set).
    """

    nums: int
    memreq: int = 0
    mempct: int = UNSET_PCT
    coresreq: int = 0
    vendor: str = "NVIDIA"


@dataclass(frozen=True, slots=True)
class Filters:
    """The pod's card filters (annotations) and the GPU policy's switches."""

    use_types: tuple[str, ...] | None = None  # nvidia.com/use-gputype, split on ","
    nouse_types: tuple[str, ...] | None = None
    vgpu_mode: str | None = None  # nvidia.com/vgpu-mode
    use_uuids: tuple[str, ...] | None = None
    nouse_uuids: tuple[str, ...] | None = None
    numa_bind: bool = False
    mutex: bool = False
    topology: bool = False
    # other vendors' card filters (Constraints.family_annotations), as (name, value) pairs
    family_annotations: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class FitResult:
    """What the fit answers: the cards picked (positions, grant order) or the reasons."""

    ok: bool
    picked: list[int] = field(default_factory=list)
    mems: list[int] = field(default_factory=list)  # the memory booked on each picked card
    reasons: dict[str, int] = field(default_factory=dict)
    cards: int = 0  # the denominator of the reason text: the vendor's cards on the node
    node_reason: str = ""  # a node-level refusal (NodeInsufficientDevice): no card counts

    @property
    def text(self) -> str:
        return self.node_reason or gen_reason(self.reasons, self.cards)


# --------------------------------------------------------------------------- texts


def gen_reason(reasons: Mapping[str, int], cards: int) -> str:
    """HAMi's per-node reason text: ``"<n>/<cards> <reason>"``, by reason name."""
    return ", ".join(f"{reasons[r]}/{cards} {r}" for r in sorted(reasons))


def parse_reason(text: str) -> dict[str, int]:
    """The reason names and counts of a :func:`gen_reason` text.

    A text that is not of that form (a node-level reason such as
    ``NodeInsufficientDevice``) is one reason, counted once.
    """
    out: dict[str, int] = {}
    if not text:
        return out
    for part in text.split(", "):
        head, _, name = part.partition(" ")
        num, slash, _ = head.partition("/")
        if slash and name and num.isdigit():
            out[name] = out.get(name, 0) + int(num)
        else:
            return {text: 1}
    return out


def hami_parse_reason(text: str) -> dict[str, int]:
    """HAMi's ``ParseReason``: the reasons and counts of a per-node text, and nothing
    for a text that is not all ``"<n>/<cards> <reason>"`` parts (``NodeInsufficientDevice``,
    a pod-level filter's wording). What HAMi's ``FilteringFailed`` events list."""
    got = parse_reason(text)
    return {} if got == {text: 1} else got


# -------------------------------------------------------------------------- scores


def _f32(x: float) -> np.float32:
    return np.float32(x)


def request_totals(requests: Sequence[Request], totalmem: int) -> tuple[int, int, int]:
    """The (cards, cores, memory) one container's asks add to a card's score.

    HAMi adds up every ask of the container; a percentage is ``Totalmem × (pct / 100)``
    in integer arithmetic, so a percentage under 100 adds no memory to the score.
    """
    nums = cores = mem = 0
    for r in requests:
        nums += r.nums
        cores += r.coresreq
        if r.mempct not in (0, UNSET_PCT):
            mem += totalmem * (r.mempct // 100)
        else:
            mem += r.memreq
    return nums, cores, mem


def device_score(card: Card, requests: Sequence[Request]) -> float:
    """HAMi's card score for a container: ``10 × (slots + cores + memory)`` ratios after
    the ask, each in float32 as HAMi computes it (a zero total gives inf or nan)."""
    nums, cores, mem = request_totals(requests, card.totalmem)
    with np.errstate(divide="ignore", invalid="ignore"):
        used = _f32(nums + card.used) / _f32(card.count)
        core = _f32(cores + card.usedcores) / _f32(card.totalcore)
        memr = _f32(mem + card.usedmem) / _f32(card.totalmem)
        return float(WEIGHT * ((used + core) + memr))


def node_score(cards: Sequence[Card]) -> float:
    """HAMi's node score before the pod (``ComputeDefaultScore``) over all its cards."""
    used = sum(c.used for c in cards)
    ucore = sum(c.usedcores for c in cards)
    umem = sum(c.usedmem for c in cards)
    tot = sum(c.count for c in cards)
    tcore = sum(c.totalcore for c in cards)
    tmem = sum(c.totalmem for c in cards)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = _f32(used) / _f32(tot)
        c = _f32(ucore) / _f32(tcore)
        m = _f32(umem) / _f32(tmem)
        return float(WEIGHT * ((s + c) + m))


def sort_key(policy: str, numa: int, score: float, pos: int) -> tuple[float, float, int]:
    """Where a card lands in HAMi's device sort (ascending), for ``policy``.

    binpack: NUMA descending, then score ascending; anything else is spread: NUMA
    ascending, then score descending. ``pos`` (its place before the sort) keeps equal
    cards in order: for the few cards of a node (at most 12) Go's sort is an insertion
    sort, which is stable.
    """
    if policy == "binpack":
        return (-numa, score, pos)
    return (numa, -score, pos)


def sorted_order(
    policy: str, numas: Sequence[int], scores: Sequence[float], order: Sequence[int]
) -> list[int]:
    """The device list after HAMi's sort: ``order`` (card positions, the list as it was)
    re-sorted by :func:`sort_key`."""
    where = {p: i for i, p in enumerate(order)}
    return sorted(order, key=lambda p: sort_key(policy, numas[p], scores[p], where[p]))


def device_order(
    policy: str,
    cards: Sequence[Card],
    requests: Sequence[Request],
    order: Sequence[int] | None = None,
) -> list[int]:
    """The order HAMi's fit visits the cards in: scored for the container's asks,
    sorted by the policy, then walked from the end of the sorted list. So on equal
    scores the last card of the list comes first."""
    base = list(range(len(cards))) if order is None else list(order)
    scores = [device_score(c, requests) for c in cards]
    return sorted_order(policy, [c.numa for c in cards], scores, base)[::-1]


def rank_nodes(policy: str, scores: Mapping[str, float]) -> list[str]:
    """Nodes best first: binpack the highest score, spread the lowest.

    HAMi breaks equal scores by the order its goroutines finish (not reproducible);
    here the node name decides, smaller first.
    """
    sign = 1.0 if policy == "spread" else -1.0
    return sorted(scores, key=lambda n: (sign * scores[n], n))


# ------------------------------------------------------------------------- the fit


def _type_ok(f: Filters, card: Card) -> bool:
    typ = card.type.upper()
    if f.use_types is not None and not any(u.upper() in typ for u in f.use_types):
        return False
    if f.nouse_types is not None and any(u.upper() in typ for u in f.nouse_types):
        return False
    return f.vgpu_mode is None or card.mode in f.vgpu_mode


def _uuid_ok(f: Filters, card: Card) -> bool:
    if f.use_uuids is not None and card.id not in {u.strip() for u in f.use_uuids}:
        return False
    return not (f.nouse_uuids is not None and card.id in {u.strip() for u in f.nouse_uuids})


def need_mem(card: Card, req: Request) -> int:
    """The memory an ask books on ``card``: its MiB, else its percentage of the card."""
    if req.memreq > 0:
        return req.memreq
    if req.mempct != UNSET_PCT:
        return card.totalmem * req.mempct // 100
    return 0


def card_check(
    card: Card, req: Request, f: Filters, quota_ok: Callable[[Card, int, int], bool] | None = None
) -> str | None:
    """The first check ``card`` fails for ``req`` (HAMi's order), or None if it fits.

    The NUMA step sits between the type and UUID checks in HAMi's loop; it is not a
    per-card outcome and is done by :func:`fit`.
    """
    return card_check_before_numa(card, f) or card_check_after_numa(card, req, f, quota_ok)


def card_check_before_numa(card: Card, f: Filters) -> str | None:
    """Health, cordon (`hami.io/device-cordon`) and type: the checks before NUMA."""
    if not card.health:
        return CARD_NOT_HEALTH
    if card.cordoned:
        return CARD_CORDONED
    if not _type_ok(f, card):
        return CARD_TYPE_MISMATCH
    return None


def card_check_after_numa(
    card: Card,
    req: Request,
    f: Filters,
    quota_ok: Callable[[Card, int, int], bool] | None = None,
    picked_mem: int = 0,
    picked_cores: int = 0,
) -> str | None:
    """The checks from the UUID on. The quota sees this card on top of what the ask
    has picked so far (``picked_*``), as HAMi's ``fitQuota`` counts them."""
    if not _uuid_ok(f, card):
        return CARD_UUID_MISMATCH
    if card.count <= card.used:
        return CARD_TIME_SLICING
    if f.mutex and card.used > 0:
        return EXCLUSIVE_CONFLICT
    cores = min(req.coresreq, 100)
    mem = need_mem(card, req)
    if quota_ok is not None and not quota_ok(card, mem + picked_mem, cores + picked_cores):
        return QUOTA_NOT_FIT
    if card.totalmem - card.usedmem < mem:
        return CARD_MEMORY
    if card.totalcore - card.usedcores < cores:
        return CARD_CORE
    if card.totalcore == 100 and cores == 100 and card.used > 0:
        return EXCLUSIVE_CONFLICT
    if card.totalcore != 0 and card.usedcores == card.totalcore and cores == 0:
        return CARD_COMPUTE_EXHAUSTED
    return None


def fit(
    cards: Sequence[Card],
    visit: Sequence[int],
    req: Request,
    f: Filters = Filters(),
    links: Sequence[Sequence[int]] | None = None,
    quota_ok: Callable[[Card, int, int], bool] | None = None,
    custom: Callable[[int, int, Sequence[int], Sequence[int]], str | None] | None = None,
) -> FitResult:
    """HAMi's NVIDIA fit of one ask over one node's cards, visited in ``visit`` order.

    Only the ask's vendor's cards take part (the others are not passed to the fit).
    Without NUMA binding or topology the first ``nums`` fitting cards win. With NUMA
    binding the walk starts over at every change of NUMA node, and the fitting cards
    left behind count as ``NumaNotFit``. With topology every fitting card is a
    candidate: one card takes the one least linked to the other candidates, several
    the combination with the highest summed link score (the first wins on ties). On
    failure the fitting cards found are ``AllocatedCardsInsufficientRequest``.

    ``custom(position, memory, picked, their memories)`` is HAMi's ``CustomFilterRule``,
    the last check, with the cards this ask picked so far: the MIG placement fit
    (:mod:`.mig`), whose refusal is ``CardMigTopologyInfeasible``. With it, a card in MIG
    mode that fits is visited again, as HAMi does, so one ask may take several
    instances of one card.
    """
    mine = [p for p in visit if cards[p].vendor == req.vendor]
    res = FitResult(ok=False, cards=len(mine))
    reasons = res.reasons
    left = req.nums
    prevnuma: int | None = None
    got: list[int] = []
    mems: list[int] = []
    k = 0
    while k < len(mine):
        p = mine[k]
        k += 1
        card = cards[p]
        why = card_check_before_numa(card, f)
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
            continue
        if f.numa_bind and prevnuma != card.numa:
            if left != req.nums:
                reasons[NUMA_NOT_FIT] = reasons.get(NUMA_NOT_FIT, 0) + len(got)
            left, prevnuma, got, mems = req.nums, card.numa, [], []
        why = card_check_after_numa(
            card, req, f, quota_ok, sum(mems), len(got) * min(req.coresreq, 100)
        )
        if why is None and custom is not None:
            why = custom(p, need_mem(card, req), got, mems)
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
            continue
        if left > 0:
            if not f.topology:
                left -= 1
            got.append(p)
            mems.append(need_mem(card, req))
        if left == 0 and not f.topology:
            res.ok, res.picked, res.mems, res.reasons = True, got, mems, {}
            return res
        if custom is not None and card.mode == "mig" and got.count(p) < card.count - card.used:
            # HAMi's i++ on a MIG card: the same card again, until its filter refuses (the
            # slot bound only guards against a filter that never does)
            k -= 1
    if f.topology and len(got) >= req.nums:
        pick = topology_pick(got, req.nums, links)
        res.ok, res.picked, res.reasons = True, pick, {}
        res.mems = [mems[got.index(p)] for p in pick]
        return res
    if got:
        reasons[ALLOCATED_INSUFFICIENT] = len(got)
    return res


def topology_pick(
    cands: Sequence[int], nums: int, links: Sequence[Sequence[int]] | None
) -> list[int]:
    """HAMi's topology choice among the fitting cards (in visit order).

    One card: the one with the lowest summed link score to the other candidates.
    Several: the ``nums``-combination (in lexicographic order of the candidates) with
    the highest summed pair score. The first wins on ties; no link scores: all 0.
    """
    if len(cands) == nums:
        return list(cands)

    def score(a: int, b: int) -> int:
        return int(links[a][b]) if links is not None else 0

    if nums == 1:
        best, best_sc = cands[0], None
        for a in cands:
            sc = sum(score(a, b) for b in cands if b != a)
            if best_sc is None or sc < best_sc:
                best, best_sc = a, sc
        return [best]
    best_combo: tuple[int, ...] = tuple(cands[:nums])
    best_total: int | None = None
    for combo in itertools.combinations(cands, nums):
        total = sum(score(a, b) for a, b in itertools.combinations(combo, 2))
        if best_total is None or total > best_total:
            best_combo, best_total = combo, total
    return list(best_combo)


def fit_node(
    cards: Sequence[Card],
    req: Request,
    policy: str = "spread",
    f: Filters = Filters(),
    links: Sequence[Sequence[int]] | None = None,
) -> FitResult:
    """``fitInDevices`` for a one-ask container: the node-level card count (skipped for
    an NVIDIA ask on a node with a card in MIG mode, whose cards may each give several
    instances: HAMi's ``isMIGRequest``), then the fit over the cards in the policy's
    visit order."""
    mig_ok = req.vendor == "NVIDIA" and (f.vgpu_mode is None or "mig" in f.vgpu_mode)
    if req.nums > len(cards) and not (mig_ok and any(c.mode == "mig" for c in cards)):
        return FitResult(ok=False, node_reason=NODE_INSUFFICIENT_DEVICE)
    return fit(cards, device_order(policy, cards, [req]), req, f, links)
