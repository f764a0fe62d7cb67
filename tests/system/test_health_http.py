"""/healthz and /readyz over HTTP against a real nats-server: not ready until the KV
watches have delivered what the buckets hold, not ready while NATS is gone, ready again
after it comes back; and a service run as ``python -m services.X`` serves them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import msgspec

from shared import subjects
from shared.bus import Bus
from shared.health import Health, HealthServer, bus_checks
from shared.natsserver import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parents[2]


class Entry(msgspec.Struct):
    n: int


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def eventually(url: str, status: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = await get(url)
            if code == status:
                return body
        except aiohttp.ClientError:
            body = "no answer"
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered {status}; last: {body}")
        await asyncio.sleep(0.05)


async def test_ready_only_after_watches_caught_up_and_while_connected(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    await bus.kv_put(subjects.NODES_BUCKET, "n1", Entry(1))
    watched = await Bus.connect(nats_server.url, "watched")
    health = Health()
    health.add(bus_checks(watched))
    server = HealthServer(health, "127.0.0.1", 0)
    await server.start()
    gate, entered = asyncio.Event(), asyncio.Event()

    async def slow(key: str, value: bytes | None, rev: int) -> None:
        entered.set()
        await gate.wait()  # the initial value is not handled until the gate opens

    try:
        code, body = await get(server.url + "/readyz")
        assert code == 503 and "service: starting" in body
        task = await watched.watch_kv(subjects.NODES_BUCKET, slow)
        health.started = True
        await asyncio.wait_for(entered.wait(), 10)
        code, body = await get(server.url + "/readyz")
        assert code == 503, body
        assert "kv hami-nodes: initial values not yet delivered" in body.splitlines()
        assert "nats: ok" in body.splitlines()
        assert (await get(server.url + "/healthz"))[0] == 200

        gate.set()
        body = await eventually(server.url + "/readyz", 200)
        assert body.splitlines() == ["service: ok", "nats: ok", "kv hami-nodes: ok"]

        nats_server.stop()
        body = await eventually(server.url + "/readyz", 503)
        assert "nats: disconnected, reconnecting" in body.splitlines()
        assert (await get(server.url + "/healthz"))[0] == 200  # alive: only not ready

        nats_server.start()
        await eventually(server.url + "/readyz", 200)

        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert watched.watch_states() == []  # a watch stopped by its owner is forgotten
        health.stopping = True
        code, body = await get(server.url + "/healthz")
        assert (code, body.strip()) == (503, "stopping")
    finally:
        gate.set()
        await server.stop()
        await watched.close()


async def test_service_process_serves_probes(nats_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.inventory", "--nats-url", nats_url,
        "--health-port", str(port), "--health-host", "127.0.0.1",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        body = await eventually(f"http://127.0.0.1:{port}/readyz", 200, timeout=30)
        lines = body.splitlines()
        assert "nats: ok" in lines
        # Inventory's three watches, each caught up.
        assert {"kv hami-nodes: ok", "kv hami-ledger: ok", "kv hami-health: ok"} <= set(lines)
        assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
