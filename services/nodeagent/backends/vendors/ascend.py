"""Huawei Ascend NPUs (910B*, 310P): HAMi's ascend-device-plugin, as data and pure functions.

Each chip is its own HAMi device type (the ConfigMap's ``commonWord``): resources
``huawei.com/<commonWord>``, ``-memory``, ``-core``; register annotation
``hami.io/node-register-<commonWord>`` (DeviceInfo JSON, contiguous index from 0, ID = the
die ID, count = allocatable memory / the smallest template's, customInfo NetworkID on
910 chips) and handshake ``hami.io/node-handshake-<commonWord>`` = ``Reported_<time>``.
Memory and AI cores come from the ConfigMap table, not the chip; the tables below are
HAMi's chart defaults.

Soft mode (node setting ``ascendSoftMode``, the plugin's hami-vnpu-core): the register
annotation's devcore is 100 (percent) instead of the AI cores and the node annotation
``hami-vnpu-core`` says ``true`` (vendors/annotations.py writes both).

Discovery: ``npu-smi`` has no JSON; ``npu-smi info -m`` (the NPU/chip mapping table) and
``npu-smi info -t usages -i <npu> -c <chip>`` (``HBM Capacity(MB) : n``) are parsed.
"""

from __future__ import annotations

import re

from services.nodeagent.backends import PhysicalCard
from services.nodeagent.backends.vendors.base import (
    CommandError,
    Family,
    Model,
    Runner,
    Template,
    hami_names,
)

T = Template
MODELS: dict[str, Model] = {
    "Ascend910A": Model("Ascend910A", "Ascend910A", 32768, 30,
                        (T("vir02", 2184, 2), T("vir04", 4369, 4), T("vir08", 8738, 8), T("vir16", 17476, 16)),
                        aliases=("910A",), topology="network8"),
    "Ascend910B2": Model("Ascend910B2", "Ascend910B2", 65536, 24,
                         (T("vir03_1c_8g", 8192, 3), T("vir06_1c_16g", 16384, 6), T("vir12_3c_32g", 32768, 12)),
                         aliases=("910B2",), topology="network8"),
    "Ascend910B3": Model("Ascend910B3", "Ascend910B3", 65536, 20,
                         (T("vir05_1c_16g", 16384, 5), T("vir10_3c_32g", 32768, 10)),
                         aliases=("910B3", "Ascend910B"), topology="network8"),
    "Ascend910B4": Model("Ascend910B4", "Ascend910B4", 32768, 20,
                         (T("vir05_1c_8g", 8192, 5), T("vir10_3c_16g", 16384, 10)),
                         aliases=("910B4",), topology="network8"),
    "Ascend310P": Model("Ascend310P", "Ascend310P", 21527, 8,
                        (T("vir01", 3072, 1), T("vir02", 6144, 2), T("vir04", 12288, 4)),
                        aliases=("310P", "310P3")),
}  # fmt: skip


def family(common_word: str) -> Family:
    m = MODELS[common_word]
    return Family(
        **hami_names(common_word),
        register="json",
        handshake_style="underscore",
        models=(m,),
        dev_globs=("davinci[0-9]*",),
        pci_vendors=("0x19e5",),
        extra={"to_allocate": f"hami.io/{common_word}-devices-to-allocate",
               "runtime_info": f"huawei.com/{common_word}", "vnpu_core": "hami-vnpu-core"},
    )  # fmt: skip


FAMILIES = tuple(family(k) for k in MODELS)


