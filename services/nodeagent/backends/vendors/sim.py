"""Simulated cards of other vendors, for ``--sim-gpus Ascend910B3:8,MLU370:4,...``.

Pure. :func:`sim_cards` builds the physical cards of one spec entry the way the vendor's
discovery would report them (IDs shaped as the vendor's: Ascend die IDs, ``DCU-<serial>``,
Vastai dies named after their card), and :func:`vendor_links` overlays the vendor's
topology on the node's link matrix: Ascend HCCS inside each group of four and the
network plane, Neuron rings and 4x4 tori, xGMI / MLU-Link / MetaX full meshes, Kunlunxin
groups of four. Scores use REFERENCE §3's scale, so every link-aware policy reads them.
"""

from __future__ import annotations

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors import FAMILIES, ascend
from services.nodeagent.backends.vendors.base import Family, Model, sim_serial
from shared.schemas import DeviceTemplate

# Same scale as services/nodeagent/backends/sim.py: a switch hop plus lanes.
SINGLE_SWITCH, LANE = 50, 100


def _ident(node: str, fam: Family, model: Model, i: int, die: int = 0) -> str:
    s = sim_serial(node, fam.key, i)
    if fam.key.startswith("Ascend"):
        return ascend.die_id(sim_serial(node, fam.key, i, width=40))
    if fam.key == "DCU":
        return f"DCU-{s[:12].upper()}"
    if fam.key == "AMDGPU":
        return f"{s[:8]}-{s[8:12]}-{s[12:16]}-0000-{i:012x}"
    if fam.key == "XPU":
        return f"0000:{0x3A + i:02x}:00.0"  # the vXPU plugin names cards by bus ID
    if fam.key == "Vastai":
        return f"VA-{s[:10]}-die{die}"
    if fam.key == "AWSNeuron":
        return f"{node}-AWSNeuron-{i}"  # HAMi's capacity-derived ID
    return f"{fam.key.upper()}-{s[:8]}-{s[8:12]}-{s[12:16]}"


def sim_cards(
    node: str,
    key: str,
    model: Model,
    count: int,
    start: int,
    numa_of: list[int],
    memory_mib: int = 0,
    position: int | None = None,
) -> list[PhysicalCard]:
    """``count`` cards (Vastai: ``count x dies`` dies) indexed from ``start`` (the
    family's own numbering); ``position`` is where the first lands among all the node's
    cards and ``numa_of[p]`` the NUMA node of position ``p``."""
    pos0 = start if position is None else position
    fam = FAMILIES[key]
    templates = tuple(
        DeviceTemplate(name=t.name, memory_mib=t.memory_mib, cores=t.cores) for t in model.templates
    )
    out: list[PhysicalCard] = []
    for c in range(count):
        for die in range(max(1, model.dies)):
            i = start + len(out)
            info: dict[str, str | int] = {}
            nid = ascend.network_id(model, i) if key.startswith("Ascend") else None
            if nid is not None:
                info["NetworkID"] = nid
            if key == "AMDGPU":
                info["pciBDF"] = f"0000:{0x0C + 0x10 * c:02x}:00.0"
            if key == "Vastai":
                info.update(
                    {"AIC": f"VA-{sim_serial(node, key, start + c)[:10]}", "DeviceStrategy": "die"}
                )
            if key == "Metax-SGPU":
                info.update({"qosPolicy": "best-effort", "bdf": f"0000:{0x1A + c:02x}:00.0"})
            out.append(
                PhysicalCard(
                    uuid=_ident(node, fam, model, start + c, die),
                    index=i,
                    model=model.name,
                    memory_mib=memory_mib or model.memory_mib,
                    numa=numa_of[pos0 + i - start] if pos0 + i - start < len(numa_of) else 0,
                    vendor=key,
                    type=model.type,
                    cores=model.cores,
                    custom_info=tuple(info.items()),
                    templates=templates,
                )
            )
    return out


def _pairs(topology: str, n: int) -> dict[tuple[int, int], int]:
    """Lane counts between card positions 0..n-1 of one vendor group."""
    lanes: dict[tuple[int, int], int] = {}
    if topology == "mesh":
        lanes = {(i, j): 1 for i in range(n) for j in range(i + 1, n)}
    elif topology == "pairs":
        lanes = {(i, i + 1): 1 for i in range(0, n - 1, 2)}
    elif topology == "ring" and n > 1:
        lanes = {(min(i, (i + 1) % n), max(i, (i + 1) % n)): 1 for i in range(n)}
    elif topology == "torus4x4":
        side = 4
        for i in range(n):
            r, c = divmod(i, side)
            for j in (r * side + (c + 1) % side, ((r + 1) % side) * side + c):
                if j < n and j != i:
                    lanes[(min(i, j), max(i, j))] = 1
    elif topology == "network8":  # HCCS full mesh inside each group of four
        for i in range(n):
            for j in range(i + 1, n):
                if i // 4 == j // 4:
                    lanes[(i, j)] = 1
    return lanes


def vendor_links(links: list[list[int]], cards: list[PhysicalCard]) -> list[list[int]]:
    """``links`` with each vendor group's topology added between its cards (positions in
    ``cards``); NVIDIA cards and cards of different models are left as they are."""
    out = [row[:] for row in links]
    groups: dict[tuple[str, str], list[int]] = {}
    for pos, c in enumerate(cards):
        if c.vendor in FAMILIES:
            groups.setdefault((c.vendor, c.model), []).append(pos)
    for (key, name), members in groups.items():
        model = next((m for m in FAMILIES[key].models if m.name == name), None)
        if model is None:
            continue  # a chip not in our tables (real discovery): no known topology
        for (a, b), k in _pairs(model.topology, len(members)).items():
            i, j = members[a], members[b]
            out[i][j] = out[j][i] = SINGLE_SWITCH + LANE * k
    return out
