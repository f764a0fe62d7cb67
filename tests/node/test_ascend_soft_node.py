"""Ascend soft mode (hami-vnpu-core) on the node side: the node setting, the register
annotations ascend-device-plugin writes in each mode (``registerHAMi`` in its
internal/server/register.go), and the round trip through the scheduler's decoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.inventory.kube_nodes import node_devices
from services.nodeagent.backends.sim import SimBackend, parse_gpu_specs
from services.nodeagent.backends.vendors.annotations import vendor_annotations
from services.nodeagent.backends.vendors.registration import vendor_devices
from services.nodeagent.kube.annotations import node_annotations
from services.nodeagent.registration import register
from services.placement.engine.model import Failure, Placement
from shared import config
from shared.devices import ascend
from shared.devices.base import Ask, PodInfo
from shared.devices.registry import REGISTRY
from shared.hami.codec import pod_request
from shared.schemas import Device, NodeInventory
from tests.placement.util import cluster, placer

AT = 1_780_000_000.0
REG = "hami.io/node-register-Ascend910B3"


def devices(specs: str = "Ascend910B3:2,MI300X:1", soft: bool = False) -> list[Device]:
    """The node's cards as the agent registers them (``soft``: node.ascendSoftMode)."""
    cfg = config.Config()
    cfg.node.ascend_soft_mode = soft
    found = SimBackend("n1", parse_gpu_specs([specs])).discover()
    regd, _ = register(found, cfg.node)
    return vendor_devices(found, regd, cfg.node)


def test_setting_defaults_off_and_reads_from_file_and_env(tmp_path: Path) -> None:
    assert config.Config().node.ascend_soft_mode is False
    assert config.load(env={"HAMI__NODE__ASCENDSOFTMODE": "true"}).node.ascend_soft_mode
    path = tmp_path / "c.yaml"
    path.write_text("node:\n  ascendSoftMode: true\n")
    assert config.load(path, env={}).node.ascend_soft_mode is True
    with pytest.raises(config.ConfigError, match="ascendSoftMode"):
        config.load(env={"HAMI__NODE__ASCENDSOFTMODE": "[1]"})


def test_hard_mode_registers_ai_cores_and_says_false() -> None:
    ann = vendor_annotations(devices(), AT)
    assert ann["hami-vnpu-core"] == "false"
    cards = json.loads(ann[REG])
    assert [c["devcore"] for c in cards] == [20, 20]  # 910B3's aiCore
    assert ann["hami.io/node-handshake-Ascend910B3"].startswith("Reported_")


def test_soft_mode_registers_100_percent_cores_and_says_true() -> None:
    hard = json.loads(vendor_annotations(devices(), AT)[REG])
    ann = vendor_annotations(devices(soft=True), AT)
    assert ann["hami-vnpu-core"] == "true"
    soft = json.loads(ann[REG])
    assert [c["devcore"] for c in soft] == [100, 100]
    # only devcore changes: ids, slots, memory, type and NetworkID are the plugin's same
    for h, s in zip(hard, soft, strict=True):
        assert {k: v for k, v in h.items() if k != "devcore"} == {
            k: v for k, v in s.items() if k != "devcore"
        }
    # another vendor on the node is untouched by the Ascend setting
    assert (
        ann["hami.io/node-amd-register"]
        == vendor_annotations(devices(), AT)["hami.io/node-amd-register"]
    )


def test_no_ascend_card_no_vnpu_core_annotation() -> None:
    ann = vendor_annotations(devices("MI300X:1", soft=True), AT)
    assert "hami-vnpu-core" not in ann


def test_soft_registration_round_trips_to_a_soft_fit() -> None:
    """The scheduler decodes what the agent wrote: soft pods fit only a soft node."""
    fam = REGISTRY.family("Ascend910B3")
    assert isinstance(fam, ascend.Ascend)
    soft_pod = PodInfo(annotations={ascend.VNPU_MODE: ascend.HAMI_CORE})
    ask = Ask("Ascend910B3", 1, 10000, 0, 30)
    for soft, want in ((True, ""), (False, "1/2 ModeNotFit")):
        ann = vendor_annotations(devices(soft=soft), AT)
        cards = fam.node_cards("n1", ann, {})
        got = fam.fit(cards, ask, soft_pod)
        assert got.text == want
        if soft:
            assert got.ok and got.grants[0].usedmem == 10000 and got.grants[0].usedcores == 30


