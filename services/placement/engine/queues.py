"""Queues with fair share: who is served next, what a queue may hold, whom it may reclaim.

A queue has a parent (any depth), a *guarantee* of GPU memory (MiB) and cores (percent
of a card's SMs, so a whole card is 100), an optional *limit* of the same (and per card
model), and an *over-quota weight*. A request belongs to one leaf queue (its ``queue``,
else the queue that is its namespace's default, else :data:`DEFAULT_QUEUE`); what a
queue uses is what the ledger holds for it and for every queue below it.

Ordering (:class:`Rounds`). At each level of the tree, siblings are compared by one key:

- a queue *under its guarantee* (its dominant share of the guarantee, the largest of
  used/guaranteed over memory and cores, below 1) comes before any queue at or over
  it, the lower share first;
- among queues at or over their guarantee, the lower *over-quota share* comes first:
  the largest of (used - guaranteed) / cluster total over the resources, divided by the
  queue's weight, so idle capacity is lent in proportion to the weights.

A pending request's key is its queue path's keys from the top down, then the higher
priority, then the older; keys are recomputed as each placement changes the use.

Limits (:func:`limit_problem`): a placement that would take a queue or any of its
ancestors past a limit, total or on one card model, is refused with a reason naming
the queue, the resource and the numbers.

Reclaim (:func:`reclaim_victims`): allocations are *in guarantee* or *over quota*. Per
leaf queue, its allocations sorted from the most to the least protected (higher
priority, then older) are in guarantee while their running sum stays within the
queue's guarantee (and, going up, within each ancestor's); the rest are over quota.
A request whose queue would still be within its guarantee (every ancestor too) once it
is placed may take the room of other queues' over-quota allocations; a request may
also take that of its own queue's lower-priority allocations. Nothing in guarantee of
another queue is ever a victim.

Rebalancing (``rebalance=True``, off by default: docs/queues.md): a request may also
take an allocation of another queue B that is beyond the guarantee of every queue of
B's side below the two queues' common parent, if, with the request placed and every
victim released, the request's side there (A) still has the lower over-quota share per
weight by the margin: ``over(A) * (1 + REBALANCE_MARGIN) < over(B)``, over being
:func:`over_share` (:func:`rebalances`). The victims themselves are chosen by
:mod:`.preempt` (one node, the smallest set that makes the slice fit):
:func:`choose_victims` over all nodes (standalone preemption), :func:`victims_on_node`
on one (the Kubernetes extender's ``preempt`` verb, node by node).

No I/O here; the service and ``bench/fairness.py`` drive it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.config import QueueAmount, QueueSettings
from shared.schemas import AllocRequested, ContainerGrant, LedgerAlloc

from . import preempt
from .placer import Placer
from .state import ClusterState, NodeRec

DEFAULT_QUEUE = "default"
REASON_LIMIT = "QueueLimitExceeded"  # a placement refused because of a queue limit
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")


class QueueError(ValueError):
    """A queue definition is invalid; the message names the queue and the setting."""


@dataclass(frozen=True, slots=True)
class Res:
    """GPU memory (MiB) and cores (percent of a card: 100 per whole card)."""

    mem: int = 0
    cores: int = 0

    def __add__(self, o: Res) -> Res:
        return Res(self.mem + o.mem, self.cores + o.cores)

    def __sub__(self, o: Res) -> Res:
        return Res(self.mem - o.mem, self.cores - o.cores)

    def within(self, o: Res) -> bool:
        return self.mem <= o.mem and self.cores <= o.cores


@dataclass(frozen=True, slots=True)
class Limit:
    """At most this much; None: no bound on that resource."""

    mem: int | None = None
    cores: int | None = None

    def problem(self, use: Res, what: str) -> str | None:
        if self.mem is not None and use.mem > self.mem:
            return f"{what} GPU memory {use.mem}/{self.mem} MiB"
        if self.cores is not None and use.cores > self.cores:
            return f"{what} GPU cores {use.cores}/{self.cores} %"
        return None


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    parent: str = ""
    guarantee: Res = Res()
    limit: Limit = Limit()
    # card model (a substring of the card's type, case-insensitive) -> limit on its cards
    model_limits: Mapping[str, Limit] = field(default_factory=dict)
    weight: float = 1.0
    namespaces: tuple[str, ...] = ()  # requests of these namespaces without a queue join it


class QueueTree:
    """Validated queue definitions with their parents resolved."""

    def __init__(self, specs: Iterable[QueueSpec]) -> None:
        self.specs: dict[str, QueueSpec] = {}
        for s in specs:
            if not _NAME.fullmatch(s.name):
                raise QueueError(
                    f"queue {s.name!r}: a name is 1-63 lower-case letters, digits, '-' or '.'"
                )
            if s.name in self.specs:
                raise QueueError(f"queue {s.name!r} is defined twice")
            self.specs[s.name] = s
        if DEFAULT_QUEUE not in self.specs:
            self.specs[DEFAULT_QUEUE] = QueueSpec(name=DEFAULT_QUEUE)
        self.ns_default: dict[str, str] = {}
        for s in self.specs.values():
            if s.parent and s.parent not in self.specs:
                raise QueueError(f"queue {s.name!r}: parent {s.parent!r} is not defined")
            if not (s.weight > 0 and math.isfinite(s.weight)):
                raise QueueError(f"queue {s.name!r}: overQuotaWeight must be greater than 0")
            if s.guarantee.mem < 0 or s.guarantee.cores < 0:
                raise QueueError(f"queue {s.name!r}: a guarantee is not negative")
            for lim, what in (
                (s.limit, "limit"),
                *((v, f"limit on {k}") for k, v in s.model_limits.items()),
            ):
                if (lim.mem is not None and lim.mem < 0) or (
                    lim.cores is not None and lim.cores < 0
                ):
                    raise QueueError(f"queue {s.name!r}: {what} is not negative")
            if (s.limit.mem is not None and s.limit.mem < s.guarantee.mem) or (
                s.limit.cores is not None and s.limit.cores < s.guarantee.cores
            ):
                raise QueueError(f"queue {s.name!r}: its limit is below its guarantee")
            for ns in s.namespaces:
                if ns in self.ns_default:
                    raise QueueError(
                        f"namespace {ns!r} has two default queues: {self.ns_default[ns]!r} and {s.name!r}"
                    )
                self.ns_default[ns] = s.name
        self.path: dict[str, tuple[str, ...]] = {}
        for name in self.specs:
            chain = [name]
            while self.specs[chain[-1]].parent:
                nxt = self.specs[chain[-1]].parent
                if nxt in chain:
                    raise QueueError(f"queue {name!r}: its parents form a cycle through {nxt!r}")
                chain.append(nxt)
            self.path[name] = tuple(reversed(chain))  # top first
        self.children: dict[str, list[str]] = {n: [] for n in self.specs}
        for s in self.specs.values():
            if s.parent:
                self.children[s.parent].append(s.name)
        for name, kids in self.children.items():
            if not kids:
                continue
            total = Res()
            for k in kids:
                total += self.specs[k].guarantee
            if not total.within(self.specs[name].guarantee):
                raise QueueError(
                    f"queue {name!r}: its children's guarantees ({total.mem} MiB, {total.cores} %) "
                    f"exceed its own ({self.specs[name].guarantee.mem} MiB, {self.specs[name].guarantee.cores} %)"
                )

    def __len__(self) -> int:
        return len(self.specs)

    def leaf_of(self, queue: str, namespace: str) -> str:
        """The queue a request joins; an unknown named queue raises QueueError."""
        if queue:
            if queue not in self.specs:
                raise QueueError(f"queue {queue!r} is not defined")
            if self.children[queue]:
                raise QueueError(f"queue {queue!r} has child queues: a request joins a leaf queue")
            return queue
        return self.ns_default.get(namespace, DEFAULT_QUEUE)


def spec_of(q: QueueSettings) -> QueueSpec:
    """The engine's queue from its configuration (or a Kubernetes Queue's spec)."""

    def lim(a: QueueAmount) -> Limit:
        return Limit(a.memory, a.cores)

    return QueueSpec(
        name=q.name,
        parent=q.parent,
        guarantee=Res(q.guarantee.memory or 0, q.guarantee.cores or 0),
        limit=lim(q.limit),
        model_limits={k: lim(v) for k, v in q.model_limits.items()},
        weight=q.over_quota_weight,
        namespaces=tuple(q.namespaces),
    )


def tree_of(queues: Iterable[QueueSettings]) -> QueueTree | None:
    """The queue tree of these definitions; None when there are none (arrival order)."""
    specs = [spec_of(q) for q in queues]
    return QueueTree(specs) if specs else None


# --------------------------------------------------------------------------- use


def grant_use(containers: Sequence[ContainerGrant]) -> tuple[Res, dict[str, Res]]:
    """What a grant holds: in total and per card type. Init containers run before the
    app containers, so per card the larger of the two counts (as the ledger does)."""
    per_card: dict[str, tuple[str, list[int], list[int]]] = {}
    for c in containers:
        for d in c.devices:
            typ, init, app = per_card.setdefault(d.uuid, (d.type, [0, 0], [0, 0]))
            if c.init:
                init[0], init[1] = max(init[0], d.mem), max(init[1], d.cores)
            else:
                app[0] += d.mem
                app[1] += d.cores
    total = Res()
    by_type: dict[str, Res] = {}
    for typ, init, app in per_card.values():
        r = Res(max(init[0], app[0]), max(init[1], app[1]))
        total += r
        by_type[typ] = by_type.get(typ, Res()) + r
    return total, by_type


@dataclass(slots=True)
class Usage:
    """What each queue holds (itself and the queues below it), total and per card type."""

    tree: QueueTree
    total: dict[str, Res] = field(default_factory=dict)
    by_type: dict[str, dict[str, Res]] = field(default_factory=dict)

    def add(self, leaf: str, use: Res, types: Mapping[str, Res], sign: int = 1) -> None:
        for q in self.tree.path[leaf]:
            self.total[q] = self.total.get(q, Res()) + (use if sign > 0 else Res() - use)
            bt = self.by_type.setdefault(q, {})
            for typ, r in types.items():
                bt[typ] = bt.get(typ, Res()) + (r if sign > 0 else Res() - r)

    def of(self, q: str) -> Res:
        return self.total.get(q, Res())


def alloc_leaf(tree: QueueTree, a: LedgerAlloc) -> str:
    """The leaf queue an allocation counts against (a queue since deleted: the default)."""
    q = a.queue
    if q and q in tree.specs and not tree.children[q]:
        return q
    return tree.ns_default.get(a.namespace, DEFAULT_QUEUE)


def usage(tree: QueueTree, allocs: Iterable[LedgerAlloc]) -> Usage:
    u = Usage(tree)
    for a in allocs:
        use, types = grant_use(a.containers)
        u.add(alloc_leaf(tree, a), use, types)
    return u


# ---------------------------------------------------------------------- ordering


def dominant_share(use: Res, guarantee: Res) -> float:
    """The largest used/guaranteed; inf when something is used that is not guaranteed."""
    share = 0.0
    for u, g in ((use.mem, guarantee.mem), (use.cores, guarantee.cores)):
        if g > 0:
            share = max(share, u / g)
        elif u > 0:
            return math.inf
    return share


def over_share(spec: QueueSpec, use: Res, capacity: Res) -> float:
    """The over-quota share per weight: the largest (used - guaranteed) / cluster total
    over memory and cores (0 for a resource within the guarantee), over the weight."""
    over = 0.0
    for u, g, cap in (
        (use.mem, spec.guarantee.mem, capacity.mem),
        (use.cores, spec.guarantee.cores, capacity.cores),
    ):
        if cap > 0:
            over = max(over, max(0, u - g) / cap)
    return over / spec.weight


def queue_key(spec: QueueSpec, use: Res, capacity: Res) -> tuple[int, float]:
    """(0, share) under the guarantee; (1, over-quota share / weight) at or over it."""
    share = dominant_share(use, spec.guarantee)
    if share < 1.0:
        return (0, share)
    return (1, over_share(spec, use, capacity))


class Rounds:
    """Pending requests in the order they are tried: fairest queue first, then priority,
    then age. Call :meth:`next` for the next one to try, then :meth:`placed` (with what
    it got) or nothing if it did not fit; each request is offered once."""

    def __init__(
        self,
        tree: QueueTree,
        use: Usage,
        capacity: Res,
        pending: Iterable[AllocRequested],
    ) -> None:
        self.tree, self.use, self.capacity = tree, use, capacity
        self.waiting: dict[str, list[AllocRequested]] = {}
        for r in pending:
            try:
                leaf = tree.leaf_of(r.queue, r.namespace)
            except QueueError:
                leaf = DEFAULT_QUEUE  # refused by the caller's limit check with the reason
            self.waiting.setdefault(leaf, []).append(r)
        for reqs in self.waiting.values():
            reqs.sort(key=lambda r: (-r.pod_priority, r.requested_at, r.uid), reverse=True)

    def _key(self, leaf: str) -> tuple[object, ...]:
        parts: list[object] = []
        for q in self.tree.path[leaf]:
            parts.append(queue_key(self.tree.specs[q], self.use.of(q), self.capacity))
        return tuple(parts)

    def next(self) -> AllocRequested | None:
        best: tuple[tuple[object, ...], float, float, str] | None = None
        for leaf, reqs in self.waiting.items():
            if not reqs:
                continue
            head = reqs[-1]
            k = (self._key(leaf), -head.pod_priority, head.requested_at, leaf)
            if best is None or k < best:
                best = k
        if best is None:
            return None
        return self.waiting[best[3]].pop()

    def placed(self, req: AllocRequested, containers: Sequence[ContainerGrant]) -> None:
        use, types = grant_use(containers)
        self.use.add(self.tree.leaf_of(req.queue, req.namespace), use, types)


def order(
    tree: QueueTree, use: Usage, capacity: Res, pending: Iterable[AllocRequested]
) -> list[AllocRequested]:
    """The order :class:`Rounds` offers requests in when none of them is placed."""
    r = Rounds(tree, use, capacity, pending)
    out = []
    while (nxt := r.next()) is not None:
        out.append(nxt)
    return out


# ------------------------------------------------------------------------ limits


def limit_problem(
    tree: QueueTree, use: Usage, req: AllocRequested, containers: Sequence[ContainerGrant]
) -> str | None:
    """Why placing ``containers`` for ``req`` would break a queue limit, or None."""
    try:
        leaf = tree.leaf_of(req.queue, req.namespace)
    except QueueError as exc:
        return str(exc)
    add, types = grant_use(containers)
    for q in reversed(tree.path[leaf]):  # the leaf first: the most specific reason
        spec = tree.specs[q]
        why = spec.limit.problem(use.of(q) + add, f"queue {q!r} limit:")
        if why:
            return why
        held = use.by_type.get(q, {})
        for model, lim in spec.model_limits.items():
            m = model.lower()
            now = Res()
            more = Res()
            for typ, r in held.items():
                if m in typ.lower():
                    now += r
            for typ, r in types.items():
                if m in typ.lower():
                    more += r
            if more != Res():
                why = lim.problem(now + more, f"queue {q!r} limit on {model}:")
                if why:
                    return why
    return None


# ----------------------------------------------------------------------- reclaim


def over_levels(tree: QueueTree, allocs: Iterable[LedgerAlloc]) -> dict[str, int]:
    """Per allocation beyond a guarantee: the depth (0 = top) of the deepest queue on its
    path whose guarantee it is beyond. Each queue's allocations (its own and those of
    the queues below it), the most protected first (higher priority, then older), are
    within its guarantee while their running sum is; the rest are beyond it."""
    return {uid: max(depths) for uid, depths in beyond_depths(tree, allocs).items()}


def beyond_depths(tree: QueueTree, allocs: Iterable[LedgerAlloc]) -> dict[str, set[int]]:
    """Per allocation beyond a guarantee: the depths (0 = top) of every queue on its path
    whose guarantee it is beyond (:func:`over_levels` gives the deepest)."""
    under: dict[str, list[tuple[tuple[int, float, str], LedgerAlloc, Res, int]]] = {}
    for a in allocs:
        leaf = alloc_leaf(tree, a)
        r = grant_use(a.containers)[0]
        for depth, q in enumerate(tree.path[leaf]):
            under.setdefault(q, []).append(((-a.pod_priority, a.decided_at, a.uid), a, r, depth))
    out: dict[str, set[int]] = {}
    for q, lst in under.items():
        lst.sort(key=lambda t: t[0])
        total = Res()
        g = tree.specs[q].guarantee
        for _, a, r, depth in lst:
            if (total + r).within(g):
                total += r
            else:
                out.setdefault(a.uid, set()).add(depth)
    return out


def over_quota(tree: QueueTree, allocs: Iterable[LedgerAlloc]) -> set[str]:
    """The uids of allocations beyond some queue's guarantee (module docstring)."""
    return set(over_levels(tree, allocs))


