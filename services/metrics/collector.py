"""Prometheus exposition of the cluster's allocation state, with HAMi's metric names.

Pure: :class:`AllocationCollector` renders gauges from the inventory, ledger and node
telemetry it is given at scrape time, with HAMi's names, labels and values (REFERENCE
§7: memory in bytes; HAMi's core "ratios" are percents, 100 = whole card). The scheduler
side carries HAMi's registry-level ``zone="vGPU"`` label; MIG instances the node agents
realised (:class:`MigIdentities`, from the ``prepared`` events and the telemetry) are HAMi's
``hami_node_gpu_mig_instance_info`` and, per container, ``hami_mig_device_info``; with ``legacy`` on, the
pre-v2.9 names and labels are emitted too (HAMi's ``--legacy-metrics``).

Every vendor's cards are in the same series (issue 16): each ``hami_*`` per-card and
per-container series carries a ``vendor`` label, the card's HAMi device type (``NVIDIA``,
``MLU``, ``Ascend910B3``, ...), beside HAMi's ``device_type`` (the model), so one panel
shows an Ascend card beside an A100. HAMi's own scheduler metrics have no vendor label
(its DeviceInfo carries ``deviceVendor`` but no series exports it); the legacy names keep
exactly HAMi's labels. Units are HAMi's whatever the vendor counts in: memory in bytes,
utilisation 0-100 from the telemetry's 0..1, and a card's cores as a percent of the card
(HAMi's ``normalizeCoreMetrics``) for families whose cards register cores in their own
unit (Ascend AI cores, AMD compute units, Neuron cores); NVIDIA's figures are unchanged.

Per-container series name the pod and its namespace; an allocation made without
Kubernetes (``hami submit``, ``hami run``) has neither, so its request name stands for the
pod and the container and :data:`STANDALONE_NAMESPACE` for the namespace (a dashboard's
namespace selector then lists it, instead of an empty value it cannot select).
:class:`LatencyMetrics` holds the scheduling-latency histograms HAMi lacks.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.schemas import (
    AllocPrepared,
    CardGrant,
    Device,
    MigSlice,
    NodeHealth,
    NodeInventory,
    NodeLedger,
    Telemetry,
    card_usage,
)

MIB = 1024 * 1024
ZONE = "vGPU"  # HAMi's scheduler wraps its registry with zone="vGPU"
STANDALONE_NAMESPACE = "standalone"

Snapshot = tuple[dict[str, NodeInventory], dict[str, NodeLedger], dict[str, NodeHealth]]


def core_ratios(d: Device, used: int) -> tuple[float, float]:
    """A card's core limit and what is allocated of it, as HAMi's ratios (percents).

    NVIDIA's cards register 100 x deviceCoreScaling and are exported as they register
    (as before). Other families count cores in their own unit (``devcore`` 20 AI cores,
    304 compute units, 2 NeuronCores): the limit is then 100 and the allocation its share
    rounded up, as HAMi's ``normalizeCoreMetrics`` does, so cards of every vendor compare."""
    if d.vendor == "NVIDIA":
        return float(d.devcore), float(used)
    total = d.devcore
    if d.vendor == "AWSNeuron":  # a mask of NeuronCores: count its bits, used ones too
        total, used = total.bit_count(), used.bit_count()
    if total <= 0:
        return 0.0, 0.0
    return 100.0, float(math.ceil(used * 100 / total))


class _Families:
    """Gauge families by name, in first-use order; ``zone`` appended to zoned ones."""

    def __init__(self) -> None:
        self.fams: dict[str, tuple[GaugeMetricFamily, bool]] = {}

    def add(self, name: str, doc: str, labels: list[str], values: list[str], v: float,
            zoned: bool = True) -> None:
        if name not in self.fams:
            self.fams[name] = (GaugeMetricFamily(name, doc, labels=labels + (["zone"] if zoned else [])),
                               zoned)
        fam, z = self.fams[name]
        fam.add_metric(values + ([ZONE] if z else []), v)


