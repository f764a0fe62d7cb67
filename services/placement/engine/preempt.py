"""Choosing whom to preempt so that a slice fits: victims on one node, slice-aware.

kube-scheduler's own preemption counts pods, not slices of cards: it may evict a pod
whose card is not the one the preemptor could use, or evict three pods where one on the
right card would do. This module answers the question the way the engine sees the
cluster: for a request that fits nowhere, which allocations of *lower* priority on *one*
node, once released, make the request fit there, judged by the engine's own fit
(``Placer.decide`` restricted to that node, so memory, cores, slots, whole-card asks,
multi-card asks, type/UUID constraints, NUMA and quotas all count exactly as they do for
placement).

Among the victim sets that work, the best is the one with the lowest highest victim
priority, then the fewest victims, then the lowest sum of priorities, then the youngest
(its oldest victim decided most recently), then the node name: a total order, so the
answer is deterministic. Allocations whose priority is at least the request's are
never victims; a node where even releasing every eligible victim does not make the
request fit is never chosen.

Cost: nodes are visited in the order of a lower bound on their best key and the search
stops when no remaining node can beat the best found; a cheap per-card capacity check
(free memory, cores and slots after the release, ignoring the finer rules) rejects most
candidate sets before the engine is asked. Per node, the exact search enumerates victim
sets by increasing size up to ``budget`` sets; past it, it falls back to releasing
victims cheapest first and then dropping those not needed (a valid, minimal but possibly
not minimum set). Simulation releases the victims in the state with
``ClusterState.unreserve`` and puts them back with ``reserve`` before returning, so the
state is unchanged afterwards. No I/O here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec

from shared.hami.resources import normalise_ask
from shared.schemas import AllocRequested, LedgerAlloc

from . import model as m
from .placer import Placer
from .state import ClusterState, NodeRec, _Res

# A victim set's ordering key: (highest priority, count, sum of priorities,
# -decided_at of its oldest victim, node name). Lower is better.
Key = tuple[int, int, int, float, str]

PriorityOf = Callable[[LedgerAlloc], int | None]


def ledger_priority(alloc: LedgerAlloc) -> int | None:
    """The priority the ledger recorded for an allocation (standalone mode)."""
    return alloc.pod_priority


@dataclass(slots=True, frozen=True)
class Victim:
    uid: str
    priority: int
    decided_at: float


@dataclass(slots=True)
class Choice:
    """Release ``victims`` on ``node`` and ``placement`` fits there."""

    node: str
    victims: list[Victim]
    placement: m.Placement
    key: Key
    searched: int = 0  # victim sets the engine was asked about (for traces)
    exact: bool = True  # False: the budget ran out and the set is minimal, not minimum

    @property
    def uids(self) -> list[str]:
        return [v.uid for v in self.victims]


@dataclass(slots=True)
class _Stats:
    decides: int = 0
    exact: bool = True


def _key(vs: Sequence[Victim], node: str) -> Key:
    return (
        max(v.priority for v in vs),
        len(vs),
        sum(v.priority for v in vs),
        -min(v.decided_at for v in vs),
        node,
    )


class _Node:
    """One node's cards as plain lists, for the cheap necessary check."""

    def __init__(self, placer: Placer, rec: NodeRec, req: AllocRequested) -> None:
        st = placer.cluster
        self.rec = rec
        s, n = rec.start, rec.n
        self.pos = {uuid: p - s for uuid, p in rec.uuid_pos.items()}
        self.free_mem = [int(st.c_tmem[s + i] - st.c_umem[s + i]) for i in range(n)]
        self.free_core = [int(st.c_tcore[s + i] - st.c_ucore[s + i]) for i in range(n)]
        self.free_slot = [int(st.c_tslot[s + i] - st.c_uslot[s + i]) for i in range(n)]
        self.tmem = [int(st.c_tmem[s + i]) for i in range(n)]
        self.usable = [
            bool(st.c_live[s + i] and st.c_health[s + i] and not st.c_cordon[s + i])
            for i in range(n)
        ]
        self.vendor = [st.vendors[int(st.c_vendor[s + i])] for i in range(n)]
        # (vendor, nums, mem or None, pct or None, cores) per distinct device ask
        asks: dict[tuple[str, int, int, int, int], None] = {}
        for c in m.ordered_containers(req):
            for a in c.devices:
                if a.nums <= 0:
                    continue
                na = normalise_ask(a, placer.settings)
                pct = -1 if na.mem else int(na.mem_percent or 100)
                asks[(na.vendor, na.nums, na.mem, pct, na.cores)] = None
        self.asks = list(asks)

    def could_fit(self, released: Iterable[str]) -> bool:
        """A necessary condition: enough cards with room once ``released`` are gone."""
        mem, core, slot = list(self.free_mem), list(self.free_core), list(self.free_slot)
        for uid in released:
            res = self.rec.allocs.get(uid)
            if res is None:
                continue
            for uuid, (dm, dc, ds) in res.usage.items():
                i = self.pos.get(uuid)
                if i is not None:
                    mem[i] += dm
                    core[i] += dc
                    slot[i] += ds
        for vendor, nums, mib, pct, cores in self.asks:
            ok = 0
            for i in range(len(mem)):
                need = mib if pct < 0 else self.tmem[i] * pct // 100
                if (
                    self.usable[i]
                    and self.vendor[i] == vendor
                    and slot[i] >= 1
                    and mem[i] >= need
                    and core[i] >= cores
                ):
                    ok += 1
            if ok < nums:
                return False
        return True


