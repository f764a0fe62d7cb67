"""Vastai accelerators (VA1): HAMi's vastai device (since v2.10).

HAMi device type ``Vastai``; register ``hami.io/node-va-register`` (DeviceInfo JSON),
handshake ``hami.io/node-handshake-va``. In die mode every die is a device whose
customInfo names its card (``AIC``) and ``DeviceStrategy: "die"``; HAMi prefers dies of
one card for a multi-die request. No public plugin source: Allocate lists the dies only.

Discovery: ``vasmi list``, a whitespace table with one row per die; columns are found
by their header names (``Card``, ``Die``, ``Name``, ``Memory...``, optional ``SN``), not
by position, because no capture of its output was available to pin the layout.
"""

from __future__ import annotations

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
    "VA1": Model("VA1", "VA1", 16384, 100, aliases=("Vastai-VA1",), dies=2),
    "VA16": Model("VA16", "VA16", 32768, 100, dies=4),
}
FAMILY = Family(
    **hami_names("Vastai"),
    register="json",
    split=1,
    models=tuple(MODELS.values()),
    extra={"to_allocate": "hami.io/Vastai-devices-to-allocate"},
)

COMMAND = ("vasmi", "list")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(MiB|MB|GiB|GB)?$", re.IGNORECASE)


def model_named(name: str) -> Model | None:
    """The model of a ``vasmi`` name (``VA1``, ``Vastai-VA1``, any case)."""
    return base.model_named(MODELS.values(), re.sub(r"^VASTAI[\s-]*", "", name.strip().upper()))


def parse_list(text: str) -> list[dict[str, str]]:
    """The die rows of ``vasmi list``, keyed by lower-cased header names (``card``,
    ``die``, ``name``, ``memory``: the first header starting with ``mem``, ``sn``)."""
    lines = text.splitlines()
    start = next(
        (i for i, ln in enumerate(lines) if {"card", "die"} <= {t.lower() for t in ln.split()}),
        None,
    )
    if start is None:
        raise CommandError("vasmi list: no header with 'Card' and 'Die' columns")
    header = [t.lower() for t in lines[start].split()]
    mem = next((h for h in header if h.startswith("mem")), None)
    if "name" not in header or mem is None:
        raise CommandError("vasmi list: header lacks a 'Name' or 'Memory' column")
    card = header.index("card")
    rows: list[dict[str, str]] = []
    for ln in lines[start + 1 :]:
        f = ln.split()
        if len(f) == len(header) and f[card].isdigit():
            row = dict(zip(header, f, strict=True))
            row["memory"] = row.pop(mem)
            rows.append(row)
        elif f and f[0].isdigit():
            # a numbered row that does not fit the header: a layout we do not know
            raise CommandError(
                f"vasmi list: row {ln.strip()!r} has {len(f)} fields, the header {len(header)}"
            )
        # anything else (rules, blank lines, footers) is not a die
    if not rows:
        raise CommandError("vasmi list: no die rows under the header")
    return rows


def discover(run: Runner) -> list[PhysicalCard]:
    """Every die ``vasmi list`` shows, as HAMi's die mode registers them: one device per
    die, numbered in list order, naming its card (``AIC``) in customInfo."""
    cards: list[PhysicalCard] = []
    for row in parse_list(run(list(COMMAND))):
        model = model_named(row["name"])
        if model is None:
            raise CommandError(
                f"vasmi: card {row['card']} {row['name']!r} is not in the Vastai model table"
            )
        size = _SIZE.match(row["memory"])
        if not size or not row["die"].isdigit():
            raise CommandError(f"vasmi list: card {row['card']} has a bad die or memory {row}")
        n = float(size.group(1))
        mib = int(n * 1024) if (size.group(2) or "MiB").upper().startswith("G") else int(n)
        aic = f"VA-{row['sn']}" if row.get("sn") else f"VA-card{row['card']}"
        cards.append(
            PhysicalCard(
                uuid=f"{aic}-die{row['die']}",
                index=len(cards),
                model=model.name,
                memory_mib=mib,
                vendor=FAMILY.key,
                type=model.type,
                cores=model.cores,
                custom_info=(("AIC", aic), ("DeviceStrategy", "die")),
            )
        )
    return cards
