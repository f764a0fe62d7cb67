"""Compute cap in a closed loop: the fake driver turns launches into device time and the
fake NVML reports the resulting utilisation, which drives the limiter's controller. Each
tenant runs 2 s of back-to-back launches and reports its own share of device time over
the last 1.3 s (after the controller has converged)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from shared.region import read_region, set_priority_hint

from .conftest import Node

TIMING = {"FAKE_CUDA_NS_PER_BLOCK": "1000", "FAKE_CUDA_GRAPH_NS": "500000"}


def tenant(
    node: Node, container: str, kind: str = "kernel", ms: int = 2000, warm: int = 700, **env: str
) -> subprocess.Popen[str]:
    args = ["init", "ctx", "0", "launch", kind, str(ms), "500", str(warm)]
    return node.start(args, container=container, **{**TIMING, **env})


def util(node: Node, p: subprocess.Popen[str]) -> float:
    r = node.finish(p)
    assert r.rc == 0, r.err
    line = r.one("launch")
    assert line[2] == "rc=0", line
    u = float(line[4].split("=")[1])
    return u


@pytest.mark.parametrize("kind", ["kernel", "ex", "coop", "graph"])
def test_lone_tenant_forced_cap_holds_for_every_launch_api(tmp_path: Path, kind: str) -> None:
    node = Node(tmp_path)
    p = tenant(node, "c0", kind, CUDA_DEVICE_SM_LIMIT="50", GPU_CORE_UTILIZATION_POLICY="force")
    u = util(node, p)
    # Above the cap is the failure that matters; below it, a starved CPU (CI's 2 cores,
    # the suite beside) may leave a little time unlaunched: 44.9 was seen once there.
    assert 43 <= u <= 55, u
    d = read_region(node.region("c0")).device(0)
    assert d.sm_limit == 50 and d.throttling
    assert 40 <= d.utilization <= 60
    elapsed = d.last_kernel_elapsed_s()
    assert elapsed is not None and elapsed < 5


def test_two_tenants_30_70(node: Node) -> None:
    a = tenant(node, "c0", CUDA_DEVICE_SM_LIMIT="30")
    b = tenant(node, "c1", CUDA_DEVICE_SM_LIMIT="70")
    ua, ub = util(node, a), util(node, b)
    assert 25 <= ua <= 35 and 65 <= ub <= 75, (ua, ub)
    assert read_region(node.region("c0")).device(0).contended


def test_default_policy_leaves_a_lone_tenant_uncapped(node: Node) -> None:
    u = util(node, tenant(node, "c0", CUDA_DEVICE_SM_LIMIT="30"))
    assert u >= 90, u
    d = read_region(node.region("c0")).device(0)
    assert not d.throttling and not d.contended


def test_disable_policy_never_caps(node: Node) -> None:
    env = {"CUDA_DEVICE_SM_LIMIT": "20", "GPU_CORE_UTILIZATION_POLICY": "disable"}
    a, b = tenant(node, "c0", **env), tenant(node, "c1", **env)
    ua, ub = util(node, a), util(node, b)
    assert ua + ub >= 90 and min(ua, ub) >= 35, (ua, ub)  # a fair half each, not 20


def test_processes_of_one_container_share_its_cap(node: Node) -> None:
    env = {"CUDA_DEVICE_SM_LIMIT": "40", "GPU_CORE_UTILIZATION_POLICY": "force"}
    a, b = tenant(node, "c0", **env), tenant(node, "c0", **env)
    ua, ub = util(node, a), util(node, b)
    assert 34 <= ua + ub <= 46, (ua, ub)


def test_high_priority_is_not_capped_against_low_priority(node: Node) -> None:
    hi = tenant(node, "c0", CUDA_DEVICE_SM_LIMIT="30", CUDA_TASK_PRIORITY="0")
    lo = tenant(node, "c1", CUDA_DEVICE_SM_LIMIT="30", CUDA_TASK_PRIORITY="1")
    uh, ul = util(node, hi), util(node, lo)
    assert 25 <= ul <= 35 and uh >= 60, (uh, ul)


@pytest.mark.parametrize(("priority", "suspended"), [("1", True), ("0", False)])
def test_priority_hint_suspends_only_low_priority(
    tmp_path: Path, priority: str, suspended: bool
) -> None:
    # The node agent marks the card busy with a higher-priority tenant for 1 s; a low
    # priority tenant yields for that second, a high priority one does not.
    node = Node(tmp_path)
    assert node.run(["init", "ctx", "0"]).rc == 0  # creates the region
    set_priority_hint(node.region("c0"), 0, time.time_ns() + 1_000_000_000)
    u = util(node, tenant(node, "c0", ms=1500, warm=0, CUDA_TASK_PRIORITY=priority))
    if suspended:
        assert 15 <= u <= 45, u  # ran only for the last ~0.5 s of 1.5 s
    else:
        assert u >= 85, u
    set_priority_hint(node.region("c0"), 0, 0)
    assert read_region(node.region("c0")).device(0).last_kernel_ns > 0