def within_guarantee(tree: QueueTree, use: Usage, leaf: str, add: Res, below: int = 0) -> bool:
    """Whether ``leaf`` and its ancestors from depth ``below`` down stay within their
    guarantees with ``add``."""
    return all((use.of(q) + add).within(tree.specs[q].guarantee) for q in tree.path[leaf][below:])


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many queues two paths share from the top (the depth below their common parent)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# Float noise must not make two equal over-quota shares look unequal.
_EPS = 1e-9
# Rebalancing's hysteresis: the taker's over-quota share per weight after the move, this
# much larger, must still be below the loser's (0.25: by more than a quarter). Strictly
# lower alone is enough to rule out ping-pong, but lets a saturated cluster preempt for
# every small drift of the shares (bench/fairness.py: about 80 preemptions more per
# 200 s of steady state); with the margin, 0 to 9 (docs/queues.md).
REBALANCE_MARGIN = 0.25


def _lower(ours: float, theirs: float) -> bool:
    """``ours`` is lower than ``theirs`` by the rebalancing margin."""
    return ours * (1.0 + REBALANCE_MARGIN) + _EPS < theirs


def _siblings(tree: QueueTree, path: tuple[str, ...], depth: int) -> list[str]:
    """The queues beside ``path[depth]`` under the same parent (top-level ones at 0)."""
    if depth == 0:
        kids = [n for n, s in tree.specs.items() if not s.parent]
    else:
        kids = tree.children[path[depth - 1]]
    return [k for k in kids if k != path[depth]]


