"""HAMi v2.10's MIG series from our /metrics, for instances the node agents realised.

HAMi's scheduler exports ``hami_node_gpu_mig_instance_info`` (value 1; node, card,
MIG UUID, profile, GPU- and compute-instance ids, placement) for each MIG reservation
with its complete runtime identity, with ``zone="vGPU"``, and with ``legacyMetrics`` the
old ``nodeGPUMigInstance`` whose ``migname`` is ``<profile>-<GPU instance id>``; its vGPU
monitor exports ``hami_mig_device_info`` per container (legacy ``MigInfo``, the GPU
instance id as ``instanceid``). An instance not yet created (no identity) gives none.
The metrics service runs on a real nats-server: the inventory and ledger are in their
buckets, and the identity arrives in the node agent's ``prepared`` event.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from services.metrics.service import MetricsService
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.hami.mig import geometry, max_instances
from shared.schemas import (
    AllocPrepared,
    CardGrant,
    ContainerGrant,
    Device,
    LedgerAlloc,
    MigSlice,
    NodeInventory,
    NodeLedger,
)

NODE = "mig-node"
CARD = "GPU-mig-0"


def decision(start: int) -> MigSlice:
    return MigSlice(profile="2g.10gb", start=start, size=2)


def grant(m: MigSlice) -> CardGrant:
    return CardGrant(uuid=CARD, index=1, type="NVIDIA-A100-SXM4-40GB", mem=9856, cores=28, mig=m)


async def setup(bus: Bus) -> None:
    prof = geometry("A100-SXM4-40GB")
    assert prof is not None
    devs = [
        Device(uuid="GPU-core-0", index=0, type="NVIDIA-A100-SXM4-40GB", devmem=40960),
        Device(uuid=CARD, index=1, type="NVIDIA-A100-SXM4-40GB", devmem=40960, mode="mig",
               count=max_instances(prof), mig_profiles=prof),
    ]  # fmt: skip
    await bus.kv_put(
        subjects.NODES_BUCKET, subjects.kv_key(NODE), NodeInventory(node=NODE, devices=devs)
    )
    held = LedgerAlloc(uid="uid-1", name="train", namespace="team-a", containers=[
        ContainerGrant(name="init", init=True),
        ContainerGrant(name="main", devices=[grant(decision(0)), grant(decision(2))]),
    ])  # fmt: skip
    await bus.kv_put(
        subjects.LEDGER_BUCKET,
        subjects.kv_key(NODE),
        NodeLedger(node=NODE, allocs={held.uid: held}),
    )


Scrape = dict[str, list[dict[str, str]]]


def scrape(url: str) -> Scrape:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: Scrape = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert s.value == 1 or not s.name.endswith(
                ("_mig_instance_info", "mig_device_info", "MigInfo")
            ), s
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


async def scraped(svc: MetricsService, done: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until ``done`` holds (the watches and the event arrive on their own)."""
    async with asyncio.timeout(10):
        while True:
            got = await asyncio.to_thread(scrape, svc.url)
            if done(got):
                return got
            await asyncio.sleep(0.05)


async def test_realised_instances_as_hami_exports_them(bus: Bus, cfg: Config) -> None:
    await bus.setup()
    svc = MetricsService(bus, cfg, port=0, legacy_metrics=True)
    await svc.start()
    try:
        await setup(bus)
        # the node agent created the first instance (GPU instance 3, compute instance
        # 0); the second has no identity yet (its creation is still under way)
        made = MigSlice(
            profile="2g.10gb", start=0, size=2, uuid="MIG-aaaa", gpu_instance=3, compute_instance=0
        )
        prepared = AllocPrepared(uid="uid-1", name="train", namespace="team-a", node=NODE, container="main",
                                 devices=[grant(made), grant(decision(2))])  # fmt: skip
        await bus.publish_event(
            subjects.alloc("prepared", NODE), prepared, msg_id="prepared:uid-1:main"
        )
        got = await scraped(svc, lambda g: "hami_node_gpu_mig_instance_info" in g)
        assert got["hami_node_gpu_mig_instance_info"] == [{
            "node": NODE, "device_uuid": CARD, "device_index": "1", "mig_uuid": "MIG-aaaa",
            "profile": "2g.10gb", "gpu_instance_id": "3", "compute_instance_id": "0",
            "placement_start": "0", "placement_size": "2", "zone": "vGPU",
        }]  # fmt: skip
        assert got["nodeGPUMigInstance"] == [
            {
                "nodeid": NODE,
                "deviceuuid": CARD,
                "deviceidx": "1",
                "migname": "2g.10gb-3",
                "zone": "vGPU",
            }
        ]
        assert got["hami_mig_device_info"] == [{
            "namespace": "team-a", "pod": "train", "container": "main", "vdevice_index": "0",
            "device_uuid": CARD, "mig_uuid": "MIG-aaaa", "profile": "2g.10gb", "gpu_instance_id": "3",
            "compute_instance_id": "0",
        }]  # fmt: skip
        assert got["MigInfo"] == [{
            "podnamespace": "team-a", "podname": "train", "ctrname": "main", "vdeviceid": "0",
            "deviceuuid": CARD, "instanceid": "3",
        }]  # fmt: skip
        # released: the ledger no longer holds it, and its series go
        await bus.kv_put(
            subjects.LEDGER_BUCKET, subjects.kv_key(NODE), NodeLedger(node=NODE, allocs={})
        )
        got = await scraped(svc, lambda g: "hami_node_gpu_mig_instance_info" not in g)
        assert "hami_mig_device_info" not in got and not svc.mig.by_uid
    finally:
        await svc.stop()
