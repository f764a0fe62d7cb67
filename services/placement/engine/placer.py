"""Deciding where a request goes: filters, reason codes and the node and card policies.

A decision runs in two stages. The vectorised stage judges every card of the cluster
for each distinct device ask with numpy (health, cordon, model, UUID, slots, mutex,
quota, memory, cores, exclusivity: REFERENCE §3), counts fitting cards per node, applies
the pod-level filters (health, schedulability, node name, labels, taints, CPU, memory,
pod count) and scores the surviving nodes by the node policy. The exact stage walks, in
Python, only the few cards of the best node: it fits init and app containers (init peak,
app sum), applies the card policy chain, NUMA binding and topology, and the cumulative
quota. Only if the exact stage fails on a node (multi-container pods, NUMA binding,
cumulative quota) does it try the next node. ``decide`` is pure: it never reserves.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    CardGrant,
    Constraints,
    ContainerAsk,
    ContainerGrant,
    DeviceAsk,
    ScoringWeights,
    Toleration,
    card_usage,
)

from . import model as m
from .frag import FRAG_POLICIES, VARIANTS, FragScorer, ShapeModel
from .state import BOOL, I64, ClusterState, NodeRec

NODE_POLICIES = ("binpack", "spread", "random", "bestfit", *FRAG_POLICIES)
_F64 = npt.NDArray[np.float64]


@dataclass(slots=True, frozen=True)
class Ask:
    """One resolved device ask: ``mem`` MiB per card, or ``pct`` % of each card."""

    vendor: str
    nums: int
    mem: int
    pct: int | None
    cores: int

    def need(self, tmem: int) -> int:
        return self.mem if self.pct is None else tmem * self.pct // 100


@dataclass(slots=True)
class Chain:
    """A parsed card-policy chain: ordered sort keys plus the two filters."""

    keys: tuple[str, ...]
    mutex: bool
    topology: bool


@functools.lru_cache(maxsize=256)
def parse_chain(text: str) -> Chain:
    """``binpack,numa`` -> sort keys; ``mutex`` / ``topology-aware`` filter; else spread."""
    keys: list[str] = []
    mutex = topology = False
    for tok in (t.strip().lower() for t in text.split(",")):
        if tok in ("binpack", "spread", "numa") and tok not in keys:
            keys.append(tok)
        elif tok == "mutex":
            mutex = True
        elif tok in ("topology-aware", "topology"):
            topology = True
    if not any(k in ("binpack", "spread") for k in keys):
        keys.append("spread")  # no usage key in the chain: HAMi falls back to spread
    return Chain(tuple(keys), mutex, topology)


def tolerates(tols: list[Toleration], key: str, value: str, effect: str) -> bool:
    for t in tols:
        if t.effect and t.effect != effect:
            continue
        if t.operator == "Exists":
            if not t.key or t.key == key:
                return True
        elif t.key == key and t.value == value:
            return True
    return False


def labels_match(labels: dict[str, str], cons: Constraints) -> bool:
    """Node selector (all pairs) and required node affinity (OR of ANDed terms)."""
    for k, v in cons.node_selector.items():
        if labels.get(k) != v:
            return False
    if not cons.affinity:
        return True
    for term in cons.affinity:
        ok = True
        for r in term:
            have = r.key in labels
            if r.operator == "In":
                ok = have and labels[r.key] in r.values
            elif r.operator == "NotIn":
                ok = not have or labels[r.key] not in r.values
            elif r.operator == "Exists":
                ok = have
            elif r.operator == "DoesNotExist":
                ok = not have
            else:
                ok = False
            if not ok:
                break
        if ok:
            return True
    return False


@dataclass(slots=True)
class _MaskEntry:
    """A cached card mask (static and dynamic checks) for one ask.

    ``ok`` and ``cnt`` (fitting cards per node) are exact for every node whose version
    equals ``ver``; a decision refreshes only the nodes that changed since, which after
    a reservation is one node. Callers must not write into ``ok``.
    """

    ok: BOOL
    cnt: I64
    ver: I64


_CACHE_MAX = 192  # cached asks (each: a bool per card and two ints per node)


class _Fail(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Placer:
    """Fits requests to a :class:`ClusterState` by policy; never mutates the state."""

    def __init__(
        self,
        cluster: ClusterState,
        scheduler: SchedulerSettings,
        node_settings: NodeSettings,
        seed: int = 0,
    ) -> None:
        self.cluster = cluster
        self.scheduler = scheduler
        self.settings = node_settings
        self.rng = np.random.default_rng(seed)
        self.shapes = ShapeModel(table_max=scheduler.shape_table_max)
        self._frag: dict[str, FragScorer] = {}
        self._label_cache: dict[tuple[int, bytes], BOOL] = {}
        self._static_cache: dict[tuple[object, ...], BOOL] = {}
        self._mask_cache: dict[tuple[object, ...], _MaskEntry] = {}
        self._score_key: tuple[int, int] = (-1, -1)
        self._score: _F64 = np.zeros(0)
        self._score_ver: I64 = np.zeros(0, dtype=np.int64)
        self.use_cache = True  # False: recompute everything (tests compare both paths)

    # ---------------------------------------------------------------- public API

    def observe(self, req: AllocRequested) -> None:
        """Learn the workload's task shapes (used by the fragmentation-aware policies)."""
        self.shapes.observe(req, self.settings)

    def decide(self, req: AllocRequested, *, explain: bool = True) -> m.Placement | m.Failure:
        """Where ``req`` fits best, or why it fits nowhere (``explain=False``: no reasons)."""
        st = self.cluster
        st.sync()
        cons = req.constraints
        conts = m.ordered_containers(req)
        asks = [
            [self._ask(a) for a in c.devices if a.nums > 0] for c in conts
        ]
        cpu, mem = m.pod_node_resources(conts)
        nn, nc = st.nn, st.nc
        node_ok = self._node_mask(cons, cpu, mem)
        flat = [a for row in asks for a in row]
        if flat:
            node_ok &= st.n_ncards[:nn] > 0
        static: dict[Ask, BOOL] = {}
        dyn: dict[Ask, BOOL] = {}
        cnode = st.c_node[:nc]
        # the namespace quota depends on use all over the cluster: no per-node cache then
        cached = self.use_cache and req.namespace not in st.quotas
        for a in dict.fromkeys(flat):
            s_ok = self._static_mask(a, cons)
            if cached:
                ent = self._cached_mask(a, cons, s_ok)
                d_ok, cnt = ent.ok, ent.cnt
            else:
                d_ok = s_ok & self._dynamic_mask(a, cons, req.namespace)
                cnt = np.bincount(cnode[d_ok], minlength=nn)
            static[a], dyn[a] = s_ok, d_ok
            node_ok &= cnt >= a.nums
        policy = (cons.node_policy or self.scheduler.node_policy).lower()
        if policy not in NODE_POLICIES and policy not in VARIANTS:
            policy = "binpack"
        chain = parse_chain(cons.gpu_policy or self.scheduler.gpu_policy)
        weights = cons.weights or ScoringWeights()
        tried: dict[int, str] = {}
        cands = np.flatnonzero(node_ok)
        if len(cands):
            if policy in VARIANTS and self._frag_eligible(asks, cons, chain, req.namespace):
                got = self._decide_frag(policy, req, conts, asks, cpu, mem, cands, dyn, flat)
                if got is not None:
                    return got
            for row in self._order(policy, cands, flat, cpu):
                rec = st.rows[row]
                assert rec is not None
                try:
                    grants = self._fit_node(rec, conts, asks, static, cons, chain, weights, req.namespace)
                except _Fail as f:
                    tried[row] = f.reason
                    continue
                return m.Placement(node=rec.name, containers=grants, cpu_milli=cpu, memory_mib=mem)
        if not explain:
            return m.Failure(nodes_total=st.nodes_total(), message="no node fits")
        reasons = self._explain(cons, cpu, mem, flat, static, req.namespace, tried)
        total = st.nodes_total()
        return m.Failure(reasons=reasons, nodes_total=total, message=m.failure_message(reasons, total),
                         tried=tried)

    # ------------------------------------------------------------- vector stage

    def _ask(self, a: DeviceAsk) -> Ask:
        n = m.normalise_ask(a, self.settings)
        return Ask(n.vendor, n.nums, n.mem, n.mem_percent if n.mem == 0 else None, n.cores)

    def _node_mask(self, cons: Constraints, cpu: int, mem: int) -> BOOL:
        """Pod-level filters over node rows (kube-scheduler's part of the job)."""
        st = self.cluster
        nn = st.nn
        ok = st.n_live[:nn] & st.n_healthy[:nn] & ~st.n_unsched[:nn]
        if cons.node_name is not None:
            pin = np.zeros(nn, dtype=bool)
            rec = st.nodes.get(cons.node_name)
            if rec is not None:
                pin[rec.row] = True
            ok &= pin
        if cons.nodes:
            ok &= self._offered(cons.nodes)
        if cons.node_selector or cons.affinity:
            ok &= self._labels(cons)
        if cons.tolerations is not None:
            for row in np.flatnonzero(st.n_tainted[:nn] & ok):
                rec = st.rows[row]
                assert rec is not None
                if not self._taints_ok(rec, cons.tolerations):
                    ok[row] = False
        tot, used = st.n_cpu_tot[:nn], st.n_cpu_used[:nn]
        if cpu:
            ok &= (tot == 0) | (used + cpu <= tot)
        if mem:
            tot, used = st.n_mem_tot[:nn], st.n_mem_used[:nn]
            ok &= (tot == 0) | (used + mem <= tot)
        mx = st.n_pods_max[:nn]
        ok &= (mx == 0) | (st.n_pods_used[:nn] < mx)
        return ok

    def _offered(self, names: list[str]) -> BOOL:
        """The rows of the candidate nodes a request names (``Constraints.nodes``)."""
        st = self.cluster
        mask = np.zeros(st.nn, dtype=bool)
        for name in names:
            rec = st.nodes.get(name)
            if rec is not None:
                mask[rec.row] = True
        return mask

    @staticmethod
    def _taints_ok(rec: NodeRec, tols: list[Toleration]) -> bool:
        for t in rec.inv.taints:
            if t.effect in ("NoSchedule", "NoExecute") and not tolerates(tols, t.key, t.value, t.effect):
                return False
        return True

    def _labels(self, cons: Constraints) -> BOOL:
        """Selector/affinity mask, cached per (label generation, constraint)."""
        st = self.cluster
        import msgspec

        key = (st.labels_version, msgspec.json.encode([cons.node_selector, cons.affinity]))
        got = self._label_cache.get(key)
        if got is None or len(got) != st.nn:
            got = np.zeros(st.nn, dtype=bool)
            for rec in st.rows:
                if rec is not None:
                    got[rec.row] = labels_match(rec.inv.labels, cons)
            if len(self._label_cache) > 256:
                self._label_cache.clear()
            self._label_cache[key] = got
        return got

    def _type_ok(self, a: Ask, cons: Constraints) -> npt.NDArray[np.bool_]:
        """Per interned model: vendor, use/nouse type (case-insensitive substring)."""
        st = self.cluster
        use = [t.lower() for t in cons.use_types if t]
        nouse = [t.lower() for t in cons.nouse_types if t]
        out = np.ones(max(len(st.types), 1), dtype=bool)
        for i, t in enumerate(st.types):
            low = t.lower()
            if use and not any(u in low for u in use):
                out[i] = False
            if any(u in low for u in nouse):
                out[i] = False
        return out

    def _static_codes(self, a: Ask, cons: Constraints) -> list[tuple[int, BOOL]]:
        """Checks that do not depend on use, in HAMi's order, as (code, ok mask)."""
        st = self.cluster
        nc = st.nc
        checks: list[tuple[int, BOOL]] = [(m.CARD_NOT_HEALTH, st.c_health[:nc])]
        checks.append((m.CARD_CORDONED, ~st.c_cordon[:nc]))
        tok = self._type_ok(a, cons)[st.c_type[:nc]]
        vid = st._intern.get((2, a.vendor), -1)
        tok = tok & (st.c_vendor[:nc] == vid)
        if cons.vgpu_mode:
            tok = tok & (st.c_mode[:nc] == st._intern.get((1, cons.vgpu_mode), -1))
        checks.append((m.CARD_TYPE_MISMATCH, tok))
        if cons.use_uuids or cons.nouse_uuids:
            uok = np.full(nc, not cons.use_uuids, dtype=bool)
            use, nouse = set(cons.use_uuids), set(cons.nouse_uuids)
            for rec in st.nodes.values():
                for u, p in rec.uuid_pos.items():
                    if (not use or u in use) and u not in nouse:
                        uok[p] = True
                    elif u in nouse:
                        uok[p] = False
            checks.append((m.CARD_UUID_MISMATCH, uok))
        return checks

    def _dynamic_codes(self, a: Ask, cons: Constraints, ns: str) -> list[tuple[int, BOOL]]:
        st = self.cluster
        nc = st.nc
        uslot, tslot = st.c_uslot[:nc], st.c_tslot[:nc]
        umem, tmem = st.c_umem[:nc], st.c_tmem[:nc]
        ucore, tcore = st.c_ucore[:nc], st.c_tcore[:nc]
        need = np.full(nc, a.mem, dtype=np.int64) if a.pct is None else tmem * a.pct // 100
        checks: list[tuple[int, BOOL]] = [(m.CARD_SLOTS, uslot < tslot)]
        if parse_chain(cons.gpu_policy or self.scheduler.gpu_policy).mutex:
            checks.append((m.CARD_MUTEX, uslot == 0))
        q = self.cluster.quotas.get(ns)
        if q is not None:
            used = st.ns_used.get(ns, [0, 0])
            qok = np.ones(nc, dtype=bool)
            if q.memory_mib is not None:
                qok &= used[0] + need <= q.memory_mib
            if q.cores is not None:
                qok &= used[1] + a.cores <= q.cores
            checks.append((m.CARD_QUOTA, qok))
        checks.append((m.CARD_MEMORY, umem + need <= tmem))
        checks.append((m.CARD_CORE, ucore + a.cores <= tcore))
        if a.cores >= 100:
            checks.append((m.CARD_EXCLUSIVE, uslot == 0))
        elif a.cores == 0:
            checks.append((m.CARD_EXCLUSIVE, ucore < tcore))
        return checks

    def _static_mask(self, a: Ask, cons: Constraints) -> BOOL:
        """Use-independent card mask, cached until the inventory changes.

        ``labels_version`` moves on every upsert/remove/compaction, which is when card
        health, cordon, model or mode can change; most requests share a few keys.
        """
        st = self.cluster
        key = self._static_key(a, cons)
        got = self._static_cache.get(key)
        if got is None:
            got = st.c_live[: st.nc].copy()
            for _, chk in self._static_codes(a, cons):
                got &= chk
            if len(self._static_cache) > 64:
                self._static_cache.clear()
            self._static_cache[key] = got
        return got

    def _static_key(self, a: Ask, cons: Constraints) -> tuple[object, ...]:
        st = self.cluster
        return (st.labels_version, st.nc, a.vendor, tuple(cons.use_types), tuple(cons.nouse_types),
                tuple(cons.use_uuids), tuple(cons.nouse_uuids), cons.vgpu_mode)  # fmt: skip

    def _use_ok(self, a: Ask, mutex: bool, pos: I64 | slice) -> BOOL:
        """The use-dependent checks but quota (``_dynamic_codes``) at ``pos``, combined."""
        st = self.cluster
        uslot, tslot = st.c_uslot[pos], st.c_tslot[pos]
        tmem, tcore, ucore = st.c_tmem[pos], st.c_tcore[pos], st.c_ucore[pos]
        need = a.mem if a.pct is None else tmem * a.pct // 100
        ok = (uslot < tslot) & (st.c_umem[pos] + need <= tmem) & (ucore + a.cores <= tcore)
        if mutex or a.cores >= 100:
            ok &= uslot == 0
        if a.cores == 0:
            ok &= ucore < tcore
        return ok

    def _cached_mask(self, a: Ask, cons: Constraints, s_ok: BOOL) -> _MaskEntry:
        """Static & dynamic card mask of ``a`` and its per-node count, refreshed only
        on the nodes whose version moved since the ask was last seen."""
        st = self.cluster
        nn = st.nn
        mutex = parse_chain(cons.gpu_policy or self.scheduler.gpu_policy).mutex
        key = (self._static_key(a, cons), st.layout, nn, a, mutex)
        ent = self._mask_cache.get(key)
        if ent is None:
            ok = s_ok & self._use_ok(a, mutex, slice(0, st.nc))
            cnt = np.bincount(st.c_node[: st.nc][ok], minlength=nn)
            ent = _MaskEntry(ok, cnt, st.n_ver[:nn].copy())
            if len(self._mask_cache) >= _CACHE_MAX:
                del self._mask_cache[next(iter(self._mask_cache))]  # oldest first
            self._mask_cache[key] = ent
            return ent
        stale = np.flatnonzero(ent.ver != st.n_ver[:nn])
        if len(stale):
            pos, owner = st.card_positions(stale)
            got = s_ok[pos] & self._use_ok(a, mutex, pos)
            ent.ok[pos] = got
            ent.cnt[stale] = np.bincount(owner, weights=got, minlength=len(stale)).astype(np.int64)
            ent.ver[stale] = st.n_ver[stale]
        return ent

    def _dynamic_mask(self, a: Ask, cons: Constraints, ns: str) -> BOOL:
        checks = self._dynamic_codes(a, cons, ns)
        ok = checks[0][1].copy()
        for _, chk in checks[1:]:
            ok &= chk
        return ok

    def _card_codes(self, a: Ask, cons: Constraints, ns: str) -> npt.NDArray[np.int64]:
        """Per card, the first failing check (0 = fits)."""
        checks = self._static_codes(a, cons) + self._dynamic_codes(a, cons, ns)
        code = np.zeros(self.cluster.nc, dtype=np.int64)
        for c, chk in reversed(checks):
            code[~chk] = c
        return code

    # ------------------------------------------------------------- node policies

    def node_scores(self, rows: npt.NDArray[np.int64]) -> _F64:
        """HAMi's node score before the pod: 10 x (slots + cores + memory used ratios).

        Kept per node and recomputed only for nodes whose version moved.
        """
        st = self.cluster
        if not self.use_cache:
            return self._node_scores(rows)
        nn = st.nn
        if self._score_key != (st.layout, nn):
            self._score_key = (st.layout, nn)
            self._score = np.zeros(nn)
            self._score_ver = np.full(nn, -1, dtype=np.int64)
        stale = np.flatnonzero(self._score_ver != st.n_ver[:nn])
        if len(stale):
            self._score[stale] = self._node_scores(stale)
            self._score_ver[stale] = st.n_ver[stale]
        return self._score[rows]

    def _node_scores(self, rows: npt.NDArray[np.int64]) -> _F64:
        st = self.cluster

        def ratio(used: npt.NDArray[np.int64], tot: npt.NDArray[np.int64]) -> _F64:
            t = tot[rows]
            return np.where(t > 0, used[rows] / np.maximum(t, 1), 0.0)

        return 10.0 * (
            ratio(st.n_slots_used, st.n_slots_tot)
            + ratio(st.n_cores_used, st.n_cores_tot)
            + ratio(st.n_dmem_used, st.n_dmem_tot)
        )

    def gpu_free(self) -> _F64:
        """Free share of each node's cards, summed (a card's share: its scarcer dimension)."""
        st = self.cluster
        nc, nn = st.nc, st.nn
        tm, tc = np.maximum(st.c_tmem[:nc], 1), np.maximum(st.c_tcore[:nc], 1)
        share = np.minimum((tm - st.c_umem[:nc]) / tm, (tc - st.c_ucore[:nc]) / tc)
        share = np.where(st.c_live[:nc] & st.c_health[:nc], share, 0.0)
        return np.bincount(st.c_node[:nc], weights=share, minlength=nn)

    def _gpu_req(self, flat: list[Ask], rows: npt.NDArray[np.int64]) -> _F64:
        st = self.cluster
        req = np.zeros(len(rows))
        avg_mem = st.n_dmem_tot[rows] / np.maximum(st.n_ncards[rows], 1)
        for a in flat:
            share = np.full(len(rows), a.cores / 100.0)
            mem = (a.pct / 100.0) if a.pct is not None else a.mem / np.maximum(avg_mem, 1)
            req += a.nums * np.maximum(share, mem)
        return req

    def _order(self, policy: str, cands: npt.NDArray[np.int64], flat: list[Ask], cpu: int) -> Iterator[int]:
        """Candidate rows, best first; ties by node name (random for random/bestfit)."""
        st = self.cluster
        tie: npt.NDArray[np.float64] | npt.NDArray[np.int64]
        if policy == "random":
            key = np.zeros(len(cands))
            tie = self.rng.random(len(cands))
        elif policy == "bestfit":
            cpu_free = (st.n_cpu_tot[cands] - st.n_cpu_used[cands]) / 1000.0
            gfree = self.gpu_free()[cands]
            left = 0.5 * (cpu_free - cpu / 1000.0) / 128.0 + 0.5 * (gfree - self._gpu_req(flat, cands)) / 8.0
            key = np.trunc(100.0 * (1.0 - left))
            tie = self.rng.random(len(cands))
        else:
            score = self.node_scores(cands)
            key = -score if policy == "spread" else score
            tie = st.n_rank[cands]
            tie = -tie  # smaller name wins: larger (negated) rank is better below
        best = int(np.flatnonzero(key == key.max())[np.argmax(tie[key == key.max()])])
        yield int(cands[best])
        if len(cands) == 1:
            return
        order = np.lexsort((-tie, -key))
        for i in order:
            if i != best:
                yield int(cands[i])

    # ------------------------------------------------------------- exact stage

    def _fit_node(
        self,
        rec: NodeRec,
        conts: list[ContainerAsk],
        asks: list[list[Ask]],
        static: dict[Ask, BOOL],
        cons: Constraints,
        chain: Chain,
        weights: ScoringWeights,
        ns: str,
    ) -> list[ContainerGrant]:
        """Fit every container on ``rec`` (init one by one, app cumulatively)."""
        st = self.cluster
        s, n = rec.start, rec.n
        base_mem = st.c_umem[s : s + n].tolist()
        base_core = st.c_ucore[s : s + n].tolist()
        base_slot = st.c_uslot[s : s + n].tolist()
        app_mem, app_core, app_slot = list(base_mem), list(base_core), list(base_slot)
        grants: list[ContainerGrant] = []
        pod_mem = pod_core = 0
        for c, row in zip(conts, asks, strict=True):
            if c.init:
                um, uc, us = list(base_mem), list(base_core), list(base_slot)
            else:
                um, uc, us = app_mem, app_core, app_slot
            devs: list[CardGrant] = []
            taken: set[int] = set()
            for a in row:
                okv = static[a][s : s + n]
                picks = self._select(rec, a, okv, um, uc, us, taken, cons, chain, weights, ns, pod_mem, pod_core)
                for i, need in picks:
                    d = rec.inv.devices[i]
                    devs.append(CardGrant(uuid=d.uuid, index=d.index, type=d.type, vendor=d.vendor, mem=need, cores=a.cores))
                    um[i] += need
                    uc[i] += a.cores
                    us[i] += 1
                    taken.add(i)
                    pod_mem += need
                    pod_core += a.cores
            grants.append(ContainerGrant(name=c.name, init=c.init, devices=devs))
        q = st.quotas.get(ns)
        if q is not None and any(g.devices for g in grants):
            usage = card_usage(grants)
            used = st.ns_used.get(ns, [0, 0])
            if q.memory_mib is not None and used[0] + sum(u[0] for u in usage.values()) > q.memory_mib:
                raise _Fail(m.CARD_REASONS[m.CARD_QUOTA])
            if q.cores is not None and used[1] + sum(u[1] for u in usage.values()) > q.cores:
                raise _Fail(m.CARD_REASONS[m.CARD_QUOTA])
        return grants

    def _select(
        self,
        rec: NodeRec,
        a: Ask,
        okv: BOOL,
        um: list[int],
        uc: list[int],
        us: list[int],
        taken: set[int],
        cons: Constraints,
        chain: Chain,
        weights: ScoringWeights,
        ns: str,
        pod_mem: int,
        pod_core: int,
    ) -> list[tuple[int, int]]:
        """Pick ``a.nums`` cards of ``rec`` for one ask; raises _Fail with the reason."""
        st = self.cluster
        s, n = rec.start, rec.n
        if n < a.nums:
            raise _Fail(m.NODE_INSUFFICIENT_DEVICE)
        tmem, tcore, tslot = st.c_tmem[s : s + n], st.c_tcore[s : s + n], st.c_tslot[s : s + n]
        q = st.quotas.get(ns)
        qused = st.ns_used.get(ns, [0, 0])
        fails: dict[int, int] = {}
        feas: list[tuple[int, int]] = []
        for i in range(n):
            if i in taken:
                continue
            code = m.OK
            tm, tc, ts = int(tmem[i]), int(tcore[i]), int(tslot[i])
            need = a.need(tm)
            if not okv[i]:
                code = m.CARD_TYPE_MISMATCH  # refined by the vector explanation
            elif us[i] >= ts:
                code = m.CARD_SLOTS
            elif chain.mutex and us[i] > 0:
                code = m.CARD_MUTEX
            elif q is not None and (
                (q.memory_mib is not None and qused[0] + pod_mem + need > q.memory_mib)
                or (q.cores is not None and qused[1] + pod_core + a.cores > q.cores)
            ):
                code = m.CARD_QUOTA
            elif um[i] + need > tm:
                code = m.CARD_MEMORY
            elif uc[i] + a.cores > tc:
                code = m.CARD_CORE
            elif (a.cores >= 100 and us[i] > 0) or (a.cores == 0 and uc[i] >= tc):
                code = m.CARD_EXCLUSIVE
            if code:
                fails[code] = fails.get(code, 0) + 1
            else:
                feas.append((i, need))
        if len(feas) < a.nums:
            if fails:
                raise _Fail(m.CARD_REASONS[max(sorted(fails), key=lambda k: fails[k])])
            raise _Fail(m.NODE_INSUFFICIENT_DEVICE)
        numa = st.c_numa[s : s + n]
        per_numa: dict[int, int] = {}
        for i, _ in feas:
            per_numa[int(numa[i])] = per_numa.get(int(numa[i]), 0) + 1

        def key(item: tuple[int, int]) -> tuple[float, ...]:
            i, need = item
            out: list[float] = []
            for k in chain.keys:
                if k == "numa":
                    out += [-per_numa[int(numa[i])], int(numa[i])]
                else:
                    sc = 10.0 * (
                        weights.slot * (us[i] + 1) / max(int(tslot[i]), 1)
                        + weights.core * (uc[i] + a.cores) / max(int(tcore[i]), 1)
                        + weights.memory * (um[i] + need) / max(int(tmem[i]), 1)
                    )
                    out.append(-sc if k == "binpack" else sc)
            out.append(int(st.c_index[s + i]))
            return tuple(out)

        feas.sort(key=key)
        groups: list[list[tuple[int, int]]]
        if cons.numa_bind and a.nums > 1:
            byn: dict[int, list[tuple[int, int]]] = {}
            for it in feas:
                byn.setdefault(int(numa[it[0]]), []).append(it)
            # groups in the order of their best card, each already sorted
            groups = [g for g in sorted(byn.values(), key=lambda g: feas.index(g[0])) if len(g) >= a.nums]
            if not groups:
                raise _Fail(m.NUMA_NOT_FIT)
        else:
            groups = [feas]
        if chain.topology and rec.links is not None:
            return self._topology_pick(rec, a.nums, groups)
        return groups[0][: a.nums]

    @staticmethod
    def _topology_pick(rec: NodeRec, nums: int, groups: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """REFERENCE §3: one card -> least-connected; n cards -> best-connected set."""
        links = rec.links
        assert links is not None
        best: list[tuple[int, int]] | None = None
        best_score = 0
        for g in groups:
            if nums == 1:
                for it in g:
                    sc = -int(links[it[0]].sum() - links[it[0], it[0]])
                    if best is None or sc > best_score:
                        best, best_score = [it], sc
                continue
            if len(g) > 16:
                cand = [g[:nums]]  # too many combinations: keep the policy's order
            else:
                cand = [list(c) for c in itertools.combinations(g, nums)]
            for combo in cand:
                sc = sum(int(links[x[0], y[0]]) for x, y in itertools.combinations(combo, 2))
                if best is None or sc > best_score:
                    best, best_score = combo, sc
        assert best is not None
        return best

    # ------------------------------------------------------------- frag policies

    def _frag_eligible(self, asks: list[list[Ask]], cons: Constraints, chain: Chain, ns: str) -> bool:
        """The fragmentation path covers one-container pods with one ask (or none).

        Other pods (several containers or asks, NUMA binding, mutex, topology, a
        cumulative quota) are placed by the binpack order and the exact stage.
        """
        with_dev = [row for row in asks if row]
        if len(with_dev) > 1 or (with_dev and len(with_dev[0]) > 1):
            return False
        if cons.numa_bind or chain.mutex or chain.topology:
            return False
        if with_dev:
            a = with_dev[0][0]
            if a.nums > 1 and ns in self.cluster.quotas:
                return False
            return a.nums == 1 or a.cores >= 100
        return True

    def _decide_frag(
        self,
        policy: str,
        req: AllocRequested,
        conts: list[ContainerAsk],
        asks: list[list[Ask]],
        cpu: int,
        mem: int,
        cands: npt.NDArray[np.int64],
        dyn: dict[Ask, BOOL],
        flat: list[Ask],
    ) -> m.Placement | None:
        scorer = self._frag.get(policy)
        if scorer is None:
            scorer = self._frag[policy] = FragScorer(policy)
        a = flat[0] if flat else None
        key: tuple[object, ...] | None = None
        if self.use_cache and req.namespace not in self.cluster.quotas:
            key = (a, cpu, self._static_key(a, req.constraints) if a else None)
        got = scorer.choose(self.cluster, self.shapes, a, cpu, mem, cands, dyn.get(a) if a else None, self.rng, key)
        if got is None:
            return None
        row, positions, score = got
        rec = self.cluster.rows[row]
        assert rec is not None
        grants: list[ContainerGrant] = []
        for c, rowasks in zip(conts, asks, strict=True):
            devs: list[CardGrant] = []
            if rowasks:
                for p in positions:
                    d = rec.inv.devices[p - rec.start]
                    devs.append(
                        CardGrant(uuid=d.uuid, index=d.index, type=d.type, vendor=d.vendor, mem=rowasks[0].need(d.devmem), cores=rowasks[0].cores)
                    )
            grants.append(ContainerGrant(name=c.name, init=c.init, devices=devs))
        return m.Placement(node=rec.name, containers=grants, cpu_milli=cpu, memory_mib=mem, score=score)

    # ----------------------------------------------------------------- reasons

    def _explain(
        self,
        cons: Constraints,
        cpu: int,
        mem: int,
        flat: list[Ask],
        static: dict[Ask, BOOL],
        ns: str,
        tried: dict[int, str],
    ) -> dict[str, int]:
        """How many live nodes failed for each reason (see :meth:`_reason_ids`)."""
        rid, names = self._reason_ids(cons, cpu, mem, flat, static, ns, tried)
        live = self.cluster.n_live[: self.cluster.nn]
        ids, first, counts = np.unique(rid[live], return_index=True, return_counts=True)
        out: dict[str, int] = {}
        for i in np.argsort(first, kind="stable"):
            why = names[int(ids[i])]
            out[why] = out.get(why, 0) + int(counts[i])
        return out

    def node_reasons(self, req: AllocRequested, failure: m.Failure) -> dict[str, str]:
        """Each offered node's reason, for a failed request that names its candidate
        nodes (``Constraints.nodes``: kube-scheduler's extender asks per node). Nodes
        placement does not know are left out; the caller says why for them."""
        cons = req.constraints
        if not cons.nodes:
            return {}
        conts = m.ordered_containers(req)
        flat = [self._ask(a) for c in conts for a in c.devices if a.nums > 0]
        cpu, mem = m.pod_node_resources(conts)
        static = {a: self._static_mask(a, cons) for a in dict.fromkeys(flat)}
        rid, names = self._reason_ids(cons, cpu, mem, flat, static, req.namespace, failure.tried)
        st = self.cluster
        out: dict[str, str] = {}
        for name in cons.nodes:
            rec = st.nodes.get(name)
            if rec is not None and st.n_live[rec.row]:
                out[name] = names[int(rid[rec.row])]
        return out

    def _reason_ids(
        self,
        cons: Constraints,
        cpu: int,
        mem: int,
        flat: list[Ask],
        static: dict[Ask, BOOL],
        ns: str,
        tried: dict[int, str],
    ) -> tuple[npt.NDArray[np.int64], list[str]]:
        """One reason per live node: the first filter it fails, else its cards' reason.

        Vectorised over node rows (a Python loop over 5,000 nodes cost tens of ms and
        was most of ``frag``'s p99). Each node gets a reason id: 1..10 are the card
        codes, above them the node-level reasons; 0 means "no reason yet", so a mask
        applied later never overrides an earlier one (the filters' order is the rule).
        :meth:`_explain` counts them to exactly what :meth:`_explain_ref` (the readable
        loop, kept for the tests) returns, dict insertion order included. Returns the
        reason id per node row and the reason names the ids index.
        """
        st = self.cluster
        nn = st.nn
        live = st.n_live[:nn]
        names: list[str] = [""] + [m.CARD_REASONS[c] for c in range(1, m.N_CARD_CODES)]
        rid = np.zeros(nn, dtype=np.int64)

        def assign(mask: BOOL, why: str) -> None:
            free = mask & (rid == 0)
            if free.any():
                names.append(why)
                rid[free] = len(names) - 1

        if cons.node_name is not None:
            other = np.ones(nn, dtype=bool)
            rec = st.nodes.get(cons.node_name)
            if rec is not None:
                other[rec.row] = False
            assign(other, m.NODE_NAME)
        if cons.nodes:
            assign(~self._offered(cons.nodes), m.NODE_NOT_OFFERED)
        unreg = ~st.n_healthy[:nn]
        if flat:
            unreg = unreg | (st.n_ncards[:nn] == 0)
        assign(unreg, m.NODE_UNREGISTERED)
        assign(st.n_unsched[:nn], m.NODE_UNSCHEDULABLE)
        if cons.node_selector or cons.affinity:
            assign(~self._labels(cons), m.NODE_SELECTOR)
        tainted = np.zeros(nn, dtype=bool)
        for r in np.flatnonzero(st.n_tainted[:nn] & live & (rid == 0)):
            rec = st.rows[r]
            assert rec is not None
            tainted[r] = not self._taints_ok(rec, cons.tolerations)
        assign(tainted, m.NODE_TAINT)
        mx = st.n_pods_max[:nn]
        assign((mx > 0) & (st.n_pods_used[:nn] >= mx), m.TOO_MANY_PODS)
        if cpu:
            tot = st.n_cpu_tot[:nn]
            assign((tot > 0) & (st.n_cpu_used[:nn] + cpu > tot), m.INSUFFICIENT_CPU)
        if mem:
            tot = st.n_mem_tot[:nn]
            assign((tot > 0) & (st.n_mem_used[:nn] + mem > tot), m.INSUFFICIENT_MEMORY)
        cnode = st.c_node[: st.nc]
        for a in dict.fromkeys(flat):
            # a node with fewer cards than asked cannot have enough fitting ones; the
            # card codes (a pass over every card) are computed only if a node is left
            assign(st.n_ncards[:nn] < a.nums, m.NODE_INSUFFICIENT_DEVICE)
            if not (live & (rid == 0)).any():
                break
            code = self._card_codes(a, cons, ns)
            code[~st.c_live[: st.nc]] = 0
            mat = np.bincount(cnode * m.N_CARD_CODES + code, minlength=nn * m.N_CARD_CODES)
            mat = mat.reshape(nn, m.N_CARD_CODES)
            short = live & (rid == 0) & (mat[:, 0] < a.nums)
            if not short.any():
                continue
            mat[:, 0] = 0
            insuff = short & ((st.n_ncards[:nn] < a.nums) | (mat.max(axis=1) == 0))
            assign(insuff, m.NODE_INSUFFICIENT_DEVICE)
            by_card = short & ~insuff
            rid[by_card] = mat.argmax(axis=1)[by_card]  # the most frequent; ties: first code
        for r, why in tried.items():
            if rid[r] == 0:
                names.append(why)
                rid[r] = len(names) - 1
        assign(live, m.NODE_UNFIT_POD)
        return rid, names

    def _explain_ref(
        self,
        cons: Constraints,
        cpu: int,
        mem: int,
        flat: list[Ask],
        static: dict[Ask, BOOL],
        ns: str,
        tried: dict[int, str],
    ) -> dict[str, int]:
        """The reference for :meth:`_explain`: the same rules as a loop over nodes.

        Slow (tens of ms at 5,000 nodes) but readable; the tests compare both.
        """
        st = self.cluster
        nn = st.nn
        reason: list[str | None] = [None] * nn
        pin = cons.node_name
        offered = set(cons.nodes) if cons.nodes else None
        labels = self._labels(cons) if (cons.node_selector or cons.affinity) else None
        for rec in st.rows:
            if rec is None:
                continue
            r, inv = rec.row, rec.inv
            if pin is not None and rec.name != pin:
                reason[r] = m.NODE_NAME
            elif offered is not None and rec.name not in offered:
                reason[r] = m.NODE_NOT_OFFERED
            elif not st.n_healthy[r] or (flat and rec.n == 0):
                reason[r] = m.NODE_UNREGISTERED
            elif inv.unschedulable:
                reason[r] = m.NODE_UNSCHEDULABLE
            elif labels is not None and not labels[r]:
                reason[r] = m.NODE_SELECTOR
            elif st.n_tainted[r] and not self._taints_ok(rec, cons.tolerations):
                reason[r] = m.NODE_TAINT
            elif inv.max_pods and st.n_pods_used[r] >= inv.max_pods:
                reason[r] = m.TOO_MANY_PODS
            elif cpu and inv.cpu_milli and st.n_cpu_used[r] + cpu > inv.cpu_milli:
                reason[r] = m.INSUFFICIENT_CPU
            elif mem and inv.memory_mib and st.n_mem_used[r] + mem > inv.memory_mib:
                reason[r] = m.INSUFFICIENT_MEMORY
        cnode = st.c_node[: st.nc]
        for a in dict.fromkeys(flat):
            code = self._card_codes(a, cons, ns)
            code[~st.c_live[: st.nc]] = 0
            mat = np.bincount(cnode * m.N_CARD_CODES + code, minlength=nn * m.N_CARD_CODES)
            mat = mat.reshape(nn, m.N_CARD_CODES)
            fits = mat[:, 0].copy()
            mat[:, 0] = 0
            worst = mat.argmax(axis=1)
            for rec in st.rows:
                if rec is None or reason[rec.row] is not None:
                    continue
                r = rec.row
                if fits[r] >= a.nums:
                    continue
                if rec.n < a.nums or mat[r].max() == 0:
                    reason[r] = m.NODE_INSUFFICIENT_DEVICE
                else:
                    reason[r] = m.CARD_REASONS[int(worst[r])]
        out: dict[str, int] = {}
        for rec in st.rows:
            if rec is None:
                continue
            why = reason[rec.row] or tried.get(rec.row) or m.NODE_UNFIT_POD
            out[why] = out.get(why, 0) + 1
        return out
