"""Simulated cards of every vendor: the --sim-gpus parser, what each vendor's cards look
like and register as, and a mixed node's inventory and telemetry over a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends.sim import (
    GpuSpec,
    SimBackend,
    SimSpecError,
    parse_gpu_spec,
    parse_gpu_specs,
)
from services.nodeagent.backends.vendors import FAMILIES, ascend, find_model, model_names
from services.nodeagent.backends.vendors.registration import vendor_devices
from services.nodeagent.registration import register
from services.nodeagent.slices import SliceWriter
from services.nodeagent.telemetry import TelemetryPublisher
from shared import subjects
from shared.bus import Bus, decode
from shared.config import Config
from shared.schemas import Device, NodeInventory, Telemetry
from tests.node.util import grant, pod

pytestmark = pytest.mark.timeout(30)

# One model of every vendor, with the device type its cards register under.
ONE_OF_EACH = {
    "Ascend910B3": "Ascend910B3", "Ascend310P": "Ascend310P", "MLU370": "MLU", "K100-AI": "DCU",
    "BI-V150": "BI-V150", "MTT-S4000": "Mthreads", "C500": "Metax-SGPU", "P800": "XPU", "S60": "GCU",
    "inf2": "AWSNeuron", "trn1": "AWSNeuron", "MI300X": "AMDGPU", "BR104": "Biren", "VA1": "Vastai",
}  # fmt: skip


def inventory(specs: str, cfg: Config, node: str = "n") -> tuple[SimBackend, list, list[list[int]]]:  # type: ignore[type-arg]
    b = SimBackend(node, parse_gpu_specs([specs]))
    found = b.discover()
    devices, links = register(found, cfg.node)
    return b, vendor_devices(found, devices, cfg.node), links


@pytest.mark.parametrize("name,key", ONE_OF_EACH.items())
def test_each_vendor_model_parses_to_its_family(name: str, key: str) -> None:
    spec = parse_gpu_spec(f"{name}:2")
    fam, model = find_model(name) or (None, None)
    assert spec.vendor == key and fam is FAMILIES[key] and model is not None
    assert spec.memory_mib == model.memory_mib and spec.count == 2


def test_comma_lists_mix_vendors_and_keep_nvidia_specs_unchanged() -> None:
    specs = parse_gpu_specs(["Ascend910B3:8,MLU370:4,A100-40GB:2", "T4:1:15360"])
    assert [(s.vendor, s.model, s.count) for s in specs] == [
        ("Ascend910B3", "Ascend910B3", 8),
        ("MLU", "MLU370-X4", 4),
        ("NVIDIA", "A100-40GB", 2),
        ("NVIDIA", "T4", 1),
    ]
    assert specs[2] == GpuSpec(model="A100-40GB", count=2, memory_mib=40960)  # as before
    assert parse_gpu_spec("A100-SXM4-40GB:2:mig").mode == "mig"
    assert parse_gpu_spec("mi300x:1:100000").memory_mib == 100000  # names are case-insensitive


@pytest.mark.parametrize("bad,why", [
    ("Ascend910B3:8,", "empty entry"), ("MLU370:x", "integers"), ("MI300X:2:mig", "no MIG mode"),
    ("S60:65", "0..64"),
])  # fmt: skip
def test_bad_vendor_specs_are_refused(bad: str, why: str) -> None:
    with pytest.raises(SimSpecError, match=why):
        parse_gpu_specs([bad])


def test_model_names_are_unique_across_vendors() -> None:
    names = model_names()
    assert len(names) == len(set(n.upper() for n in names)) >= len(ONE_OF_EACH)


def test_every_vendor_registers_its_own_type_slots_memory_and_cores(cfg: Config) -> None:
    spec = ",".join(f"{n}:2" for n in ONE_OF_EACH) + ",A100-40GB:1"
    _, devices, _ = inventory(spec, cfg)
    by: dict[str, list[Device]] = {}
    for d in devices:
        by.setdefault(d.vendor, []).append(d)
    assert set(by) == set(ONE_OF_EACH.values()) | {"NVIDIA"}
    b3 = by["Ascend910B3"][0]
    # Ascend: allocatable memory over the smallest template, AI cores, templates
    assert (b3.count, b3.devmem, b3.devcore) == (65536 // 16384, 65536, 20)
    assert [t.name for t in b3.templates] == ["vir05_1c_16g", "vir10_3c_32g"]
    assert by["Ascend310P"][0].count == 21527 // 3072
    assert {d.count for d in by["DCU"]} == {4} and by["DCU"][0].type == "DCU-K100-AI"
    assert by["DCU"][0].uuid.startswith("DCU-")
    assert (by["GCU"][0].count, by["GCU"][0].devcore) == (6, 6)
    assert [t.memory_mib for t in by["XPU"][0].templates] == [24576, 49152, 98304]
    assert (by["AMDGPU"][0].devcore, by["AMDGPU"][0].type) == (304, "AMD Instinct MI300X")
    # Neuron: a mask of the device's 2 NeuronCores, a slot per core (HAMi's card)
    assert {(d.devcore, d.count) for d in by["AWSNeuron"]} == {(0b11, 2)} and len(
        by["Vastai"]
    ) == 4  # 2 cards x 2 dies
    assert by["Mthreads"][0].devmem == 96 * 512
    assert (
        by["NVIDIA"][0].type == "NVIDIA-A100-40GB"
        and by["NVIDIA"][0].count == cfg.node.device_split_count
    )
    # each vendor numbers its own cards from 0
    for key, devs in by.items():
        assert [d.index for d in devs] == list(range(len(devs))), key


def test_vastai_dies_name_their_card_and_ascend_network_planes(cfg: Config) -> None:
    _, devices, _ = inventory("VA1:2,Ascend910B3:8", cfg)
    va = [d for d in devices if d.vendor == "Vastai"]
    assert (
        [d.custom_info["AIC"] for d in va][0]
        == va[1].custom_info["AIC"]
        != va[2].custom_info["AIC"]
    )
    assert {d.custom_info["DeviceStrategy"] for d in va} == {"die"}
    npus = [d for d in devices if d.vendor == "Ascend910B3"]
    assert [d.custom_info["NetworkID"] for d in npus] == [0] * 4 + [1] * 4
    assert all(len(d.uuid.split()) == 5 for d in npus)  # DCMI die ID shape


def test_vendor_topologies_link_only_their_own_cards(cfg: Config) -> None:
    _, devices, links = inventory("Ascend910B3:8,trn1:16,MI300X:2,A100-40GB:2", cfg)
    pos = {d.uuid: i for i, d in enumerate(devices)}
    npu = [pos[d.uuid] for d in devices if d.vendor == "Ascend910B3"]
    # HCCS inside each group of four, PCIe between the groups
    assert links[npu[0]][npu[3]] > links[npu[0]][npu[4]]
    trn = [pos[d.uuid] for d in devices if d.vendor == "AWSNeuron"]
    linked = [sum(1 for j in trn if j != i and links[i][j] > 100) for i in trn]
    assert linked == [4] * 16  # a 4x4 torus: four neighbours each
    mi, a100 = (
        [pos[d.uuid] for d in devices if d.vendor == "AMDGPU"],
        [pos[d.uuid] for d in devices if d.vendor == "NVIDIA"],
    )
    assert (
        links[mi[0]][mi[1]] > 100 and links[mi[0]][a100[0]] < 100 and links[a100[0]][a100[1]] < 100
    )


def test_unhealthy_vendor_cards_and_stable_ids(cfg: Config) -> None:
    b = SimBackend("n", parse_gpu_specs(["A100-40GB:1,MLU370:2"]))
    b.unhealthy = {2}
    cards = b.discover().cards
    assert [c.healthy for c in cards] == [True, True, False]
    again = SimBackend("n", parse_gpu_specs(["A100-40GB:1,MLU370:2"])).discover().cards
    assert [c.uuid for c in cards] == [c.uuid for c in again]
    other = SimBackend("m", parse_gpu_specs(["A100-40GB:1,MLU370:2"])).discover().cards
    assert cards[1].uuid != other[1].uuid


def test_ascend_trim_memory_rounds_up_to_a_template() -> None:
    m = ascend.MODELS["Ascend910B3"]
    assert ascend.trim_memory(m, 1) == (16384, "vir05_1c_16g")
    assert ascend.trim_memory(m, 16385) == (32768, "vir10_3c_32g")
    assert ascend.trim_memory(m, 40000) == (65536, "")
    assert ascend.trim_memory(m, 70000) == (0, "")


async def test_mixed_node_inventory_and_vendor_telemetry_over_nats(
    bus: Bus, cfg: Config, tmp_path: Path
) -> None:
    backend = SimBackend("mixed", parse_gpu_specs(["Ascend910B3:2,MLU370:1,A100-40GB:1"]))
    agent = NodeAgent(bus, "mixed", backend, cfg)
    await agent.start()
    try:
        inv, _ = await bus.kv_get(subjects.NODES_BUCKET, "mixed", NodeInventory)
        assert inv is not None
        assert [(d.vendor, d.type) for d in inv.devices] == [
            ("Ascend910B3", "Ascend910B3"),
            ("Ascend910B3", "Ascend910B3"),
            ("MLU", "MLU370-X4"),
            ("NVIDIA", "NVIDIA-A100-40GB"),
        ]
        assert inv.devices[0].templates[0].name == "vir05_1c_16g"

        npu = inv.devices[0]
        g = grant("main", [npu.uuid], mem=16384, cores=25)
        g.devices[0].vendor, g.devices[0].type = npu.vendor, npu.type
        allocs = {"p1": pod("p1", g)}
        got: asyncio.Queue[Telemetry] = asyncio.Queue()

        async def on_tel(msg: object) -> None:
            await got.put(decode(msg.data, Telemetry))  # type: ignore[attr-defined]

        await bus.subscribe(subjects.telemetry("mixed"), on_tel)
        tel = TelemetryPublisher(
            bus,
            "mixed",
            SliceWriter(tmp_path, "mixed", cfg.node),
            lambda: allocs,
            interval=0.05,
            host=backend,
        )
        await tel.publish_once()
        sample = await asyncio.wait_for(got.get(), 5)
        rows = {d.uuid: d for d in sample.devices}
        assert {d.vendor for d in sample.devices} == {"Ascend910B3", "MLU", "NVIDIA"} and len(
            rows
        ) == 4
        assert rows[npu.uuid].type == "Ascend910B3" and rows[npu.uuid].memory_total_mib == 65536
        assert [c.uuid for c in sample.containers] == [npu.uuid]
    finally:
        await agent.stop()
