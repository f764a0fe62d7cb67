"""Node health from heartbeats: unhealthy within 10 s of silence, recovered on return."""

from __future__ import annotations

import asyncio
import time

from services.inventory.health import HealthTracker
from services.inventory.service import InventoryService
from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec
from shared import subjects
from shared.bus import Bus, decode, decode_event
from shared.config import Config
from shared.schemas import NodeEvent, NodeHealth


def test_tracker_state_machine() -> None:
    t = HealthTracker(unhealthy_after=5, now=100.0)
    t.known("a", 100.0)
    assert t.tick(104.0) == []
    assert t.beat("a", 104.0) is None  # healthy stays healthy: no transition
    [down] = t.tick(110.0)
    assert (down.node, down.healthy) == ("a", False)
    assert t.tick(120.0) == []  # announced once
    up = t.beat("a", 121.0)
    assert up is not None and up.healthy


def test_restarted_tracker_gives_known_nodes_a_grace_period() -> None:
    t = HealthTracker(unhealthy_after=5, now=1000.0)
    t.known("old", 0.0)  # last seen long before this process started
    assert t.tick(1004.0) == []
    assert [x.node for x in t.tick(1006.0)] == ["old"]


async def test_silent_node_goes_unhealthy_then_recovers(nats_url: str, cfg: Config, bus: Bus) -> None:
    events: list[NodeEvent] = []
    got = asyncio.Event()

    async def on_event(msg: object) -> None:
        ev = decode_event(msg.data)  # type: ignore[attr-defined]
        assert isinstance(ev, NodeEvent)
        events.append(ev)
        got.set()

    await bus.subscribe("hami.evt.node.>", on_event)
    ibus = await Bus.connect(nats_url, "inventory")
    inv = InventoryService(ibus, cfg, tick=0.1)
    await inv.start()
    agent = NodeAgent(bus, "n1", SimBackend("n1", [parse_gpu_spec("T4:1")]), cfg)
    await agent.start()
    async with asyncio.timeout(5):
        while not any(e.verb == "registered" for e in events):
            got.clear()
            await got.wait()
    agent.beating = False
    silent_at = time.monotonic()
    async with asyncio.timeout(10):
        while not any(e.verb == "unhealthy" for e in events):
            got.clear()
            await got.wait()
    assert time.monotonic() - silent_at < 10
    h, _ = await bus.kv_get(subjects.HEALTH_BUCKET, "n1", NodeHealth)
    assert h is not None and not h.healthy
    agent.beating = True
    async with asyncio.timeout(5):
        while not any(e.verb == "recovered" for e in events):
            got.clear()
            await got.wait()
    h, _ = await bus.kv_get(subjects.HEALTH_BUCKET, "n1", NodeHealth)
    assert h is not None and h.healthy
    assert [e.verb for e in events] == ["registered", "unhealthy", "recovered"]
    await agent.stop()
    await inv.stop()
    await ibus.close()
    raw = await (await bus.kv(subjects.HEALTH_BUCKET)).get("n1")
    assert decode(raw.value or b"", NodeHealth).node == "n1"
