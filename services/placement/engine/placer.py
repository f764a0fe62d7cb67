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

import dataclasses
import functools
import operator
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    FIT_NODES_MAX,
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

from . import families, hami, mig
from . import model as m
from .frag import FRAG_POLICIES, VARIANTS, FragScorer, ShapeModel
from .state import BOOL, I64, ClusterState, NodeRec

NODE_POLICIES = ("binpack", "spread", "random", "bestfit", *FRAG_POLICIES)
_F64 = npt.NDArray[np.float64]
_NAME = operator.attrgetter("name")


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


def _request(a: Ask) -> hami.Request:
    """An engine ask as HAMi's request (a percentage, or MiB with the percentage unset)."""
    if a.pct is None:
        return hami.Request(nums=a.nums, memreq=a.mem, coresreq=a.cores, vendor=a.vendor)
    return hami.Request(nums=a.nums, mempct=a.pct, coresreq=a.cores, vendor=a.vendor)


def _hami_scores(
    row: list[Ask],
    um: list[int],
    uc: list[int],
    us: list[int],
    tm: list[int],
    tc: list[int],
    ts: list[int],
) -> list[float]:
    """Card scores that order (and tie) a node's cards exactly as HAMi's float32
    :func:`.hami.device_score` values do, for one container; cheap in the usual case.

    The scores are computed in float64 first. Cards with the same inputs tie in both;
    two values further apart than float32's rounding could move them (a relative
    1e-5) order the same in both. Only when two different cards come closer than that
    are HAMi's float32 values computed (:func:`_hami_scores_f32`). A zero total (HAMi
    divides by it: inf or nan) takes the exact way too.
    """
    if 0 in ts or 0 in tc or 0 in tm:
        return [
            hami.device_score(hami.Card("", count=ts[i], used=us[i], totalmem=tm[i], usedmem=um[i],
                                        totalcore=tc[i], usedcores=uc[i]), [_request(a) for a in row])
            for i in range(len(tm))
        ]  # fmt: skip
    nums = sum(a.nums for a in row)
    cores = sum(a.cores for a in row)
    mem = [0] * len(tm)
    for a in row:
        r = _request(a)
        if r.mempct not in (0, hami.UNSET_PCT):
            mem = [m + t * (r.mempct // 100) for m, t in zip(mem, tm, strict=True)]
        else:
            mem = [m + r.memreq for m in mem]
    s64 = [
        10.0 * ((nums + x) / t1 + (cores + y) / t2 + (mm + z) / t3)
        for x, t1, y, t2, mm, z, t3 in zip(us, ts, uc, tc, mem, um, tm, strict=True)
    ]
    srt = sorted(range(len(s64)), key=s64.__getitem__)
    for i, j in zip(srt, srt[1:], strict=False):
        if s64[j] - s64[i] <= 1e-5 * abs(s64[j]) and (
            us[i],
            uc[i],
            um[i],
            ts[i],
            tc[i],
            tm[i],
            mem[i],
        ) != (us[j], uc[j], um[j], ts[j], tc[j], tm[j], mem[j]):
            return _hami_scores_f32(nums, cores, mem, um, uc, us, tm, tc, ts)
    return s64


def _f32(xs: list[float]) -> list[float]:
    """Each value rounded to float32 (an ``array('f')`` stores float32)."""
    return array("f", xs).tolist()


def _hami_scores_f32(
    nums: int,
    cores: int,
    mem: list[int],
    um: list[int],
    uc: list[int],
    us: list[int],
    tm: list[int],
    tc: list[int],
    ts: list[int],
) -> list[float]:
    """HAMi's float32 card scores, each float32 step done in float64 and rounded: for
    +, -, x and / of float32 values rounding twice gives the float32 result exactly
    (53 >= 2 x 24 + 2 bits), and the integers here are float32-exact (< 2**24)."""
    n = len(tm)
    ucm = _f32(
        [(nums + x) / t for x, t in zip(us, ts, strict=True)]
        + [(cores + x) / t for x, t in zip(uc, tc, strict=True)]
        + [(mm + x) / t for mm, x, t in zip(mem, um, tm, strict=True)]
    )
    s = _f32([a + b for a, b in zip(ucm[:n], ucm[n : 2 * n], strict=True)])
    s = _f32([a + b for a, b in zip(s, ucm[2 * n :], strict=True)])
    return _f32([10.0 * x for x in s])


def _numa_first(chain: Chain) -> bool:
    keys = chain.keys
    return "numa" in keys and keys.index("numa") < min(
        keys.index(k) for k in keys if k in ("binpack", "spread")
    )


def _filters(cons: Constraints, chain: Chain) -> hami.Filters:
    """The request's card filters as :class:`.hami.Filters` (empty entries dropped)."""
    use = tuple(t for t in cons.use_types if t) or None
    nouse = tuple(t for t in cons.nouse_types if t) or None
    return hami.Filters(
        use_types=use,
        nouse_types=nouse,
        vgpu_mode=cons.vgpu_mode,
        use_uuids=tuple(cons.use_uuids) if cons.use_uuids else None,
        nouse_uuids=tuple(cons.nouse_uuids) if cons.nouse_uuids else None,
        numa_bind=cons.numa_bind,
        mutex=chain.mutex,
        topology=chain.topology,
        family_annotations=tuple(sorted(cons.family_annotations.items())),
    )


_VEC = -1  # reason id of a node whose cards' counts say why (``_Reasons.counts``)
# reason name -> the card-code columns counted under it (column 0: the fitting cards)
_COLUMNS: dict[str, list[int]] = {m.ALLOCATED_INSUFFICIENT: [m.OK]}
for _code, _name in m.CARD_REASONS.items():
    _COLUMNS.setdefault(_name, []).append(_code)


@dataclass(slots=True)
class _Reasons:
    """Per node row, why it failed: a reason id into ``names``, or ``_VEC`` and its
    per-code card counts (``counts``: column 0 the fitting cards)."""

    rid: I64
    names: list[str]
    counts: I64

    def text(self, row: int) -> str:
        """The node's reason text as HAMi writes it."""
        i = int(self.rid[row])
        if i != _VEC:
            return self.names[i]
        c = self.counts[row]
        cards = int(c.sum())
        got = {why: int(c[cols].sum()) for why, cols in _COLUMNS.items()}
        return hami.gen_reason({k: v for k, v in got.items() if v}, cards)


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


_FAIL_CACHE_MAX = 4096  # (node, version, pod shape) -> the exact stage's refusal
_CACHE_MAX = 192  # cached asks (each: a bool per card and two ints per node)
_ROOM_MAX = 32  # cached (CPU, memory) asks of the node filters (a byte per node each)


def _mig_cap_rule(cap: I64) -> Callable[[int, int, Sequence[int], Sequence[int]], str | None]:
    """The MIG rule as the vectorised stage applies it: card ``p`` takes an ask of at
    most ``cap[p]`` MiB (``ClusterState.c_migcap``), whatever was picked before."""

    def rule(p: int, need: int, got: Sequence[int], mems: Sequence[int]) -> str | None:
        return mig.REASON if need > cap[p] else None

    return rule


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
        if (
            scheduler.node_policy.lower() not in NODE_POLICIES
            and scheduler.node_policy.lower() not in VARIANTS
        ):
            raise ValueError(
                f"unknown node policy {scheduler.node_policy!r}; use one of {', '.join(NODE_POLICIES)}"
            )
        self.cluster = cluster
        self.scheduler = scheduler
        self.settings = node_settings
        self.rng = np.random.default_rng(seed)
        self.shapes = ShapeModel(table_max=scheduler.shape_table_max)
        self._frag: dict[str, FragScorer] = {}
        self._label_cache: dict[tuple[int, bytes], BOOL] = {}
        self._static_cache: dict[tuple[object, ...], BOOL] = {}
        self._mask_cache: dict[tuple[object, ...], _MaskEntry] = {}
        # (CPU, memory) -> the node filters' mask and the version stamp it is valid to
        self._room_cache: dict[tuple[int, int, int, int], tuple[BOOL, list[int]]] = {}
        self._score_key: tuple[int, int] = (-1, -1)
        self._score: _F64 = np.zeros(0)
        self._score_ver: I64 = np.zeros(0, dtype=np.int64)
        self._fail_cache: dict[tuple[object, ...], str] = {}
        # the last failure's per-node reasons, by its ``tried`` dict (the same object)
        self._last_reasons: tuple[dict[int, str], _Reasons] | None = None
        self.use_cache = True  # False: recompute everything (tests compare both paths)

    @staticmethod
    def _shape_key(
        conts: list[ContainerAsk], asks: list[list[Ask]], cons: Constraints
    ) -> tuple[object, ...]:
        """What the exact stage's answer on a node depends on besides the node."""
        return (
            tuple((c.init, tuple(r)) for c, r in zip(conts, asks, strict=True)),
            cons.gpu_policy, (w.slot, w.core, w.memory) if (w := cons.weights) else None,
            cons.numa_bind, cons.vgpu_mode,
            tuple(cons.use_types), tuple(cons.nouse_types), tuple(cons.use_uuids), tuple(cons.nouse_uuids),
            tuple(sorted(cons.family_annotations.items())),  # other vendors' card filters
        )  # fmt: skip

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
        asks = [[self._ask(a) for a in c.devices if a.nums > 0] for c in conts]
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
            fits = cnt >= a.nums
            mig_nodes = self._mig_nodes(a, cons) if a.nums > 1 else None
            if mig_nodes is not None:
                # HAMi revisits a MIG card: it may give one ask several instances, up
                # to its free slots (the exact fit says how many its geometry holds)
                w = np.where(st.c_migcap[:nc] != mig.NO_LIMIT, st.c_tslot[:nc] - st.c_uslot[:nc], 1)
                inst = np.bincount(cnode[d_ok], weights=w[d_ok], minlength=nn)
                fits |= mig_nodes & (inst >= a.nums)
            node_ok &= fits
        app = [a for c, row in zip(conts, asks, strict=True) if not c.init for a in row]
        # several app asks: a node is checked for room for all of them before its exact
        # fit (one node's cards, not the cluster's: usually one node is fitted)
        multi = len(app) > 1
        room_cut: list[int] = []  # nodes only the pod's sum refused
        policy = (cons.node_policy or self.scheduler.node_policy).lower()
        if policy not in NODE_POLICIES and policy not in VARIANTS:
            # the sender's mistake, said as such: placing by some other policy hides it
            return m.Failure(
                nodes_total=st.nodes_total(),
                message=f"unknown node policy {policy!r}; use one of {', '.join(NODE_POLICIES)}",
            )
        chain = parse_chain(cons.gpu_policy or self.scheduler.gpu_policy)
        weights = cons.weights or ScoringWeights()
        tried: dict[int, str] = {}
        cands = np.flatnonzero(node_ok)
        if len(cands):
            if policy in VARIANTS and self._frag_eligible(asks, cons, chain, req.namespace):
                got = self._decide_frag(policy, req, conts, asks, cpu, mem, cands, dyn, flat)
                if got is not None:
                    if explain and req.source == "kube":
                        self._add_fits(got, policy, cands, set())
                    return got
            # a node that refused this shape of pod and has not changed since refuses it
            # again: kept per (node, version, shape), the exact stage is skipped then
            shape = self._shape_key(conts, asks, cons) if cached else None
            for row in self._order(policy, cands, flat, cpu):
                rec = st.rows[row]
                assert rec is not None
                fkey = (row, int(st.n_ver[row]), st.layout, shape) if shape is not None else None
                if fkey is not None and fkey in self._fail_cache:
                    tried[row] = self._fail_cache[fkey]
                    continue
                if multi and not self._room_for_all(rec, app, dyn):
                    room_cut.append(row)
                    continue
                try:
                    grants = self._fit_node(
                        rec, conts, asks, dyn, cons, chain, weights, req.namespace
                    )
                except _Fail as f:
                    tried[row] = f.reason
                    if fkey is not None:
                        if len(self._fail_cache) >= _FAIL_CACHE_MAX:
                            self._fail_cache.clear()
                        self._fail_cache[fkey] = f.reason
                    continue
                got = m.Placement(node=rec.name, containers=grants, cpu_milli=cpu, memory_mib=mem)
                if explain and req.source == "kube":  # HAMi's FilteringSucceed text
                    self._add_fits(got, policy, cands, {*tried, *room_cut}, row)
                return got
        if not explain:
            return m.Failure(nodes_total=st.nodes_total(), message="no node fits")
        if room_cut:
            # their text is the exact fit's (which container found no card, and why),
            # as when the exact stage tried them; the fit stays the judge
            for row in room_cut:
                rec = st.rows[row]
                assert rec is not None
                try:
                    grants = self._fit_node(
                        rec, conts, asks, dyn, cons, chain, weights, req.namespace
                    )
                except _Fail as f:
                    tried[row] = f.reason
                    continue
                got = m.Placement(node=rec.name, containers=grants, cpu_milli=cpu, memory_mib=mem)
                if req.source == "kube":
                    self._add_fits(got, policy, cands, {*tried, *room_cut} - {row}, row)
                return got
        reasons = self._explain(cons, cpu, mem, flat, static, req.namespace, tried)
        total = st.nodes_total()
        return m.Failure(
            reasons=reasons,
            nodes_total=total,
            message=m.failure_message(reasons, total),
            tried=tried,
        )

    # ------------------------------------------------------------- vector stage

    def _ask(self, a: DeviceAsk) -> Ask:
        n = m.normalise_ask(a, self.settings)
        return Ask(n.vendor, n.nums, n.mem, n.mem_percent if n.mem == 0 else None, n.cores)

    def _node_mask(self, cons: Constraints, cpu: int, mem: int) -> BOOL:
        """Pod-level filters over node rows (kube-scheduler's part of the job)."""
        st = self.cluster
        nn = st.nn
        ok = self._room_mask(cpu, mem).copy()
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
        return ok

    def _room_rows(self, rows: I64 | slice, cpu: int, mem: int) -> BOOL:
        """The node-local filters at ``rows``: live, healthy, schedulable, room for the
        pod's CPU, memory and one more pod."""
        st = self.cluster
        ok = st.n_live[rows] & st.n_healthy[rows] & ~st.n_unsched[rows]
        tot, used = st.n_cpu_tot[rows], st.n_cpu_used[rows]
        if cpu:
            ok &= (tot == 0) | (used + cpu <= tot)
        if mem:
            tot, used = st.n_mem_tot[rows], st.n_mem_used[rows]
            ok &= (tot == 0) | (used + mem <= tot)
        mx = st.n_pods_max[rows]
        ok &= (mx == 0) | (st.n_pods_used[rows] < mx)
        return ok

    def _room_mask(self, cpu: int, mem: int) -> BOOL:
        """:meth:`_room_rows` over every row, kept per (CPU, memory) ask and refreshed
        only where a node's version moved (every change to what it reads bumps it):
        most decisions change a node or two, and the whole-cluster pass was a tenth of
        a decision. Callers must not write into the result."""
        st = self.cluster
        nn = st.nn
        if not self.use_cache:
            return self._room_rows(slice(0, nn), cpu, mem)
        key = (st.layout, nn, cpu, mem)
        nver = st.n_ver[:nn]
        ent = self._room_cache.get(key)
        if ent is None:
            # n_ver stamps come from one counter of the whole cluster: a node changed
            # since the mask was brought up to date has a larger one than its stamp
            ent = (self._room_rows(slice(0, nn), cpu, mem), [int(nver.max(initial=-1))])
            if len(self._room_cache) >= _ROOM_MAX:
                del self._room_cache[next(iter(self._room_cache))]  # oldest first
            self._room_cache[key] = ent
            return ent[0]
        ok, synced = ent
        stale = np.flatnonzero(nver > synced[0])
        if len(stale):
            ok[stale] = self._room_rows(stale, cpu, mem)
            synced[0] = int(st.n_ver[stale].max())
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
            if t.effect in ("NoSchedule", "NoExecute") and not tolerates(
                tols, t.key, t.value, t.effect
            ):
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
        vid = st._intern.get((2, a.vendor), -1)
        checks: list[tuple[int, BOOL]] = [(m.CARD_OTHER_VENDOR, st.c_vendor[:nc] == vid)]
        checks.append((m.CARD_NOT_HEALTH, st.c_health[:nc]))
        checks.append((m.CARD_CORDONED, ~st.c_cordon[:nc]))
        tok = self._type_ok(a, cons)[st.c_type[:nc]]
        if cons.vgpu_mode is not None:
            # HAMi: the annotation's value contains the card's mode
            mok = np.array([md in cons.vgpu_mode for md in st.modes] or [False], dtype=bool)
            tok = tok & mok[st.c_mode[:nc]]
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
        if families.foreign(a.vendor):
            return checks  # memory and cores are the family's fit's (families.py)
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
            # HAMi: exclusive only on a card of exactly 100 cores (no core scaling)
            checks.append((m.CARD_EXCLUSIVE, (uslot == 0) | (tcore != 100)))
        elif a.cores == 0:
            checks.append((m.CARD_COMPUTE_EXHAUSTED, (ucore != tcore) | (tcore == 0)))
        checks.append((m.CARD_MIG_TOPOLOGY, need <= st.c_migcap[:nc]))  # MIG cards (mig.py)
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
        if families.foreign(a.vendor):
            ok = (uslot < tslot) & (uslot == 0) if mutex else uslot < tslot
            return ok  # memory and cores are the family's fit's (families.py)
        if mutex:
            ok &= uslot == 0
        elif a.cores >= 100:
            ok &= (uslot == 0) | (tcore != 100)
        if a.cores == 0:
            ok &= (ucore != tcore) | (tcore == 0)
        ok &= need <= st.c_migcap[pos]  # MIG cards: a free placement of a large-enough profile
        return ok

    def _mig_nodes(self, a: Ask, cons: Constraints) -> BOOL | None:
        """Per node row, whether ``a`` is a MIG request there (:func:`.mig.mig_request`:
        the node has a card in MIG mode); None when it is one on no node."""
        if a.vendor != "NVIDIA" or (
            cons.vgpu_mode is not None and mig.MIG_MODE not in cons.vgpu_mode
        ):
            return None
        st = self.cluster
        is_mig = (st.c_migcap[: st.nc] != mig.NO_LIMIT) & st.c_live[: st.nc]
        if not is_mig.any():
            return None
        return np.bincount(st.c_node[: st.nc][is_mig], minlength=st.nn) > 0

    def _room_for_all(self, rec: NodeRec, app: list[Ask], dyn: dict[Ask, BOOL]) -> bool:
        """Whether ``rec``'s cards could hold all of the app containers' asks together:
        they run at once, so each share or instance takes a slot and its memory on some
        card. Each ask's own count is checked against the cards that fit it; this checks
        the pod's sum (per vendor) against the cards that fit any of its asks, so a node
        where one card fits each ask but not all of them (two 7g.40gb asks, one MIG card)
        is not passed to the exact fit. An upper bound, never tighter than the fit: a
        percentage ask counts no memory, and a MIG instance books its profile's memory,
        at least the ask's, and a card's instances never hold more than its memory."""
        st = self.cluster
        s, n = rec.start, rec.n
        for vendor in dict.fromkeys(a.vendor for a in app):
            mine = [a for a in app if a.vendor == vendor]
            if len(mine) < 2:
                continue
            fit: BOOL | None = None
            for a in dict.fromkeys(mine):
                ok = dyn[a][s : s + n]
                fit = ok if fit is None else fit | ok
            slots = st.c_tslot[s : s + n] - st.c_uslot[s : s + n]
            if int(slots[fit].sum()) < sum(a.nums for a in mine):
                return False
            want = sum(a.nums * a.mem for a in mine if a.pct is None)
            if want and int((st.c_tmem[s : s + n] - st.c_umem[s : s + n])[fit].sum()) < want:
                return False
        return True

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
        """As :func:`.hami.node_score`, in float32 like HAMi (so ties are HAMi's ties);
        a zero total counts 0 here (HAMi divides by it)."""
        st = self.cluster

        def ratio(
            used: npt.NDArray[np.int64], tot: npt.NDArray[np.int64]
        ) -> npt.NDArray[np.float32]:
            t = tot[rows].astype(np.float32)
            u = used[rows].astype(np.float32)
            return np.where(t > 0, u / np.maximum(t, np.float32(1)), np.float32(0))

        s = ratio(st.n_slots_used, st.n_slots_tot) + ratio(st.n_cores_used, st.n_cores_tot)
        s = s + ratio(st.n_dmem_used, st.n_dmem_tot)
        return (hami.WEIGHT * s).astype(np.float64)

    def gpu_free(self) -> _F64:
        """Free share of each node's cards, summed (a card's share: its scarcer dimension)."""
        st = self.cluster
        nc, nn = st.nc, st.nn
        tm, tc = np.maximum(st.c_tmem[:nc], 1), np.maximum(st.c_tcore[:nc], 1)
        share = np.minimum((tm - st.c_umem[:nc]) / tm, (tc - st.c_ucore[:nc]) / tc)
        share = np.where(st.c_live[:nc] & st.c_health[:nc], share, 0.0)
        return np.bincount(st.c_node[:nc], weights=share, minlength=nn).astype(np.float64)

    def _gpu_req(self, flat: list[Ask], rows: npt.NDArray[np.int64]) -> _F64:
        st = self.cluster
        req = np.zeros(len(rows))
        avg_mem = st.n_dmem_tot[rows] / np.maximum(st.n_ncards[rows], 1)
        for a in flat:
            share = np.full(len(rows), a.cores / 100.0)
            mem = (a.pct / 100.0) if a.pct is not None else a.mem / np.maximum(avg_mem, 1)
            req += a.nums * np.maximum(share, mem)
        return req

    def _order(
        self, policy: str, cands: npt.NDArray[np.int64], flat: list[Ask], cpu: int
    ) -> Iterator[int]:
        """Candidate rows, best first; ties by node name (random for random/bestfit)."""
        st = self.cluster
        tie: npt.NDArray[np.float64] | npt.NDArray[np.int64]
        if policy == "random":
            key = np.zeros(len(cands))
            tie = self.rng.random(len(cands))
        elif policy == "bestfit":
            cpu_free = (st.n_cpu_tot[cands] - st.n_cpu_used[cands]) / 1000.0
            gfree = self.gpu_free()[cands]
            left = (
                0.5 * (cpu_free - cpu / 1000.0) / 128.0
                + 0.5 * (gfree - self._gpu_req(flat, cands)) / 8.0
            )
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

    def _add_fits(
        self,
        got: m.Placement,
        policy: str,
        cands: npt.NDArray[np.int64],
        refused: set[int],
        chosen: int | None = None,
    ) -> None:
        """HAMi's fitting nodes for its ``FilteringSucceed`` event, on ``got``.

        HAMi fits every node kube-scheduler offered and lists those that fit with their
        node score (``ComputeDefaultScore``, before the pod), sorted as its node policy
        sorts them (binpack ascending, spread descending) so the chosen node is last.
        Here the candidates of the vectorised stage are the fitting nodes, less those
        the exact stage refused; only the chosen node got the exact fit. Equal scores
        come in the reverse of the ranking's name order, so the chosen node stays last.
        At most :data:`FIT_NODES_MAX` are listed (the best); ``fit_count`` counts all.
        """
        st = self.cluster
        if chosen is None:
            chosen = st.nodes[got.node].row
        rows = cands
        if refused:
            rows = cands[~np.isin(cands, np.fromiter(refused, np.int64, len(refused)))]
        score = self.node_scores(rows)
        key = -score if policy == "spread" else score  # HAMi's ascending sort key
        best = rows
        if len(rows) > FIT_NODES_MAX:  # only the listed ones are sorted (ties kept whole)
            kth = np.partition(key, len(key) - FIT_NODES_MAX)[len(key) - FIT_NODES_MAX]
            keep = np.flatnonzero(key >= kth)
            best, score, key = rows[keep], score[keep], key[keep]
        pos = np.lexsort((-st.n_rank[best], key))
        if best[pos[-1]] != chosen:  # another policy chose: the chosen node goes last
            pos = pos[best[pos] != chosen]
            if chosen not in best:  # below the listed ones by HAMi's score
                one = np.array([chosen], dtype=np.int64)
                best, score = np.append(best, one), np.append(score, self.node_scores(one))
            pos = np.append(pos, np.flatnonzero(best == chosen))
        top = pos[-FIT_NODES_MAX:]
        # map() keeps the per-node work in C: this runs for every Kubernetes pod
        names = map(_NAME, map(st.rows.__getitem__, best[top].tolist()))
        got.fits = list(zip(names, score[top].tolist(), strict=True))
        got.fit_count = len(rows)

    # ------------------------------------------------------------- exact stage

    def _fit_node(
        self,
        rec: NodeRec,
        conts: list[ContainerAsk],
        asks: list[list[Ask]],
        dyn: dict[Ask, BOOL],
        cons: Constraints,
        chain: Chain,
        weights: ScoringWeights,
        ns: str,
    ) -> list[ContainerGrant]:
        """Fit every container on ``rec`` (init one by one, app cumulatively).

        ``dyn``: per ask, the vector stage's card mask (every check against the node as
        it is). While a container sees the node as it is (an init container, or the
        first app container, at its first ask) and nothing but the first fitting cards
        of the walk decides (no NUMA binding, topology, "numa" key, quota or MIG card),
        that mask is the fit's answer and the per-card checks are skipped; a failure,
        or any other case, runs :func:`.hami.fit` (``use_cache = False``: always, so
        the tests compare both).
        """
        st = self.cluster
        s, n = rec.start, rec.n
        base_mem = st.c_umem[s : s + n].tolist()
        base_core = st.c_ucore[s : s + n].tolist()
        base_slot = st.c_uslot[s : s + n].tolist()
        app_mem, app_core, app_slot = list(base_mem), list(base_core), list(base_slot)
        # HAMi sorts the node's device list in place for every container, so one app
        # container's order is where the next one's sort starts; an init container is
        # fitted on a fresh copy of the node, in the registered order
        app_order = list(range(n))
        grants: list[ContainerGrant] = []
        pod_mem = pod_core = 0
        fast = (
            self.use_cache
            and not cons.numa_bind
            and not chain.topology
            and not _numa_first(chain)
            and ns not in st.quotas
        )
        app_used = False
        # cards in MIG mode: HAMi's placement rule and profile bookings (mig.py)
        pm = None
        if mig.PodMig.needed(rec.inv.devices):
            pm = mig.PodMig((r.alloc for r in rec.allocs.values()), rec.inv.devices)
        memo: dict[str, object] = {}
        memo["granted"] = grants  # what the pod's earlier containers got (families.py)
        last_app = max(
            (i for i, (c, r) in enumerate(zip(conts, asks, strict=True)) if r and not c.init),
            default=-1,
        )
        for ci, (c, row) in enumerate(zip(conts, asks, strict=True)):
            if c.init:
                um, uc, us = list(base_mem), list(base_core), list(base_slot)
                order = list(range(n))
            else:
                um, uc, us = app_mem, app_core, app_slot
                order = app_order
            devs: list[CardGrant] = []
            taken: set[int] = set()
            fresh = fast and pm is None and (c.init or not app_used)
            fresh = fresh and not any(families.foreign(a.vendor) for a in row)  # their own fit
            visit: list[int] = []
            partial = False
            if fresh and len(row) == 1 and (c.init or ci == last_app):
                # no later container starts from this order: only the fitting cards'
                # relative order matters, so only they are scored and sorted
                ok1 = dyn[row[0]][s : s + n]
                cand = [p for p in order if ok1[p]]
                visit = self._visit(rec, row, um, uc, us, cand, chain, weights)
                partial = True
            elif row:
                visit = self._visit(rec, row, um, uc, us, order, chain, weights)
            for a in row:
                picks: list[tuple[int, int]] | None = None
                if fresh and not taken:
                    ok = dyn[a][s : s + n]
                    got = [p for p in visit if ok[p]][: a.nums]
                    if len(got) == a.nums:
                        tmem = st.c_tmem[s : s + n]
                        picks = [(p, a.need(int(tmem[p]))) for p in got]
                if picks is None and partial:
                    # the exact fit walks every card (its reasons count them all)
                    visit = self._visit(rec, row, um, uc, us, order, chain, weights)
                if picks is None:
                    picks = self._select(
                        rec, a, um, uc, us, taken, visit, cons, chain, ns, pod_mem, pod_core,
                        pm.rule if pm is not None else None, memo,
                    )  # fmt: skip
                for i, need in picks:
                    d = rec.inv.devices[i]
                    cores, ch = (
                        families.booked(memo, i, a.cores),
                        pm.take(i, need) if pm is not None else None,
                    )
                    if ch is not None:  # HAMi books the MIG profile's memory and compute
                        need, cores = ch.profile.memory_mb, ch.profile.core
                    elif d.mode == mig.MIG_MODE:
                        raise _Fail(mig.REASON)
                    devs.append(
                        CardGrant(
                            uuid=d.uuid,
                            index=d.index,
                            type=d.type,
                            vendor=d.vendor,
                            mem=need,
                            cores=cores,
                            mig=ch.slice() if ch is not None else None,
                        )
                    )
                    um[i] += need
                    uc[i] += cores
                    us[i] += 1
                    taken.add(i)
                    pod_mem += need
                    pod_core += cores
            grants.append(ContainerGrant(name=c.name, init=c.init, devices=devs, sidecar=c.sidecar))
            app_used = app_used or (not c.init and bool(devs))
        q = st.quotas.get(ns)
        if q is not None and any(g.devices for g in grants):
            usage = card_usage(grants)
            used = st.ns_used.get(ns, [0, 0])
            if (
                q.memory_mib is not None
                and used[0] + sum(u[0] for u in usage.values()) > q.memory_mib
            ):
                raise _Fail(m.CARD_REASONS[m.CARD_QUOTA])
            if q.cores is not None and used[1] + sum(u[1] for u in usage.values()) > q.cores:
                raise _Fail(m.CARD_REASONS[m.CARD_QUOTA])
        return grants

    def _visit(
        self,
        rec: NodeRec,
        row: list[Ask],
        um: list[int],
        uc: list[int],
        us: list[int],
        order: list[int],
        chain: Chain,
        weights: ScoringWeights,
    ) -> list[int]:
        """The order HAMi's fit visits ``rec``'s cards in for one container's asks.

        Every card is scored for the container (:func:`.hami.device_score`; our own
        weighted formula when the request carries non-default weights), ``order`` is
        re-sorted in place by the policy (:func:`.hami.sort_key`) and walked from its
        end: on equal scores the card last in the list comes first.
        """
        st = self.cluster
        s, n = rec.start, rec.n
        usage = next((k for k in chain.keys if k in ("binpack", "spread")), "spread")
        tmem, tcore, tslot = st.c_tmem[s : s + n], st.c_tcore[s : s + n], st.c_tslot[s : s + n]
        nums = sum(a.nums for a in row)
        cores = sum(a.cores for a in row)
        scores: list[float]
        if weights == ScoringWeights():
            scores = _hami_scores(row, um, uc, us, tmem.tolist(), tcore.tolist(), tslot.tolist())
        else:
            tm, tc, ts = tmem.tolist(), tcore.tolist(), tslot.tolist()
            scores = [
                10.0 * (
                    weights.slot * (us[i] + nums) / max(ts[i], 1)
                    + weights.core * (uc[i] + cores) / max(tc[i], 1)
                    + weights.memory * (um[i] + sum(a.need(tm[i]) for a in row)) / max(tm[i], 1)
                )
                for i in range(n)
            ]  # fmt: skip
        numa = st.c_numa[s : s + n].tolist()
        # hami.sorted_order, inlined (this runs for every container placed)
        if usage == "binpack":
            keys = [(-numa[p], scores[p], i) for i, p in enumerate(order)]
        else:
            keys = [(numa[p], -scores[p], i) for i, p in enumerate(order)]
        order[:] = [order[i] for i in sorted(range(len(order)), key=keys.__getitem__)]
        return order[::-1]

    def _hami_cards(
        self, rec: NodeRec, um: list[int], uc: list[int], us: list[int]
    ) -> list[hami.Card]:
        """``rec``'s cards as :class:`.hami.Card` tuples, with the given use."""
        st = self.cluster
        sl = slice(rec.start, rec.start + rec.n)
        health, cordon = st.c_health[sl].tolist(), st.c_cordon[sl].tolist()
        tslot, tmem, tcore = (
            st.c_tslot[sl].tolist(),
            st.c_tmem[sl].tolist(),
            st.c_tcore[sl].tolist(),
        )
        return [
            hami.Card(
                d.uuid, d.index, d.type, d.mode, d.numa, health[i], tslot[i], us[i], tmem[i], um[i],
                tcore[i], uc[i], cordon[i], d.vendor,
            )
            for i, d in enumerate(rec.inv.devices)
        ]  # fmt: skip

    def _select(
        self,
        rec: NodeRec,
        a: Ask,
        um: list[int],
        uc: list[int],
        us: list[int],
        taken: set[int],
        visit: list[int],
        cons: Constraints,
        chain: Chain,
        ns: str,
        pod_mem: int,
        pod_core: int,
        mig_rule: Callable[[int, int, Sequence[int], Sequence[int]], str | None] | None = None,
        memo: dict[str, object] | None = None,
    ) -> list[tuple[int, int]]:
        """Pick ``a.nums`` cards of ``rec`` for one ask (:func:`.hami.fit`, in the
        ``visit`` order, ``mig_rule`` its custom filter); raises _Fail with HAMi's
        reason text for the node."""
        st = self.cluster
        if rec.n < a.nums and not self._mig_request(rec, a, cons):
            raise _Fail(m.NODE_INSUFFICIENT_DEVICE)
        # ``memo`` (one per node fit): the node's cards and the filters are built once,
        # then only the cards' use is brought up to date
        cached = memo.get("cards") if memo is not None else None
        if isinstance(cached, list):
            cards = cached
            for i, card in enumerate(cards):
                card.usedmem, card.usedcores, card.used = um[i], uc[i], us[i]
        else:
            cards = self._hami_cards(rec, um, uc, us)
            if memo is not None:
                memo["cards"] = cards
        f = _filters(cons, chain)
        q = st.quotas.get(ns)
        quota_ok = None
        if q is not None:
            qused = st.ns_used.get(ns, [0, 0])

            def quota_ok(card: hami.Card, mem: int, cores: int) -> bool:
                assert q is not None
                if q.memory_mib is not None and qused[0] + pod_mem + mem > q.memory_mib:
                    return False
                return not (q.cores is not None and qused[1] + pod_core + cores > q.cores)

        order = [p for p in visit if p not in taken]
        req = _request(a)
        if _numa_first(chain):
            # ours (a "numa" key before the usage key): the NUMA node with most fitting
            # cards first; after the usage key it changes nothing (HAMi's sort already
            # keeps the cards of a NUMA node together)
            per: dict[int, int] = {}
            for p in order:
                if (
                    hami.card_check(cards[p], req, f, quota_ok) is None
                    and cards[p].vendor == a.vendor
                ):
                    per[cards[p].numa] = per.get(cards[p].numa, 0) + 1
            order.sort(key=lambda p: -per.get(cards[p].numa, 0))
        granted = memo.get("granted") if memo is not None else None
        res = families.fit(cards, order, req, f, granted) or hami.fit(
            cards, order, req, f, rec.links.tolist() if rec.links is not None else None, quota_ok,
            mig_rule,
        )  # fmt: skip
        families.keep_cores(memo, res)  # a family books cores in its cards' own unit
        if not res.ok:
            raise _Fail(res.text or m.NODE_UNFIT_POD)
        return list(zip(res.picked, res.mems, strict=True))

    # ------------------------------------------------------------- frag policies

    def _frag_eligible(
        self, asks: list[list[Ask]], cons: Constraints, chain: Chain, ns: str
    ) -> bool:
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
        got = scorer.choose(
            self.cluster, self.shapes, a, cpu, mem, cands, dyn.get(a) if a else None, self.rng, key
        )
        if got is None:
            return None
        row, positions, score = got
        rec = self.cluster.rows[row]
        assert rec is not None
        if any(rec.inv.devices[p - rec.start].mode == mig.MIG_MODE for p in positions):
            return None  # a MIG card's profile and placement come from the exact stage
        grants: list[ContainerGrant] = []
        for c, rowasks in zip(conts, asks, strict=True):
            devs: list[CardGrant] = []
            if rowasks:
                for p in positions:
                    d = rec.inv.devices[p - rec.start]
                    devs.append(
                        CardGrant(
                            uuid=d.uuid,
                            index=d.index,
                            type=d.type,
                            vendor=d.vendor,
                            mem=rowasks[0].need(d.devmem),
                            cores=rowasks[0].cores,
                        )
                    )
            grants.append(ContainerGrant(name=c.name, init=c.init, devices=devs, sidecar=c.sidecar))
        return m.Placement(
            node=rec.name, containers=grants, cpu_milli=cpu, memory_mib=mem, score=score
        )

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
        """For each reason, how many live nodes gave it (see :meth:`_reason_ids`).

        A node counts once under every reason of its text (HAMi counts the nodes of
        each reason of the per-node texts); the reasons come sorted by name.
        """
        rs = self._reason_ids(cons, cpu, mem, flat, static, ns, tried)
        self._last_reasons = (tried, rs)  # for reason_nodes on the same failure
        live = self.cluster.n_live[: self.cluster.nn]
        out: dict[str, int] = {}
        ids, counts = np.unique(rs.rid[live], return_counts=True)
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
            if i > 0:
                for why in hami.parse_reason(rs.names[i]):
                    out[why] = out.get(why, 0) + c
        vec = live & (rs.rid == _VEC)
        if vec.any():
            sub = rs.counts[vec]
            for why, cols in _COLUMNS.items():
                n = int(np.count_nonzero(sub[:, cols].sum(axis=1)))
                if n:
                    out[why] = out.get(why, 0) + n
        return dict(sorted(out.items()))

    def node_reasons(self, req: AllocRequested, failure: m.Failure) -> dict[str, str]:
        """Each offered node's reason text, for a failed request that names its
        candidate nodes (``Constraints.nodes``: kube-scheduler's extender asks per
        node): HAMi's per-node text (``1/2 CardInsufficientMemory, 1/2 CardTypeMismatch``)
        or the node-level reason. Nodes placement does not know are left out; the
        caller says why for them."""
        cons = req.constraints
        if not cons.nodes:
            return {}
        conts = m.ordered_containers(req)
        flat = [self._ask(a) for c in conts for a in c.devices if a.nums > 0]
        cpu, mem = m.pod_node_resources(conts)
        static = {a: self._static_mask(a, cons) for a in dict.fromkeys(flat)}
        rs = self._reason_ids(cons, cpu, mem, flat, static, req.namespace, failure.tried)
        st = self.cluster
        out: dict[str, str] = {}
        for name in cons.nodes:
            rec = st.nodes.get(name)
            if rec is not None and st.n_live[rec.row]:
                out[name] = rs.text(rec.row)
        return out

    def reason_nodes(self, req: AllocRequested, failure: m.Failure) -> dict[str, list[str]]:
        """For a failed request, per card reason the live nodes whose text gives it,
        sorted: what HAMi's ``FilteringFailed`` events list. As HAMi's ``ParseReason``
        reads the texts, a node-level one (``NodeInsufficientDevice``, a pod-level
        filter) lists the node under no reason."""
        conts = m.ordered_containers(req)
        flat = [self._ask(a) for c in conts for a in c.devices if a.nums > 0]
        if not flat:
            return {}
        cons = req.constraints
        last = self._last_reasons
        if last is not None and last[0] is failure.tried and len(last[1].rid) == self.cluster.nn:
            rs = last[1]  # the decision that failed computed them a moment ago
        else:
            cpu, mem = m.pod_node_resources(conts)
            static = {a: self._static_mask(a, cons) for a in dict.fromkeys(flat)}
            rs = self._reason_ids(cons, cpu, mem, flat, static, req.namespace, failure.tried)
        st = self.cluster
        live = st.n_live[: st.nn]
        rows: dict[str, list[int]] = {}
        for i in np.unique(rs.rid[live]).tolist():
            if i > 0:
                for why in hami.hami_parse_reason(rs.names[i]):
                    rows.setdefault(why, []).extend(np.flatnonzero(live & (rs.rid == i)).tolist())
        vec = live & (rs.rid == _VEC)
        if vec.any():
            sums = {why: rs.counts[:, cols].sum(axis=1) for why, cols in _COLUMNS.items()}
            for why, tot in sums.items():
                got = np.flatnonzero(vec & (tot > 0)).tolist()
                if got:
                    rows.setdefault(why, []).extend(got)
        out: dict[str, list[str]] = {}
        for why in sorted(rows):
            out[why] = sorted(st.rows[r].name for r in rows[why])  # type: ignore[union-attr]
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
    ) -> _Reasons:
        """One reason per live node: the first filter it fails, else its cards' reasons.

        Vectorised over node rows (a Python loop over 5,000 nodes cost tens of ms and
        was most of ``frag``'s p99). Each node gets a reason id: an index into
        ``names`` (0 means "no reason yet", so a mask applied later never overrides an
        earlier one: the filters' order is the rule), or ``_VEC`` for a node whose
        cards fail the first ask it cannot meet; its per-code card counts are in
        ``counts`` (HAMi's text: every reason of its cards, and the fitting cards as
        ``AllocatedCardsInsufficientRequest``). A NUMA-bound ask's text depends on
        the walk over NUMA nodes and comes from the exact fit, node by node.
        :meth:`_explain` counts them to exactly what :meth:`_explain_ref` (the
        readable loop over :mod:`.hami`'s steps, kept for the tests) returns.
        """
        st = self.cluster
        nn = st.nn
        live = st.n_live[:nn]
        names: list[str] = [""]
        rid = np.zeros(nn, dtype=np.int64)
        counts = np.zeros((nn, m.N_CARD_CODES), dtype=np.int64)

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
            # HAMi: more cards asked than the node has (of any vendor) is a node-level
            # reason; the card codes (a pass over every card) only if a node is left
            short_cards = st.n_ncards[:nn] < a.nums
            mig_nodes = self._mig_nodes(a, cons)
            if mig_nodes is not None:  # HAMi skips the count for a MIG request
                short_cards &= ~mig_nodes
            assign(short_cards, m.NODE_INSUFFICIENT_DEVICE)
            if not (live & (rid == 0)).any():
                break
            code = self._card_codes(a, cons, ns)
            code[~st.c_live[: st.nc]] = m.CARD_OTHER_VENDOR  # dead positions: no card
            mat = np.bincount(cnode * m.N_CARD_CODES + code, minlength=nn * m.N_CARD_CODES)
            mat = mat.reshape(nn, m.N_CARD_CODES)
            short = live & (rid == 0) & (mat[:, 0] < a.nums)
            if mig_nodes is not None and tried:
                # a MIG node the card counts passed (its cards' instances): the exact
                # fit's text, below, says why it failed
                short[list(tried)] = False
            if not short.any():
                continue
            # a NUMA-bound ask's text depends on the walk; a quota's on the cards the
            # ask picked before (HAMi's fitQuota counts them): the exact fit says
            if a.nums > 1 and (cons.numa_bind or ns in st.quotas):
                for row in np.flatnonzero(short).tolist():
                    rec = st.rows[row]
                    assert rec is not None
                    names.append(self._ask_text(rec, a, cons, ns))
                    rid[row] = len(names) - 1
                continue
            mat[:, m.CARD_OTHER_VENDOR] = 0
            empty = short & (mat.sum(axis=1) == 0)  # no card of the vendor: HAMi's text is empty
            assign(empty, m.NODE_UNFIT_POD)
            vec = short & ~empty
            counts[vec] = mat[vec]
            rid[vec] = _VEC
        for row, why in tried.items():
            if rid[row] == 0:
                names.append(why)
                rid[row] = len(names) - 1
        assign(live, m.NODE_UNFIT_POD)
        return _Reasons(rid, names, counts)

    @staticmethod
    def _mig_request(rec: NodeRec, a: Ask, cons: Constraints) -> bool:
        modes = (d.mode for d in rec.inv.devices if d.vendor == a.vendor)
        return mig.mig_request(a.vendor, cons.vgpu_mode, modes)

    def _ask_text(self, rec: NodeRec, a: Ask, cons: Constraints, ns: str) -> str:
        """HAMi's text for one ask on ``rec`` as it is, from the exact fit."""
        st = self.cluster
        s, n = rec.start, rec.n
        um = st.c_umem[s : s + n].tolist()
        uc = st.c_ucore[s : s + n].tolist()
        us = st.c_uslot[s : s + n].tolist()
        chain = parse_chain(cons.gpu_policy or self.scheduler.gpu_policy)
        visit = self._visit(
            rec, [a], um, uc, us, list(range(n)), chain, cons.weights or ScoringWeights()
        )
        cap = st.c_migcap[s : s + n]  # MIG cards: the vectorised stage's capacity rule
        try:
            self._select(
                rec, a, um, uc, us, set(), visit, cons, chain, ns, 0, 0, _mig_cap_rule(cap)
            )
        except _Fail as f:
            return f.reason
        return m.NODE_UNFIT_POD

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
        """The reference for :meth:`_explain`: each node's text by a loop over nodes,
        its cards judged by :mod:`.hami`'s pure steps, then counted per reason.

        Slow (tens of ms at 5,000 nodes) but readable; the tests compare both.
        """
        out: dict[str, int] = {}
        for text in self._node_texts_ref(cons, cpu, mem, flat, ns, tried).values():
            for why in hami.parse_reason(text):
                out[why] = out.get(why, 0) + 1
        return dict(sorted(out.items()))

    def _node_texts_ref(
        self, cons: Constraints, cpu: int, mem: int, flat: list[Ask], ns: str, tried: dict[int, str]
    ) -> dict[int, str]:
        """Each live node's reason text (node row -> text), the readable way."""
        st = self.cluster
        pin = cons.node_name
        offered = set(cons.nodes) if cons.nodes else None
        labels = self._labels(cons) if (cons.node_selector or cons.affinity) else None
        chain = parse_chain(cons.gpu_policy or self.scheduler.gpu_policy)
        usage = next((k for k in chain.keys if k in ("binpack", "spread")), "spread")
        f = _filters(cons, chain)
        q = st.quotas.get(ns)
        qused = st.ns_used.get(ns, [0, 0])

        def quota_ok(card: hami.Card, need: int, cores: int) -> bool:
            if q is None:
                return True
            if q.memory_mib is not None and qused[0] + need > q.memory_mib:
                return False
            return q.cores is None or qused[1] + cores <= q.cores

        out: dict[int, str] = {}
        for rec in st.rows:
            if rec is None:
                continue
            r, inv = rec.row, rec.inv
            why: str | None = None
            if pin is not None and rec.name != pin:
                why = m.NODE_NAME
            elif offered is not None and rec.name not in offered:
                why = m.NODE_NOT_OFFERED
            elif not st.n_healthy[r] or (flat and rec.n == 0):
                why = m.NODE_UNREGISTERED
            elif inv.unschedulable:
                why = m.NODE_UNSCHEDULABLE
            elif labels is not None and not labels[r]:
                why = m.NODE_SELECTOR
            elif st.n_tainted[r] and not self._taints_ok(rec, cons.tolerations):
                why = m.NODE_TAINT
            elif inv.max_pods and st.n_pods_used[r] >= inv.max_pods:
                why = m.TOO_MANY_PODS
            elif cpu and inv.cpu_milli and st.n_cpu_used[r] + cpu > inv.cpu_milli:
                why = m.INSUFFICIENT_CPU
            elif mem and inv.memory_mib and st.n_mem_used[r] + mem > inv.memory_mib:
                why = m.INSUFFICIENT_MEMORY
            s, n = rec.start, rec.n
            cards = self._hami_cards(
                rec,
                st.c_umem[s : s + n].tolist(),
                st.c_ucore[s : s + n].tolist(),
                st.c_uslot[s : s + n].tolist(),
            )
            for a in dict.fromkeys(flat):
                if why is not None:
                    break
                if rec.n < a.nums and not self._mig_request(rec, a, cons):
                    why = m.NODE_INSUFFICIENT_DEVICE
                    break
                req = _request(a)
                # MIG cards as the vectorised stage judges them: refused when no
                # large-enough profile has a free placement (mig.py)
                mig_rule = _mig_cap_rule(st.c_migcap[s : s + n])
                fits = sum(
                    1
                    for i, c in enumerate(cards)
                    if c.vendor == a.vendor
                    and hami.card_check(c, req, f, quota_ok) is None
                    and mig_rule(i, hami.need_mem(c, req), [], []) is None
                )
                if fits >= a.nums:
                    continue
                links = rec.links.tolist() if rec.links is not None else None
                # the exact fit gives the text of a NUMA-bound or quota-bound ask (its
                # walk's order matters), which may revisit a MIG card as HAMi does
                walk = (f.numa_bind or q is not None) and a.nums > 1
                visit = hami.device_order(usage, cards, [req]) if walk else list(range(n))
                # else one instance per card, as the card matrix counts
                one = cards if walk else [
                    dataclasses.replace(c, mode="") if c.mode == mig.MIG_MODE else c for c in cards
                ]  # fmt: skip
                why = (
                    families.fit(one, visit, req, f)
                    or hami.fit(one, visit, req, f, links, quota_ok, mig_rule)
                ).text or m.NODE_UNFIT_POD
            out[r] = why or tried.get(r) or m.NODE_UNFIT_POD
        return out
