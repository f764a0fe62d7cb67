"""Nodes run by HAMi's vendor plugins, in Kubernetes mode: FakeKube + real NATS +
inventory, placement and the binder. The inventory reads a Node's vendor register
annotation (or its capacity), placement fits a pod there with the family's rules, and
the binder writes the family's pod annotations beside NVIDIA's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.inventory.kube_nodes import KUBE_AGENT, NodeRegisterWatcher, node_devices
from shared import subjects
from shared.config import Config
from shared.hami import annotations as ann
from shared.kube import Kube
from shared.schemas import NodeInventory
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container

SCHED = "hami-scheduler"
NPU = "huawei.com/Ascend910B3"
REGISTER = "hami.io/node-register-Ascend910B3"


def npu_register(n: int) -> str:
    """What ascend-device-plugin writes: HAMi's DeviceInfo list."""
    return json.dumps(
        [
            {"id": f"npu-{i}", "index": i, "count": 4, "devmem": 65536, "devcore": 20,
             "type": "Ascend910B3", "numa": 0, "health": True}
            for i in range(n)
        ]
    )  # fmt: skip


@pytest.fixture
async def kc(fake: FakeKube, nats_url: str, cfg: Config) -> AsyncIterator[KubeCluster]:
    async with KubeCluster(fake, nats_url, cfg, {"gpu-node": ["A100-80GB:1"]}) as k:
        yield k


@pytest.fixture
async def watcher(kc: KubeCluster, fake: FakeKube) -> AsyncIterator[NodeRegisterWatcher]:
    assert kc.bus is not None
    kube = await Kube.connect(host=fake.url)
    w = NodeRegisterWatcher(kc.bus, kube, interval=0.2, heartbeat_interval=0.2)
    w.start()
    try:
        yield w
    finally:
        await w.stop()
        await kube.close()


def add_npu_node(fake: FakeKube, name: str, register: str) -> None:
    fake.add_node(name, capacity={"cpu": "64", "memory": "256Gi", "pods": "110"})
    fake.patch("nodes", None, name, {"metadata": {"annotations": {REGISTER: register}}})


def npu_container(name: str, n: int, mem: int) -> dict[str, Any]:
    limits = {NPU: str(n), f"{NPU}-memory": str(mem)}
    return {"name": name, "image": "app", "resources": {"limits": limits}}


def test_node_devices_decodes_register_annotations_and_capacity() -> None:
    node = {
        "metadata": {"name": "n", "annotations": {REGISTER: npu_register(2)}},
        "status": {"capacity": {"cambricon.com/mlu.smlu.vcore": "200",
                                "cambricon.com/mlu.smlu.vmemory": "200"}},
    }  # fmt: skip
    devices, problems = node_devices(node)
    assert problems == []
    npu = [(d.uuid, d.count, d.devmem) for d in devices if d.vendor == "Ascend910B3"]
    assert npu == [("npu-0", 4, 65536), ("npu-1", 4, 65536)]
    # Cambricon: cards HAMi builds from capacity (100 vcores a card)
    mlu = [d.uuid for d in devices if d.vendor == "MLU"]
    assert mlu == ["n-cambricon-mlu-0", "n-cambricon-mlu-1"] and len(devices) == 4
    bad, problems = node_devices({"metadata": {"name": "n", "annotations": {REGISTER: "[{"}}})
    assert bad == [] and len(problems) == 1 and REGISTER in problems[0]


async def test_vendor_plugin_node_is_placed_on_and_gets_the_familys_annotations(
    kc: KubeCluster, fake: FakeKube, watcher: NodeRegisterWatcher
) -> None:
    assert kc.bus is not None and kc.placement is not None
    placement = kc.placement
    add_npu_node(fake, "npu-node", npu_register(2))
    await kc.wait_for(lambda: "npu-node" in placement.cluster.nodes, desc="npu-node placed on")
    inv, _ = await kc.bus.kv_get(subjects.NODES_BUCKET, "npu-node", NodeInventory)
    assert inv is not None and inv.agent_id == KUBE_AGENT
    pod = {
        "metadata": {"name": "mixed"},
        "spec": {
            "schedulerName": SCHED,
            "containers": [npu_container("npu", 1, 10000)],
        },
    }
    fake.create("pods", pod, "default")
    bound = await kc.wait_bound("default", "mixed")
    a = bound["metadata"]["annotations"]
    assert bound["spec"]["nodeName"] == "npu-node"
    # HAMi's format: UUID,TYPE,MEM,CORES per card; memory rounded up to the vNPU template
    got = a["hami.io/Ascend910B3-devices-allocated"]
    assert got in ("npu-0,Ascend910B3,16384,0:;", "npu-1,Ascend910B3,16384,0:;"), got
    assert a["hami.io/Ascend910B3-devices-to-allocate"] == got
    assert a[ann.DEVICES_ALLOCATED] == ";"  # no NVIDIA card in the pod
    # an NVIDIA pod still goes to the NVIDIA node, with NVIDIA's annotations alone
    fake.create(
        "pods",
        {"metadata": {"name": "cuda"}, "spec": {"schedulerName": SCHED,
                                                 "containers": [gpu_container(gpu=1, gpumem=1000)]}},
        "default",
    )  # fmt: skip
    cuda = await kc.wait_bound("default", "cuda")
    assert cuda["spec"]["nodeName"] == "gpu-node"
    assert not any("Ascend" in k for k in cuda["metadata"]["annotations"])


async def test_an_agents_inventory_is_never_overwritten_and_a_gone_node_leaves(
    kc: KubeCluster, fake: FakeKube, watcher: NodeRegisterWatcher
) -> None:
    assert kc.bus is not None and kc.placement is not None
    # gpu-node has its own node agent; a register annotation on it changes nothing
    fake.patch(
        "nodes", None, "gpu-node", {"metadata": {"annotations": {REGISTER: npu_register(1)}}}
    )
    add_npu_node(fake, "npu-node", npu_register(1))
    await kc.wait_for(lambda: "npu-node" in watcher.written, desc="npu-node written")
    inv, _ = await kc.bus.kv_get(subjects.NODES_BUCKET, "gpu-node", NodeInventory)
    assert inv is not None and inv.agent_id != KUBE_AGENT
    assert {d.vendor for d in inv.devices} == {"NVIDIA"}
    fake.delete("nodes", None, "npu-node")
    await kc.wait_for(lambda: "npu-node" not in watcher.written, desc="npu-node forgotten")
    gone, _ = await kc.bus.kv_get(subjects.NODES_BUCKET, "npu-node", NodeInventory)
    assert gone is None
