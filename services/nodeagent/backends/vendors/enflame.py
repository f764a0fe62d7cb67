"""Enflame GCUs (S60): gcushare-device-plugin's cards, as HAMi's ``pkg/device/enflame`` reads them.

The simulated cards are HAMi's whole-GCU type ``GCU`` (resource ``enflame.com/gcu``),
and the node also carries what gcushare registers for DRS (Dynamic Resource Slicing):
``enflame.com/gcu-drs-capacity`` = ``{"devices": [{"index": "0", "minor": "0",
"capacity": 6}], "profiles": {"3g.24gb": "2", ...}}``, index, minor and profile IDs as
text (HAMi decodes them into strings), which HAMi's DRS type ``Enflame``
(``enflame.com/drs-gcu``, or ``gcu-memory``/``gcu-core``) reads: six slices a card and
profiles named ``<slices>g.<GB>gb``, the largest being the whole card (HAMi takes the
card's memory from it).

Discovery: plain ``efsmi`` (text only), as gcushare scrapes it: two rows per card, the
first holding a PCI bus ID (cells: index and product, firmware, bus ID), the second the
card's memory size (``<n>MiB``) and its virtualization state.
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
    Template,
    hami_names,
)
from shared.schemas import Device, DeviceTemplate

MODELS = {
    "S60": Model("S60", "S60", 49152, 6,
                 (Template("1g.8gb", 8192, 1), Template("2g.16gb", 16384, 2), Template("3g.24gb", 24576, 3),
                  Template("6g.48gb", 49152, 6)),
                 aliases=("GCU-S60",)),
}  # fmt: skip
FAMILY = Family(
    # HAMi's DRS type; its cards come from gcushare's own annotation, not a register
    **{**hami_names("GCU"), "register_annotation": "enflame.com/gcu-drs-capacity"},
    register="enflame",
    split=6,
    models=tuple(MODELS.values()),
    dev_globs=("gcu[0-9]*",),
    pci_vendors=("0x1e36",),
    extra={"assigned": "enflame.com/gcu-assigned", "containers": "assigned-containers"},
)


def encode_register(devices: Sequence[Device]) -> str:
    """``enflame.com/gcu-drs-capacity``: each card with its slice capacity (its slots),
    and the profile name -> ID table (IDs in the order the cards list them); index,
    minor and IDs are strings, as gcushare writes them and HAMi decodes them."""
    profiles: dict[str, str] = {}
    for d in devices:
        for t in d.templates:
            profiles.setdefault(t.name, str(len(profiles)))
    body = {
        "devices": [
            {"index": str(d.index), "minor": str(d.index), "capacity": d.count} for d in devices
        ],
        "profiles": profiles,
    }
    return json.dumps(body, separators=(",", ":"))


COMMAND = ("efsmi",)
# gcushare's rule: a row carrying a bus ID ("xx:xx:xx.x") opens a card
_BUS = re.compile(r"[0-9a-fA-F]{2}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(MiB|GiB)$", re.IGNORECASE)


def _key(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).upper()


def model_named(product: str) -> Model | None:
    """The model of an ``efsmi`` product (``S60``, ``Enflame S60``, ``GCU-S60``)."""
    return base.model_named(MODELS.values(), product.removeprefix("Enflame"), key=_key)


def parse_table(text: str) -> list[tuple[int, str, str, int]]:
    """(index, product, bus ID, memory MiB) of every card ``efsmi`` lists."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    rows: list[tuple[int, str, str, int]] = []
    for i, ln in enumerate(lines):
        cells = ln.strip("|").split("|")
        if len(cells) < 3 or not _BUS.search(cells[2]):
            continue
        head = cells[0].split()
        if len(head) < 2 or not head[0].isdigit():
            raise CommandError(f"efsmi: card row {ln!r} has no index and product")
        bus = cells[2].split()[0]
        second = lines[i + 1] if i + 1 < len(lines) else ""
        sizes = [_SIZE.match(t) for t in second.replace("|", " ").replace("/", " ").split()]
        found = [m for m in sizes if m]
        if not found:
            raise CommandError(
                f"efsmi: card {head[0]} ({bus}) has no memory size on its second row"
            )
        n, unit = float(found[0].group(1)), found[0].group(2)
        mib = int(n * 1024) if unit.upper().startswith("G") else int(n)
        rows.append((int(head[0]), " ".join(head[1:]), bus.lower(), mib))
    if not rows:
        raise CommandError("efsmi: no card rows (no line with a PCI bus ID)")
    return rows


def discover(run: Runner) -> list[PhysicalCard]:
    """Every card ``efsmi`` lists, with its model's DRS profiles; a product outside
    :data:`MODELS` is an error (its profiles are unknown)."""
    cards: list[PhysicalCard] = []
    for index, product, bus, memory in parse_table(run(list(COMMAND))):
        model = model_named(product)
        if model is None:
            raise CommandError(f"efsmi: card {index} {product!r} is not in the GCU model table")
        cards.append(
            PhysicalCard(
                uuid=f"GCU-{bus}",  # efsmi's table prints no UUID; the bus ID is stable
                index=index,
                model=model.name,
                memory_mib=memory,
                vendor=FAMILY.key,
                type=model.type,
                cores=model.cores,
                templates=tuple(
                    DeviceTemplate(name=t.name, memory_mib=t.memory_mib, cores=t.cores)
                    for t in model.templates
                ),
            )
        )
    return cards
