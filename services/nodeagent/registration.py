"""HAMi's registration semantics: physical cards + node settings -> registered devices.

Pure. ``deviceSplitCount`` becomes each card's slot count, ``deviceMemoryScaling``
multiplies its memory (above 1 is oversubscription), ``deviceCoreScaling`` its cores,
and ``filterdevices`` (UUIDs or indexes) keeps cards out of the registration. A card in
MIG mode registers unscaled, with the MIG profiles ``migProfileAllowlist`` allows for its
model and as many slots as instances of them fit.
"""

from __future__ import annotations

from services.nodeagent.backends import Discovery
from shared.config import NodeSettings
from shared.hami.mig import MIG_MODE, allowed_profiles, max_instances
from shared.schemas import Device


def vendor_type(vendor: str, model: str) -> str:
    prefix = f"{vendor}-"
    return model if model.upper().startswith(prefix.upper()) else f"{prefix}{model}"


def register(found: Discovery, settings: NodeSettings) -> tuple[list[Device], list[list[int]]]:
    """The devices to register and the link matrix restricted to them."""
    skip = {s.strip() for s in settings.filterdevices if s.strip()}
    table = settings.mig_profile_allowlist
    pairs = None if table is None else [(e.models, e.profiles) for e in table]

    def allowed(model: str) -> set[str]:
        return allowed_profiles(model, pairs)

    keep: list[int] = []
    devices: list[Device] = []
    for pos, card in enumerate(found.cards):
        if card.uuid in skip or str(card.index) in skip:
            continue
        keep.append(pos)
        mig = card.mode == MIG_MODE
        profiles = [p for p in card.mig_profiles if p.name in allowed(card.model)] if mig else []
        devices.append(
            Device(
                uuid=card.uuid,
                index=card.index,
                type=vendor_type(card.vendor, card.model),
                vendor=card.vendor,
                # MIG cards: HAMi applies no scaling, and a card holds as many containers
                # as it can hold instances
                count=max_instances(profiles) if mig else settings.device_split_count,
                devmem=card.memory_mib if mig else int(card.memory_mib * settings.device_memory_scaling),
                devcore=100 if mig else int(100 * settings.device_core_scaling),
                numa=card.numa,
                mode=card.mode,
                health=card.healthy,
                physical_mem=card.memory_mib,
                mig_profiles=profiles,
            )
        )
    links = [[found.links[i][j] for j in keep] for i in keep] if found.links else []
    return devices, links
