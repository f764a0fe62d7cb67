"""AMD Instinct GPUs (MI300X, MI250X, MI210): HAMi's amd-device-plugin, as data and pure functions.

HAMi device type ``AMD`` (``AMDGPU`` in the shared registry, the key used here); resources ``amd.com/gpu``, ``amd.com/gpumem``,
``amd.com/gpucores`` (cores asked in percent of the card's CUs). The plugin registers
``hami.io/node-amd-register`` (DeviceInfo JSON: ID = amdsmi UUID, devcore = CU count,
type = product name, ``deviceVendor: "amd"``, customInfo ``pciBDF``).

Discovery: the ``amdsmi`` Python binding when it is installed (imported only then), else
``amd-smi static --json`` (a bare list on ROCm 6.3, ``{"gpu_data": [...]}`` later) and
``amd-smi list --json`` for the UUIDs.
"""

from __future__ import annotations

import json
from typing import Any

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    hami_names,
)

MODELS = {
    "MI300X": Model(
        "MI300X", "AMD Instinct MI300X", 196608, 304, aliases=("AMD-MI300X",), topology="mesh"
    ),
    "MI250X": Model("MI250X", "AMD Instinct MI250X", 65536, 110, topology="mesh"),
    "MI210": Model("MI210", "AMD Instinct MI210", 65536, 104),
}
FAMILY = Family(
    **hami_names("AMDGPU"),
    register="json",
    device_vendor="amd",
    models=tuple(MODELS.values()),
    dev_globs=("kfd",),
    pci_vendors=("0x1002",),
    extra={
        "to_allocate": "hami.io/amd-devices-to-allocate",
        "cu_allocated": "hami.io/amd-cu-allocated",
    },
)


def _num(v: Any) -> int | None:
    """amd-smi writes numbers, ``{"value", "unit"}`` objects or ``"N/A"``."""
    if isinstance(v, dict):
        val, unit = v.get("value"), str(v.get("unit", "MB")).upper()
        n = _num(val)
        if n is None:
            return None
        return n * 1024 if unit in ("GB", "GIB") else n >> 20 if unit == "B" else n
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def _model_name(market: str) -> str:
    for m in MODELS.values():
        if m.name.upper() in market.upper():
            return m.name
    return market


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CommandError(f"amd-smi {what}: not JSON: {exc}") from None


def discover(run: Runner) -> list[PhysicalCard]:
    static = _json(
        run(["amd-smi", "static", "--asic", "--bus", "--vram", "--numa", "--json"]), "static"
    )
    if isinstance(static, dict):
        static = static.get("gpu_data", [])
    if not isinstance(static, list):
        raise CommandError("amd-smi static: expected a list of GPUs")
    listed = _json(run(["amd-smi", "list", "--json"]), "list")
    if isinstance(listed, dict):
        listed = listed.get("gpu_data", [])
    uuids = {
        int(g["gpu"]): str(g.get("uuid", "")) for g in listed if isinstance(g, dict) and "gpu" in g
    }
    cards: list[PhysicalCard] = []
    for g in static:
        idx = int(g.get("gpu", len(cards)))
        asic, vram = g.get("asic") or {}, g.get("vram") or {}
        mem = _num(vram.get("size"))
        if mem is None:
            raise CommandError(f"amd-smi static: GPU {idx} has no vram size")
        market = str(asic.get("market_name", "AMD GPU"))
        cus = _num(asic.get("num_compute_units")) or 0
        numa = _num((g.get("numa") or {}).get("node"))
        bdf = str((g.get("bus") or {}).get("bdf", ""))
        cards.append(
            PhysicalCard(
                uuid=uuids.get(idx) or f"AMD-{bdf or idx}",
                index=idx,
                model=_model_name(market),
                memory_mib=mem,
                numa=max(0, numa or 0),
                vendor=FAMILY.key,
                type=market,
                cores=cus,
                custom_info=(("pciBDF", bdf),) if bdf else (),
            )
        )
    return cards


def discover_amdsmi(amdsmi: Any) -> list[PhysicalCard]:
    """The same cards through the ``amdsmi`` module (passed in: the caller imports it
    only when it is installed)."""
    amdsmi.amdsmi_init()
    try:
        cards: list[PhysicalCard] = []
        for i, h in enumerate(amdsmi.amdsmi_get_processor_handles()):
            asic = amdsmi.amdsmi_get_gpu_asic_info(h)
            vram = amdsmi.amdsmi_get_gpu_vram_usage(h)
            bdf = str(amdsmi.amdsmi_get_gpu_device_bdf(h))
            market = str(asic.get("market_name", "AMD GPU"))
            cards.append(
                PhysicalCard(
                    uuid=str(amdsmi.amdsmi_get_gpu_device_uuid(h)),
                    index=i,
                    model=_model_name(market),
                    memory_mib=int(vram["vram_total"]),  # MB in amdsmi
                    numa=max(0, int(amdsmi.amdsmi_topo_get_numa_node_number(h))),
                    vendor=FAMILY.key,
                    type=market,
                    cores=int(asic.get("num_compute_units", 0)),
                    custom_info=(("pciBDF", bdf),),
                )
            )
        return cards
    finally:
        amdsmi.amdsmi_shut_down()