def _restricted(req: AllocRequested, node: str) -> AllocRequested | None:
    """``req`` with its candidates narrowed to ``node``; None if it excludes ``node``."""
    cons = req.constraints
    if cons.node_name is not None and cons.node_name != node:
        return None
    if cons.nodes and node not in cons.nodes:
        return None
    return msgspec.structs.replace(req, constraints=msgspec.structs.replace(cons, nodes=[node]))


def _fits(
    placer: Placer, node: str, only: AllocRequested, uids: Sequence[str]
) -> m.Placement | None:
    """Whether ``only`` fits on ``node`` once ``uids`` are released (state restored)."""
    st = placer.cluster
    rec = st.nodes[node]
    saved = [rec.allocs[u].alloc for u in uids if u in rec.allocs]
    try:
        for a in saved:
            st.unreserve(node, a.uid)
        got = placer.decide(only, explain=False)
    finally:
        for a in saved:
            st.reserve(node, a)
    return got if isinstance(got, m.Placement) and got.node == node else None


def victims_on_node(
    placer: Placer,
    req: AllocRequested,
    node: str,
    priority: int,
    *,
    priority_of: PriorityOf = ledger_priority,
    allowed: Callable[[LedgerAlloc], bool] | None = None,
    beat: Key | None = None,
    budget: int = 4096,
) -> Choice | None:
    """The best victim set on ``node`` for ``req`` (of ``priority``), or None.

    ``priority_of`` gives an allocation's priority (None: not preemptible); ``allowed``
    narrows the victims further (the Kubernetes extender: only the pods kube-scheduler
    named). ``beat``: give up on sets whose key is not below it. ``budget`` bounds the
    victim sets enumerated (see the module docstring).
    """
    st = placer.cluster
    rec = st.nodes.get(node)
    if rec is None:
        return None
    only = _restricted(req, node)
    if only is None:
        return None
    vics: list[Victim] = []
    amounts: list[_Amount] = []
    for uid, res in rec.allocs.items():
        p = priority_of(res.alloc)
        if p is None or p >= priority or (allowed is not None and not allowed(res.alloc)):
            continue
        vics.append(Victim(uid=uid, priority=p, decided_at=res.alloc.decided_at))
        amounts.append(_amount(p, res))
    if not vics:
        return None
    need = _app_need(placer, req)
    # cheapest first: lower priority, then younger, then uid (deterministic)
    vics.sort(key=lambda v: (v.priority, -v.decided_at, v.uid))
    view = _Node(placer, rec, req)
    stats = _Stats()

    def fits(vs: Sequence[Victim]) -> m.Placement | None:
        stats.decides += 1
        return _fits(placer, node, only, [v.uid for v in vs])

    if not view.could_fit(v.uid for v in vics):
        return None
    for level in sorted({v.priority for v in vics}):
        least = _count_bound(st, rec, need, [a for a in amounts if a[0] <= level])
        if least is None:
            continue  # too little room even with every victim up to this priority
        if beat is not None and (level, least) > beat[:2]:
            return None
        pool = [v for v in vics if v.priority <= level]
        if not view.could_fit(v.uid for v in pool):
            continue
        whole = fits(pool)
        if whole is None:
            continue
        # Some set of ``pool`` works, and none without a victim of ``level`` does (the
        # previous level's whole pool did not): find the best one by increasing size.
        best: Choice | None = None
        spent = 0
        for k in range(least, len(pool) + 1):
            if beat is not None and (level, k) > beat[:2]:
                break
            for combo in itertools.combinations(pool, k):
                spent += 1
                if spent > budget:
                    break
                if combo[-1].priority != level:
                    continue  # sorted by priority: the last one is the highest
                key = _key(combo, node)
                if (best is not None and key >= best.key) or (beat is not None and key >= beat):
                    continue
                if not view.could_fit(v.uid for v in combo):
                    continue
                got = fits(combo)
                if got is not None:
                    best = Choice(node=node, victims=list(combo), placement=got, key=key)
            if best is not None or spent > budget:
                break
        if best is None and spent > budget:
            stats.exact = False
            best = _minimise(pool, node, whole, fits)
            if beat is not None and best.key >= beat:
                return None
        if best is not None:
            best.searched, best.exact = stats.decides, stats.exact
            return best
        return None  # every set under ``beat`` failed: this node cannot win
    return None