def rebalances(
    tree: QueueTree, capacity: Res, after: Usage, mine: tuple[str, ...], theirs: tuple[str, ...]
) -> bool:
    """The over-quota rebalancing rule, on the use ``after`` the move (the request
    placed, every victim released): below the common parent of the queue paths
    ``mine`` (the request's) and ``theirs`` (a victim's), the request's side's over-quota
    share per weight (:func:`over_share`) times 1 + :data:`REBALANCE_MARGIN` is still
    below the victim's side's. So the taker ends below the loser, which ends below where
    it was: the gap between the two narrows, the largest share does not grow, and the
    same rule cannot move it back."""
    d = _common(mine, theirs)
    if d >= len(mine) or d >= len(theirs):
        return False  # the same queue: priorities only
    a, b = mine[d], theirs[d]
    return _lower(
        over_share(tree.specs[a], after.of(a), capacity),
        over_share(tree.specs[b], after.of(b), capacity),
    )


def rebalance_candidates(
    tree: QueueTree, use: Usage, capacity: Res, leaf: str, add: Res
) -> list[str]:
    """The queues a request of ``leaf`` adding at least ``add`` might take from by
    rebalancing: at some level of its path, a sibling whose over-quota share per weight
    is now above what the request's side would have with ``add``. Empty: rebalancing
    cannot apply (a cheap necessary condition; the rule is :func:`rebalances`)."""
    mine = tree.path[leaf]
    out: list[str] = []
    for d, q in enumerate(mine):
        ours = over_share(tree.specs[q], use.of(q) + add, capacity)
        for b in _siblings(tree, mine, d):
            if _lower(ours, over_share(tree.specs[b], use.of(b), capacity)):
                out.append(b)
    return out


