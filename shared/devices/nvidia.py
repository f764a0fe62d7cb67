"""NVIDIA as a registry entry: HAMi's resource and annotation names for its vGPUs.

The placement engine keeps its own vectorised NVIDIA fit (``engine_native``), which is
HAMi's NVIDIA ``Fit`` case for case (tests/placement); this entry gives the registry the
names, the request parsing without configured defaults, and the ``Allocate`` data of
the limiter contract (REFERENCE §6) so that other code can treat NVIDIA as one family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    ResourceNames,
    quantity,
    whole,
)
from shared.hami.annotations import decode_node_devices


def cards_from_register(value: str, vendor: str) -> list[Card]:
    """A register annotation in HAMi's JSON or colon form (the NVIDIA decoder) as cards."""
    return [
        Card(
            id=d.uuid,
            index=d.index,
            type=d.type,
            count=d.count,
            totalmem=d.devmem,
            totalcore=d.devcore,
            numa=d.numa,
            health=d.health,
        )
        for d in decode_node_devices(value, vendor)
    ]


@dataclass(frozen=True)
class Nvidia(Family):
    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        r = self.resources
        raw = quantity(resources, r.count)
        if raw is None:
            return None
        n = whole(raw, r.count)
        if n <= 0:
            return None
        mem = pct = cores = 0
        if (m := quantity(resources, r.memory)) is not None:
            mem = whole(m, r.memory)
        if mem == 0 and (p := quantity(resources, r.memory_percentage)) is not None:
            pct = min(100, whole(p, r.memory_percentage))
        if (c := quantity(resources, r.cores)) is not None:
            cores = whole(c, r.cores)
        if mem == 0 and pct == 0:
            pct = 100
        return Ask(self.name, n, mem, pct, cores)

    def decode_register(self, value: str) -> list[Card]:
        return cards_from_register(value, self.name)

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        env = {"NVIDIA_VISIBLE_DEVICES": ",".join(d.uuid for d in devices)}
        for i, d in enumerate(devices):
            env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{d.mem}m"
        if devices:
            env["CUDA_DEVICE_SM_LIMIT"] = str(devices[0].cores)
        return Allocation(envs=env)


FAMILY = Nvidia(
    name="NVIDIA",
    vendor="nvidia",
    resources=ResourceNames(
        "nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage", "nvidia.com/gpucores"
    ),
    register_annotation="hami.io/node-nvidia-register",
    handshake_annotation="hami.io/node-handshake",
    to_allocate_annotation="hami.io/vgpu-devices-to-allocate",
    allocated_annotation="hami.io/vgpu-devices-allocated",
    use_uuid_annotation="nvidia.com/use-gpuuuid",
    nouse_uuid_annotation="nvidia.com/nouse-gpuuuid",
    use_type_annotation="nvidia.com/use-gputype",
    nouse_type_annotation="nvidia.com/nouse-gputype",
    engine_native=True,
)
