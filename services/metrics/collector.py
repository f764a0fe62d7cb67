"""Prometheus exposition of the cluster's allocation state, with HAMi's metric names.

Pure: :class:`AllocationCollector` renders gauges from the inventory and ledger it is
given at scrape time (REFERENCE §7: memory in bytes, core ratios 0..1, HAMi's labels),
and :class:`LatencyMetrics` holds the scheduling-latency histograms HAMi lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from shared.schemas import NodeHealth, NodeInventory, NodeLedger, card_usage

MIB = 1024 * 1024
CARD_LABELS = ["node", "device_uuid", "device_index", "device_type"]
VGPU_LABELS = ["namespace", "node", "pod", "container_index", "device_uuid"]

Snapshot = tuple[dict[str, NodeInventory], dict[str, NodeLedger], dict[str, NodeHealth]]


class AllocationCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], version: str = "0.1.0") -> None:
        self.snapshot = snapshot
        self.version = version

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        nodes, ledgers, health = self.snapshot()
        mem_limit = GaugeMetricFamily(
            "hami_gpu_memory_limit_bytes", "Device memory registered for sharing", labels=CARD_LABELS)
        core_limit = GaugeMetricFamily(
            "hami_gpu_core_limit_ratio", "Device cores registered for sharing (1 = whole card)",
            labels=CARD_LABELS)
        mem_alloc = GaugeMetricFamily(
            "hami_gpu_memory_allocated_bytes", "Device memory allocated to slices", labels=CARD_LABELS)
        core_alloc = GaugeMetricFamily(
            "hami_gpu_core_allocated_ratio", "Device cores allocated to slices (ratio of the card)",
            labels=CARD_LABELS)
        shared = GaugeMetricFamily(
            "hami_gpu_shared_count", "Containers sharing the device", labels=CARD_LABELS)
        overview = GaugeMetricFamily(
            "hami_node_gpu_overview", "Cards per node and health", labels=["node", "healthy"])
        node_ratio = GaugeMetricFamily(
            "hami_node_gpu_memory_allocated_ratio", "Allocated share of the node's device memory",
            labels=["node"])
        vmem = GaugeMetricFamily(
            "hami_vgpu_memory_allocated_bytes", "Device memory allocated to a container",
            labels=VGPU_LABELS)
        vcore = GaugeMetricFamily(
            "hami_vgpu_core_allocated_ratio", "Cores allocated to a container (ratio of the card)",
            labels=VGPU_LABELS)
        for name in sorted(nodes):
            inv = nodes[name]
            ledger = ledgers.get(name)
            used: dict[str, tuple[int, int, int]] = {}
            if ledger is not None:
                for a in ledger.allocs.values():
                    for uuid, (m, c, s) in card_usage(a.containers).items():
                        u = used.get(uuid, (0, 0, 0))
                        used[uuid] = (u[0] + m, u[1] + c, u[2] + s)
                    for ci, cont in enumerate(a.containers):
                        for d in cont.devices:
                            labels = [a.namespace, name, a.name, str(ci), d.uuid]
                            vmem.add_metric(labels, d.mem * MIB)
                            vcore.add_metric(labels, d.cores / 100.0)
            total_mem = 0
            total_used = 0
            for d in inv.devices:
                labels = [name, d.uuid, str(d.index), d.type]
                m, c, s = used.get(d.uuid, (0, 0, 0))
                mem_limit.add_metric(labels, d.devmem * MIB)
                core_limit.add_metric(labels, d.devcore / 100.0)
                mem_alloc.add_metric(labels, m * MIB)
                core_alloc.add_metric(labels, c / 100.0)
                shared.add_metric(labels, s)
                total_mem += d.devmem
                total_used += m
            h = health.get(name)
            overview.add_metric([name, "true" if (h is None or h.healthy) else "false"], len(inv.devices))
            node_ratio.add_metric([name], total_used / total_mem if total_mem else 0.0)
        yield from (mem_limit, core_limit, mem_alloc, core_alloc, shared, overview, node_ratio, vmem, vcore)
        info = InfoMetricFamily("hami_build", "Build information")
        info.add_metric([], {"version": self.version, "implementation": "hami-bus"})
        yield info


class LatencyMetrics:
    """Scheduling latency: requested -> decided, and decided -> bound."""

    BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decision = Histogram(
            "hami_scheduling_decision_seconds", "Time from request to placement decision",
            ["outcome"], buckets=self.BUCKETS, registry=registry)
        self.bind = Histogram(
            "hami_scheduling_bind_seconds", "Time from decision to bound",
            buckets=self.BUCKETS, registry=registry)
