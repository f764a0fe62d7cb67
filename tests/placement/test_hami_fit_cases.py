"""HAMi v2.10's fit, scores and reasons, case by case, and the engine against them.

The tables are HAMi's own test cases (``pkg/scheduler/policy/gpu_policy_test.go``:
the device sort and ``ComputeScore`` to the float32; ``pkg/device/nvidia/device_test.go``:
``Fit`` with its reason texts; ``pkg/device/common/common_test.go``: the reason text),
rewritten as tuples for :mod:`services.placement.engine.hami`, plus cases written from
HAMi's source where its tests have none (the walk from the end of the sorted list,
NUMA binding, topology, the node score). The properties then check that the vectorised
engine (``Placer.decide``) grants what the pure fit grants, in the same order, and
reports the same per-node reason text, on random small clusters.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.placement.engine import ClusterState, Failure, Placement, Placer
from services.placement.engine import hami as h
from services.placement.engine import placer as pm
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    CardGrant,
    Constraints,
    ContainerAsk,
    ContainerGrant,
    Device,
    DeviceAsk,
    LedgerAlloc,
    NodeInventory,
)

from .util import cards_of, cluster, fail, node, place, placer, req

# ----------------------------------------------------------- gpu_policy_test.go


def _dev(used: int = 2, usedcores: int = 1, usedmem: int = 2048) -> h.Card:
    return h.Card(
        id="test-device",
        count=10,
        used=used,
        totalmem=8192,
        usedmem=usedmem,
        totalcore=4,
        usedcores=usedcores,
    )


@pytest.mark.parametrize(
    ("requests", "want"),
    [
        ([], 7.0),  # no request: the card as it is
        # a percentage under 100 adds no memory (Totalmem x (pct / 100) in integers)
        (
            [h.Request(1, memreq=1024, mempct=0, coresreq=1), h.Request(2, mempct=50, coresreq=2)],
            18.75,
        ),
        (
            [
                h.Request(1, memreq=1024, mempct=30, coresreq=1),
                h.Request(2, memreq=200, coresreq=3),
            ],
            20.24414,
        ),
        (
            [
                h.Request(1, memreq=1024, mempct=30, coresreq=1),
                h.Request(2, memreq=200, mempct=30, coresreq=3),
            ],
            20.0,
        ),
    ],
)
def test_compute_score(requests: list[h.Request], want: float) -> None:
    assert h.device_score(_dev(), requests) == float(np.float32(want))


@pytest.mark.parametrize(
    ("policy", "a", "b", "less"),
    [
        ("binpack", (0, 10), (0, 20), True),  # same NUMA: lower score first
        ("binpack", (1, 10), (0, 20), True),  # different NUMA: higher NUMA first
        ("binpack", (0, 10), (1, 20), False),
        ("spread", (0, 10), (0, 20), False),  # same NUMA: higher score first
        ("spread", (1, 10), (0, 20), False),  # different NUMA: lower NUMA first
        ("spread", (0, 10), (1, 20), True),
    ],
)
def test_device_sort_less(
    policy: str, a: tuple[int, float], b: tuple[int, float], less: bool
) -> None:
    assert (h.sort_key(policy, a[0], a[1], 0) < h.sort_key(policy, b[0], b[1], 1)) is less


# ---------------------------------------------------------------- device_test.go


def _card(i: int = 0, **kw: object) -> h.Card:
    base: dict[str, object] = dict(id=f"dev-{i}", index=0, count=100, totalmem=1280, totalcore=100)
    base.update(kw)
    return h.Card(**base)  # type: ignore[arg-type]


FIT_CASES = [
    # name, cards, request, filters, picked ids, reason text
    ("fit success: the last of two equal cards", [_card(0, totalmem=128), _card(1, totalmem=128)],
     h.Request(1, memreq=64, mempct=0, coresreq=50), h.Filters(), ["dev-1"], ""),
    ("memory not enough", [_card(totalmem=128)], h.Request(1, memreq=512, mempct=0, coresreq=50), h.Filters(),
     [], "1/1 CardInsufficientMemory"),
    ("core not enough", [_card(totalmem=1024, usedcores=100)], h.Request(1, memreq=512, mempct=0, coresreq=50),
     h.Filters(), [], "1/1 CardInsufficientCore"),
    ("type mismatch", [_card(type="NVIDIA-T4")], h.Request(1, memreq=512, coresreq=50),
     h.Filters(use_types=("A100",)), [], "1/1 CardTypeMismatch"),
    ("use uuid mismatch", [_card(1)], h.Request(2, memreq=512, mempct=0, coresreq=50),
     h.Filters(use_uuids=("dev-0",)), [], "1/1 CardUuidMismatch"),
    ("no-use uuid match", [_card(0)], h.Request(2, memreq=512, mempct=0, coresreq=50),
     h.Filters(nouse_uuids=("dev-0",)), [], "1/1 CardUuidMismatch"),
    ("card overused", [_card(used=100)], h.Request(1, memreq=512, mempct=0, coresreq=50), h.Filters(),
     [], "1/1 CardTimeSlicingExhausted"),
    ("core limit can't exceed 100", [_card()], h.Request(1, memreq=512, mempct=0, coresreq=120), h.Filters(),
     ["dev-0"], ""),
    ("card exclusively", [_card(used=20)], h.Request(1, memreq=512, mempct=0, coresreq=100), h.Filters(),
     [], "1/1 ExclusiveDeviceAllocateConflict"),
    ("CardComputeUnitsExhausted", [_card(used=20, usedcores=100)], h.Request(1, memreq=512, mempct=0, coresreq=0),
     h.Filters(), [], "1/1 CardComputeUnitsExhausted"),
    ("AllocatedCardsInsufficientRequest", [_card(used=20, usedcores=10)],
     h.Request(2, memreq=512, mempct=0, coresreq=20), h.Filters(), [], "1/1 AllocatedCardsInsufficientRequest"),
    ("memory percentage", [_card(used=20, usedcores=10)], h.Request(1, mempct=10, coresreq=20), h.Filters(),
     ["dev-0"], ""),
    ("CardNotHealth", [_card(used=20, usedcores=10, health=False)], h.Request(1, mempct=10, coresreq=20),
     h.Filters(), [], "1/1 CardNotHealth"),
    # from HAMi's source: mutex refuses a used card; exclusive needs exactly 100 cores
    ("mutex", [_card(used=1)], h.Request(1, memreq=10), h.Filters(mutex=True), [],
     "1/1 ExclusiveDeviceAllocateConflict"),
    ("100 cores on a 200-core card is not exclusive", [_card(used=1, totalcore=200)],
     h.Request(1, memreq=10, coresreq=100), h.Filters(), ["dev-0"], ""),
    ("vgpu-mode: the annotation contains the card's mode", [_card(0, mode="mig"), _card(1, mode="hami-core")],
     h.Request(1, memreq=10), h.Filters(vgpu_mode="hami-core,mps"), ["dev-1"], ""),
    ("vgpu-mode mismatch", [_card(0, mode="mig")], h.Request(1, memreq=10), h.Filters(vgpu_mode="hami-core"),
     [], "1/1 CardTypeMismatch"),
    ("every reason, by name", [_card(0, health=False), _card(1, usedmem=1280), _card(2, usedmem=1280), _card(3)],
     h.Request(2, memreq=100), h.Filters(), [],
     "1/4 AllocatedCardsInsufficientRequest, 2/4 CardInsufficientMemory, 1/4 CardNotHealth"),
    ("another vendor's cards are not the fit's", [_card(0, vendor="AMD"), _card(1, totalmem=10)],
     h.Request(1, memreq=100), h.Filters(), [], "1/1 CardInsufficientMemory"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "cards", "request_", "filters", "ids", "text"),
    FIT_CASES,
    ids=[c[0] for c in FIT_CASES],
)
def test_fit(
    name: str,
    cards: list[h.Card],
    request_: h.Request,
    filters: h.Filters,
    ids: list[str],
    text: str,
) -> None:
    got = h.fit(
        cards, range(len(cards))[::-1], request_, filters
    )  # HAMi walks its list from the end
    assert got.ok is bool(ids)
    assert [cards[p].id for p in got.picked] == ids
    assert got.text == text


def test_node_insufficient_device_is_node_level() -> None:
    # fitInDevices: more cards asked than the node has -> the bare reason, no card pass
    got = h.fit_node([_card(0), _card(1)], h.Request(3, memreq=1))
    assert not got.ok and got.text == "NodeInsufficientDevice"


# --------------------------------------------------------------- common_test.go


def test_gen_and_parse_reason() -> None:
    assert h.gen_reason({}, 8) == ""
    assert h.gen_reason({"CardInsufficientMemory": 3}, 8) == "3/8 CardInsufficientMemory"
    text = h.gen_reason(
        {"CardInsufficientMemory": 3, "CardInsufficientCore": 2, "CardNotHealth": 3}, 8
    )
    assert text == "2/8 CardInsufficientCore, 3/8 CardInsufficientMemory, 3/8 CardNotHealth"
    assert h.parse_reason(text) == {
        "CardInsufficientMemory": 3,
        "CardInsufficientCore": 2,
        "CardNotHealth": 3,
    }
    assert h.parse_reason("") == {}
    assert h.parse_reason("NodeInsufficientDevice") == {"NodeInsufficientDevice": 1}


# ------------------------------------------------- orders, NUMA, topology, nodes


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        ("binpack", ["c1", "c0", "c3", "c2"]),  # NUMA 0 first, fullest first
        ("spread", ["c3", "c2", "c0", "c1"]),  # NUMA 1 first, emptiest first
    ],
)
def test_device_order(policy: str, want: list[str]) -> None:
    # equal cards (c2, c3) come out last first: the sorted list is walked from its end
    cards = [
        h.Card("c0", numa=0, usedmem=100),
        h.Card("c1", numa=0, usedmem=500),
        h.Card("c2", numa=1, usedmem=0),
        h.Card("c3", numa=1, usedmem=0),
    ]
    order = h.device_order(policy, cards, [h.Request(1, memreq=10)])
    assert [cards[p].id for p in order] == want


def test_device_order_keeps_the_previous_order_for_ties() -> None:
    # the list is sorted in place: a later container's ties keep the earlier order
    cards = [h.Card(f"c{i}") for i in range(3)]
    assert h.device_order("spread", cards, [h.Request(1)], order=[2, 0, 1]) == [1, 0, 2]


def test_numa_bind_walk() -> None:
    # spread visits NUMA 1 first; its one fitting card is left behind (NumaNotFit),
    # NUMA 0 then has two: they win
    cards = [
        h.Card("a", numa=0),
        h.Card("b", numa=0),
        h.Card("c", numa=1),
        h.Card("d", numa=1, usedmem=1000),
    ]
    req_ = h.Request(2, memreq=10)
    got = h.fit(cards, h.device_order("spread", cards, [req_]), req_, h.Filters(numa_bind=True))
    assert got.ok and [cards[p].id for p in got.picked] == ["b", "a"]
    cards[1] = h.Card("b", numa=0, health=False)
    got = h.fit(cards, h.device_order("spread", cards, [req_]), req_, h.Filters(numa_bind=True))
    assert (
        got.text
        == "1/4 AllocatedCardsInsufficientRequest, 1/4 CardInsufficientMemory, 1/4 CardNotHealth, 1/4 NumaNotFit"
    )


LINKS = [[0, 160, 20, 20], [160, 0, 20, 20], [20, 20, 0, 160], [20, 20, 160, 0]]


def test_topology_pick() -> None:
    assert h.topology_pick([3, 2, 1, 0], 2, LINKS) == [3, 2]  # first of the equal best pairs
    assert h.topology_pick([3, 2, 1], 1, LINKS) == [1]  # least linked to the other candidates
    assert h.topology_pick([3, 2, 1], 1, None) == [3]  # no scores: the first


def test_node_score_and_rank() -> None:
    full = [h.Card("x", count=4, used=3, totalmem=100, usedmem=65, totalcore=100, usedcores=70)]
    assert h.node_score(full) == float(
        np.float32(10) * ((np.float32(0.75) + np.float32(0.7)) + np.float32(0.65))
    )
    scores = {"a": 7.0, "b": 21.0, "c": 0.0, "d": 21.0}
    assert h.rank_nodes("binpack", scores) == ["b", "d", "a", "c"]
    assert h.rank_nodes("spread", scores) == ["c", "a", "b", "d"]


# --------------------------------------------------------- the engine matches


def test_engine_takes_the_last_equal_card_and_lists_it_first() -> None:
    p = placer(cluster(node("a", 4)), gpu_policy="spread")
    got = place(p, req(DeviceAsk(nums=2, mem=100, cores=1)))
    assert [c[0] for c in cards_of(got)] == ["GPU-a-3", "GPU-a-2"]


def test_engine_zero_core_ask_on_a_full_card() -> None:
    p = placer(cluster(node("a", 1)))
    place(p, req(DeviceAsk(mem=100, cores=100)))
    r = req(DeviceAsk(mem=100, cores=0), nodes=["a"])
    f = fail(p, r)
    assert f.reasons == {"CardComputeUnitsExhausted": 1}
    assert p.node_reasons(r, f) == {"a": "1/1 CardComputeUnitsExhausted"}


def test_engine_counts_a_node_under_each_of_its_reasons() -> None:
    inv = node("a", 2, dev={"type": "NVIDIA-A100"})
    inv.devices[1] = Device(uuid="GPU-a-1", index=1, type="NVIDIA-T4", devmem=10000)
    p = placer(cluster(inv, node("b", 2, 100)))
    r = req(DeviceAsk(mem=5000, cores=1), use_types=["A100"], nodes=["a", "b"])
    place(p, req(DeviceAsk(mem=8000, cores=1), node_name="a", use_uuids=["GPU-a-0"]))
    f = fail(p, r)
    assert f.reasons == {"CardInsufficientMemory": 2, "CardTypeMismatch": 1}
    assert f.message == "0/2 nodes are available: 2 CardInsufficientMemory, 1 CardTypeMismatch"
    assert p.node_reasons(r, f) == {
        "a": "1/2 CardInsufficientMemory, 1/2 CardTypeMismatch",
        "b": "2/2 CardInsufficientMemory",
    }


def test_engine_both_levels_reachable() -> None:
    # more cards than the node has: node level; enough cards but of another vendor
    # and too few of this one: card level, with the fitting cards counted
    inv = node("a", 3)
    inv.devices[2] = Device(uuid="GPU-a-2", index=2, type="AMD-MI300", vendor="AMD", devmem=10000)
    p = placer(cluster(inv))
    for nums, text in [(4, "NodeInsufficientDevice"), (3, "2/2 AllocatedCardsInsufficientRequest")]:
        r = req(DeviceAsk(nums=nums, mem=10, cores=1), nodes=["a"])
        assert p.node_reasons(r, fail(p, r)) == {"a": text}


# ------------------------------------------------------------------ properties

card_st = st.fixed_dictionaries(
    {
        "numa": st.integers(0, 1),
        "mem": st.sampled_from([4000, 8000]),
        "umem": st.sampled_from([0, 0, 1000, 3000, 7000]),
        "ucore": st.sampled_from([0, 0, 30, 100]),
        "count": st.sampled_from([1, 4]),
        "health": st.sampled_from([True, True, True, False]),
    }
)
ask_st = st.tuples(
    st.integers(1, 3),  # nums
    st.sampled_from([0, 1000, 3000, 5000]),  # MiB (0: a percentage)
    st.sampled_from([25, 50, 100]),  # percentage when MiB is 0
    st.sampled_from([0, 10, 50, 100]),  # cores
)


def _hami_cards(specs: list[dict[str, int]]) -> list[h.Card]:
    return [
        h.Card(f"G{i}", i, "NVIDIA-A100", "hami-core", s["numa"], bool(s["health"]), s["count"],
               1 if (s["umem"] or s["ucore"]) else 0, s["mem"], min(s["umem"], s["mem"]), 100, s["ucore"])
        for i, s in enumerate(specs)
    ]  # fmt: skip


def _engine(cards: list[h.Card], gpu_policy: str) -> Placer:
    cl = ClusterState()
    devs = [Device(uuid=c.id, index=c.index, type=c.type, devmem=c.totalmem, count=c.count, numa=c.numa, health=c.health)
            for c in cards]  # fmt: skip
    cl.upsert_node(NodeInventory(node="n", devices=devs))
    for c in cards:
        if c.used:
            g = CardGrant(uuid=c.id, index=c.index, type=c.type, mem=c.usedmem, cores=c.usedcores)
            cl.reserve(
                "n",
                LedgerAlloc(
                    uid=f"u-{c.id}", name="x", containers=[ContainerGrant(name="m", devices=[g])]
                ),
            )
    return Placer(
        cl, SchedulerSettings(node_policy="binpack", gpu_policy=gpu_policy), NodeSettings()
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(card_st, min_size=1, max_size=6),
    ask=ask_st,
    gpu_policy=st.sampled_from(["binpack", "spread", "topology-aware", "mutex"]),
    numa_bind=st.booleans(),
)
def test_engine_grants_what_the_pure_fit_grants(
    specs: list[dict[str, int]], ask: tuple[int, int, int, int], gpu_policy: str, numa_bind: bool
) -> None:
    cards = _hami_cards(specs)
    nums, mib, pct, cores = ask
    p = _engine(cards, gpu_policy)
    dask = DeviceAsk(nums=nums, mem=mib, mem_percent=None if mib else pct, cores=cores)
    r = AllocRequested(uid="new", name="new", containers=[ContainerAsk(name="m", devices=[dask])],
                       constraints=Constraints(numa_bind=numa_bind, nodes=["n"]))  # fmt: skip
    hreq = (
        h.Request(nums, memreq=mib, coresreq=cores)
        if mib
        else h.Request(nums, mempct=pct, coresreq=cores)
    )
    policy = "binpack" if gpu_policy == "binpack" else "spread"
    f = h.Filters(
        numa_bind=numa_bind, mutex=gpu_policy == "mutex", topology=gpu_policy == "topology-aware"
    )
    want = h.fit_node(cards, hreq, policy, f)
    got = p.decide(r)
    if want.ok:
        assert isinstance(got, Placement), (got, want)
        assert [d.uuid for d in got.containers[0].devices] == [cards[i].id for i in want.picked]
    else:
        assert isinstance(got, Failure)
        assert p.node_reasons(r, got) == {"n": want.text or "NodeUnfitPod"}
    # and the uncached path (every card through the pure fit) agrees
    p2 = _engine(cards, gpu_policy)
    p2.use_cache = False
    got2 = p2.decide(r)
    assert type(got2) is type(got)
    if isinstance(got, Placement) and isinstance(got2, Placement):
        assert got2.containers == got.containers


@settings(max_examples=100, deadline=None)
@given(
    specs=st.lists(card_st, min_size=1, max_size=8),
    asks=st.lists(ask_st, min_size=1, max_size=3),
)
def test_engine_scores_are_hamis(
    specs: list[dict[str, int]], asks: list[tuple[int, int, int, int]]
) -> None:
    """The engine's fast card scores order and tie the cards exactly as
    :func:`hami.device_score`'s float32 values do."""
    cards = _hami_cards(specs)
    row = [pm.Ask("NVIDIA", n, mib, None if mib else pct, c) for n, mib, pct, c in asks]
    got = pm._hami_scores(row, [c.usedmem for c in cards], [c.usedcores for c in cards], [c.used for c in cards],
                          [c.totalmem for c in cards], [c.totalcore for c in cards], [c.count for c in cards])  # fmt: skip
    reqs = [pm._request(a) for a in row]
    want = [h.device_score(c, reqs) for c in cards]

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    n = len(cards)
    assert [[sign(got[i] - got[j]) for j in range(n)] for i in range(n)] == [
        [sign(want[i] - want[j]) for j in range(n)] for i in range(n)
    ]


def test_engine_scores_near_ties_take_float32() -> None:
    """Scores closer than float32 can tell apart tie as in HAMi (float64 would order them)."""
    # 0.1 + 0.2 and 0.3 + 0.0 differ in float64 and are equal in float32
    row = [pm.Ask("NVIDIA", 0, 0, None, 0)]
    got = pm._hami_scores(row, [0, 0], [20, 30], [1, 0], [1, 1], [100, 100], [10, 10])
    want = [h.device_score(h.Card("", count=10, used=u, totalmem=1, usedmem=0, totalcore=100, usedcores=c), [])
            for u, c in ((1, 20), (0, 30))]  # fmt: skip
    assert (got[0] == got[1]) is (want[0] == want[1])
    assert (got[0] < got[1]) is (want[0] < want[1])
