"""The metrics service's collector with cards of several vendors on one scrape.

Each per-card and per-container ``hami_*`` series carries the card's ``vendor``; memory
is in bytes and cores are percents of the card whatever unit the family registers
(Ascend AI cores here), while an NVIDIA card's series keep their figures; the legacy
names keep HAMi's label sets exactly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics.collector import AllocationCollector
from shared.schemas import (
    CardGrant,
    ContainerGrant,
    ContainerUsage,
    Device,
    DeviceUsage,
    LedgerAlloc,
    NodeInventory,
    NodeLedger,
    Telemetry,
)

MIB = 1 << 20
A100 = Device(uuid="GPU-a", index=0, type="NVIDIA-A100-40GB", devmem=40960, devcore=100)
NPU = Device(
    uuid="npu-0",
    index=0,
    type="Ascend910B3",
    vendor="Ascend910B3",
    devmem=65536,
    devcore=20,
    count=4,
)


def scrape(legacy: bool = False) -> dict[str, list[tuple[dict[str, str], float]]]:
    nodes = {
        "n-nv": NodeInventory(node="n-nv", devices=[A100]),
        "n-npu": NodeInventory(node="n-npu", devices=[NPU]),
    }
    ledgers = {
        "n-nv": NodeLedger(
            node="n-nv",
            allocs={
                "u1": LedgerAlloc(
                    uid="u1",
                    name="train",
                    containers=[
                        ContainerGrant(
                            name="train", devices=[CardGrant(uuid="GPU-a", mem=10240, cores=30)]
                        )
                    ],
                )
            },
        ),
        "n-npu": NodeLedger(
            node="n-npu",
            allocs={
                "u2": LedgerAlloc(
                    uid="u2",
                    name="infer",
                    containers=[
                        ContainerGrant(
                            name="infer",
                            devices=[
                                CardGrant(
                                    uuid="npu-0",
                                    vendor="Ascend910B3",
                                    type="Ascend910B3",
                                    mem=16384,
                                    cores=5,
                                )
                            ],
                        )
                    ],
                )
            },
        ),
    }
    tel = {
        "n-nv": Telemetry(
            node="n-nv",
            at=1.0,
            devices=[DeviceUsage(uuid="GPU-a", memory_used_mib=2048, utilization=0.25)],
            containers=[
                ContainerUsage(
                    uid="u1",
                    container="train",
                    uuid="GPU-a",
                    memory_used_bytes=3 * MIB,
                    utilization=0.5,
                )
            ],
        ),
        "n-npu": Telemetry(
            node="n-npu",
            at=1.0,
            devices=[
                DeviceUsage(
                    uuid="npu-0",
                    memory_used_mib=4096,
                    utilization=0.4,
                    vendor="Ascend910B3",
                    type="Ascend910B3",
                )
            ],
            containers=[
                ContainerUsage(
                    uid="u2",
                    container="infer",
                    uuid="npu-0",
                    memory_used_bytes=5 * MIB,
                    utilization=0.1,
                )
            ],
        ),
    }
    reg = CollectorRegistry()
    reg.register(
        AllocationCollector(lambda: (nodes, ledgers, {}), legacy=legacy, telemetry=lambda: tel)
    )
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def by_vendor(got: dict[str, list[tuple[dict[str, str], float]]], name: str) -> dict[str, float]:
    return {lb["vendor"]: v for lb, v in got[name]}


def test_every_card_and_container_series_names_its_vendor() -> None:
    got = scrape()
    card_series = [
        "hami_gpu_memory_limit_bytes",
        "hami_gpu_core_limit_ratio",
        "hami_gpu_memory_allocated_bytes",
        "hami_gpu_shared_count",
        "hami_gpu_core_allocated_ratio",
        "hami_node_gpu_overview",
        "hami_node_gpu_memory_allocated_ratio",
        "hami_host_gpu_memory_used_bytes",
        "hami_host_gpu_utilization_ratio",
        "hami_vgpu_memory_allocated_bytes",
        "hami_vgpu_core_allocated_ratio",
        "hami_vgpu_memory_used_bytes",
        "hami_vgpu_memory_limit_bytes",
        "hami_container_device_memory_bytes",
        "hami_container_device_utilization_ratio",
        "hami_container_last_kernel_elapsed_seconds",
    ]
    for name in card_series:
        assert set(by_vendor(got, name)) == {"NVIDIA", "Ascend910B3"}, name


def test_units_are_the_same_for_every_vendor() -> None:
    got = scrape()
    assert by_vendor(got, "hami_gpu_memory_limit_bytes") == {
        "NVIDIA": 40960 * MIB,
        "Ascend910B3": 65536 * MIB,
    }
    assert by_vendor(got, "hami_host_gpu_memory_used_bytes") == {
        "NVIDIA": 2048 * MIB,
        "Ascend910B3": 4096 * MIB,
    }
    assert by_vendor(got, "hami_host_gpu_utilization_ratio") == {
        "NVIDIA": 25.0,
        "Ascend910B3": 40.0,
    }
    # 5 of the 910B3's 20 AI cores are a quarter of the card; the A100's 30 % stays 30.
    assert by_vendor(got, "hami_gpu_core_limit_ratio") == {"NVIDIA": 100.0, "Ascend910B3": 100.0}
    assert by_vendor(got, "hami_gpu_core_allocated_ratio") == {"NVIDIA": 30.0, "Ascend910B3": 25.0}
    assert by_vendor(got, "hami_vgpu_core_allocated_ratio") == {"NVIDIA": 30.0, "Ascend910B3": 25.0}
    assert by_vendor(got, "hami_vgpu_memory_allocated_bytes") == {
        "NVIDIA": 10240 * MIB,
        "Ascend910B3": 16384 * MIB,
    }
    # HAMi's device_type keeps the model, vendor the family.
    types = {lb["vendor"]: lb["device_type"] for lb, _ in got["hami_gpu_memory_limit_bytes"]}
    assert types == {"NVIDIA": "NVIDIA-A100-40GB", "Ascend910B3": "Ascend910B3"}


def test_legacy_names_keep_hamis_labels() -> None:
    got = scrape(legacy=True)
    for name in (
        "GPUDeviceMemoryLimit",
        "HostGPUMemoryUsage",
        "vGPUMemoryAllocated",
        "vGPU_device_memory_usage_in_bytes",
    ):
        assert all("vendor" not in lb for lb, _ in got[name]), name
        assert len(got[name]) == 2, name