def _minimise(
    pool: list[Victim],
    node: str,
    whole: m.Placement,
    fits: Callable[[Sequence[Victim]], m.Placement | None],
) -> Choice:
    """Drop victims, dearest first, while the rest still makes room (a minimal set)."""
    keep = list(pool)
    placement = whole
    for v in sorted(pool, key=lambda v: (-v.priority, v.decided_at, v.uid)):
        trial = [x for x in keep if x is not v]
        if not trial:
            continue
        got = fits(trial)
        if got is not None:
            keep, placement = trial, got
    return Choice(node=node, victims=keep, placement=placement, key=_key(keep, node), exact=False)


# A victim's priority, decided_at and what it holds on the node: MiB, cores, slots.
_Amount = tuple[int, float, int, int, int]


def _amount(priority: int, res: _Res) -> _Amount:
    return (
        priority,
        res.alloc.decided_at,
        res.mem,
        res.cores,
        sum(u[2] for u in res.usage.values()),
    )


def _app_need(placer: Placer, req: AllocRequested) -> tuple[int, int, int, list[int]]:
    """What the request adds at least, summed over the node's cards: (MiB of absolute
    asks, cores, slots, the percentages of percentage asks, once per card). App
    containers only: an init container's use overlaps theirs."""
    conts = [c for c in m.ordered_containers(req) if not c.init] or m.ordered_containers(req)[-1:]
    mib = cores = slots = 0
    pcts: list[int] = []
    for c in conts:
        for a in c.devices:
            if a.nums <= 0:
                continue
            na = normalise_ask(a, placer.settings)
            if na.mem:
                mib += na.nums * na.mem
            else:
                pcts += [int(na.mem_percent or 100)] * na.nums
            cores += na.nums * na.cores
            slots += na.nums
    return mib, cores, slots, pcts


def least_use(placer: Placer, req: AllocRequested) -> tuple[int, int]:
    """GPU memory (MiB) and cores ``req`` holds at least wherever it is placed: its app
    containers' asks, a percentage ask counted on the smallest live card."""
    mib, cores, _, pcts = _app_need(placer, req)
    st = placer.cluster
    n = st.nc
    if pcts and n:
        live = st.c_live[:n].astype(bool)
        if live.any():
            smallest = int(st.c_tmem[:n][live].min())
            mib += sum(smallest * p // 100 for p in pcts)
    return mib, cores


def _count_bound(
    st: ClusterState,
    rec: NodeRec,
    need: tuple[int, int, int, list[int]],
    vics: list[tuple[int, float, int, int, int]],
) -> int | None:
    """At least how many of ``vics`` (priority, decided_at, mem, cores, slots) must go
    for the node's totals to hold ``need``; None if all of them are not enough."""
    row = rec.row
    mib, cores, slots, pcts = need
    if pcts and rec.n:
        smallest = int(st.c_tmem[rec.start : rec.start + rec.n].min())
        mib += sum(smallest * p // 100 for p in pcts)
    k = 1
    idx: int
    for idx, want in (
        (2, mib - int(st.n_dmem_tot[row] - st.n_dmem_used[row])),
        (3, cores - int(st.n_cores_tot[row] - st.n_cores_used[row])),
        (4, slots - int(st.n_slots_tot[row] - st.n_slots_used[row])),
    ):
        if want <= 0:
            continue
        got = 0
        for i, amount in enumerate(sorted((int(v[idx]) for v in vics), reverse=True), 1):
            got += amount
            if got >= want:
                k = max(k, i)
                break
        else:
            return None
    return k


def choose(
    placer: Placer,
    req: AllocRequested,
    priority: int,
    *,
    priority_of: PriorityOf = ledger_priority,
    nodes: Iterable[str] | None = None,
    budget: int = 4096,
) -> Choice | None:
    """The best victim set over all nodes (or ``nodes``) for ``req``, or None.

    None means no set of lower-priority allocations on any one node makes ``req`` fit:
    the caller must then not preempt anyone.
    """
    st = placer.cluster
    names = list(nodes) if nodes is not None else list(st.nodes)
    need = _app_need(placer, req)
    bounds: list[tuple[Key, str]] = []
    for name in names:
        rec = st.nodes.get(name)
        if rec is None:
            continue
        vics = []
        for res in rec.allocs.values():
            p = priority_of(res.alloc)
            if p is not None and p < priority:
                vics.append(_amount(p, res))
        if not vics:
            continue
        # The lowest priority level whose victims, all released, leave room by the
        # totals: no set on this node has a key below this bound.
        lo = min(v[0] for v in vics)
        for level in sorted({v[0] for v in vics}):
            pool = [v for v in vics if v[0] <= level]
            k = _count_bound(st, rec, need, pool)
            if k is None:
                continue
            # any k of them include one decided no later than the k-th youngest
            kth = sorted((v[1] for v in pool), reverse=True)[k - 1]
            bounds.append(((level, k, (k - 1) * lo + level, -kth, name), name))
            break
    bounds.sort()
    best: Choice | None = None
    for bound, name in bounds:
        if best is not None and bound >= best.key:
            break
        got = victims_on_node(
            placer,
            req,
            name,
            priority,
            priority_of=priority_of,
            beat=best.key if best is not None else None,
            budget=budget,
        )
        if got is not None and (best is None or got.key < best.key):
            best = got
    return best