def reclaim_victims(
    tree: QueueTree,
    allocs: Iterable[LedgerAlloc],
    req: AllocRequested,
    priority_of: Callable[[LedgerAlloc], int | None],
    *,
    use: Usage,
    add: Res | None,
    rebalance: Res | None = None,
    capacity: Res | None = None,
) -> Callable[[LedgerAlloc], int | None]:
    """A ``priority_of`` for :func:`.preempt.choose` called with a priority above every
    allocation's: an allocation's priority when it may be a victim of ``req``, else None.

    May be a victim: one of ``req``'s own queue of lower priority; one of another queue
    that is beyond a guarantee of its side below the two queues' common parent, if it
    has a lower priority or if ``req``'s side below that parent stays within its
    guarantees with ``add`` (reclaim; None: no reclaim); with ``rebalance`` (what the
    request adds at least; None: no rebalancing) and ``capacity``, also one of another
    queue beyond the guarantee of every queue of its side below the common parent,
    when :func:`rebalances` would hold were it the only victim (a necessary condition:
    more victims only lower the loser's share). ``priority_of`` says which allocations
    may be preempted at all (None: never)."""
    allocs = list(allocs)
    depths = beyond_depths(tree, allocs)
    leaf = tree.leaf_of(req.queue, req.namespace)
    mine = tree.path[leaf]
    may_reclaim = [
        add is not None and within_guarantee(tree, use, leaf, add, d) for d in range(len(mine) + 1)
    ]
    ours: list[float] = []
    if rebalance is not None and capacity is not None:
        ours = [over_share(tree.specs[q], use.of(q) + rebalance, capacity) for q in mine]

    def victim(a: LedgerAlloc) -> int | None:
        p = priority_of(a)
        if p is None:
            return None
        theirs = tree.path[alloc_leaf(tree, a)]
        if theirs == mine:
            return p if p < req.pod_priority else None
        d = _common(mine, theirs)
        beyond = depths.get(a.uid)
        if beyond is None or max(beyond) < d:
            return None
        if p < req.pod_priority or may_reclaim[d]:
            return p
        if ours and d < len(theirs) and _all_beyond(beyond, d, len(theirs)):
            assert capacity is not None
            b = theirs[d]
            lost = use.of(b) - grant_use(a.containers)[0]
            if _lower(ours[d], over_share(tree.specs[b], lost, capacity)):
                return p
        return None

    return victim


