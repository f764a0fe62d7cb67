"""Simulated cards: any number of models, sizes, NUMA layouts and NVLink topologies.

Used by ``hami up`` without GPUs, by the tests and by the benchmarks. UUIDs are stable
for a (node, index) pair so a restarted simulated agent registers the same cards.

A model of another vendor (``Ascend910B3:8``, ``MLU370:4``, ``MI300X:8``; the names are
:mod:`services.nodeagent.backends.vendors`') simulates that vendor's cards, with its
memory, cores, templates and topology; one ``--sim-gpus`` value may list several specs
separated by commas (``Ascend910B3:8,MLU370:4,A100-40GB:2``).

A spec ending in ``:mig`` (``A100-SXM4-40GB:2:mig``) simulates cards in MIG mode: they
register ``mode: mig`` with the model's profile table (:mod:`shared.hami.mig`), and the
backend creates and destroys MIG instances the way NVML does -- only at a placement the
profile allows and overlapping no live instance -- so the node agent's MIG lifecycle
runs without a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.nodeagent.backends import Discovery, MigError, MigInstance, PhysicalCard
from services.nodeagent.backends.vendors import find_model
from services.nodeagent.backends.vendors.sim import sim_cards, vendor_links
from services.nodeagent.registration import vendor_type
from shared.hami.mig import MIG_MODE, geometry, overlaps
from shared.schemas import ContainerUsage, DeviceUsage, MigPlacement

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
    mode: str = "hami-core"  # "mig": the cards are in MIG mode
    vendor: str = "NVIDIA"  # another vendor's family key (backends/vendors) for its models


def parse_gpu_spec(text: str) -> GpuSpec:
    """``MODEL:COUNT[:MEMORY_MIB][:mig]``; memory defaults from a ``<n>GB`` in the model
    name; ``mig`` puts the cards in MIG mode (the model must have a MIG geometry)."""
    parts = text.split(":")
    mode = "hami-core"
    if len(parts) in (3, 4) and parts[-1].lower() == MIG_MODE:
        mode = MIG_MODE
        parts = parts[:-1]
    if len(parts) not in (2, 3) or not parts[0]:
        raise SimSpecError(f"--sim-gpus {text!r}: expected MODEL:COUNT[:MEMORY_MIB][:mig]")
    model = parts[0]
    other = find_model(model)
    if other is not None:
        fam, vm = other
        if mode == MIG_MODE:
            raise SimSpecError(f"--sim-gpus {text!r}: {vm.name} ({fam.vendor}) has no MIG mode")
        try:
            count = int(parts[1])
            mem = int(parts[2]) if len(parts) == 3 else vm.memory_mib
        except ValueError as exc:
            raise SimSpecError(f"--sim-gpus {text!r}: COUNT and MEMORY_MIB must be integers") from exc
        if count < 0 or count > 64 or mem <= 0:
            raise SimSpecError(f"--sim-gpus {text!r}: COUNT must be 0..64 and MEMORY_MIB positive")
        return GpuSpec(model=vm.name, count=count, memory_mib=mem, vendor=fam.key)
    if mode == MIG_MODE and geometry(model) is None:
        raise SimSpecError(
            f"--sim-gpus {text!r}: no MIG geometry for {model!r} (A30, A100-SXM4-40GB, A100-SXM4-80GB, H100-SXM5-80GB)"
        )
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
    return GpuSpec(model=model, count=count, memory_mib=mem, mode=mode)


def parse_gpu_specs(values: Iterable[str]) -> list[GpuSpec]:
    """Every spec of some ``--sim-gpus`` values, each value one spec or a comma list."""
    out: list[GpuSpec] = []
    for value in values:
        parts = [p.strip() for p in value.split(",")]
        if any(not p for p in parts):
            raise SimSpecError(f"--sim-gpus {value!r}: an empty entry in the comma list")
        out.extend(parse_gpu_spec(p) for p in parts)
    return out


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
        self._mig: dict[str, list[MigInstance]] = {}  # GPU UUID -> live instances
        self._next_id = 1

    def discover(self) -> Discovery:
        cards: list[PhysicalCard] = []
        total = sum(g.count for g in self.gpus)
        per_numa = max(1, -(-total // self.numa_nodes))
        numa_of = [min(i // per_numa, self.numa_nodes - 1) for i in range(total * 4)]
        for spec in self.gpus:
            if spec.vendor != "NVIDIA":
                found = find_model(spec.model)
                assert found is not None  # parse_gpu_spec only makes vendor specs of known models
                # Each vendor numbers its own cards from 0 (they name its /dev nodes).
                first = sum(1 for c in cards if c.vendor == spec.vendor)
                made = sim_cards(self.node, spec.vendor, found[1], spec.count, first, numa_of,
                                 spec.memory_mib, position=len(cards))
                cards += [
                    dataclasses.replace(c, healthy=False) if len(cards) + k in self.unhealthy else c
                    for k, c in enumerate(made)
                ]
                continue
            profiles = tuple(geometry(spec.model) or ()) if spec.mode == MIG_MODE else ()
            for _ in range(spec.count):
                i = len(cards)
                cards.append(
                    PhysicalCard(
                        uuid=sim_uuid(self.node, i),
                        index=sum(1 for c in cards if c.vendor == "NVIDIA"),  # = i on an NVIDIA-only node
                        model=spec.model,
                        memory_mib=spec.memory_mib,
                        numa=min(i // per_numa, self.numa_nodes - 1),
                        healthy=i not in self.unhealthy,
                        mode=spec.mode,
                        mig_profiles=profiles,
                    )
                )
        links = link_matrix(len(cards), [c.numa for c in cards], self.topology)
        return Discovery(cards=cards, links=vendor_links(links, cards))

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
                                   utilization=min(1.0, util.get(card.uuid, 0.0)), vendor=card.vendor,
                                   type=card.type or vendor_type(card.vendor, card.model),
                                   memory_total_mib=card.memory_mib))
        return out

    # ------------------------------------------------------------------ MIG lifecycle

    def _card(self, gpu_uuid: str) -> PhysicalCard:
        for c in self.discover().cards:
            if c.uuid == gpu_uuid:
                return c
        raise MigError(f"no GPU {gpu_uuid} on {self.node}")

    def create_mig(self, gpu_uuid: str, profile: str, start: int, size: int) -> MigInstance:
        """Create a GPU + compute instance of ``profile`` at exactly ``start``/``size``,
        refusing what NVML refuses: a card not in MIG mode, an unknown profile, a
        placement the profile does not allow, or one overlapping a live instance."""
        card = self._card(gpu_uuid)
        if card.mode != MIG_MODE:
            raise MigError(f"GPU {gpu_uuid} is not in MIG mode")
        prof = next((p for p in card.mig_profiles if p.name == profile), None)
        if prof is None:
            raise MigError(f"GPU {gpu_uuid} has no MIG profile {profile!r}")
        want = MigPlacement(start=start, size=size)
        if want not in prof.placements:
            raise MigError(f"placement {start}/{size} is not valid for {profile} on {gpu_uuid}")
        live = self._mig.setdefault(gpu_uuid, [])
        for inst in live:
            if overlaps(want, MigPlacement(start=inst.start, size=inst.size)):
                raise MigError(f"placement {start}/{size} of {profile} overlaps {inst.profile} at {inst.start}/{inst.size}")
        gi = self._next_id
        self._next_id += 1
        h = hashlib.sha1(f"{gpu_uuid}/{gi}".encode()).hexdigest()
        inst = MigInstance(
            gpu_uuid=gpu_uuid, profile=profile, start=start, size=size,
            uuid=f"MIG-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}",
            gpu_instance=gi, compute_instance=0,
        )  # fmt: skip
        live.append(inst)
        return inst

    def destroy_mig(self, inst: MigInstance) -> None:
        """Destroy a live instance; one already gone is not an error (as NVML's NOT_FOUND)."""
        live = self._mig.get(inst.gpu_uuid, [])
        self._mig[inst.gpu_uuid] = [i for i in live if i.gpu_instance != inst.gpu_instance]

    def mig_instances(self, gpu_uuid: str) -> list[MigInstance]:
        return list(self._mig.get(gpu_uuid, []))
