"""MetaX GPUs (C500): HAMi's metax sGPU device with the MetaX GPU Operator.

HAMi device type ``Metax-SGPU``; resources ``metax-tech.com/sgpu``, ``vcore``,
``vmemory`` (GiB). The operator registers ``metax-tech.com/node-gpu-devices``: a JSON
list of ``{uuid, bdf, model, totalDevCount, totalCompute, totalVRam, availableDevCount,
availableCompute, availableVRam, numa, healthy, qosPolicy, linkZone}``; a card's QoS
policy (``best-effort``, ``fixed-share``, ``burst-share``) must match the pod's.

Discovery: plain ``mx-smi`` (text only): a table with two rows per GPU, the first with
the index, ``MetaX <model>`` and the bus ID, the second with ``<used>/<total> MiB``.
Moffett ships a different tool also called ``mx-smi``; its table has no ``MetaX`` rows
and is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors import base
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
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


COMMAND = ("mx-smi",)
# "| 0           MetaX C500             | 0000:0e:00.0        | 0%  |"
_GPU_ROW = re.compile(
    r"^\|\s*(\d+)\s+MetaX\s+(\S+)[^|]*\|\s*([0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])"
)
# "| 36C         56W / 350W             | 858/65536 MiB       |     |"
_MEMORY = re.compile(r"(\d+)\s*/\s*(\d+)\s*MiB")


def model_named(name: str) -> Model | None:
    """The model of an ``mx-smi`` name such as ``C500`` (name, type or alias, any case)."""
    return base.model_named(MODELS.values(), name)


def parse_table(text: str) -> list[tuple[int, str, str, int]]:
    """(index, model name, bus ID, total MiB) of every GPU in the ``mx-smi`` table."""
    lines = text.splitlines()
    rows: list[tuple[int, str, str, int]] = []
    for i, ln in enumerate(lines):
        m = _GPU_ROW.match(ln.strip())
        if not m:
            continue
        # The memory cell is on the GPU's second row, before the next separator
        nxt = next((x for x in lines[i + 1 :] if x.strip().startswith("|")), "")
        mem = _MEMORY.search(nxt)
        if not mem:
            raise CommandError(f"mx-smi: GPU {m.group(1)} has no '<used>/<total> MiB' cell")
        rows.append((int(m.group(1)), m.group(2), m.group(3).lower(), int(mem.group(2))))
    if not rows:
        raise CommandError("mx-smi: no 'MetaX' GPU rows (not MetaX's mx-smi, or no GPUs)")
    return rows


def discover(run: Runner) -> list[PhysicalCard]:
    """Every GPU of the ``mx-smi`` table; a model outside :data:`MODELS` is an error."""
    cards: list[PhysicalCard] = []
    for index, name, bdf, total in parse_table(run(list(COMMAND))):
        model = model_named(name)
        if model is None:
            raise CommandError(f"mx-smi: GPU {index} {name!r} is not in the MetaX model table")
        cards.append(
            PhysicalCard(
                # The plain table prints no UUID; the bus ID is stable per node and is
                # also what the operator's annotation carries as "bdf".
                uuid=f"MetaX-{bdf}",
                index=index,
                model=model.name,
                memory_mib=total,
                vendor=FAMILY.key,
                type=model.type,
                cores=model.cores,
                custom_info=(("qosPolicy", "best-effort"), ("bdf", bdf)),
            )
        )
    return cards