def _all_beyond(beyond: set[int], d: int, n: int) -> bool:
    """Beyond the guarantee of every queue from depth ``d`` to ``n - 1`` (its leaf)."""
    return all(k in beyond for k in range(d, n))


# Above every allocation's priority: with :func:`reclaim_victims`' ``priority_of``, who
# may be a victim is decided there, not by :func:`.preempt.choose`'s comparison.
_ABOVE_ALL = 1 << 62


def allocations(cluster: ClusterState) -> list[LedgerAlloc]:
    return [res.alloc for rec in cluster.nodes.values() for res in rec.allocs.values()]


def capacity(cluster: ClusterState) -> Res:
    """The GPU memory and cores of the live cards."""
    n = cluster.nc
    live = cluster.c_live[:n].astype(bool)
    return Res(int(cluster.c_tmem[:n][live].sum()), int(cluster.c_tcore[:n][live].sum()))


def choose_victims(
    placer: Placer,
    tree: QueueTree,
    req: AllocRequested,
    priority_of: Callable[[LedgerAlloc], int | None],
    *,
    use: Usage | None = None,
    budget: int = 4096,
    rebalance: bool = False,
) -> preempt.Choice | None:
    """The victims whose release makes ``req`` fit on one node, queue rules applied
    (module docstring), or None: then nobody is preempted. ``use``: the queues' use as
    the cluster holds it now (computed when not given). ``rebalance``: also take from
    queues over their guarantees by the over-quota rule (:func:`rebalances`)."""

    def search(victim: Callable[[LedgerAlloc], int | None]) -> preempt.Choice | None:
        return preempt.choose(placer, req, _ABOVE_ALL, priority_of=victim, budget=budget)

    return _with_rules(placer, tree, req, priority_of, use, search, rebalance)


