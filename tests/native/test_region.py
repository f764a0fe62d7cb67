"""shared.region against regions written by libvgpu.so, and against garbage."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.region import MAGIC, RegionError, parse_region, read_region, set_priority_hint

from .conftest import GiB, MiB, Node

REGION_SIZE = 4096 + 1024 * 384


def test_reader_sees_what_the_library_wrote(node: Node) -> None:
    p = node.start(
        [
            "init",
            "ctx",
            "0",
            "alloc",
            "v2",
            "300m",
            "ctx",
            "1",
            "alloc",
            "create",
            "200m",
            "launch",
            "kernel",
            "200",
            "10",
            "0",
            "hold",
        ],
        CUDA_DEVICE_MEMORY_LIMIT_0="1g",
        CUDA_DEVICE_MEMORY_LIMIT_1="2g",
        CUDA_DEVICE_SM_LIMIT_1="40",
        GPU_CORE_UTILIZATION_POLICY="force",
        CUDA_TASK_PRIORITY="0",
        FAKE_CUDA_NS_PER_BLOCK="1000",
    )
    node.wait_line(p, "ready")
    before = time.time_ns()
    snap = read_region(node.region())
    assert os.path.getsize(node.region()) == REGION_SIZE
    assert snap.version == 1 and snap.policy == "force" and snap.priority == 0
    d0, d1 = snap.device(0), snap.device(1)
    assert [d.index for d in snap.devices] == [0, 1]
    assert (d0.limit_bytes, d0.used_bytes, d0.sm_limit) == (GiB, 300 * MiB, 0)
    assert (d1.limit_bytes, d1.used_bytes, d1.sm_limit) == (2 * GiB, 200 * MiB, 40)
    assert d0.uuid == "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"
    assert d0.total_bytes == d1.total_bytes == 16 * GiB
    # the launches ran on card 1 (current context); card 0 saw none
    assert d0.last_kernel_ns == 0
    elapsed = d1.last_kernel_elapsed_s(before)
    assert elapsed is not None and elapsed < 5
    (proc,) = snap.processes
    assert proc.pid == p.pid and proc.hostpid == p.pid and proc.priority == 0
    assert proc.used_bytes[:2] == (300 * MiB, 200 * MiB)
    assert proc.last_kernel_ns >= d1.last_kernel_ns


def test_priority_hint_round_trip(node: Node) -> None:
    assert node.run(["init", "ctx", "0"]).rc == 0
    set_priority_hint(node.region(), 1, 123)
    raw = node.region().read_bytes()
    assert struct.unpack_from("<I", raw, 36)[0] == 1
    assert struct.unpack_from("<Q", raw, 128 + 192 + 48)[0] == 123
    set_priority_hint(node.region(), 1, 0)
    assert struct.unpack_from("<I", node.region().read_bytes(), 36)[0] == 0
    with pytest.raises(IndexError):
        set_priority_hint(node.region(), 16, 1)


def test_rejects_what_it_does_not_understand(tmp_path: Path) -> None:
    f = tmp_path / "r"
    f.write_bytes(b"")
    with pytest.raises(RegionError):
        read_region(f)
    good = bytearray(REGION_SIZE)
    struct.pack_into("<IIIIII", good, 0, MAGIC, 1, 4096, 384, 1024, 16)
    assert parse_region(bytes(good)).processes == ()
    for off, value in [(0, 0xDEAD), (4, 2), (12, 8)]:
        bad = bytearray(good)
        struct.pack_into("<I", bad, off, value)
        with pytest.raises(RegionError):
            parse_region(bytes(bad))
    with pytest.raises(RegionError):
        parse_region(bytes(good[:8000]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 4096))
def test_garbage_never_raises_anything_but_region_error(junk: bytes, at: int) -> None:
    buf = bytearray(REGION_SIZE)
    struct.pack_into("<IIIIII", buf, 0, MAGIC, 1, 4096, 384, 1024, 16)
    buf[at : at + len(junk)] = junk
    try:
        parse_region(bytes(buf))
    except RegionError:
        pass
