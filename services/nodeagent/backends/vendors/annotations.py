"""The node annotations each vendor's HAMi plugin writes, from the agent's inventory. Pure.

- DeviceInfo JSON (Ascend, AMD, Kunlunxin vXPU, Biren, Vastai): ``[{id, index, count,
  devmem, devcore, type, numa, health, deviceVendor?, customInfo?}]`` with Go's
  omitempty, under the family's register annotation;
- the legacy colon list (Hygon, Iluvatar): ``id,count,devmem,devcore,type,numa,health,index,mode:``;
- the vendor's own JSON (MetaX sGPU, Enflame DRS);
- nothing for the capacity-derived families (Cambricon, Moore Threads, AWS Neuron):
  HAMi reads their cards from node capacity.

plus the handshake ``Reported <time>`` (Ascend: ``Reported_<time>``) that HAMi's scheduler
turns to ``Requesting_...`` and expects answered.

Ascend also gets the node annotation ``hami-vnpu-core``: ``false`` in hard (vNPU template)
mode, ``true`` when registration marked the cards soft (the node setting
``ascendSoftMode``, hami-vnpu-core limiter), whose devcore is then 100 (percent) instead of
the AI-core count, as ascend-device-plugin's ``registerHAMi`` writes in that mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from services.nodeagent.backends.vendors import FAMILIES, enflame, metax
from services.nodeagent.backends.vendors.base import Family
from shared.devices import ascend as ascend_rules
from shared.hami.annotations import encode_node_devices_colon
from shared.schemas import Device


def device_info(d: Device, fam: Family) -> dict[str, Any]:
    """One DeviceInfo object, key order and omitempty as HAMi marshals it (an index of
    0 is left out, as HAMi's NVIDIA register does; decoders read it back as 0)."""
    full: list[tuple[str, Any]] = [
        ("id", d.uuid), ("index", d.index), ("count", d.count), ("devmem", d.devmem),
        ("devcore", d.devcore), ("type", d.type), ("numa", d.numa), ("mode", d.mode),
        ("health", d.health), ("deviceVendor", fam.device_vendor), ("customInfo", dict(d.custom_info)),
    ]  # fmt: skip
    return {k: v for k, v in full if v not in (0, "", False, None, {})}


def encode_register(fam: Family, devices: Sequence[Device]) -> str | None:
    """The register annotation's value for one family's cards (None: it has none)."""
    if fam.register == "json":
        if fam.key.startswith("Ascend"):
            # the plugin writes no mode (ours marks soft-mode cards for placement)
            devices = [msgspec.structs.replace(d, mode="") for d in devices]
        return json.dumps(
            [device_info(d, fam) for d in devices], separators=(",", ":"), ensure_ascii=False
        )
    if fam.register == "colon":
        return encode_node_devices_colon(list(devices))
    if fam.register == "metax":
        return metax.encode_register(devices)
    if fam.register == "enflame":
        return enflame.encode_register(devices)
    return None


def handshake(fam: Family, at: float) -> str:
    t = time.gmtime(at)
    if fam.handshake_style == "underscore":
        return "Reported_" + time.strftime("%Y.%m.%d %H:%M:%S", t)
    return "Reported " + time.strftime("%Y-%m-%d %H:%M:%S", t)


def vendor_annotations(devices: Sequence[Device], at: float | None = None) -> dict[str, str]:
    """Every non-NVIDIA family's register annotation (and handshake) for ``devices``."""
    by_family: dict[str, list[Device]] = {}
    for d in devices:
        if d.vendor in FAMILIES:
            by_family.setdefault(d.vendor, []).append(d)
    out: dict[str, str] = {}
    for key, devs in by_family.items():
        fam = FAMILIES[key]
        value = encode_register(fam, devs)
        if value is None or not fam.register_annotation:
            continue
        out[fam.register_annotation] = value
        if fam.handshake_annotation:
            out[fam.handshake_annotation] = handshake(fam, time.time() if at is None else at)
        if key.startswith("Ascend"):
            # "false": hard (template) mode, the runtime creates vNPUs; "true": soft mode,
            # the hami-vnpu-core limiter enforces each pod's memory and core share
            # (registration marks a soft-mode node's cards: node.ascendSoftMode)
            soft = all(d.mode == ascend_rules.SOFT_NODE for d in devs)
            out[ascend_rules.SOFT_NODE] = "true" if soft else "false"
    return out


def capacity(devices: Sequence[Device]) -> dict[str, int]:
    """The extended resources a capacity-derived family is counted by (HAMi builds its
    cards from these): one per card, and cores where the family has a core resource."""
    out: dict[str, int] = {}
    for d in devices:
        fam = FAMILIES.get(d.vendor)
        if fam is None or fam.register != "capacity":
            continue
        count, _, cores = fam.resources
        out[count] = out.get(count, 0) + 1
        if cores:
            per = d.devcore.bit_count() if fam.key == "AWSNeuron" else d.devcore  # a core mask
            out[cores] = out.get(cores, 0) + (per if fam.key in ("AWSNeuron", "Mthreads") else 100)
    return out
