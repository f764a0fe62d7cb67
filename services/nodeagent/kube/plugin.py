"""The node agent's kubelet device plugin for ``nvidia.com/gpu``: replicas, matching, env.

Wires :class:`~services.nodeagent.deviceplugin.server.DevicePlugin` (the gRPC server) to
the node agent:

- devices: ``deviceSplitCount`` replicas ``<UUID>::<k>`` of every registered card, with
  the card's health and NUMA node; the list follows the agent's inventory;
- ``GetPreferredAllocation``: replicas of the cards a pending pod was decided to use;
- ``Allocate``: :class:`~services.nodeagent.kube.matching.Matcher` says which
  containers the call may be for. One candidate (or several on the same cards and
  limits): HAMi's exact limiter environment (REFERENCE §6). Several on different
  cards: ``NVIDIA_VISIBLE_DEVICES`` = the union of their cards, and the container's
  own slice file (services/nodeagent/slices.py, keyed by its pod UID) narrows it to its
  cards and limits when the limiter starts. Either way the slice files of every
  candidate are on disk before the answer leaves.

Pure helpers (:func:`replica_id`, :func:`exact_env`, :func:`union_env`,
:func:`prefer`) are separate from :class:`GpuPlugin`, the wiring.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.nodeagent.agent import NodeAgent
from services.nodeagent.deviceplugin.server import (
    AllocationError,
    ContainerAllocation,
    DevicePlugin,
    DeviceState,
)
from services.nodeagent.deviceplugin.v1beta1 import DEVICE_PLUGIN_PATH
from services.nodeagent.install import Installed, installed
from services.nodeagent.kube.matching import Candidate, Matcher, of_vendor
from services.nodeagent.slices import REGION_PATH, SliceWriter, core_policy
from shared import tracing
from shared.config import NodeSettings
from shared.schemas import Device, LedgerAlloc

log = logging.getLogger("hami.nodeagent.plugin")
tracer = tracing.tracer("hami.nodeagent.plugin")

RESOURCE = "nvidia.com/gpu"
VENDOR = (
    "NVIDIA"  # the cards this plugin serves (other vendors': services/nodeagent/kube/vendors.py)
)
REPLICA_SEP = "::"

LIB_PATH = "/usr/local/vgpu/libvgpu.so"
PRELOAD_HOST = "/usr/local/vgpu/ld.so.preload"
PRELOAD_CONTAINER = "/etc/ld.so.preload"


def replica_id(uuid: str, k: int) -> str:
    return f"{uuid}{REPLICA_SEP}{k}"


def card_of(device_id: str) -> str:
    """The card UUID of a replica ID (an ID without ``::`` is a whole card)."""
    return device_id.split(REPLICA_SEP, 1)[0]


def replicas(devices: Sequence[Device]) -> list[DeviceState]:
    """What ListAndWatch advertises: ``count`` replicas of each card."""
    return [
        DeviceState(replica_id(d.uuid, k), d.health, d.numa)
        for d in devices
        for k in range(max(1, d.count))
    ]


@dataclass(frozen=True)
class EnvOptions:
    """Node-wide parts of the limiter environment and mounts."""

    policy: str = "default"
    oversubscribe: bool = False
    libcuda_log_level: int | None = None
    disable_control: bool = False  # node-wide CUDA_DISABLE_CONTROL: no preload mounts
    lib_path: str = LIB_PATH  # host paths, as the kubelet resolves them
    preload_path: str = PRELOAD_HOST

    @classmethod
    def from_settings(cls, s: NodeSettings, **kw: object) -> EnvOptions:
        return cls(policy=core_policy(s), oversubscribe=s.device_memory_scaling > 1, **kw)  # type: ignore[arg-type]


def _common(opts: EnvOptions) -> dict[str, str]:
    env = {
        "CUDA_DEVICE_MEMORY_SHARED_CACHE": REGION_PATH,
        "GPU_CORE_UTILIZATION_POLICY": opts.policy,
    }
    if opts.oversubscribe:
        env["CUDA_OVERSUBSCRIBE"] = "true"
    if opts.libcuda_log_level is not None:
        env["LIBCUDA_LOG_LEVEL"] = str(opts.libcuda_log_level)
    if opts.disable_control:
        env["CUDA_DISABLE_CONTROL"] = "true"
    return env


def exact_env(c: Candidate, opts: EnvOptions) -> dict[str, str]:
    """HAMi's Allocate environment for one known container (REFERENCE §6)."""
    devs = c.grant.devices
    env = {"NVIDIA_VISIBLE_DEVICES": ",".join(d.uuid for d in devs)}
    for i, d in enumerate(devs):
        env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{int(d.mem)}m"
    # HAMi gives one SM limit per container (gpucores is per container).
    env["CUDA_DEVICE_SM_LIMIT"] = str(int(devs[0].cores)) if devs else "0"
    env.update(_common(opts))
    return env


