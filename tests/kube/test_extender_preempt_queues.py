"""The extender's ``preempt`` verb with queues: the victims follow the queue rules of
standalone preemption (docs/queues.md), not priorities alone.

FakeKube + real NATS + the real services, ``POST /preempt`` as kube-scheduler sends it.
Two one-card nodes, two queues of one card's guarantee each (pods join them by their
``hami.io/queue`` label):

  node-a: batch's older 90 % pod   (within batch's guarantee: never a victim of prod)
  node-b: batch's younger 90 % pod (beyond it: borrowed, prod may take it back)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from shared.config import Config, QueueAmount, QueueSettings
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container
from tests.kube.scheduler_loop import binding_args, extender_args

SCHED = "hami-scheduler"
NODES = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"]}
CARD = QueueAmount(memory=81920, cores=100)


@pytest.fixture
def xcfg(cfg: Config) -> Config:
    cfg.scheduler.mode = "extender"
    cfg.queues = [
        QueueSettings(name="batch", guarantee=CARD),
        QueueSettings(name="prod", guarantee=CARD),
    ]
    return cfg


@pytest.fixture
async def kc(fake: FakeKube, nats_url: str, xcfg: Config) -> AsyncIterator[KubeCluster]:
    k = KubeCluster(fake, nats_url, xcfg, NODES)
    await k.start()
    try:
        yield k
    finally:
        await k.stop()


def add_pod(fake: FakeKube, name: str, queue: str, priority: int, percent: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"gpu": 1, "gpumem-percentage": percent}
    spec: dict[str, Any] = {
        "schedulerName": SCHED,
        "priority": priority,
        "containers": [gpu_container(**limits)],
    }
    meta = {"name": name, "labels": {"hami.io/queue": queue}}
    return fake.create("pods", {"metadata": meta, "spec": spec}, "default")


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


def uid(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["uid"])


@pytest.fixture
async def batch(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> dict[str, dict[str, Any]]:
    pods = {}
    for name, node in (("old", "node-a"), ("young", "node-b")):  # bound in this order
        pod = pods[name] = add_pod(fake, name, "batch", 0, 90)
        status, res = await post(http, f"{kc.extender_url}/filter", extender_args(pod, [node]))
        assert status == 200 and res["nodenames"] == [node], res
        status, res = await post(http, f"{kc.extender_url}/bind", binding_args(pod, node))
        assert status == 200 and not res.get("error"), res
    assert kc.placement is not None and kc.placement.queues is not None
    return pods


def ask(pod: dict[str, Any], batch: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kube-scheduler counts pods and priorities: each node's pod looks like a victim."""
    return {
        "pod": pod,
        "nodeNameToMetaVictims": {
            "node-a": {"pods": [{"uid": uid(batch["old"])}], "numPDBViolations": 0},
            "node-b": {"pods": [{"uid": uid(batch["young"])}], "numPDBViolations": 0},
        },
    }


async def test_a_higher_priority_pod_of_another_queue_takes_only_the_borrowed_card(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, batch: dict[str, dict[str, Any]]
) -> None:
    high = add_pod(fake, "high", "prod", 10, 60)
    before = await kc.ledger()
    status, res = await post(http, f"{kc.extender_url}/preempt", ask(high, batch))
    assert status == 200, res
    # priority alone would offer both nodes; "old" is within batch's guarantee
    assert res == {
        "nodeNameToMetaVictims": {
            "node-b": {"pods": [{"uid": uid(batch["young"])}], "numPDBViolations": 0}
        }
    }
    assert await kc.ledger() == before  # preempt evicts nothing itself: the scheduler does


async def test_a_queue_under_its_guarantee_reclaims_at_equal_priority(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, batch: dict[str, dict[str, Any]]
) -> None:
    # prod holds nothing of its one-card guarantee: it takes back what batch borrowed,
    # though priorities alone (0 against 0) would allow no victim at all
    mine = add_pod(fake, "mine", "prod", 0, 60)
    status, res = await post(http, f"{kc.extender_url}/preempt", ask(mine, batch))
    assert status == 200, res
    assert set(res["nodeNameToMetaVictims"]) == {"node-b"}
    assert res["nodeNameToMetaVictims"]["node-b"]["pods"] == [{"uid": uid(batch["young"])}]


async def test_within_its_own_queue_lower_priorities_only(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, batch: dict[str, dict[str, Any]]
) -> None:
    same = add_pod(fake, "same", "batch", 0, 60)
    status, res = await post(http, f"{kc.extender_url}/preempt", ask(same, batch))
    assert status == 200 and res == {}  # batch is over its guarantee, nobody lower
    higher = add_pod(fake, "higher", "batch", 10, 60)
    status, res = await post(http, f"{kc.extender_url}/preempt", ask(higher, batch))
    assert status == 200
    assert set(res["nodeNameToMetaVictims"]) == {"node-a", "node-b"}
