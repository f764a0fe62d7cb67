"""Biren GPUs (BR104, BR106): HAMi's biren device (since v2.10).

HAMi device type ``Biren``; one count resource (``birentech.com/gpu`` by default);
whole-card slots only (HAMi sets devcore 100 and asks 100 % memory). Register
``hami.io/node-biren-register`` (DeviceInfo JSON), handshake
``hami.io/node-handshake-biren``. No public plugin source: Allocate lists the cards only.

Discovery: ``brsmi``, the CLI Biren builds on its BRML library (whose API mirrors
NVML), asked in nvidia-smi's query mode (CSV with a header; memory with a unit).
"""

from __future__ import annotations

import csv
import io
import re

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors import base
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    hami_names,
)

MODELS = {
    "BR104": Model("BR104", "BR104", 32768, 100, aliases=("Biren-BR104",)),
    "BR106": Model("BR106", "BR106", 65536, 100, aliases=("Biren-BR106",)),
}
FAMILY = Family(
    **hami_names("Biren"),
    register="json",
    split=1,
    models=tuple(MODELS.values()),
    extra={"to_allocate": "hami.io/Biren-devices-to-allocate"},
)

QUERY = "index,uuid,name,memory.total,pci.bus_id"
COMMAND = ("brsmi", f"--query-gpu={QUERY}", "--format=csv")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(MiB|GiB)?$", re.IGNORECASE)


def model_named(name: str) -> Model | None:
    """The model of a ``brsmi`` name (``BR104``, ``Biren BR104``, ``Biren-BR104``)."""
    return base.model_named(MODELS.values(), re.sub(r"^BIREN[\s-]*", "", name.strip().upper()))


def parse_query(text: str) -> list[dict[str, str]]:
    """The CSV rows keyed by the query's field names (a header's ``[MiB]`` unit dropped)."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        raise CommandError("brsmi: no CSV output")
    header = [re.sub(r"\s*\[.*\]$", "", h.strip()) for h in rows[0]]
    missing = [f for f in QUERY.split(",") if f not in header]
    if missing:
        raise CommandError(f"brsmi: CSV header lacks {', '.join(missing)}")
    out: list[dict[str, str]] = []
    for r in rows[1:]:
        if len(r) != len(header):
            raise CommandError(f"brsmi: row {r} has {len(r)} fields, the header {len(header)}")
        out.append({h: v.strip() for h, v in zip(header, r, strict=True)})
    return out


def discover(run: Runner) -> list[PhysicalCard]:
    """Every GPU ``brsmi`` lists; a model outside :data:`MODELS` is an error."""
    cards: list[PhysicalCard] = []
    for row in parse_query(run(list(COMMAND))):
        model = model_named(row["name"])
        if model is None:
            raise CommandError(
                f"brsmi: GPU {row['index']} {row['name']!r} is not in the Biren model table"
            )
        size = _SIZE.match(row["memory.total"])
        if not size or not row["index"].isdigit():
            raise CommandError(f"brsmi: GPU row {row} has a bad index or memory.total")
        n = float(size.group(1))
        mib = int(n * 1024) if (size.group(2) or "MiB").upper().startswith("G") else int(n)
        cards.append(
            PhysicalCard(
                uuid=row["uuid"],
                index=int(row["index"]),
                model=model.name,
                memory_mib=mib,
                vendor=FAMILY.key,
                type=model.type,
                cores=model.cores,
            )
        )
    return cards
