"""Kunlunxin XPUs (P800): HAMi's kunlun vXPU device.

HAMi device type ``XPU`` (vXPU; whole cards are ``kunlun``, capacity-derived);
resources ``kunlunxin.com/vxpu``, ``kunlunxin.com/vxpu-memory``. The vXPU plugin registers
``hami.io/node-register-xpu`` (DeviceInfo JSON) and ``hami.io/node-handshake-xpu``.
vXPU sizes are fixed (1/4, 1/2, whole card) and all vXPUs of one card are equal.

Discovery: ``xpu-smi -m`` is a whitespace table read by column; it is fragile and the
same binary name belongs to Intel's XPU Manager, so the vendor is told by ``/dev/xpu*``.
"""

from __future__ import annotations

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    Template,
    hami_names,
)

MODELS = {
    "P800": Model("P800", "P800", 98304, 100,
                  (Template("1/4", 24576, 25), Template("1/2", 49152, 50), Template("1/1", 98304, 100)),
                  aliases=("XPU-P800", "P800-OAM"), topology="network8"),
}  # fmt: skip
FAMILY = Family(
    **hami_names("XPU"),
    register="json",
    split=4,
    models=tuple(MODELS.values()),
    dev_globs=("xpuctrl",),
    pci_vendors=("0x1d22",),
    extra={"to_allocate": "hami.io/xpu-devices-to-allocate"},
)


def discover(run: Runner) -> list[PhysicalCard]:
    """``xpu-smi -m`` rows: column 2 the XPU id, 18/19 used/total MB, 22- the name
    (1-based, as parsers of the vendor's output read it)."""
    cards: list[PhysicalCard] = []
    for ln in run(["xpu-smi", "-m"]).splitlines():
        f = ln.split()
        if len(f) < 22 or not f[1].isdigit():
            continue
        if not f[18].isdigit():
            raise CommandError(f"xpu-smi -m: total memory {f[18]!r} is not a number")
        name = " ".join(f[21:23]).strip()
        idx = int(f[1])
        cards.append(
            PhysicalCard(
                uuid=f"XPU-{f[0]}" if ":" in f[0] else f"XPU-{idx}",
                index=idx,
                model=name or "P800",
                memory_mib=int(f[18]),
                numa=0 if idx < 4 else 1,
                vendor=FAMILY.key,
                type=name or "P800",
                cores=100,
            )
        )
    return cards
