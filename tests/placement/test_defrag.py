"""The consolidation planner (services/placement/engine/defrag.py).

Random small clusters, each checked against a brute force written separately: every
sequence of up to ``max_moves`` moves of any movable allocation to any card of its model
with room (an allocation may move more than once there). The plan frees as many cards
as the best sequence does, reaches a slice's fit in as few moves, never over-fills a
card at any step and never moves what is not movable.
"""

from __future__ import annotations

import random

import pytest

from services.placement.engine import defrag as d
from shared.schemas import (
    CardGrant,
    CardStatus,
    ClusterStatus,
    ContainerGrant,
    LedgerAlloc,
    NodeStatus,
)

CAP = d.Card(node="", uuid="", type="A100", mem=100, cores=100, slots=3)


def cluster(rng: random.Random) -> tuple[list[d.Card], list[d.Holding]]:
    nodes = rng.choice([1, 2])
    per = rng.choice([2, 3]) if nodes == 2 else rng.choice([3, 4])
    cards = [
        d.Card(node=f"n{n}", uuid=f"n{n}c{i}", type=CAP.type, mem=CAP.mem, cores=CAP.cores,
               slots=CAP.slots)
        for n in range(nodes) for i in range(per)
    ]
    used = {c.uuid: [0, 0, 0, 0] for c in cards}  # mem, cores, slots, exclusive
    holdings = []
    for k in range(rng.randint(2, 6)):
        mem, cores = rng.choice([10, 20, 30, 40, 60]), rng.choice([0, 10, 25, 50, 100])
        ok = [c for c in cards if fits(c, used[c.uuid], mem, cores)]
        if not ok:
            continue
        c = rng.choice(ok)
        u = used[c.uuid]
        u[0] += mem
        u[1] += cores
        u[2] += 1
        u[3] += cores >= c.cores
        holdings.append(d.Holding(uid=f"h{k}", node=c.node, grants=(d.Grant(c.uuid, mem, cores),),
                                  movable=rng.random() < 0.75))
    return cards, holdings


def fits(c: d.Card, u: list[int], mem: int, cores: int) -> bool:
    if u[3] or (cores >= c.cores and u[2]):
        return False
    return u[0] + mem <= c.mem and u[1] + cores <= c.cores and u[2] < c.slots


def brute(cards: list[d.Card], holdings: list[d.Holding], k: int,
          need: tuple[int, int] | None) -> tuple[int, int | None]:
    """(most free cards, fewest moves to fit ``need`` or None) over all move sequences."""
    by = {c.uuid: c for c in cards}
    start = {h.uid: h.grants[0].uuid for h in holdings}
    hs = {h.uid: h for h in holdings}

    def usage(at: dict[str, str]) -> dict[str, list[int]]:
        u = {c: [0, 0, 0, 0] for c in by}
        for uid, c in at.items():
            g = hs[uid].grants[0]
            u[c][0] += g.mem
            u[c][1] += g.cores
            u[c][2] += 1
            u[c][3] += g.cores >= by[c].cores
        return u

    best_free = 0
    first_fit: int | None = None
    level = [start]
    seen = {tuple(sorted(start.items()))}
    for depth in range(k + 1):
        nxt = []
        for at in level:
            u = usage(at)
            best_free = max(best_free, sum(1 for c in by if u[c][2] == 0))
            if need is not None and first_fit is None and any(fits(by[c], u[c], *need) for c in by):
                first_fit = depth
            if depth == k:
                continue
            for uid, here in at.items():
                if not hs[uid].movable:
                    continue
                g = hs[uid].grants[0]
                u[here][0] -= g.mem
                u[here][1] -= g.cores
                u[here][2] -= 1
                u[here][3] -= g.cores >= by[here].cores
                for c in by:
                    if c != here and fits(by[c], u[c], g.mem, g.cores):
                        new = {**at, uid: c}
                        key = tuple(sorted(new.items()))
                        if key not in seen:
                            seen.add(key)
                            nxt.append(new)
                u[here][0] += g.mem
                u[here][1] += g.cores
                u[here][2] += 1
                u[here][3] += g.cores >= by[here].cores
        level = nxt
    return best_free, first_fit


@pytest.mark.parametrize("seed", range(150))
def test_the_plan_frees_as_many_cards_as_any_sequence_of_moves(seed: int) -> None:
    rng = random.Random(seed)
    cards, holdings = cluster(rng)
    k = rng.randint(0, 3)
    p = d.plan(cards, holdings, max_moves=k)
    assert p.exact
    assert len(p.moves) <= k
    assert d.check(cards, holdings, p.moves) == p.free_after  # valid at every step
    assert all(next(h for h in holdings if h.uid == m.uid).movable for m in p.moves)
    most, _ = brute(cards, holdings, k, None)
    assert p.free_after == most
    assert p.free_after >= p.free_before  # doing nothing is a plan too


@pytest.mark.parametrize("seed", range(150))
def test_the_plan_makes_a_slice_fit_in_the_fewest_moves(seed: int) -> None:
    rng = random.Random(1000 + seed)
    cards, holdings = cluster(rng)
    k = rng.randint(1, 3)
    need = (rng.choice([30, 50, 70, 90]), rng.choice([0, 30, 60, 100]))
    p = d.plan(cards, holdings, max_moves=k, need=need)
    _, fewest = brute(cards, holdings, k, need)
    d.check(cards, holdings, p.moves)
    assert p.fits == (fewest is not None)
    if fewest is not None:
        assert len(p.moves) == fewest


