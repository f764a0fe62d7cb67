"""A vendor's Allocate answer for one container's grant, as the device plugin sends it.

The answer itself is the device-family registry's (:func:`shared.devices.registry.
allocate_response`, one per vendor, shared with everything else that needs it); this
module only feeds it what the node knows: :func:`allocated` looks up each granted card's
registration (index, memory, cores, the template that holds a slice, PCI bus ID) and
:func:`to_container_allocation` converts the answer to the gRPC server's
:class:`ContainerAllocation`. Pure (files a vendor needs on the host, such as Hygon's
vdev config, are returned for the caller to write).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.nodeagent.backends.vendors import FAMILIES
from services.nodeagent.deviceplugin.server import ContainerAllocation
from shared.devices.base import AllocateContext, Allocated, Allocation
from shared.devices.registry import allocate_response
from shared.schemas import CardGrant, Device


class VendorAllocateError(ValueError):
    """A grant the family cannot answer (unknown family, a card not registered here)."""


def _template(d: Device, mem: int) -> str:
    """The smallest of the card's fixed slices holding ``mem`` ("" for a whole card)."""
    if not d.templates or mem >= d.devmem:
        return ""
    fit = [t for t in d.templates if t.memory_mib >= mem]
    return min(fit, key=lambda t: t.memory_mib).name if fit else ""


def allocated(grant: Sequence[CardGrant], devices: Mapping[str, Device]) -> list[Allocated]:
    """The grant's cards as the family's ``allocate`` reads them, in grant order."""
    out: list[Allocated] = []
    for g in grant:
        d = devices.get(g.uuid)
        if d is None:
            raise VendorAllocateError(f"card {g.uuid} is not registered on this node")
        out.append(
            Allocated(
                uuid=g.uuid,
                index=d.index,
                mem=g.mem,
                cores=g.cores,  # in the card's own unit, as placement booked it
                template=_template(d, g.mem),
                card_mem=d.devmem,
                card_cores=d.devcore,
                bus_id=str(d.custom_info.get("pciBDF", "")),
            )
        )
    return out


def vendor_allocation(
    key: str,
    grant: Sequence[CardGrant],
    devices: Mapping[str, Device],
    ctx: AllocateContext | None = None,
) -> Allocation:
    """The family ``key``'s answer for the grant's cards of that family."""
    if key not in FAMILIES:
        raise VendorAllocateError(f"no vendor family {key!r}")
    mine = [g for g in grant if g.vendor == key]
    if not mine:
        raise VendorAllocateError(f"the grant has no {key} card")
    return allocate_response(key, allocated(mine, devices), ctx)


def to_container_allocation(a: Allocation) -> ContainerAllocation:
    return ContainerAllocation(
        envs=dict(a.envs),
        mounts=[(m.container_path, m.host_path, m.read_only) for m in a.mounts],
        devices=[(d.container_path, d.host_path, d.permissions) for d in a.devices],
        annotations=dict(a.annotations),
    )
