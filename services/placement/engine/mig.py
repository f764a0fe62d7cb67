"""Dynamic MIG: which profile and which memory slices a request gets on a card in MIG mode.

HAMi v2.10 places MIG instances dynamically. A card registered with ``mode: mig`` carries
``migProfiles``: for each profile the node allows, its memory (MiB), compute share (% of
the card), slice count and the placements NVML accepts for it (``start``/``size`` in
memory slices). A placement occupies the half-open range ``[start, start + size)``; two
instances may not overlap. The fit follows HAMi's ``selectMigCandidate``:

* profiles are tried smallest first (memory, then slice count; the node's order breaks
  ties), and the first whose memory covers the ask and which still has a free placement
  wins -- the ask's cores play no part in the choice;
* a profile's placements are tried from the highest start down for ``1g.*`` and ``3g.*``
  profiles and from the lowest up for the others, so small instances pack from the top
  of the card and leave the low slices free for the large profiles;
* the grant books the profile's memory and compute share, not the ask's.

A card whose free memory would hold the ask but whose free slices do not line up with
any placement of a large-enough profile fails with :data:`REASON`
(``CardMigTopologyInfeasible``) in HAMi's reason vocabulary.

Besides the fit, :func:`instances` tells which instances a card's reservations hold.
The profile tables of the models the simulator offers are in :mod:`shared.hami.mig`.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.hami.mig import MIG_MODE, overlaps
from shared.schemas import Device, LedgerAlloc, MigPlacement, MigProfile, MigSlice

__all__ = [
    "MIG_MODE",
    "NO_LIMIT",
    "REASON",
    "Choice",
    "PodMig",
    "can_place",
    "capacity",
    "choose",
    "fits",
    "instances",
    "mig_request",
    "overlaps",
]

REASON = "CardMigTopologyInfeasible"


# ------------------------------------------------------------------------------- fit


def _high_first(profile: str) -> bool:
    return profile.startswith(("1g.", "3g."))


def placement_order(profile: MigProfile) -> list[MigPlacement]:
    """The order HAMi tries a profile's placements in (stable for equal starts)."""
    if _high_first(profile.name):
        return sorted(profile.placements, key=lambda p: -p.start)
    return sorted(profile.placements, key=lambda p: p.start)


def profile_order(profiles: Sequence[MigProfile]) -> list[MigProfile]:
    """Smallest first: by memory, then slice count; the registered order breaks ties."""
    return sorted(profiles, key=lambda p: (p.memory_mb, p.slice_count))


def free_placement(
    profile: MigProfile, occupied: Sequence[MigPlacement | MigSlice]
) -> MigPlacement | None:
    """The first placement of ``profile`` (in :func:`placement_order`) that overlaps
    nothing in ``occupied``, or None."""
    for cand in placement_order(profile):
        if not any(overlaps(cand, o) for o in occupied):
            return cand
    return None


@dataclass(frozen=True, slots=True)
class Choice:
    """A profile and placement for one ask: what the grant books and records."""

    profile: MigProfile
    placement: MigPlacement

    def slice(self) -> MigSlice:
        return MigSlice(
            profile=self.profile.name, start=self.placement.start, size=self.placement.size
        )


def choose(
    profiles: Sequence[MigProfile], occupied: Sequence[MigPlacement | MigSlice], memory: int
) -> Choice | None:
    """HAMi's ``selectMigCandidate``: the smallest profile holding ``memory`` MiB that
    still has a free placement, with that placement; None if there is none."""
    for prof in profile_order(profiles):
        if prof.memory_mb < memory:
            continue
        got = free_placement(prof, occupied)
        if got is not None:
            return Choice(prof, got)
    return None


def mig_request(vendor: str, vgpu_mode: str | None, modes: Iterable[str]) -> bool:
    """HAMi's ``isMIGRequest``: an NVIDIA ask, of a pod whose ``nvidia.com/vgpu-mode``
    (when set) names ``mig``, on a node with a card in MIG mode (``modes``: the node's
    NVIDIA cards' modes). Such an ask may take more instances than the node has cards,
    so HAMi skips its ``NodeInsufficientDevice`` check for it."""
    if vendor != "NVIDIA" or (vgpu_mode is not None and MIG_MODE not in vgpu_mode):
        return False
    return any(md == MIG_MODE for md in modes)


NO_LIMIT = 2**62  # the capacity of a card outside MIG mode: no MIG constraint


