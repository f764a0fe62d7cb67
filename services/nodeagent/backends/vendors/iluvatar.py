"""Iluvatar CoreX GPUs (BI-V100, BI-V150, MR-V100): HAMi's iluvatar device, as data and pure functions.

HAMi configures each chip as its own device type (``BI-V150``, ``MR-V100``, ...):
resources ``iluvatar.ai/<chip>-vgpu``, ``.vMem`` (256 MiB units), ``.vCore``; register
``hami.io/node-<chip>-register`` in the colon form. Allocate as Deep-Spark's ix-device-plugin answers.

Discovery: ``ixsmi`` in nvidia-smi's query mode (CSV).
"""

from __future__ import annotations

import csv
import io

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    hami_names,
)
from services.nodeagent.backends.vendors.mthreads import mib

MODELS = {
    "MR-V100": Model("MR-V100", "Iluvatar-MR-V100", 32768, 100, aliases=("Iluvatar MR-V100",)),
    "MR-V50": Model("MR-V50", "Iluvatar-MR-V50", 16384, 100, aliases=("Iluvatar MR-V50",)),
    "BI-V150": Model("BI-V150", "Iluvatar-BI-V150", 65536, 100, aliases=("Iluvatar BI-V150",)),
    "BI-V100": Model("BI-V100", "Iluvatar-BI-V100", 32768, 100, aliases=("Iluvatar BI-V100",)),
}


def family(chip: str) -> Family:
    """One chip's family: HAMi configures Iluvatar per chip, as Ascend."""
    return Family(
        **hami_names(chip),
        register="colon",
        memory_unit_mib=256,
        models=(MODELS[chip],),
        dev_globs=("iluvatar[0-9]*",),
        pci_vendors=("0x1e3e",),
        extra={"container_env": "SOL_CONTINER_NAME"},
    )


FAMILIES = tuple(family(k) for k in MODELS)
QUERY = "index,uuid,name,memory.total,pci.bus_id"


def discover(run: Runner) -> list[PhysicalCard]:
    text = run(["ixsmi", f"--query-gpu={QUERY}", "--format=csv"])
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows or rows[0][0].strip() != "index":
        raise CommandError("ixsmi: no CSV header")
    cards: list[PhysicalCard] = []
    for r in rows[1:]:
        f = [x.strip() for x in r]
        if len(f) < 4:
            raise CommandError(f"ixsmi: short row {r}")
        name = f[2].removeprefix("Iluvatar ").strip()
        if name not in MODELS:
            raise CommandError(f"ixsmi: chip {name!r} is not one HAMi configures")
        cards.append(
            PhysicalCard(
                uuid=f[1],
                index=int(f[0]),
                model=name,
                memory_mib=mib(f[3]),
                vendor=name,
                type=MODELS[name].type,
                cores=100,
            )
        )
    return cards
