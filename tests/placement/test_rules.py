"""Table-driven tests of the placement rules (REFERENCE §1-3), one small cluster each."""

from __future__ import annotations

import pytest

from services.placement.engine import Failure, Placement
from shared.schemas import DeviceAsk, NodeInventory

from .util import cards_of, cluster, fail, node, place, placer, req

# ------------------------------------------------------------------ card requests


@pytest.mark.parametrize(
    ("ask", "want"),
    [
        # (ask, [(mem, cores) per granted card])
        (DeviceAsk(nums=1, mem=3000, cores=20), [(3000, 20)]),
        (DeviceAsk(nums=2, mem=1000, cores=5), [(1000, 5), (1000, 5)]),
        (DeviceAsk(nums=1, mem_percent=25, cores=10), [(2500, 10)]),
        (DeviceAsk(nums=1, mem_percent=250, cores=10), [(10000, 10)]),  # >100 % clamps
        (DeviceAsk(nums=1), [(10000, 100)]),  # no memory: the whole card, exclusive
        (DeviceAsk(nums=1, mem_percent=100), [(10000, 100)]),
        (DeviceAsk(nums=1, cores=40), [(10000, 40)]),  # whole memory, shared compute
        (DeviceAsk(nums=1, mem=500, cores=250), [(500, 100)]),  # cores clamp to 100
    ],
)
def test_request_resolution(ask: DeviceAsk, want: list[tuple[int, int]]) -> None:
    p = placer(cluster(node("a", cards=2)))
    got = place(p, req(ask))
    assert [(mem, cores) for _, mem, cores in cards_of(got)] == want
    assert len({u for u, _, _ in cards_of(got)}) == len(want)  # distinct cards


def test_percentage_resolves_per_card() -> None:
    inv = NodeInventory(node="a", devices=[node("a", 1, 8000).devices[0]])
    big = node("b", 1, 40000)
    p = placer(cluster(inv, big), node_policy="spread")
    one = place(p, req(DeviceAsk(nums=1, mem_percent=50, cores=10)))
    two = place(p, req(DeviceAsk(nums=1, mem_percent=50, cores=10)))
    assert sorted(c[1] for c in cards_of(one) + cards_of(two)) == [4000, 20000]


@pytest.mark.parametrize(
    ("prior", "ask", "reason"),
    [
        ([DeviceAsk(mem=8000, cores=10)], DeviceAsk(mem=3000, cores=10), "CardInsufficientMemory"),
        ([DeviceAsk(mem=1000, cores=80)], DeviceAsk(mem=1000, cores=30), "CardInsufficientCore"),
        ([DeviceAsk(mem=1000, cores=0)], DeviceAsk(mem=1000, cores=100), "ExclusiveDeviceAllocateConflict"),
        ([DeviceAsk(mem=1000, cores=10)], DeviceAsk(mem=1000, cores=100), "CardInsufficientCore"),
        ([DeviceAsk(mem=1000, cores=100)], DeviceAsk(mem=1000, cores=0), "ExclusiveDeviceAllocateConflict"),
        ([DeviceAsk(mem=1000, cores=1)] * 3, DeviceAsk(mem=1000, cores=1), "CardTimeSlicingExhausted"),
        ([], DeviceAsk(nums=2, mem=1000), "NodeInsufficientDevice"),
    ],
)
def test_card_reasons(prior: list[DeviceAsk], ask: DeviceAsk, reason: str) -> None:
    # two one-card nodes with 3 slots each; the prior asks fill both the same way
    p = placer(cluster(node("a", 1, dev={"count": 3}), node("b", 1, dev={"count": 3})))
    for ap in prior:
        for name in ("a", "b"):
            place(p, req(ap, node_name=name))
    f = fail(p, req(ask))
    assert f.reasons == {reason: 2}
    assert f.nodes_total == 2
    assert f.message == f"0/2 nodes are available: 2 {reason}"


def test_zero_core_ask_fits_beside_partial_cores() -> None:
    p = placer(cluster(node("a", 1)))
    place(p, req(DeviceAsk(mem=1000, cores=60)))
    assert isinstance(p.decide(req(DeviceAsk(mem=1000, cores=0))), Placement)


def test_reasons_count_per_node_and_unregistered() -> None:
    cl = cluster(node("full", 1), node("small", 1, mem=2000), NodeInventory(node="cpuonly"))
    p = placer(cl)
    place(p, req(DeviceAsk(mem=9000, cores=10), node_name="full"))
    f = fail(p, req(DeviceAsk(mem=5000, cores=10)))
    assert f.reasons == {"CardInsufficientMemory": 2, "node unregistered": 1}
    assert f.message == "0/3 nodes are available: 2 CardInsufficientMemory, 1 node unregistered"


def test_unhealthy_node_and_card() -> None:
    cl = cluster(node("a", 1), node("b", 1, dev={"health": False}))
    p = placer(cl)
    cl.set_health("a", False)
    f = fail(p, req(DeviceAsk(mem=100, cores=1)))
    assert f.reasons == {"node unregistered": 1, "CardNotHealth": 1}
    cl.set_health("a", True)
    assert place(p, req(DeviceAsk(mem=100, cores=1))).node == "a"


# ----------------------------------------------------------------- node and card policy


