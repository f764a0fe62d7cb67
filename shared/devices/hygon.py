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
    Allocated,
    AllocateResponse,
    Card,
    DeviceSpec,
    Family,
    Mount,
    ResourceNames,
)
from shared.devices.nvidia import cards_from_register


@dataclass(frozen=True)
class Hygon(Family):
    def decode_register(self, value: str) -> list[Card]:
        return cards_from_register(value, self.name)

    def allocate(self, devices: Sequence[Allocated]) -> AllocateResponse:
        specs = [DeviceSpec("/dev/kfd", "/dev/kfd"), DeviceSpec("/dev/mkfd", "/dev/mkfd")]
        for d in devices:
            specs.append(DeviceSpec(f"/dev/dri/card{d.index}", f"/dev/dri/card{d.index}"))
            specs.append(
                DeviceSpec(f"/dev/dri/renderD{128 + d.index}", f"/dev/dri/renderD{128 + d.index}")
            )
        mounts = [Mount("/opt/hygondriver", "/opt/hygondriver"), Mount("/opt/hyhal", "/opt/hyhal")]
        return {}, specs, mounts


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
