"""The metrics service's wiring: KV watches and event subscriptions in, HTTP out.

Serves ``/metrics`` (Prometheus text), ``/api/status`` (JSON) and the operator's page at
``/`` with its data (``/api/fleet``, live ``/api/events``). It only reads: any number of replicas can run.
The queues it shows and exports it asks placement for (``hami.placement.queues``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.metrics.collector import AllocationCollector, LatencyMetrics, MigIdentities, Snapshot
from services.metrics.fleet import Fleet, FleetCollector
from services.metrics.live import Live
from services.metrics.queues import Queues, QueuesCollector, ask_placement
from shared import subjects
from shared.bus import BadMessage, Bus, decode, decode_event
from shared.config import Config
from shared.lifecycle import Background
from shared.schemas import (
    AllocBound,
    AllocDecided,
    AllocFailed,
    AllocPrepared,
    NodeHealth,
    NodeInventory,
    NodeLedger,
    Telemetry,
)
from shared.view import cluster_status as cluster_view

log = logging.getLogger("hami.metrics")


class MetricsService:
    def __init__(self, bus: Bus, cfg: Config, port: int | None = None, host: str = "127.0.0.1",
                 legacy_metrics: bool | None = None) -> None:
        self.bus = bus
        self.cfg = cfg
        self.port = cfg.metrics_port if port is None else port
        self.host = host
        self.nodes: dict[str, NodeInventory] = {}
        self.ledgers: dict[str, NodeLedger] = {}
        self.health: dict[str, NodeHealth] = {}
        self.registry = CollectorRegistry()
        self.telemetry: dict[str, Telemetry] = {}
        if legacy_metrics is None:
            # HAMi's legacyMetrics switch: metrics.legacyMetrics, or HAMI_LEGACY_METRICS=1.
            legacy_metrics = cfg.metrics.legacy_metrics or os.environ.get(
                "HAMI_LEGACY_METRICS", "") in ("1", "true", "True")
        self.legacy_metrics = legacy_metrics
        self.mig = MigIdentities()  # realised MIG instances: prepared events and telemetry
        self.registry.register(AllocationCollector(
            self.snapshot, legacy=legacy_metrics, telemetry=lambda: self.telemetry, mig=self.mig))
        self.latency = LatencyMetrics(self.registry)
        self.fleet = Fleet()
        self.registry.register(FleetCollector(self.fleet, self.snapshot))
        # The queues are placement's; asked for when the page or a scrape needs them.
        self.queues = Queues(ask_placement(bus))
        self.registry.register(QueuesCollector(lambda: self.queues.state))
        self.live = Live(self.fleet, self.snapshot, lambda: self.telemetry, self.queues)
        self._decided_at: OrderedDict[str, float] = OrderedDict()
        self._bg = Background()
        self._runner: web.AppRunner | None = None

    def snapshot(self) -> Snapshot:
        return self.nodes, self.ledgers, self.health

    async def _on_node(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            for n in [n for n in self.nodes if subjects.kv_key(n) == key]:
                del self.nodes[n]
                self.telemetry.pop(n, None)
            return
        inv = decode(value, NodeInventory)
        self.nodes[inv.node] = inv

    async def _on_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        # Placement writes a ledger when a queue's use changes: its last answer is old.
        self.queues.changed()
        if value is not None:
            led = decode(value, NodeLedger)
            self.ledgers[led.node] = led

    async def _on_health(self, key: str, value: bytes | None, revision: int) -> None:
        if value is not None:
            h = decode(value, NodeHealth)
            self.health[h.node] = h

    async def _on_telemetry(self, msg: Msg) -> None:
        try:
            tel = decode(msg.data, Telemetry)
        except (BadMessage, msgspec.ValidationError, msgspec.DecodeError):
            return
        prev = self.telemetry.get(tel.node)
        if prev is None or tel.at >= prev.at:  # a late, older sample loses
            self.telemetry[tel.node] = tel
            self.mig.observe_telemetry(tel)  # its MIG instances, also those prepared before we started

    async def _on_event(self, msg: Msg) -> None:
        try:
            ev = decode_event(msg.data)
        except BadMessage:
            return
        if isinstance(ev, AllocDecided):
            if ev.requested_at and ev.decided_at:
                self.latency.decision.labels("decided").observe(max(0.0, ev.decided_at - ev.requested_at))
            self._decided_at[ev.uid] = ev.decided_at
            while len(self._decided_at) > 100_000:
                self._decided_at.popitem(last=False)
        elif isinstance(ev, AllocFailed):
            if ev.requested_at and ev.failed_at:
                self.latency.decision.labels("failed").observe(max(0.0, ev.failed_at - ev.requested_at))
        elif isinstance(ev, AllocPrepared):
            self.mig.observe(ev)
        elif isinstance(ev, AllocBound):
            t = self._decided_at.pop(ev.uid, None)
            if t:
                self.latency.bind.observe(max(0.0, ev.bound_at - t))

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.queues.current()  # the collectors are synchronous: bring the answer first
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, request: web.Request) -> web.Response:
        st = cluster_view(self.nodes, self.health, self.ledgers)
        return web.Response(body=msgspec.json.encode(st), content_type="application/json")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        ready = [asyncio.Event() for _ in range(3)]
        self._bg.add(await self.bus.watch_kv(subjects.NODES_BUCKET, self._on_node, ready[0]))
        self._bg.add(await self.bus.watch_kv(subjects.LEDGER_BUCKET, self._on_ledger, ready[1]))
        self._bg.add(await self.bus.watch_kv(subjects.HEALTH_BUCKET, self._on_health, ready[2]))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 15)
        for verb in ("decided", "bound", "prepared"):
            self._bg.add_sub(await self.bus.subscribe(subjects.alloc_any(verb), self._on_event))
        self._bg.add_sub(await self.bus.subscribe(subjects.alloc("failed"), self._on_event))
        self._bg.add_sub(await self.bus.subscribe(subjects.TELEMETRY_ALL, self._on_telemetry))
        # The page's feed, pending requests, failure reasons. Not ``requested``: a core
        # subscriber there would answer for a deleted stream, and the binder's publish
        # would time out instead of meeting "no responders" and creating it again.
        feed = [subjects.alloc(v) for v in ("failed", "released")]
        feed += [subjects.alloc_any(v) for v in subjects.ALLOC_VERBS if v != "requested"]
        for subject in [*feed, f"{subjects.PREFIX}.evt.node.>"]:
            self._bg.add_sub(await self.bus.subscribe(subject, self.live.on_event))
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        self.live.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("metrics on %s/metrics", self.url)

    async def stop(self) -> None:
        await self._bg.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.queues.stop()
