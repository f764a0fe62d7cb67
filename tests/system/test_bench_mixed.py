"""The placement benchmark's mixed cluster (``--mixed``): a share of other vendors' nodes
and requests, each vendor request placed on its own family's cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import placement_inproc as pi  # noqa: E402

from services.placement.engine import Placement, Placer  # noqa: E402
from shared.config import NodeSettings, SchedulerSettings  # noqa: E402


def test_a_tenth_of_the_nodes_are_other_vendors_in_turn() -> None:
    kinds = [pi.is_vendor_node(n, 0.1) for n in range(100)]
    assert sum(k is not None for k in kinds) == 10
    assert [k for k in kinds if k is not None][:4] == [0, 1, 2, 3]
    assert all(pi.is_vendor_node(n, 0.0) is None for n in range(100))
    vendors = {d.vendor for n in range(40) for d in pi.node_devices(n, 8, 0.1)}
    assert vendors == {"NVIDIA", "MLU", "Ascend910B3", "DCU", "AMDGPU"}


def test_vendor_requests_land_on_their_familys_cards() -> None:
    cl = pi.build(80, 8, 0.1)
    card_vendor = {d.uuid: d.vendor for n in range(80) for d in pi.node_devices(n, 8, 0.1)}
    placer = Placer(cl, SchedulerSettings(node_policy="binpack"), NodeSettings(), seed=1)
    rng = np.random.default_rng(3)
    placed = {"NVIDIA": 0, "other": 0}
    for i in range(400):
        req = pi.make_request(rng, i, 0.1)
        placer.observe(req)
        got = placer.decide(req)
        if not isinstance(got, Placement):
            continue
        cl.reserve(got.node, got.to_alloc(req))
        for ask, grant in zip(req.containers, got.to_alloc(req).containers, strict=True):
            for g in grant.devices:
                assert card_vendor[g.uuid] == ask.devices[0].vendor, (req.uid, g.uuid)
            placed["NVIDIA" if ask.devices and ask.devices[0].vendor == "NVIDIA" else "other"] += 1
    assert placed["other"] > 10 and placed["NVIDIA"] > 300


def test_the_inprocess_bench_runs_mixed() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "placement_inproc.py"),
            "--nodes",
            "50",
            "--decisions",
            "200",
            "--mixed",
            "0.1",
            "--policy",
            "binpack",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["mixed"] == 0.1 and got["placed"] > 0
