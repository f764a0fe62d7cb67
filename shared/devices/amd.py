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
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    Mount,
    ResourceNames,
    dev,
    quantity,
    whole,
)

HOOK = "/usr/local/vgpu/libamvgpu.so"


def cu_mask(local: int, d: Allocated) -> str:
    """``HSA_CU_MASK`` entry of one card: its container-local index and its CUs (the
    grant's cores are CUs; none or all of them: every CU of the card)."""
    total = d.card_cores or d.cores
    n = d.cores if 0 < d.cores < total else total
    return f"{local}:0-{max(n, 1) - 1}"


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

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """amd-device-plugin's answer: ``/dev/kfd`` and the cards' DRM nodes; the cards'
        ROCr IDs in ``ROCR_VISIBLE_DEVICES`` and their container-local indexes in
        ``HIP_VISIBLE_DEVICES``; ``HSA_CU_MASK`` with each card's granted CUs (all of a
        whole card); a partial grant adds the LD_AUDIT memory limiter with the first
        card's memory. The limiter library is always mounted."""
        ctx = ctx or AllocateContext()
        out = Allocation(devices=[dev("/dev/kfd")])
        for d in devices:
            out.devices += [dev(f"/dev/dri/card{d.index}"), dev(f"/dev/dri/renderD{128 + d.index}")]
        if devices:
            out.envs["HSA_CU_MASK"] = ";".join(cu_mask(i, d) for i, d in enumerate(devices))
            out.envs["ROCR_VISIBLE_DEVICES"] = ",".join(d.local_id or d.uuid for d in devices)
            out.envs["HIP_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(devices)))
            if not all(d.whole for d in devices):
                out.envs["HIP_DEVICE_MEMORY_LIMIT"] = f"{devices[0].mem}m"
                out.envs["LD_AUDIT"] = HOOK
        out.mounts.append(Mount(f"{ctx.hook_path or '/usr/local'}/vgpu/libamvgpu.so", HOOK))
        return out


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
