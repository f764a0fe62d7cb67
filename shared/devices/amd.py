"""AMD Instinct/Radeon: HAMi's ``pkg/device/amd`` with Project-HAMi's amd-device-plugin.

``amd.com/gpu``, ``amd.com/gpumem`` (MiB), ``amd.com/gpumem-percentage`` and
``amd.com/gpucores`` (a percentage of the card's compute units). The node registers
``hami.io/node-amd-register`` with ``devcore`` = the card's CU count, so the fit books
``devcore * cores / 100`` CUs; no cores and no memory means the whole card. ``Allocate``
follows the plugin: KFD and DRM nodes, ``ROCR_VISIBLE_DEVICES``, per-card
``HIP_DEVICE_MEMORY_LIMIT_<i>`` and the ``libamvgpu.so`` audit hook for slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    Allocated,
    AllocateResponse,
    Ask,
    Card,
    DeviceSpec,
    Family,
    Mount,
    ResourceNames,
    quantity,
    whole,
)

HOOK = "/usr/local/vgpu/libamvgpu.so"


@dataclass(frozen=True)
class Amd(Family):
    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        r = self.resources
        raw = quantity(resources, r.count)
        if raw is None:
            return None
        n = whole(raw, r.count)
        if n <= 0:
            return None
        mem = pct = 0
        if (m := quantity(resources, r.memory)) is not None:
            mem = whole(m, r.memory)
        if mem == 0 and (p := quantity(resources, r.memory_percentage)) is not None:
            pct = max(1, min(100, whole(p, r.memory_percentage)))
        cores = 0
        if (c := quantity(resources, r.cores)) is not None:
            cores = min(100, whole(c, r.cores))
        if mem == 0 and pct == 0:
            pct = 100
            if cores == 0:
                cores = 100  # a bare count is the whole card
        return Ask(self.name, n, mem, pct, cores)

    def cores_on(self, card: Card, cores: int) -> int:
        # the ask is a percentage, the card counts compute units
        return card.totalcore * cores // 100

    def exclusive(self, card: Card, cores: int) -> bool:
        return cores == 100

    def allocate(self, devices: Sequence[Allocated]) -> AllocateResponse:
        specs = [DeviceSpec("/dev/kfd", "/dev/kfd")]
        for d in devices:
            specs.append(DeviceSpec(f"/dev/dri/card{d.index}", f"/dev/dri/card{d.index}"))
            specs.append(
                DeviceSpec(f"/dev/dri/renderD{128 + d.index}", f"/dev/dri/renderD{128 + d.index}")
            )
        env = {"ROCR_VISIBLE_DEVICES": ",".join(d.uuid for d in devices)}
        mounts: list[Mount] = []
        sliced = False
        for i, d in enumerate(devices):
            if d.mem:
                env[f"HIP_DEVICE_MEMORY_LIMIT_{i}"] = f"{d.mem}m"
                sliced = True
        if sliced:
            env["LD_AUDIT"] = HOOK
            mounts.append(Mount("/usr/local/vgpu", "/usr/local/vgpu"))
        return env, specs, mounts


FAMILY = Amd(
    name="AMDGPU",
    vendor="amd",
    resources=ResourceNames(
        "amd.com/gpu", "amd.com/gpumem", "amd.com/gpumem-percentage", "amd.com/gpucores"
    ),
    register_annotation="hami.io/node-amd-register",
    handshake_annotation="hami.io/node-handshake-amd",
    to_allocate_annotation="hami.io/amd-devices-to-allocate",
    allocated_annotation="hami.io/amd-devices-allocated",
    use_uuid_annotation="amd.com/use-gpu-uuid",
    nouse_uuid_annotation="amd.com/nouse-gpu-uuid",
    use_type_annotation="amd.com/use-gputype",
    nouse_type_annotation="amd.com/nouse-gputype",
)
