"""The fragmentation scorer's fast paths decide exactly as its plain formulation.

``RefScorer`` is :class:`FragScorer` as it was before the per-decision constant was cut
(each card's usability kept from its node's refresh, the static fit read from the
card's fit before the ask, memory needs looked up per card size, the factor ``k`` of
one card dropped, the CPU rank shared with the tie measure, a flat table lookup, a
shorter final selection): the methods below are that code, verbatim. Both score the
same seeded workload (shared, percentage, whole-card and CPU-only pods, model
constraints, releases, health changes, shape versions moving) on twin clusters; every
decision (node, cards and score, compared exactly) must be the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from services.placement.engine import Placement
from services.placement.engine.frag import (
    _BEST_BYTES,
    _BEST_MAX,
    _CHUNK_NODES,
    FragScorer,
    Shape,
    ShapeModel,
    _Best,
)
from services.placement.engine.placer import Placer
from services.placement.engine.state import BOOL, ClusterState
from shared.schemas import AllocRequested, DeviceAsk

from .util import cluster, node, placer, req

_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]


class RefScorer(FragScorer):
    """The scorer before its per-card caches (reference code: do not optimise)."""

    def _card_free(self, st: ClusterState, pos: _I64) -> tuple[_F64, _F64, _F64]:  # type: ignore[override]
        tm = np.maximum(st.c_tmem[pos], 1)
        tc = np.maximum(st.c_tcore[pos], 1)
        fm = (tm - st.c_umem[pos]) / tm
        fc = (tc - st.c_ucore[pos]) / tc
        usable = st.c_live[pos] & st.c_health[pos] & ~st.c_cordon[pos]
        w = (fm + fc) / 2 if self.two_d else np.minimum(fm, fc)
        return fm, fc, np.where(usable, w, 0.0)

    def _frag_of(self, cnt: _F64, small: _F64, idle: _F64, j: _I64) -> _F64:  # type: ignore[override]
        """Per row, Σ_m p_m F(m): all idle share for the shapes that cannot run, the
        idle share of the cards too small for m for those that can."""
        # below 0 when a whole-card ask takes k cards of a group counted short of k
        # (the old per-shape test read it as "cannot run", as a count of 0 does here)
        c = np.clip(cnt, 0, self._kmax).astype(np.int64)
        prun = self._table[self._garange[None, :], c, j[:, None]]
        # row by row: a row's value must not depend on which other rows come with it
        out: _F64 = idle * self._psum + np.einsum("ij,ij->i", small - idle[:, None], prun)
        return out

    def _fits(  # type: ignore[override]
        self, st: ClusterState, pos: _I64, fm: _F64, fc: _F64, slots_used: _I64, static: BOOL
    ) -> BOOL:
        """(cards x shape groups): can this card (in the given state) host one card of m.

        ``static`` is the (cards x groups) part that does not depend on use: the card
        is usable and its model allowed for the shape.
        """
        if self._any_mib:
            tm = np.maximum(st.c_tmem[pos], 1).astype(np.float64)
            need_m = np.where(self._pct >= 0, self._pct, self._mib / tm[:, None])
        else:
            need_m = self._pct[None, :]
        eps = 1e-9
        if self.two_d:
            ok = (fm[:, None] + eps >= need_m) & (fc[:, None] + eps >= self._need_c)
        else:
            ok = np.minimum(fm, fc)[:, None] + eps >= np.maximum(need_m, self._need_c)
        ok &= static
        ok &= (slots_used < st.c_tslot[pos])[:, None]
        if self._excl.any():
            ok &= ~self._excl | (slots_used == 0)[:, None]
        return ok

    def _static(self, st: ClusterState, pos: _I64, type_ok: BOOL) -> BOOL:
        """(cards x groups); ``type_ok`` is (models x groups)."""
        usable = st.c_live[pos] & st.c_health[pos] & ~st.c_cordon[pos]
        return usable[:, None] & type_ok[st.c_type[pos]]

    def _refresh(
        self,
        st: ClusterState,
        shapes: list[Shape],
        version: int,
        p: _F64 | None = None,
        model: ShapeModel | None = None,
    ) -> BOOL:
        nn = st.nn
        key = (st.layout, version, nn)
        if key != self._key or self._type_key != (len(st.types), version):
            self._type_key = (len(st.types), version)
            self._type_cache = (
                self._type_ok(st, shapes)
                if self.variant.shape_types
                else np.ones((max(len(st.types), 1), len(shapes)), dtype=bool)
            )
            self._shape_vectors(shapes, version, p if p is not None else np.zeros(len(shapes)))
            self._type_groups = self._type_cache[:, self._gfirst]  # what the card tests read
            self.cpu_weight = self._cpu_weight(st, model)
            if self.variant.model_aware and p is not None:
                self.pressure = self._pressure(st, shapes, p, self._type_cache)
            else:
                self.pressure = np.zeros(nn)
        type_ok = self._type_groups
        ng = len(self._gfirst)
        if key != self._key:
            self._key = key
            self._ver = np.full(nn, -1, dtype=np.int64)
            self.cnt = np.zeros((nn, ng))  # per group: cards able to host it
            self.small = np.zeros((nn, ng))  # per group: idle share of the cards unable to
            self.idle = np.zeros(nn)
            self.fb = np.zeros(nn)
            # per card, as of its node's refresh: free memory and cores, idle share, and
            # which groups it can host; every score of the card reads them instead of
            # computing them again (a node's refresh always comes first)
            self._cfm = np.zeros(st.nc)
            self._cfc = np.zeros(st.nc)
            self._cw = np.zeros(st.nc)
            self._cfit = np.zeros((st.nc, ng), dtype=bool)
        stale = np.flatnonzero(self._ver != st.n_ver[:nn])
        if len(stale) == 0:
            return type_ok
        # After a new shape version every node is stale; most of them are often in one
        # of a few states (idle nodes of each model): each state is computed once
        todo, inv = self._node_groups(st, stale) if self._grouped(len(stale), nn) else (stale, None)
        # in slices of nodes: the (cards x groups) temporaries of 20,000 nodes at once
        # were a quarter GB at peak
        for lo in range(0, len(todo), _CHUNK_NODES):
            self._refresh_rows(st, todo[lo : lo + _CHUNK_NODES], type_ok, ng)
        if inv is not None:
            src = todo[inv]
            # the cards at the same offsets in their representative
            pos, owner = st.card_positions(stale)
            rpos = pos + (st.n_start[src] - st.n_start[stale])[owner]
            self._cfm[pos] = self._cfm[rpos]
            self._cfc[pos] = self._cfc[rpos]
            self._cw[pos] = self._cw[rpos]
            self._cfit[pos] = self._cfit[rpos]
            self.cnt[stale] = self.cnt[src]
            self.small[stale] = self.small[src]
            self.idle[stale] = self.idle[src]
            self.fb[stale] = self.fb[src]
        self._ver[stale] = st.n_ver[stale]
        return type_ok

    def _refresh_rows(self, st: ClusterState, stale: _I64, type_ok: BOOL, ng: int) -> None:
        counts = st.n_ncards[stale]
        pos = np.repeat(st.n_start[stale] - np.cumsum(counts) + counts, counts) + np.arange(
            counts.sum()
        )
        owner = np.repeat(np.arange(len(stale)), counts)
        fm, fc, w = self._card_free(st, pos)
        fit = self._fits(st, pos, fm, fc, st.c_uslot[pos], self._static(st, pos, type_ok))
        self._cfm[pos], self._cfc[pos], self._cw[pos], self._cfit[pos] = fm, fc, w, fit
        cnt = np.zeros((len(stale), ng))
        small = np.zeros((len(stale), ng))
        np.add.at(cnt, owner, fit.astype(np.float64))
        np.add.at(small, owner, np.where(fit, 0.0, w[:, None]))
        self.cnt[stale] = cnt
        self.small[stale] = small
        idle: _F64 = np.bincount(owner, weights=w, minlength=len(stale)).astype(np.float64)
        self.idle[stale] = idle
        self.fb[stale] = self._frag_of(cnt, small, idle, self._cpu_rank(st, stale, 0))

    @staticmethod
    def _distinct(st: ClusterState, pos: _I64) -> _I64:
        """One card per (node, use) state: cards in the same state score the same.

        Keeps the lowest position of each group, so ties still go to the lowest index.
        """
        room = np.minimum(st.c_tslot[pos] - st.c_uslot[pos], 3)
        skey = (
            (st.c_umem[pos] << 24)
            + (st.c_ucore[pos] << 8)
            + (np.minimum(st.c_uslot[pos], 1) << 2)
            + room
        )
        order = np.lexsort((pos, skey, st.c_node[pos]))
        ps = pos[order]
        ks, rs = skey[order], st.c_node[ps]
        first = np.ones(len(ps), dtype=bool)
        first[1:] = (ks[1:] != ks[:-1]) | (rs[1:] != rs[:-1])
        return np.sort(ps[first])

    def _candidates(
        self, st: ClusterState, k: int, feasible: BOOL | None, rows_all: _I64
    ) -> tuple[_I64, _I64]:
        """(rows, card positions) to score: per node one card per distinct state.

        ``k`` = 0 (CPU-only): the rows themselves, no card; ``k`` > 1 (whole cards): any
        k idle cards of a node are alike, so the first one stands for them.
        """
        if k == 0 or feasible is None:
            return rows_all, np.full(len(rows_all), -1, dtype=np.int64)
        if 8 * len(rows_all) < st.nn:
            # a few nodes (those changed since a kind's last use): their own cards, not a
            # pass over every card of the cluster; sorted, as the pass gives them (dead
            # positions are never feasible)
            allpos, _ = st.card_positions(rows_all)
            pos = np.sort(allpos[feasible[allpos]])
        else:
            node_ok = np.zeros(st.nn, dtype=bool)
            node_ok[rows_all] = True
            pos = np.flatnonzero(feasible & node_ok[st.c_node[: st.nc]])
        if k > 1:
            first = np.ones(len(pos), dtype=bool)
            first[1:] = st.c_node[pos[1:]] != st.c_node[pos[:-1]]
            pos = pos[first]
        elif len(pos) > 1:
            pos = self._distinct(st, pos)
        return st.c_node[pos], pos

    def _score(
        self,
        st: ClusterState,
        shapes: list[Shape],
        p: _F64,
        type_ok: BOOL,
        ask: object | None,
        k: int,
        cpu: int,
        rows: _I64,
        pos: _I64,
    ) -> tuple[_F64, _F64, _F64]:
        """Per candidate (row, card): the policy score, the node's leftover and the card's
        leftover (tie-breakers, smaller first).

        Every quantity is node-local (the node's cards, CPU, aggregates), which is what
        lets :meth:`choose` cache the best card of a node until the node changes.
        """
        cnt, small, idle = self.cnt[rows], self.small[rows], self.idle[rows]
        if k:
            assert ask is not None
            fm, fc, w = self._cfm[pos], self._cfc[pos], self._cw[pos]
            tm = np.maximum(st.c_tmem[pos], 1)
            need_m = (ask.pct / 100.0) if ask.pct is not None else ask.mem / tm  # type: ignore[attr-defined]
            fm2 = fm - need_m
            fc2 = fc - ask.cores / 100.0  # type: ignore[attr-defined]
            usable = st.c_live[pos] & st.c_health[pos] & ~st.c_cordon[pos]
            w2 = np.where(usable, (fm2 + fc2) / 2 if self.two_d else np.minimum(fm2, fc2), 0.0)
            slots = st.c_uslot[pos]
            static = self._static(st, pos, type_ok)
            f_before = self._cfit[pos]
            f_after = self._fits(st, pos, fm2, fc2, slots + 1, static)
            cnt2 = cnt + k * (f_after.astype(np.float64) - f_before)
            small2 = small + k * (
                np.where(f_after, 0.0, w2[:, None]) - np.where(f_before, 0.0, w[:, None])
            )
            idle2 = idle - k * (w - w2)
            card_left = np.round(w2, 9) if self.variant.card_tie else np.zeros(len(rows))
        else:
            cnt2, small2, idle2 = cnt, small, idle
            card_left = np.zeros(len(rows))
        delta = self._frag_of(cnt2, small2, idle2, self._cpu_rank(st, rows, cpu)) - self.fb[rows]
        if k and self.variant.model_aware == "delta":
            # GPU taken from a model that model-constrained shapes depend on counts as
            # growth: that capacity is, in expectation, theirs
            delta = delta + self.pressure[rows] * k * np.maximum(need_m, ask.cores / 100.0)  # type: ignore[union-attr]
        v = self.variant
        # ties by least GPU left on the node (best fit), then node name, card index
        left = idle2 if k else idle
        tot = st.n_cpu_tot[rows]
        # in cores/128 (openb's BestFit); a node that does not report its CPU (0) has
        # none to pack, so it reads as neutral rather than as negative CPU left
        cpu_left = np.where(tot > 0, tot - st.n_cpu_used[rows] - cpu, 0) / 128000.0
        if v.tie == "bestfit2" or (v.tie == "bestfit2g" and k):
            # the openb BestFit measure: CPU and GPU left over. For CPU-only tasks
            # (bestfit2g) GPU left only: packing them where CPU is scarcest strands GPUs
            left = 0.5 * cpu_left + 0.5 * left / 8.0
        elif v.tie == "adaptive":
            left = self.cpu_weight * cpu_left + 0.5 * left / 8.0
        elif v.tie == "bestfit2w":  # CPU at half BestFit's weight
            left = 0.25 * cpu_left + 0.5 * left / 8.0
        elif v.tie == "bestfitlex":  # GPU left, then CPU left
            left = np.round(left, 4) + 1e-5 * np.clip(cpu_left, 0.0, 1.0)
        if v.blend:
            score = -np.round(delta + v.blend * left, 9)
        elif v.exact and v.quantum > 0:
            score = (
                -np.ceil(np.round(delta / v.quantum, 9))
                if v.qmode == "ceil"
                else -np.round(delta / v.quantum)
            )
        elif v.exact:
            score = -np.round(delta, 9)  # rounding: equal growths must tie exactly
        else:
            score = np.trunc(
                100.0 / (1.0 + np.exp(delta / v.tau))
            )  # 100·sigmoid(−Δ), whole numbers
        return score, np.round(left, 9), np.asarray(card_left, dtype=np.float64)  # exact widening

    def _choose_cached(
        self,
        st: ClusterState,
        shapes: list[Shape],
        p: _F64,
        type_ok: BOOL,
        ask: object | None,
        k: int,
        cpu: int,
        cands: _I64,
        feasible: BOOL | None,
        key: tuple[object, ...],
    ) -> tuple[int, int, float] | None:
        nn = st.nn
        # entries of another shape-model version, layout or size are never used again:
        # drop them at once instead of letting them hold memory until evicted
        gen = (key[-1], st.layout, nn)
        if gen != self._best_gen:
            self._best_gen = gen
            self._best.clear()
        key = (key, st.layout, nn)
        ent = self._best.pop(key, None)  # re-inserted last: the dict's order is recency
        if ent is None:
            ent = _Best(np.full(nn, -np.inf), np.zeros(nn), np.full(nn, -1, dtype=np.int32), -1)
            # 20 bytes per node and kind: at most _BEST_BYTES in all (16 kinds at least)
            cap = max(16, min(_BEST_MAX, _BEST_BYTES // (20 * max(nn, 1))))
            while len(self._best) >= cap:
                del self._best[next(iter(self._best))]  # least recently used first
        self._best[key] = ent
        nver = st.n_ver[:nn]
        now = int(nver.max(initial=-1))
        stale_all = np.flatnonzero(nver > ent.synced)
        # one node per distinct state (see _refresh), its best card copied to the others
        # at the same offset within their node
        todo, inv = (
            self._node_groups(st, stale_all, feasible if k else None)
            if self._grouped(len(stale_all), nn)
            else (stale_all, None)
        )
        ent.score[todo] = -np.inf
        for lo in range(0, len(todo), _CHUNK_NODES):  # in slices: see _refresh
            stale = todo[lo : lo + _CHUNK_NODES]
            rows, pos = self._candidates(st, k, feasible, stale)
            if len(rows):
                score, left, cleft = self._score(st, shapes, p, type_ok, ask, k, cpu, rows, pos)
                # per node the best card: highest score, least left, lowest position
                order = np.lexsort((pos, cleft, left, -score, rows))
                r = rows[order]
                first = np.ones(len(r), dtype=bool)
                first[1:] = r[1:] != r[:-1]
                pick = order[first]
                ent.score[rows[pick]] = score[pick]
                ent.left[rows[pick]] = left[pick]
                ent.pos[rows[pick]] = pos[pick]
        if inv is not None:
            src = todo[inv]
            ent.score[stale_all] = ent.score[src]
            ent.left[stale_all] = ent.left[src]
            rp = ent.pos[src]  # -1: no card (CPU-only requests, or none feasible)
            ent.pos[stale_all] = np.where(rp >= 0, rp - st.n_start[src] + st.n_start[stale_all], -1)
        ent.synced = now
        sc = ent.score[cands]
        if len(sc) == 0 or sc.max() == -np.inf:
            return None
        sel = cands[sc > -np.inf]
        if self.variant.model_aware == "first":
            pr = self.pressure[sel]
            sel = sel[pr == pr.min()]
        sc = ent.score[sel]
        mx = sc.max()
        sel = sel[sc == mx]
        if len(sel) > 1 and self.variant.model_aware == "tie":
            # the same second key as _choose_all: pressure right after the score
            pr = self.pressure[sel]
            sel = sel[pr == pr.min()]
        if len(sel) > 1:
            lf = ent.left[sel]
            sel = sel[lf == lf.min()]
        row = int(sel[np.argmin(st.n_rank[sel])]) if len(sel) > 1 else int(sel[0])
        return row, int(ent.pos[row]), float(mx)


def _cluster(rng: np.random.Generator) -> ClusterState:
    models = (("NVIDIA-T4", 15360), ("NVIDIA-A10", 24576), ("NVIDIA-A100", 81920))
    invs = []
    for n in range(40):
        model, mem = models[int(rng.integers(len(models)))]
        invs.append(
            node(
                f"n{n:02d}",
                int(rng.choice([1, 2, 4, 8])),
                mem,
                dev={"type": model, "count": int(rng.choice([1, 4, 10]))},
                cpu_milli=int(rng.choice([0, 32000, 64000])),
                memory_mib=1 << 20,
            )
        )
    return cluster(*invs)


def _request(rng: np.random.Generator) -> AllocRequested:
    cpu = int(rng.choice([0, 1000, 4000, 16000]))
    types = [] if rng.random() < 0.85 else [str(rng.choice(["T4", "A10", "A100"]))]
    kind = int(rng.integers(5))
    if kind == 0:
        ask = DeviceAsk(
            nums=1, mem=int(rng.choice([2048, 4096, 12288])), cores=int(rng.choice([0, 10, 30, 50]))
        )
    elif kind == 1:
        pct = int(rng.choice([10, 25, 50]))
        ask = DeviceAsk(nums=1, mem_percent=pct, cores=pct)
    elif kind == 2:
        ask = DeviceAsk(nums=int(rng.choice([1, 1, 2, 4])), cores=100)
    elif kind == 3:
        return req(cpu=cpu)
    else:
        ask = DeviceAsk(nums=1, mem=int(rng.choice([1024, 8192])), cores=int(rng.choice([20, 100])))
    return req(ask, cpu=cpu, use_types=types)


def _lockstep(
    a: Placer,
    b: Placer,
    a_cl: ClusterState,
    b_cl: ClusterState,
    rng: np.random.Generator,
    steps: int,
    after: Callable[[int], None] | None = None,
) -> int:
    """Drive two placers over two equal clusters with the same releases, health flips
    and requests; every decision (node, cards, score) must be the same. ``after(i)``:
    further checks after each decision. Returns how many requests were placed."""
    live: list[tuple[str, str]] = []
    placed = 0
    for i in range(steps):
        r = rng.random()
        if r < 0.25 and live:
            nd, uid = live.pop(int(rng.integers(len(live))))
            a_cl.unreserve(nd, uid)
            b_cl.unreserve(nd, uid)
            continue
        if r < 0.27:
            name, ok = f"n{int(rng.integers(40)):02d}", bool(rng.random() < 0.8)
            a_cl.set_health(name, ok)
            b_cl.set_health(name, ok)
            continue
        rq = _request(rng)
        a.observe(rq)
        b.observe(rq)
        x, y = a.decide(rq), b.decide(rq)
        assert type(x) is type(y), i
        if isinstance(x, Placement):
            assert isinstance(y, Placement)
            assert (x.node, x.containers, x.score) == (y.node, y.containers, y.score), i
            a_cl.reserve(x.node, x.to_alloc(rq))
            b_cl.reserve(y.node, y.to_alloc(rq))
            live.append((x.node, rq.uid))
            placed += 1
        if after is not None:
            after(i)
    return placed


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("policy", ["frag", "fgd"])
def test_fast_scorer_decides_as_the_reference(policy: str, grouped: bool) -> None:
    rng = np.random.default_rng(20)
    fast_cl, ref_cl = _cluster(np.random.default_rng(5)), _cluster(np.random.default_rng(5))
    fast, ref = placer(fast_cl, node_policy=policy), placer(ref_cl, node_policy=policy)
    ref._frag[policy] = RefScorer(policy)
    if grouped:  # equal states scored once at every call (the fast scorer's copy paths)
        fast._frag[policy] = FragScorer(policy)
        fast._frag[policy].group_min = 0
        fast._frag[policy].group_share = 0.0
    placed = _lockstep(fast, ref, fast_cl, ref_cl, rng, 1500)
    assert placed > 500  # the workload placed, released and refused pods
    assert isinstance(fast._frag[policy], FragScorer) and type(ref._frag[policy]) is RefScorer


class _Unfused(FragScorer):
    """The fast scorer with the changed nodes' refresh always made on its own."""

    def _refresh(
        self,
        st: ClusterState,
        shapes: list[Shape],
        version: int,
        p: _F64 | None = None,
        model: ShapeModel | None = None,
    ) -> BOOL:
        self._defer = False
        return super()._refresh(st, shapes, version, p, model)


class _Counting(FragScorer):
    """The fast scorer, counting the scores that took a deferred refresh along."""

    fused = 0

    def _score(
        self,
        st: ClusterState,
        shapes: list[Shape],
        p: _F64,
        type_ok: BOOL,
        ask: object | None,
        k: int,
        cpu: int,
        rows: _I64,
        pos: _I64,
    ) -> tuple[_F64, _F64, _F64]:
        self.fused += self._pending is not None
        return super()._score(st, shapes, p, type_ok, ask, k, cpu, rows, pos)


@pytest.mark.parametrize("seed", [20, 21])
@pytest.mark.parametrize("policy", ["frag", "fgd"])
def test_refresh_folded_into_the_score_decides_the_same(policy: str, seed: int) -> None:
    """The refresh made in the kind's scoring pass gives the same aggregates, cards and
    scores as the refresh on its own (both compared with the reference above too)."""
    rng = np.random.default_rng(seed)
    a_cl, b_cl = (
        _cluster(np.random.default_rng(seed + 1)),
        _cluster(np.random.default_rng(seed + 1)),
    )
    a, b = placer(a_cl, node_policy=policy), placer(b_cl, node_policy=policy)
    fused = a._frag[policy] = _Counting(policy)
    b._frag[policy] = _Unfused(policy)

    def aggregates_agree(i: int) -> None:
        fs, us = a._frag[policy], b._frag[policy]
        # the aggregates agree wherever both scorers are up to date
        both = np.flatnonzero((fs._ver == us._ver) & (fs._ver == a_cl.n_ver[: a_cl.nn]))
        assert np.array_equal(fs.cnt[both], us.cnt[both]), i
        assert np.array_equal(fs.small[both], us.small[both]), i
        assert np.array_equal(fs.fb[both], us.fb[both]), i

    _lockstep(a, b, a_cl, b_cl, rng, 1200, after=aggregates_agree)
    assert fused.fused > 300  # the folded path is the usual one
