"""Device discovery backends of the node agent: what cards a node physically has.

A backend reports physical cards and the pairwise link scores between them; turning
those into HAMi registrations (split count, scaling, filtering) is
:mod:`services.nodeagent.registration`'s job, the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from shared.schemas import DeviceTemplate, MigProfile


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
    # mode "mig": the profiles the card offers, with NVML's placements (HAMi's migProfiles)
    mig_profiles: tuple[MigProfile, ...] = ()
    # Other vendors (backends/vendors): the type HAMi's plugin registers ("" = NVIDIA's
    # "<vendor>-<model>"), devcore (0 = 100), customInfo and fixed slice sizes.
    type: str = ""
    cores: int = 0
    custom_info: tuple[tuple[str, str | int], ...] = ()
    templates: tuple[DeviceTemplate, ...] = ()


@dataclass
class Discovery:
    cards: list[PhysicalCard]
    links: list[list[int]] = field(default_factory=list)  # REFERENCE §3 pair scores


class Backend(Protocol):
    name: str

    def discover(self) -> Discovery: ...


class MigError(RuntimeError):
    """A MIG instance could not be created or destroyed as asked."""


@dataclass(frozen=True)
class MigInstance:
    """A GPU instance + compute instance the node agent created for one grant."""

    gpu_uuid: str
    profile: str
    start: int
    size: int
    uuid: str  # "MIG-..."
    gpu_instance: int
    compute_instance: int


@runtime_checkable
class MigBackend(Protocol):
    """What a backend does for cards in MIG mode: realise exactly the profile and
    the engine chose (never another one), and destroy it on release."""

    def create_mig(self, gpu_uuid: str, profile: str, start: int, size: int) -> MigInstance: ...

    def destroy_mig(self, inst: MigInstance) -> None: ...

    def mig_instances(self, gpu_uuid: str) -> list[MigInstance]: ...
