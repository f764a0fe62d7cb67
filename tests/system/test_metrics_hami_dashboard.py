"""HAMi's Grafana dashboard against our /metrics: every series it queries, with its labels.

The metrics service runs on a real nats-server; two simulated nodes register their cards
in the inventory bucket, a ledger holds allocations on them and the nodes publish
telemetry, as the node agents and placement do.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics.service import MetricsService
from shared import subjects
from shared.bus import Bus
from shared.config import Config
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
from tests.system.hami_dashboard_queries import DASHBOARD_SERIES

MIB = 1024 * 1024
NODES = ("sim-node-0", "sim-node-1")


def uuid(node: str, i: int) -> str:
    return f"GPU-{node}-{i}"


async def simulate(bus: Bus) -> None:
    for node in NODES:
        devs = [Device(uuid=uuid(node, i), index=i, type="NVIDIA-A100-80GB", devmem=81920) for i in range(2)]
        await bus.kv_put(subjects.NODES_BUCKET, subjects.kv_key(node), NodeInventory(node=node, devices=devs))
        alloc = LedgerAlloc(uid=f"uid-{node}", name=f"pod-{node}", namespace="team-a", containers=[
            ContainerGrant(name="init", init=True),
            ContainerGrant(name="main", devices=[CardGrant(uuid=uuid(node, 0), mem=20000, cores=30),
                                                 CardGrant(uuid=uuid(node, 1), mem=20000, cores=30)]),
        ])
        await bus.kv_put(subjects.LEDGER_BUCKET, subjects.kv_key(node),
                         NodeLedger(node=node, allocs={alloc.uid: alloc}))


async def publish_telemetry(bus: Bus) -> None:
    for node in NODES:
        await bus.publish(subjects.telemetry(node), Telemetry(
            node=node, at=time.time(),
            devices=[DeviceUsage(uuid=uuid(node, i), memory_used_mib=1000, utilization=0.4) for i in range(2)],
            containers=[ContainerUsage(uid=f"uid-{node}", container="main", uuid=uuid(node, i),
                                       memory_used_bytes=1000 * MIB, memory_limit_bytes=20000 * MIB,
                                       utilization=0.4, last_kernel_at=time.time() - 1) for i in range(2)],
        ))


def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


async def serve(bus: Bus, cfg: Config, legacy: bool) -> tuple[MetricsService, dict[str, list[dict[str, str]]]]:
    svc = MetricsService(bus, cfg, port=0, legacy_metrics=legacy)
    await svc.start()
    await simulate(bus)
    async with asyncio.timeout(10):
        while True:
            await publish_telemetry(bus)
            got = await asyncio.to_thread(scrape, svc.url)
            if "hami_vgpu_memory_used_bytes" in got and len(got.get("hami_gpu_memory_limit_bytes", [])) == 4:
                return svc, got
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(("metric", "labels"), sorted(DASHBOARD_SERIES.items()))
async def test_every_dashboard_series_is_exported(bus: Bus, cfg: Config, metric: str,
                                                   labels: tuple[str, ...]) -> None:
    await bus.setup()
    svc, got = await serve(bus, cfg, legacy=False)
    try:
        assert metric in got, f"{metric} not in our scrape"
        for series in got[metric]:
            missing = [lb for lb in labels if not series.get(lb)]
            assert not missing, f"{metric}{series} lacks {missing}"
    finally:
        await svc.stop()


async def test_hami_values_zone_and_legacy_names(bus: Bus, cfg: Config) -> None:
    await bus.setup()
    svc, got = await serve(bus, cfg, legacy=True)
    try:
        # HAMi's core "ratios" are percents of the card, and the scheduler side is zoned.
        cores = got["hami_gpu_core_allocated_ratio"]
        assert {s["zone"] for s in cores} == {"vGPU"}
        assert "zone" not in got["hami_host_gpu_memory_used_bytes"][0]
        assert {s["device_cores"] for s in got["hami_gpu_memory_allocated_bytes"]} == {"100"}
        legacy = {
            "GPUDeviceMemoryLimit": {"nodeid", "deviceuuid", "deviceidx", "devicetype", "zone"},
            "GPUDeviceMemoryAllocated": {"nodeid", "deviceuuid", "deviceidx", "devicecores", "devicetype", "zone"},
            "vGPUMemoryAllocated": {"podnamespace", "nodename", "podname", "containeridx", "deviceuuid", "zone"},
            "vGPU_device_memory_usage_in_bytes": {"podnamespace", "podname", "ctrname", "vdeviceid", "deviceuuid"},
            "HostGPUMemoryUsage": {"nodeid", "deviceidx", "deviceuuid", "devicetype"},
        }
        for name, labels in legacy.items():
            assert name in got and set(got[name][0]) == labels, (name, got.get(name))
        vdev = sorted(s["vdevice_index"] for s in got["hami_vgpu_memory_used_bytes"])
        assert vdev == ["0", "0", "1", "1"]
    finally:
        await svc.stop()


async def test_legacy_names_are_off_by_default(bus: Bus, cfg: Config) -> None:
    await bus.setup()
    svc, got = await serve(bus, cfg, legacy=False)
    try:
        assert "GPUDeviceMemoryLimit" not in got and "vGPU_device_memory_usage_in_bytes" not in got
    finally:
        await svc.stop()
