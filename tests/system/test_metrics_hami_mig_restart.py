"""HAMi's MIG series survive a restart of the metrics service.

HAMi's scheduler rebuilds ``hami_node_gpu_mig_instance_info`` (and the legacy
``nodeGPUMigInstance``) from its pod cache and its vGPU monitor ``hami_mig_device_info``
(legacy ``MigInfo``) from the pods on the node, so a restarted exporter shows every
realised instance at once. Here the node agent names its live instances in every
telemetry sample: a metrics service started after the slice was prepared (it never saw
the ``prepared`` event) exports the same series with the instance's real identity.

The whole system runs as ``hami up`` runs it, on a real nats-server, with one simulated
A100 in MIG mode; the slice is asked for through the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from hami.system import System
from services.metrics.collector import MigIdentities
from services.metrics.service import MetricsService
from services.nodeagent.backends.sim import SimBackend
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import (
    AllocPrepared,
    CardGrant,
    ContainerAsk,
    DeviceAsk,
    MigSlice,
    MigUsage,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
    Telemetry,
)
from tests.system.test_metrics_hami_mig import Scrape, scrape

MIG_SERIES = (
    "hami_node_gpu_mig_instance_info",
    "hami_mig_device_info",
    "nodeGPUMigInstance",
    "MigInfo",
)


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[System]:
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["A100-SXM4-40GB:1:mig"], metrics_port=0,
               telemetry_interval=0.2)  # fmt: skip
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def until(url: str, ok: Callable[[Scrape], bool], timeout: float = 15.0) -> Scrape:
    async with asyncio.timeout(timeout):
        while True:
            got = await asyncio.to_thread(scrape, url)
            if ok(got):
                return got
            await asyncio.sleep(0.1)


def mig_only(got: Scrape) -> Scrape:
    return {k: sorted(v, key=sorted) for k, v in got.items() if k in MIG_SERIES}


async def test_a_restarted_metrics_service_exports_instances_prepared_before_it(
    system: System, bus: Bus, nats_url: str, cfg: Config
) -> None:
    req = SubmitRequest(
        name="job-m", containers=[ContainerAsk(name="job-m", devices=[DeviceAsk(mem=9000)])]
    )
    reply = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=20)
    assert reply.ok and reply.decision is not None, reply
    node = system.nodes[0]
    backend = node.agent.backend
    assert isinstance(backend, SimBackend)
    card = reply.decision.containers[0].devices[0].uuid

    async with asyncio.timeout(10):  # the node agent creates the instance on the card
        while True:
            if backend.mig_instances(card):
                break
            await asyncio.sleep(0.05)
    (inst,) = backend.mig_instances(card)
    assert system.metrics is not None
    before = mig_only(await until(system.metrics.url, lambda g: "hami_mig_device_info" in g))
    await system.metrics.stop()  # the exporter restarts: the prepared event is in the past

    mbus = await Bus.connect(nats_url, "metrics-2")
    fresh = MetricsService(mbus, cfg, port=0, legacy_metrics=True)
    await fresh.start()
    try:
        got = mig_only(await until(fresh.url, lambda g: all(s in g for s in MIG_SERIES)))
        assert got["hami_node_gpu_mig_instance_info"] == [{
            "node": node.node, "device_uuid": card, "device_index": "0", "mig_uuid": inst.uuid,
            "profile": inst.profile, "gpu_instance_id": str(inst.gpu_instance),
            "compute_instance_id": str(inst.compute_instance), "placement_start": str(inst.start),
            "placement_size": str(inst.size), "zone": "vGPU",
        }]  # fmt: skip
        assert got["hami_mig_device_info"] == [{
            "namespace": "standalone", "pod": "job-m", "container": "job-m", "vdevice_index": "0",
            "device_uuid": card, "mig_uuid": inst.uuid, "profile": inst.profile,
            "gpu_instance_id": str(inst.gpu_instance), "compute_instance_id": str(inst.compute_instance),
        }]  # fmt: skip
        assert got["nodeGPUMigInstance"][0]["migname"] == f"{inst.profile}-{inst.gpu_instance}"
        assert got["MigInfo"][0]["instanceid"] == str(inst.gpu_instance)
        # the same series the service that saw the prepared event exported
        assert {k: v for k, v in got.items() if k in before} == before

        # released: the instance goes, and so do its series
        rel = await bus.request(subjects.API_RELEASE, ReleaseRequest(name="job-m"), ReleaseReply,
                                timeout=10)  # fmt: skip
        assert rel.ok, rel
        await until(fresh.url, lambda g: not any(s in g for s in MIG_SERIES))
    finally:
        await fresh.stop()
        await mbus.close()


def test_an_older_report_does_not_replace_a_newer_identity() -> None:
    """Telemetry sampled before a prepared event (or arriving late) loses to it; a newer
    sample replaces an older event's identity; a row without an identity names nothing."""

    def made(gi: int) -> MigSlice:
        return MigSlice(
            profile="1g.5gb", start=6, size=1, uuid=f"MIG-{gi}", gpu_instance=gi, compute_instance=0
        )

    def sample(at: float, uid: str, m: MigSlice) -> Telemetry:
        return Telemetry(
            node="n", at=at, mig=[MigUsage(uid=uid, container="c", uuid="GPU-x", mig=m)]
        )

    g = CardGrant(uuid="GPU-x", mem=4864, cores=14, mig=MigSlice(profile="1g.5gb", start=6, size=1))
    ids = MigIdentities()
    prepared = msgspec.structs.replace(g, mig=made(9))
    ids.observe(
        AllocPrepared(uid="u", name="u", node="n", container="c", devices=[prepared], at=10.0)
    )
    ids.observe_telemetry(sample(5.0, "u", made(1)))
    assert (got := ids.realised("u", "c", g)) is not None and got.gpu_instance == 9
    ids.observe_telemetry(sample(11.0, "u", made(2)))
    assert (got := ids.realised("u", "c", g)) is not None and got.gpu_instance == 2
    ids.observe_telemetry(sample(12.0, "v", MigSlice(profile="1g.5gb", start=6, size=1)))
    assert "v" not in ids.by_uid
