"""MetaX GPUs (C500): HAMi's metax sGPU device with the MetaX GPU Operator.

HAMi device type ``Metax-SGPU``; resources ``metax-tech.com/sgpu``, ``vcore``,
``vmemory`` (GiB). The operator registers ``metax-tech.com/node-gpu-devices``: a JSON
list of ``{uuid, bdf, model, totalDevCount, totalCompute, totalVRam, availableDevCount,
availableCompute, availableVRam, numa, healthy, qosPolicy, linkZone}``; a card's QoS
policy (``best-effort``, ``fixed-share``, ``burst-share``) must match the pod's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.nodeagent.backends.vendors.base import (
    Family,
    Model,
    hami_names,
)
from shared.schemas import Device

MODELS = {"C500": Model("C500", "MXC500", 65536, 100, aliases=("MXC500",), topology="mesh")}
FAMILY = Family(
    **hami_names("Metax-SGPU"),
    register="metax",
    split=16,
    memory_unit_mib=1024,
    models=tuple(MODELS.values()),
    dev_globs=("mxcd",),
    pci_vendors=("0x9999",),
    extra={
        "allocated": "metax-tech.com/gpu-devices-allocated",
        "qos": "metax-tech.com/sgpu-qos-policy",
    },
)


def encode_register(
    devices: Sequence[Device], used: dict[str, tuple[int, int, int]] | None = None
) -> str:
    """``metax-tech.com/node-gpu-devices``; ``used`` = per UUID (slots, compute, MiB) held."""
    out = []
    for d in devices:
        n, core, mem = (used or {}).get(d.uuid, (0, 0, 0))
        ci = dict(d.custom_info)
        out.append({
            "uuid": d.uuid, "bdf": str(ci.get("bdf", "")), "model": d.type,
            "totalDevCount": d.count, "totalCompute": d.devcore, "totalVRam": d.devmem,
            "availableDevCount": d.count - n, "availableCompute": d.devcore - core,
            "availableVRam": d.devmem - mem, "numa": d.numa, "healthy": d.health,
            "qosPolicy": str(ci.get("qosPolicy", "best-effort")), "linkZone": int(ci.get("linkZone", 0)),
        })  # fmt: skip
    return json.dumps(out, separators=(",", ":"))
