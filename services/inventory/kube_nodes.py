"""Nodes served by HAMi's own vendor device plugins: their cards, from the Node object.

A node whose accelerators are run by a vendor's HAMi plugin (ascend-device-plugin,
dcu-vgpu-device-plugin, amd-device-plugin, ...) rather than by our node agent tells
the scheduler its cards the way HAMi's scheduler reads them: the vendor's register
annotation on the Node (``hami.io/node-register-Ascend910B3``, ``hami.io/node-dcu-
register``, ...) or, for the families HAMi builds from capacity (Cambricon, Kunlunxin
whole cards, AWS Neuron, ...), the Node's extended resources. :func:`node_devices`
decodes every family's with the device-family registry's ``node_cards`` (HAMi's
``GetNodeDevices``), and :class:`NodeRegisterWatcher` turns each such Node into a
:class:`NodeInventory` in the inventory bucket, with a heartbeat while the Node exists,
so placement sees its cards like any other node's (heartbeats every
``heartbeat_interval`` seconds, as a node agent's).

A node that has its own node agent is left to it: the watcher writes and removes only
entries it wrote itself (``agent_id`` :data:`KUBE_AGENT`), so an agent's inventory is
never overwritten, and an entry of ours is replaced as soon as an agent registers.
NVIDIA cards come only from node agents (HAMi's NVIDIA plugin is ours). The Nodes are
listed every ``interval`` seconds (a register annotation changes every 30 s at most).

A vendor whose plugin stopped answering loses its cards as in HAMi's scheduler
(``CheckHealth`` of ``pkg/device``): its handshake annotation reads ``Requesting_<time>``
(the scheduler asked, the plugin never replaced it with ``Reported ...``) and that time
is more than :data:`HANDSHAKE_TIMEOUT` seconds old, unless the Node still advertises
the vendor's count resource as allocatable (the plugin is alive, only slow to report).
A ``Requesting`` without a readable time keeps the cards, as HAMi does. The asking is
ours too, as it is HAMi's scheduler's: on a Node the watcher serves, a handshake that
does not read ``Requesting`` (the plugin reported, or never did) is patched to
``Requesting_<now>`` (``request_handshakes``; the plugin answers every 30 s or so), so
a plugin that stops is noticed without HAMi's scheduler in the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared import logs, subjects
from shared.bus import Bus
from shared.devices.base import CARD_MODE, Family, RequestError, capacity_int
from shared.devices.registry import REGISTRY, Registry
from shared.kube import Kube, KubeError, path
from shared.schemas import Device, Heartbeat, NodeInventory

log = logging.getLogger("hami.inventory.kube_nodes")
noisy = logs.RateLimited(log)

KUBE_AGENT = "kube-register"  # agent_id of an inventory decoded from a Node object
# Seconds a vendor plugin has to answer the scheduler's "Requesting_<time>" (HAMi: 60).
HANDSHAKE_TIMEOUT = 60.0
# How HAMi's scheduler writes that time: Go's time.DateTime, in its local time zone.
HANDSHAKE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def handshake_expired(
    fam: Family, annotations: Mapping[str, str], allocatable: Mapping[str, Any], now: float
) -> bool:
    """True when ``fam``'s plugin left the scheduler's handshake request unanswered for
    longer than :data:`HANDSHAKE_TIMEOUT` and the Node no longer advertises its cards."""
    if not fam.handshake_annotation:
        return False
    value = annotations.get(fam.handshake_annotation, "")
    if "Requesting" not in value:
        return False  # Reported (the plugin answered), Deleted, or never asked
    _, sep, stamp = value.partition("_")
    if not sep:
        return False
    try:
        asked = datetime.strptime(stamp, HANDSHAKE_TIME_FORMAT).timestamp()  # naive: local
    except ValueError:
        return False  # HAMi keeps a vendor whose request time it cannot read
    if now < asked + HANDSHAKE_TIMEOUT:
        return False
    # HAMi skips the clean-up while the kubelet still lists the plugin's resource.
    return not _capacity_says(allocatable, (fam.resources.count,))


def _capacity_says(capacity: Mapping[str, Any], names: tuple[str, ...]) -> bool:
    try:
        return any(capacity_int(capacity, n) > 0 for n in names)
    except RequestError:
        return False


def handshake_requests(
    node: Mapping[str, Any], now: float, registry: Registry = REGISTRY
) -> dict[str, str]:
    """The handshake annotations to set to ``Requesting_<now>`` on a Node: those of the
    families that registered there and whose handshake is not a request already."""
    meta = node.get("metadata") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    asked = "Requesting_" + time.strftime(HANDSHAKE_TIME_FORMAT, time.localtime(now))
    return {
        fam.handshake_annotation: asked
        for fam in registry.families
        if not fam.engine_native
        and fam.handshake_annotation
        and fam.register_annotation in annotations
        and "Requesting" not in annotations.get(fam.handshake_annotation, "")
    }


def node_devices(
    node: Mapping[str, Any], registry: Registry = REGISTRY, now: float | None = None
) -> tuple[list[Device], list[str]]:
    """Every non-NVIDIA family's cards on a Node object, and what was left out (one
    line per family: a register annotation that does not decode, or an expired
    handshake, see :func:`handshake_expired`; ``now`` defaults to the clock)."""
    meta = node.get("metadata") or {}
    name = str(meta.get("name") or "")
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    status: Mapping[str, Any] = node.get("status") or {}
    capacity: Mapping[str, Any] = status.get("capacity") or {}
    allocatable: Mapping[str, Any] = status.get("allocatable") or {}
    now = time.time() if now is None else now
    devices: list[Device] = []
    problems: list[str] = []
    for fam in registry.families:
        if fam.engine_native:
            continue
        if fam.register_annotation:
            if fam.register_annotation not in annotations:
                continue
        elif not _capacity_says(capacity, fam.resources.all()):
            continue
        if handshake_expired(fam, annotations, allocatable, now):
            problems.append(
                f"{fam.name}: handshake {fam.handshake_annotation}="
                f"{annotations[fam.handshake_annotation]!r} unanswered for over "
                f"{HANDSHAKE_TIMEOUT:.0f} s: its device plugin is gone, its cards left out"
            )
            continue
        try:
            cards = fam.node_cards(name, annotations, capacity)
        except (RequestError, NotImplementedError, ZeroDivisionError) as exc:
            where = fam.register_annotation or "capacity"
            problems.append(f"{fam.name} ({where}): {exc}")
            continue
        devices += [
            Device(
                uuid=c.id,
                index=c.index,
                type=c.type or fam.name,
                vendor=fam.name,
                count=c.count,
                devmem=c.totalmem,
                devcore=c.totalcore,
                numa=c.numa,
                # the mode a family's register says the card runs in (Ascend's soft
                # mode), which placement hands back to the family's fit
                mode=str(c.custom.get(CARD_MODE, "")),
                health=c.health,
                custom_info={
                    k: v for k, v in c.custom.items() if isinstance(v, str | int) and k != CARD_MODE
                },
            )
            for c in cards
        ]
    return devices, problems


def node_inventory(node: Mapping[str, Any], now: float) -> NodeInventory | None:
    """The inventory of a Node its vendor plugins registered cards on (None: none)."""
    devices, problems = node_devices(node, now=now)
    meta = node.get("metadata") or {}
    for p in problems:  # the Nodes are listed every few seconds: once a minute is enough
        noisy.warning(f"node:{meta.get('name')}:{p.split(':', 1)[0]}", "node %s: %s",
                      meta.get("name"), p)
    if not devices:
        return None
    return NodeInventory(
        node=str(meta.get("name") or ""),
        agent_id=KUBE_AGENT,
        devices=devices,
        labels=dict(meta.get("labels") or {}),
        published_at=now,
    )


class NodeRegisterWatcher:
    """Keeps the inventory bucket's entries of vendor-plugin nodes (see the module doc)."""

    def __init__(
        self,
        bus: Bus,
        kube: Kube,
        interval: float = 5.0,
        heartbeat_interval: float = 2.0,
        request_handshakes: bool = True,
    ) -> None:
        self.bus = bus
        self.kube = kube
        self.request_handshakes = request_handshakes
        self.interval = interval
        self.heartbeat_interval = heartbeat_interval
        self.written: dict[str, NodeInventory] = {}  # node -> what we last wrote
        self._seq = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        next_list = 0.0
        while True:
            if time.monotonic() >= next_list:
                next_list = time.monotonic() + self.interval
                try:
                    await self.sync_once()
                except (KubeError, OSError) as exc:  # the API server is away: try again
                    log.warning("listing nodes: %s", exc)
            await self.beat()
            await asyncio.sleep(min(self.interval, self.heartbeat_interval))

    async def beat(self) -> None:
        """A heartbeat for every node we keep (the Node exists; its plugin registered)."""
        now = time.time()
        for node in self.written:
            self._seq += 1
            await self.bus.publish(
                subjects.heartbeat(node),
                Heartbeat(node=node, agent_id=KUBE_AGENT, seq=self._seq, at=now),
            )

    async def _ours(self, node: str) -> bool:
        """No entry, or one this watcher wrote: an agent's entry is never touched."""
        cur, _ = await self.bus.kv_get(subjects.NODES_BUCKET, node, NodeInventory)
        return cur is None or cur.agent_id == KUBE_AGENT

    async def _ask(self, node: str, requests: dict[str, str]) -> None:
        """Patch the handshake requests onto the Node (a failure waits for the next pass)."""
        if not requests:
            return
        try:
            await self.kube.patch(path("nodes", name=node), {"metadata": {"annotations": requests}})
        except (KubeError, OSError) as exc:
            noisy.warning(f"handshake:{node}", "node %s: cannot request handshakes: %s", node, exc)

    async def sync_once(self) -> None:
        """One pass over the Nodes: write changed entries, drop those of gone Nodes."""
        listed = await self.kube.get(path("nodes"))
        now = time.time()
        seen: set[str] = set()
        for obj in listed.get("items") or []:
            inv = node_inventory(obj, now)
            if inv is None or not inv.node:
                continue
            seen.add(inv.node)
            if not await self._ours(inv.node):
                self.written.pop(inv.node, None)  # an agent serves it now
                continue
            if self.request_handshakes:
                await self._ask(inv.node, handshake_requests(obj, now))
            old = self.written.get(inv.node)
            if old is None or (old.devices, old.labels) != (inv.devices, inv.labels):
                await self.bus.kv_put(subjects.NODES_BUCKET, inv.node, inv)
                self.written[inv.node] = inv
        for gone in [n for n in self.written if n not in seen]:
            # Forgotten only once the entry is gone: a failed delete is tried again on
            # the next pass, and whoever sees the node forgotten finds no entry.
            if await self._ours(gone):
                await self.bus.kv_delete(subjects.NODES_BUCKET, gone)
            self.written.pop(gone, None)
