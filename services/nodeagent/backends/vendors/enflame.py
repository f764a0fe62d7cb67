"""Enflame GCUs (S60): HAMi's enflame DRS device with gcushare-device-plugin.

HAMi device type ``GCU`` (DRS partitions; ``Enflame`` is the shared vGCU type), resource
``enflame.com/gcu``; slices are fixed DRS profiles (six per card). The plugin registers
``enflame.com/gcu-drs-capacity`` = ``{"devices": [{"index", "minor", "capacity"}],
"profiles": {name: id}}`` and answers Allocate with the DRS instance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.nodeagent.backends.vendors.base import (
    Family,
    Model,
    Template,
    hami_names,
)
from shared.schemas import Device

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
    """``enflame.com/gcu-drs-capacity``: each card with its slice capacity, and the
    profile name -> id table (ids in the order the cards list them)."""
    profiles: dict[str, int] = {}
    for d in devices:
        for t in d.templates:
            profiles.setdefault(t.name, len(profiles))
    body = {
        "devices": [{"index": d.index, "minor": d.index, "capacity": d.devcore} for d in devices],
        "profiles": profiles,
    }
    return json.dumps(body, separators=(",", ":"))
