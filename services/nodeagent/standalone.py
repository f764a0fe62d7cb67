"""One node without Kubernetes: the node agent plus slice files, telemetry and ``hami run``.

``hami up`` and ``python -m services.nodeagent`` (without ``--kube``) run this. Like
Kubernetes mode (services/nodeagent/kube/node.py) it keeps one directory per slice under
its root (``<root>/usr/local/vgpu/containers/<uid>_<container>``: the limiter's ``env``
and the shared usage region) and publishes telemetry from them, so every allocation is
in the per-container series from the moment it is bound, and the host series come from
NVML or the simulator's usage model.

What Kubernetes does for a pod it does for ``hami run`` itself: on
``hami.agent.<node>.run`` (:class:`~shared.schemas.RunRequest`) it answers the slice's
limiter environment, with the region as a host path, and records the processes that
hold the slice (services/nodeagent/runs.py). Every ``telemetry_interval`` seconds it
checks them; once none is alive (the command ended and ``hami run`` was killed before
releasing, say) it withdraws the allocation by uid, as a client that gave up would.
Allocations made by ``hami submit`` name no process and are never reclaimed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from nats.aio.msg import Msg

from services.nodeagent import runs
from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends import Backend
from services.nodeagent.slices import REGION_FILE, SliceWriter, ensure_region, pod_slices, slice_env
from services.nodeagent.telemetry import TelemetryPublisher
from shared import subjects
from shared.bus import ENCODER, Bus, decode
from shared.config import Config, NodeSettings
from shared.lifecycle import Background
from shared.schemas import (
    ContainerGrant,
    LedgerAlloc,
    RunReply,
    RunRequest,
    WithdrawReply,
    WithdrawRequest,
)

log = logging.getLogger("hami.nodeagent.standalone")

WITHDRAW_RETRY = 10.0  # seconds before a withdrawal that changed nothing is sent again


class StandaloneNode:
    """A node agent with its standalone parts; ``start``/``stop`` in that order.

    ``root`` None: a temporary directory, removed at stop (``hami up``: the slices live
    as long as the system does).
    """

    def __init__(
        self,
        bus: Bus,
        node: str,
        backend: Backend,
        cfg: Config,
        *,
        root: str | Path | None = None,
        telemetry_interval: float | None = None,
        **agent_kwargs: object,
    ) -> None:
        self.bus = bus
        self.node = node
        self.cfg = cfg
        self.agent = NodeAgent(bus, node, backend, cfg, **agent_kwargs)  # type: ignore[arg-type]
        self._tmp: Path | None = None
        if root is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"hami-{subjects.token(node)}-"))
            root = self._tmp
        self.root = Path(root)
        self.slices = SliceWriter(self.root, node, cfg.node, bus, mig=backend)  # MIG instances
        self.interval = telemetry_interval or cfg.telemetry_interval
        self.telemetry = TelemetryPublisher(
            bus, node, self.slices, lambda: self.agent.allocs, interval=self.interval, host=backend
        )
        self.holders: dict[str, list[runs.Holder]] = {}  # uid -> processes holding it
        self.withdrawn: dict[str, float] = {}  # uid -> when its withdrawal was sent
        self.reclaimed = 0
        self._bg = Background()

    # ------------------------------------------------------------------- life

    async def start(self) -> None:
        self.agent.ledger_listeners.append(self._on_ledger)
        await self.agent.start()
        async with asyncio.timeout(10.0):
            await self.agent.ledger_ready.wait()
        await self.agent.refresh_ledger()
        await self.slices.sync(self.agent.allocs)  # reconcile (a restarted agent)
        await asyncio.to_thread(self._load_holders, dict(self.agent.allocs))
        self._bg.add_sub(await self.bus.subscribe(subjects.agent_run(self.node), self._on_run))
        self.telemetry.start()
        self._bg.spawn(self._reaper(), f"reap-{self.node}")

    async def stop(self) -> None:
        await self._bg.stop()
        await self.telemetry.stop()
        await self.agent.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def _on_ledger(self, allocs: Mapping[str, LedgerAlloc]) -> None:
        await self.slices.sync(allocs)
        for uid in [u for u in self.holders if u not in allocs]:
            del self.holders[uid]  # released: its directory went with it
            self.withdrawn.pop(uid, None)

    def _load_holders(self, allocs: dict[str, LedgerAlloc]) -> None:
        for alloc in allocs.values():
            for s in pod_slices(alloc):
                hs = runs.load(self.slices.path(alloc.uid, s.container))
                if hs is not None:
                    self.holders[alloc.uid] = hs

    # ---------------------------------------------------------------- hami run

    async def _on_run(self, msg: Msg) -> None:
        try:
            reply = await self.register(decode(msg.data, RunRequest))
        except Exception as exc:
            reply = RunReply(ok=False, error=f"bad request: {exc}")
        if msg.reply:
            await msg.respond(ENCODER.encode(reply))

    async def register(self, req: RunRequest) -> RunReply:
        """The slice's environment for ``hami run``, and who holds it from now on."""
        alloc = self.agent.allocs.get(req.uid)
        if alloc is None:
            await self.agent.refresh_ledger()  # decided a moment ago: the watch may lag
            alloc = self.agent.allocs.get(req.uid)
        if alloc is None:
            return RunReply(ok=False, error=f"{req.uid}: no such allocation on {self.node}")
        mine = pod_slices(alloc)
        found = [s for s in mine if s.container == req.container] if req.container else mine[:1]
        if not found:
            return RunReply(
                ok=False, error=f"{alloc.name}: no container {req.container!r} with devices"
            )
        s = found[0]
        await self.slices.sync(self.agent.allocs)
        d = self.slices.path(alloc.uid, s.container)
        hs = runs.holders(list(req.pids))
        if req.pids and not hs:
            return RunReply(
                ok=False, error=f"none of the processes {req.pids} runs on {self.node}'s host"
            )

        def write() -> None:
            d.mkdir(parents=True, exist_ok=True)
            ensure_region(d)
            if hs:
                runs.save(d, hs)

        await asyncio.to_thread(write)
        if hs:
            self.holders[alloc.uid] = hs
        env = host_env(s.grant, self.cfg.node, self.slices.mig_uuids(s.grant))
        region = str(d / REGION_FILE)
        env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = region  # the host's path, not a container's
        env["NVIDIA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"]
        env["HAMI_SLICE_FILE"] = ""  # this is the slice: no container slice file applies
        return RunReply(ok=True, env=env, region=region)

    # ------------------------------------------------------------------ reclaim

    async def reap_once(self) -> list[str]:
        """Withdraw every ``hami run`` slice none of whose processes is alive."""
        now = time.monotonic()
        gone: list[str] = []
        for uid, hs in list(self.holders.items()):
            if uid not in self.agent.allocs:
                continue
            if await asyncio.to_thread(_any_alive, hs):
                continue
            sent = self.withdrawn.get(uid)
            if sent is not None and now - sent < WITHDRAW_RETRY:
                continue
            alloc = self.agent.allocs[uid]
            log.info(
                "%s: the processes of %s (%s) are gone: withdrawing it", self.node, alloc.name, uid
            )
            self.withdrawn[uid] = now
            req = WithdrawRequest(uid=uid, name=alloc.name, namespace=alloc.namespace)
            try:
                await self.bus.request(subjects.API_WITHDRAW, req, WithdrawReply, timeout=5.0)
            except Exception as exc:  # sent again after WITHDRAW_RETRY
                log.warning("%s: cannot withdraw %s: %s", self.node, uid, exc)
                continue
            self.reclaimed += 1
            gone.append(uid)
        return gone

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reap_once()
            except Exception:
                log.exception("%s: reclaim failed", self.node)


def host_env(
    grant: ContainerGrant, settings: NodeSettings, mig: Mapping[int, str] | None = None
) -> dict[str, str]:
    """A container's slice environment, for a process on the bare host: the limiter
    numbers cards as NVML lists them, which on the host is every card, so each card's
    limits carry its host index (a container's carry its position in the grant)."""
    env = {
        k: v
        for k, v in slice_env(grant, settings, mig).items()
        if not k.startswith(("CUDA_DEVICE_MEMORY_LIMIT_", "CUDA_DEVICE_SM_LIMIT_"))
    }
    for i, d in enumerate(grant.devices):
        env[f"CUDA_DEVICE_MEMORY_LIMIT_{d.index}"] = f"{int(d.mem)}m"
        env[f"CUDA_DEVICE_SM_LIMIT_{d.index}"] = "100" if mig and i in mig else str(int(d.cores))
    return env


def _any_alive(hs: list[runs.Holder]) -> bool:
    return any(runs.alive(h) for h in hs)