def slots(model: Model) -> int:
    """HAMi's count: allocatable memory over the smallest template's memory."""
    if not model.templates:
        return 1
    return max(1, model.memory_mib // min(t.memory_mib for t in model.templates))


def network_id(model: Model, index: int) -> int | None:
    """customInfo NetworkID: 910 chips 0 for indexes 0-3 and 1 above (910C always 0)."""
    if not model.name.startswith("Ascend910"):
        return None
    return 0 if index < 4 or model.name == "Ascend910C" else 1


def die_id(serial: str) -> str:
    """A die ID shaped as DCMI prints it: five 8-digit hex words."""
    s = (serial * 3)[:40].upper()
    return " ".join(s[i : i + 8] for i in range(0, 40, 8))


def trim_memory(model: Model, mib: int) -> tuple[int, str]:
    """A request rounded up to the smallest template that holds it (HAMi's trimMemory):
    (memory, template name); the whole card with no template above the largest; (0, "")
    when it exceeds the card."""
    for t in sorted(model.templates, key=lambda t: t.memory_mib):
        if mib <= t.memory_mib:
            return t.memory_mib, t.name
    return (model.memory_mib, "") if mib <= model.memory_mib else (0, "")


def model_for_chip(chip_name: str) -> Model | None:
    """The model of an ``npu-smi`` Chip Name such as ``910B3`` or ``310P3``."""
    want = chip_name.strip().upper()
    for m in MODELS.values():
        if want in (a.upper() for a in (m.name, *m.aliases)):
            return m
    return None


# ---------------------------------------------------------------------- npu-smi


def parse_mapping(text: str) -> list[tuple[int, int, str]]:
    """``npu-smi info -m``: (npu id, chip id, chip name) of every compute chip; MCU rows
    (management chips, Logic ID ``MCU``) are skipped. Both header layouts are read."""
    rows: list[tuple[int, int, str]] = []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or "NPU ID" not in lines[0]:
        raise CommandError("npu-smi info -m: no 'NPU ID' header")
    new_layout = "Slot ID" in lines[0]
    for ln in lines[1:]:
        f = ln.split()
        if len(f) < 4 or not f[0].isdigit():
            continue
        if new_layout:  # NPU ID, Slot ID, Chip ID, Chip Phy-ID, Chip Name
            if len(f) < 5:
                continue
            rows.append((int(f[0]), int(f[2]), " ".join(f[4:])))
            continue
        # Management chips: Logic ID "MCU" (or "-" with the name "Mcu" on some drivers)
        if f[2].upper() in ("MCU", "-") or f[3].upper() == "MCU" or not f[1].isdigit():
            continue
        rows.append((int(f[0]), int(f[1]), " ".join(f[3:])))
    return rows


_KV = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")


def parse_kv(text: str) -> dict[str, str]:
    """``Key : value`` lines of an ``npu-smi info -t ...`` block."""
    out: dict[str, str] = {}
    for ln in text.splitlines():
        m = _KV.match(ln)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def discover(run: Runner) -> list[PhysicalCard]:
    """Every compute chip ``npu-smi`` lists, in (npu, chip) order, indexed from 0."""
    cards: list[PhysicalCard] = []
    for npu, chip, name in parse_mapping(run(["npu-smi", "info", "-m"])):
        model = model_for_chip(name.replace("Ascend", ""))
        if model is None:
            raise CommandError(f"npu-smi: chip {name!r} is not in the template table")
        usage = parse_kv(run(["npu-smi", "info", "-t", "usages", "-i", str(npu), "-c", str(chip)]))
        hbm = usage.get("HBM Capacity(MB)", "")
        if not hbm.isdigit():
            raise CommandError(f"npu-smi: NPU {npu} chip {chip}: no HBM Capacity(MB)")
        i = len(cards)
        nid = network_id(model, i)
        cards.append(
            PhysicalCard(
                # The plugin names a chip by its DCMI die ID, which npu-smi does not
                # print in these outputs: the (npu, chip) pair stands in for it.
                uuid=f"Ascend-npu{npu}-chip{chip}",
                index=i,
                model=model.name,
                memory_mib=model.memory_mib,  # HAMi registers the table's allocatable memory
                vendor=model.name,
                type=model.type,
                cores=model.cores,
                custom_info=(("NetworkID", nid),) if nid is not None else (),
            )
        )
    return cards


# ---------------------------------------------------------------------- Allocate
