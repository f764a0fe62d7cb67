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

from services.nodeagent.backends import Discovery, PhysicalCard
from services.nodeagent.backends.vendors import FAMILIES, ascend, find_model
from shared.config import NodeSettings
from shared.devices import ascend as ascend_rules
from shared.schemas import Device


def _slots(key: str, model_name: str, settings: NodeSettings) -> int:
    fam = FAMILIES[key]
    if key.startswith("Ascend"):
        return ascend.slots(ascend.MODELS[key])
    found = find_model(model_name)
    if found and found[1].templates and key == "XPU":
        return fam.split  # at most four quarter-card vXPUs
    return fam.split or settings.device_split_count


# HAMi derives these families' cards from the node's capacity and types each card with
# the device type itself (Type: "Mthreads", "AWSNeuron"); their fits match the ask's
# family against the card's type, so a model name there ("MTT S4000") would fit nothing.
TYPED_BY_FAMILY = frozenset({"Mthreads", "AWSNeuron"})


def fam_type(card: PhysicalCard) -> str:
    """The Device.type a card of another vendor registers with."""
    if card.vendor in TYPED_BY_FAMILY:
        return card.vendor
    return card.type or card.model


def vendor_devices(found: Discovery, devices: list[Device], settings: NodeSettings) -> list[Device]:
    """``devices`` (from register()) with every non-NVIDIA card as its vendor registers it."""
    cards = {c.uuid: c for c in found.cards}
    out: list[Device] = []
    for d in devices:
        card = cards.get(d.uuid)
        if card is None or card.vendor not in FAMILIES:
            out.append(d)
            continue
        neuron = card.vendor == "AWSNeuron" and card.cores > 0
        # node.ascendSoftMode: hami-vnpu-core enforces each pod's share, so a card is
        # 100 % of cores (as ascend-device-plugin registers it) in that mode
        soft = settings.ascend_soft_mode and card.vendor.startswith("Ascend")
        out.append(
            msgspec.structs.replace(
                d,
                type=fam_type(card),
                count=card.cores if neuron else _slots(card.vendor, card.model, settings),
                devmem=card.memory_mib,
                # Neuron: HAMi's card is a bitmask of its NeuronCores (totalcore 0b11 on an
                # inf2 device) that its fit counts bits of, one container per core at most.
                devcore=(
                    ((1 << card.cores) - 1)
                    if neuron
                    else ascend_rules.SOFT_CORES
                    if soft
                    else (card.cores or 100)
                ),
                mode=ascend_rules.SOFT_NODE if soft else "",
                custom_info=dict(card.custom_info),
                templates=list(card.templates),
            )
        )
    return out
