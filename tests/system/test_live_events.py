"""The page's live feed: ``/api/events`` (server-sent events) on a real nats-server.

Events published on the bus reach a connected browser as they happen, numbered; one that
reconnects with the last id it saw gets exactly what it missed; stopping the service
ends the open streams instead of waiting on them; ``/api/fleet`` lists the waiting
request with its reason.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from services.metrics.service import MetricsService
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import AllocFailed, AllocReleased, NodeEvent


async def frames(resp: aiohttp.ClientResponse, n: int) -> list[dict[str, Any]]:
    """The next ``n`` events of a stream, each with the id the server gave it."""
    out: list[dict[str, Any]] = []
    ident = ""
    async with asyncio.timeout(10):
        while len(out) < n:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                item = json.loads(line[6:])
                assert str(item["seq"]) == ident
                out.append(item)
    return out


async def test_feed_live_resume_and_stop(bus: Bus, cfg: Config) -> None:
    await bus.setup()
    svc = MetricsService(bus, cfg, port=0)
    await svc.start()
    stopped = False
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.get(svc.url + "/api/events")
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            await bus.publish(
                subjects.node_event("registered", "n1"), NodeEvent(node="n1", verb="registered")
            )
            await bus.publish(
                subjects.alloc("failed"),
                AllocFailed(
                    uid="u-1",
                    name="big",
                    namespace="team-a",
                    reasons={"CardInsufficientMemory": 2},
                    message="0/2 nodes are available: 2 CardInsufficientMemory",
                    pending=True,
                ),
            )
            first = await frames(resp, 2)
            assert [(f["seq"], f["verb"]) for f in first] == [(1, "registered"), (2, "failed")]
            assert first[1]["text"] == (
                "team-a/big not placed: 0/2 nodes are available: 2 CardInsufficientMemory (waits)"
            )
            resp.close()

            async with http.get(svc.url + "/api/fleet") as r:
                view = await r.json()
            assert [(p["name"], p["reasons"]) for p in view["pending"]] == [
                ("big", {"CardInsufficientMemory": 2})
            ]

            # Missed while away: the release and a node going down.
            await bus.publish(
                subjects.alloc("released"), AllocReleased(uid="u-1", name="big", reason="withdrawn")
            )
            await bus.publish(
                subjects.node_event("unhealthy", "n1"),
                NodeEvent(node="n1", verb="unhealthy", reason="no heartbeat"),
            )
            async with asyncio.timeout(10):
                while len(svc.fleet.feed) < 4:  # noqa: ASYNC110 - no event to await on
                    await asyncio.sleep(0.02)
            again = await http.get(svc.url + "/api/events", headers={"Last-Event-ID": "2"})
            missed = await frames(again, 2)
            assert [(f["seq"], f["verb"]) for f in missed] == [(3, "released"), (4, "unhealthy")]
            # ...and then live again.
            await bus.publish(
                subjects.node_event("recovered", "n1"), NodeEvent(node="n1", verb="recovered")
            )
            assert [f["verb"] for f in await frames(again, 1)] == ["recovered"]
            async with http.get(svc.url + "/api/fleet") as r:
                assert (await r.json())["pending"] == []

            # Stopping with a stream open ends the stream.
            async with asyncio.timeout(20):
                await svc.stop()
            stopped = True
            async with asyncio.timeout(10):
                assert (await again.content.read()).strip() == b""  # the rest, then the end
    finally:
        if not stopped:
            await svc.stop()
