"""Consolidation: which movable allocations to re-place where, so that whole cards free
up or a given slice fits. Pure planning on a card-level view of the cluster; no I/O.

Slices scattered over many cards leave no card whole for a job that needs one, and a
slice of 60 % may find no card with 60 % free although the cluster has plenty. Moving a
few allocations (only those marked movable: ``hami submit --movable``, the pod annotation
``hami.io/movable: "true"``) repairs that. A plan is a sequence of moves; each move takes
one allocation off its cards and places it, whole, on cards of one node of the same
model (its request may have named the model; another model is never chosen), each card
taking one of its grants. Moves are carried out in order, so each is checked against
the cluster as the moves before it left it: a plan never over-fills a card at any step
(memory, cores, slots; a grant of all a card's cores holds the card alone, as HAMi's
exclusive asks do). Cards that are unhealthy, cordoned or in MIG mode are never targets
and allocations holding MIG instances never move.

Two goals, each within a budget of moves:

- free the most whole cards (then the fewest moves);
- make a slice of MEM MiB and CORES % fit on some card, in the fewest moves.

The search is a depth-first walk over move sequences (each allocation moved at most
once) with a bound: the cards that could still be emptied with the moves left. Targets
of a move are the cards with room, fullest first (best fit), where empty cards of one
node, model and size count as one. On a small cluster (movable allocations x cards up to ``SMALL``) every movable
allocation is tried at each step; on a larger one only the holders of the cheapest
cards to empty (or of the cards nearest to fitting the slice). The walk starts from a
greedy plan (empty the cheapest cards one by one) and is exact, within those rules,
while it has visited fewer than ``budget`` states (by default about ``WORK`` units of
work); past that it returns the best plan found and says it is not proven best
(``exact`` False).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shared.schemas import ClusterStatus


@dataclass(frozen=True, slots=True)
class Card:
    node: str
    uuid: str
    type: str = ""
    mem: int = 0  # capacity: MiB, % cores, slots
    cores: int = 100
    slots: int = 10
    usable: bool = True  # a target for moves (healthy, not cordoned, not MIG)


@dataclass(frozen=True, slots=True)
class Grant:
    uuid: str
    mem: int
    cores: int


@dataclass(frozen=True, slots=True)
class Holding:
    """One allocation as the planner sees it: its grants, one per card it uses."""

    uid: str
    node: str
    grants: tuple[Grant, ...]
    movable: bool = False
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class Move:
    uid: str
    name: str
    namespace: str
    from_node: str
    to_node: str
    from_cards: tuple[str, ...]
    to_cards: tuple[str, ...]  # aligned with the allocation's grants


@dataclass(slots=True)
class Plan:
    moves: list[Move] = field(default_factory=list)
    free_before: int = 0  # whole cards free (nothing on them) before and after the moves
    free_after: int = 0
    freed: list[str] = field(default_factory=list)  # cards emptied by the plan
    fits: bool | None = None  # with a slice asked for: whether it fits after the moves
    exact: bool = True  # False: the search budget ran out; a good plan, not proven best


# Up to this many (movable allocations x cards) every allocation is tried at each step.
SMALL = 4096
# The search's default budget: about this much work (states x (cards + allocations)),
# and at least this many states.
WORK = 2_000_000
STATES_MIN = 200


class PlanError(ValueError):
    """The input cannot be planned on (a grant on an unknown card, a bad budget)."""


# ------------------------------------------------------------------------ the state


class _State:
    """Usage per card, and where each allocation is, under a sequence of moves."""

    def __init__(self, cards: Sequence[Card], holdings: Sequence[Holding]) -> None:
        self.cards = {c.uuid: c for c in cards}
        self.mem = dict.fromkeys(self.cards, 0)
        self.cores = dict.fromkeys(self.cards, 0)
        self.slots = dict.fromkeys(self.cards, 0)
        self.excl = dict.fromkeys(self.cards, 0)  # grants holding a card alone
        self.where: dict[str, tuple[str, ...]] = {}
        self.on: dict[str, set[str]] = {u: set() for u in self.cards}  # card -> holders
        self.hold = {h.uid: h for h in holdings}
        for h in holdings:
            for g in h.grants:
                if g.uuid not in self.cards:
                    raise PlanError(f"{h.uid}: grant on unknown card {g.uuid}")
            self._add(h, tuple(g.uuid for g in h.grants))

    def _add(self, h: Holding, to: tuple[str, ...]) -> None:
        for g, u in zip(h.grants, to, strict=True):
            self.mem[u] += g.mem
            self.cores[u] += g.cores
            self.slots[u] += 1
            self.excl[u] += g.cores >= self.cards[u].cores
            self.on[u].add(h.uid)
        self.where[h.uid] = to

    def _remove(self, h: Holding) -> tuple[str, ...]:
        was = self.where.pop(h.uid)
        for g, u in zip(h.grants, was, strict=True):
            self.mem[u] -= g.mem
            self.cores[u] -= g.cores
            self.slots[u] -= 1
            self.excl[u] -= g.cores >= self.cards[u].cores
            self.on[u].discard(h.uid)
        return was

    def room(self, u: str, mem: int, cores: int) -> bool:
        c = self.cards[u]
        if self.excl[u] or (cores >= c.cores and self.slots[u]):
            return False
        return (self.mem[u] + mem <= c.mem and self.cores[u] + cores <= c.cores
                and self.slots[u] + 1 <= c.slots)

    def empty(self, u: str) -> bool:
        return self.slots[u] == 0

    def free_cards(self) -> int:
        return sum(1 for u in self.cards if self.slots[u] == 0)

    def over(self) -> list[str]:
        return [u for u, c in self.cards.items()
                if self.mem[u] > c.mem or self.cores[u] > c.cores or self.slots[u] > c.slots
                or (self.excl[u] and self.slots[u] > 1)]


# ------------------------------------------------------------------------- moves


def _targets(st: _State, h: Holding, limit: int) -> list[tuple[str, tuple[str, ...]]]:
    """Where ``h`` could go now: per node, each grant on a distinct card of its own card's
    model with room, fullest first; empty cards of one node, model and size as one."""
    out: list[tuple[float, str, tuple[str, ...]]] = []
    now = st.where[h.uid]
    types = [st.cards[u].type for u in now]
    by_node: dict[str, list[Card]] = {}
    for c in st.cards.values():
        if c.usable:
            by_node.setdefault(c.node, []).append(c)
    for node, cards in sorted(by_node.items()):
        options: list[tuple[str, ...]] = []
        if len(h.grants) == 1:
            g, t = h.grants[0], types[0]
            seen_empty: set[tuple[str, int, int, int]] = set()
            for c in cards:
                if c.type != t or (node == h.node and c.uuid == now[0]) or not st.room(c.uuid, g.mem, g.cores):
                    continue
                if st.empty(c.uuid):
                    k = (c.type, c.mem, c.cores, c.slots)
                    if k in seen_empty:
                        continue
                    seen_empty.add(k)
                options.append((c.uuid,))
        else:
            # several cards: fill each grant on the fullest card left (one option per node)
            chosen: list[str] = []
            for g, t in zip(h.grants, types, strict=True):
                fit = [c for c in cards if c.type == t and c.uuid not in chosen
                       and st.room(c.uuid, g.mem, g.cores)]
                if not fit:
                    break
                chosen.append(min(fit, key=lambda c: (c.mem - st.mem[c.uuid], c.uuid)).uuid)
            if len(chosen) == len(h.grants) and tuple(chosen) != now:
                options.append(tuple(chosen))
        for opt in options:
            left = sum(st.cards[u].mem - st.mem[u] for u in opt)
            out.append((left, node, opt))
    out.sort(key=lambda x: (st.empty(x[2][0]), x[0], x[1], x[2]))  # onto used cards first
    return [(n, o) for _, n, o in out[:limit]]


def _fits(st: _State, mem: int, cores: int) -> bool:
    return any(c.usable and st.room(u, mem, cores) for u, c in st.cards.items())


def _greedy(st: _State, max_moves: int, branch: int) -> list[Move]:
    """A quick plan to start the search from: empty the cheapest cards one at a time (all
    holders movable, fewest holders first), each holder onto the fullest card with room
    that is neither free nor being emptied; a card that cannot be emptied whole is left
    as it was. ``st`` is left as it was found."""
    seq: list[Move] = []
    emptied: set[str] = set()
    moved: set[str] = set()
    progress = True
    while progress and len(seq) < max_moves:
        progress = False
        for _, u in _candidates(st, moved):
            if u in emptied:
                continue
            on = sorted(st.on[u])
            if len(seq) + len(on) > max_moves:
                continue
            done: list[tuple[Holding, tuple[str, ...]]] = []
            for uid in on:
                h = st.hold[uid]
                to = next((o for _, o in _targets(st, h, branch)
                           if not set(o) & emptied and u not in o and not any(st.empty(x) for x in o)), None)
                if to is None:
                    break
                done.append((h, st._remove(h)))
                st._add(h, to)
            if len(done) < len(on):
                for h, was in reversed(done):
                    st._remove(h)
                    st._add(h, was)
                continue
            for h, was in done:
                seq.append(Move(uid=h.uid, name=h.name, namespace=h.namespace, from_node=h.node,
                                to_node=st.cards[st.where[h.uid][0]].node, from_cards=was,
                                to_cards=st.where[h.uid]))
                moved.add(h.uid)
            emptied.add(u)
            progress = True
            break
    for mv in reversed(seq):  # put the state back
        h = st.hold[mv.uid]
        st._remove(h)
        st._add(h, mv.from_cards)
    return seq


def _candidates(st: _State, moved: set[str]) -> list[tuple[float, str]]:
    """Used cards that moves could empty (every holder movable, none moved yet), cheapest
    first: a holder on k cards costs 1/k on each."""
    out: list[tuple[float, str]] = []
    for u in st.cards:
        on = st.on[u]
        if on and all(st.hold[x].movable and x not in moved for x in on):
            out.append((sum(1.0 / len(st.where[x]) for x in on), u))
    out.sort()
    return out


def _focus(st: _State, moved: set[str], need: tuple[int, int] | None, branch: int) -> list[str]:
    """The holders worth moving next on a large cluster: those of the ``branch`` cheapest
    cards to empty, or with a slice to fit, of the cards with the most room for it."""
    if need is None:
        cards = [u for _, u in _candidates(st, moved)[:branch]]
    else:
        ok = [u for u, c in st.cards.items() if c.usable and st.on[u]]
        ok.sort(key=lambda u: (max(0, need[0] - (st.cards[u].mem - st.mem[u]))
                               + max(0, need[1] - (st.cards[u].cores - st.cores[u])) * 1000, u))
        cards = ok[:branch]
    out: list[str] = []
    for u in cards:
        out.extend(x for x in sorted(st.on[u]) if st.hold[x].movable and x not in moved and x not in out)
    return out


def plan(
    cards: Sequence[Card],
    holdings: Sequence[Holding],
    *,
    max_moves: int,
    need: tuple[int, int] | None = None,
    budget: int | None = None,
    branch: int = 8,
) -> Plan:
    """The best plan of at most ``max_moves`` moves: the most whole cards freed, or with
    ``need`` (MiB, % cores) the fewest moves after which such a slice fits on one card."""
    if max_moves < 0:
        raise PlanError(f"max_moves must be at least 0, not {max_moves}")
    if need is not None and (need[0] < 0 or need[1] < 0 or need[1] > 100):
        raise PlanError(f"a slice of {need[0]} MiB and {need[1]} % cores cannot be asked for")
    if budget is None:  # states to visit: each costs about (cards + allocations)
        budget = max(STATES_MIN, WORK // max(1, len(cards) + len(holdings)))
    st = _State(cards, holdings)
    if st.over():
        raise PlanError(f"cards already over capacity: {', '.join(sorted(st.over()))}")
    start = st.free_cards()
    movable = sorted(u for u, h in st.hold.items() if h.movable)
    best: list[Move] = []
    best_free = start
    if need is None and max_moves:
        seed = _greedy(st, max_moves, branch)
        after_seed = _State(cards, holdings)
        apply_moves(after_seed, seed)
        if after_seed.free_cards() > start:
            best, best_free = seed, after_seed.free_cards()
    # Small clusters: every movable allocation is tried at each step (exact). Large ones:
    # only the holders of the cheapest cards to empty (and, for a slice, of the cards
    # nearest to fitting it), or the walk would not get past the first few levels.
    small = len(movable) * len(st.cards) <= SMALL
    best_fits = need is not None and _fits(st, *need)
    visited = 0
    exhausted = False
    seq: list[Move] = []
    moved: set[str] = set()

    def potential() -> int:
        """Cards that could be free with the moves left: the free ones, and the cheapest
        used ones whose every holder is movable and not yet moved (a holder on k cards
        costs 1/k on each, so the bound never undercounts what a set of cards frees)."""
        left: float = max_moves - len(seq)
        n = 0
        for c, _ in _candidates(st, moved):
            if c > left + 1e-9:
                break
            left -= c
            n += 1
        return st.free_cards() + n

    def walk() -> None:
        nonlocal best, best_free, best_fits, visited, exhausted
        visited += 1
        if visited > budget:
            exhausted = True
            return
        if need is not None:
            if _fits(st, *need):
                if not best_fits or len(seq) < len(best):
                    best, best_fits = list(seq), True
                return  # a longer plan cannot be better
            if best_fits and len(seq) + 1 >= len(best):
                return
        else:
            free = st.free_cards()
            if free > best_free or (free == best_free and len(seq) < len(best)):
                best, best_free = list(seq), free
            bound = potential()
            if bound < best_free or (bound == best_free and len(seq) + 1 >= len(best)):
                return
        if len(seq) >= max_moves:
            return
        for uid in movable if small else _focus(st, moved, need, branch):
            if uid in moved:
                continue
            h = st.hold[uid]
            for node, to in _targets(st, h, branch):
                was = st._remove(h)
                st._add(h, to)
                seq.append(Move(uid=uid, name=h.name, namespace=h.namespace, from_node=h.node,
                                to_node=node, from_cards=was, to_cards=to))
                moved.add(uid)
                walk()
                moved.discard(uid)
                seq.pop()
                st._remove(h)
                st._add(h, was)
                if exhausted:
                    return

    walk()
    after = _State(cards, holdings)
    apply_moves(after, best)
    return Plan(
        moves=best,
        free_before=start,
        free_after=after.free_cards(),
        freed=sorted(u for u in after.cards if after.empty(u) and not st.empty(u)),
        fits=None if need is None else _fits(after, *need),
        exact=not exhausted,
    )


def apply_moves(st: _State, moves: Iterable[Move]) -> None:
    """Carry ``moves`` out on ``st`` in order; PlanError at the first that does not fit."""
    for i, mv in enumerate(moves):
        h = st.hold.get(mv.uid)
        if h is None:
            raise PlanError(f"move {i + 1}: {mv.uid} is not an allocation")
        if not h.movable:
            raise PlanError(f"move {i + 1}: {mv.uid} is not movable")
        st._remove(h)
        for g, u in zip(h.grants, mv.to_cards, strict=True):
            c = st.cards.get(u)
            if c is None or not c.usable or c.node != mv.to_node or not st.room(u, g.mem, g.cores):
                raise PlanError(f"move {i + 1}: {mv.uid} does not fit on {u}")
        if len(set(mv.to_cards)) != len(mv.to_cards):
            raise PlanError(f"move {i + 1}: {mv.uid} puts two grants on one card")
        st._add(h, mv.to_cards)
        st.hold[mv.uid] = Holding(uid=h.uid, node=mv.to_node, grants=h.grants, movable=h.movable,
                                  name=h.name, namespace=h.namespace)


def check(cards: Sequence[Card], holdings: Sequence[Holding], moves: Sequence[Move]) -> int:
    """Whole cards free after ``moves``, each checked against the cluster as the moves
    before it left it (PlanError on one that does not fit)."""
    st = _State(cards, holdings)
    apply_moves(st, moves)
    return st.free_cards()


def from_status(status: ClusterStatus) -> tuple[list[Card], list[Holding]]:
    """The planner's view of ``hami.api.status`` with detail (cards and what each
    allocation holds)."""
    cards: list[Card] = []
    holdings: list[Holding] = []
    for n in status.nodes:
        mig = {g.uuid for a in n.held for ct in a.containers for g in ct.devices if g.mig is not None}
        for c in n.cards:
            cards.append(Card(node=n.node, uuid=c.uuid, type=c.type, mem=c.total_mem,
                              cores=c.total_cores, slots=c.total_slots,
                              usable=n.healthy and c.health and not c.cordoned and c.uuid not in mig))
        for a in n.held:
            per: dict[str, list[int]] = {}
            has_mig = False
            for ct in a.containers:
                for g in ct.devices:
                    has_mig = has_mig or g.mig is not None
                    got = per.setdefault(g.uuid, [0, 0])
                    got[0] += g.mem
                    got[1] += g.cores
            grants = tuple(Grant(uuid=u, mem=m, cores=k) for u, (m, k) in per.items())
            if grants:
                holdings.append(Holding(uid=a.uid, node=n.node, grants=grants,
                                        movable=a.movable and not has_mig,
                                        name=a.name, namespace=a.namespace))
    return cards, holdings
