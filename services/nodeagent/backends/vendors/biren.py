"""Biren GPUs (BR104, BR106): HAMi's biren device (since v2.10).

HAMi device type ``Biren``; one count resource (``birentech.com/gpu`` by default);
whole-card slots only (HAMi sets devcore 100 and asks 100 % memory). Register
``hami.io/node-biren-register`` (DeviceInfo JSON), handshake
``hami.io/node-handshake-biren``. No public plugin source: Allocate lists the cards only.
"""

from __future__ import annotations

from services.nodeagent.backends.vendors.base import (
    Family,
    Model,
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
