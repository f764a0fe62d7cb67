"""HAMi's annotation encodings, byte for byte (REFERENCE §4 and §5).

Pod side (written by the binder, read by the node agent and on restart):
``hami.io/vgpu-devices-to-allocate`` / ``hami.io/vgpu-devices-allocated`` hold one entry
per container of the pod, init containers first, each terminated by ``;`` (an empty
entry for a container without devices keeps positions aligned); inside an entry each
device is ``UUID,TYPE,MEM_MIB,CORES:``. This is HAMi's ``EncodePodSingleDevice``.

Node side (written by the node agent): ``hami.io/node-nvidia-register`` as a JSON array
of HAMi's ``DeviceInfo`` (Go ``omitempty``: zero and false keys left out, so a missing
``health`` reads as false and a missing ``mode`` as empty, as in HAMi; ``migProfiles``
kept), the older colon form (each device ``UUID,count,devmem,devcore,type,numa,health,
index,mode`` terminated by ``:``, as HAMi's ``EncodeNodeDevices`` writes it; seven-field
entries are read too), and ``hami.io/node-nvidia-score``.

Decoding follows HAMi's decoders case for case, with HAMi's error texts; where we are
stricter (a malformed number HAMi would read as 0) docs/hami-compat.md says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from shared.schemas import CardGrant, ContainerGrant, Device, MigProfile

# ---------------------------------------------------------------------- pod annotations

VGPU_NODE = "hami.io/vgpu-node"  # annotation and label
VGPU_TIME = "hami.io/vgpu-time"
DEVICES_TO_ALLOCATE = "hami.io/vgpu-devices-to-allocate"
DEVICES_ALLOCATED = "hami.io/vgpu-devices-allocated"
BIND_PHASE = "hami.io/bind-phase"
BIND_TIME = "hami.io/bind-time"

BIND_ALLOCATING = "allocating"
BIND_SUCCESS = "success"
BIND_FAILED = "failed"

# Pod annotations users set (REFERENCE §2).
NODE_SCHEDULER_POLICY = "hami.io/node-scheduler-policy"
GPU_SCHEDULER_POLICY = "hami.io/gpu-scheduler-policy"
DEVICE_SCORING_WEIGHTS = "hami.io/device-scoring-weights"
USE_GPUTYPE = "nvidia.com/use-gputype"
NOUSE_GPUTYPE = "nvidia.com/nouse-gputype"
USE_GPUUUID = "nvidia.com/use-gpuuuid"
NOUSE_GPUUUID = "nvidia.com/nouse-gpuuuid"
NUMA_BIND = "nvidia.com/numa-bind"
VGPU_MODE = "nvidia.com/vgpu-mode"
WEBHOOK_LABEL = "hami.io/webhook"  # label; value "ignore" skips the webhook

# Node annotations (REFERENCE §3, §5).
NODE_REGISTER = "hami.io/node-nvidia-register"
NODE_SCORE = "hami.io/node-nvidia-score"
DEVICE_CORDON = "hami.io/device-cordon"

NVIDIA = "NVIDIA"

DEVICE_SEP = ":"  # ends each device of a container (HAMi OneContainerMultiDeviceSplitSymbol)
CONTAINER_SEP = ";"  # ends each container of a pod (HAMi OnePodMultiContainerSplitSymbol)


class AnnotationError(ValueError):
    """An annotation value that does not follow HAMi's encoding; the message says where."""


def encode_container_devices(devices: list[CardGrant], vendor: str | None = NVIDIA) -> str:
    """One container's entry without its ``;``: ``UUID,TYPE,MEM,CORES:`` per device.

    ``vendor``: keep only this vendor's devices (HAMi writes one annotation per vendor);
    ``None`` keeps all.
    """
    return "".join(
        f"{d.uuid},{d.vendor},{int(d.mem)},{int(d.cores)}{DEVICE_SEP}"
        for d in devices
        if vendor is None or d.vendor == vendor
    )


def encode_pod_devices(containers: list[ContainerGrant], vendor: str | None = NVIDIA) -> str:
    """The value of ``hami.io/vgpu-devices-{to-allocate,allocated}`` for a decision.

    ``containers`` must already be in pod order (init containers first, spec order),
    which is how a decision's grants are aligned.
    """
    return "".join(encode_container_devices(c.devices, vendor) + CONTAINER_SEP for c in containers)