def test_the_agents_node_annotations_follow_the_setting() -> None:
    # what the Kubernetes-mode agent patches onto its Node (NodeAnnotator)
    inv = NodeInventory(node="n1", devices=devices("Ascend910B3:2"), published_at=AT)
    assert node_annotations(inv)["hami-vnpu-core"] == "false"
    soft = node_annotations(
        NodeInventory(node="n1", devices=devices("Ascend910B3:2", soft=True), published_at=AT)
    )
    assert soft["hami-vnpu-core"] == "true"
    assert [c["devcore"] for c in json.loads(soft[REG])] == [100, 100]


def soft_cluster_pod(mode: str) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": f"u-{mode}",
            "name": f"p-{mode}",
            "namespace": "ns",
            "annotations": {ascend.VNPU_MODE: mode} if mode else {},
        },
        "spec": {
            "containers": [
                {
                    "name": "npu",
                    "resources": {
                        # a soft pod asks a core share (percent); a template pod's
                        # template sets its AI cores
                        "limits": {
                            "huawei.com/Ascend910B3": 1,
                            "huawei.com/Ascend910B3-memory": 10000,
                        }
                        | ({"huawei.com/Ascend910B3-core": 30} if mode == ascend.HAMI_CORE else {})
                    },
                }
            ]
        },
    }


def test_placement_puts_soft_pods_on_soft_nodes_and_template_pods_on_hard_ones() -> None:
    # end to end: the agent registers (node.ascendSoftMode on one node), placement reads
    # the inventory, the pod's vnpu-mode annotation reaches the family's fit
    def node(name: str, soft: bool) -> NodeInventory:
        cfg = config.Config()
        cfg.node.ascend_soft_mode = soft
        found = SimBackend(name, parse_gpu_specs(["Ascend910B3:2"])).discover()
        regd, _ = register(found, cfg.node)
        return NodeInventory(node=name, devices=vendor_devices(found, regd, cfg.node))

    soft, hard = node("soft", True), node("hard", False)
    assert {d.devcore for d in soft.devices} == {100} and {d.devcore for d in hard.devices} == {20}
    p = placer(cluster(soft, hard))
    got = p.decide(pod_request(soft_cluster_pod(ascend.HAMI_CORE)))
    assert isinstance(got, Placement) and got.node == "soft"
    got = p.decide(pod_request(soft_cluster_pod(ascend.TEMPLATE)))
    assert isinstance(got, Placement) and got.node == "hard"
    # only hard nodes left: a soft pod fits none, and HAMi's reason says why
    p = placer(cluster(node("hard", False)))
    failed = p.decide(pod_request(soft_cluster_pod(ascend.HAMI_CORE)))
    assert isinstance(failed, Failure) and ascend.MODE_NOT_FIT in failed.message


def test_a_node_that_hamis_ascend_plugin_registered_in_soft_mode_takes_soft_pods() -> None:
    # Kubernetes: ascend-device-plugin's annotations, read by the inventory service
    # (kube_nodes), then placement: the soft mark must survive into the fit
    register = [
        {"id": f"npu-{i}", "index": i, "count": 4, "devmem": 65536, "devcore": 100,
         "type": "Ascend910B3", "health": True, "customInfo": {"NetworkID": 0}}
        for i in range(2)
    ]  # fmt: skip

    def k8s_node(name: str, soft: bool) -> NodeInventory:
        ann = {REG: json.dumps(register), "hami-vnpu-core": "true" if soft else "false"}
        devices, problems = node_devices({"metadata": {"name": name, "annotations": ann}}, now=AT)
        assert problems == []
        return NodeInventory(node=name, devices=devices)

    soft = k8s_node("soft", True)
    assert {d.mode for d in soft.devices} == {ascend.SOFT_NODE}
    assert all("mode" not in d.custom_info for d in soft.devices)  # customInfo as registered
    p = placer(cluster(soft, k8s_node("hard", False)))
    got = p.decide(pod_request(soft_cluster_pod(ascend.HAMI_CORE)))
    assert isinstance(got, Placement) and got.node == "soft"
    got = p.decide(pod_request(soft_cluster_pod(ascend.TEMPLATE)))
    assert isinstance(got, Placement) and got.node == "hard"
