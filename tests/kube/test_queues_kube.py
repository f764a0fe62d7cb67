"""Queues in Kubernetes: the Queue resources (hami.io/v1alpha1) through the binder.

Against the fake API server serving the chart's CRD: the binder's list and watch put
each Queue in the ``hami-queues`` bucket and placement builds its tree from them; a pod
joins a queue by its ``hami.io/queue`` label, else its namespace's default queue; a
queue's limit keeps a pod pending until the limit is raised (a Queue update); a Queue
whose spec is not a queue is left out while the others stay; a deleted Queue leaves
the tree. The CRD the chart installs is the one these objects follow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from services.binder.queues import QueueSpecError, queue_from_resource
from shared import subjects
from shared.config import Config, QueueSettings
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container

SCHED = "hami-scheduler"
NODES = {"node-a": ["A100-80GB:2"]}
CARD = 81920
CRD = Path(__file__).resolve().parents[2] / "helm" / "hami-bus" / "crds" / "queues.yaml"
QUEUES = "queues.hami.io"


@pytest.fixture
async def kc(fake: FakeKube, nats_url: str, cfg: Config) -> AsyncIterator[KubeCluster]:
    async with KubeCluster(fake, nats_url, cfg, NODES) as k:
        yield k


def queue(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hami.io/v1alpha1",
        "kind": "Queue",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def add_pod(
    fake: FakeKube, name: str, ns: str, mem: int, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    pod = {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"schedulerName": SCHED, "containers": [gpu_container(gpu=1, gpumem=mem)]},
    }
    return fake.create("pods", pod, ns)


def queue_names(kc: KubeCluster) -> set[str]:
    assert kc.placement is not None
    return set(kc.placement.queues.specs) if kc.placement.queues is not None else set()


async def test_queue_resources_order_and_limit_pods(kc: KubeCluster, fake: FakeKube) -> None:
    for ns in ("team-a", "team-b"):
        fake.add_namespace(ns)
    fake.create(
        QUEUES,
        queue(
            "research",
            "team-a",
            default=True,
            limit={"memory": CARD // 2},
            guarantee={"memory": CARD // 4, "cores": 0},
        ),
        "team-a",
    )
    fake.create(QUEUES, queue("batch", "team-b", overQuotaWeight=2.0), "team-b")
    await kc.wait_for(lambda: {"research", "batch"} <= queue_names(kc), desc="queues in placement")
    assert kc.placement is not None and kc.placement.queues is not None
    assert kc.placement.queues.ns_default == {"team-a": "research"}
    # no label: the namespace's default queue
    a1 = add_pod(fake, "a1", "team-a", 30000)
    await kc.wait_bound("team-a", "a1")
    b1 = add_pod(fake, "b1", "team-b", 10000, labels={"hami.io/queue": "batch"})
    await kc.wait_bound("team-b", "b1")
    led = await kc.ledger()
    assert led[b1["metadata"]["uid"]][1].queue == "batch"
    assert led[a1["metadata"]["uid"]][1].queue == ""  # counted against team-a's default
    # research would hold 50 000 MiB over its 40 960 limit: pending, not bound
    a2 = add_pod(fake, "a2", "team-a", 20000)
    uid2 = a2["metadata"]["uid"]
    await kc.wait_for(lambda: uid2 in kc.placement.pending, desc="a2 pending")  # type: ignore[union-attr]
    assert not fake.get("pods", "team-a", "a2")["spec"].get("nodeName")
    # an unknown queue: pending too
    x = add_pod(fake, "x", "team-b", 1000, labels={"hami.io/queue": "nope"})
    await kc.wait_for(lambda: x["metadata"]["uid"] in kc.placement.pending, desc="x pending")  # type: ignore[union-attr]
    # the limit raised by an update of the Queue: the pending pod is placed
    q = fake.get(QUEUES, "team-a", "research")
    assert q is not None
    q["spec"]["limit"] = {"memory": CARD}
    fake.update(QUEUES, q)
    await kc.wait_bound("team-a", "a2")
    # a broken Queue is left out; the others stay
    fake.create(QUEUES, queue("broken", "team-b", guarantee={"memory": "lots"}), "team-b")
    fake.create(QUEUES, queue("later", "team-b"), "team-b")
    await kc.wait_for(lambda: "later" in queue_names(kc), desc="later in placement")
    assert "broken" not in queue_names(kc) and {"research", "batch"} <= queue_names(kc)
    # deleted: gone from the bucket and from the tree
    fake.delete(QUEUES, "team-b", "later")
    await kc.wait_for(lambda: "later" not in queue_names(kc), desc="later removed")
    assert kc.bus is not None
    assert (await kc.bus.kv_get(subjects.QUEUES_BUCKET, "later", QueueSettings))[0] is None
    kept, _ = await kc.bus.kv_get(subjects.QUEUES_BUCKET, "research", QueueSettings)
    assert kept is not None and kept.limit.memory == CARD and kept.namespaces == ["team-a"]


def test_queue_objects_read_as_queue_settings() -> None:
    q = queue_from_resource(
        queue(
            "r",
            "ns1",
            parent="org",
            guarantee={"memory": 100, "cores": 50},
            modelLimits={"A100": {"memory": 10}},
            overQuotaWeight=3,
            default=True,
        )
    )
    assert q == QueueSettings(
        name="r",
        parent="org",
        guarantee=q.guarantee,
        model_limits=q.model_limits,
        over_quota_weight=3.0,
        namespaces=["ns1"],
    )
    assert (q.guarantee.memory, q.guarantee.cores, q.model_limits["A100"].memory) == (100, 50, 10)
    with pytest.raises(QueueSpecError, match="queue ns1/r: .*spec.guarantee.memory"):
        queue_from_resource(queue("r", "ns1", guarantee={"memory": "lots"}))
    with pytest.raises(QueueSpecError, match="spec.namespaces is not a Queue field"):
        queue_from_resource(queue("r", "ns1", namespaces=["x"]))


def test_the_chart_crd_describes_the_queue_fields() -> None:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "hami.io" and crd["spec"]["scope"] == "Namespaced"
    (ver,) = crd["spec"]["versions"]
    assert ver["name"] == "v1alpha1"
    props = ver["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    # every field of the spec is one QueueSettings reads (camelCase), plus 'default'
    fields = {f.encode_name for f in msgspec.structs.fields(QueueSettings)} - {"name", "namespaces"}
    assert set(props) == fields | {"default"}
