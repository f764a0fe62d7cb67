"""Cambricon MLUs (MLU370-X4/X8, MLU590): HAMi's cambricon device with Cambricon's plugin.

HAMi device type ``MLU``; resources ``cambricon.com/vmlu``,
``cambricon.com/mlu.smlu.vmemory`` (256 MiB units), ``cambricon.com/mlu.smlu.vcore``.
HAMi synthesises the cards from node capacity (one per 100 vcore units), so no register
annotation. Cambricon's plugin (``--mode=dynamic-smlu``) creates an sMLU instance per pod
and answers with the card's device nodes plus the instance's capability node.

Discovery: ``cnmon info -m`` (text only), one section per card opened by a ``Card``
line, with ``Product Name`` and a ``Physical Memory Usage`` block whose ``Total`` is the
card's memory in MiB.
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

MEMORY_UNIT = 256
MODELS = {
    "MLU370-X4": Model("MLU370-X4", "MLU370-X4", 24576, 100, aliases=("MLU370",)),
    "MLU370-X8": Model("MLU370-X8", "MLU370-X8", 49152, 100, topology="pairs"),
    "MLU590": Model("MLU590", "MLU590", 81920, 100, topology="mesh"),
}
FAMILY = Family(
    **hami_names("MLU"),
    register="capacity",
    memory_unit_mib=MEMORY_UNIT,
    models=tuple(MODELS.values()),
    dev_globs=("cambricon_dev[0-9]*",),
    pci_vendors=("0xcabc",),
    extra={
        "profile": "CAMBRICON_DSMLU_PROFILE",
        "instance": "CAMBRICON_DSMLU_PROFILE_INSTANCE",
        "lock": "cambricon.com/dsmlu.lock",
    },
)

COMMAND = ("cnmon", "info", "-m")
# "Card : 0" (parsers also accept "Card 0": the id is the line's last token)
_CARD = re.compile(r"^\s*Card\s*:?\s*(\d+)\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(MiB|MB|GiB|GB)?\s*$", re.IGNORECASE)


def _mib(text: str, where: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise CommandError(f"cnmon info -m: {where}: memory {text!r} is not a size")
    n = float(m.group(1))
    return int(n * 1024) if (m.group(2) or "MiB").upper().startswith("G") else int(n)


def model_named(product: str) -> Model | None:
    """The model of a ``Product Name`` such as ``MLU370-X8`` (name or alias, any case)."""
    return base.model_named(MODELS.values(), product)


def parse_info(text: str) -> list[tuple[int, str, int]]:
    """(card, product name, physical memory MiB) of every ``Card`` section.

    ``Key : value`` lines; a key with no value opens a block (``Physical Memory
    Usage``, ``Virtual Memory Usage``, ...) whose indented lines belong to it, so the
    ``Total`` read is the physical memory's, not the virtual address space's."""
    cards: list[dict[str, str]] = []
    block = ""
    for ln in text.splitlines():
        opened = _CARD.match(ln)
        if opened:
            cards.append({"card": opened.group(1)})
            block = ""
            continue
        key, sep, value = (part.strip() for part in ln.partition(":"))
        if not sep or not cards:
            continue
        if not value:
            block = key.lower()
        elif key == "Product Name":
            cards[-1]["name"] = value
        elif key == "Total" and block == "physical memory usage":
            cards[-1].setdefault("total", value)
    if not cards:
        raise CommandError("cnmon info -m: no 'Card' sections")
    out: list[tuple[int, str, int]] = []
    for c in cards:
        where = f"card {c['card']}"
        if "name" not in c:
            raise CommandError(f"cnmon info -m: {where} has no 'Product Name'")
        if "total" not in c:
            raise CommandError(f"cnmon info -m: {where} has no 'Physical Memory Usage' Total")
        out.append((int(c["card"]), c["name"], _mib(c["total"], where)))
    return out


def discover(run: Runner) -> list[PhysicalCard]:
    """Every card ``cnmon info -m`` lists; a product outside :data:`MODELS` is an error
    (its slot and topology rules are unknown)."""
    cards: list[PhysicalCard] = []
    for card, product, memory in parse_info(run(list(COMMAND))):
        model = model_named(product)
        if model is None:
            raise CommandError(f"cnmon: product {product!r} is not in the MLU model table")
        cards.append(
            PhysicalCard(
                # cnmon info -m prints no UUID; HAMi names Cambricon cards from node
                # capacity (<node>-cambricon-mlu-<i>), so a per-node stable name will do.
                uuid=f"MLU-{card}",
                index=card,
                model=model.name,
                memory_mib=memory,
                vendor=FAMILY.key,
                type=model.type,
                cores=model.cores,
            )
        )
    return cards
