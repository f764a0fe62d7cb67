"""Biren: HAMi's ``pkg/device/biren`` (v2.10): whole cards by count only.

``birentech.com/gpu: N`` asks for N cards; there is no memory or core resource, so the
fit checks type, UUID, slots and the mutex policy only. The node registers
``hami.io/node-biren-register`` (HAMi's ``DeviceInfo`` JSON); HAMi forces ``devcore`` to
100 for its scores.
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
    dev,
    quantity,
    whole,
)


@dataclass(frozen=True)
class Biren(Family):
    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        raw = quantity(resources, self.resources.count)
        if raw is None:
            return None
        n = whole(raw, self.resources.count)
        return Ask(self.name, n, 0, 100, 0, whole=True) if n > 0 else None

    def decode_register(self, value: str) -> list[Card]:
        cards = super().decode_register(value)
        for c in cards:
            c.totalcore = 100
        return cards

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """biren-device-plugin's answer (runc): ``/dev/biren/<card ID>`` of each card and
        ``BR_PHY_CARDS`` listing the card IDs."""
        return Allocation(
            envs={"BR_PHY_CARDS": ",".join(d.uuid for d in devices)},
            devices=[dev(f"/dev/biren/{d.uuid}") for d in devices],
        )


FAMILY = Biren(
    name="Biren",
    vendor="biren",
    resources=ResourceNames("birentech.com/gpu"),
    register_annotation="hami.io/node-biren-register",
    handshake_annotation="hami.io/node-handshake-biren",
    to_allocate_annotation="hami.io/Biren-devices-to-allocate",
    allocated_annotation="hami.io/Biren-devices-allocated",
    use_uuid_annotation="birentech.com/use-gpuuuid",
    nouse_uuid_annotation="birentech.com/nouse-gpuuuid",
    shares_memory=False,
)
