"""The Kubernetes path assembled for tests and benchmarks.

``KubeCluster`` runs, against a NATS server and a FakeKube: inventory, placement, the
Kubernetes binder (:class:`services.binder.kube.KubeBinder`) and one simulated node agent
per node, each node also registered as a Kubernetes Node in the fake. The binder can be
stopped and started again on its own (restart tests)::

    async with FakeKube() as fake:
        async with KubeCluster(fake, nats_url, cfg, nodes={"n1": ["A100-80GB:4"]}) as kc:
            fake.add_pod("p", containers=[...], scheduler_name="hami-scheduler")
            pod = await kc.wait_bound("default", "p")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from services.binder.kube import KubeBinder
from services.inventory.service import InventoryService
from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.hami import annotations as ann
from shared.kube import Kube
from shared.schemas import LedgerAlloc, NodeLedger
from tests.fakekube import FakeKube


class KubeCluster:
    def __init__(
        self,
        fake: FakeKube,
        nats_url: str,
        cfg: Config,
        nodes: dict[str, list[str]],
        *,
        retry_backoff_s: float = 0.2,
        watch_timeout_s: int = 300,
        extender_timeout_s: float | None = None,
    ) -> None:
        self.fake = fake
        self.nats_url = nats_url
        self.cfg = cfg
        self.nodes = nodes
        self.retry_backoff_s = retry_backoff_s
        self.watch_timeout_s = watch_timeout_s
        self.extender_timeout_s = extender_timeout_s
        self.buses: list[Bus] = []
        self.services: list[Any] = []
        self.agents: list[NodeAgent] = []
        self.placement: PlacementService | None = None
        self.binder: KubeBinder | None = None
        self._binder_bus: Bus | None = None
        self._kube: Kube | None = None
        self.bus: Bus | None = None  # for the test's own reads

    async def _bus(self, name: str) -> Bus:
        b = await Bus.connect(self.nats_url, name)
        self.buses.append(b)
        return b

    async def start(self) -> KubeCluster:
        self.bus = await self._bus("test")
        for node in self.nodes:
            if self.fake.get("nodes", None, node) is None:
                self.fake.add_node(node, capacity={"cpu": "64", "memory": "256Gi", "pods": "110"})
        inventory = InventoryService(await self._bus("inventory"), self.cfg)
        self.placement = PlacementService(await self._bus("placement"), self.cfg)
        for svc in (inventory, self.placement):
            await svc.start()
            self.services.append(svc)
        agent_bus = await self._bus("nodeagent")
        for node, gpus in self.nodes.items():
            backend = SimBackend(node, [parse_gpu_spec(g) for g in gpus])
            agent = NodeAgent(agent_bus, node, backend, self.cfg,
                              labels={"kubernetes.io/hostname": node})
            await agent.start()
            self.agents.append(agent)
        async with asyncio.timeout(10):
            while len(self.placement.cluster.nodes) < len(self.nodes):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await self.start_binder()
        return self

    async def start_binder(self) -> KubeBinder:
        self._binder_bus = await Bus.connect(self.nats_url, "binder")
        self._kube = await Kube.connect(host=self.fake.url)
        # With cfg.scheduler.mode "extender", the extender listens on a free local port.
        self.binder = KubeBinder(self._binder_bus, self.cfg, self._kube,
                                 retry_backoff_s=self.retry_backoff_s,
                                 watch_timeout_s=self.watch_timeout_s,
                                 extender_host="127.0.0.1", extender_port=0,
                                 extender_timeout_s=self.extender_timeout_s)
        await self.binder.start(serve_api=False)
        return self.binder

    async def stop_binder(self) -> None:
        if self.binder is not None:
            await self.binder.stop()
            self.binder = None
        if self._binder_bus is not None:
            await self._binder_bus.close()
            self._binder_bus = None
        if self._kube is not None:
            await self._kube.close()
            self._kube = None

    async def stop(self) -> None:
        await self.stop_binder()
        for a in self.agents:
            await a.stop()
        for s in reversed(self.services):
            await s.stop()
        for b in self.buses:
            await b.close()

    async def __aenter__(self) -> KubeCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ queries

    @property
    def extender_url(self) -> str:
        """kube-scheduler's ``urlPrefix`` for the running binder's extender."""
        assert self.binder is not None and self.binder.extender_server is not None
        return self.binder.extender_server.url

    async def ledger(self) -> dict[str, tuple[str, LedgerAlloc]]:
        """uid -> (node, allocation), read from the KV bucket now."""
        assert self.bus is not None
        out: dict[str, tuple[str, LedgerAlloc]] = {}
        for node in self.nodes:
            led, _ = await self.bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
            if led is not None:
                for uid, a in led.allocs.items():
                    out[uid] = (node, a)
        return out

    async def wait_for(self, what: Callable[[], Any], timeout: float = 15.0, desc: str = "") -> Any:
        """Poll ``what()`` (sync or async) until truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            v = what()
            if asyncio.iscoroutine(v):
                v = await v
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {desc or what}")
            await asyncio.sleep(0.02)

    async def wait_bound(self, ns: str, name: str, timeout: float = 15.0) -> dict[str, Any]:
        def bound() -> dict[str, Any] | None:
            p = self.fake.get("pods", ns, name)
            return p if p and p["spec"].get("nodeName") else None

        return await self.wait_for(bound, timeout, f"{ns}/{name} bound")  # type: ignore[no-any-return]

    def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.fake.list("events")
            if e.get("involvedObject", {}).get("name") == name
            and (reason is None or e.get("reason") == reason)
        ]


def gpu_container(name: str = "main", **limits: Any) -> dict[str, Any]:
    """A container asking ``limits`` (keys like gpu=1, gpumem=3000, gpucores=30)."""
    lim = {f"nvidia.com/{k}": str(v) for k, v in limits.items()}
    c: dict[str, Any] = {"name": name, "image": "busybox:1.36"}
    if lim:
        c["resources"] = {"limits": lim}
    return c


def card_totals(pods: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Memory and cores booked per card UUID, summed from the pods' HAMi annotations."""
    tot: dict[str, list[int]] = {}
    for p in pods:
        for devs in ann.decode_pod_devices(p["metadata"]["annotations"][ann.DEVICES_ALLOCATED]):
            for d in devs:
                t = tot.setdefault(d.uuid, [0, 0])
                t[0] += d.mem
                t[1] += d.cores
    return {k: (v[0], v[1]) for k, v in tot.items()}
