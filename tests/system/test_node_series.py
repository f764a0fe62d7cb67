"""HAMi's node-side series in standalone sim mode: host and per-container, from a scrape.

The whole system runs as ``hami up`` runs it (System: standalone node agents with
simulated cards, on a real nats-server); a slice is asked for through the API, and the
metrics service's Prometheus text must then answer every node-side query of HAMi's
dashboard, for every card and for the allocation, with HAMi's labels filled in.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hami.system import System
from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec, sim_uuid
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import (
    ContainerAsk,
    ContainerUsage,
    DeviceAsk,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)
from tests.system.hami_dashboard_queries import DASHBOARD_SERIES

MIB = 1 << 20
NODE_SIDE = [m for m in DASHBOARD_SERIES if m.startswith(("hami_host_", "hami_vgpu_memory_", "hami_container_"))]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[System]:
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["A100-80GB:2:81920"], metrics_port=0,
               telemetry_interval=0.2)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def until(system: System, ok: Callable[[Samples], bool], timeout: float = 15.0) -> Samples:
    async with asyncio.timeout(timeout):
        while True:
            got = await asyncio.to_thread(scrape, system.metrics_url)
            if ok(got):
                return got
            await asyncio.sleep(0.1)


def test_the_list_has_the_node_side_series() -> None:
    # Guards the filter above: HAMi's dashboard has five node-side series.
    assert len(NODE_SIDE) == 5, NODE_SIDE


async def test_every_node_side_series_has_data_in_standalone_mode(system: System, bus: Bus) -> None:
    req = SubmitRequest(name="job-a", containers=[ContainerAsk(name="job-a", devices=[DeviceAsk(mem=3000, cores=20)])])
    reply = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=20)
    assert reply.ok and reply.decision is not None, reply
    node = reply.decision.node
    card = reply.decision.containers[0].devices[0].uuid

    def ready(got: Samples) -> bool:
        return all(m in got for m in NODE_SIDE) and len(got["hami_host_gpu_memory_used_bytes"]) == 4

    got = await until(system, ready)
    for metric in NODE_SIDE:
        for labels, _ in got[metric]:
            missing = [lb for lb in DASHBOARD_SERIES[metric] if not labels.get(lb)]
            assert not missing, f"{metric}{labels} lacks {missing}"

    # Every card of both nodes, used or not, with the simulator's driver baseline.
    host = {lb["device_uuid"]: (lb, v) for lb, v in got["hami_host_gpu_memory_used_bytes"]}
    cards = {sim_uuid(f"sim-node-{n}", i) for n in range(2) for i in range(2)}
    assert set(host) == cards
    for uuid, (lb, v) in host.items():
        assert lb["device_type"] == "NVIDIA-A100-80GB" and lb["node"] in ("sim-node-0", "sim-node-1")
        assert v == 409 * MIB, (uuid, v)  # 0.5 % of 81920 MiB, nothing used on it yet
    util = {lb["device_uuid"]: v for lb, v in got["hami_host_gpu_utilization_ratio"]}
    assert set(util) == cards and set(util.values()) == {0.0}

    # The allocation, from the moment it is bound: its limit, zero use, standalone labels.
    (lb, limit), = got["hami_vgpu_memory_limit_bytes"]
    assert lb == {"namespace": "standalone", "pod": "job-a", "container": "job-a", "vdevice_index": "0",
                  "device_uuid": card, "vendor": "NVIDIA"}  # vendor: ours, beside HAMi's labels
    assert limit == 3000 * MIB
    assert [v for _, v in got["hami_vgpu_memory_used_bytes"]] == [0.0]
    assert [v for _, v in got["hami_container_device_utilization_ratio"]] == [0.0]
    # Scheduler side and node side name it alike, so a dashboard can join them.
    alloc = [lb for lb, _ in got["hami_vgpu_memory_allocated_bytes"]]
    assert [(a["namespace"], a["pod"], a["node"]) for a in alloc] == [("standalone", "job-a", node)]

    # Released: its series go with it.
    rel = await bus.request(subjects.API_RELEASE, ReleaseRequest(name="job-a"), ReleaseReply, timeout=15)
    assert rel.ok, rel
    await until(system, lambda g: "hami_vgpu_memory_limit_bytes" not in g)


def test_sim_usage_model() -> None:
    # Baseline plus what the slices' limiters report, capped at the card; utilisation
    # summed over the slices, capped at the whole card.
    b = SimBackend("n", [parse_gpu_spec("T4:2:16384")])
    a, c = sim_uuid("n", 0), sim_uuid("n", 1)

    def use(uuid: str, mib: int, util: float) -> ContainerUsage:
        return ContainerUsage(uid="u", container="c", uuid=uuid, memory_used_bytes=mib * MIB, utilization=util)

    rows = {d.uuid: d for d in b.usage([use(a, 1000, 0.25), use(a, 500, 0.5)])}
    assert (rows[a].memory_used_mib, rows[a].utilization) == (81 + 1500, 0.75)
    assert (rows[c].memory_used_mib, rows[c].utilization) == (81, 0.0)
    rows = {d.uuid: d for d in b.usage([use(a, 20000, 0.8), use(a, 1, 0.7)])}
    assert (rows[a].memory_used_mib, rows[a].utilization) == (16384, 1.0)
    assert b.usage([use(a, 1000, 0.25)]) == b.usage([use(a, 1000, 0.25)])
