"""Dynamic MIG in the engine: HAMi v2.10's profile and placement choice, table cases
from HAMi's own tests (pkg/device/nvidia/mig_topology_test.go, mig_capability_test.go),
and packing sequences on the simulated A100/H100 geometries through the whole Placer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from services.placement.engine import hami, mig
from shared.hami.mig import GEOMETRIES, geometry, max_instances
from shared.schemas import MigPlacement, MigProfile


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
        ("NVIDIA-H100-80GB-HBM3", ["1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"], 7),
        ("NVIDIA-A30", ["1g.6gb", "2g.12gb", "4g.24gb"], 4),
    ],
)
def test_geometries_of_the_simulated_models(model: str, names: list[str], count: int) -> None:
    got = geometry(model)
    assert got is not None and [p.name for p in got] == names
    assert max_instances(got) == count


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