_GO_INT = re.compile(r"[+-]?[0-9]+")
INT32_MAX = 2**31 - 1


def _go_int(text: str, what: str, where: str, bits: int = 32) -> int:
    """An integer as Go's ``strconv.ParseInt(s, 10, bits)`` reads one (no spaces, no ``_``)."""
    if not _GO_INT.fullmatch(text):
        raise AnnotationError(f"{where}: {what} {text!r} is not an integer")
    v = int(text)
    if not -(2 ** (bits - 1)) <= v < 2 ** (bits - 1):
        raise AnnotationError(f"{where}: {what} {text!r} is out of range")
    return v


# Go's strconv.ParseBool.
_GO_BOOL = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
            "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}

# HAMi's own error texts, so that a message a user searches for finds HAMi's issues too.
POD_FIELDS_MISSING = (
    "pod annotation format error; information missing, please do not use nodeName field in task"
)
NODE_DECODE_FAILED = "node annotations not decode successfully"
ANNOS_NOT_FOUND = "annos not found " + NODE_REGISTER
NO_GPU_FOUND = "no gpu found on node"


def decode_container_devices(entry: str) -> list[CardGrant]:
    """One container's entry, as HAMi's ``DecodeContainerDevices`` reads it.

    Segments without a comma are skipped (HAMi does); a segment with fewer than four
    fields is HAMi's "information missing" error. Memory and cores must be non-negative
    integers: HAMi would read a malformed number as 0, which would silently hand out a
    whole card, so we refuse it (docs/hami-compat.md).
    """
    out: list[CardGrant] = []
    for dev in entry.split(DEVICE_SEP):
        if "," not in dev:
            continue
        parts = dev.split(",")
        if len(parts) < 4:
            raise AnnotationError(POD_FIELDS_MISSING)
        where = f"device {dev!r}"
        mem = _go_int(parts[2], "memory", where)
        cores = _go_int(parts[3], "cores", where)
        if mem < 0 or cores < 0:
            raise AnnotationError(f"{where}: memory and cores must not be negative")
        out.append(CardGrant(uuid=parts[0], vendor=parts[1], mem=mem, cores=cores))
    return out


def decode_pod_devices(value: str) -> list[list[CardGrant]]:
    """The per-container device lists of an encoded pod annotation, as HAMi splits it.

    Every ``;``-separated entry is one container, empty ones included: the ``;`` that
    ends the last container yields one more, empty, entry and ``""`` is one empty
    container, exactly as HAMi's ``DecodePodDevices`` gives them (so what is written
    back after a container is consumed has HAMi's bytes).
    """
    return [decode_container_devices(e) for e in value.split(CONTAINER_SEP)]


def encode_pod_single_device(entries: list[list[CardGrant]]) -> str:
    """HAMi's ``EncodePodSingleDevice``: each entry's devices, then ``;``, all vendors kept."""
    return "".join(encode_container_devices(d, None) + CONTAINER_SEP for d in entries)


def consume_next_container(value: str) -> tuple[int, list[CardGrant], str]:
    """Take the first container entry that still has devices (HAMi's device plugin).

    Returns ``(position, devices, new_value)`` where ``new_value`` is what HAMi's
    ``EraseNextDeviceTypeFromAnnotation`` writes back: the entry emptied, re-encoded
    (which, as in HAMi, adds one ``;`` for the trailing empty entry);
    ``(-1, [], value)`` when nothing is left to hand out.
    """
    entries = decode_pod_devices(value)
    for i, devs in enumerate(entries):
        if devs:
            rest = [[] if j == i else d for j, d in enumerate(entries)]
            return i, devs, encode_pod_single_device(rest)
    return -1, [], value


# --------------------------------------------------------------------- node annotations


def _mig_profiles(d: Device) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in d.mig_profiles:
        out.append({
            "name": p.name,
            "memoryMB": p.memory_mb,
            "core": p.core,
            "sliceCount": p.slice_count,
            "placements": [{"start": x.start, "size": x.size} for x in p.placements],
        })
    return out


def _device_json(d: Device) -> dict[str, Any]:
    # Key order and omitempty as HAMi's DeviceInfo marshals it (MarshalNodeDevices).
    full: list[tuple[str, Any]] = [
        ("id", d.uuid),
        ("index", d.index),
        ("count", d.count),
        ("devmem", d.devmem),
        ("devcore", d.devcore),
        ("type", d.type),
        ("numa", d.numa),
        ("mode", d.mode),
        ("migProfiles", _mig_profiles(d)),
        ("health", d.health),
    ]
    return {k: v for k, v in full if v not in (0, "", False, None, [])}


