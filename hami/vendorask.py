"""``hami submit --vendor``: another vendor's ask from the submit flags.

A direct client asks as a pod's container would: the flags become that family's
resources (``--gpus`` its count, ``--mem`` its memory, ``--mem-percent`` its memory
percentage, ``--cores`` its cores) and the family's own parsing applies HAMi's rules to
them (Ascend's templates, Cambricon's 256 MiB units, Moore Threads' fixed sizes, ...),
so a submit asks exactly what the same pod would. Pure: no I/O.
"""

from __future__ import annotations

from shared.devices.base import Family, RequestError
from shared.devices.registry import REGISTRY, to_device_ask
from shared.schemas import DeviceAsk


def family_named(name: str) -> Family:
    """The family ``name`` means: its HAMi device type (any case) or one of its resource
    names (``huawei.com/Ascend910B3``); ValueError listing the known types otherwise."""
    fam = REGISTRY.for_resource(name)
    if fam is not None:
        return fam
    for f in REGISTRY.families:
        if f.name.lower() == name.strip().lower():
            return f
    known = ", ".join(f.name for f in REGISTRY.families)
    raise ValueError(
        f"--vendor {name!r}: no such device family (one of {known}, or a resource name)"
    )


def vendor_ask(
    name: str, gpus: int, mem: int | None, mem_percent: int | None, cores: int | None
) -> DeviceAsk:
    """The DeviceAsk a container with these limits of family ``name`` makes; ValueError
    naming the flag a family cannot take or the rule the ask breaks."""
    fam = family_named(name)
    r = fam.resources
    limits: dict[str, str] = {r.count: str(gpus)}
    for flag, value, resource in (
        ("--mem", mem, r.memory),
        ("--mem-percent", mem_percent, r.memory_percentage),
        ("--cores", cores, r.cores),
    ):
        if value is None:
            continue
        if not resource:
            raise ValueError(
                f"{fam.name} has no resource for {flag} (its resources: {', '.join(r.all())})"
            )
        limits[resource] = str(value)
    try:
        ask = fam.parse({"limits": limits}, {})
    except RequestError as exc:
        raise ValueError(f"{fam.name}: {exc}") from None
    if ask is None:
        raise ValueError(f"{fam.name}: the flags ask for no device")
    return to_device_ask(ask)
