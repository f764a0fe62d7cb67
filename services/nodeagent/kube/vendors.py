"""The kubelet device plugins of the other vendors' cards: one per family present.

HAMi's vendor plugins each serve their vendor's count resource (``huawei.com/
Ascend910B3``, ``cambricon.com/vmlu``, ``hygon.com/dcunum``, ...); the node agent does
the same for every family whose cards it registered, with the resource name from the
device-family registry (the name the webhook and placement read), so one node may
serve several vendors beside ``nvidia.com/gpu``.

Each :class:`VendorPlugin` advertises ``count`` replicas ``<card>::<k>`` of its cards
(a card's slots, as its register annotation says), follows the ledger's cards of its
family with its own :class:`~services.nodeagent.kube.matching.Matcher` (the kubelet
calls each resource's plugin for that resource's containers only), and answers
``Allocate`` with the family's env, device nodes and mounts
(:func:`services.nodeagent.backends.vendors.allocate.vendor_allocation`: the registry's
one answer per vendor) for the container the call is for. These vendors have no slice
file to narrow a union of cards afterwards, so when a call may be for containers on
different cards it answers the one decided first that it has not answered yet, as
HAMi's vendor plugins take the oldest pending pod; the ambiguity is counted. AMD slices
sharing a card get disjoint compute units: the plugin remembers which it handed out. Host files the answer needs (Hygon's vdev
config) are written under the host root before the answer leaves.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends.vendors import FAMILIES
from services.nodeagent.backends.vendors.allocate import (
    VendorAllocateError,
    to_container_allocation,
    vendor_allocation,
)
from services.nodeagent.deviceplugin.server import (
    AllocationError,
    ContainerAllocation,
    DevicePlugin,
    DeviceState,
)
from services.nodeagent.deviceplugin.v1beta1 import DEVICE_PLUGIN_PATH
from services.nodeagent.kube.matching import Candidate, Matcher, of_vendor
from services.nodeagent.kube.plugin import candidates_for, prefer, replicas, same_slice
from shared.devices.amd import cus_held
from shared.devices.base import AllocateContext
from shared.devices.registry import REGISTRY
from shared.schemas import Device, LedgerAlloc

log = logging.getLogger("hami.nodeagent.vendors")


def resource_of(family: str) -> str:
    """The kubelet resource a family's plugin serves: its count resource."""
    return REGISTRY.family(family).resources.count


def families_present(devices: list[Device]) -> list[str]:
    """The non-NVIDIA families among a node's cards, in registry order."""
    have = {d.vendor for d in devices}
    return [f.name for f in REGISTRY.families if f.name in have and f.name in FAMILIES]


