"""Vastai accelerators (VA1): HAMi's vastai device (since v2.10).

HAMi device type ``Vastai``; register ``hami.io/node-va-register`` (DeviceInfo JSON),
handshake ``hami.io/node-handshake-va``. In die mode every die is a device whose
customInfo names its card (``AIC``) and ``DeviceStrategy: "die"``; HAMi prefers dies of
one card for a multi-die request. No public plugin source: Allocate lists the dies only.
"""

from __future__ import annotations

from services.nodeagent.backends.vendors.base import (
    Family,
    Model,
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
