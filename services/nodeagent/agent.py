"""The node agent's wiring: registration, heartbeats and the node's reservations.

Publishes the node's inventory to the inventory KV bucket (on start and whenever
discovery changes), a heartbeat every ``heartbeat_interval`` seconds, and follows the
ledger entry of its own node, which tells it exactly which pod UID owns which slice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from services.nodeagent.backends import Backend
from services.nodeagent.registration import register
from shared import subjects
from shared.bus import Bus, decode
from shared.config import Config
from shared.schemas import Heartbeat, LedgerAlloc, NodeInventory, NodeLedger

log = logging.getLogger("hami.nodeagent")


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
        self.beating = True  # tests stop the heartbeat to simulate a dead node
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0

    def build_inventory(self) -> NodeInventory:
        found = self.backend.discover()
        devices, links = register(found, self.cfg.node)
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
        self.allocs = dict(ledger.allocs)
        self.allocs_changed.set()

    async def start(self) -> None:
        await self.publish_inventory(force=True)
        await self.heartbeat_once()
        self._tasks.append(asyncio.create_task(self._heartbeats(), name=f"hb-{self.node}"))
        self._tasks.append(asyncio.create_task(self._rediscover(), name=f"disc-{self.node}"))
        self._tasks.append(await self.bus.watch_kv(subjects.LEDGER_BUCKET, self._on_ledger, key=self.node))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
