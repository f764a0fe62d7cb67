"""The cluster as the placement engine sees it: cards and nodes in numpy arrays.

Per-card state (capacity, use, attributes) lives in flat arrays where the cards of a
node are contiguous; per-node aggregates (the sums HAMi's node score needs, CPU, memory,
pods) are kept up to date incrementally on every reservation, so a decision can judge
every card of the cluster with a few vectorised operations instead of a Python loop.
Reservations are kept per node, keyed by allocation uid, exactly as the ledger holds
them; the arrays are only a cache of their sum. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shared.schemas import (
    CardStatus,
    ClusterStatus,
    LedgerAlloc,
    NodeInventory,
    NodeLedger,
    NodeStatus,
    Quota,
    card_usage,
)

from . import mig

I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]


@dataclass(slots=True)
class _Res:
    """One reservation; what it adds is derived from the allocation when asked.

    Only the allocation is kept: the per-card usage (a dict per reservation) was most of
    a reservation's memory, about 370 of its 1,250 bytes (20,000 nodes at 60 % of GPU
    memory hold some 180,000), and it is a function of the allocation, so taking the
    reservation off with a usage computed again removes exactly what was added.
    """

    alloc: LedgerAlloc

    @property
    def usage(self) -> dict[str, tuple[int, int, int]]:
        """Per card uuid: (memory, cores, slots)."""
        return card_usage(self.alloc.containers)

    @property
    def mem(self) -> int:
        """Device memory summed over cards (namespace quota)."""
        return sum(u[0] for u in self.usage.values())

    @property
    def cores(self) -> int:
        return sum(u[1] for u in self.usage.values())


@dataclass(slots=True)
class NodeRec:
    """A node's Python-side record; ``row`` indexes the node arrays."""

    name: str
    row: int
    inv: NodeInventory
    start: int = 0  # first card position
    n: int = 0  # number of cards
    uuid_pos: dict[str, int] = field(default_factory=dict)
    links: npt.NDArray[np.int64] | None = None
    allocs: dict[str, _Res] = field(default_factory=dict)


_CARD_FIELDS = (
    "c_live", "c_node", "c_index", "c_health", "c_cordon", "c_numa", "c_mode", "c_type",
    "c_vendor", "c_tmem", "c_umem", "c_tcore", "c_ucore", "c_tslot", "c_uslot", "c_migcap",
)  # fmt: skip
_NODE_FIELDS = (
    "n_live", "n_healthy", "n_unsched", "n_tainted", "n_start", "n_ncards", "n_cpu_tot",
    "n_cpu_used", "n_mem_tot", "n_mem_used", "n_pods_max", "n_pods_used", "n_slots_tot",
    "n_slots_used", "n_cores_tot", "n_cores_used", "n_dmem_tot", "n_dmem_used", "n_rank",
    "n_ver",
)  # fmt: skip
_BOOL_FIELDS = {"c_live", "c_health", "c_cordon", "n_live", "n_healthy", "n_unsched", "n_tainted"}


