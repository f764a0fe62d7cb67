"""Iluvatar CoreX: HAMi's ``pkg/device/iluvatar``, one family per chip (commonWord).

Resources ``iluvatar.ai/<chip>-vgpu``, ``iluvatar.ai/<chip>.vMem`` (256 MiB units) and
``iluvatar.ai/<chip>.vCore`` (percent); more than one card means whole cards (the
webhook sets cores to 100 per card). The fit walks the cards last to first, as HAMi's
(its Test_Fit picks the second of two free cards).
``Allocate`` follows the open ix-device-plugin (VENDORS.md §4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    INT32_MAX,
    Admitted,
    AllocateContext,
    Allocated,
    Allocation,
    Card,
    Family,
    RequestError,
    ResourceNames,
    dev,
    quantity,
    whole,
    with_limits,
)
from shared.devices.nvidia import cards_from_register

UNIT_MIB = 256
CHIPS = ("MR-V100", "MR-V50", "BI-V150", "BI-V100")  # HAMi's default device config


@dataclass(frozen=True)
class Iluvatar(Family):
    def memory_mib(self, value: Any) -> int:
        mib = whole(value, self.resources.memory) * UNIT_MIB
        if mib > INT32_MAX:
            # HAMi refuses it rather than wrap Memreq to 0 (a full card would then fit)
            raise RequestError(
                f"{self.resources.memory} of {value!r} x {UNIT_MIB} MiB overflows int32"
            )
        return mib

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        n = whole(quantity(resources, self.resources.count), self.resources.count)
        if n <= 1:
            return Admitted(resources, {})
        # HAMi's webhook: several cards are whole cards; it writes count x 100 cores,
        # which the fit clamps to 100 per card
        out = with_limits(resources)
        out["limits"][self.resources.cores] = n * 100
        return Admitted(out, {})

    def decode_register(self, value: str) -> list[Card]:
        return cards_from_register(value, self.name)

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """ix-device-plugin's answer: ``IX_VISIBLE_DEVICES`` (host minors), the cards as
        ``/dev/iluvatar<k>`` renumbered from 0 in the container, and ``/dev/itrctl``."""
        out = Allocation(envs={"IX_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})
        out.devices = [
            dev(f"/dev/iluvatar{d.index}", f"/dev/iluvatar{k}") for k, d in enumerate(devices)
        ]
        out.devices.append(dev("/dev/itrctl"))
        return out


def family(chip: str) -> Iluvatar:
    return Iluvatar(
        name=chip,
        vendor="iluvatar",
        resources=ResourceNames(
            f"iluvatar.ai/{chip}-vgpu", f"iluvatar.ai/{chip}.vMem", "", f"iluvatar.ai/{chip}.vCore"
        ),
        register_annotation=f"hami.io/node-{chip}-register",
        handshake_annotation=f"hami.io/node-handshake-{chip}",
        to_allocate_annotation=f"hami.io/{chip}-devices-to-allocate",
        allocated_annotation=f"hami.io/{chip}-devices-allocated",
        use_uuid_annotation=f"hami.io/use-{chip}-uuid",
        nouse_uuid_annotation=f"hami.io/no-use-{chip}-uuid",
    )


FAMILIES = tuple(family(c) for c in CHIPS)
