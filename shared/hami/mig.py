"""MIG facts shared by the node agent and the placement engine.

A MIG-capable card is cut into memory slices (8 on A100/H100-class cards); a GPU
instance of a profile occupies the half-open range ``[start, start + size)`` of them, at
one of the starts NVML allows for that profile. :data:`GEOMETRIES` are the profile
tables of the models the simulator offers: the profiles HAMi v2.10's chart allows for
each model (``migProfileAllowlist``), with the memory NVML reports for them
(``nvidia-smi mig -lgip``, MiB) and the compute share as a percentage of the whole-card
profile's SMs. A real card's table comes from NVML (services/nodeagent/backends/nvml.py).
Pure data and small functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.schemas import MigPlacement, MigProfile, MigSlice

MIG_MODE = "mig"


def _profile(
    name: str, memory_mb: int, core: int, slices: int, size: int, starts: Sequence[int]
) -> MigProfile:
    return MigProfile(
        name=name,
        memory_mb=memory_mb,
        core=core,
        slice_count=slices,
        placements=[MigPlacement(start=s, size=size) for s in starts],
    )


def _ampere_hopper(
    mem: tuple[int, int, int, int], core: tuple[int, int, int], names: tuple[str, ...]
) -> list[MigProfile]:
    """The 8-memory-slice layout of A100/H100-class cards: 1g at any of 7 starts, 2g at
    0/2/4, 3g at 0/4 (spanning 4 memory slices), 7g the whole card."""
    g1, g2, g3, g7 = names
    return [
        _profile(g1, mem[0], core[0], 1, 1, range(7)),
        _profile(g2, mem[1], core[1], 2, 2, (0, 2, 4)),
        _profile(g3, mem[2], core[2], 3, 4, (0, 4)),
        _profile(g7, mem[3], 100, 7, 8, (0,)),
    ]


GEOMETRIES: dict[str, list[MigProfile]] = {
    "A30-24GB": [
        _profile("1g.6gb", 5952, 25, 1, 1, range(4)),
        _profile("2g.12gb", 12032, 50, 2, 2, (0, 2)),
        _profile("4g.24gb", 24064, 100, 4, 4, (0,)),
    ],
    "A100-SXM4-40GB": _ampere_hopper((4864, 9856, 19968, 40192), (14, 29, 43),
                                     ("1g.5gb", "2g.10gb", "3g.20gb", "7g.40gb")),
    "A100-SXM4-80GB": _ampere_hopper((9728, 19968, 40192, 80896), (14, 29, 43),
                                     ("1g.10gb", "2g.20gb", "3g.40gb", "7g.79gb")),
    "H100-SXM5-80GB": _ampere_hopper((9984, 20096, 40448, 81152), (12, 24, 45),
                                     ("1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb")),
}  # fmt: skip

# Other spellings of the same models (HAMi's allowlist names several per entry).
_ALIASES = {
    "A30": "A30-24GB",
    "A100-40GB-PCIe": "A100-SXM4-40GB",
    "A100-PCIE-40GB": "A100-SXM4-40GB",
    "A100-40GB": "A100-SXM4-40GB",
    "A100-80GB-PCIe": "A100-SXM4-80GB",
    "A100-PCIE-80GB": "A100-SXM4-80GB",
    "A100-80GB": "A100-SXM4-80GB",
    "H100-PCIE-80GB": "H100-SXM5-80GB",
    "H100-80GB": "H100-SXM5-80GB",
    "H100": "H100-SXM5-80GB",
}


def geometry(model: str) -> list[MigProfile] | None:
    """The profile table of ``model`` (with or without the ``NVIDIA-`` prefix), or None
    for a card without MIG. Exact names first, then the longest known name the model
    contains, as HAMi's allowlist matches models by substring."""
    bare = model.removeprefix("NVIDIA-").removeprefix("NVIDIA ")
    for key in (bare, _ALIASES.get(bare)):
        if key and key in GEOMETRIES:
            return [p for p in GEOMETRIES[key]]
    known = sorted([*GEOMETRIES, *_ALIASES], key=len, reverse=True)
    for name in known:
        if name.lower() in bare.lower():
            return list(GEOMETRIES[_ALIASES.get(name, name)])
    return None


def max_instances(profiles: Sequence[MigProfile]) -> int:
    """How many instances the card holds at most at once: the most non-overlapping
    placements any one profile has (7 on an A100), at least 1."""
    best = 1
    for p in profiles:
        taken: list[MigPlacement] = []
        for c in sorted(p.placements, key=lambda x: x.start):
            if not any(overlaps(c, t) for t in taken):
                taken.append(c)
        best = max(best, len(taken))
    return best


def overlaps(a: MigPlacement | MigSlice, b: MigPlacement | MigSlice) -> bool:
    """Whether two half-open slice ranges ``[start, start + size)`` intersect."""
    return a.start < b.start + b.size and b.start < a.start + a.size
