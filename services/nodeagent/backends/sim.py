"""Simulated cards: any number of models, sizes, NUMA layouts and NVLink topologies.

Used by ``hami up`` without GPUs, by the tests and by the benchmarks. UUIDs are stable
for a (node, index) pair so a restarted simulated agent registers the same cards.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.nodeagent.backends import Discovery, PhysicalCard
from shared.schemas import ContainerUsage, DeviceUsage

MIB = 1 << 20
# What a simulated card reports used with nothing on it (the driver's own reservation),
# as a share of its memory, at most SIM_BASELINE_MAX_MIB.
SIM_BASELINE_SHARE = 0.005
SIM_BASELINE_MAX_MIB = 512

# REFERENCE §3 pair link scores.
CROSS_CPU, SAME_CPU, HOST_BRIDGE, MULTI_SWITCH, SINGLE_SWITCH, SAME_BOARD = 10, 20, 30, 40, 50, 60
NVLINK_LANE = 100

TOPOLOGIES = ("pcie", "pairs", "dgx1", "nvswitch")


class SimSpecError(ValueError):
    """A --sim-gpus value that does not parse."""


@dataclass(frozen=True)
class GpuSpec:
    model: str
    count: int
    memory_mib: int


def parse_gpu_spec(text: str) -> GpuSpec:
    """``MODEL:COUNT[:MEMORY_MIB]``; memory defaults from a ``<n>GB`` in the model name."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise SimSpecError(f"--sim-gpus {text!r}: expected MODEL:COUNT[:MEMORY_MIB]")
    model = parts[0]
    try:
        count = int(parts[1])
        if len(parts) == 3:
            mem = int(parts[2])
        else:
            m = re.search(r"(\d+)\s*G[Bi]?B?", model, re.IGNORECASE)
            mem = int(m.group(1)) * 1024 if m else 16384
    except ValueError as exc:
        raise SimSpecError(f"--sim-gpus {text!r}: COUNT and MEMORY_MIB must be integers") from exc
    if count < 0 or count > 64 or mem <= 0:
        raise SimSpecError(f"--sim-gpus {text!r}: COUNT must be 0..64 and MEMORY_MIB positive")
    return GpuSpec(model=model, count=count, memory_mib=mem)


def sim_uuid(node: str, index: int) -> str:
    h = hashlib.sha1(f"{node}/{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def link_matrix(n: int, numa_of: list[int], topology: str) -> list[list[int]]:
    """Pair scores for ``n`` cards: PCIe by NUMA, plus NVLink lanes per topology.

    ``dgx1`` is the hybrid cube-mesh of 8-card V100 servers (six links per card: inside
    each quad one double and two single links, a double link to the peer card of the
    other quad); ``nvswitch`` connects every pair through switches (A100/H100 HGX);
    ``pairs`` bridges cards 2k and 2k+1.
    """
    if topology not in TOPOLOGIES:
        raise SimSpecError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    m = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                m[i][j] = SAME_CPU if numa_of[i] == numa_of[j] else CROSS_CPU
    lanes: dict[tuple[int, int], int] = {}
    if topology == "pairs":
        for i in range(0, n - 1, 2):
            lanes[(i, i + 1)] = 1
    elif topology == "dgx1":
        for q in (0, 4):
            a, b, c, d = q, q + 1, q + 2, q + 3
            for i, j, k in ((a, b, 1), (a, c, 1), (a, d, 2), (b, c, 2), (b, d, 1), (c, d, 1)):
                if j < n:
                    lanes[(i, j)] = k
        for i in range(4):
            if i + 4 < n:
                lanes[(i, i + 4)] = 2
    elif topology == "nvswitch":
        for i in range(n):
            for j in range(i + 1, n):
                lanes[(i, j)] = 12
    for (i, j), k in lanes.items():
        m[i][j] = m[j][i] = SINGLE_SWITCH + NVLINK_LANE * k
    return m


class SimBackend:
    name = "sim"

    def __init__(
        self,
        node: str,
        gpus: list[GpuSpec],
        numa_nodes: int = 1,
        topology: str = "pcie",
    ) -> None:
        self.node = node
        self.gpus = gpus
        self.numa_nodes = max(1, numa_nodes)
        self.topology = topology
        self.unhealthy: set[int] = set()  # indexes the tests mark broken

    def discover(self) -> Discovery:
        cards: list[PhysicalCard] = []
        total = sum(g.count for g in self.gpus)
        per_numa = max(1, -(-total // self.numa_nodes))
        for spec in self.gpus:
            for _ in range(spec.count):
                i = len(cards)
                cards.append(
                    PhysicalCard(
                        uuid=sim_uuid(self.node, i),
                        index=i,
                        model=spec.model,
                        memory_mib=spec.memory_mib,
                        numa=min(i // per_numa, self.numa_nodes - 1),
                        healthy=i not in self.unhealthy,
                    )
                )
        links = link_matrix(len(cards), [c.numa for c in cards], self.topology)
        return Discovery(cards=cards, links=links)

    def usage(self, containers: Sequence[ContainerUsage]) -> list[DeviceUsage]:
        """What NVML would report for each simulated card: a small driver baseline plus
        the memory every slice's limiter reports on it (capped at the card), and the
        slices' SM utilisations summed (capped at the whole card). Deterministic: the
        same slices' reports give the same figures."""
        mem: dict[str, int] = {}
        util: dict[str, float] = {}
        for c in containers:
            mem[c.uuid] = mem.get(c.uuid, 0) + c.memory_used_bytes
            util[c.uuid] = util.get(c.uuid, 0.0) + c.utilization
        out: list[DeviceUsage] = []
        for card in self.discover().cards:
            baseline = min(SIM_BASELINE_MAX_MIB, int(card.memory_mib * SIM_BASELINE_SHARE))
            used = min(card.memory_mib, baseline + mem.get(card.uuid, 0) // MIB)
            out.append(DeviceUsage(uuid=card.uuid, memory_used_mib=used,
                                   utilization=min(1.0, util.get(card.uuid, 0.0))))
        return out