def victims_on_node(
    placer: Placer,
    tree: QueueTree,
    req: AllocRequested,
    node: str,
    priority_of: Callable[[LedgerAlloc], int | None],
    *,
    use: Usage | None = None,
    budget: int = 4096,
    rebalance: bool = False,
) -> preempt.Choice | None:
    """:func:`choose_victims` on ``node`` only (the extender's ``preempt`` verb asks node
    by node): the same queue rules, so nothing within another queue's guarantee is a
    victim, and other queues' over-quota allocations are while ``req``'s side stays
    within its guarantees (or, with ``rebalance``, by the over-quota rule).
    ``req.pod_priority`` is the preemptor's priority."""

    def search(victim: Callable[[LedgerAlloc], int | None]) -> preempt.Choice | None:
        return preempt.victims_on_node(
            placer, req, node, _ABOVE_ALL, priority_of=victim, budget=budget
        )

    return _with_rules(placer, tree, req, priority_of, use, search, rebalance)


def _with_rules(
    placer: Placer,
    tree: QueueTree,
    req: AllocRequested,
    priority_of: Callable[[LedgerAlloc], int | None],
    use: Usage | None,
    search: Callable[[Callable[[LedgerAlloc], int | None]], preempt.Choice | None],
    rebalance: bool = False,
) -> preempt.Choice | None:
    """``search`` (given who may be a victim) with the queue rules applied around it.

    Tried from the widest rules to the narrowest, each only if the wider one's best
    set breaks a rule once the real placement is known: rebalancing and reclaim and
    priority, then reclaim and priority, then priority only. No set under a wider rule:
    none under a narrower one either."""
    allocs = allocations(placer.cluster)
    use = use if use is not None else usage(tree, allocs)
    try:
        leaf = tree.leaf_of(req.queue, req.namespace)
    except QueueError:
        return None
    by_uid = {a.uid: a for a in allocs}
    cap = capacity(placer.cluster)
    passes: list[tuple[Res | None, Res | None]] = [(Res(), None), (None, None)]
    if rebalance:
        least = Res(*preempt.least_use(placer, req))
        if rebalance_candidates(tree, use, cap, leaf, least):
            # reclaim counted with what the request adds at least: a victim that the
            # check below would refuse does not crowd out one that rebalancing allows
            passes.insert(0, (least, least))
    depths: dict[str, set[int]] | None = None
    for add, reb in passes:
        victim = reclaim_victims(
            tree, allocs, req, priority_of, use=use, add=add, rebalance=reb, capacity=cap
        )
        got = search(victim)
        if got is None:
            return None  # the wider rules allow more victims: the narrower, fewer
        after = Usage(tree, dict(use.total), {k: dict(v) for k, v in use.by_type.items()})
        for uid in got.uids:
            a = by_uid[uid]
            r, types = grant_use(a.containers)
            after.add(alloc_leaf(tree, a), r, types, sign=-1)
        if limit_problem(tree, after, req, got.placement.containers) is not None:
            return None
        placed, placed_types = grant_use(got.placement.containers)
        moved: Usage | None = None
        if reb is not None:
            moved = Usage(tree, dict(after.total), {k: dict(v) for k, v in after.by_type.items()})
            moved.add(leaf, placed, placed_types)
            if depths is None:
                depths = beyond_depths(tree, allocs)
        if all(
            _justified(tree, req, leaf, by_uid[u], priority_of, after, placed, cap, moved, depths)
            for u in got.uids
        ):
            return got
    return None


