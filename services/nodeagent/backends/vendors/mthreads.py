"""Moore Threads GPUs (MTT S4000, S5000): HAMi's mthreads device, as data and pure functions.

HAMi device type ``Mthreads``; resources ``mthreads.com/vgpu``, ``sgpu-memory`` (512 MiB
units), ``sgpu-core`` (16 per card). HAMi derives the cards from node capacity, so no
register annotation; the vendor's runtime reads ``MTHREADS_VISIBLE_DEVICES``.

Discovery: the ``mthreads-ml-py`` binding (module ``pymtml``) when installed, else
``mthreads-gmi -q --json``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    hami_names,
)

MEMORY_UNIT = 512
MODELS = {
    "MTT-S4000": Model(
        "MTT-S4000", "MTT S4000", 96 * MEMORY_UNIT, 16, aliases=("S4000", "MTT S4000")
    ),
    "MTT-S5000": Model(
        "MTT-S5000", "MTT S5000", 160 * MEMORY_UNIT, 16, aliases=("S5000", "MTT S5000")
    ),
}
FAMILY = Family(
    **hami_names("Mthreads"),
    register="capacity",
    memory_unit_mib=MEMORY_UNIT,
    models=tuple(MODELS.values()),
    dev_globs=("mtgpu.[0-9]*",),
    pci_vendors=("0x1ed5",),
    extra={"gpu_index": "mthreads.com/gpu-index"},
)

_SIZE = re.compile(r"^\s*([\d.]+)\s*(MiB|GiB|MB|GB)?\s*$", re.IGNORECASE)


def mib(text: str) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise CommandError(f"mthreads-gmi: memory {text!r} is not a size")
    n = float(m.group(1))
    return int(n * 1024) if (m.group(2) or "MiB").upper().startswith("G") else int(n)


def _model(name: str) -> Model:
    for m in MODELS.values():
        if name.upper() in (a.upper() for a in (m.name, m.type, *m.aliases)):
            return m
    return Model(name.replace(" ", "-"), name, 0, 16)


def discover(run: Runner) -> list[PhysicalCard]:
    try:
        raw = json.loads(run(["mthreads-gmi", "-q", "--json"]))
    except ValueError as exc:
        raise CommandError(f"mthreads-gmi: not JSON: {exc}") from None
    gpus = raw.get("GPU") if isinstance(raw, dict) else None
    if not isinstance(gpus, list):
        raise CommandError("mthreads-gmi: no GPU array")
    cards: list[PhysicalCard] = []
    for g in gpus:
        name = str(g.get("Product Name", "")).strip()
        model = _model(name)
        total = (g.get("FB Memory Usage") or {}).get("Total")
        if total is None:
            raise CommandError(f"mthreads-gmi: GPU {g.get('Index')} has no FB Memory Usage.Total")
        idx = int(g.get("Index", len(cards)))
        cards.append(
            PhysicalCard(
                uuid=str(g.get("GPU UUID") or f"MTGPU-{idx}"),
                index=idx,
                model=model.name,
                memory_mib=mib(str(total)),
                vendor=FAMILY.key,
                type=model.type,
                cores=16,
            )
        )
    return cards


def discover_pymtml(pymtml: Any) -> list[PhysicalCard]:
    """The same cards through ``pymtml`` (passed in, imported by the caller only when
    installed). Function names as mthreads-ml-py's README lists them."""
    pymtml.mtmlLibraryInit()
    try:
        cards: list[PhysicalCard] = []
        for i in range(int(pymtml.mtmlLibraryCountDevice())):
            d = pymtml.mtmlLibraryInitDeviceByIndex(i)
            mem = pymtml.mtmlDeviceInitMemory(d)
            model = _model(str(pymtml.mtmlDeviceGetName(d)))
            cards.append(
                PhysicalCard(
                    uuid=str(pymtml.mtmlDeviceGetUUID(d)),
                    index=i,
                    model=model.name,
                    memory_mib=int(pymtml.mtmlMemoryGetTotal(mem)) >> 20,
                    vendor=FAMILY.key,
                    type=model.type,
                    cores=16,
                )
            )
        return cards
    finally:
        pymtml.mtmlLibraryShutDown()
