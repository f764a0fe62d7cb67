"""Table-driven tests of the placement rules (REFERENCE §1-3), one small cluster each."""

from __future__ import annotations

import pytest

from services.placement.engine import Failure, Placement
from shared.schemas import DeviceAsk, MigPlacement, MigProfile, NodeInventory

from .util import card, cards_of, cluster, fail, node, place, placer, req

# ------------------------------------------------------------------ card requests


@pytest.mark.parametrize(
    ("ask", "want"),
    [
        # (ask, [(mem, cores) per granted card])
        (DeviceAsk(nums=1, mem=3000, cores=20), [(3000, 20)]),
        (DeviceAsk(nums=2, mem=1000, cores=5), [(1000, 5), (1000, 5)]),
        (DeviceAsk(nums=1, mem_percent=25, cores=10), [(2500, 10)]),
        (DeviceAsk(nums=1, mem_percent=250, cores=10), [(10000, 10)]),  # >100 % clamps
        # no memory: the whole card's memory; cores as asked (0), as HAMi books them
        (DeviceAsk(nums=1), [(10000, 0)]),
        (DeviceAsk(nums=1, mem_percent=100), [(10000, 0)]),
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
        ([DeviceAsk(mem=1000, cores=100)], DeviceAsk(mem=1000, cores=0), "CardComputeUnitsExhausted"),
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


def test_ties_break_by_node_name_and_last_card() -> None:
    # equal cards: HAMi's fit walks its sorted device list from the end, so the last
    # card wins; equal nodes: the node name (HAMi's order there is not reproducible)
    for pol in ("binpack", "spread"):
        p = placer(cluster(node("z"), node("m"), node("b")), node_policy=pol, gpu_policy=pol)
        got = p.decide(req(DeviceAsk(mem=100, cores=1)))
        assert isinstance(got, Placement)
        assert (got.node, cards_of(got)[0][0]) == ("b", "GPU-b-1")


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


# ------------------------------------------------------------- issue 3: card filters


@pytest.mark.parametrize(
    ("cons", "want"),
    [
        ({"use_types": ["a100"]}, {"a"}),  # case-insensitive substring
        ({"use_types": ["T4", "v100"]}, {"b", "c"}),
        ({"nouse_types": ["A100"]}, {"b", "c"}),
        ({"use_types": ["V100"], "nouse_types": ["32G"]}, {"c"}),
        ({"use_uuids": ["GPU-b-0"]}, {"b"}),
        ({"nouse_uuids": ["GPU-a-0", "GPU-c-0"]}, {"b"}),
        ({"vgpu_mode": "mig"}, {"c"}),
    ],
)
def test_card_filters(cons: dict[str, object], want: set[str]) -> None:
    cl = cluster(
        node("a", 1, dev={"type": "NVIDIA-A100-80GB"}),
        node("b", 1, dev={"type": "NVIDIA-Tesla-T4"}),
        # a MIG-mode card takes asks only as instances of its profiles (HAMi's MIG fit)
        node("c", 1, dev={"type": "NVIDIA-V100-16GB", "mode": "mig", "mig_profiles": [MigProfile(
            name="1g.5gb", memory_mb=4864, core=14, slice_count=1,
            placements=[MigPlacement(start=s, size=1) for s in range(7)])]}),
    )  # fmt: skip
    p = placer(cl)
    got = set()
    for _ in range(3):
        r = p.decide(req(DeviceAsk(mem=100, cores=1), **cons))  # type: ignore[arg-type]
        if isinstance(r, Placement):
            got.add(r.node)
            p.cluster.reserve(r.node, r.to_alloc(req()))
            p.cluster.reserve(r.node, r.to_alloc(req()))  # fill the slots: next one elsewhere
            for _ in range(8):
                p.cluster.reserve(r.node, r.to_alloc(req()))
    assert got == want


@pytest.mark.parametrize(
    ("cons", "reason"),
    [
        ({"use_types": ["H100"]}, "CardTypeMismatch"),
        ({"use_uuids": ["GPU-x"]}, "CardUuidMismatch"),
        ({"vgpu_mode": "mps"}, "CardTypeMismatch"),
    ],
)
def test_filter_reasons(cons: dict[str, object], reason: str) -> None:
    f = fail(placer(cluster(node("a", 2), node("b", 1))), req(DeviceAsk(mem=1), **cons))  # type: ignore[arg-type]
    assert f.reasons == {reason: 2}


def test_cordoned_card() -> None:
    p = placer(cluster(node("a", 2, cordoned=["GPU-a-0"])))
    assert cards_of(place(p, req(DeviceAsk(mem=100, cores=1))))[0][0] == "GPU-a-1"
    f = fail(p, req(DeviceAsk(nums=2, mem=100, cores=1)))
    # HAMi counts the fitting card too: "1/2 AllocatedCardsInsufficientRequest, 1/2 CardCordoned"
    assert f.reasons == {"AllocatedCardsInsufficientRequest": 1, "CardCordoned": 1}


def numa_node(name: str, numas: list[int], links: list[list[int]] | None = None) -> NodeInventory:
    devs = [card(name, i, numa=n) for i, n in enumerate(numas)]
    return NodeInventory(node=name, devices=devs, links=links or [])


@pytest.mark.parametrize(
    ("chain", "want"),
    [
        ("binpack", "GPU-a-1"),  # binpack: lowest NUMA node first, then the fullest card
        ("spread", "GPU-a-4"),  # spread: highest NUMA node first; equal cards: the last
        ("", "GPU-a-4"),  # empty chain: spread
        ("mutex", "GPU-a-4"),  # a filter only: spread among idle cards
        ("binpack,mutex", "GPU-a-4"),  # no idle card on NUMA 0; equal cards: the last
        ("numa", "GPU-a-4"),  # NUMA 1 has more free cards; no usage key -> spread
        ("numa,binpack", "GPU-a-4"),
        ("binpack,numa", "GPU-a-1"),
    ],
)
def test_gpu_policy_chain(chain: str, want: str) -> None:
    # cards 0,1 on NUMA 0 (card 0 full, card 1 half used); cards 2,3,4 on NUMA 1, idle
    p = placer(cluster(numa_node("a", [0, 0, 1, 1, 1])))
    place(p, req(DeviceAsk(mem=9950, cores=10), use_uuids=["GPU-a-0"]))
    place(p, req(DeviceAsk(mem=5000, cores=10), use_uuids=["GPU-a-1"]))
    got = place(p, req(DeviceAsk(mem=100, cores=1), gpu_policy=chain or None))
    assert cards_of(got)[0][0] == want


def test_mutex_refuses_busy_cards() -> None:
    p = placer(cluster(node("a", 1)))
    place(p, req(DeviceAsk(mem=100, cores=1)))
    assert fail(p, req(DeviceAsk(mem=100, cores=1), gpu_policy="mutex")).reasons == {
        "ExclusiveDeviceAllocateConflict": 1
    }


@pytest.mark.parametrize(
    ("numa_bind", "want"),
    [(False, {"GPU-a-2", "GPU-a-3"}), (True, {"GPU-a-2", "GPU-a-3"})],
)
def test_numa_bind(numa_bind: bool, want: set[str]) -> None:
    # HAMi's spread sorts by NUMA node first (highest first), then by score: both
    # cards of NUMA 1, bound or not
    p = placer(cluster(numa_node("a", [0, 0, 1, 1])))
    place(p, req(DeviceAsk(mem=3000, cores=1), use_uuids=["GPU-a-0"]))
    place(p, req(DeviceAsk(mem=1000, cores=1), use_uuids=["GPU-a-3"]))
    got = place(p, req(DeviceAsk(nums=2, mem=100, cores=1), numa_bind=numa_bind))
    assert {c[0] for c in cards_of(got)} == want


def test_numa_bind_fails_when_split() -> None:
    p = placer(cluster(numa_node("a", [0, 1])))
    # the card of the first NUMA node walked is left behind (NumaNotFit), the second's
    # is too few (AllocatedCardsInsufficientRequest): "1/2 ..., 1/2 NumaNotFit"
    r = req(DeviceAsk(nums=2, mem=100, cores=1), numa_bind=True, nodes=["a"])
    f = fail(p, r)
    assert f.reasons == {"AllocatedCardsInsufficientRequest": 1, "NumaNotFit": 1}
    assert p.node_reasons(r, f) == {"a": "1/2 AllocatedCardsInsufficientRequest, 1/2 NumaNotFit"}


# cards 0-1 NVLinked (score 160), 2-3 NVLinked, cross pairs 20
_LINKS = [[0, 160, 20, 20], [160, 0, 20, 20], [20, 20, 0, 160], [20, 20, 160, 0]]


@pytest.mark.parametrize(
    ("used", "nums", "want"),
    [
        ([], 2, {"GPU-a-2", "GPU-a-3"}),  # the best-linked pair first in HAMi's walk (from the end)
        (["GPU-a-0"], 2, {"GPU-a-2", "GPU-a-3"}),  # 1 is busy-ish: 2-3 still linked
        (["GPU-a-0"], 1, {"GPU-a-1"}),  # one card: the least connected among feasible
    ],
)
def test_topology_aware(used: list[str], nums: int, want: set[str]) -> None:
    p = placer(cluster(numa_node("a", [0, 0, 0, 0], _LINKS)))
    for u in used:
        place(p, req(DeviceAsk(mem=10000, cores=100), use_uuids=[u]))
    got = place(p, req(DeviceAsk(nums=nums, mem=100, cores=1), gpu_policy="topology-aware"))
    assert {c[0] for c in cards_of(got)} == want


@pytest.mark.parametrize(
    ("weights", "want"),
    [
        ({"slot": 1, "core": 1, "memory": 1}, "GPU-a-0"),  # card 0 fuller overall
        ({"slot": 0, "core": 0, "memory": 1}, "GPU-a-1"),  # memory only: card 1 fuller
        ({"slot": 5, "core": 0, "memory": 0}, "GPU-a-0"),
    ],
)
def test_scoring_weights(weights: dict[str, int], want: str) -> None:
    from shared.schemas import ScoringWeights

    p = placer(cluster(node("a", 2)), gpu_policy="binpack")
    for _ in range(3):
        place(p, req(DeviceAsk(mem=100, cores=20), use_uuids=["GPU-a-0"]))
    place(p, req(DeviceAsk(mem=5000, cores=5), use_uuids=["GPU-a-1"]))
    got = place(p, req(DeviceAsk(mem=100, cores=1), weights=ScoringWeights(**weights)))
    assert cards_of(got)[0][0] == want


# ----------------------------------------------------------- containers and defaults


def test_init_peak_and_app_sum() -> None:
    from shared.schemas import ContainerAsk

    from .util import pod

    p = placer(cluster(node("a", 1)))
    r = pod(
        ContainerAsk(name="i1", init=True, devices=[DeviceAsk(mem=8000, cores=50)], cpu_milli=3000),
        ContainerAsk(name="i2", init=True, devices=[DeviceAsk(mem=6000, cores=80)], cpu_milli=1000),
        ContainerAsk(name="c1", devices=[DeviceAsk(mem=3000, cores=30)], cpu_milli=1000),
        ContainerAsk(name="c2", devices=[DeviceAsk(mem=4000, cores=30)], cpu_milli=1000),
        ContainerAsk(name="c3"),
    )
    got = place(p, r)
    assert [c.name for c in got.containers] == ["i1", "i2", "c1", "c2", "c3"]
    assert got.cpu_milli == 3000
    card = p.cluster.status().nodes[0].cards[0]
    # init peak 8000 MiB / 80 cores vs app sum 7000 / 60: the larger of each; 2 app slots
    assert (card.used_mem, card.used_cores, card.used_slots) == (8000, 80, 2)


def test_app_containers_are_cumulative() -> None:
    from shared.schemas import ContainerAsk

    from .util import pod

    p = placer(cluster(node("a", 2)), gpu_policy="binpack")
    got = place(p, pod(*[ContainerAsk(name=f"c{i}", devices=[DeviceAsk(mem=6000, cores=10)]) for i in range(2)]))
    assert len({c.devices[0].uuid for c in got.containers}) == 2  # 12000 MiB cannot share a card
    assert isinstance(p.decide(pod(*[ContainerAsk(devices=[DeviceAsk(mem=3000, cores=10)]) for _ in range(3)])), Failure)


@pytest.mark.parametrize(
    ("raw", "settings", "want"),
    [
        # raw = (nums, mem, mem_percent, cores); want = (nums, mem, mem_percent, cores) or None
        ((None, None, None, None), {}, None),
        ((2, None, None, None), {}, (2, 0, 100, 0)),  # bare count: the webhook adds the 100 cores
        ((1, 1000, 50, None), {"memory_factor": 4}, (1, 4000, None, 0)),  # gpumem wins, x factor
        ((1, None, 30, None), {}, (1, 0, 30, 0)),
        ((1, None, 0, None), {"default_memory": 2048}, (1, 2048, None, 0)),  # <=0 % ignored
        ((None, None, None, 30), {"default_gpu_num": 2}, (2, 0, 100, 30)),  # cores only
        ((None, 500, None, None), {}, (1, 500, None, 0)),
        ((1, 500, None, None), {"default_cores": 25}, (1, 500, None, 25)),
        ((1, None, None, None), {"default_memory": 1024}, (1, 1024, None, 0)),
        ((0, 500, None, None), {}, None),
    ],
)
def test_resolve_device_ask(raw: tuple, settings: dict[str, int], want: tuple | None) -> None:  # type: ignore[type-arg]
    from services.placement.engine import resolve_device_ask
    from shared.config import NodeSettings

    nums, mem, pct, cores = raw
    got = resolve_device_ask(nums=nums, mem=mem, mem_percent=pct, cores=cores, settings=NodeSettings(**settings))
    assert (got and (got.nums, got.mem, got.mem_percent, got.cores)) == want


def test_engine_applies_default_memory() -> None:
    p = placer(cluster(node("a", 1)), default_memory=3000)
    assert cards_of(place(p, req(DeviceAsk(cores=10)))) == [("GPU-a-0", 3000, 10)]


# ------------------------------------------------------------------------------ quota


@pytest.mark.parametrize(
    ("quota", "asks", "fits"),
    [
        ({"memory_mib": 5000}, [DeviceAsk(mem=3000, cores=1), DeviceAsk(mem=2000, cores=1)], [True, True]),
        ({"memory_mib": 5000}, [DeviceAsk(mem=3000, cores=1), DeviceAsk(mem=2001, cores=1)], [True, False]),
        ({"cores": 50}, [DeviceAsk(mem=10, cores=40), DeviceAsk(mem=10, cores=20)], [True, False]),
        ({"memory_mib": 5000}, [DeviceAsk(nums=2, mem=3000, cores=1)], [False]),  # summed over cards
        ({}, [DeviceAsk(nums=2, mem=9000, cores=1)], [True]),
    ],
)
def test_namespace_quota(quota: dict[str, int], asks: list[DeviceAsk], fits: list[bool]) -> None:
    from shared.schemas import Quota

    cl = cluster(node("a", 2), node("b", 2))
    cl.set_quota("team", Quota(**quota))
    p = placer(cl)
    for ask, ok in zip(asks, fits, strict=True):
        got = p.decide(req(ask, ns="team"))
        assert isinstance(got, Placement) == ok
        if isinstance(got, Placement):
            cl.reserve(got.node, got.to_alloc(req(ns="team")))
        elif ask.nums == 1:
            assert set(got.reasons) == {"ResourceQuotaNotFit"}
        else:
            # HAMi's quota sees the cards the ask picked before: the first card fits,
            # the second is over ("1/2 AllocatedCardsInsufficientRequest, 1/2 ResourceQuotaNotFit")
            assert got.reasons == {"AllocatedCardsInsufficientRequest": 2, "ResourceQuotaNotFit": 2}
    assert isinstance(p.decide(req(DeviceAsk(mem=3000, cores=1), ns="other")), Placement)


# ------------------------------------------------------------------ pod-level filters


@pytest.mark.parametrize(
    ("kw", "cons", "reason"),
    [
        ({"cpu_milli": 4000}, {"cpu": 5000}, "Insufficient cpu"),
        ({"memory_mib": 4000}, {"mem": 5000}, "Insufficient memory"),
        ({"unschedulable": True}, {}, "node(s) were unschedulable"),
        ({"labels": {"zone": "x"}}, {"node_selector": {"zone": "y"}}, "node(s) didn't match Pod's node affinity/selector"),
        ({"taints": [{"key": "gpu", "value": "a"}]}, {}, "node(s) had untolerated taint"),
        ({"taints": [{"key": "gpu", "value": "a"}]}, {"tolerations": [{"key": "gpu", "value": "b"}]}, "node(s) had untolerated taint"),
    ],
)
def test_pod_filters_refuse(kw: dict[str, object], cons: dict[str, object], reason: str) -> None:
    import msgspec

    from shared.schemas import Toleration

    inv = msgspec.convert({"node": "a", "devices": [msgspec.to_builtins(card("a", 0))], **kw}, NodeInventory)
    cpu, mem = cons.pop("cpu", 0), cons.pop("mem", 0)
    if "tolerations" in cons:
        cons["tolerations"] = msgspec.convert(cons["tolerations"], list[Toleration])
    f = fail(placer(cluster(inv)), req(DeviceAsk(mem=100, cores=1), cpu=cpu, mem=mem, **cons))  # type: ignore[arg-type]
    assert f.reasons == {reason: 1}


@pytest.mark.parametrize(
    ("labels", "terms", "ok"),
    [
        ({"zone": "x"}, [[("zone", "In", ["x", "y"])]], True),
        ({"zone": "z"}, [[("zone", "In", ["x", "y"])]], False),
        ({"zone": "z"}, [[("zone", "NotIn", ["x"])]], True),
        ({}, [[("zone", "NotIn", ["x"])]], True),
        ({"gpu": ""}, [[("gpu", "Exists", [])]], True),
        ({}, [[("gpu", "Exists", [])]], False),
        ({"gpu": "1"}, [[("gpu", "DoesNotExist", [])]], False),
        ({"a": "1"}, [[("a", "In", ["1"]), ("b", "Exists", [])]], False),  # AND in a term
        ({"a": "1"}, [[("b", "Exists", [])], [("a", "In", ["1"])]], True),  # OR of terms
    ],
)
def test_node_affinity(labels: dict[str, str], terms: list, ok: bool) -> None:  # type: ignore[type-arg]
    from shared.schemas import SelectorRequirement

    aff = [[SelectorRequirement(key=k, operator=o, values=v) for k, o, v in t] for t in terms]
    got = placer(cluster(node("a", 1, labels=labels))).decide(req(DeviceAsk(mem=1), affinity=aff))
    assert isinstance(got, Placement) == ok


@pytest.mark.parametrize(
    ("tol", "ok"),
    [
        ({"key": "gpu", "value": "a"}, True),
        ({"key": "gpu", "operator": "Exists"}, True),
        ({"operator": "Exists"}, True),
        ({"key": "gpu", "value": "a", "effect": "NoExecute"}, False),
        ({"key": "gpu", "value": "a", "effect": "NoSchedule"}, True),
    ],
)
def test_tolerations(tol: dict[str, str], ok: bool) -> None:
    from shared.schemas import Taint, Toleration

    cl = cluster(node("a", 1, taints=[Taint(key="gpu", value="a")]))
    got = placer(cl).decide(req(DeviceAsk(mem=1), tolerations=[Toleration(**tol)]))
    assert isinstance(got, Placement) == ok


def test_pod_count_and_node_resources_are_held() -> None:
    p = placer(cluster(node("a", 1, cpu_milli=2000, memory_mib=1000, max_pods=3)))
    place(p, req(DeviceAsk(mem=10, cores=1), cpu=1500, mem=200))
    assert fail(p, req(DeviceAsk(mem=10, cores=1), cpu=600)).reasons == {"Insufficient cpu": 1}
    place(p, req(cpu=500))  # a CPU-only pod needs no card
    place(p, req(DeviceAsk(mem=10, cores=1)))
    assert fail(p, req(DeviceAsk(mem=10, cores=1))).reasons == {"Too many pods": 1}


def test_node_name_pin() -> None:
    p = placer(cluster(node("a"), node("b")))
    assert place(p, req(DeviceAsk(mem=10, cores=1), node_name="b")).node == "b"
    f = fail(p, req(DeviceAsk(mem=10, cores=1), node_name="nope"))
    assert f.reasons == {"node(s) didn't match the requested node name": 2}


def test_candidate_nodes_allowlist() -> None:
    # kube-scheduler's feasible nodes (extender mode): decide among these only
    p = placer(cluster(node("a"), node("b"), node("c")))
    ask = DeviceAsk(mem=10, cores=1)
    assert p.decide(req(ask)).node == "a"  # type: ignore[union-attr]  # empty = every node
    assert place(p, req(ask, nodes=["c"])).node == "c"
    assert place(p, req(ask, nodes=["unknown", "b"])).node == "b"  # binpack would pick "c"
    f = fail(p, req(ask, nodes=["unknown"]))
    assert f.reasons == {"node(s) not among the scheduler's candidates": 3}


def test_candidate_nodes_reasons_per_node() -> None:
    p = placer(cluster(node("a", 1, 4000), node("b", 1, 10000), node("c", 2)))
    f = fail(p, req(DeviceAsk(nums=2, mem=6000, cores=1), nodes=["a", "b", "zzz"]))
    r = req(DeviceAsk(nums=2, mem=6000, cores=1), nodes=["a", "b", "zzz"])
    assert p.node_reasons(r, f) == {"a": "NodeInsufficientDevice", "b": "NodeInsufficientDevice"}
    r = req(DeviceAsk(nums=1, mem=6000, cores=1), nodes=["a"])
    f = fail(p, r)
    assert p.node_reasons(r, f) == {"a": "1/1 CardInsufficientMemory"}
    assert f.reasons == {"node(s) not among the scheduler's candidates": 2, "CardInsufficientMemory": 1}