def _justified(
    tree: QueueTree,
    req: AllocRequested,
    leaf: str,
    a: LedgerAlloc,
    priority_of: Callable[[LedgerAlloc], int | None],
    after: Usage,
    placed: Res,
    cap: Res,
    moved: Usage | None,
    depths: dict[str, set[int]] | None,
) -> bool:
    """Whether victim ``a`` is allowed, the move known: of a lower priority; or reclaim
    (the request's side below the common parent stays within its guarantees once
    placed: ``after`` is the use without the victims); or, with ``moved`` (``after``
    with the request placed), rebalancing (:func:`rebalances`, and ``a`` beyond every
    guarantee of its side below the common parent)."""
    p = priority_of(a)
    if p is not None and p < req.pod_priority:
        return True
    mine, theirs = tree.path[leaf], tree.path[alloc_leaf(tree, a)]
    d = _common(mine, theirs)
    if within_guarantee(tree, after, leaf, placed, d):
        return True
    return (
        moved is not None
        and depths is not None
        and _all_beyond(depths.get(a.uid, set()), d, len(theirs))
        and rebalances(tree, cap, moved, mine, theirs)
    )


class UseCache:
    """The queues' use as the cluster holds it, kept up to date node by node: only the
    nodes whose reservations changed since the last call are counted again (all of
    them when nodes were removed or the arrays compacted)."""

    def __init__(self, tree: QueueTree) -> None:
        self.tree = tree
        self._at = -1
        self._layout = -1
        self._use = Usage(tree)
        # node -> its allocations' (leaf, use, use by card type), as last counted
        self._per: dict[str, list[tuple[str, Res, dict[str, Res]]]] = {}

    def _count(self, rec: NodeRec) -> list[tuple[str, Res, dict[str, Res]]]:
        out = []
        for res in rec.allocs.values():
            use, types = grant_use(res.alloc.containers)
            out.append((alloc_leaf(self.tree, res.alloc), use, types))
        return out

    def get(self, cluster: ClusterState) -> Usage:
        if cluster._ver == self._at:  # bumped by every reserve, release and ledger
            return self._use
        if cluster.layout != self._layout:
            self._use = Usage(self.tree)
            self._per = {}
            changed = [r for r in cluster.rows if r is not None]
        else:
            rows = np.flatnonzero(cluster.n_ver[: cluster.nn] > self._at)
            changed = [r for i in rows.tolist() if (r := cluster.rows[i]) is not None]
        for rec in changed:
            for leaf, use, types in self._per.get(rec.name, ()):
                self._use.add(leaf, use, types, sign=-1)
            now = self._count(rec)
            for leaf, use, types in now:
                self._use.add(leaf, use, types)
            self._per[rec.name] = now
        self._at, self._layout = cluster._ver, cluster.layout
        return self._use


