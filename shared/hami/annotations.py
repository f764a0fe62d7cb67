"""HAMi's annotation encodings, byte for byte (REFERENCE §4 and §5).

Pod side (written by the binder, read by the node agent and on restart):
``hami.io/vgpu-devices-to-allocate`` / ``hami.io/vgpu-devices-allocated`` hold one entry
per container of the pod, init containers first, each terminated by ``;`` (an empty
entry for a container without devices keeps positions aligned); inside an entry each
device is ``UUID,TYPE,MEM_MIB,CORES:``. This is HAMi's ``EncodePodSingleDevice``.

Node side (written by the node agent): ``hami.io/node-nvidia-register`` as a JSON array
of HAMi's ``DeviceInfo`` (Go ``omitempty``: zero and false keys left out, so a missing
``health`` reads as false, as in HAMi), the older colon form (each device
``UUID,count,devmem,devcore,type,numa,health,index,mode`` terminated by ``:``, as HAMi's
``EncodeNodeDevices`` writes it; seven-field entries are read too), and
``hami.io/node-nvidia-score``.
"""

from __future__ import annotations

import json
from typing import Any

from shared.schemas import CardGrant, ContainerGrant, Device

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


def decode_container_devices(entry: str) -> list[CardGrant]:
    out: list[CardGrant] = []
    for dev in entry.split(DEVICE_SEP):
        if not dev:
            continue
        parts = dev.split(",")
        if len(parts) < 4:
            raise AnnotationError(
                f"device {dev!r}: expected UUID,TYPE,MEM,CORES (4 comma-separated fields)"
            )
        try:
            mem, cores = int(parts[2]), int(parts[3])
        except ValueError:
            raise AnnotationError(f"device {dev!r}: memory and cores must be integers") from None
        out.append(CardGrant(uuid=parts[0], vendor=parts[1], mem=mem, cores=cores))
    return out


def decode_pod_devices(value: str) -> list[list[CardGrant]]:
    """The per-container device lists of an encoded pod annotation (empty lists kept).

    A value written by older HAMi without the final ``;`` still decodes; an empty value
    means no containers.
    """
    if not value:
        return []
    entries = value.split(CONTAINER_SEP)
    if entries and entries[-1] == "":
        entries.pop()
    return [decode_container_devices(e) for e in entries]


def consume_next_container(value: str) -> tuple[int, list[CardGrant], str]:
    """Take the first container entry that still has devices (HAMi's device plugin).

    Returns ``(position, devices, new_value)`` where ``new_value`` has that entry emptied
    (positions stay aligned); ``(-1, [], value)`` when nothing is left to hand out.
    """
    entries = decode_pod_devices(value)
    for i, devs in enumerate(entries):
        if devs:
            rest = [[] if j == i else d for j, d in enumerate(entries)]
            text = "".join(encode_container_devices(d, None) + CONTAINER_SEP for d in rest)
            return i, devs, text
    return -1, [], value


# --------------------------------------------------------------------- node annotations


def _device_json(d: Device) -> dict[str, Any]:
    # Key order and omitempty as HAMi's DeviceInfo marshals it.
    full: list[tuple[str, Any]] = [
        ("id", d.uuid),
        ("index", d.index),
        ("count", d.count),
        ("devmem", d.devmem),
        ("devcore", d.devcore),
        ("type", d.type),
        ("numa", d.numa),
        ("mode", d.mode),
        ("health", d.health),
    ]
    return {k: v for k, v in full if v not in (0, "", False, None)}


def encode_node_devices(devices: list[Device]) -> str:
    """``hami.io/node-nvidia-register`` as JSON (compact, like Go's json.Marshal)."""
    return json.dumps([_device_json(d) for d in devices], separators=(",", ":"))


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    v = obj.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise AnnotationError(f"{where}: {key!r} must be an integer, got {v!r}")
    return int(v)


def decode_node_devices(value: str, vendor: str = NVIDIA) -> list[Device]:
    """Either encoding of a node's register annotation (JSON array or colon form)."""
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise AnnotationError(f"{NODE_REGISTER}: not valid JSON: {exc}") from None
        if not isinstance(raw, list):
            raise AnnotationError(f"{NODE_REGISTER}: expected a JSON array of devices")
        out: list[Device] = []
        for i, obj in enumerate(raw):
            where = f"{NODE_REGISTER}[{i}]"
            if not isinstance(obj, dict) or not obj.get("id"):
                raise AnnotationError(f"{where}: a device object with an 'id' is required")
            out.append(
                Device(
                    uuid=str(obj["id"]),
                    index=_int(obj, "index", where),
                    type=str(obj.get("type", "")),
                    vendor=vendor,
                    count=_int(obj, "count", where),
                    devmem=_int(obj, "devmem", where),
                    devcore=_int(obj, "devcore", where),
                    numa=_int(obj, "numa", where),
                    mode=str(obj.get("mode") or "hami-core"),
                    health=bool(obj.get("health", False)),
                )
            )
        return out
    return decode_node_devices_colon(text, vendor)


def encode_node_devices_colon(devices: list[Device]) -> str:
    """The older colon form, as HAMi's EncodeNodeDevices writes it (``:`` after each)."""
    return "".join(
        f"{d.uuid},{d.count},{d.devmem},{d.devcore},{d.type},{d.numa},"
        f"{'true' if d.health else 'false'},{d.index},{d.mode}{DEVICE_SEP}"
        for d in devices
    )


def decode_node_devices_colon(value: str, vendor: str = NVIDIA) -> list[Device]:
    out: list[Device] = []
    for pos, item in enumerate(p for p in value.split(DEVICE_SEP) if p.strip()):
        f = item.strip().split(",")
        if len(f) < 7:
            raise AnnotationError(
                f"device {item!r}: expected UUID,count,devmem,devcore,type,numa,health[,index,mode]"
            )
        try:
            count, devmem, devcore, numa = int(f[1]), int(f[2]), int(f[3]), int(f[5])
            index = int(f[7]) if len(f) > 7 and f[7] else pos
        except ValueError:
            raise AnnotationError(f"device {item!r}: count, devmem, devcore, numa and index must be integers") from None
        health = f[6].strip().lower()
        if health not in ("true", "false"):
            raise AnnotationError(f"device {item!r}: health must be true or false")
        out.append(
            Device(
                uuid=f[0], index=index, type=f[4], vendor=vendor, count=count, devmem=devmem,
                devcore=devcore, numa=numa, health=health == "true",
                mode=(f[8] if len(f) > 8 and f[8] else "hami-core"),
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
