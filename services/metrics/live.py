"""The page at ``/`` and its data: ``/api/fleet`` (JSON) and ``/api/events`` (live).

Follows every event of ``hami.evt.>`` into a :class:`~services.metrics.fleet.Fleet` and
passes each on to the browsers connected to ``/api/events`` as a server-sent event.
A browser that reconnects sends the last id it saw and gets what it missed from the
recent history; one that cannot keep up is dropped (it reconnects and catches up)
rather than let its queue grow. Each event also marks placement's last answer about
the queues (:class:`~services.metrics.queues.Queues`) out of date, so that the view
the page fetches after it asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.msg import Msg

from services.metrics.collector import Snapshot
from services.metrics.dashboard import PAGE, fleet_view
from services.metrics.fleet import Fleet
from services.metrics.queues import Queues, QueueState
from shared.bus import BadMessage, decode_event
from shared.schemas import Telemetry

log = logging.getLogger("hami.metrics.live")

QUEUE = 256  # events a slow browser may lag behind before it is dropped
KEEPALIVE = 15.0  # seconds between comments on an idle stream (proxies close silent ones)


class Live:
    def __init__(
        self,
        fleet: Fleet,
        snapshot: Callable[[], Snapshot],
        telemetry: Callable[[], dict[str, Telemetry]],
        queues: Queues,
    ) -> None:
        self.fleet = fleet
        self.snapshot = snapshot
        self.telemetry = telemetry
        self.queues = queues
        self.clients: set[asyncio.Queue[dict[str, Any] | None]] = set()

    async def on_event(self, msg: Msg) -> None:
        try:
            ev = decode_event(msg.data)
        except BadMessage:
            return
        self.queues.changed()
        item = self.fleet.observe(ev)
        for q in list(self.clients):
            try:
                q.put_nowait(item)
            except asyncio.QueueFull:
                self.clients.discard(q)
                _end(q)  # the browser reconnects and catches up from the history

    def view(self, queues: QueueState) -> dict[str, Any]:
        nodes, ledgers, health = self.snapshot()
        placed = {uid for led in ledgers.values() for uid in led.allocs}
        waiting = self.fleet.waiting(placed)
        return fleet_view(
            nodes,
            ledgers,
            health,
            self.telemetry(),
            waiting,
            list(self.fleet.feed)[-50:],
            self.fleet.clock(),
            queues,
        )

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def fleet_json(self, request: web.Request) -> web.Response:
        queues = await self.queues.current()
        return web.Response(
            body=msgspec.json.encode(self.view(queues)), content_type="application/json"
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        after = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        try:
            last = int(after)
        except ValueError:
            last = 0
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)
        self.clients.add(q)  # before the backlog is taken: nothing falls between the two
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await resp.prepare(request)
            for item in list(self.fleet.feed):
                if item["seq"] > last:
                    last = item["seq"]
                    await resp.write(_frame(item))
            while True:
                try:
                    got = await asyncio.wait_for(q.get(), KEEPALIVE)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if got is None:
                    break
                if got["seq"] > last:
                    last = got["seq"]
                    await resp.write(_frame(got))
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.clients.discard(q)
        return resp

    async def _close_streams(self, app: web.Application) -> None:
        # Without this, stopping the server would wait out its shutdown timeout for
        # every open stream.
        for q in list(self.clients):
            _end(q)
        self.clients.clear()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/api/fleet", self.fleet_json)
        app.router.add_get("/api/events", self.events)
        app.on_shutdown.append(self._close_streams)


def _end(q: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Ends a stream: a ``None`` in its queue, room made for it if need be."""
    with contextlib.suppress(asyncio.QueueEmpty):
        if q.full():
            q.get_nowait()
    q.put_nowait(None)


def _frame(item: dict[str, Any]) -> bytes:
    return f"id: {item['seq']}\ndata: {json.dumps(item, separators=(',', ':'))}\n\n".encode()
