"""HAMi registration of other vendors' cards: what their plugins register, not NVIDIA's.

:func:`services.nodeagent.registration.register` applies NVIDIA's node settings
(``deviceSplitCount``, memory/core scaling, ``<vendor>-<model>`` types) to every card;
:func:`vendor_devices` then puts back what each vendor's plugin writes for its cards: the
plugin's type, its slot count (Ascend: allocatable memory over the smallest template;
Hygon 4; Enflame 6 DRS slices; deviceSplitCount where the plugin uses it), the unscaled
memory, the vendor's core unit (AMD CUs, Neuron cores, Moore Threads' 16), customInfo
and fixed slice sizes. Pure.
"""

from __future__ import annotations

import msgspec

from services.nodeagent.backends import Discovery
from services.nodeagent.backends.vendors import FAMILIES, ascend, find_model
from shared.config import NodeSettings
from shared.schemas import Device


def _slots(key: str, model_name: str, settings: NodeSettings) -> int:
    fam = FAMILIES[key]
    if key.startswith("Ascend"):
        return ascend.slots(ascend.MODELS[key])
    found = find_model(model_name)
    if found and found[1].templates and key == "XPU":
        return fam.split  # at most four quarter-card vXPUs
    return fam.split or settings.device_split_count


def vendor_devices(found: Discovery, devices: list[Device], settings: NodeSettings) -> list[Device]:
    """``devices`` (from register()) with every non-NVIDIA card as its vendor registers it."""
    cards = {c.uuid: c for c in found.cards}
    out: list[Device] = []
    for d in devices:
        card = cards.get(d.uuid)
        if card is None or card.vendor not in FAMILIES:
            out.append(d)
            continue
        out.append(
            msgspec.structs.replace(
                d,
                type=card.type or card.model,
                count=_slots(card.vendor, card.model, settings),
                devmem=card.memory_mib,
                devcore=card.cores or 100,
                mode="",
                custom_info=dict(card.custom_info),
                templates=list(card.templates),
            )
        )
    return out