def _go_json(obj: Any) -> str:
    # Go's json.Marshal: compact, UTF-8 kept, and <, >, &, U+2028, U+2029 escaped.
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def encode_node_devices(devices: list[Device]) -> str:
    """``hami.io/node-nvidia-register`` as JSON, byte for byte as HAMi marshals it."""
    return _go_json([_device_json(d) for d in devices])


# Go's json types of DeviceInfo's fields, for its error texts.
_JSON_FIELDS: dict[str, tuple[str, str]] = {
    # key: (kind, Go type)
    "id": ("str", "string"), "index": ("uint", "uint"), "count": ("int32", "int32"),
    "devmem": ("int32", "int32"), "devcore": ("int32", "int32"), "type": ("str", "string"),
    "numa": ("int", "int"), "mode": ("str", "string"), "health": ("bool", "bool"),
}


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return f"number {json.dumps(v)}"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _json_field(obj: dict[str, Any], key: str) -> Any:
    kind, gotype = _JSON_FIELDS[key]
    v = obj.get(key)
    if v is None:  # missing or null: Go leaves the zero value
        return {"str": "", "bool": False}.get(kind, 0)
    ok = {
        "str": isinstance(v, str),
        "bool": isinstance(v, bool),
        "uint": isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64,
        "int32": isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v <= INT32_MAX,
        "int": isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63,
    }[kind]
    if not ok:
        raise AnnotationError(
            f"json: cannot unmarshal {_json_kind(v)} into Go struct field DeviceInfo.{key} of type {gotype}")
    return v


def _decode_mig_profiles(raw: Any, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise AnnotationError(f"{where}: migProfiles must be an array of objects")
    out = []
    for p in raw:
        pl = p.get("placements") or []
        if not isinstance(pl, list) or not all(isinstance(x, dict) for x in pl):
            raise AnnotationError(f"{where}: migProfiles placements must be an array of objects")
        nums = [p.get("memoryMB", 0), p.get("core", 0), p.get("sliceCount", 0)]
        nums += [x.get(k, 0) for x in pl for k in ("start", "size")]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in nums):
            raise AnnotationError(f"{where}: migProfiles numbers must be integers")
        out.append({
            "name": str(p.get("name") or ""), "memory_mb": nums[0], "core": nums[1],
            "slice_count": nums[2],
            "placements": [{"start": int(x.get("start", 0)), "size": int(x.get("size", 0))} for x in pl],
        })
    return out


def _device_from_json(obj: Any, i: int, vendor: str) -> Device:
    where = f"{NODE_REGISTER}[{i}]"
    if not isinstance(obj, dict):
        raise AnnotationError(
            f"json: cannot unmarshal {_json_kind(obj)} into Go value of type device.DeviceInfo")
    f = {k: _json_field(obj, k) for k in _JSON_FIELDS}
    if not f["id"]:
        # HAMi would register a card nobody can name; no slice could ever point at it.
        raise AnnotationError(f"{where}: a device object with an 'id' is required")
    kw: dict[str, Any] = {}
    profiles = _decode_mig_profiles(obj.get("migProfiles"), where)
    if profiles:
        kw["mig_profiles"] = msgspec.convert(profiles, list[MigProfile])
    return Device(
        uuid=f["id"], index=f["index"], type=f["type"], vendor=vendor, count=f["count"],
        devmem=f["devmem"], devcore=f["devcore"], numa=f["numa"],
        mode=f["mode"],  # a missing mode stays empty, as in HAMi
        health=f["health"], **kw,
    )


def decode_node_devices(value: str, vendor: str = NVIDIA) -> list[Device]:
    """A node's register annotation, JSON array or colon form, as HAMi's scheduler reads it.

    Errors are HAMi's (``no gpu found on node`` for a register without a card; the
    colon decoder's ``node annotations not decode successfully``; Go's json errors for a
    mistyped field, e.g. a negative index).
    """
    if value.lstrip().startswith("["):
        try:
            raw = json.loads(value)
        except ValueError as exc:
            raise AnnotationError(f"{NODE_REGISTER}: not valid JSON: {exc}") from None
        if not isinstance(raw, list):
            raise AnnotationError(
                f"json: cannot unmarshal {_json_kind(raw)} into Go value of type []*device.DeviceInfo")
        out = [_device_from_json(obj, i, vendor) for i, obj in enumerate(raw)]
    else:
        out = decode_node_devices_colon(value, vendor)
    if not out:
        raise AnnotationError(NO_GPU_FOUND)
    return out


