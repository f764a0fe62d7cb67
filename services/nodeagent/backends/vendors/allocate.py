"""A vendor's Allocate answer for one container's grant, as the device plugin sends it.

:func:`vendor_allocation` picks the grant's cards of one family, looks up each card's
registration (index, memory, cores, templates), and asks the family's module; the result
converts to the gRPC server's :class:`ContainerAllocation`. Pure (files a vendor needs on
the host, such as Hygon's vdev config, are returned for the caller to write).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.nodeagent.backends.vendors import FAMILIES, MODULE_OF
from services.nodeagent.backends.vendors.base import Granted, VendorAllocation
from services.nodeagent.deviceplugin.server import ContainerAllocation
from shared.schemas import CardGrant, Device


class VendorAllocateError(ValueError):
    """A grant the family cannot answer (unknown family, a card not registered here)."""


def granted(grant: Sequence[CardGrant], devices: Mapping[str, Device]) -> list[Granted]:
    out: list[Granted] = []
    for g in grant:
        d = devices.get(g.uuid)
        if d is None:
            raise VendorAllocateError(f"card {g.uuid} is not registered on this node")
        template = ""
        if d.templates and g.mem < d.devmem:
            fit = [t for t in d.templates if t.memory_mib >= g.mem]
            template = min(fit, key=lambda t: t.memory_mib).name if fit else ""
        out.append(
            Granted(
                uuid=g.uuid,
                index=d.index,
                mem=g.mem,
                cores=g.cores,
                memory_mib=d.devmem,
                total_cores=d.devcore,
                template=template,
                percent=d.vendor != "AWSNeuron",
            )
        )  # Neuron asks count cores
    return out


def vendor_allocation(
    key: str, grant: Sequence[CardGrant], devices: Mapping[str, Device], **options: Any
) -> VendorAllocation:
    """The family ``key``'s answer for the grant's cards of that family."""
    if key not in FAMILIES:
        raise VendorAllocateError(f"no vendor family {key!r}")
    mine = [g for g in grant if g.vendor == key]
    if not mine:
        raise VendorAllocateError(f"the grant has no {key} card")
    cards = granted(mine, devices)
    mod = MODULE_OF[key]
    if key.startswith("Ascend"):
        options.setdefault("model", mod.MODELS[key])
    result: VendorAllocation = mod.allocate(cards, **options)
    return result


def to_container_allocation(a: VendorAllocation) -> ContainerAllocation:
    return ContainerAllocation(
        envs=dict(a.envs),
        mounts=list(a.mounts),
        devices=list(a.devices),
        annotations=dict(a.annotations),
    )
