"""Dynamic MIG in the engine: HAMi v2.10's profile and placement choice, table cases
from HAMi's own tests (pkg/device/nvidia/mig_topology_test.go, mig_capability_test.go),
and packing sequences on the simulated A100/H100 geometries through the whole Placer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from services.placement.engine import Placement, Placer, hami, mig
from shared.hami import mig as hmig
from shared.hami.mig import GEOMETRIES, geometry, max_instances
from shared.schemas import (
    CardGrant,
    ContainerAsk,
    ContainerGrant,
    Device,
    DeviceAsk,
    MigPlacement,
    MigProfile,
    MigSlice,
    NodeInventory,
)
from tests.placement.util import cluster, fail, place, placer, pod, req


def P(name: str, memory: int, core: int, slices: int, *placements: tuple[int, int]) -> MigProfile:
    return MigProfile(
        name=name,
        memory_mb=memory,
        core=core,
        slice_count=slices,
        placements=[MigPlacement(start=s, size=z) for s, z in placements],
    )


def at(*pairs: tuple[int, int]) -> list[MigPlacement]:
    return [MigPlacement(start=s, size=z) for s, z in pairs]


# HAMi's a100MigProfiles() test fixture (memory/core as its test writes them)
HAMI_A100 = [
    P("1g.5gb", 5120, 14, 1, *[(s, 1) for s in range(7)]),
    P("2g.10gb", 10240, 28, 2, (0, 2), (2, 2), (4, 2)),
    P("3g.20gb", 20480, 42, 3, (0, 4), (4, 4)),
]


# ------------------------------------------------------------- HAMi's table cases


@pytest.mark.parametrize(
    ("occupied", "names", "ok"),
    [
        ([], ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"], True),  # all-balanced geometry
        ([(4, 4)], ["2g.10gb", "1g.5gb", "1g.5gb"], True),  # the rest of it
        ([(0, 4), (4, 4)], ["1g.5gb"], False),  # nothing overlaps two 3g instances
        ([(0, 2), (2, 2), (4, 2)], ["2g.10gb"], False),  # a fourth 2g
        ([], [], True),
        ([], ["4g.20gb"], False),  # a profile the card does not offer
    ],
)
def test_can_place_profiles_as_hami(
    occupied: list[tuple[int, int]], names: list[str], ok: bool
) -> None:
    assert mig.can_place(HAMI_A100, at(*occupied), names) is ok


def test_placements_pack_balanced_as_hami() -> None:
    # TestSelectMigPlacementUsesBalancedPacking: 3g high, 2g low, then 1g high
    occupied: list[MigPlacement] = []
    for profile, start in [("3g.20gb", 4), ("2g.10gb", 0), ("1g.5gb", 3), ("1g.5gb", 2)]:
        prof = next(p for p in HAMI_A100 if p.name == profile)
        got = mig.free_placement(prof, occupied)
        assert got is not None and got.start == start, (profile, got)
        occupied.append(got)


def test_the_smallest_profile_holding_the_memory_wins() -> None:
    # TestAddResourceUsageUsesReportedProfileAndPlacement: 10000 MiB -> 2g.10gb at 0, 10240/28
    got = mig.choose(HAMI_A100, [], 10000)
    assert got is not None
    assert (got.profile.name, got.profile.memory_mb, got.profile.core) == ("2g.10gb", 10240, 28)
    assert (got.placement.start, got.placement.size) == (0, 2)
    assert got.slice().profile == "2g.10gb"


def test_custom_filter_uses_reported_placement_capacity() -> None:
    # TestCustomFilterUsesReportedPlacementCapacity: three 2g in use
    three_2g = at((0, 2), (2, 2), (4, 2))
    assert not mig.fits(HAMI_A100, three_2g, [], 10000)  # no fourth 2g (nor a 3g/...)
    assert mig.fits(HAMI_A100, three_2g, [], 5000)  # the 1g at 6 is free
    # the pod's own earlier asks on the card count too (HAMi's toAllocate)
    assert not mig.fits(HAMI_A100, three_2g, [5000], 5000)


def test_a_larger_profile_is_taken_when_the_fitting_one_has_no_room() -> None:
    # 2g full: a 9000 MiB ask falls through to the next profile that holds it and has room
    got = mig.choose(HAMI_A100, at((0, 2), (2, 2), (4, 2)), 9000)
    assert got is None  # 3g's placements overlap the 2g instances
    got = mig.choose(HAMI_A100, at((0, 2), (2, 2)), 9000)
    assert got is not None and (got.profile.name, got.placement.start) == ("2g.10gb", 4)
    got = mig.choose(HAMI_A100, at((4, 2)), 9000)
    assert got is not None and (got.profile.name, got.placement.start) == ("2g.10gb", 0)


def test_ties_in_memory_go_to_fewer_slices_then_registration_order() -> None:
    same = [P("4g.20gb", 19968, 57, 4, (0, 4)), P("3g.20gb", 19968, 43, 3, (0, 4), (4, 4))]
    got = mig.choose(same, [], 15000)
    assert got is not None and (got.profile.name, got.placement.start) == ("3g.20gb", 4)


def test_placement_ranges_are_half_open() -> None:
    assert not mig.overlaps(MigPlacement(start=0, size=2), MigPlacement(start=2, size=2))
    assert mig.overlaps(MigPlacement(start=0, size=4), MigPlacement(start=3, size=1))


# ------------------------------------------------------------------- geometries


@pytest.mark.parametrize(
    ("model", "names", "count"),
    [
        ("NVIDIA-A100-SXM4-40GB", ["1g.5gb", "2g.10gb", "3g.20gb", "7g.40gb"], 7),
        ("A100-PCIE-80GB", ["1g.10gb", "2g.20gb", "3g.40gb", "7g.79gb"], 7),
        ("NVIDIA-H100-SXM5-80GB", ["1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"], 7),
        ("NVIDIA-A30", ["1g.6gb", "2g.12gb", "4g.24gb"], 4),
    ],
)
def test_geometries_of_the_simulated_models(model: str, names: list[str], count: int) -> None:
    got = geometry(model)
    assert got is not None
    # what the card has, less what HAMi chart's allowlist leaves out (4g on A100/H100)
    kept = [p for p in got if p.name in hmig.allowed_profiles(model)]
    assert [p.name for p in kept] == names
    assert max_instances(kept) == count


def test_the_default_allowlist_names_models_as_hamis_chart() -> None:
    assert hmig.allowed_profiles("NVIDIA-H200-SXM5-141GB") == {
        "1g.18gb",
        "2g.35gb",
        "3g.71gb",
        "7g.141gb",
    }
    assert hmig.allowed_profiles("NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition") == {
        "1g.24gb",
        "2g.48gb",
        "4g.96gb",
    }
    assert hmig.allowed_profiles("NVIDIA-Tesla-T4") == set()
    assert hmig.allowed_profiles("X", [(["X"], ["1g.1gb"])]) == {"1g.1gb"}


def test_no_geometry_for_cards_without_mig() -> None:
    assert geometry("NVIDIA-Tesla-T4") is None and geometry("V100-16GB") is None


def test_every_geometry_is_consistent() -> None:
    for model, profiles in GEOMETRIES.items():
        slots = max(p.start + p.size for q in profiles for p in q.placements)
        for p in profiles:
            assert all(0 <= x.start and x.start + x.size <= slots for x in p.placements), model
            assert 0 < p.core <= 100 and p.memory_mb > 0
        mems = [p.memory_mb for p in mig.profile_order(profiles)]
        assert mems == sorted(mems)


# ------------------------------------------------------ HAMi's fit with the MIG rule


Rule = Callable[[int, int, Sequence[int], Sequence[int]], "str | None"]


def _mig_rule(profiles: list[MigProfile], occupied: dict[int, list[MigPlacement]]) -> Rule:
    def custom(p: int, memory: int, got: Sequence[int], mems: Sequence[int]) -> str | None:
        earlier = [m for q, m in zip(got, mems, strict=True) if q == p]
        return None if mig.fits(profiles, occupied.get(p, []), earlier, memory) else mig.REASON

    return custom


def test_hami_fit_takes_several_instances_of_one_mig_card() -> None:
    cards = [hami.Card(id=f"g{i}", mode="mig", totalmem=40960, count=7) for i in range(2)]
    req = hami.Request(nums=2, memreq=9000)
    res = hami.fit(cards, [1, 0], req, custom=_mig_rule(HAMI_A100, {}))
    assert res.ok and res.picked == [1, 1]  # HAMi's i++: the same MIG card again
    # the second card is visited once the first has no placement left for the ask
    res = hami.fit(cards, [1, 0], req, custom=_mig_rule(HAMI_A100, {1: at((0, 2), (2, 2))}))
    assert res.ok and res.picked == [1, 0]


def test_hami_fit_reports_topology_infeasible_per_card() -> None:
    full = {p: at((0, 2), (2, 2), (4, 2)) for p in range(2)}
    cards = [
        hami.Card(id=f"g{i}", mode="mig", totalmem=40960, usedmem=30720, count=7, used=3)
        for i in range(2)
    ]
    res = hami.fit(
        cards, [1, 0], hami.Request(nums=1, memreq=9000), custom=_mig_rule(HAMI_A100, full)
    )
    assert not res.ok and res.text == "2/2 CardMigTopologyInfeasible"
    # without the rule (a card not in MIG mode) the same cards fit on memory alone
    assert hami.fit(cards, [1, 0], hami.Request(nums=1, memreq=9000)).ok


# ------------------------------------------------ the whole Placer on MIG geometry


def mig_node(
    name: str, model: str = "A100-SXM4-40GB", cards: int = 1, mem: int = 40960
) -> NodeInventory:
    prof = geometry(model)
    assert prof is not None
    devs = [
        Device(uuid=f"GPU-{name}-{i}", index=i, type=f"NVIDIA-{model}", devmem=mem, count=max_instances(prof),
               mode="mig", mig_profiles=prof)
        for i in range(cards)
    ]  # fmt: skip
    return NodeInventory(node=name, devices=devs)


def core_node(name: str, cards: int = 1, mem: int = 40960) -> NodeInventory:
    return NodeInventory(node=name, devices=[
        Device(uuid=f"GPU-{name}-{i}", index=i, type="NVIDIA-A100-SXM4-40GB", devmem=mem) for i in range(cards)
    ])  # fmt: skip


def migs(pl: Placement) -> list[tuple[str, str, int, int, int]]:
    """(card, profile, start, MiB booked, cores booked) of every grant."""
    out = []
    for c in pl.containers:
        for d in c.devices:
            assert d.mig is not None, d
            out.append((d.uuid, d.mig.profile, d.mig.start, d.mem, d.cores))
    return out


def test_each_ask_gets_the_smallest_profile_at_hamis_placement() -> None:
    p = placer(cluster(mig_node("a")))
    # 1g packs from the top, 2g from the bottom, as HAMi; each books its profile
    assert migs(place(p, req(DeviceAsk(mem=4000)))) == [("GPU-a-0", "1g.5gb", 6, 4864, 14)]
    assert migs(place(p, req(DeviceAsk(mem=9000)))) == [("GPU-a-0", "2g.10gb", 0, 9856, 29)]
    # a 3g needs slices 0-3 or 4-7: the 2g at 0 and the 1g at 6 block both
    assert "CardMigTopologyInfeasible" in fail(p, req(DeviceAsk(mem=15000))).message
    assert migs(place(p, req(DeviceAsk(mem=4000)))) == [("GPU-a-0", "1g.5gb", 5, 4864, 14)]
    st = p.cluster.status().nodes[0].cards[0]
    assert (st.used_mem, st.used_cores, st.used_slots) == (2 * 4864 + 9856, 14 + 29 + 14, 3)


def test_topology_infeasible_although_total_memory_is_enough() -> None:
    p = placer(cluster(mig_node("a")))
    for _ in range(3):
        place(p, req(DeviceAsk(mem=9000)))  # three 2g.10gb: slices 0-5
    card = p.cluster.status().nodes[0].cards[0]
    assert card.total_mem - card.used_mem == 40960 - 3 * 9856 >= 9000
    assert fail(p, req(DeviceAsk(mem=9000))).message.endswith(": 1 CardMigTopologyInfeasible")
    # a 1g still fits in the last slice; then the compute shares HAMi books (3 x 29 + 14)
    # exceed the card's 100, so the next ask is refused on cores before its placement
    assert migs(place(p, req(DeviceAsk(mem=4000))))[0][1:3] == ("1g.5gb", 6)
    assert fail(p, req(DeviceAsk(mem=1000))).message.endswith(": 1 CardInsufficientCore")


def test_release_frees_the_placement_for_the_next_fit() -> None:
    p = placer(cluster(mig_node("a")))
    placed = [place(p, req(DeviceAsk(mem=9000))) for _ in range(3)]
    starts = [migs(x)[0][2] for x in placed]
    assert starts == [0, 2, 4]
    p.cluster.unreserve("a", _uid_of(p, placed[1]))
    again = place(p, req(DeviceAsk(mem=9000)))
    assert migs(again)[0][1:3] == ("2g.10gb", 2)


def _uid_of(p: Placer, pl: Placement) -> str:
    led = p.cluster.ledger(pl.node)
    return next(u for u, a in led.allocs.items() if a.containers == pl.containers)


def test_a_whole_card_ask_does_not_fit_a_mig_card() -> None:
    # 100 % of 40960 MiB: the largest profile (7g.40gb) holds 40192, so HAMi refuses it
    p = placer(cluster(mig_node("a")))
    assert (
        "CardMigTopologyInfeasible" in fail(p, req(DeviceAsk(mem_percent=100, cores=100))).message
    )
    assert migs(place(p, req(DeviceAsk(mem=40000))))[0][1:] == ("7g.40gb", 0, 40192, 100)


def test_one_ask_can_take_two_instances_of_one_card() -> None:
    p = placer(cluster(mig_node("a", cards=2)))
    got = migs(place(p, req(DeviceAsk(nums=2, mem=9000))))
    assert [g[0] for g in got] == [got[0][0], got[0][0]]  # HAMi revisits the MIG card
    assert sorted(g[2] for g in got) == [0, 2]


def test_containers_of_one_pod_never_overlap() -> None:
    p = placer(cluster(mig_node("a")))
    two = pod(
        ContainerAsk(name="a", devices=[DeviceAsk(mem=15000)]),
        ContainerAsk(name="b", devices=[DeviceAsk(mem=15000)]),
    )
    got = migs(place(p, two))
    assert [(g[1], g[2]) for g in got] == [("3g.20gb", 4), ("3g.20gb", 0)]


@pytest.mark.parametrize(
    ("mode", "nodes"),
    [(None, {"mig", "core"}), ("mig", {"mig"}), ("hami-core", {"core"})],
)
def test_vgpu_mode_chooses_between_mig_and_hami_core_cards(
    mode: str | None, nodes: set[str]
) -> None:
    got = set()
    for first in ("mig", "core"):
        # either node may be best; pin each in turn and see which are admitted
        p = placer(cluster(mig_node("mig"), core_node("core")))
        r = req(DeviceAsk(mem=9000), vgpu_mode=mode, node_name=first)
        d = p.decide(r)
        if isinstance(d, Placement):
            got.add(d.node)
            assert (d.containers[0].devices[0].mig is not None) == (d.node == "mig")
    assert got == nodes


def test_the_frag_policy_leaves_mig_cards_to_the_exact_stage() -> None:
    p = placer(cluster(mig_node("a")), node_policy="fgd")
    got = migs(place(p, req(DeviceAsk(mem=9000))))
    assert got[0][1:3] == ("2g.10gb", 0)


# ------------------------------------------------ hami.io/vgpu-mig-allocations codec


def _grant(uuid: str, mig_slice: MigSlice | None, vendor: str = "NVIDIA") -> CardGrant:
    return CardGrant(uuid=uuid, vendor=vendor, mem=4864, cores=14, mig=mig_slice)


def test_mig_allocations_encode_as_hami() -> None:
    one = MigSlice(profile="1g.5gb", start=6, size=1)
    pod_grants = [
        ContainerGrant(name="init", init=True),
        ContainerGrant(name="a", devices=[_grant("GPU-x", None), _grant("GPU-a", one)]),
    ]
    assert hmig.encode_mig_allocations(pod_grants) == (
        '[{"containerIndex":1,"deviceIndex":1,"gpuUUID":"GPU-a","profile":"1g.5gb",'
        '"placement":{"start":6,"size":1}}]'
    )
    assert hmig.encode_mig_allocations([ContainerGrant(devices=[_grant("GPU-x", None)])]) is None
    # TestEncodeDecodeMigAllocations: the round trip keeps the reservation
    [(ci, di, gpu, got)] = hmig.decode_mig_allocations(
        hmig.encode_mig_allocations(pod_grants) or ""
    )
    assert (ci, di, gpu, got.profile, got.start, got.size) == (1, 1, "GPU-a", "1g.5gb", 6, 1)


def test_mig_allocations_keep_a_zero_runtime_id() -> None:
    # TestDecodeMigAllocationsPreservesZeroRuntimeInstanceIDs
    raw = (
        '[{"containerIndex":0,"deviceIndex":0,"gpuUUID":"GPU-a","profile":"2g.10gb",'
        '"placement":{"start":0,"size":2},"migUUID":"MIG-a","gpuInstanceID":4,"computeInstanceID":0}]'
    )
    [(_, _, _, got)] = hmig.decode_mig_allocations(raw)
    assert (got.uuid, got.gpu_instance, got.compute_instance) == ("MIG-a", 4, 0)
    back = hmig.encode_mig_allocations(
        [ContainerGrant(devices=[CardGrant(uuid="GPU-a", mem=1, cores=1, mig=got)])]
    )
    assert back == raw


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (
            '[{"containerIndex":0,"deviceIndex":0,"gpuUUID":"GPU-a","profile":"1g.5gb","placement":{"start":6,"size":1}},'
            '{"containerIndex":0,"deviceIndex":0,"gpuUUID":"GPU-a","profile":"1g.5gb","placement":{"start":5,"size":1}}]',
            "duplicate MIG allocation for container 0 device 0",
        ),
        (
            '[{"containerIndex":0,"deviceIndex":0,"gpuUUID":"GPU-a","profile":"2g.10gb",'
            '"placement":{"start":0,"size":2},"migUUID":"MIG-a"}]',
            "MIG allocation 0 has partial runtime identity",
        ),
        (
            '[{"containerIndex":0,"deviceIndex":0,"gpuUUID":"GPU-a","profile":"2g.10gb"}]',
            "MIG allocation 0 is incomplete",
        ),
        (
            '[{"containerIndex":-1,"deviceIndex":0,"gpuUUID":"G","profile":"p","placement":{"size":1}}]',
            "is incomplete",
        ),
    ],
)
def test_mig_allocations_refused_as_hami(raw: str, error: str) -> None:
    with pytest.raises(hmig.MigAllocationError, match=error):
        hmig.decode_mig_allocations(raw)
    assert hmig.decode_mig_allocations("") == []


def test_the_binder_writes_hamis_mig_annotation_only_for_mig_grants() -> None:
    from services.binder.kube import pod_annotations
    from shared.schemas import AllocDecided

    one = MigSlice(profile="2g.10gb", start=2, size=2)
    d = AllocDecided(
        uid="u", name="p", node="n", containers=[ContainerGrant(devices=[_grant("GPU-a", one)])]
    )
    got = pod_annotations(d, 1.0)
    assert hmig.decode_mig_allocations(got[hmig.MIG_ALLOCATIONS]) == [(0, 0, "GPU-a", one)]
    plain = AllocDecided(
        uid="u", name="p", node="n", containers=[ContainerGrant(devices=[_grant("GPU-a", None)])]
    )
    assert hmig.MIG_ALLOCATIONS not in pod_annotations(plain, 1.0)


def test_the_vectorised_stage_knows_each_mig_cards_capacity() -> None:
    p = placer(cluster(mig_node("a"), mig_node("b")))
    for _ in range(6):
        place(p, req(DeviceAsk(mem=9000)))  # three 2g on each card
    assert set(p.cluster.c_migcap[: p.cluster.nc].tolist()) == {4864}  # a 1g left on each
    f = fail(p, req(DeviceAsk(mem=9000)))
    # refused by the card masks, without walking the exact fit over the nodes
    assert f.tried == {} and f.message.endswith(": 2 CardMigTopologyInfeasible"), f
    one = place(p, req(DeviceAsk(mem=4000)))  # the last 1g of one card: it is full
    assert sorted(p.cluster.c_migcap[: p.cluster.nc].tolist()) == [-1, 4864]
    p.cluster.unreserve(one.node, _uid_of(p, one))
    assert set(p.cluster.c_migcap[: p.cluster.nc].tolist()) == {4864}
