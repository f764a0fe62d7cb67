"""Victim selection for preemption (services/placement/engine/preempt.py).

Table cases for the rules (lower priority first, then fewer victims, then the youngest;
never a victim of priority >= the request's; never a set that does not make room; the
request's own constraints hold), and a property test on random small clusters against
a brute force over every subset of every node's eligible allocations.
"""

from __future__ import annotations

import itertools
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.placement.engine import ClusterState, Failure, Placement, Placer
from services.placement.engine.preempt import Key, choose, victims_on_node
from shared.schemas import AllocRequested, CardGrant, ContainerGrant, DeviceAsk, LedgerAlloc

from .util import cluster, node, placer, req


def hold(p: Placer, r: AllocRequested, prio: int, at: float, source: str = "cli") -> LedgerAlloc:
    """Place ``r`` and reserve it with a scheduling priority and a decision time."""
    got = p.decide(r)
    assert isinstance(got, Placement), got
    alloc = msgspec.structs.replace(got.to_alloc(r, at), pod_priority=prio, source=source)
    p.cluster.reserve(got.node, alloc)
    return alloc


def snapshot(cl: ClusterState) -> bytes:
    """Use, reservations and ledgers (their order aside, which nothing depends on)."""
    out = [cl.status(), [cl.ledger(n) for n in sorted(cl.nodes)]]
    return msgspec.json.encode(out, order="sorted")


def fits_after(p: Placer, r: AllocRequested, node_name: str, uids: list[str]) -> bool:
    """Independent check: drop ``uids`` from the node, ask the engine, put them back."""
    cl = p.cluster
    saved = [cl.ledger(node_name).allocs[u] for u in uids]
    for a in saved:
        cl.unreserve(node_name, a.uid)
    try:
        only = msgspec.structs.replace(
            r, constraints=msgspec.structs.replace(r.constraints, nodes=[node_name])
        )
        got = p.decide(only, explain=False)
        return isinstance(got, Placement)
    finally:
        for a in saved:
            cl.reserve(node_name, a)


def mem(n: int, cores: int = 0, nums: int = 1) -> DeviceAsk:
    return DeviceAsk(nums=nums, mem=n, cores=cores)


# ------------------------------------------------------------------------ table cases


def test_youngest_of_equals_is_chosen_and_state_is_unchanged() -> None:
    p = placer(cluster(node("n1", cards=2, mem=10000)))
    olds = [hold(p, req(mem(5000)), 0, at=float(i)) for i in range(4)]
    assert isinstance(p.decide(req(mem(5000))), Failure)  # full
    before = snapshot(p.cluster)
    got = choose(p, req(mem(5000)), 10)
    assert got is not None
    assert got.uids == [olds[3].uid]  # the youngest (decided last)
    assert got.node == "n1" and got.exact
    assert snapshot(p.cluster) == before


def test_lower_priority_wins_over_fewer_victims() -> None:
    p = placer(cluster(node("n1", cards=1, mem=10000)))
    small = [hold(p, req(mem(2500)), 0, at=1.0) for _ in range(2)]
    hold(p, req(mem(5000)), 5, at=2.0)
    got = choose(p, req(mem(5000)), 10)
    assert got is not None
    assert sorted(got.uids) == sorted(a.uid for a in small)
    assert got.key[:2] == (0, 2)


def test_fewer_victims_among_the_same_priority() -> None:
    p = placer(cluster(node("n1", cards=2, mem=10000)), gpu_policy="binpack")
    # card 0: two 5000 MiB; card 1: one 10000 MiB, all priority 1
    a = [hold(p, req(mem(5000)), 1, at=5.0 + i) for i in range(2)]
    big = hold(p, req(mem(10000)), 1, at=1.0)
    assert {x.containers[0].devices[0].uuid for x in a} != {big.containers[0].devices[0].uuid}
    got = choose(p, req(mem(10000)), 2)
    assert got is not None
    assert got.uids == [big.uid]  # one victim, although older than the other two


def test_youngest_means_the_oldest_victim_is_the_most_recent() -> None:
    p = placer(cluster(node("n1", cards=2, mem=10000)), gpu_policy="binpack")
    on0 = [hold(p, req(mem(5000), use_uuids=["GPU-n1-0"]), 0, at=t) for t in (1.0, 10.0)]
    on1 = [hold(p, req(mem(5000), use_uuids=["GPU-n1-1"]), 0, at=t) for t in (5.0, 6.0)]
    got = choose(p, req(mem(8000)), 1)
    assert got is not None
    # card 1's pair is younger as a set (its oldest came at 5, card 0's at 1), although
    # card 0 holds the single youngest allocation
    assert sorted(got.uids) == sorted(a.uid for a in on1)
    assert not set(got.uids) & {a.uid for a in on0}


def test_never_a_victim_of_equal_or_higher_priority() -> None:
    p = placer(cluster(node("n1", cards=1, mem=10000)))
    hold(p, req(mem(10000)), 10, at=1.0)
    assert choose(p, req(mem(5000)), 10) is None
    assert choose(p, req(mem(5000)), 9) is None
    assert choose(p, req(mem(5000)), 11) is not None


