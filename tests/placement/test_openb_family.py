"""bench/openb_family.py: each generated point meets its axis's definition."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.placement.replay import Task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import openb_family as fam  # noqa: E402


def _base() -> list[Task]:
    kinds = [
        ("s", 4000, 1, 500),  # sharing
        ("w", 8000, 1, 1000),  # one whole card
        ("m", 8000, 4, 1000),  # multi-card
        ("c", 2000, 0, 0),  # CPU-only
    ]
    return [Task(f"{k}{i}", cpu, 1, n, milli, ()) for i in range(50) for k, cpu, n, milli in kinds]


SPECS = [
    Task("g1", 1000, 1, 1, 300, ("T4",)),  # a sharing task's list
    Task("g2", 1000, 1, 4, 1000, ("V100M32", "G3")),  # a 4-card task's
]


@pytest.mark.parametrize("pct", [20, 40, 60, 100])
def test_gpushare_points_have_their_sharing_share(pct: int) -> None:
    tasks = fam.make("gpushare", pct, _base(), SPECS, 1)
    share = fam.describe(tasks)["sharing_pct_of_gpu"]
    assert abs(share - pct) < 2.0
    assert len({t.name for t in tasks}) == len(tasks)  # clones are named apart


@pytest.mark.parametrize("pct", [30, 50])
def test_multigpu_points_have_their_multi_card_share(pct: int) -> None:
    share = fam.describe(fam.make("multigpu", pct, _base(), SPECS, 1))["multigpu_pct_of_gpu"]
    assert abs(share - pct) < 3.0


def test_gpuspec_lists_come_from_tasks_of_the_same_kind() -> None:
    tasks = fam.make("gpuspec", 33, _base(), SPECS, 1)
    gpu = [t for t in tasks if t.num_gpu]
    frac = sum(1 for t in gpu if t.gpu_spec) / len(gpu)
    assert 0.2 < frac < 0.5
    for t in gpu:
        if t.gpu_spec and t.num_gpu == 4:
            assert t.gpu_spec == ("V100M32", "G3")
        elif t.gpu_spec and t.gpu_milli < 1000:
            assert t.gpu_spec == ("T4",)
    assert not any(t.gpu_spec for t in tasks if t.num_gpu == 0)


@pytest.mark.parametrize("factor", [0.5, 2.5])
def test_cpu_pressure_scales_the_cpu_only_tasks_cpu(factor: float) -> None:
    base = _base()
    before = sum(t.cpu_milli for t in base if t.num_gpu == 0)
    tasks = fam.make("cpu", factor, base, SPECS, 1)
    after = sum(t.cpu_milli for t in tasks if t.num_gpu == 0)
    assert abs(after / before - factor) < 0.05
    assert [t for t in tasks if t.num_gpu] != [] and sorted(
        t.name for t in tasks if t.num_gpu
    ) == sorted(t.name for t in base if t.num_gpu)  # the GPU tasks are untouched


def test_a_point_is_the_same_for_the_same_seed_and_differs_across_seeds() -> None:
    a = fam.make("gpuspec", 25, _base(), SPECS, 7)
    assert a == fam.make("gpuspec", 25, _base(), SPECS, 7)
    assert a != fam.make("gpuspec", 25, _base(), SPECS, 8)


def test_an_unknown_axis_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown axis"):
        fam.make("gpuhare", 40, _base(), SPECS, 1)