def _complete(m: MigSlice | None) -> bool:
    """A realised instance: HAMi exports only allocations with their whole runtime
    identity (MIG UUID, GPU- and compute-instance ids)."""
    return m is not None and bool(m.uuid) and m.gpu_instance >= 0 and m.compute_instance >= 0


class MigIdentities:
    """The MIG instances the node agents created: allocation uid -> container name ->
    the instances (card UUID, :class:`MigSlice` with its identity), each container's
    from the newest report of it. Reports are the ``prepared`` events (at once) and the
    node agents' telemetry, which names every live instance in each sample, so a metrics
    service started after the events learns them within one telemetry interval. The
    ledger holds the decision (profile and placement); this adds what NVML gave."""

    def __init__(self) -> None:
        self.by_uid: dict[str, dict[str, tuple[float, list[tuple[str, MigSlice]]]]] = {}

    def _put(self, uid: str, container: str, at: float, got: list[tuple[str, MigSlice]]) -> None:
        conts = self.by_uid.get(uid)
        prev = conts.get(container) if conts is not None else None
        if prev is not None and prev[0] > at:
            return  # a late, older report loses
        if got:
            self.by_uid.setdefault(uid, {})[container] = (at, got)
        elif conts is not None:
            conts.pop(container, None)

    def observe(self, ev: AllocPrepared) -> None:
        got = [(d.uuid, d.mig) for d in ev.devices if d.mig is not None and _complete(d.mig)]
        self._put(ev.uid, ev.container, ev.at, got)

    def observe_telemetry(self, tel: Telemetry) -> None:
        """The instances a node agent holds now (``Telemetry.mig``)."""
        rows: dict[tuple[str, str], list[tuple[str, MigSlice]]] = {}
        for r in tel.mig:
            if _complete(r.mig):
                rows.setdefault((r.uid, r.container), []).append((r.uuid, r.mig))
        for (uid, container), got in rows.items():
            self._put(uid, container, tel.at, got)

    def keep(self, held: set[str]) -> None:
        """Forget the allocations no ledger holds any more (released)."""
        for uid in [u for u in self.by_uid if u not in held]:
            del self.by_uid[uid]

    def realised(self, uid: str, container: str, grant: CardGrant) -> MigSlice | None:
        """The identity of ``grant``'s instance (same card and placement), if created."""
        if grant.mig is None:
            return None
        got = self.by_uid.get(uid, {}).get(container)
        for card, m in got[1] if got is not None else []:
            if card == grant.uuid and (m.start, m.size) == (grant.mig.start, grant.mig.size):
                return m
        return None


class AllocationCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        version: str = "0.1.0",
        *,
        legacy: bool = False,
        telemetry: Callable[[], dict[str, Telemetry]] | None = None,
        clock: Callable[[], float] = time.time,
        mig: MigIdentities | None = None,
    ) -> None:
        self.mig = mig
        self.snapshot = snapshot
        self.version = version
        self.legacy = legacy
        self.telemetry = telemetry or dict
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes, ledgers, _health = self.snapshot()
        f = _Families()
        leg = self.legacy
        for name in sorted(nodes):
            inv = nodes[name]
            ledger = ledgers.get(name)
            used: dict[str, tuple[int, int, int]] = {}
            for a in (ledger.allocs.values() if ledger else []):
                for uuid, (m, c, s) in card_usage(a.containers).items():
                    u = used.get(uuid, (0, 0, 0))
                    used[uuid] = (u[0] + m, u[1] + c, u[2] + s)
            for d in inv.devices:
                m, c, s = used.get(d.uuid, (0, 0, 0))
                idx = str(d.index)
                card = [name, d.uuid, idx]
                climit, cused = core_ratios(d, c)
                vnd = ["vendor"]
                f.add("hami_gpu_memory_limit_bytes", "Device memory limit for a certain GPU",
                      ["node", "device_uuid", "device_index", "device_type", *vnd], [*card, d.type, d.vendor],
                      d.devmem * MIB)
                f.add("hami_gpu_core_limit_ratio", "Device core limit for a certain GPU",
                      ["node", "device_uuid", "device_index", "device_type", *vnd], [*card, d.type, d.vendor],
                      climit)
                f.add("hami_gpu_memory_allocated_bytes", "Device memory allocated for a certain GPU",
                      ["node", "device_uuid", "device_index", "device_cores", "device_type", *vnd],
                      [*card, str(d.devcore), d.type, d.vendor], m * MIB)
                f.add("hami_gpu_shared_count", "Number of containers sharing this GPU",
                      ["node", "device_uuid", "device_index", "device_type", *vnd], [*card, d.type, d.vendor], s)
                f.add("hami_gpu_core_allocated_ratio", "Device core allocated for a certain GPU",
                      ["node", "device_uuid", "device_index", "device_type", *vnd], [*card, d.type, d.vendor],
                      cused)
                f.add("hami_node_gpu_overview", "GPU overview on a certain node",
                      ["node", "device_uuid", "device_index", "device_cores", "device_memory_limit", "device_type",
                       *vnd], [*card, str(d.devcore), str(d.devmem), d.type, d.vendor], m * MIB)
                if d.devmem > 0:
                    f.add("hami_node_gpu_memory_allocated_ratio",
                          "GPU Memory Allocated Percentage on a certain GPU",
                          ["node", "device_uuid", "device_index", *vnd], [*card, d.vendor], m / d.devmem)
                if leg:
                    old = ["nodeid", "deviceuuid", "deviceidx"]
                    f.add("GPUDeviceMemoryLimit", "Device memory limit for a certain GPU",
                          [*old, "devicetype"], [*card, d.type], d.devmem * MIB)
                    f.add("GPUDeviceCoreLimit", "Device memory core limit for a certain GPU",
                          [*old, "devicetype"], [*card, d.type], d.devcore)
                    f.add("GPUDeviceMemoryAllocated", "Device memory allocated for a certain GPU",
                          [*old, "devicecores", "devicetype"], [*card, str(d.devcore), d.type], m * MIB)
                    f.add("GPUDeviceSharedNum", "Number of containers sharing this GPU",
                          [*old, "devicetype"], [*card, d.type], s)
                    f.add("GPUDeviceCoreAllocated", "Device core allocated for a certain GPU",
                          [*old, "devicetype"], [*card, d.type], c)
                    f.add("nodeGPUOverview", "GPU overview on a certain node",
                          [*old, "devicecores", "devicememorylimit", "devicetype"],
                          [*card, str(d.devcore), str(d.devmem), d.type], m * MIB)
                    if d.devmem > 0:
                        f.add("nodeGPUMemoryPercentage", "GPU Memory Allocated Percentage on a certain GPU",
                              old, card, m / d.devmem)
            by_uuid = {d.uuid: d for d in inv.devices}
            for a in (ledger.allocs.values() if ledger else []):
                for ci, cont in enumerate(a.containers):
                    for g in cont.devices:
                        labels = [a.namespace or STANDALONE_NAMESPACE, name, a.name, str(ci), g.uuid]
                        ctr = ["namespace", "node", "pod", "container_index", "device_uuid", "vendor"]
                        dev = by_uuid.get(g.uuid)
                        gcores = core_ratios(dev, g.cores)[1] if dev is not None else g.cores
                        f.add("hami_vgpu_memory_allocated_bytes", "vGPU memory allocated from a container",
                              ctr, [*labels, g.vendor], g.mem * MIB)
                        f.add("hami_vgpu_core_allocated_ratio", "vGPU core allocated from a container",
                              ctr, [*labels, g.vendor], gcores)
                        if leg:
                            old = ["podnamespace", "nodename", "podname", "containeridx", "deviceuuid"]
                            f.add("vGPUMemoryAllocated", "vGPU memory allocated from a container",
                                  old, labels, g.mem * MIB)
                            f.add("vGPUCoreAllocated", "vGPU core allocated from a container",
                                  old, labels, g.cores)
            if self.mig is not None and ledger is not None:
                self._mig_instances(f, name, inv, ledger, self.mig)
        if self.mig is not None:
            self.mig.keep({uid for led in ledgers.values() for uid in led.allocs})
        self._node_side(f, nodes, ledgers)
        yield from (fam for fam, _ in f.fams.values())
        info = GaugeMetricFamily(
            "hami_build_info", "hami build metadata exposed as labels with a constant value of 1.",
            labels=["version", "revision", "build_date", "go_version", "compiler", "platform"])
        info.add_metric([self.version, "", "", "", platform.python_implementation().lower(),
                         f"{platform.system().lower()}/{platform.machine()}"], 1)
        yield info

    def _mig_instances(
        self, f: _Families, node: str, inv: NodeInventory, ledger: NodeLedger, ids: MigIdentities
    ) -> None:
        """HAMi's series of realised MIG instances: the scheduler's
        ``hami_node_gpu_mig_instance_info`` (legacy ``nodeGPUMigInstance``, ``migname``
        ``<profile>-<GPU instance id>``) and the vGPU monitor's ``hami_mig_device_info``
        (legacy ``MigInfo``), one per container's instance, value 1."""
        index = {d.uuid: d.index for d in inv.devices if d.mode == "mig"}
        for a in ledger.allocs.values():
            for cont in a.containers:
                cname = cont.name or a.name
                nv = [g for g in cont.devices if g.vendor == "NVIDIA"]
                for di, g in enumerate(nv):
                    m = ids.realised(a.uid, cont.name, g)
                    if m is None or g.uuid not in index:
                        continue
                    card = [node, g.uuid, str(index[g.uuid])]
                    gi, ci = str(m.gpu_instance), str(m.compute_instance)
                    f.add("hami_node_gpu_mig_instance_info",
                          "Realized MIG instance identity and scheduler placement",
                          ["node", "device_uuid", "device_index", "mig_uuid", "profile", "gpu_instance_id",
                           "compute_instance_id", "placement_start", "placement_size"],
                          [*card, m.uuid, m.profile, gi, ci, str(m.start), str(m.size)], 1)
                    pod = [a.namespace or STANDALONE_NAMESPACE, a.name, cname, str(di), g.uuid]
                    f.add("hami_mig_device_info", "MIG runtime identity for a container allocation",
                          ["namespace", "pod", "container", "vdevice_index", "device_uuid", "mig_uuid",
                           "profile", "gpu_instance_id", "compute_instance_id"],
                          [*pod, m.uuid, m.profile, gi, ci], 1, zoned=False)
                    if self.legacy:
                        f.add("nodeGPUMigInstance", "GPU Sharing mode. 0 for hami-core, 1 for mig, 2 for mps",
                              ["nodeid", "deviceuuid", "deviceidx", "migname"],
                              [*card, f"{m.profile}-{gi}"], 1)
                        f.add("MigInfo", "Mig device information for container",
                              ["podnamespace", "podname", "ctrname", "vdeviceid", "deviceuuid", "instanceid"],
                              [*pod, gi], 1, zoned=False)

    def _node_side(self, f: _Families, nodes: dict[str, NodeInventory],
                   ledgers: dict[str, NodeLedger]) -> None:
        """What HAMi's vGPU monitor exports per node, from the node agents' telemetry."""
        now = self.clock()
        leg = self.legacy
        for node, tel in sorted(self.telemetry().items()):
            inv = nodes.get(node)
            if inv is None:
                continue
            cards = {d.uuid: d for d in inv.devices}
            for du in tel.devices:
                d = cards.get(du.uuid)
                if d is None:
                    continue
                labels = [node, str(d.index), d.uuid, d.type]
                host = ["node", "device_index", "device_uuid", "device_type", "vendor"]
                f.add("hami_host_gpu_memory_used_bytes", "GPU device memory usage in bytes", host,
                      [*labels, d.vendor], du.memory_used_mib * MIB, zoned=False)
                # The telemetry's 0..1 whatever the vendor's tool reports; HAMi's 0-100 here.
                f.add("hami_host_gpu_utilization_ratio", "GPU core utilization ratio (0-100)", host,
                      [*labels, d.vendor], du.utilization * 100, zoned=False)
                if leg:
                    old = ["nodeid", "deviceidx", "deviceuuid", "devicetype"]
                    f.add("HostGPUMemoryUsage", "GPU device memory usage", old, labels,
                          du.memory_used_mib * MIB, zoned=False)
                    f.add("HostCoreUtilization", "GPU core utilization", old, labels,
                          du.utilization * 100, zoned=False)
            ledger = ledgers.get(node)
            allocs = ledger.allocs if ledger else {}
            for cu in tel.containers:
                a = allocs.get(cu.uid)
                if a is None:
                    continue  # released since the sample: no pod to name
                grant = next((c for c in a.containers if c.name == cu.container), None)
                uuids = [g.uuid for g in grant.devices] if grant else []
                vidx = str(uuids.index(cu.uuid)) if cu.uuid in uuids else "0"
                labels = [a.namespace or STANDALONE_NAMESPACE, a.name, cu.container or a.name, vidx,
                          cu.uuid]
                ctr = ["namespace", "pod", "container", "vdevice_index", "device_uuid"]
                card_of = cards.get(cu.uuid)
                vendor = card_of.vendor if card_of is not None else next(
                    (g.vendor for g in (grant.devices if grant else []) if g.uuid == cu.uuid), "NVIDIA")
                nctr, nlabels = [*ctr, "vendor"], [*labels, vendor]
                util = cu.utilization * 100
                f.add("hami_vgpu_memory_used_bytes", "vGPU device memory usage in bytes", nctr, nlabels,
                      cu.memory_used_bytes, zoned=False)
                f.add("hami_vgpu_memory_limit_bytes", "vGPU device memory limit in bytes", nctr, nlabels,
                      cu.memory_limit_bytes, zoned=False)
                f.add("hami_container_device_memory_bytes", "Container device memory usage in bytes", nctr,
                      nlabels, cu.memory_used_bytes, zoned=False)
                f.add("hami_container_device_utilization_ratio", "Container device SM utilization ratio",
                      nctr, nlabels, util, zoned=False)
                elapsed = max(0.0, now - cu.last_kernel_at) if cu.last_kernel_at else 0.0
                f.add("hami_container_last_kernel_elapsed_seconds",
                      "Seconds since last kernel execution in container", nctr, nlabels, elapsed, zoned=False)
                if leg:
                    old = ["podnamespace", "podname", "ctrname", "vdeviceid", "deviceuuid"]
                    f.add("vGPU_device_memory_usage_in_bytes", "vGPU device usage", old, labels,
                          cu.memory_used_bytes, zoned=False)
                    f.add("vGPU_device_memory_limit_in_bytes", "vGPU device limit", old, labels,
                          cu.memory_limit_bytes, zoned=False)
                    # The limiter does not split usage by kind: all of it is reported as data.
                    f.add("Device_memory_desc_of_container", "Container device memory description",
                          [*old, "context", "module", "data", "offset"],
                          [*labels, "0", "0", str(cu.memory_used_bytes), "0"], cu.memory_used_bytes,
                          zoned=False)
                    f.add("Device_utilization_desc_of_container", "Container device utilization description",
                          old, labels, util, zoned=False)
                    f.add("Device_last_kernel_of_container", "Container device last kernel description",
                          old, labels, elapsed, zoned=False)


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
