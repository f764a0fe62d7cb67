"""Ascend soft mode (hami-vnpu-core) on the scheduler side, as Project-HAMi/HAMi's
pkg/device/ascend/device.go fits it: the node's ``hami-vnpu-core`` annotation decides
the node's mode, the pod's ``huawei.com/vnpu-mode`` its own; cases follow the mode rows
of that package's device_test.go (``TestDevices_Fit``: "hami-core pod on legacy node
(ModeNotFit)", "annotation-less pod on hami-core node follows node", ...)."""

from __future__ import annotations

import json

import pytest

from shared.devices import ascend
from shared.devices.base import AllocateContext, Allocated, Ask, Card, Mount, PodInfo
from shared.devices.registry import REGISTRY, allocate_response
from tests.devices.util import res

FAM = REGISTRY.family("Ascend910B3")
assert isinstance(FAM, ascend.Ascend)
REG = "hami.io/node-register-Ascend910B3"
SOFT_POD = PodInfo(annotations={ascend.VNPU_MODE: ascend.HAMI_CORE})
TEMPLATE_POD = PodInfo(annotations={ascend.VNPU_MODE: ascend.TEMPLATE})
PLAIN_POD = PodInfo()


def node(soft: bool | None, devcore: int = 20, n: int = 2) -> list[Card]:
    """A node's cards as the scheduler decodes them; ``soft`` None: no mode annotation."""
    register = [
        {"id": f"npu-{i}", "index": i, "count": 4, "devmem": 65536, "devcore": devcore,
         "type": "Ascend910B3", "health": True, "customInfo": {"NetworkID": 0}}
        for i in range(n)
    ]  # fmt: skip
    ann = {REG: json.dumps(register)}
    if soft is not None:
        ann[ascend.SOFT_NODE] = "true" if soft else "false"
    return FAM.node_cards("n1", ann, {})


def test_node_mode_comes_from_the_annotation() -> None:
    assert ascend.cards_soft(node(True)) and not ascend.cards_soft(node(False))
    assert not ascend.cards_soft(node(None))  # HAMi's global hamiVnpuCore default: off
    # a soft node's card is a 100 % core budget (an old plugin's aiCore count or 0 too),
    # more than 100 is kept; a hard node keeps its AI cores
    assert [c.totalcore for c in node(True)] == [100, 100]
    assert [c.totalcore for c in node(True, devcore=0)] == [100, 100]
    assert [c.totalcore for c in node(True, devcore=200)] == [200, 200]
    assert [c.totalcore for c in node(False)] == [20, 20]
    assert node(True)[0].custom["NetworkID"] == 0  # customInfo kept


@pytest.mark.parametrize(
    ("pod", "soft", "want"),
    [
        (SOFT_POD, True, ""),
        (SOFT_POD, False, "1/2 ModeNotFit"),  # hami-core pod on a legacy node
        (SOFT_POD, None, "1/2 ModeNotFit"),
        (TEMPLATE_POD, True, "1/2 ModeNotFit"),  # template pod on a hami-core node
        (TEMPLATE_POD, False, ""),
        (PLAIN_POD, True, ""),  # a pod naming no mode follows the node
        (PLAIN_POD, False, ""),
    ],
)
def test_mode_gate(pod: PodInfo, soft: bool | None, want: str) -> None:
    got = FAM.fit(node(soft), Ask("Ascend910B3", 1, 16384, 0, 0), pod)
    assert got.text == want and got.ok == (want == "")
    if not got.ok:
        assert got.grants == []


