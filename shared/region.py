"""Reader of the limiter's per-container shared region (isolation/native/README.md).

The node agent reads each container's region file for per-device telemetry (memory used,
limit, SM utilisation, time of the last kernel) and per-process entries. Reading takes no
lock: the library updates fields in place, so a snapshot may mix values from two instants,
which is fine for telemetry. The one write, ``set_priority_hint``, touches only fields the
library reads and never writes.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x52475648
VERSION = 1

_HEADER = struct.Struct("<IIIIIIIiIIQ")  # magic .. created_ns, at offset 0
_DEVICES_OFFSET = 128
_DEVICE = struct.Struct("<QQQqdQQIIIIQQQQII32x48s")
_SLOT_HEAD = struct.Struct("<iIiiQQ32x")
_HINTS_OFFSET = 36
_PRIO_HINT_OFFSET = 48  # within a device record

POLICIES = ("default", "force", "disable")


class RegionError(ValueError):
    """The file is not a region this reader understands."""


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    hostpid: int
    priority: int
    last_kernel_ns: int
    used_bytes: tuple[int, ...]
    utilization: tuple[int, ...]


@dataclass(frozen=True)
class DeviceState:
    index: int
    uuid: str
    limit_bytes: int  # 0 = unlimited
    used_bytes: int
    total_bytes: int  # real card memory, 0 until a process has asked
    sm_limit: int  # percent, 0 = no cap
    utilization: int  # container's SM utilisation, percent
    device_utilization: int  # whole card, percent
    last_kernel_ns: int  # CLOCK_REALTIME, 0 = never
    throttling: bool
    contended: bool

    def last_kernel_elapsed_s(self, now_ns: int | None = None) -> float | None:
        if not self.last_kernel_ns:
            return None
        now = time.time_ns() if now_ns is None else now_ns
        return max(0.0, (now - self.last_kernel_ns) / 1e9)


@dataclass(frozen=True)
class RegionSnapshot:
    version: int
    priority: int
    policy: str
    created_ns: int
    devices: tuple[DeviceState, ...]
    processes: tuple[ProcessEntry, ...]

    def device(self, index: int) -> DeviceState:
        for d in self.devices:
            if d.index == index:
                return d
        raise KeyError(index)


def _layout(buf: bytes) -> tuple[int, ...]:
    if len(buf) < _HEADER.size:
        raise RegionError("region file too short")
    fields = _HEADER.unpack_from(buf, 0)
    magic, version, header_size, slot_size, max_slots, max_devices = fields[:6]
    if magic != MAGIC:
        raise RegionError(f"bad magic {magic:#x}")
    if version != VERSION:
        raise RegionError(f"region version {version}, reader knows {VERSION}")
    if slot_size < _SLOT_HEAD.size + max_devices * 20:
        raise RegionError("slot size too small for its device count")
    if len(buf) < header_size + slot_size * max_slots:
        raise RegionError("region file shorter than its header says")
    if _DEVICES_OFFSET + _DEVICE.size * max_devices > header_size:
        raise RegionError("device records overflow the header")
    return fields


def parse_region(buf: bytes) -> RegionSnapshot:
    fields = _layout(buf)
    _, version, header_size, slot_size, max_slots, max_devices = fields[:6]
    num_devices, priority, policy, _hints, created_ns = fields[6:]
    devices: list[DeviceState] = []
    for i in range(max_devices):
        (
            limit,
            used,
            last_kernel,
            _tokens,
            _rate,
            _refill,
            _hint,
            sm_limit,
            util_own,
            util_dev,
            throttling,
            total,
            _ctl,
            _launched,
            _seen,
            contended,
            _r0,
            uuid_raw,
        ) = _DEVICE.unpack_from(buf, _DEVICES_OFFSET + i * _DEVICE.size)
        uuid = uuid_raw.split(b"\0", 1)[0].decode("ascii", "replace")
        if i >= num_devices and not (uuid or used or last_kernel):
            continue
        devices.append(
            DeviceState(
                index=i,
                uuid=uuid,
                limit_bytes=limit,
                used_bytes=used,
                total_bytes=total,
                sm_limit=sm_limit,
                utilization=util_own,
                device_utilization=util_dev,
                last_kernel_ns=last_kernel,
                throttling=bool(throttling),
                contended=bool(contended),
            )
        )
    used_fmt = struct.Struct(f"<{max_devices}Q")
    util_fmt = struct.Struct(f"<{max_devices}I")
    procs: list[ProcessEntry] = []
    for s in range(max_slots):
        off = header_size + s * slot_size
        pid, state, hostpid, prio, _start, last_kernel = _SLOT_HEAD.unpack_from(buf, off)
        if state != 1:
            continue
        used_off = off + _SLOT_HEAD.size
        util_off = used_off + 2 * used_fmt.size  # after used[] and launched[]
        procs.append(
            ProcessEntry(
                pid=pid,
                hostpid=hostpid,
                priority=prio,
                last_kernel_ns=last_kernel,
                used_bytes=used_fmt.unpack_from(buf, used_off),
                utilization=util_fmt.unpack_from(buf, util_off),
            )
        )
    return RegionSnapshot(
        version=version,
        priority=priority,
        policy=POLICIES[policy] if 0 <= policy < len(POLICIES) else str(policy),
        created_ns=created_ns,
        devices=tuple(devices),
        processes=tuple(procs),
    )


def read_region(path: str | os.PathLike[str]) -> RegionSnapshot:
    """Snapshot of the region file at ``path``; RegionError if it is not one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise RegionError("region file is empty")
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            return parse_region(bytes(m))


def set_priority_hint(path: str | Path, device: int, until_ns: int) -> None:
    """Tell low-priority tenants of this container to yield ``device`` until ``until_ns``
    (CLOCK_REALTIME); 0 clears it. The expiry bounds the suspension if the agent dies."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), size) as m:
            fields = _layout(bytes(m))
            if not 0 <= device < fields[5]:
                raise IndexError(device)
            off = _DEVICES_OFFSET + device * _DEVICE.size + _PRIO_HINT_OFFSET
            struct.pack_into("<Q", m, off, until_ns)
            any_hint = until_ns != 0 or any(
                struct.unpack_from("<Q", m, _DEVICES_OFFSET + i * _DEVICE.size + _PRIO_HINT_OFFSET)[
                    0
                ]
                for i in range(fields[5])
            )
            struct.pack_into("<I", m, _HINTS_OFFSET, 1 if any_hint else 0)
