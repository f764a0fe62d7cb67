"""The whole system in one process: embedded NATS plus every service, for ``hami up``.

Each service keeps its own NATS connection, so they talk over the bus exactly as
separate processes would; only the process boundary is saved. ``hami demo`` and the
tests use the same class. Each node is a standalone node agent
(services/nodeagent/standalone.py): slice files (one temporary tree for the system, a
directory per node, removed at stop), telemetry, and the endpoint ``hami run`` asks for
its slice's environment.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hami.creds import Store, roles_for
from services.binder.service import BinderService
from services.inventory.service import InventoryService
from services.metrics.service import MetricsService
from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends import Backend, nvml
from services.nodeagent.backends.sim import GpuSpec, SimBackend, parse_gpu_specs
from services.nodeagent.standalone import StandaloneNode
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.natsserver import EmbeddedNats

log = logging.getLogger("hami.system")

# Past this, a part that will not stop is logged and left, so hami up/demo still end.
PART_STOP_S = 20.0


async def _stop_part(what: str, stop: Callable[[], Awaitable[None]]) -> None:
    try:
        async with asyncio.timeout(PART_STOP_S):
            await stop()
    except TimeoutError:
        log.error("stopping %s took more than %.0f s; going on without it", what, PART_STOP_S)
    except Exception:
        log.exception("stopping %s", what)


@dataclass
class System:
    cfg: Config
    nats_url: str | None = None
    sim_nodes: int | None = None
    sim_gpus: list[str] | None = None
    # One simulated node per entry, each with its own cards (a mixed cluster:
    # [["Ascend910B3:8"], ["MLU370-X4:4"], ["A100-40GB:2"]]); instead of sim_nodes x sim_gpus.
    sim_node_gpus: list[list[str]] | None = None
    metrics_port: int | None = None
    data_dir: Path | None = None
    use_nvml: bool | None = None  # None: use NVML when it finds cards and no sim flag
    # hami up: the embedded nats-server ends with this process, however it ends.
    nats_dies_with_parent: bool = False
    nats: EmbeddedNats | None = None
    buses: list[Bus] = field(default_factory=list)
    services: list[Any] = field(default_factory=list)
    agents: list[NodeAgent] = field(default_factory=list)
    nodes: list[StandaloneNode] = field(default_factory=list)
    telemetry_interval: float | None = None  # None: the configuration's telemetryInterval
    slice_root: Path | None = None  # the nodes' slice directories, one temporary tree
    metrics: MetricsService | None = None
    # Each service connects with its role's identity (docs/security.md); an embedded
    # server then admits exactly these roles.
    auth: Store | None = None

    async def _bus(self, name: str, role: str | None = None) -> Bus:
        assert self.nats_url
        creds = self.auth.credentials(role or name) if self.auth else None
        bus = await Bus.connect(self.nats_url, name, creds=creds, settings=self.cfg.bus)
        self.buses.append(bus)
        return bus

    def backends(self) -> list[tuple[str, Backend]]:
        sim_asked = self.sim_nodes is not None or self.sim_gpus is not None or self.sim_node_gpus is not None
        use_nvml = self.use_nvml if self.use_nvml is not None else (not sim_asked and nvml.available())
        if use_nvml:
            node = self.cfg.node_name or socket.gethostname()
            return [(node, nvml.NvmlBackend())]
        if self.sim_node_gpus is not None:
            return [
                (f"sim-node-{i}", SimBackend(f"sim-node-{i}", parse_gpu_specs(g), self.cfg.sim.numa_nodes,
                                             self.cfg.sim.nvlink))
                for i, g in enumerate(self.sim_node_gpus)
            ]
        specs: list[GpuSpec] = parse_gpu_specs(self.sim_gpus or self.cfg.sim.gpus)
        n = self.sim_nodes if self.sim_nodes is not None else self.cfg.sim.nodes
        out: list[tuple[str, Backend]] = []
        for i in range(n):
            node = f"sim-node-{i}"
            out.append((node, SimBackend(node, specs, self.cfg.sim.numa_nodes, self.cfg.sim.nvlink)))
        return out

    async def start(self) -> None:
        backends = self.backends()  # parse flags before starting anything
        if not self.nats_url:
            self.nats = EmbeddedNats(data_dir=self.data_dir, die_with_parent=self.nats_dies_with_parent)
            if self.auth is not None:
                self.nats.configure(self.auth.server_config(roles_for(n for n, _ in backends)))
            self.nats_url = await self.nats.astart()
        try:
            inventory = InventoryService(await self._bus("inventory"), self.cfg)
            placement = PlacementService(await self._bus("placement"), self.cfg)
            binder = BinderService(await self._bus("binder"), self.cfg)
            port = self.cfg.metrics_port if self.metrics_port is None else self.metrics_port
            self.metrics = MetricsService(await self._bus("metrics"), self.cfg, port=port)
            for svc in (inventory, placement, binder):
                await svc.start()
                self.services.append(svc)
            try:
                await self.metrics.start()
            except OSError as exc:
                if self.metrics_port is not None:
                    raise
                # The default port is taken (another hami up?): any free port will do.
                log.warning("metrics port %s unavailable (%s); using a free port", port, exc)
                self.metrics.port = 0
                await self.metrics.start()
            self.services.append(self.metrics)
            agent_bus = None if self.auth else await self._bus("nodeagent")
            for node, backend in backends:
                # With identities, each agent may write only its own node's keys.
                bus = agent_bus or await self._bus("nodeagent", f"nodeagent:{node}")
                if self.slice_root is None:
                    self.slice_root = Path(tempfile.mkdtemp(prefix="hami-slices-"))
                sn = StandaloneNode(bus, node, backend, self.cfg, root=self.slice_root / subjects.token(node),
                                    telemetry_interval=self.telemetry_interval)
                self.nodes.append(sn)  # stopped (its directory removed) even if start fails
                await sn.start()
                self.agents.append(sn.agent)
            await self.wait_nodes(len(backends), placement)
        except BaseException:
            await self.stop()
            raise

    @staticmethod
    async def wait_nodes(n: int, placement: PlacementService, timeout: float = 10.0) -> None:
        """Until placement has seen every node's registration (the KV watch is async)."""
        async with asyncio.timeout(timeout):
            while len(placement.cluster.nodes) < n:  # noqa: ASYNC110 - no event to await on
                await asyncio.sleep(0.01)

    @property
    def metrics_url(self) -> str:
        return self.metrics.url if self.metrics else ""

    async def stop(self) -> None:
        for sn in reversed(self.nodes):
            await _stop_part(f"node {sn.node}", sn.stop)
        self.nodes.clear()
        self.agents.clear()
        if self.slice_root is not None:
            shutil.rmtree(self.slice_root, ignore_errors=True)
            self.slice_root = None
        for svc in reversed(self.services):
            await _stop_part(type(svc).__name__, svc.stop)
        self.services.clear()
        # Together: each close may wait out its drain.
        await asyncio.gather(*(bus.close() for bus in self.buses))
        self.buses.clear()
        if self.nats is not None:
            self.nats.cleanup()
            self.nats = None
