"""MIG facts shared by the node agent and the placement engine.

A MIG-capable card is cut into memory slices (8 on A100/H100-class cards); a GPU
instance of a profile occupies the half-open range ``[start, start + size)`` of them, at
one of the starts NVML allows for that profile. :data:`GEOMETRIES` are the profile
tables of the models the simulator offers: the whole-slice GPU-instance profiles NVML
reports for each, with their memory (``nvidia-smi mig -lgip``, MiB) and the compute share
as a percentage of the whole-card profile's SMs. Which of them a card registers is the
``migProfileAllowlist``'s choice (:func:`allowed_profiles`, HAMi v2.10 chart's
:data:`DEFAULT_ALLOWLIST` unless configured). A real card's table comes from NVML (services/nodeagent/backends/nvml.py).
:func:`encode_mig_allocations` / :func:`decode_mig_allocations` are the codec of HAMi's
``hami.io/vgpu-mig-allocations`` pod annotation. Pure data and small functions; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from shared.schemas import ContainerGrant, MigPlacement, MigProfile, MigSlice

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
    mem: tuple[int, int, int, int, int], core: tuple[int, int, int, int], names: tuple[str, ...]
) -> list[MigProfile]:
    """The 8-memory-slice layout of A100/H100-class cards: 1g at any of 7 starts, 2g at
    0/2/4, 3g at 0/4 and 4g at 0 (each spanning 4 memory slices), 7g the whole card."""
    g1, g2, g3, g4, g7 = names
    return [
        _profile(g1, mem[0], core[0], 1, 1, range(7)),
        _profile(g2, mem[1], core[1], 2, 2, (0, 2, 4)),
        _profile(g3, mem[2], core[2], 3, 4, (0, 4)),
        _profile(g4, mem[3], core[3], 4, 4, (0,)),
        _profile(g7, mem[4], 100, 7, 8, (0,)),
    ]


GEOMETRIES: dict[str, list[MigProfile]] = {
    "A30-24GB": [
        _profile("1g.6gb", 5952, 25, 1, 1, range(4)),
        _profile("2g.12gb", 12032, 50, 2, 2, (0, 2)),
        _profile("4g.24gb", 24064, 100, 4, 4, (0,)),
    ],
    "A100-SXM4-40GB": _ampere_hopper((4864, 9856, 19968, 19968, 40192), (14, 29, 43, 57),
                                     ("1g.5gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb")),
    "A100-SXM4-80GB": _ampere_hopper((9728, 19968, 40192, 40192, 80896), (14, 29, 43, 57),
                                     ("1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.79gb")),
    "H100-SXM5-80GB": _ampere_hopper((9984, 20096, 40448, 40448, 81152), (12, 24, 45, 48),
                                     ("1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")),
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


# HAMi v2.10 chart's default ``migProfileAllowlist``: (models, profiles) per entry.
DEFAULT_ALLOWLIST: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("A30",), ("1g.6gb", "2g.12gb", "4g.24gb")),
    (("A100-SXM4-40GB", "A100-40GB-PCIe", "A100-PCIE-40GB"), ("1g.5gb", "2g.10gb", "3g.20gb", "7g.40gb")),
    (("A100-SXM4-80GB", "A100-80GB-PCIe", "A100-PCIE-80GB"), ("1g.10gb", "2g.20gb", "3g.40gb", "7g.79gb")),
    (("H100-PCIE-80GB", "H100-SXM5-80GB"), ("1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb")),
    (("H100-PCIE-94GB", "H100-SXM5-94GB"), ("1g.12gb", "2g.24gb", "3g.47gb", "7g.94gb")),
    (("H20", "H100 on GH200"), ("1g.12gb", "2g.24gb", "3g.48gb", "7g.96gb")),
    (("H200 NVL", "H200-SXM5"), ("1g.18gb", "2g.35gb", "3g.71gb", "7g.141gb")),
    (("B200",), ("1g.23gb", "2g.45gb", "3g.90gb", "7g.180gb")),
    (("RTX PRO 6000 Blackwell Server Edition",), ("1g.24gb", "2g.48gb", "4g.96gb")),
)


def allowed_profiles(
    model: str, allowlist: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None
) -> set[str]:
    """The profiles a card of ``model`` may offer: those of the allowlist entry naming
    the longest model the card's model contains (spaces and dashes alike, as NVML names
    and registered types differ in them), so an ``H200-SXM5`` is not taken for an
    ``H20``; none when no entry names it."""
    norm = model.replace(" ", "-")
    best: tuple[int, Sequence[str]] | None = None
    for models, profiles in DEFAULT_ALLOWLIST if allowlist is None else allowlist:
        for m in models:
            key = m.replace(" ", "-")
            if key and key in norm and (best is None or len(key) > best[0]):
                best = (len(key), profiles)
    return set(best[1]) if best is not None else set()


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


# ------------------------------------------------------- hami.io/vgpu-mig-allocations

MIG_ALLOCATIONS = "hami.io/vgpu-mig-allocations"


class MigAllocationError(ValueError):
    """A ``hami.io/vgpu-mig-allocations`` value HAMi would refuse (HAMi's texts)."""


def encode_mig_allocations(containers: Sequence[ContainerGrant], vendor: str = "NVIDIA") -> str | None:
    """The pod annotation HAMi writes with its MIG reservations, byte for byte as its
    ``EncodeMigAllocations`` (Go's ``json.Marshal``: struct field order, compact): one
    entry per MIG grant, ``containerIndex`` in pod order, ``deviceIndex`` among the
    container's devices of ``vendor``; the runtime identity (``migUUID``,
    ``gpuInstanceID``, ``computeInstanceID``) once known. None when nothing is MIG."""
    out: list[dict[str, Any]] = []
    for ci, c in enumerate(containers):
        for di, d in enumerate(x for x in c.devices if x.vendor == vendor):
            if d.mig is None or not d.mig.profile or d.mig.size == 0:
                continue
            e: dict[str, Any] = {
                "containerIndex": ci,
                "deviceIndex": di,
                "gpuUUID": d.uuid,
                "profile": d.mig.profile,
                "placement": {"start": d.mig.start, "size": d.mig.size},
            }
            if d.mig.uuid:
                e["migUUID"] = d.mig.uuid
            if d.mig.gpu_instance >= 0:
                e["gpuInstanceID"] = d.mig.gpu_instance
            if d.mig.compute_instance >= 0:
                e["computeInstanceID"] = d.mig.compute_instance
            out.append(e)
    if not out:
        return None
    return json.dumps(out, separators=(",", ":"))


def decode_mig_allocations(raw: str) -> list[tuple[int, int, str, MigSlice]]:
    """HAMi's ``DecodeMigAllocations``: (container index, device index, GPU UUID, slice)
    per entry, refusing what HAMi refuses with its error texts."""
    if raw == "":
        return []
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise MigAllocationError(str(exc)) from exc
    if items is None:
        return []
    if not isinstance(items, list):
        raise MigAllocationError("json: cannot unmarshal into Go value of type []nvidia.MigAllocation")
    out: list[tuple[int, int, str, MigSlice]] = []
    seen: set[tuple[int, int]] = set()
    for i, e in enumerate(items):
        e = e if isinstance(e, dict) else {}
        raw_pl = e.get("placement")
        pl: dict[str, Any] = raw_pl if isinstance(raw_pl, dict) else {}
        ci, di = e.get("containerIndex", 0), e.get("deviceIndex", 0)
        gpu, prof, size = e.get("gpuUUID", ""), e.get("profile", ""), pl.get("size", 0)
        if not isinstance(ci, int) or not isinstance(di, int) or ci < 0 or di < 0 or not gpu or not prof or not size:
            raise MigAllocationError(f"MIG allocation {i} is incomplete")
        runtime = sum(1 for k in ("gpuInstanceID", "computeInstanceID") if e.get(k) is not None)
        runtime += 1 if e.get("migUUID") else 0
        if runtime not in (0, 3):
            raise MigAllocationError(f"MIG allocation {i} has partial runtime identity")
        if (ci, di) in seen:
            raise MigAllocationError(f"duplicate MIG allocation for container {ci} device {di}")
        seen.add((ci, di))
        out.append((ci, di, str(gpu), MigSlice(
            profile=str(prof), start=int(pl.get("start", 0)), size=int(size), uuid=str(e.get("migUUID") or ""),
            gpu_instance=int(e.get("gpuInstanceID", -1) if e.get("gpuInstanceID") is not None else -1),
            compute_instance=int(e.get("computeInstanceID", -1) if e.get("computeInstanceID") is not None else -1),
        )))  # fmt: skip
    return out
