"""Hygon DCU: HAMi's ``pkg/device/hygon``, shared like NVIDIA (MiB, percent cores).

The node registers ``hami.io/node-dcu-register`` in the colon form; type filters are
``hygon.com/use-dcutype`` / ``nouse-dcutype``. ``Allocate`` hands out the KFD and DRM
nodes of the card and the driver mounts; the vDCU limits live in a vdev file that the
node agent writes (VENDORS.md §3), so no ``*_VISIBLE_DEVICES`` env is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.devices.base import (
    AllocateContext,
    Allocated,
    Allocation,
    Card,
    Family,
    Mount,
    ResourceNames,
    dev,
)
from shared.devices.nvidia import cards_from_register

CU_TOTAL = 120  # compute units of a DCU, which a vdev CU mask shares out


def vdev_config(d: Allocated, cu_total: int, vdev_id: int) -> str:
    """The vDCU file the driver reads: a CU mask over the granted share of the CUs and
    the memory cap (the fields the plugin writes)."""
    # no share asked (0) limits no CUs, as a core limit of 0 means none elsewhere
    n = cu_total if not 0 < d.cores < 100 else max(1, cu_total * d.cores // 100)
    mask = (1 << n) - 1
    lo, hi = mask & 0xFFFFFFFFFFFFFFFF, mask >> 64
    return (
        f"PciBusId: {d.bus_id}\ncu_mask: 0x{lo:x}\ncu_mask: 0x{hi:x}\ncu_count: {n}\n"
        f"mem: {d.mem} MiB\ndevice_id: {d.index}\nvdev_id: {vdev_id}\npipe_id: 0\nenable: 1\n"
    )


@dataclass(frozen=True)
class Hygon(Family):
    def decode_register(self, value: str) -> list[Card]:
        return cards_from_register(value, self.name)

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """dcu-vgpu-device-plugin's answer: ``/dev/kfd``, ``/dev/mkfd`` and the cards'
        DRM nodes, the driver mounts, and for each partial card a vdev file the driver
        reads (a CU mask and a memory cap), mounted per container; no *_VISIBLE_DEVICES."""
        ctx = ctx or AllocateContext()
        out = Allocation(devices=[dev("/dev/kfd"), dev("/dev/mkfd")])
        for d in devices:
            out.devices += [dev(f"/dev/dri/card{d.index}"), dev(f"/dev/dri/renderD{128 + d.index}")]
        out.mounts += [
            Mount(ctx.driver_path or "/opt/hygondriver", "/opt/hygondriver"),
            Mount("/opt/hyhal", "/opt/hyhal"),
        ]
        partial = [d for d in devices if not d.whole]
        here = f"/etc/vdev/docker/{ctx.pod_uid}_{ctx.container}"
        for k, d in enumerate(partial):
            out.files[f"{here}/vdev{k}.conf"] = vdev_config(d, CU_TOTAL, k)
        if partial:
            out.mounts.append(Mount(here, "/etc/vdev/docker"))
        return out


FAMILY = Hygon(
    name="DCU",
    vendor="hygon",
    resources=ResourceNames("hygon.com/dcunum", "hygon.com/dcumem", "", "hygon.com/dcucores"),
    register_annotation="hami.io/node-dcu-register",
    handshake_annotation="hami.io/node-handshake-dcu",
    to_allocate_annotation="hami.io/dcu-devices-to-allocate",
    allocated_annotation="hami.io/dcu-devices-allocated",
    use_uuid_annotation="hygon.com/use-gpuuuid",
    nouse_uuid_annotation="hygon.com/nouse-gpuuuid",
    use_type_annotation="hygon.com/use-dcutype",
    nouse_type_annotation="hygon.com/nouse-dcutype",
)
