"""One node in Kubernetes mode: the node agent plus slices, device plugin, the CSI node
plugin of the slice volumes, annotations, telemetry -- assembled in one call, for ``python -m services.nodeagent --kube``, the
tests and the burst benchmarks (many simulated nodes in one process, one bus).

    node = await start_node(bus, "node-1", cfg, backend, host_root=root, plugin_dir=d)
    ...                                   # a FakeKubelet on d allocates against it
    await node.stop()

Order matters on start: the limiter and its ``ld.so.preload`` are installed on the host
(services/nodeagent/install.py), the agent registers and reads its ledger entry first, then the
slice directory is reconciled with it (a restarted agent removes what was released
while it was down and writes what is missing), then the CSI node plugin serves and
registers (services/nodeagent/csi/server.py), then the device plugin loads its saved matcher
state and registers with the kubelet, so the first Allocate already sees the ledger, and
so does one plugin per other vendor whose cards the node registered
(services/nodeagent/kube/vendors.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends import Backend
from services.nodeagent.csi.server import SlicePlugin
from services.nodeagent.deviceplugin.v1beta1 import DEVICE_PLUGIN_PATH
from services.nodeagent.install import install
from services.nodeagent.kube.annotations import NodeAnnotator
from services.nodeagent.kube.plugin import EnvOptions, GpuPlugin
from services.nodeagent.kube.vendors import VendorPlugins
from services.nodeagent.slices import SliceWriter
from services.nodeagent.telemetry import TelemetryPublisher
from shared import kube as k
from shared.bus import Bus
from shared.config import Config
from shared.schemas import LedgerAlloc

STATE_FILE = "var/lib/hami/nodeagent/{node}.matcher.json"  # under the host root


@dataclass
class KubeNode:
    """A node agent with its Kubernetes-mode parts; ``start``/``stop`` in that order."""

    bus: Bus
    node: str
    cfg: Config
    backend: Backend
    host_root: Path
    plugin_dir: Path = Path(DEVICE_PLUGIN_PATH)
    kube: k.Kube | None = None  # None: no node annotations
    telemetry_interval: float | None = 5.0  # None: no telemetry
    poll_interval: float = 0.5  # device plugin: kubelet restart detection
    wait_timeout: float = 5.0  # Allocate: wait for a lagging decision
    state_path: Path | None = None  # default: STATE_FILE under host_root
    env: EnvOptions | None = None
    limiter_source: Path | None = None  # the image's libvgpu.so, installed on the host
    agent_kwargs: dict[str, object] = field(default_factory=dict)
    # The CSI node plugin serving the slice volumes: both dirs, or None for none.
    csi_plugins_dir: Path | None = None
    csi_registry_dir: Path | None = None

    agent: NodeAgent = field(init=False)
    slices: SliceWriter = field(init=False)
    plugin: GpuPlugin = field(init=False)
    vendors: VendorPlugins = field(init=False)  # the other vendors' resources
    annotator: NodeAnnotator | None = field(init=False, default=None)
    telemetry: TelemetryPublisher | None = field(init=False, default=None)
    csi: SlicePlugin | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.host_root = Path(self.host_root)
        self.plugin_dir = Path(self.plugin_dir)
        self.agent = NodeAgent(self.bus, self.node, self.backend, self.cfg, **self.agent_kwargs)  # type: ignore[arg-type]
        self.slices = SliceWriter(
            self.host_root, self.node, self.cfg.node, self.bus, mig=self.backend
        )
        state = self.state_path or self.host_root / STATE_FILE.format(node=self.node)
        self.plugin = GpuPlugin(
            self.agent,
            self.slices,
            plugin_dir=self.plugin_dir,
            state_path=state,
            wait_timeout=self.wait_timeout,
            poll_interval=self.poll_interval,
            env=self.env,
            host_root=self.host_root,
        )
        self.vendors = VendorPlugins(
            self.agent,
            plugin_dir=self.plugin_dir,
            host_root=self.host_root,
            wait_timeout=self.wait_timeout,
            poll_interval=self.poll_interval,
        )
        if self.csi_plugins_dir is not None and self.csi_registry_dir is not None:
            self.csi = SlicePlugin(
                self.node,
                self.host_root,
                plugins_dir=self.csi_plugins_dir,
                registry_dir=self.csi_registry_dir,
            )
        if self.kube is not None:
            self.annotator = NodeAnnotator(self.kube, self.node)
        if self.telemetry_interval:
            self.telemetry = TelemetryPublisher(
                self.bus,
                self.node,
                self.slices,
                lambda: self.agent.allocs,
                interval=self.telemetry_interval,
                host=self.backend,  # HAMi's host series: NVML, or the simulator's model
            )

    async def start(self) -> None:
        # Before the plugin registers: its first Allocate must find the limiter in place.
        await asyncio.to_thread(install, self.host_root, self.limiter_source)
        if self.annotator is not None:
            self.agent.inventory_listeners.append(self.annotator.on_inventory)
            self.annotator.start()
        self.agent.ledger_listeners.append(self._sync_slices)
        await self.agent.start()  # publishes the inventory: the annotator gets it
        async with asyncio.timeout(10.0):
            await self.agent.ledger_ready.wait()
        await self.agent.refresh_ledger()
        # The ledger entry may be absent (nothing placed yet): reconcile regardless.
        await self.slices.sync(self.agent.allocs)
        if self.csi is not None:
            await self.csi.start()
        await self.plugin.start()
        await self.vendors.start()  # one plugin per other vendor registered here
        if self.telemetry is not None:
            self.telemetry.start()

    async def _sync_slices(self, allocs: Mapping[str, LedgerAlloc]) -> None:
        await self.slices.sync(allocs)

    async def stop(self) -> None:
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.vendors.stop()
        await self.plugin.stop()
        if self.csi is not None:
            await self.csi.stop()
        if self.annotator is not None:
            await self.annotator.stop()
        await self.agent.stop()


async def start_node(
    bus: Bus,
    node: str,
    cfg: Config,
    backend: Backend,
    *,
    host_root: str | os.PathLike[str],
    plugin_dir: str | os.PathLike[str] = DEVICE_PLUGIN_PATH,
    kube: k.Kube | None = None,
    telemetry_interval: float | None = 5.0,
    poll_interval: float = 0.5,
    wait_timeout: float = 5.0,
    state_path: str | os.PathLike[str] | None = None,
    env: EnvOptions | None = None,
    limiter_source: str | os.PathLike[str] | None = None,
    csi_plugins_dir: str | os.PathLike[str] | None = None,
    csi_registry_dir: str | os.PathLike[str] | None = None,
    **agent_kwargs: object,
) -> KubeNode:
    """Build and start one Kubernetes-mode node (see :class:`KubeNode`)."""
    n = KubeNode(
        bus,
        node,
        cfg,
        backend,
        Path(host_root),
        Path(plugin_dir),
        kube,
        telemetry_interval,
        poll_interval,
        wait_timeout,
        Path(state_path) if state_path else None,
        env,
        Path(limiter_source) if limiter_source else None,
        dict(agent_kwargs),
        Path(csi_plugins_dir) if csi_plugins_dir else None,
        Path(csi_registry_dir) if csi_registry_dir else None,
    )
    await n.start()
    return n