class VendorPlugin:
    """The device plugin of one family's resource on one node (see the module doc)."""

    def __init__(
        self,
        agent: NodeAgent,
        family: str,
        *,
        plugin_dir: str | os.PathLike[str] = DEVICE_PLUGIN_PATH,
        host_root: str | os.PathLike[str] = "/",
        wait_timeout: float = 5.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.agent = agent
        self.family = family
        self.resource = resource_of(family)
        self.host_root = Path(host_root)
        self.wait_timeout = wait_timeout
        self.matcher = Matcher()
        self.exact = 0
        self.ambiguous = 0
        self._lock = asyncio.Lock()
        self._health: tuple[tuple[str, bool, int], ...] = ()
        # (pod uid, container) -> card -> the compute units its answer gave it (AMD), so
        # the next slice on that card gets others (kept in memory: a restarted agent
        # starts from none, where HAMi rebuilds them from the pods' annotations)
        self.cus: dict[tuple[str, str], dict[str, frozenset[int]]] = {}
        self.answered: set[tuple[str, str]] = set()  # containers already answered
        self.plugin = DevicePlugin(
            self.resource,
            self.devices,
            self.allocate,
            self.preferred,
            plugin_dir=plugin_dir,
            poll_interval=poll_interval,
        )

    async def start(self) -> None:
        self.matcher.update(of_vendor(self.agent.allocs, self.family))
        self.agent.ledger_listeners.append(self.on_ledger)
        self.agent.inventory_listeners.append(self.on_inventory)
        await self.plugin.start()

    async def stop(self) -> None:
        for lst, fn in (
            (self.agent.ledger_listeners, self.on_ledger),
            (self.agent.inventory_listeners, self.on_inventory),
        ):
            if fn in lst:
                lst.remove(fn)  # type: ignore[arg-type]
        await self.plugin.stop()

    def cards(self) -> list[Device]:
        inv = self.agent.inventory
        return [d for d in inv.devices if d.vendor == self.family] if inv else []

    def devices(self) -> list[DeviceState]:
        return replicas(self.cards())

    async def on_ledger(self, allocs: Mapping[str, LedgerAlloc]) -> None:
        self.matcher.update(of_vendor(allocs, self.family))
        for key in [k for k in self.cus if k[0] not in allocs]:
            del self.cus[key]  # released: its compute units are free again
        self.answered = {k for k in self.answered if k[0] in allocs}

    def _busy(self, mine: tuple[str, str]) -> dict[str, frozenset[int]]:
        out: dict[str, frozenset[int]] = {}
        for key, held in self.cus.items():
            if key != mine:
                for card, cus in held.items():
                    out[card] = out.get(card, frozenset()) | cus
        return out

    async def on_inventory(self, inv: object) -> None:
        health = tuple((d.uuid, d.health, d.count) for d in self.cards())
        if health != self._health:
            self._health = health
            self.plugin.update_devices()

    async def preferred(self, available: list[str], must: list[str], size: int) -> list[str]:
        cands = sorted(self.matcher.candidates(size), key=self._order)
        return prefer(available, must, size, [c.uuids for c in cands])

    def _order(self, c: Candidate) -> tuple[float, str]:
        return (self.matcher.allocs[c.uid].decided_at, c.uid)

    async def allocate(self, requests: list[list[str]]) -> list[ContainerAllocation]:
        async with self._lock:
            return [await self._allocate_one(ids) for ids in requests]

    async def _allocate_one(self, ids: list[str]) -> ContainerAllocation:
        n = len(ids)
        cands = await candidates_for(self.agent, self.matcher, n, self.wait_timeout, self.resource)
        if same_slice(cands):
            self.exact += 1
        else:
            self.ambiguous += 1
            log.warning(
                "%s: %s Allocate of %d may be for %d containers; answering the first decided",
                self.agent.node,
                self.resource,
                n,
                len(cands),
            )
        # Pods of the same shape are one group to the matcher, which cannot tell which
        # of them the kubelet started: take the first decided not answered yet
        fresh = [c for c in cands if (c.uid, c.container) not in self.answered]
        c = min(fresh or cands, key=self._order)
        known = {d.uuid: d for d in self.cards()}
        try:
            key = (c.uid, c.container)
            ctx = AllocateContext(c.uid, c.container, busy_cus=self._busy(key))
            answer = vendor_allocation(self.family, c.grant.devices, known, ctx)
        except VendorAllocateError as exc:
            raise AllocationError(f"node {self.agent.node}: {exc}") from None
        self.answered.add(key)
        held = cus_held(answer.annotations)
        if held:
            self.cus[key] = held
        if answer.files:
            await asyncio.to_thread(self._write_files, answer.files)
        out = to_container_allocation(answer)
        log.debug("%s: %s for %s/%s", self.agent.node, self.resource, c.uid, c.container)
        return out

    def _write_files(self, files: Mapping[str, str]) -> None:
        for path, text in files.items():
            p = self.host_root / path.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, p)


class VendorPlugins:
    """A :class:`VendorPlugin` for every family the node registered cards of.

    The families are those of the inventory when the node starts (a vendor's cards do
    not come and go while its driver is loaded); ``plugins`` maps family to plugin.
    """

    def __init__(self, agent: NodeAgent, **kw: object) -> None:
        self.agent = agent
        self.kw = kw
        self.plugins: dict[str, VendorPlugin] = {}

    async def start(self) -> None:
        inv = self.agent.inventory
        for fam in families_present(inv.devices if inv else []):
            p = VendorPlugin(self.agent, fam, **self.kw)  # type: ignore[arg-type]
            await p.start()
            self.plugins[fam] = p

    async def stop(self) -> None:
        for p in self.plugins.values():
            await p.stop()
        self.plugins.clear()


__all__ = ["VendorPlugin", "VendorPlugins", "families_present", "resource_of"]