def union_env(cands: Sequence[Candidate], opts: EnvOptions) -> dict[str, str]:
    """Environment when the call may be for containers on different cards.

    Every candidate's cards are visible, so whichever it is can reach its own; its slice
    file then narrows CUDA to them. The memory default is the smallest candidate's, so
    even without the slice file no container gets more than any of them was granted.
    """
    seen: dict[str, None] = {}
    for c in cands:
        for u in c.uuids:
            seen.setdefault(u, None)
    env = {"NVIDIA_VISIBLE_DEVICES": ",".join(seen)}
    mems = [int(d.mem) for c in cands for d in c.grant.devices]
    if mems:
        env["CUDA_DEVICE_MEMORY_LIMIT"] = f"{min(mems)}m"
    env.update(_common(opts))
    return env


def mounts(opts: EnvOptions, present: Installed) -> list[tuple[str, str, bool]]:
    """The limiter's mounts (REFERENCE §6), only of the host files that exist: the
    kubelet would fail the container's start on a missing one."""
    if opts.disable_control:
        return []
    out = []
    if present.lib:
        out.append((LIB_PATH, opts.lib_path, True))
    if present.preload:
        out.append((PRELOAD_CONTAINER, opts.preload_path, True))
    return out


def same_slice(cands: Sequence[Candidate]) -> bool:
    """All candidates would get the same answer (same cards, limits, order)."""
    first = cands[0].grant.devices
    key = [(d.uuid, d.mem, d.cores) for d in first]
    return all([(d.uuid, d.mem, d.cores) for d in c.grant.devices] == key for c in cands[1:])


def prefer(
    available: Sequence[str],
    must: Sequence[str],
    size: int,
    cards_wanted: Sequence[Sequence[str]],
) -> list[str]:
    """GetPreferredAllocation: ``size`` IDs from ``available``, starting with ``must``,
    then one replica of each card of the first wanted card set that is fully available,
    then replicas of other cards (one per card first), then anything."""
    chosen: list[str] = list(dict.fromkeys(must))[:size]
    by_card: dict[str, list[str]] = {}
    for i in sorted(set(available) - set(chosen)):
        by_card.setdefault(card_of(i), []).append(i)
    covered = {card_of(i) for i in chosen}

    def take(card: str) -> None:
        if len(chosen) < size and by_card.get(card):
            chosen.append(by_card[card].pop(0))
            covered.add(card)

    for cards in cards_wanted:
        if all(c in covered or by_card.get(c) for c in cards):
            for c in cards:
                if c not in covered:
                    take(c)
            break
    for card in list(by_card):
        if card not in covered:
            take(card)
    for card in list(by_card):
        while len(chosen) < size and by_card[card]:
            chosen.append(by_card[card].pop(0))
    return chosen


async def candidates_for(
    agent: NodeAgent, matcher: Matcher, n: int, wait_timeout: float, what: str
) -> list[Candidate]:
    """The candidates an Allocate of ``n`` IDs may be for, from the ledger as fresh as
    it can be read; AllocationError naming ``what`` is asked when none came in time."""
    try:
        await agent.refresh_ledger()
    except Exception as exc:  # the bus is down: match against what the watch has
        log.warning("%s: ledger refresh failed: %s", agent.node, exc)
    deadline = time.monotonic() + wait_timeout
    # The decision may not have reached the node yet (the watch lags a binding only
    # when NATS is slow); wait for it briefly, never for minutes. (An allocate that
    # finds no candidate changes nothing, so it doubles as the check.)
    while not (cands := matcher.allocate(n)):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AllocationError(f"node {agent.node}: no pod placed here asks for {n} {what}")
        agent.allocs_changed.clear()
        try:
            async with asyncio.timeout(min(left, 0.5)):
                await agent.allocs_changed.wait()
        except TimeoutError:
            pass
        try:
            await agent.refresh_ledger()
        except Exception:
            pass
    return cands


