"""The node agent's wiring: registration, heartbeats and the node's reservations.

Publishes the node's inventory to the inventory KV bucket (on start and whenever
discovery changes), a heartbeat every ``heartbeat_interval`` seconds, and follows the
ledger entry of its own node, which tells it exactly which pod UID owns which slice.

Kubernetes mode (services/nodeagent/kube) hangs its parts on two hooks:
``ledger_listeners`` are awaited with the node's allocations after every ledger change
(slice files, the device plugin's matcher), ``inventory_listeners`` with the new
inventory whenever it changes (device plugin device list, node annotations).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

from services.nodeagent.backends import Backend
from services.nodeagent.backends.vendors.registration import vendor_devices
from services.nodeagent.registration import register
from shared import subjects
from shared.bus import Bus, decode
from shared.config import Config
from shared.lifecycle import Background
from shared.schemas import Heartbeat, LedgerAlloc, NodeInventory, NodeLedger

log = logging.getLogger("hami.nodeagent")

LedgerListener = Callable[[Mapping[str, LedgerAlloc]], Awaitable[None]]
InventoryListener = Callable[[NodeInventory], Awaitable[None]]


class NodeAgent:
    def __init__(
        self,
        bus: Bus,
        node: str,
        backend: Backend,
        cfg: Config,
        *,
        cpu_milli: int = 0,
        memory_mib: int = 0,
        labels: dict[str, str] | None = None,
        rediscover_every: float = 30.0,
    ) -> None:
        self.bus = bus
        self.node = node
        self.backend = backend
        self.cfg = cfg
        self.agent_id = uuid.uuid4().hex[:12]
        self.cpu_milli = cpu_milli
        self.memory_mib = memory_mib
        self.labels = labels or {}
        self.rediscover_every = rediscover_every
        self.inventory: NodeInventory | None = None
        self.allocs: dict[str, LedgerAlloc] = {}  # pod UID -> its slice on this node
        self.allocs_changed = asyncio.Event()
        self.ledger_revision = 0  # of the ledger entry ``allocs`` comes from
        self.ledger_ready = asyncio.Event()  # set once the entry has been read at start
        self.ledger_listeners: list[LedgerListener] = []
        self.inventory_listeners: list[InventoryListener] = []
        self._ledger_lock = asyncio.Lock()
        self.beating = True  # tests stop the heartbeat to simulate a dead node
        self._bg = Background()
        self._seq = 0

    def build_inventory(self) -> NodeInventory:
        found = self.backend.discover()
        devices, links = register(found, self.cfg.node)
        # other vendors' cards as their own plugins register them
        devices = vendor_devices(found, devices, self.cfg.node)
        return NodeInventory(
            node=self.node,
            agent_id=self.agent_id,
            devices=devices,
            links=links,
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
            max_pods=self.cfg.node.max_pods if self.cpu_milli else 0,
            labels=self.labels,
            published_at=time.time(),
        )

    async def publish_inventory(self, force: bool = False) -> None:
        inv = await asyncio.to_thread(self.build_inventory)
        prev = self.inventory
        same = (
            prev is not None
            and prev.devices == inv.devices
            and prev.links == inv.links
            and prev.labels == inv.labels
        )
        if same and not force:
            return
        self.inventory = inv
        await self.bus.kv_put(subjects.NODES_BUCKET, self.node, inv)
        log.info("%s: registered %d devices", self.node, len(inv.devices))
        for listener in self.inventory_listeners:
            try:
                await listener(inv)
            except Exception:
                log.exception("%s: inventory listener failed", self.node)

    async def heartbeat_once(self) -> None:
        self._seq += 1
        await self.bus.publish(
            subjects.heartbeat(self.node),
            Heartbeat(node=self.node, agent_id=self.agent_id, seq=self._seq, at=time.time()),
        )

    async def _heartbeats(self) -> None:
        while True:
            if self.beating:
                try:
                    await self.heartbeat_once()
                except Exception as exc:  # a reconnecting client: keep beating
                    log.warning("%s: heartbeat failed: %s", self.node, exc)
            await asyncio.sleep(self.cfg.heartbeat_interval)

    async def _rediscover(self) -> None:
        while True:
            await asyncio.sleep(self.rediscover_every)
            try:
                await self.publish_inventory()
            except Exception as exc:
                log.warning("%s: inventory refresh failed: %s", self.node, exc)

    async def _on_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        ledger = decode(value, NodeLedger) if value else NodeLedger(node=self.node)
        await self._apply_ledger(ledger, revision)

    async def _apply_ledger(self, ledger: NodeLedger, revision: int) -> None:
        # One change at a time, in revision order: the watch and refresh_ledger may both
        # deliver, and a listener must never see an older ledger after a newer one.
        async with self._ledger_lock:
            if revision and revision <= self.ledger_revision:
                return  # already applied (the watch and a refresh both delivered it)
            self.ledger_revision = max(self.ledger_revision, revision)
            self.allocs = dict(ledger.allocs)
            self.allocs_changed.set()
            for listener in self.ledger_listeners:
                try:
                    await listener(self.allocs)
                except Exception:
                    log.exception("%s: ledger listener failed", self.node)

    async def refresh_ledger(self) -> None:
        """Read the node's ledger entry now instead of waiting for the watch.

        The device plugin calls this before matching an Allocate, so a decision written
        a moment ago is never missed because the watch lags.
        """
        raw, rev = await self.bus.kv_get_raw(subjects.LEDGER_BUCKET, self.node)
        if rev > self.ledger_revision:
            led = decode(raw, NodeLedger) if raw else NodeLedger(node=self.node)
            await self._apply_ledger(led, rev)
        else:
            # Applied already, but its listeners may still be running: wait for them.
            async with self._ledger_lock:
                pass

    async def start(self) -> None:
        await self.publish_inventory(force=True)
        await self.heartbeat_once()
        self._bg.spawn(self._heartbeats(), f"hb-{self.node}")
        self._bg.spawn(self._rediscover(), f"disc-{self.node}")
        self._bg.add(
            await self.bus.watch_kv(
                subjects.LEDGER_BUCKET, self._on_ledger, ready=self.ledger_ready, key=self.node
            )
        )

    async def stop(self) -> None:
        await self._bg.stop()