def node_devices_from_annotations(annotations: Mapping[str, str], vendor: str = NVIDIA) -> list[Device]:
    """A Node's cards from its annotations (HAMi's ``GetNodeDevices`` for NVIDIA)."""
    value = annotations.get(NODE_REGISTER)
    if value is None:
        raise AnnotationError(ANNOS_NOT_FOUND)
    return decode_node_devices(value, vendor)


def encode_node_devices_colon(devices: list[Device]) -> str:
    """The older colon form, as HAMi's EncodeNodeDevices writes it (``:`` after each)."""
    return "".join(
        f"{d.uuid},{d.count},{d.devmem},{d.devcore},{d.type},{d.numa},"
        f"{'true' if d.health else 'false'},{d.index},{d.mode}{DEVICE_SEP}"
        for d in devices
    )


def decode_node_devices_colon(value: str, vendor: str = NVIDIA) -> list[Device]:
    """HAMi's ``DecodeNodeDevices``: 7- or 9-field entries, comma-less segments skipped.

    The seven-field form has no index or mode: HAMi gives index 0 and ``hami-core``.
    HAMi reads a malformed number or boolean as 0/false; we refuse it (docs/hami-compat.md).
    """
    if DEVICE_SEP not in value:
        raise AnnotationError(NODE_DECODE_FAILED)
    out: list[Device] = []
    for item in value.split(DEVICE_SEP):
        if "," not in item:
            continue
        f = item.split(",")
        if len(f) not in (7, 9):
            raise AnnotationError(NODE_DECODE_FAILED)
        where = f"device {item!r}"
        count = _go_int(f[1], "count", where)
        devmem = _go_int(f[2], "devmem", where)
        devcore = _go_int(f[3], "devcore", where)
        numa = _go_int(f[5], "numa", where, bits=64)
        health = _GO_BOOL.get(f[6])
        if health is None:
            raise AnnotationError(f"{where}: health {f[6]!r} is not a boolean")
        index, mode = 0, "hami-core"
        if len(f) == 9:
            index = _go_int(f[7], "index", where, bits=64)
            if index < 0:
                raise AnnotationError(f"index field must not be negative: {index}")
            mode = f[8]
        out.append(
            Device(
                uuid=f[0], index=index, type=f[4], vendor=vendor, count=count, devmem=devmem,
                devcore=devcore, numa=numa, health=health, mode=mode,
            )
        )
    return out


def encode_node_scores(devices: list[Device], links: list[list[int]]) -> str:
    """``hami.io/node-nvidia-score``: each card's pair scores to the others, by UUID."""
    out = []
    for i, d in enumerate(devices):
        row = links[i] if i < len(links) else []
        score = {devices[j].uuid: int(row[j]) for j in range(min(len(row), len(devices))) if j != i}
        out.append({"uuid": d.uuid, "score": score})
    return json.dumps(out, separators=(",", ":"))


def decode_node_scores(value: str, devices: list[Device]) -> list[list[int]]:
    """Pair scores back into a matrix indexed like ``devices`` (0 where unknown)."""
    if not value.strip():
        return []
    try:
        raw = json.loads(value)
    except ValueError as exc:
        raise AnnotationError(f"{NODE_SCORE}: not valid JSON: {exc}") from None
    pos = {d.uuid: i for i, d in enumerate(devices)}
    n = len(devices)
    m = [[0] * n for _ in range(n)]
    if not isinstance(raw, list):
        raise AnnotationError(f"{NODE_SCORE}: expected a JSON array")
    for obj in raw:
        if not isinstance(obj, dict):
            raise AnnotationError(f"{NODE_SCORE}: expected objects with uuid and score")
        i = pos.get(str(obj.get("uuid")))
        score = obj.get("score") or {}
        if i is None or not isinstance(score, dict):
            continue
        for other, s in score.items():
            j = pos.get(other)
            if j is not None and isinstance(s, int):
                m[i][j] = s
    return m