def _fill(p, node_name: str, mem: int) -> None:  # type: ignore[no-untyped-def]
    place(p, req(DeviceAsk(mem=mem, cores=1), node_name=node_name))


@pytest.mark.parametrize(
    ("setting", "override", "want"),
    [
        ("binpack", None, "b"),  # default binpack: the fuller node
        ("spread", None, "a"),
        ("binpack", "spread", "a"),  # per-request override wins
        ("spread", "binpack", "b"),
    ],
)
def test_node_policy(setting: str, override: str | None, want: str) -> None:
    p = placer(cluster(node("a"), node("b"), node("c")), node_policy=setting)
    _fill(p, "b", 6000)
    _fill(p, "c", 2000)
    _fill(p, "c", 2000)
    _fill(p, "a", 500)
    got = place(p, req(DeviceAsk(mem=1000, cores=1), node_policy=override))
    assert got.node == want


@pytest.mark.parametrize(
    ("setting", "override", "want_card"),
    [
        ("spread", None, "GPU-a-0"),  # the emptier card
        ("binpack", None, "GPU-a-1"),  # the fuller card
        ("spread", "binpack", "GPU-a-1"),
        ("binpack", "spread", "GPU-a-0"),
    ],
)
def test_card_policy(setting: str, override: str | None, want_card: str) -> None:
    p = placer(cluster(node("a", 3)), gpu_policy=setting)
    place(p, req(DeviceAsk(mem=5000, cores=10), use_uuids=["GPU-a-1"]))
    place(p, req(DeviceAsk(mem=1000, cores=10), use_uuids=["GPU-a-2"]))
    place(p, req(DeviceAsk(mem=500, cores=10), use_uuids=["GPU-a-2"]))
    place(p, req(DeviceAsk(mem=500, cores=10), use_uuids=["GPU-a-0"]))
    got = place(p, req(DeviceAsk(mem=1000, cores=10), gpu_policy=override))
    assert cards_of(got)[0][0] == want_card


def test_ties_break_by_node_name_and_card_index() -> None:
    for pol in ("binpack", "spread"):
        p = placer(cluster(node("z"), node("m"), node("b")), node_policy=pol, gpu_policy=pol)
        got = p.decide(req(DeviceAsk(mem=100, cores=1)))
        assert isinstance(got, Placement)
        assert (got.node, cards_of(got)[0][0]) == ("b", "GPU-b-0")


def test_decide_is_pure() -> None:
    cl = cluster(node("a", 1))
    p = placer(cl)
    before = cl.status()
    for _ in range(3):
        assert isinstance(p.decide(req(DeviceAsk(mem=9000, cores=90))), Placement)
    assert cl.status() == before


# ------------------------------------------------------------------- state bookkeeping


def test_reserve_unreserve_idempotent_and_ledger() -> None:
    cl = cluster(node("a", 1))
    p = placer(cl)
    r = req(DeviceAsk(mem=4000, cores=30), cpu=100)
    got = p.decide(r)
    assert isinstance(got, Placement)
    alloc = got.to_alloc(r)
    cl.reserve("a", alloc)
    cl.reserve("a", alloc)
    card = cl.status().nodes[0].cards[0]
    assert (card.used_mem, card.used_cores, card.used_slots) == (4000, 30, 1)
    assert list(cl.ledger("a").allocs) == [r.uid]
    cl.unreserve("a", r.uid)
    cl.unreserve("a", r.uid)
    card = cl.status().nodes[0].cards[0]
    assert (card.used_mem, card.used_cores, card.used_slots) == (0, 0, 0)


def test_set_ledger_is_authoritative_and_survives_reinventory() -> None:
    cl = cluster(node("a", 2))
    p = placer(cl)
    r1, r2 = req(DeviceAsk(mem=1000, cores=10)), req(DeviceAsk(mem=2000, cores=10))
    g1, g2 = p.decide(r1), p.decide(r2)
    assert isinstance(g1, Placement) and isinstance(g2, Placement)
    cl.reserve("a", g1.to_alloc(r1))
    ledger = cl.ledger("a")
    ledger.allocs = {r2.uid: g2.to_alloc(r2)}
    cl.set_ledger("a", ledger)
    assert list(cl.ledger("a").allocs) == [r2.uid]
    assert sum(c.used_mem for c in cl.status().nodes[0].cards) == 2000
    # the inventory is republished with one card gone: reservations on it stop counting
    uuid = cards_of(g2)[0][0]
    kept = [d for d in node("a", 2).devices if d.uuid == uuid]
    cl.upsert_node(NodeInventory(node="a", devices=kept))
    assert [c.used_mem for c in cl.status().nodes[0].cards] == [2000]
    cl.set_ledger("a", None)
    assert [c.used_mem for c in cl.status().nodes[0].cards] == [0]


def test_ledger_before_inventory_is_applied_on_arrival() -> None:
    cl = cluster(node("a", 1))
    p = placer(cl)
    r = req(DeviceAsk(mem=1000, cores=10))
    got = p.decide(r)
    assert isinstance(got, Placement)
    cl.remove_node("a")
    cl.reserve("a", got.to_alloc(r))
    cl.upsert_node(node("a", 1))
    assert cl.status().nodes[0].cards[0].used_mem == 1000


def test_failure_is_failure_type() -> None:
    assert isinstance(placer(cluster()).decide(req(DeviceAsk(mem=1))), Failure)
