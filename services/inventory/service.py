"""The inventory service's wiring: node registry events, health, and status queries.

Watches the inventory KV bucket (publishing ``registered`` / ``updated`` / ``removed``
node events), listens to heartbeats and marks silent nodes unhealthy (the health KV
bucket plus an ``unhealthy`` / ``recovered`` event), and answers ``hami.api.status``.
It also remembers the requests left pending by placement, with the reasons of their
last ``failed``, so ``hami list`` / ``hami describe`` can say who waits and why.
With several replicas, the health key is written by compare-and-set so only one
replica publishes each transition.

A garbage inventory or ledger entry (unreadable, or nonsense: another node's name,
negative memory) sets its node aside: it is left out of the status (inventory) or
shown unhealthy with the reason (ledger), one ``unhealthy`` node event is published
and one line logged; the status keeps answering. Repeated garbage (entries,
heartbeats, events) is logged once a minute with a count.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from services.inventory.health import HealthTracker, Transition
from shared import limits, logs, subjects
from shared.bus import BadMessage, Bus, Conflict, add_service, decode, decode_entry
from shared.config import Config
from shared.lifecycle import Background
from shared.schemas import (
    AllocFailed,
    AllocReleased,
    ClusterStatus,
    Heartbeat,
    NodeEvent,
    NodeHealth,
    NodeInventory,
    NodeLedger,
    PendingRequest,
    StatusRequest,
)
from shared.view import cluster_status

log = logging.getLogger("hami.inventory")
noisy = logs.RateLimited(log)


class InventoryService:
    def __init__(self, bus: Bus, cfg: Config, tick: float = 0.5) -> None:
        self.bus = bus
        self.cfg = cfg
        self.tick = tick
        self.nodes: dict[str, NodeInventory] = {}
        self.health: dict[str, NodeHealth] = {}
        self.health_rev: dict[str, int] = {}
        # Ledger entries as they came (KV key -> bytes), decoded only when a status is
        # asked for: every decision changes one, a status is rare.
        self._ledgers_raw: dict[str, bytes] = {}
        self._ledgers: dict[str, NodeLedger] = {}  # decoded, dropped when the entry changes
        self._ledger_revs: dict[str, int] = {}
        self._new_bad: dict[str, str] = {}  # garbage ledger entries not yet announced
        self.tracker = HealthTracker(cfg.unhealthy_after, time.time())
        # uid -> the request's last pending ``failed``; dropped when it is released or
        # (checked when asked) appears in a ledger.
        self.pending: dict[str, PendingRequest] = {}
        # KV key -> why its entry is garbage, per bucket; its node is set aside.
        self.bad_nodes: dict[str, str] = {}
        self.bad_ledgers: dict[str, str] = {}
        self._bg = Background()
        self._svc: object | None = None

    async def _on_node(self, key: str, value: bytes | None, revision: int) -> None:
        now = time.time()
        if value is None:
            name = next((n for n in self.nodes if subjects.kv_key(n) == key), key)
            self.bad_nodes.pop(key, None)
            if self.nodes.pop(name, None) is not None:
                self.tracker.forget(name)
                await self._event(name, "removed", "inventory deleted", f"{revision}")
            return
        inv, why = decode_entry(value, NodeInventory, key, limits.inventory_problems)
        if inv is None:
            known = next((n for n in self.nodes if subjects.kv_key(n) == key), None)
            if known is not None:
                del self.nodes[known]  # nothing of it can be trusted now
                self.tracker.forget(known)
            await self._garbage(self.bad_nodes, key, "inventory", why, revision)
            return
        if self.bad_nodes.pop(key, None) is not None:
            log.info("node %s: its inventory entry is good again", inv.node)
        prev = self.nodes.get(inv.node)
        self.nodes[inv.node] = inv
        self.tracker.known(inv.node, now)
        if prev is None:
            await self._event(inv.node, "registered", f"{len(inv.devices)} devices", f"{revision}")
        elif prev.devices != inv.devices or prev.cordoned != inv.cordoned:
            await self._event(inv.node, "updated", f"{len(inv.devices)} devices", f"{revision}")

    async def _garbage(self, bad: dict[str, str], key: str, what: str, why: str, revision: int) -> None:
        """Set a node aside for a garbage entry: one event and one line when it turns
        bad (or bad in another way), a counted line a minute while it stays so."""
        node = limits.node_of_key(key)
        if bad.get(key) == why:
            noisy.warning(f"garbage:{what}:{key}", "node %s: %s entry still garbage: %s", node, what, why)
            return
        bad[key] = why
        try:
            await self._event(node, "unhealthy", f"{what} entry is garbage: {why}"[:1024],
                              f"garbage:{what}:{revision}")
        except Exception as exc:  # the entry stays set aside; the event is only news
            noisy.warning("event-failed", "cannot publish that node %s is set aside: %s", node, exc)

    async def _on_health(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            return
        try:
            h = decode(value, NodeHealth)
        except BadMessage as exc:
            noisy.warning(f"garbage:health:{key}", "ignoring garbage health entry %s: %s", key, exc)
            return
        self.health[h.node] = h
        self.health_rev[h.node] = revision
        # Another replica's verdict counts here too.
        self.tracker.healthy[h.node] = h.healthy

    async def _on_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        self._ledgers.pop(key, None)
        self._ledger_revs[key] = revision
        if value is None:
            self._ledgers_raw.pop(key, None)
            self.bad_ledgers.pop(key, None)
            return
        self._ledgers_raw[key] = value

    @property
    def ledgers(self) -> dict[str, NodeLedger]:
        """Node -> its ledger, decoding what changed since the last call; a garbage
        entry is left out (and its key recorded in :attr:`bad_ledgers`)."""
        out: dict[str, NodeLedger] = {}
        for key, raw in self._ledgers_raw.items():
            led = self._ledgers.get(key)
            if led is None:
                led = self._decode_ledger(key, raw)
                if led is None:
                    continue
                self._ledgers[key] = led
            out[led.node] = led
        return out

    def _decode_ledger(self, key: str, raw: bytes) -> NodeLedger | None:
        led, why = decode_entry(raw, NodeLedger, key, limits.ledger_problems)
        if led is not None:
            if self.bad_ledgers.pop(key, None) is not None:
                log.info("node %s: its ledger entry is good again", led.node)
            return led
        if self.bad_ledgers.get(key) != why:
            self._new_bad[key] = why  # the ticker publishes its event
        self.bad_ledgers[key] = why
        return None

    async def _check_ledgers(self) -> None:
        """Decode the ledger entries changed since the last look (at most one decode
        per node per tick, however often it changed) and announce new garbage."""
        _ = self.ledgers
        new, self._new_bad = self._new_bad, {}
        for key, why in new.items():
            self.bad_ledgers.pop(key, None)  # _garbage records it again, with its event
            await self._garbage(self.bad_ledgers, key, "ledger", why, self._ledger_revs.get(key, 0))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except BadMessage as exc:
            noisy.warning(f"bad:{msg.subject}", "ignoring a malformed heartbeat on %s: %s", msg.subject, exc)
            return
        t = self.tracker.beat(hb.node, time.time())
        if t is not None:
            await self._apply(t)

    async def _event(self, node: str, verb: str, reason: str, dedupe: str) -> None:
        ev = NodeEvent(node=node, verb=verb, reason=reason, at=time.time())
        await self.bus.publish_event(
            subjects.node_event(verb, node), ev, msg_id=f"node:{verb}:{node}:{dedupe}"
        )
        log.info("node %s %s (%s)", node, verb, reason)

    async def _apply(self, t: Transition) -> None:
        now = time.time()
        h = NodeHealth(node=t.node, healthy=t.healthy, since=now, reason=t.reason)
        try:
            rev = await self.bus.kv_cas(
                subjects.HEALTH_BUCKET, t.node, h, self.health_rev.get(t.node, 0)
            )
        except Conflict:
            # Another replica recorded a verdict first; the watch brings it here.
            return
        self.health[t.node] = h
        self.health_rev[t.node] = rev
        verb = "recovered" if t.healthy else "unhealthy"
        await self._event(t.node, verb, t.reason, f"{rev}")

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            for t in self.tracker.tick(time.time()):
                try:
                    await self._apply(t)
                except Exception:
                    log.exception("cannot record health of %s", t.node)
            try:
                await self._check_ledgers()
            except Exception as exc:
                noisy.warning("check-ledgers", "cannot check the ledger entries: %s", exc)

    async def _on_failed(self, msg: Msg) -> None:
        try:
            f = decode(msg.data, AllocFailed)
        except BadMessage as exc:
            noisy.warning(f"bad:{msg.subject}", "ignoring a malformed event on %s: %s", msg.subject, exc)
            return
        if not f.pending:
            self.pending.pop(f.uid, None)
            return
        self.pending[f.uid] = PendingRequest(
            uid=f.uid, name=f.name, namespace=f.namespace, source=f.source,
            reasons=f.reasons, nodes_total=f.nodes_total, message=f.message,
            requested_at=f.requested_at, failed_at=f.failed_at,
        )

    async def _on_released(self, msg: Msg) -> None:
        if self.pending:  # most releases concern no pending request: skip the decode
            try:
                self.pending.pop(decode(msg.data, AllocReleased).uid, None)
            except BadMessage as exc:
                noisy.warning(f"bad:{msg.subject}", "ignoring a malformed event on %s: %s", msg.subject, exc)

    async def _status(self, data: bytes) -> ClusterStatus:
        req = decode(data or b"{}", StatusRequest)
        ledgers = self.ledgers
        health = dict(self.health)
        for key, why in self.bad_ledgers.items():
            # Its reservations are unknown: shown unhealthy, with the reason, not as free.
            for name in [n for n in self.nodes if subjects.kv_key(n) == key]:
                health[name] = NodeHealth(node=name, healthy=False, since=0.0,
                                          reason=f"ledger entry is garbage: {why}")
        st = cluster_status(self.nodes, health, ledgers)
        placed = {uid for led in ledgers.values() for uid in led.allocs}
        for uid in [u for u in self.pending if u in placed]:
            del self.pending[uid]
        st.pending = len(self.pending)
        if req.detail:
            for n in st.nodes:
                led = ledgers.get(n.node)
                if led is not None:
                    n.held = sorted(led.allocs.values(), key=lambda a: (a.namespace, a.name))
            st.pending_requests = sorted(
                self.pending.values(), key=lambda p: (p.requested_at, p.namespace, p.name)
            )
        return st

    async def start(self) -> None:
        ready = [asyncio.Event() for _ in range(3)]
        self._bg.add(await self.bus.watch_kv(subjects.HEALTH_BUCKET, self._on_health, ready[0]))
        self._bg.add(await self.bus.watch_kv(subjects.NODES_BUCKET, self._on_node, ready[1]))
        self._bg.add(await self.bus.watch_kv(subjects.LEDGER_BUCKET, self._on_ledger, ready[2]))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 10)
        self._bg.add_sub(await self.bus.subscribe(subjects.HEARTBEAT_ALL, self._on_heartbeat))
        self._bg.add_sub(await self.bus.subscribe(subjects.alloc("failed"), self._on_failed))
        for released in (subjects.alloc("released"), subjects.alloc_any("released")):
            self._bg.add_sub(await self.bus.subscribe(released, self._on_released))
        self._bg.spawn(self._ticker(), "health-ticker")
        self._svc = await add_service(self.bus, "hami-inventory", {subjects.API_STATUS: self._status})

    async def stop(self) -> None:
        await self._bg.stop()
        if self._svc is not None:
            await self._svc.stop()  # type: ignore[attr-defined]