# ------------------------------------------------------------------------ status


@dataclass(frozen=True, slots=True)
class QueueReport:
    name: str
    parent: str
    guarantee: Res
    limit: Limit
    weight: float
    used: Res
    borrowed: Res  # use beyond the guarantee, lent by queues that do not use theirs
    pending: int
    share: float  # dominant share of the guarantee (inf: uses what is not guaranteed)


def report(tree: QueueTree, use: Usage, pending: Iterable[AllocRequested]) -> list[QueueReport]:
    """Each queue's guarantee, use, borrowed and pending, the tree's order (parents first)."""
    waiting: dict[str, int] = {}
    for r in pending:
        try:
            leaf = tree.leaf_of(r.queue, r.namespace)
        except QueueError:
            continue
        for q in tree.path[leaf]:
            waiting[q] = waiting.get(q, 0) + 1
    out = []
    for name in sorted(tree.specs, key=lambda n: tree.path[n]):
        s = tree.specs[name]
        u = use.of(name)
        out.append(
            QueueReport(
                name=name,
                parent=s.parent,
                guarantee=s.guarantee,
                limit=s.limit,
                weight=s.weight,
                used=u,
                borrowed=Res(max(0, u.mem - s.guarantee.mem), max(0, u.cores - s.guarantee.cores)),
                pending=waiting.get(name, 0),
                share=dominant_share(u, s.guarantee),
            )
        )
    return out
