"""Device discovery backends of the node agent: what cards a node physically has.

A backend reports physical cards and the pairwise link scores between them; turning
those into HAMi registrations (split count, scaling, filtering) is
:mod:`services.nodeagent.registration`'s job, the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class PhysicalCard:
    uuid: str
    index: int
    model: str  # e.g. "A100-SXM4-80GB" (no vendor prefix)
    memory_mib: int
    numa: int = 0
    vendor: str = "NVIDIA"
    mode: str = "hami-core"
    healthy: bool = True


@dataclass
class Discovery:
    cards: list[PhysicalCard]
    links: list[list[int]] = field(default_factory=list)  # REFERENCE §3 pair scores


class Backend(Protocol):
    name: str

    def discover(self) -> Discovery: ...
