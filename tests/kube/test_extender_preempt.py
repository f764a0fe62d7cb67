"""The extender's ``preempt`` verb, end to end: FakeKube + real NATS + the real
services, ``POST /preempt`` over real HTTP with bodies shaped as kube-scheduler marshals
``ExtenderPreemptionArgs`` (``pod``, ``nodeToVictims`` with whole pods when the extender
is not nodeCacheCapable, ``nodeNameToMetaVictims`` with uids when it is), answered with
``ExtenderPreemptionResult{nodeNameToMetaVictims}``.

The cluster: three one-card nodes, filled through filter and bind.
  node-a: two half-card pods of priority 0        (a slice of 60 % needs both gone)
  node-b: one 90 % pod of priority 0              (one victim makes room)
  node-c: one 90 % pod of priority 50             (above the preemptor's 10: never)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from shared.config import Config
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container
from tests.kube.scheduler_loop import binding_args, extender_args

SCHED = "hami-scheduler"
NODES = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"], "node-c": ["A100-80GB:1"]}


@pytest.fixture
def xcfg(cfg: Config) -> Config:
    cfg.scheduler.mode = "extender"
    return cfg


@pytest.fixture
async def kc(fake: FakeKube, nats_url: str, xcfg: Config) -> AsyncIterator[KubeCluster]:
    k = KubeCluster(fake, nats_url, xcfg, NODES)
    await k.start()
    try:
        yield k
    finally:
        await k.stop()


def add_pod(fake: FakeKube, name: str, priority: int | None, **limits: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"schedulerName": SCHED, "containers": [gpu_container(**limits)]}
    if priority is not None:
        spec["priority"] = priority  # what admission writes from the priorityClassName
    return fake.create("pods", {"metadata": {"name": name}, "spec": spec}, "default")


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.post(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def run_on(
    http: aiohttp.ClientSession, kc: KubeCluster, pod: dict[str, Any], node: str
) -> None:
    status, res = await post(http, f"{kc.extender_url}/filter", extender_args(pod, [node]))
    assert status == 200 and res["nodenames"] == [node], res
    status, res = await post(http, f"{kc.extender_url}/bind", binding_args(pod, node))
    assert status == 200 and not res.get("error"), res


def uid(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["uid"])


@pytest.fixture
async def full(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> dict[str, dict[str, Any]]:
    pods = {
        "a1": add_pod(fake, "a1", 0, gpu=1, **{"gpumem-percentage": 50}),
        "a2": add_pod(fake, "a2", 0, gpu=1, **{"gpumem-percentage": 50}),
        "b1": add_pod(fake, "b1", 0, gpu=1, **{"gpumem-percentage": 90}),
        "c1": add_pod(fake, "c1", 50, gpu=1, **{"gpumem-percentage": 90}),
    }
    for name, pod in pods.items():
        await run_on(http, kc, pod, f"node-{name[0]}")
    return pods


def whole(pod: dict[str, Any]) -> dict[str, Any]:
    """A victim as ``nodeToVictims`` carries it: the whole v1.Pod."""
    return pod


async def test_victims_are_slice_aware_per_node(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, full: dict[str, dict[str, Any]]
) -> None:
    high = add_pod(fake, "high", 10, gpu=1, **{"gpumem-percentage": 60})
    # kube-scheduler counts pods: one victim per node looks enough to it.
    body = {
        "pod": high,
        "nodeToVictims": {
            "node-a": {"pods": [whole(full["a2"])], "numPDBViolations": 0},
            "node-b": {"pods": [whole(full["b1"])], "numPDBViolations": 1},
            "node-c": {"pods": [], "numPDBViolations": 0},
        },
    }
    before = await kc.ledger()
    status, res = await post(http, f"{kc.extender_url}/preempt", body)
    assert status == 200, res
    got = res["nodeNameToMetaVictims"]
    # node-a: both halves must go, although the scheduler named one; node-c: nobody of
    # lower priority holds its card, so it is left out
    assert set(got) == {"node-a", "node-b"}
    assert sorted(p["uid"] for p in got["node-a"]["pods"]) == sorted(
        [uid(full["a1"]), uid(full["a2"])]
    )
    assert got["node-b"] == {"pods": [{"uid": uid(full["b1"])}], "numPDBViolations": 1}
    assert await kc.ledger() == before  # preempt evicts nothing itself: the scheduler does


async def test_meta_victims_take_the_ledgers_priorities(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, full: dict[str, dict[str, Any]]
) -> None:
    # nodeCacheCapable: uids only; c1's priority 50 comes from its ledger entry. node-a
    # comes with no victims (kube-scheduler's own filters fit there: they ignore HAMi's
    # resources); the slice needs both of its pods gone.
    mid = add_pod(fake, "mid", 40, gpu=1, **{"gpumem-percentage": 60})
    body = {
        "pod": mid,
        "nodeNameToMetaVictims": {
            "node-a": {"pods": [], "numPDBViolations": 0},
            "node-b": {"pods": [{"uid": uid(full["b1"])}], "numPDBViolations": 0},
            "node-c": {"pods": [{"uid": uid(full["c1"])}], "numPDBViolations": 0},
        },
    }
    status, res = await post(http, f"{kc.extender_url}/preempt", body)
    assert status == 200, res
    got = res["nodeNameToMetaVictims"]
    assert set(got) == {"node-a", "node-b"}
    assert got["node-b"] == {"pods": [{"uid": uid(full["b1"])}], "numPDBViolations": 0}
    assert sorted(p["uid"] for p in got["node-a"]["pods"]) == sorted(
        [uid(full["a1"]), uid(full["a2"])]
    )
    top = add_pod(fake, "top", 60, gpu=1, **{"gpumem-percentage": 60})
    status, res = await post(http, f"{kc.extender_url}/preempt", {**body, "pod": top})
    assert status == 200
    assert set(res["nodeNameToMetaVictims"]) == {"node-a", "node-b", "node-c"}


async def test_no_victims_for_a_request_no_node_can_hold(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, full: dict[str, dict[str, Any]]
) -> None:
    two = add_pod(fake, "two", 1000, gpu=2, **{"gpumem-percentage": 10})  # one-card nodes
    body = {"pod": two, "nodeNameToMetaVictims": {"node-a": {"pods": [{"uid": uid(full["a1"])}]}}}
    status, res = await post(http, f"{kc.extender_url}/preempt", body)
    assert status == 200 and res == {}  # Go's omitempty: no nodes, no key


async def test_a_pod_without_hami_devices_keeps_the_schedulers_choice(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, full: dict[str, dict[str, Any]]
) -> None:
    plain = fake.create(
        "pods",
        {
            "metadata": {"name": "plain"},
            "spec": {"schedulerName": SCHED, "priority": 5, "containers": [gpu_container()]},
        },
        "default",
    )
    body = {
        "pod": plain,
        "NodeNameToMetaVictims": {
            "node-b": {"Pods": [{"UID": uid(full["b1"])}], "NumPDBViolations": 2}
        },
    }
    status, res = await post(
        http, f"{kc.extender_url}/preempt", body
    )  # Go matches keys case-insensitively
    assert status == 200
    assert res == {
        "nodeNameToMetaVictims": {
            "node-b": {"pods": [{"uid": uid(full["b1"])}], "numPDBViolations": 2}
        }
    }


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        {"pod": "x"},
        {"pod": {"metadata": {"name": "n"}}},
        {"pod": {"metadata": {"name": "n", "uid": "u"}}, "nodeToVictims": []},
        {
            "pod": {"metadata": {"name": "n", "uid": "u"}},
            "nodeNameToMetaVictims": {"node-a": {"pods": [{}]}},
        },
    ],
)
async def test_bad_bodies_are_refused(
    kc: KubeCluster, http: aiohttp.ClientSession, body: Any
) -> None:
    status, res = await post(http, f"{kc.extender_url}/preempt", body)
    assert status == 400 and res["error"].startswith("ExtenderPreemptionArgs")
