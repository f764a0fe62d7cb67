"""``python -m services.inventory --kube``: the process a deployment runs, under its own
identity on a nats-server with auth on, against the fake API server.

A Node whose Ascend plugin registered cards (and that has no node agent, nor even a
node agent's identity) becomes inventory; placement, under its own identity, decides a
submit onto it; the inventory asks the plugin to report (HAMi's ``Requesting_<time>``
handshake) and, when that request stays unanswered past HAMi's timeout, its cards leave. The process stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hami.creds import Store, roles_for
from services.binder.service import BinderService
from services.inventory.kube_nodes import HANDSHAKE_TIMEOUT, KUBE_AGENT, handshake_expired
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import ENCODER, Bus, decode
from shared.config import Config
from shared.devices.registry import REGISTRY
from shared.natsserver import EmbeddedNats
from shared.schemas import (
    ClusterStatus,
    ContainerAsk,
    DeviceAsk,
    NodeInventory,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)
from tests.fakekube import FakeKube

CHIP = "Ascend910B3"
REGISTER = f"hami.io/node-register-{CHIP}"
HANDSHAKE = f"hami.io/node-handshake-{CHIP}"


def stamp(at: float) -> str:
    """A time as HAMi's scheduler writes it in a handshake (Go's DateTime, local)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def npu_register(n: int) -> str:
    return json.dumps([
        {"id": f"npu-{i}", "index": i, "count": 4, "devmem": 65536, "devcore": 20,
         "type": CHIP, "numa": 0, "health": True}
        for i in range(n)
    ])  # fmt: skip


def test_handshake_expiry_follows_hamis_check_health() -> None:
    fam = next(f for f in REGISTRY.families if f.name == CHIP)
    now = time.time()

    def expired(value: str | None, allocatable: dict[str, Any] | None = None) -> bool:
        ann = {} if value is None else {HANDSHAKE: value}
        return handshake_expired(fam, ann, allocatable or {}, now)

    old = stamp(now - HANDSHAKE_TIMEOUT - 5)
    assert expired(f"Requesting_{old}")
    assert not expired(f"Requesting_{stamp(now - HANDSHAKE_TIMEOUT + 10)}")  # still in time
    # the plugin answered, the scheduler cleaned up, or nobody asked yet
    for value in (f"Reported_{old}", f"Reported {old}", f"Deleted_{old}", "", None):
        assert not expired(value), value
    # HAMi keeps a request whose time it cannot read
    assert not expired("Requesting") and not expired("Requesting_yesterday")
    # ... and one whose Node still advertises the plugin's resource
    assert not expired(f"Requesting_{old}", {f"huawei.com/{CHIP}": "2"})
    assert expired(f"Requesting_{old}", {f"huawei.com/{CHIP}": "0"})


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, Store]]:
    store = Store(tmp_path / "state")
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.configure(store.server_config(roles_for([])))  # no node agent at all
    await server.astart()
    try:
        yield server, store
    finally:
        server.cleanup()


async def wait_for(what: Any, desc: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {desc}"
        await asyncio.sleep(0.05)


async def test_kube_mode_process_puts_a_vendor_plugin_node_in_placement(
    secured: tuple[EmbeddedNats, Store], fake: FakeKube, cfg: Config
) -> None:
    server, store = secured
    fake.add_node("npu-node", capacity={"cpu": "64", "memory": "256Gi", "pods": "110"})
    fake.patch("nodes", None, "npu-node", {"metadata": {"annotations": {
        REGISTER: npu_register(2), HANDSHAKE: f"Reported_{stamp(time.time())}"}}})  # fmt: skip
    c = store.credentials("inventory")
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "services.inventory", "--nats-url", server.url,
         "--health-port", "0", "--creds", c.seed_file, "--tls-ca", c.tls_ca,
         "--kube", "--kube-host", fake.url, "--kube-interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    buses: list[Bus] = []
    services: list[Any] = []

    async def bus(role: str) -> Bus:
        b = await Bus.connect(server.url, role, creds=store.credentials(role))
        buses.append(b)
        return b

    try:
        cli = await bus("cli")
        admin = await bus("admin")  # the test's own reads of the buckets

        async def status() -> ClusterStatus | None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            try:
                r = await cli.nc.request(subjects.API_STATUS, ENCODER.encode(StatusRequest()), timeout=1)
            except Exception:  # not up yet: no responders
                return None
            return decode(r.data, ClusterStatus)

        st = await wait_for(status, "the inventory's status")
        placement = PlacementService(await bus("placement"), cfg)
        binder = BinderService(await bus("binder"), cfg)
        for svc in (placement, binder):
            await svc.start()
            services.append(svc)
        await wait_for(lambda: "npu-node" in placement.cluster.nodes, "npu-node in placement")
        # the entry is the watcher's, written under the inventory's identity
        inv, _ = await admin.kv_get(subjects.NODES_BUCKET, "npu-node", NodeInventory)
        assert inv is not None and inv.agent_id == KUBE_AGENT
        assert sorted(d.uuid for d in inv.devices) == ["npu-0", "npu-1"]
        # the watcher asks the plugin to report, as HAMi's scheduler does ...
        def handshake() -> str:
            obj = fake.get("nodes", None, "npu-node")
            assert obj is not None
            return str(obj["metadata"]["annotations"][HANDSHAKE])

        await wait_for(lambda: handshake().startswith("Requesting_"), "a handshake request")
        fam = next(f for f in REGISTRY.families if f.name == CHIP)
        assert not handshake_expired(fam, {HANDSHAKE: handshake()}, {}, time.time())
        # ... and again once it has
        fake.patch("nodes", None, "npu-node",
                   {"metadata": {"annotations": {HANDSHAKE: "Reported_2026.01.02 03:04:05"}}})  # fmt: skip
        await wait_for(lambda: handshake().startswith("Requesting_"), "a second request")
        # ... kept healthy by the watcher's heartbeats (no agent beats for it)
        st = await wait_for(status, "a status")
        (node,) = [n for n in st.nodes if n.node == "npu-node"]
        assert node.healthy

        req = SubmitRequest(name="npu-job", containers=[
            ContainerAsk(devices=[DeviceAsk(vendor=CHIP, nums=1, mem=10000)])])  # fmt: skip
        r = await cli.nc.request(subjects.API_SUBMIT, ENCODER.encode(req), timeout=20)
        reply = decode(r.data, SubmitReply)
        assert reply.ok, reply
        assert reply.decision is not None and reply.decision.node == "npu-node"
        (card,) = [d for ctr in reply.decision.containers for d in ctr.devices]
        assert card.uuid in ("npu-0", "npu-1")

        # HAMi's scheduler asked the plugin to report 2 minutes ago; it never did
        asked = stamp(time.time() - 2 * HANDSHAKE_TIMEOUT)
        fake.patch("nodes", None, "npu-node",
                   {"metadata": {"annotations": {HANDSHAKE: f"Requesting_{asked}"}}})  # fmt: skip
        await wait_for(lambda: "npu-node" not in placement.cluster.nodes, "npu-node dropped")
        gone, _ = await admin.kv_get(subjects.NODES_BUCKET, "npu-node", NodeInventory)
        assert gone is None
    finally:
        for svc in reversed(services):
            await svc.stop()
        for b in buses:
            await b.close()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 15)
        err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, err
    assert "Traceback" not in err, err
