"""Hygon DCUs (Z100, Z100L, K100-AI): HAMi's dcu-vgpu-device-plugin, as data and pure functions.

HAMi device type ``DCU``; resources ``hygon.com/dcunum``, ``dcumem``, ``dcucores``
(placed like NVIDIA). The plugin registers ``hami.io/node-dcu-register`` in the legacy
colon form, 4 slots per card, ID ``DCU-<serial>``, type ``DCU-<model>``, and handshake
``hami.io/node-handshake-dcu`` = ``Reported <time>``.

Discovery: ``hy-smi ... --json`` (ROCm-derived, keys per card ``card<N>``).
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
    "Z100": Model("Z100", "DCU-Z100", 32768, 100, aliases=("DCU-Z100",)),
    "Z100L": Model("Z100L", "DCU-Z100L", 32768, 100, aliases=("DCU-Z100L",)),
    "K100-AI": Model("K100-AI", "DCU-K100-AI", 65536, 100, aliases=("K100", "DCU-K100-AI")),
}
FAMILY = Family(
    **hami_names("DCU"),
    register="colon",
    split=4,
    uuid_prefix="DCU-",
    models=tuple(MODELS.values()),
    dev_globs=("mkfd",),
    pci_vendors=("0x1d94",),
    extra={"to_allocate": "hami.io/dcu-devices-to-allocate"},
)


def _cards(text: str, what: str) -> dict[str, dict[str, Any]]:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"hy-smi {what}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CommandError(f"hy-smi {what}: expected an object of cards")
    return {k: v for k, v in raw.items() if k.startswith("card") and isinstance(v, dict)}


def discover(run: Runner) -> list[PhysicalCard]:
    """Cards from ``hy-smi --showproductname --json``, ``--showmeminfo vram --json``,
    ``--showserial --json`` and ``--showbus --json``, joined on the ``card<N>`` key."""
    names = _cards(run(["hy-smi", "--showproductname", "--json"]), "--showproductname")
    mem = _cards(run(["hy-smi", "--showmeminfo", "vram", "--json"]), "--showmeminfo")
    serial = _cards(run(["hy-smi", "--showserial", "--json"]), "--showserial")
    cards: list[PhysicalCard] = []
    for key in sorted(names, key=lambda k: int(k[4:]) if k[4:].isdigit() else 1 << 30):
        series = str(names[key].get("Card Series") or names[key].get("Card series") or "").strip()
        model = series.removeprefix("DCU-").removeprefix("Hygon ").strip() or "DCU"
        total_b = str(mem.get(key, {}).get("VRAM Total Memory (B)", ""))
        if not total_b.isdigit():
            raise CommandError(f"hy-smi: {key} has no 'VRAM Total Memory (B)'")
        sn = str(serial.get(key, {}).get("Serial Number", "")).strip() or key
        cards.append(
            PhysicalCard(
                uuid=f"DCU-{sn}",
                index=int(key[4:]),
                model=model,
                memory_mib=int(total_b) >> 20,
                vendor=FAMILY.key,
                type=f"DCU-{model}",
                cores=100,
            )
        )
    return cards