def test_soft_pod_memory_is_as_asked_and_cores_are_percent() -> None:
    mem = {"huawei.com/Ascend910B3": 1, "huawei.com/Ascend910B3-memory": 10000}
    soft = {**mem, "huawei.com/Ascend910B3-core": 30}
    # the webhook leaves a hami-core pod's memory as asked (a hard pod's is rounded up
    # to vir05's 16384); HAMi's GenerateResourceRequests takes it as asked only with a
    # core ask (its soft-partition signal), and rounds it up otherwise
    assert (
        FAM.admit(res(mem), SOFT_POD.annotations).resources["limits"][
            "huawei.com/Ascend910B3-memory"
        ]
        == 10000
    )
    assert FAM.admit(res(mem), {}).resources["limits"]["huawei.com/Ascend910B3-memory"] == 16384
    assert FAM.parse(res(soft), SOFT_POD.annotations) == Ask("Ascend910B3", 1, 10000, 0, 30)
    hard = FAM.parse(res(mem), SOFT_POD.annotations)
    assert hard is not None and hard.memreq == 16384
    cards = node(True)
    got = FAM.fit(cards, Ask("Ascend910B3", 1, 10000, 0, 60), SOFT_POD)
    assert got.ok and (got.grants[0].usedmem, got.grants[0].usedcores) == (10000, 60)
    # 60 % of the last card taken: another 60 % does not fit there, it goes to the other
    cards[1].used, cards[1].usedmem, cards[1].usedcores = 1, 10000, 60
    got = FAM.fit(cards, Ask("Ascend910B3", 1, 10000, 0, 60), SOFT_POD)
    assert got.ok and got.grants[0].uuid == "npu-0"
    cards[0].used, cards[0].usedcores = 1, 60
    got = FAM.fit(cards, Ask("Ascend910B3", 1, 10000, 0, 60), SOFT_POD)
    assert got.text == "2/2 CardInsufficientCore"


def test_soft_pod_gets_100_cores_even_on_an_oversold_card() -> None:
    """HAMi's Fit: a hami-core pod's card has 100 cores (effectiveTotalCore)."""
    got = FAM.fit(node(True, devcore=200), Ask("Ascend910B3", 1, 1000, 0, 100), SOFT_POD)
    assert got.ok
    cards = node(True, devcore=200, n=1)
    cards[0].used, cards[0].usedcores = 1, 50
    got = FAM.fit(cards, Ask("Ascend910B3", 1, 1000, 0, 60), SOFT_POD)
    assert got.text == "1/1 CardInsufficientCore"


def test_soft_pod_annotations_carry_memory_and_core_not_a_template() -> None:
    got = FAM.fit(node(True), Ask("Ascend910B3", 1, 10000, 0, 30), SOFT_POD)
    ann = FAM.pod_annotations(SOFT_POD, [got.grants])
    assert json.loads(ann["huawei.com/Ascend910B3"]) == [
        {"UUID": "npu-1", "memory": 10000, "core": 30}
    ]
    hard = FAM.fit(node(False), Ask("Ascend910B3", 1, 16384, 0, 0), PLAIN_POD)
    ann = FAM.pod_annotations(PLAIN_POD, [hard.grants])
    assert json.loads(ann["huawei.com/Ascend910B3"]) == [{"UUID": "npu-1", "temp": "vir05_1c_16g"}]


def test_soft_pod_allocate_answer() -> None:
    ctx = AllocateContext(
        pod_uid="uid-1", container="main", annotations=SOFT_POD.annotations, hook_path="/hook"
    )
    a = allocate_response(
        "Ascend910B3", [Allocated("npu-1", 1, 10000, 30, card_mem=65536, card_cores=100)], ctx
    )
    assert a.envs == {
        "ASCEND_VISIBLE_DEVICES": "1",
        "NPU_MEM_QUOTA": "10000",
        "NPU_PRIORITY": "30",
        "NPU_GLOBAL_SHM_PATH": "/hami-shared-region/1_global_registry",
        "NPU_LOCAL_SHM_PATH": "/hami-vnpu-shmem/vnpu_local_shmem",
    }
    mounts = {m.container_path: m for m in a.mounts}
    assert mounts["/etc/ld.so.preload"].host_path == "/usr/local/hami-vnpu-core/ld.so.preload"
    assert mounts["/hami-vnpu-core"].host_path == "/usr/local/hami-vnpu-core"
    assert mounts["/hami-vnpu-shmem"] == Mount(
        "/hook/containers/uid-1_main", "/hami-vnpu-shmem", read_only=False
    )
    assert not mounts["/hami-shared-region"].read_only
    assert mounts["/usr/local/bin/npu-smi"].read_only
    # the same card in hard mode: the runtime's vNPU template, no limiter
    hard = allocate_response(
        "Ascend910B3",
        [Allocated("npu-1", 1, 16384, 0, card_mem=65536, card_cores=20)],
        AllocateContext(pod_uid="uid-1", container="main"),
    )
    assert hard.envs == {"ASCEND_VISIBLE_DEVICES": "1", "ASCEND_VNPU_SPECS": "vir05_1c_16g"}
    assert hard.mounts == []