def test_a_non_movable_allocation_stays_and_its_card_is_not_freed() -> None:
    cards = [d.Card(node="n", uuid=f"c{i}", type="A", mem=100, slots=4) for i in range(2)]
    holdings = [
        d.Holding(uid="a", node="n", grants=(d.Grant("c0", 30, 0),), movable=False),
        d.Holding(uid="b", node="n", grants=(d.Grant("c1", 30, 0),), movable=True),
    ]
    p = d.plan(cards, holdings, max_moves=5)
    assert [(m.uid, m.to_cards) for m in p.moves] == [("b", ("c0",))]
    assert p.freed == ["c1"] and (p.free_before, p.free_after) == (0, 1)


def test_moves_never_cross_models_or_land_on_unusable_cards() -> None:
    cards = [
        d.Card(node="n", uuid="a0", type="A", mem=100),
        d.Card(node="n", uuid="b0", type="B", mem=100),
        d.Card(node="n", uuid="a1", type="A", mem=100, usable=False),
    ]
    holdings = [d.Holding(uid="x", node="n", grants=(d.Grant("a0", 10, 0),), movable=True),
                d.Holding(uid="y", node="n", grants=(d.Grant("b0", 10, 0),), movable=True)]
    assert d.plan(cards, holdings, max_moves=3).moves == []


def test_a_two_card_allocation_moves_whole_onto_one_node() -> None:
    cards = [d.Card(node=n, uuid=f"{n}c{i}", type="A", mem=100) for n in ("n0", "n1") for i in range(2)]
    holdings = [
        d.Holding(uid="pair", node="n0", grants=(d.Grant("n0c0", 20, 0), d.Grant("n0c1", 20, 0)), movable=True),
        d.Holding(uid="f0", node="n1", grants=(d.Grant("n1c0", 50, 0),)),
        d.Holding(uid="f1", node="n1", grants=(d.Grant("n1c1", 50, 0),)),
    ]
    p = d.plan(cards, holdings, max_moves=1)
    assert [(m.uid, m.to_node, sorted(m.to_cards)) for m in p.moves] == [("pair", "n1", ["n1c0", "n1c1"])]
    assert sorted(p.freed) == ["n0c0", "n0c1"]


def test_bad_input_is_refused_clearly() -> None:
    cards = [d.Card(node="n", uuid="c0", mem=100)]
    with pytest.raises(d.PlanError, match="unknown card"):
        d.plan(cards, [d.Holding(uid="x", node="n", grants=(d.Grant("zz", 1, 0),))], max_moves=1)
    with pytest.raises(d.PlanError, match="max_moves"):
        d.plan(cards, [], max_moves=-1)
    over = [d.Holding(uid="x", node="n", grants=(d.Grant("c0", 150, 0),))]
    with pytest.raises(d.PlanError, match="over capacity"):
        d.plan(cards, over, max_moves=1)
    ok = [d.Holding(uid="x", node="n", grants=(d.Grant("c0", 10, 0),), movable=False)]
    bad = d.Move(uid="x", name="", namespace="", from_node="n", to_node="n", from_cards=("c0",), to_cards=("c0",))
    with pytest.raises(d.PlanError, match="not movable"):
        d.check(cards, ok, [bad])


def test_from_status_reads_cards_and_movable_holdings() -> None:
    st = ClusterStatus(nodes=[NodeStatus(
        node="n", healthy=True,
        cards=[CardStatus(uuid="c0", index=0, type="A", health=True, used_mem=10, total_mem=100,
                          used_cores=0, total_cores=100, used_slots=1, total_slots=10),
               CardStatus(uuid="c1", index=1, type="A", health=True, used_mem=0, total_mem=100,
                          used_cores=0, total_cores=100, used_slots=0, total_slots=10, cordoned=True)],
        held=[LedgerAlloc(uid="u", name="job", movable=True,
                          containers=[ContainerGrant(devices=[CardGrant(uuid="c0", mem=10, cores=0)])])],
    )])
    cards, holdings = d.from_status(st)
    assert [(c.uuid, c.usable) for c in cards] == [("c0", True), ("c1", False)]
    assert holdings == [d.Holding(uid="u", node="n", grants=(d.Grant("c0", 10, 0),), movable=True, name="job")]


def test_a_pod_is_movable_only_with_the_annotation() -> None:
    from shared.hami.codec import pod_request

    def pod(annotations: dict[str, str]) -> dict[str, object]:
        return {"metadata": {"uid": "u1", "name": "p", "namespace": "ns", "annotations": annotations},
                "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}

    assert pod_request(pod({"hami.io/movable": "true"})).movable
    assert not pod_request(pod({})).movable
    assert not pod_request(pod({"hami.io/movable": "yes"})).movable


def test_on_a_large_cluster_the_plan_stays_valid_and_uses_its_moves() -> None:
    rng = random.Random(7)
    cards = [d.Card(node=f"n{n}", uuid=f"n{n}c{i}", type="A", mem=100, cores=100, slots=10)
             for n in range(20) for i in range(8)]
    holdings = []
    for c in cards:  # every card a third full with one movable slice: each move can free one
        holdings.append(d.Holding(uid=f"h-{c.uuid}", node=c.node, grants=(d.Grant(c.uuid, 30, 30),), movable=True))
    rng.shuffle(holdings)
    p = d.plan(cards, holdings, max_moves=6)
    assert d.check(cards, holdings, p.moves) == p.free_after
    assert (p.free_before, p.free_after, len(p.moves)) == (0, 6, 6)
    assert len(cards) * len(holdings) > d.SMALL  # the large-cluster search was the one used