def test_no_preemption_for_a_request_that_would_not_fit() -> None:
    p = placer(cluster(node("n1", cards=2, mem=10000)))
    hold(p, req(mem(4000)), 0, at=1.0)
    before = snapshot(p.cluster)
    assert choose(p, req(mem(20000)), 10) is None  # larger than any card
    assert choose(p, req(mem(5000, nums=3)), 10) is None  # more cards than the node has
    assert snapshot(p.cluster) == before


def test_whole_card_ask_needs_an_idle_card() -> None:
    p = placer(cluster(node("n1", cards=2, mem=10000)), gpu_policy="binpack")
    # card 0: three 1000 MiB of 10 % cores each; card 1: one 8000 MiB
    tiny = [hold(p, req(mem(1000, cores=10)), 0, at=10.0 + i) for i in range(3)]
    big = hold(p, req(mem(8000, cores=10)), 0, at=1.0)
    assert len({x.containers[0].devices[0].uuid for x in tiny}) == 1
    whole = req(DeviceAsk(nums=1, cores=100))  # a bare --gpus 1: a whole, exclusive card
    got = choose(p, whole, 5)
    assert got is not None
    assert got.uids == [big.uid]
    assert fits_after(p, whole, "n1", got.uids)
    assert not fits_after(p, whole, "n1", [tiny[0].uid, tiny[1].uid])


def test_multi_card_ask_frees_cards_on_one_node() -> None:
    p = placer(
        cluster(node("n1", cards=2, mem=10000), node("n2", cards=2, mem=10000)),
        node_policy="spread",
    )
    allocs = [hold(p, req(mem(10000)), 0, at=float(i)) for i in range(4)]
    assert len({p.cluster.ledger(n).allocs.__len__() for n in ("n1", "n2")}) == 1  # 2 + 2
    got = choose(p, req(mem(6000, nums=2)), 3)
    assert got is not None
    assert len(got.uids) == 2
    assert set(got.uids) <= set(p.cluster.ledger(got.node).allocs)  # both on the chosen node
    assert set(got.uids) <= {a.uid for a in allocs}
    assert fits_after(p, req(mem(6000, nums=2)), got.node, got.uids)


def test_type_constraint_restricts_the_nodes() -> None:
    cl = cluster(
        node("a100", cards=1, mem=10000),
        node("h100", cards=1, mem=10000, dev={"type": "NVIDIA-H100"}),
    )
    p = placer(cl)
    hold(p, req(mem(10000), node_name="a100"), 0, at=1.0)
    on_h100 = hold(p, req(mem(10000), node_name="h100"), 3, at=1.0)
    got = choose(p, req(mem(5000), use_types=["H100"]), 5)
    assert got is not None
    assert got.node == "h100" and got.uids == [on_h100.uid]  # the cheaper a100 victim does not help


def test_priority_of_none_is_not_preemptible() -> None:
    p = placer(cluster(node("n1", cards=1, mem=10000)))
    hold(p, req(mem(10000)), 0, at=1.0, source="kube")
    standalone_only = lambda a: None if a.source == "kube" else a.pod_priority  # noqa: E731
    assert choose(p, req(mem(5000)), 10, priority_of=standalone_only) is None
    assert choose(p, req(mem(5000)), 10) is not None


def test_allowed_narrows_the_victims() -> None:
    p = placer(cluster(node("n1", cards=1, mem=10000)))
    a = hold(p, req(mem(5000)), 0, at=1.0)
    b = hold(p, req(mem(5000)), 0, at=2.0)
    got = victims_on_node(p, req(mem(5000)), "n1", 10, allowed=lambda x: x.uid == a.uid)
    assert got is not None and got.uids == [a.uid]
    assert victims_on_node(p, req(mem(5000)), "n1", 10, allowed=lambda x: False) is None
    assert choose(p, req(mem(5000)), 10) is not None and b.uid in choose(p, req(mem(5000)), 10).uids  # type: ignore[union-attr]


def test_budget_exhausted_still_gives_a_valid_minimal_set() -> None:
    # two cards of six 1000 MiB each, spread so that the youngest alternate cards
    p = placer(cluster(node("n1", cards=2, mem=6000, dev={"count": 12})), gpu_policy="spread")
    allocs = [hold(p, req(mem(1000)), 0, at=float(i)) for i in range(12)]
    big = req(mem(4000))
    exact = choose(p, big, 10)
    cheap = choose(p, big, 10, budget=3)
    assert exact is not None and cheap is not None
    assert exact.exact and not cheap.exact
    assert fits_after(p, big, "n1", cheap.uids)
    for u in cheap.uids:  # minimal: none of them could be spared
        assert not fits_after(p, big, "n1", [x for x in cheap.uids if x != u])
    assert exact.key <= cheap.key
    # four on one card, the youngest such four
    card = {a.uid: a.containers[0].devices[0].uuid for a in allocs}
    assert len(exact.uids) == 4 and len({card[u] for u in exact.uids}) == 1
    same = [a for a in allocs if card[a.uid] == card[exact.uids[0]]]
    assert sorted(exact.uids) == sorted(
        a.uid for a in sorted(same, key=lambda a: -a.decided_at)[:4]
    )