class ClusterState:
    """Devices, node resources, reservations and quotas; the engine's only mutable state.

    Cards of a node occupy positions ``start .. start+n`` of the ``c_*`` arrays; node
    ``row`` indexes the ``n_*`` arrays. Arrays are sized ``self.nc`` / ``self.nn`` (used
    part); dead entries (removed nodes, replaced layouts) have ``live`` False and are
    compacted away when they pile up. ``n_ver`` changes whenever a node's use or
    attributes change, so caches (the fragmentation measure) refresh only those nodes;
    ``layout`` changes when positions move.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRec] = {}
        self.rows: list[NodeRec | None] = []
        self.nc = 0  # card positions in use (live or dead)
        self.nn = 0  # node rows in use
        self.layout = 0
        self._dead_cards = 0
        self._ccap = 0
        self._ncap = 0
        for name in _CARD_FIELDS:
            setattr(self, name, np.zeros(0, dtype=bool if name in _BOOL_FIELDS else np.int64))
        for name in _NODE_FIELDS:
            setattr(self, name, np.zeros(0, dtype=bool if name in _BOOL_FIELDS else np.int64))
        # interned strings: card model, vGPU mode, vendor
        self.types: list[str] = []
        self.modes: list[str] = []
        self.vendors: list[str] = []
        self._intern: dict[tuple[int, str], int] = {}
        self.health: dict[str, bool] = {}  # remembered even before the inventory arrives
        self.pending: dict[str, dict[str, LedgerAlloc]] = {}  # ledgers of unknown nodes
        self.quotas: dict[str, Quota] = {}
        self.ns_used: dict[str, list[int]] = {}  # namespace -> [mem, cores]
        self._ranks_dirty = False
        self.labels_version = 0
        self._ver = 0

    # type annotations of the dynamic arrays (for readers and mypy)
    c_live: BOOL
    c_node: I64
    c_index: I64
    c_health: BOOL
    c_cordon: BOOL
    c_numa: I64
    c_mode: I64
    c_type: I64
    c_vendor: I64
    c_tmem: I64
    c_umem: I64
    c_tcore: I64
    c_ucore: I64
    c_tslot: I64
    c_uslot: I64
    c_migcap: I64  # MIG mode: the largest ask one more instance takes (mig.capacity)
    n_live: BOOL
    n_healthy: BOOL
    n_unsched: BOOL
    n_tainted: BOOL
    n_start: I64
    n_ncards: I64
    n_cpu_tot: I64
    n_cpu_used: I64
    n_mem_tot: I64
    n_mem_used: I64
    n_pods_max: I64
    n_pods_used: I64
    n_slots_tot: I64
    n_slots_used: I64
    n_cores_tot: I64
    n_cores_used: I64
    n_dmem_tot: I64
    n_dmem_used: I64
    n_rank: I64
    n_ver: I64

    # ----------------------------------------------------------------------- helpers

    def intern(self, kind: int, value: str) -> int:
        key = (kind, value)
        got = self._intern.get(key)
        if got is None:
            table = (self.types, self.modes, self.vendors)[kind]
            got = len(table)
            table.append(value)
            self._intern[key] = got
        return got

    def _grow(self, cards: int, rows: int) -> None:
        if cards > self._ccap:
            cap = max(cards, 2 * self._ccap, 64)
            for name in _CARD_FIELDS:
                old = getattr(self, name)
                new = np.zeros(cap, dtype=old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)
            self._ccap = cap
        if rows > self._ncap:
            cap = max(rows, 2 * self._ncap, 16)
            for name in _NODE_FIELDS:
                old = getattr(self, name)
                new = np.zeros(cap, dtype=old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)
            self._ncap = cap

    def _bump(self, row: int) -> None:
        self._ver += 1
        self.n_ver[row] = self._ver

    def sync(self) -> None:
        """Bring derived data up to date (node-name ranks for tie-breaking)."""
        if self._ranks_dirty:
            live = [r for r in self.rows if r is not None]
            self.n_rank[: self.nn] = np.iinfo(np.int64).max
            for i, rec in enumerate(sorted(live, key=lambda r: r.name)):
                self.n_rank[rec.row] = i
            self._ranks_dirty = False

    def nodes_total(self) -> int:
        return len(self.nodes)

    def card_positions(self, rows: I64) -> tuple[I64, I64]:
        """Card positions of the given node rows (contiguous per node) and, per card,
        the index into ``rows`` of its node: how the incremental caches refresh."""
        if len(rows) <= 4:
            # the usual refresh after a decision (a node or two): lists beat the nine
            # array operations below at this size, with the same result
            sl = self.n_start[rows].tolist()
            cl = self.n_ncards[rows].tolist()
            return (
                np.array(
                    [p for s, c in zip(sl, cl, strict=True) for p in range(s, s + c)],
                    dtype=np.int64,
                ),
                np.array([i for i, c in enumerate(cl) for _ in range(c)], dtype=np.int64),
            )
        counts = self.n_ncards[rows]
        total = int(counts.sum())
        starts = self.n_start[rows]
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        pos = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(
            total, dtype=np.int64
        )
        return pos, owner

    # ------------------------------------------------------------------- inventory

    def upsert_node(self, inv: NodeInventory) -> None:
        """Add or replace a node; reservations on cards that still exist are kept."""
        rec = self.nodes.get(inv.node)
        if rec is None:
            self._grow(self.nc, self.nn + 1)
            rec = NodeRec(name=inv.node, row=self.nn, inv=inv)
            self.nn += 1
            self.rows.append(rec)
            self.nodes[inv.node] = rec
            self._ranks_dirty = True
            allocs = self.pending.pop(inv.node, {})
            self.n_live[rec.row] = True
            self.n_healthy[rec.row] = self.health.get(inv.node, True)
        else:
            allocs = {uid: r.alloc for uid, r in rec.allocs.items()}
            self._drop_usage(rec)
        rec.inv = inv
        n = len(inv.devices)
        if n != rec.n or rec.n == 0:
            if rec.n:
                self.c_live[rec.start : rec.start + rec.n] = False
                self._dead_cards += rec.n
            self._grow(self.nc + n, self.nn)
            rec.start, rec.n = self.nc, n
            self.nc += n
            self.layout += 1
        row = rec.row
        s = rec.start
        cordoned = set(inv.cordoned)
        rec.uuid_pos = {}
        for i, d in enumerate(inv.devices):
            p = s + i
            rec.uuid_pos[d.uuid] = p
            self.c_live[p] = True
            self.c_node[p] = row
            self.c_index[p] = d.index
            self.c_health[p] = d.health
            self.c_cordon[p] = d.uuid in cordoned
            self.c_numa[p] = d.numa
            self.c_mode[p] = self.intern(1, d.mode)
            self.c_type[p] = self.intern(0, d.type)
            self.c_vendor[p] = self.intern(2, d.vendor)
            self.c_tmem[p] = d.devmem
            self.c_tcore[p] = d.devcore
            self.c_tslot[p] = d.count
            self.c_umem[p] = self.c_ucore[p] = self.c_uslot[p] = 0
            self.c_migcap[p] = (
                mig.capacity(d.mig_profiles, []) if d.mode == mig.MIG_MODE else mig.NO_LIMIT
            )
        rec.links = np.asarray(inv.links, dtype=np.int64) if inv.links else None
        if rec.links is not None and rec.links.shape != (n, n):
            rec.links = None  # malformed: ignore rather than mis-score
        self.n_start[row], self.n_ncards[row] = s, n
        self.n_cpu_tot[row] = inv.cpu_milli
        self.n_mem_tot[row] = inv.memory_mib
        self.n_pods_max[row] = inv.max_pods
        self.n_unsched[row] = inv.unschedulable
        self.n_tainted[row] = any(t.effect in ("NoSchedule", "NoExecute") for t in inv.taints)
        self.n_slots_tot[row] = sum(d.count for d in inv.devices)
        self.n_cores_tot[row] = sum(d.devcore for d in inv.devices)
        self.n_dmem_tot[row] = sum(d.devmem for d in inv.devices)
        self.n_cpu_used[row] = self.n_mem_used[row] = self.n_pods_used[row] = 0
        self.n_slots_used[row] = self.n_cores_used[row] = self.n_dmem_used[row] = 0
        self.labels_version += 1
        rec.allocs = {}
        for alloc in allocs.values():
            self._apply(rec, alloc)
        self._bump(row)
        self._maybe_compact()

    def remove_node(self, node: str) -> None:
        rec = self.nodes.pop(node, None)
        if rec is None:
            self.pending.pop(node, None)
            return
        self._drop_usage(rec)
        rec.allocs = {}
        self.c_live[rec.start : rec.start + rec.n] = False
        self._dead_cards += rec.n
        self.n_live[rec.row] = False
        self.rows[rec.row] = None
        self._bump(rec.row)
        self._ranks_dirty = True
        self.labels_version += 1
        self.layout += 1
        self._maybe_compact()

    def set_health(self, node: str, healthy: bool) -> None:
        self.health[node] = healthy
        rec = self.nodes.get(node)
        if rec is not None:
            self.n_healthy[rec.row] = healthy
            self._bump(rec.row)

    def set_quota(self, namespace: str, quota: Quota | None) -> None:
        if quota is None:
            self.quotas.pop(namespace, None)
        else:
            self.quotas[namespace] = quota

    def _maybe_compact(self) -> None:
        """Rebuild the arrays without dead entries once they are half of them."""
        if self._dead_cards <= max(256, self.nc // 2) and self.nn <= 2 * len(self.nodes) + 64:
            return
        old = {name: getattr(self, name)[: self.nc].copy() for name in _CARD_FIELDS}
        oldn = {name: getattr(self, name)[: self.nn].copy() for name in _NODE_FIELDS}
        live = [r for r in self.rows if r is not None]
        order = np.concatenate(
            [np.arange(r.start, r.start + r.n, dtype=np.int64) for r in live]
            or [np.zeros(0, np.int64)]
        )
        rows_old = np.array([r.row for r in live], dtype=np.int64)
        remap = np.full(max(self.nn, 1), -1, dtype=np.int64)
        remap[rows_old] = np.arange(len(live))
        for name in _CARD_FIELDS:
            arr = getattr(self, name)
            arr[: len(order)] = old[name][order]
            arr[len(order) : self.nc] = 0
        self.c_node[: len(order)] = remap[self.c_node[: len(order)]]
        for name in _NODE_FIELDS:
            arr = getattr(self, name)
            arr[: len(live)] = oldn[name][rows_old]
            arr[len(live) : self.nn] = 0
        pos = 0
        for i, r in enumerate(live):
            shift = pos - r.start
            r.uuid_pos = {u: p + shift for u, p in r.uuid_pos.items()}
            r.start, r.row = pos, i
            self.n_start[i] = pos
            pos += r.n
        self.rows = list(live)
        self.nc, self.nn = pos, len(live)
        self._dead_cards = 0
        self.layout += 1
        self._ranks_dirty = True
        self.labels_version += 1

    # ---------------------------------------------------------------- reservations

    def _apply(self, rec: NodeRec, alloc: LedgerAlloc) -> None:
        usage = card_usage(alloc.containers)
        row = rec.row
        mem = cores = 0
        for uuid, (m, c, s) in usage.items():
            mem += m
            cores += c
            p = rec.uuid_pos.get(uuid)
            if p is None:
                continue  # card gone from the inventory: nothing to account on it
            self.c_umem[p] += m
            self.c_ucore[p] += c
            self.c_uslot[p] += s
            self.n_dmem_used[row] += m
            self.n_cores_used[row] += c
            self.n_slots_used[row] += s
        self.n_cpu_used[row] += alloc.cpu_milli
        self.n_mem_used[row] += alloc.memory_mib
        self.n_pods_used[row] += 1
        ns = self.ns_used.setdefault(alloc.namespace, [0, 0])
        ns[0] += mem
        ns[1] += cores
        rec.allocs[alloc.uid] = _Res(alloc=alloc)
        self._mig_refresh(rec, usage)

    def _remove(self, rec: NodeRec, uid: str) -> None:
        res = rec.allocs.pop(uid, None)
        if res is None:
            return
        row = rec.row
        usage = res.usage
        mem = cores = 0
        for uuid, (m, c, s) in usage.items():
            mem += m
            cores += c
            p = rec.uuid_pos.get(uuid)
            if p is None:
                continue
            self.c_umem[p] -= m
            self.c_ucore[p] -= c
            self.c_uslot[p] -= s
            self.n_dmem_used[row] -= m
            self.n_cores_used[row] -= c
            self.n_slots_used[row] -= s
        self.n_cpu_used[row] -= res.alloc.cpu_milli
        self.n_mem_used[row] -= res.alloc.memory_mib
        self.n_pods_used[row] -= 1
        ns = self.ns_used.get(res.alloc.namespace)
        if ns is not None:
            ns[0] -= mem
            ns[1] -= cores
        self._mig_refresh(rec, usage)

    def _mig_refresh(self, rec: NodeRec, cards: dict[str, tuple[int, int, int]]) -> None:
        """Recompute the MIG capacity of the node's MIG-mode cards among ``cards``."""
        for uuid in cards:
            p = rec.uuid_pos.get(uuid)
            if p is None:
                continue
            d = rec.inv.devices[p - rec.start]
            if d.mode == mig.MIG_MODE:
                taken = [x for _, x in mig.instances((r.alloc for r in rec.allocs.values()), uuid)]
                self.c_migcap[p] = mig.capacity(d.mig_profiles, taken)

    def _drop_usage(self, rec: NodeRec) -> None:
        for uid in list(rec.allocs):
            self._remove(rec, uid)

    def reserve(self, node: str, alloc: LedgerAlloc) -> None:
        """Hold ``alloc`` on ``node``; the same uid again replaces it (idempotent)."""
        rec = self.nodes.get(node)
        if rec is None:
            self.pending.setdefault(node, {})[alloc.uid] = alloc
            return
        old = rec.allocs.get(alloc.uid)
        if old is not None:
            if old.alloc == alloc:
                return
            self._remove(rec, alloc.uid)
        self._apply(rec, alloc)
        self._bump(rec.row)

    def unreserve(self, node: str, uid: str) -> None:
        rec = self.nodes.get(node)
        if rec is None:
            self.pending.get(node, {}).pop(uid, None)
            return
        if uid in rec.allocs:
            self._remove(rec, uid)
            self._bump(rec.row)

    def set_ledger(self, node: str, ledger: NodeLedger | None) -> None:
        """Make ``node``'s reservations exactly the ledger's (authoritative)."""
        allocs = dict(ledger.allocs) if ledger is not None else {}
        rec = self.nodes.get(node)
        if rec is None:
            if allocs:
                self.pending[node] = allocs
            else:
                self.pending.pop(node, None)
            return
        for uid in [u for u, r in rec.allocs.items() if allocs.get(u) != r.alloc]:
            self._remove(rec, uid)
        for uid, alloc in allocs.items():
            if uid not in rec.allocs:
                self._apply(rec, alloc)
        self._bump(rec.row)

    # ----------------------------------------------------------------------- views

    def ledger(self, node: str) -> NodeLedger:
        rec = self.nodes.get(node)
        if rec is None:
            return NodeLedger(node=node, allocs=dict(self.pending.get(node, {})))
        return NodeLedger(node=node, allocs={u: r.alloc for u, r in rec.allocs.items()})

    def status(self) -> ClusterStatus:
        out: list[NodeStatus] = []
        for name in sorted(self.nodes):
            rec = self.nodes[name]
            cards = []
            for i, d in enumerate(rec.inv.devices):
                p = rec.start + i
                cards.append(
                    CardStatus(
                        uuid=d.uuid,
                        index=d.index,
                        type=d.type,
                        health=bool(self.c_health[p]),
                        used_mem=int(self.c_umem[p]),
                        total_mem=int(self.c_tmem[p]),
                        used_cores=int(self.c_ucore[p]),
                        total_cores=int(self.c_tcore[p]),
                        used_slots=int(self.c_uslot[p]),
                        total_slots=int(self.c_tslot[p]),
                        cordoned=bool(self.c_cordon[p]),
                    )
                )
            out.append(
                NodeStatus(
                    node=name,
                    healthy=bool(self.n_healthy[rec.row]),
                    cards=cards,
                    allocations=sorted(rec.allocs),
                )
            )
        return ClusterStatus(nodes=out)
