"""HAMi's registration semantics: physical cards + node settings -> registered devices.

Pure. ``deviceSplitCount`` becomes each card's slot count, ``deviceMemoryScaling``
multiplies its memory (above 1 is oversubscription), ``deviceCoreScaling`` its cores,
and ``filterdevices`` (UUIDs or indexes) keeps cards out of the registration. A card in
MIG mode registers unscaled, with its MIG profiles and as many slots as instances fit.
"""

from __future__ import annotations

from services.nodeagent.backends import Discovery
from shared.config import NodeSettings
from shared.hami.mig import MIG_MODE, max_instances
from shared.schemas import Device


def vendor_type(vendor: str, model: str) -> str:
    prefix = f"{vendor}-"
    return model if model.upper().startswith(prefix.upper()) else f"{prefix}{model}"


def register(found: Discovery, settings: NodeSettings) -> tuple[list[Device], list[list[int]]]:
    """The devices to register and the link matrix restricted to them."""
    skip = {s.strip() for s in settings.filterdevices if s.strip()}
    keep: list[int] = []
    devices: list[Device] = []
    for pos, card in enumerate(found.cards):
        if card.uuid in skip or str(card.index) in skip:
            continue
        keep.append(pos)
        mig = card.mode == MIG_MODE
        devices.append(
            Device(
                uuid=card.uuid,
                index=card.index,
                type=vendor_type(card.vendor, card.model),
                vendor=card.vendor,
                # MIG cards: HAMi applies no scaling, and a card holds as many containers
                # as it can hold instances
                count=max_instances(card.mig_profiles) if mig else settings.device_split_count,
                devmem=card.memory_mib if mig else int(card.memory_mib * settings.device_memory_scaling),
                devcore=100 if mig else int(100 * settings.device_core_scaling),
                numa=card.numa,
                mode=card.mode,
                health=card.healthy,
                physical_mem=card.memory_mib,
                mig_profiles=list(card.mig_profiles) if mig else [],
            )
        )
    links = [[found.links[i][j] for j in keep] for i in keep] if found.links else []
    return devices, links