# ---------------------------------------------------------------------- property test


def _random_case(seed: int) -> tuple[Placer, AllocRequested, int]:
    rng = random.Random(seed)
    invs = [
        node(
            f"n{i}",
            cards=rng.randint(1, 3),
            mem=rng.choice([8000, 16000]),
            dev={"count": rng.choice([2, 4])},
        )
        for i in range(rng.randint(1, 3))
    ]
    p = placer(
        cluster(*invs),
        node_policy=rng.choice(["binpack", "spread", "frag"]),
        gpu_policy=rng.choice(["binpack", "spread"]),
    )
    for _ in range(rng.randint(2, 10)):
        r = req(mem(rng.choice([1000, 2000, 4000, 6000, 8000]), cores=rng.choice([0, 10, 30, 50])))
        got = p.decide(r)
        if not isinstance(got, Placement):
            continue
        if len(p.cluster.ledger(got.node).allocs) >= 5:  # keep the brute force small
            continue
        alloc = msgspec.structs.replace(
            got.to_alloc(r, float(rng.randint(0, 50))), pod_priority=rng.randint(0, 3)
        )
        p.cluster.reserve(got.node, alloc)
    nums = rng.choice([1, 1, 1, 2])
    ask = (
        DeviceAsk(nums=nums, cores=100)
        if rng.random() < 0.2
        else mem(rng.choice([2000, 6000, 8000, 12000]), rng.choice([0, 30, 60]), nums)
    )
    return p, req(ask), rng.randint(0, 4)


def _spec_key(allocs: list[LedgerAlloc], node_name: str) -> Key:
    """The order the rules state, written out again (not the module's own function):
    lower highest priority, fewer victims, lower sum, younger oldest victim, node."""
    prios = [a.pod_priority for a in allocs]
    return (max(prios), len(allocs), sum(prios), -min(a.decided_at for a in allocs), node_name)


def _brute(p: Placer, r: AllocRequested, prio: int) -> Key | None:
    best: Key | None = None
    for name in p.cluster.nodes:
        allocs = [a for a in p.cluster.ledger(name).allocs.values() if a.pod_priority < prio]
        for k in range(1, len(allocs) + 1):
            for combo in itertools.combinations(allocs, k):
                key = _spec_key(list(combo), name)
                if best is not None and key >= best:
                    continue
                if fits_after(p, r, name, [a.uid for a in combo]):
                    best = key
    return best


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 2**31))
def test_chosen_victims_are_the_best_set_that_makes_room(seed: int) -> None:
    p, r, prio = _random_case(seed)
    if isinstance(p.decide(r, explain=False), Placement):
        return  # fits without preempting anyone: not a case for preemption
    before = snapshot(p.cluster)
    got = choose(p, r, prio)
    assert snapshot(p.cluster) == before  # the simulation left the state as it was
    want = _brute(p, r, prio)
    if want is None:
        assert got is None
        return
    assert got is not None
    led = p.cluster.ledger(got.node).allocs
    assert all(led[u].pod_priority < prio for u in got.uids)
    assert _spec_key([led[u] for u in got.uids], got.node) == want, (got.uids, got.key, want)
    # release them for real and place: the request fits and no card is over capacity
    for u in got.uids:
        p.cluster.unreserve(got.node, u)
    placed = p.decide(r)
    assert isinstance(placed, Placement) and placed.node == got.node
    p.cluster.reserve(placed.node, placed.to_alloc(r))
    for n in p.cluster.status().nodes:
        for c in n.cards:
            assert (
                c.used_mem <= c.total_mem
                and c.used_cores <= c.total_cores
                and c.used_slots <= c.total_slots
            )


@pytest.mark.parametrize("seed", range(2))
def test_five_thousand_full_nodes_answer(seed: int) -> None:
    """The search stays bounded on a large full cluster (no timing asserted: the
    bounds must prune all but a few nodes, which the engine-call count shows)."""
    rng = random.Random(seed)
    p = placer(
        cluster(*(node(f"n{i:04d}", cards=4, mem=16000) for i in range(5000))),
        node_policy="binpack",
    )
    for name in p.cluster.nodes:
        for c in range(4):
            for _ in range(2):
                grant = CardGrant(
                    uuid=f"GPU-{name}-{c}", index=c, type="NVIDIA-A100", mem=8000, cores=50
                )
                a = LedgerAlloc(
                    uid=f"{name}-{c}-{_}",
                    name="x",
                    containers=[ContainerGrant(name="main", devices=[grant])],
                    decided_at=float(rng.randint(0, 1000)),
                    pod_priority=rng.randint(0, 3),
                )
                p.cluster.reserve(name, a)
    r = req(mem(12000, cores=60))
    got = choose(p, r, 5)
    assert got is not None
    assert got.key[0] == 0 and got.key[1] == 2  # two priority-0 halves of one card
    assert got.searched <= 10