class GpuPlugin:
    """The ``nvidia.com/gpu`` device plugin of one node agent (see the module doc).

    ``host_root``: where the host's ``/`` is seen (which limiter files exist there).
    ``state_path``: where the matcher's state survives an agent restart (None: kept in
    memory only). ``wait_timeout``: how long Allocate waits for a decision that has not
    reached the node yet before refusing.
    """

    def __init__(
        self,
        agent: NodeAgent,
        slices: SliceWriter,
        *,
        plugin_dir: str | os.PathLike[str] = DEVICE_PLUGIN_PATH,
        resource: str = RESOURCE,
        state_path: str | os.PathLike[str] | None = None,
        wait_timeout: float = 5.0,
        poll_interval: float = 0.5,
        env: EnvOptions | None = None,
        host_root: str | os.PathLike[str] = "/",
    ) -> None:
        self.agent = agent
        self.host_root = Path(host_root)
        self.slices = slices
        self.state_path = Path(state_path) if state_path else None
        self.wait_timeout = wait_timeout
        self.opts = env or EnvOptions.from_settings(agent.cfg.node)
        self.matcher = Matcher()
        self.exact = 0  # Allocate answers for one known container
        self.ambiguous = 0  # answers for several possible containers
        self._lock = asyncio.Lock()
        self._health: tuple[tuple[str, bool, int], ...] = ()
        self._save_task: asyncio.Task[None] | None = None
        self.plugin = DevicePlugin(
            resource,
            self.devices,
            self.allocate,
            self.preferred,
            plugin_dir=plugin_dir,
            poll_interval=poll_interval,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load saved matcher state against the current ledger, then serve.

        Call after the agent has started and read its ledger (``ledger_ready``).
        """
        self.matcher = await asyncio.to_thread(self._load)
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
        if self._save_task is not None:
            await self._save_task  # the last state reaches the disk before we go
        self._write_state(self.matcher.dumps())

    def _load(self) -> Matcher:
        if self.state_path is not None:
            try:
                return Matcher.loads(self.state_path.read_text(), self.mine(self.agent.allocs))
            except FileNotFoundError:
                pass
        m = Matcher()
        m.update(self.mine(self.agent.allocs))
        return m

    def _write_state(self, text: str) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_path)

    def _save(self) -> None:
        """Persist the matcher soon, off the event loop, coalescing a burst of changes.

        A save lost to a crash only costs exactness after the restart (more calls are
        answered with a union of candidates); the slice files keep every container on
        its own cards regardless.
        """
        if self.state_path is None or (self._save_task is not None and not self._save_task.done()):
            return

        async def later() -> None:
            await asyncio.sleep(0.25)
            await asyncio.to_thread(self._write_state, self.matcher.dumps())

        self._save_task = asyncio.get_running_loop().create_task(later())

    # ------------------------------------------------------------------ agent hooks

    @staticmethod
    def mine(allocs: Mapping[str, LedgerAlloc]) -> dict[str, LedgerAlloc]:
        """The ledger's NVIDIA cards (a pod may ask other vendors in other containers)."""
        return of_vendor(allocs, VENDOR)

    def cards(self) -> list[Device]:
        inv = self.agent.inventory
        return [d for d in inv.devices if d.vendor == VENDOR] if inv else []

    async def on_ledger(self, allocs: Mapping[str, LedgerAlloc]) -> None:
        self.matcher.update(self.mine(allocs))
        self._save()

    async def on_inventory(self, inv: object) -> None:
        health = tuple((d.uuid, d.health, d.count) for d in self.cards())
        if health != self._health:  # only a real change reaches the kubelet
            self._health = health
            self.plugin.update_devices()

    def devices(self) -> list[DeviceState]:
        return replicas(self.cards())

    # ------------------------------------------------------------------ kubelet calls

    async def preferred(self, available: list[str], must: list[str], size: int) -> list[str]:
        try:
            await self.agent.refresh_ledger()  # the decision may be newer than the watch
        except Exception as exc:
            log.warning("%s: ledger refresh failed: %s", self.agent.node, exc)
        cands = sorted(
            self.matcher.candidates(size),
            key=lambda c: (self.matcher.allocs[c.uid].decided_at, c.uid),
        )
        return prefer(available, must, size, [c.uuids for c in cands])

    async def allocate(self, requests: list[list[str]]) -> list[ContainerAllocation]:
        async with self._lock:  # the kubelet calls one at a time; keep it so
            out = []
            for ids in requests:
                out.append(await self._allocate_one(len(ids)))
            self._save()
            return out

    async def _allocate_one(self, n: int) -> ContainerAllocation:
        began = time.time_ns()
        cands = await candidates_for(self.agent, self.matcher, n, self.wait_timeout, "card(s)")
        # Every candidate's slice is on disk before the container can start: the
        # ledger listeners (the slice writer among them) have run for the revision
        # refresh_ledger saw, since it waits for them.
        if same_slice(cands):
            self.exact += 1
            env = exact_env(cands[0], self.opts)
        else:
            self.ambiguous += 1
            env = union_env(cands, self.opts)
        # a MIG grant's container sees its instance, not the whole card
        vis = self.slices.visible_devices([c.grant for c in cands], env["NVIDIA_VISIBLE_DEVICES"])
        env["NVIDIA_VISIBLE_DEVICES"] = vis
        present = await asyncio.to_thread(installed, self.host_root)
        self._traced(cands, began)
        return ContainerAllocation(envs=env, mounts=mounts(self.opts, present))

    def _traced(self, cands: list[Candidate], began: int) -> None:
        """A ``nodeagent.allocate`` span in the trace of each pod this Allocate may have
        served (its ledger entry's), so a pod's trace reaches its container's start."""
        for c in cands:
            alloc = self.matcher.allocs.get(c.uid)
            if alloc is None or not alloc.traceparent:
                continue
            with tracing.resume(
                tracer, "nodeagent.allocate", alloc.traceparent, start_time=began
            ) as sp:
                if sp.is_recording():
                    sp.set_attributes(
                        {
                            "hami.uid": c.uid,
                            "hami.node": self.agent.node,
                            "hami.container": c.container,
                            "hami.cards": list(c.uuids),
                            "hami.allocate.candidates": len(cands),  # 1: matched exactly
                        }
                    )