def capacity(profiles: Sequence[MigProfile], occupied: Sequence[MigPlacement | MigSlice]) -> int:
    """The largest ask (MiB) one more instance could take: the memory of the largest
    profile that still has a free placement, -1 when none has. An ask fits the card's
    MIG rule exactly when it is at most this (what the vectorised stage checks)."""
    best = -1
    for prof in profiles:
        if prof.memory_mb > best and free_placement(prof, occupied) is not None:
            best = prof.memory_mb
    return best


def fits(
    profiles: Sequence[MigProfile],
    occupied: Sequence[MigPlacement | MigSlice],
    earlier: Iterable[int],
    memory: int,
) -> bool:
    """HAMi's MIG ``CustomFilterRule``: after placing, in order, the asks of ``earlier``
    (memory of each, already chosen for the same pod on this card), is there a profile
    and a placement left for ``memory``?"""
    taken: list[MigPlacement | MigSlice] = list(occupied)
    for mem in earlier:
        got = choose(profiles, taken, mem)
        if got is None:
            return False
        taken.append(got.placement)
    return choose(profiles, taken, memory) is not None


def can_place(
    profiles: Sequence[MigProfile],
    occupied: Sequence[MigPlacement | MigSlice],
    names: Sequence[str],
) -> bool:
    """Whether every profile named in ``names`` gets a placement, none overlapping each
    other or ``occupied`` (a backtracking search, as HAMi's ``canPlaceMigProfiles``):
    the profiles with the fewest placements, then the widest, are placed first."""
    by_name = {p.name: p for p in profiles}
    if any(n not in by_name for n in names):
        return False

    def rank(n: str) -> tuple[int, int]:
        pl = by_name[n].placements
        return (len(pl), -(pl[0].size if pl else 0))

    order = sorted(names, key=rank)
    used: list[MigPlacement | MigSlice] = list(occupied)

    def place(k: int) -> bool:
        if k == len(order):
            return True
        for cand in placement_order(by_name[order[k]]):
            if any(overlaps(cand, u) for u in used):
                continue
            used.append(cand)
            if place(k + 1):
                return True
            used.pop()
        return False

    return place(0)


# ----------------------------------------------------------------------------- usage


def instances(allocs: Iterable[LedgerAlloc], uuid: str) -> list[tuple[str, MigSlice]]:
    """The MIG instances reservations hold on card ``uuid``: (allocation uid, slice),
    every container's, init containers included (their instances exist while the pod
    runs, so nothing may overlap them)."""
    out: list[tuple[str, MigSlice]] = []
    for a in allocs:
        for c in a.containers:
            for d in c.devices:
                if d.uuid == uuid and d.mig is not None:
                    out.append((a.uid, d.mig))
    return out


class PodMig:
    """One decision's view of a node's MIG cards: what the node's reservations occupy and
    what the pod being placed has taken so far (its instances must not overlap either).

    ``devices`` are the node's cards by position (the exact stage's indexes). :meth:`rule`
    is the fit's ``custom`` check, :meth:`take` books a picked card's instance.
    """

    def __init__(self, allocs: Iterable[LedgerAlloc], devices: Sequence[Device]) -> None:
        self._allocs = list(allocs)
        self._devices = devices
        self._occupied: dict[str, list[MigSlice]] = {}
        self._mine: dict[str, list[MigSlice]] = {}

    @staticmethod
    def needed(devices: Sequence[Device]) -> bool:
        """Whether a node has a card in MIG mode (else the fit needs no rule)."""
        return any(d.mode == MIG_MODE for d in devices)

    def occupied(self, uuid: str) -> list[MigSlice]:
        got = self._occupied.get(uuid)
        if got is None:
            got = self._occupied[uuid] = [s for _, s in instances(self._allocs, uuid)]
        return got + self._mine.get(uuid, [])

    def rule(self, pos: int, memory: int, picked: Sequence[int], mems: Sequence[int]) -> str | None:
        """HAMi's MIG ``CustomFilterRule`` for card ``pos``: None when a profile and a free
        placement hold ``memory`` after this ask's earlier picks on the card, else
        :data:`REASON`. Cards not in MIG mode pass."""
        d = self._devices[pos]
        if d.mode != MIG_MODE:
            return None
        earlier = [m for q, m in zip(picked, mems, strict=True) if q == pos]
        return None if fits(d.mig_profiles, self.occupied(d.uuid), earlier, memory) else REASON

    def take(self, pos: int, memory: int) -> Choice | None:
        """Book the instance for ``memory`` on card ``pos`` (None: not a MIG card, or no
        room) and remember it for the rest of the pod."""
        d = self._devices[pos]
        if d.mode != MIG_MODE:
            return None
        got = choose(d.mig_profiles, self.occupied(d.uuid), memory)
        if got is not None:
            self._mine.setdefault(d.uuid, []).append(got.slice())
        return got
