"""Kubernetes mode for other vendors: the node annotations each HAMi vendor plugin
writes (checked by decoding them as HAMi's scheduler does), the handshake, the capacity
of capacity-derived families, and each vendor's Allocate answer."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from services.nodeagent.backends.sim import SimBackend, parse_gpu_specs
from services.nodeagent.backends.vendors import FAMILIES
from services.nodeagent.backends.vendors.allocate import (
    VendorAllocateError,
    to_container_allocation,
    vendor_allocation,
)
from services.nodeagent.backends.vendors.annotations import capacity, handshake, vendor_annotations
from services.nodeagent.backends.vendors.registration import vendor_devices
from services.nodeagent.kube.annotations import NodeAnnotator, node_annotations
from services.nodeagent.registration import register
from shared import kube
from shared.config import Config
from shared.devices import enflame as enflame_rules
from shared.devices.base import AllocateContext, Allocation, Ask, Mount, PodInfo
from shared.hami.annotations import NODE_REGISTER, decode_node_devices, decode_node_devices_colon
from shared.schemas import CardGrant, Device, NodeInventory
from tests.fakekube import FakeKube

pytestmark = pytest.mark.timeout(30)
AT = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC


def node(specs: str, cfg: Config) -> NodeInventory:
    found = SimBackend("n1", parse_gpu_specs([specs])).discover()
    devices, links = register(found, cfg.node)
    return NodeInventory(
        node="n1", devices=vendor_devices(found, devices, cfg.node), links=links, published_at=AT
    )


def of(inv: NodeInventory, vendor: str) -> list[Device]:
    return [d for d in inv.devices if d.vendor == vendor]


def test_json_registers_decode_as_hamis_scheduler_reads_them(cfg: Config) -> None:
    inv = node("Ascend910B3:8,MI300X:2,P800:2,BR104:1,VA1:1", cfg)
    ann = vendor_annotations(inv.devices, AT)
    for key in ("Ascend910B3", "AMDGPU", "XPU", "Biren", "Vastai"):
        fam = FAMILIES[key]
        decoded = decode_node_devices(ann[fam.register_annotation], key)
        mine = of(inv, key)
        assert [(d.uuid, d.index, d.count, d.devmem, d.devcore, d.type) for d in decoded] == [
            (d.uuid, d.index, d.count, d.devmem, d.devcore, d.type) for d in mine
        ], key
    amd = json.loads(ann["hami.io/node-amd-register"])
    assert amd[0]["deviceVendor"] == "amd" and amd[0]["customInfo"] == {"pciBDF": "0000:0c:00.0"}
    npu = json.loads(ann["hami.io/node-register-Ascend910B3"])
    assert [d.get("customInfo", {}).get("NetworkID") for d in npu] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(npu[1]) == [
        "id",
        "index",
        "count",
        "devmem",
        "devcore",
        "type",
        "health",
        "customInfo",
    ]
    assert ann["hami-vnpu-core"] == "false"


def test_colon_registers_of_hygon_and_iluvatar(cfg: Config) -> None:
    inv = node("K100-AI:2,BI-V150:1", cfg)
    ann = vendor_annotations(inv.devices, AT)
    dcu = decode_node_devices_colon(ann["hami.io/node-dcu-register"], "DCU")
    assert [(d.uuid, d.count, d.type, d.index) for d in dcu] == [
        (d.uuid, 4, "DCU-K100-AI", d.index) for d in of(inv, "DCU")
    ]
    ix = decode_node_devices_colon(ann["hami.io/node-BI-V150-register"], "BI-V150")
    assert ix[0].type == "Iluvatar-BI-V150" and ix[0].devmem == 65536


def test_handshakes_in_each_plugins_format(cfg: Config) -> None:
    ann = vendor_annotations(node("Ascend910B3:1,K100-AI:1,P800:1", cfg).devices, AT)
    assert ann["hami.io/node-handshake-Ascend910B3"] == "Reported_2026.05.28 20:26:40"
    assert ann["hami.io/node-handshake-dcu"] == "Reported 2026-05-28 20:26:40"
    assert ann["hami.io/node-handshake-xpu"].startswith("Reported ")
    assert handshake(FAMILIES["AMDGPU"], AT).startswith("Reported ")


def test_vendor_json_of_metax_and_enflame(cfg: Config) -> None:
    ann = vendor_annotations(node("C500:2,S60:2", cfg).devices, AT)
    mx = json.loads(ann["metax-tech.com/node-gpu-devices"])
    assert set(mx[0]) == {
        "uuid",
        "bdf",
        "model",
        "totalDevCount",
        "totalCompute",
        "totalVRam",
        "availableDevCount",
        "availableCompute",
        "availableVRam",
        "numa",
        "healthy",
        "qosPolicy",
        "linkZone",
    }
    assert (mx[0]["model"], mx[0]["qosPolicy"], mx[0]["availableVRam"]) == (
        "MXC500",
        "best-effort",
        65536,
    )
    gcu = json.loads(ann["enflame.com/gcu-drs-capacity"])
    assert gcu["devices"] == [  # gcushare's strings: HAMi decodes index and minor as text
        {"index": "0", "minor": "0", "capacity": 6},
        {"index": "1", "minor": "1", "capacity": 6},
    ]
    assert all(re.fullmatch(r"\d+g\.\d+gb", p) for p in gcu["profiles"])
    assert all(isinstance(i, str) for i in gcu["profiles"].values())
    # HAMi's DRS type reads it back: six slices, the largest profile's memory, and a
    # 3-slice ask gets the 3-slice profile
    cards = enflame_rules.DRS.node_cards("n", ann, {})
    assert [(c.id, c.count, c.totalmem) for c in cards] == [
        ("n-enflame-drs-0", 6, 49152),
        ("n-enflame-drs-1", 6, 49152),
    ]
    ask = enflame_rules.DRS.parse({"limits": {"enflame.com/drs-gcu": 3}}) or Ask("", 0)
    got = enflame_rules.DRS.fit(cards, ask, PodInfo())
    assert got.ok and got.grants[0].custom is not None
    assert (got.grants[0].custom["profileName"], got.grants[0].usedmem) == ("3g.24gb", 24576)


def test_capacity_families_write_no_register_but_count_resources(cfg: Config) -> None:
    inv = node("MLU370:4,inf2:3,MTT-S4000:1", cfg)
    assert vendor_annotations(inv.devices, AT) == {}
    assert capacity(inv.devices) == {
        "cambricon.com/vmlu": 4,
        "cambricon.com/mlu.smlu.vcore": 400,
        "aws.amazon.com/neuron": 3,
        "aws.amazon.com/neuroncore": 6,
        "mthreads.com/vgpu": 1,
        "mthreads.com/sgpu-core": 16,
    }


def test_mixed_node_keeps_the_nvidia_register_to_nvidia_cards(cfg: Config) -> None:
    inv = node("A100-40GB:2,Ascend910B3:2", cfg)
    ann = node_annotations(inv)
    nv = decode_node_devices(ann[NODE_REGISTER])
    assert [d.type for d in nv] == ["NVIDIA-A100-40GB"] * 2
    assert "hami.io/node-register-Ascend910B3" in ann
    only_npu = node_annotations(node("Ascend910B3:2", cfg))
    assert NODE_REGISTER not in only_npu  # no NVIDIA cards: no NVIDIA register


async def test_annotator_writes_vendor_annotations_to_the_node(cfg: Config) -> None:
    async with FakeKube() as fk:
        fk.add_node("n1")
        client = await kube.Kube.connect(host=fk.url)
        ann = NodeAnnotator(client, "n1", retry_initial=0.05)
        ann.start()
        try:
            await ann.on_inventory(node("K100-AI:2,MI300X:1", cfg))
            async with asyncio.timeout(5):
                await ann.wait_synced()
            got = fk.get("nodes", None, "n1")["metadata"]["annotations"]  # type: ignore[index]
            assert got["hami.io/node-handshake-dcu"].startswith("Reported ")
            assert len(decode_node_devices_colon(got["hami.io/node-dcu-register"], "DCU")) == 2
            assert json.loads(got["hami.io/node-amd-register"])[0]["devcore"] == 304
        finally:
            await ann.stop()
            await client.close()


# --------------------------------------------------------------------------- Allocate


def grants(
    inv: NodeInventory, vendor: str, n: int, mem: int = 0, cores: int = 100
) -> list[CardGrant]:
    return [
        CardGrant(
            uuid=d.uuid, index=d.index, type=d.type, vendor=vendor, mem=mem or d.devmem, cores=cores
        )
        for d in of(inv, vendor)[:n]
    ]


def answer(
    inv: NodeInventory, vendor: str, g: list[CardGrant], ctx: AllocateContext | None = None
) -> Allocation:
    return vendor_allocation(vendor, g, {d.uuid: d for d in inv.devices}, ctx)


def hosts(a: Allocation) -> list[str]:
    return [d.host_path for d in a.devices]


def test_ascend_whole_cards_template_slice_and_soft_mode(cfg: Config) -> None:
    inv = node("Ascend910B3:8", cfg)
    whole = answer(inv, "Ascend910B3", grants(inv, "Ascend910B3", 2))
    assert whole.envs == {"ASCEND_VISIBLE_DEVICES": "0,1"}
    part = answer(inv, "Ascend910B3", grants(inv, "Ascend910B3", 1, mem=16384, cores=25))
    assert part.envs == {"ASCEND_VISIBLE_DEVICES": "0", "ASCEND_VNPU_SPECS": "vir05_1c_16g"}
    soft = answer(
        inv,
        "Ascend910B3",
        grants(inv, "Ascend910B3", 1, mem=10000, cores=30),
        AllocateContext("u1", "c", {"huawei.com/vnpu-mode": "hami-core"}),
    )
    assert (soft.envs["NPU_MEM_QUOTA"], soft.envs["NPU_PRIORITY"]) == ("10000", "30")
    assert Mount("/usr/local/hami/containers/u1_c", "/hami-vnpu-shmem", False) in soft.mounts
    assert Mount("/usr/local/hami-vnpu-core/ld.so.preload", "/etc/ld.so.preload") in soft.mounts


def test_hygon_devices_mounts_and_vdev_file(cfg: Config) -> None:
    inv = node("K100-AI:2", cfg)
    ctx = AllocateContext("u", "c")
    a = answer(inv, "DCU", grants(inv, "DCU", 2)[1:], ctx)
    assert hosts(a) == ["/dev/kfd", "/dev/mkfd", "/dev/dri/card1", "/dev/dri/renderD129"]
    assert not a.files and not any(k.endswith("VISIBLE_DEVICES") for k in a.envs)
    part = answer(inv, "DCU", grants(inv, "DCU", 1, mem=8192, cores=25), ctx)
    ((path, text),) = part.files.items()
    assert path == "/etc/vdev/docker/u_c/vdev0.conf"
    assert "mem: 8192 MiB" in text and "cu_count: 30" in text and "enable: 1" in text
    assert Mount("/etc/vdev/docker/u_c", "/etc/vdev/docker") in part.mounts
    assert text.count("cu_mask:") == 2


def test_amd_cu_mask_and_memory_limiter(cfg: Config) -> None:
    inv = node("MI300X:2", cfg)
    whole = answer(inv, "AMDGPU", grants(inv, "AMDGPU", 2, cores=304))
    uuids = [d.uuid for d in of(inv, "AMDGPU")]
    assert whole.envs == {
        "ROCR_VISIBLE_DEVICES": ",".join(uuids),
        "HIP_VISIBLE_DEVICES": "0,1",
        "HSA_CU_MASK": "0:0-303;1:0-303",
    }
    assert hosts(whole) == [
        "/dev/kfd",
        "/dev/dri/card0",
        "/dev/dri/renderD128",
        "/dev/dri/card1",
        "/dev/dri/renderD129",
    ]
    # placement books an AMD slice's cores as CUs (half of 304)
    part = answer(inv, "AMDGPU", grants(inv, "AMDGPU", 1, mem=65536, cores=152))
    assert part.envs["HSA_CU_MASK"] == "0:0-151"
    assert part.envs["HIP_DEVICE_MEMORY_LIMIT"] == "65536m"
    assert part.envs["LD_AUDIT"].endswith("libamvgpu.so")


@pytest.mark.parametrize("specs,vendor,env,devices", [
    ("MLU370:2", "MLU", {"CAMBRICON_VISIBLE_DEVICES": "0,1"},
     ["/dev/cambricon_dev0", "/dev/cambricon_ipcm0", "/dev/cambricon_dev1", "/dev/cambricon_ipcm1", "/dev/cambricon_ctl"]),
    ("BI-V150:2", "BI-V150", {"IX_VISIBLE_DEVICES": "0,1"}, ["/dev/iluvatar0", "/dev/iluvatar1", "/dev/itrctl"]),
    ("P800:2", "XPU", {"XPU_VISIBLE_DEVICES": "0,1"}, ["/dev/xpu0", "/dev/xpu1", "/dev/xpuctrl"]),
    ("MTT-S4000:2", "Mthreads", {"MTHREADS_VISIBLE_DEVICES": "0,1", "MTHREADS_DRIVER_CAPABILITIES": "compute,utility"}, []),
    ("S60:2", "GCU", {"ENFLAME_VISIBLE_DEVICES": "0,1"}, []),
    ("C500:1", "Metax-SGPU", {"METAX_VISIBLE_DEVICES": "0"}, []),
])  # fmt: skip
def test_whole_card_answers(
    cfg: Config, specs: str, vendor: str, env: dict[str, str], devices: list[str]
) -> None:
    inv = node(specs, cfg)
    n = len(of(inv, vendor))
    a = answer(inv, vendor, grants(inv, vendor, n, cores=of(inv, vendor)[0].devcore))
    assert a.envs == env and hosts(a) == devices
    pb = to_container_allocation(a)
    assert pb.envs == env and [h for _, h, _ in pb.devices] == devices


def test_partial_answers_cambricon_neuron(cfg: Config) -> None:
    inv = node("MLU370:1,trn1:2", cfg)
    mlu = answer(inv, "MLU", grants(inv, "MLU", 1, mem=4096, cores=20))
    assert "/dev/cambricon-caps/cap_dev0_mi0" in hosts(mlu)
    # Neuron grants carry core bits: bit 0 of device 1 is the node's core 2
    nc = answer(inv, "AWSNeuron", [grants(inv, "AWSNeuron", 2, cores=1)[1]])
    assert nc.envs["NEURON_RT_VISIBLE_CORES"] == "2" and hosts(nc) == ["/dev/neuron1"]
    both = answer(inv, "AWSNeuron", grants(inv, "AWSNeuron", 2, cores=0))
    assert both.envs["NEURON_RT_VISIBLE_CORES"] == "0,1,2,3"


def test_allocate_refuses_what_it_cannot_answer(cfg: Config) -> None:
    inv = node("MLU370:1", cfg)
    with pytest.raises(VendorAllocateError, match="no vendor family"):
        answer(inv, "NVIDIA", grants(inv, "MLU", 1))
    with pytest.raises(VendorAllocateError, match="no DCU card"):
        answer(inv, "DCU", grants(inv, "MLU", 1))
    ghost = [CardGrant(uuid="MLU-none", vendor="MLU", mem=1, cores=1)]
    with pytest.raises(VendorAllocateError, match="not registered"):
        answer(inv, "MLU", ghost)


async def test_handshake_is_reported_again_after_the_scheduler_asks(cfg: Config) -> None:
    async with FakeKube() as fk:
        fk.add_node("n1")
        client = await kube.Kube.connect(host=fk.url)
        ann = NodeAnnotator(client, "n1", retry_initial=0.05, handshake_every=0.1)
        ann.start()
        try:
            await ann.on_inventory(node("K100-AI:1", cfg))  # published_at: a past time
            async with asyncio.timeout(5):
                await ann.wait_synced()
            first = ann.written["hami.io/node-handshake-dcu"]
            # HAMi's scheduler marks the node as asked ...
            await client.patch(
                kube.path("nodes", name="n1"),
                {
                    "metadata": {
                        "annotations": {
                            "hami.io/node-handshake-dcu": "Requesting_2026.05.28 20:27:00"
                        }
                    }
                },
            )
            # ... and the annotator reports again with the current time, unprompted
            async with asyncio.timeout(5):
                while ann.written["hami.io/node-handshake-dcu"] == first:  # noqa: ASYNC110 - polled state
                    await asyncio.sleep(0.05)
                await ann.wait_synced()
            got = fk.get("nodes", None, "n1")["metadata"]["annotations"]  # type: ignore[index]
            assert got["hami.io/node-handshake-dcu"].startswith("Reported ")
            assert got["hami.io/node-handshake-dcu"] != first
        finally:
            await ann.stop()
            await client.close()


def test_hygon_memory_slice_without_cores_keeps_every_cu(cfg: Config) -> None:
    inv = node("K100-AI:1", cfg)
    a = answer(inv, "DCU", grants(inv, "DCU", 1, mem=4096, cores=0), AllocateContext("u", "c"))
    ((_, text),) = a.files.items()
    assert "cu_count: 120" in text and "mem: 4096 MiB" in text
