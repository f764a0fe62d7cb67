"""Memory isolation: every allocation API is charged, the limit holds across processes,
queries report the slice, dead processes and dead lock holders are reclaimed."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from shared.region import read_region

from .conftest import GiB, MiB, Node

APIS = [
    "v2",
    "pitch",
    "managed",
    "async",
    "pool",
    "create",
    "array",
    "array3d",
    "mipmap",
    "v1",
    "pitch_v1",
]
VIAS = ["link", "dlsym", "getproc", "getproc2", "ptsz"]


@pytest.mark.parametrize("via", VIAS)
def test_every_api_stops_at_limit_and_frees(node: Node, via: str) -> None:
    # 1 GiB slice, 100 MiB pieces: exactly 10 fit whatever the API; the pitch case uses a
    # 513-byte row, so charging the width instead of the real 1024-byte pitch gives 19.
    args = ["via", via, "init", "ctx", "0"]
    for api in APIS:
        args += ["fill", api, "100m", "info", "freeall", "info"]
    r = node.run(args, CUDA_DEVICE_MEMORY_LIMIT="1g")
    assert r.rc == 0, r.err
    fills = r.lines("fill")
    infos = r.lines("info")
    assert [f[1] for f in fills] == APIS
    for f in fills:
        assert f[2:] == ["10", "2"], (via, f)  # 10 allocations, then CUDA_ERROR_OUT_OF_MEMORY
    for full, empty in zip(infos[0::2], infos[1::2], strict=True):
        assert full == ["info", "0", str(GiB - 1000 * MiB), str(GiB)]
        assert empty == ["info", "0", str(GiB), str(GiB)]  # frees credited back exactly
    assert all(f == ["freeall", "0"] for f in r.lines("freeall"))


def test_refused_allocation_leaks_nothing(node: Node) -> None:
    r = node.run(
        [
            "init",
            "ctx",
            "0",
            "alloc",
            "v2",
            "900m",
            "alloc",
            "v2",
            "200m",
            "alloc",
            "v2",
            "124m",
            "info",
        ],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
    )
    assert [a[3] for a in r.lines("alloc")] == ["0", "2", "0"]
    assert r.one("info") == ["info", "0", "0", str(GiB)]


def test_queries_report_the_slice(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "alloc", "v2", "300m", "info", "info1", "total", "0", "nvml", "0"],
        CUDA_DEVICE_MEMORY_LIMIT="2g",
    )
    assert r.one("info1") == ["info1", "0", str(2 * GiB - 300 * MiB), str(2 * GiB)]
    assert r.one("info") == ["info", "0", str(2 * GiB - 300 * MiB), str(2 * GiB)]
    assert r.one("total") == ["total", "0", str(2 * GiB)]
    assert r.one("nvml") == ["nvml", "0", str(2 * GiB), str(2 * GiB - 300 * MiB), str(300 * MiB)]
    assert r.one("nvml2") == [
        "nvml2",
        "0",
        str(2 * GiB),
        str(2 * GiB - 300 * MiB),
        str(300 * MiB),
        "0",
    ]


def test_queries_never_underflow(node: Node) -> None:
    # A process with a larger (misconfigured) limit fills the shared region past what a
    # second process's limit allows: the second must see 0 free, not a wrapped number.
    holder = node.start(
        ["init", "ctx", "0", "alloc", "v2", "1500m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="2g"
    )
    node.wait_line(holder, "ready")
    r = node.run(["init", "ctx", "0", "info", "nvml", "0"], CUDA_DEVICE_MEMORY_LIMIT="1g")
    assert r.one("info") == ["info", "0", "0", str(GiB)]
    assert r.one("nvml") == ["nvml", "0", str(GiB), "0", str(GiB)]


def test_limit_is_shared_by_the_container_processes(node: Node) -> None:
    a = node.start(
        ["init", "ctx", "0", "alloc", "v2", "600m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="1g"
    )
    node.wait_line(a, "ready")
    r = node.run(
        ["init", "ctx", "0", "alloc", "v2", "500m", "alloc", "v2", "400m"],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
    )
    assert [x[3] for x in r.lines("alloc")] == ["2", "0"]
    # another container on the same card has its own region and limit
    r = node.run(
        ["init", "ctx", "0", "alloc", "v2", "900m"], container="c1", CUDA_DEVICE_MEMORY_LIMIT="1g"
    )
    assert r.one("alloc")[3] == "0"


def test_concurrent_allocators_never_overshoot(node: Node) -> None:
    procs = [
        node.start(["init", "ctx", "0", "fill", "v2", "64m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="1g")
        for _ in range(4)
    ]
    counts = [int(node.wait_line(p, "fill")[2]) for p in procs]
    assert sum(counts) == 16  # 1 GiB / 64 MiB, however the four interleaved
    snap = read_region(node.region())
    assert snap.device(0).used_bytes == GiB
    assert sorted(sum(p.used_bytes) for p in snap.processes) == sorted(c * 64 * MiB for c in counts)


def test_sigkilled_process_is_reclaimed(node: Node) -> None:
    a = node.start(
        ["init", "ctx", "0", "alloc", "v2", "800m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="1g"
    )
    node.wait_line(a, "ready")
    assert read_region(node.region()).device(0).used_bytes == 800 * MiB
    a.send_signal(signal.SIGKILL)
    a.wait()
    r = node.run(["init", "ctx", "0", "alloc", "v2", "800m"], CUDA_DEVICE_MEMORY_LIMIT="1g")
    assert r.one("alloc")[3] == "0"
    snap = read_region(node.region())
    assert [p.pid for p in snap.processes] == []  # the survivor exited cleanly too
    assert snap.device(0).used_bytes == 0


def test_sigkilled_lock_holder_does_not_wedge_the_container(node: Node) -> None:
    a = node.start(
        ["init", "ctx", "0", "alloc", "v2", "700m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="1g"
    )
    node.wait_line(a, "ready")
    locker = node.start(["lockregion", str(node.region())])
    assert node.wait_line(locker, "locked") == ["locked", "0"]
    a.send_signal(signal.SIGKILL)
    a.wait()
    locker.send_signal(signal.SIGKILL)
    locker.wait()
    start = time.monotonic()
    r = node.run(
        ["init", "ctx", "0", "alloc", "v2", "900m", "info"],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
        timeout=10,
    )
    assert time.monotonic() - start < 5
    assert r.one("alloc")[3] == "0"
    assert r.one("info") == ["info", "0", str(124 * MiB), str(GiB)]


@pytest.mark.parametrize(
    "visible",
    [
        "1,0",
        "GPU-20212223-2425-2627-2829-2a2b2c2d2e2f,GPU-10111213-1415-1617-1819-1a1b1c1d1e1f",
        "GPU-2021,GPU-1011",
    ],
)
def test_limits_follow_cards_when_cuda_visible_devices_reorders(node: Node, visible: str) -> None:
    env = {
        "CUDA_DEVICE_MEMORY_LIMIT_0": "1g",
        "CUDA_DEVICE_MEMORY_LIMIT_1": "2g",
        "CUDA_VISIBLE_DEVICES": visible,
    }
    r = node.run(
        [
            "init",
            "ctx",
            "0",
            "fill",
            "v2",
            "100m",
            "total",
            "0",
            "total",
            "1",
            "freeall",
            "ctx",
            "1",
            "fill",
            "v2",
            "100m",
            "info",
        ],
        **env,
    )
    fills = r.lines("fill")
    assert fills[0][2] == "20" and fills[1][2] == "10", r.out  # CUDA 0 is card 1 (2 GiB)
    assert [t[2] for t in r.lines("total")] == [str(2 * GiB), str(GiB)]
    snap = read_region(node.region())
    assert snap.device(1).uuid == "GPU-20212223-2425-2627-2829-2a2b2c2d2e2f"
    assert snap.device(1).limit_bytes == 2 * GiB


def test_reordering_without_nvml_uses_the_index_list(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "fill", "v2", "100m"],
        HAMI_REAL_LIBNVML="/nonexistent.so",
        CUDA_VISIBLE_DEVICES="1",
        CUDA_DEVICE_MEMORY_LIMIT_0="1g",
        CUDA_DEVICE_MEMORY_LIMIT_1="500m",
    )
    assert r.one("fill")[2] == "5"


@pytest.mark.parametrize("create", ["ctxnew", "ctxnew1", "ctxnew3", "ctxnew4"])
def test_contexts_are_charged(node: Node, create: str) -> None:
    # Each context takes 300 MiB of the card (fake driver); the limiter measures that.
    r = node.run(
        [
            "init",
            "ctx",
            "0",
            "info",
            "fill",
            "v2",
            "100m",
            create,
            "0",
            "freeall",
            create,
            "0",
            "info",
            "ctxdestroy",
            "ctx",
            "0",
            "info",
        ],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
        FAKE_CUDA_CTX_MB="300",
    )
    infos = r.lines("info")
    assert infos[0] == ["info", "0", str(GiB - 300 * MiB), str(GiB)]
    assert r.one("fill")[2] == "7"
    created = r.lines(create)
    assert created[0][2] == "2" and created[1][2] == "0"  # refused while full, fits once freed
    assert infos[1] == ["info", "0", str(GiB - 600 * MiB), str(GiB)]
    assert infos[2] == ["info", "0", str(GiB - 300 * MiB), str(GiB)]


def test_primary_context_over_the_limit_is_refused(node: Node) -> None:
    r = node.run(["init", "ctx", "0"], CUDA_DEVICE_MEMORY_LIMIT="200m", FAKE_CUDA_CTX_MB="300")
    assert r.one("ctx") == ["ctx", "0", "2"]


def test_fixed_context_size_overrides_measurement(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "info"],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
        HAMI_CONTEXT_SIZE="100m",
        FAKE_CUDA_CTX_MB="300",
    )
    assert r.one("info") == ["info", "0", str(GiB - 100 * MiB), str(GiB)]


def test_slice_file_overrides_environment(node: Node) -> None:
    slice_file = node.tmp / "slice.env"
    slice_file.write_text(
        "# written by the device plugin for this container\n\n"
        "CUDA_DEVICE_MEMORY_LIMIT = 512m\nCUDA_VISIBLE_DEVICES=1\nnot a pair\n"
    )
    r = node.run(
        ["env", "CUDA_VISIBLE_DEVICES", "init", "ctx", "0", "fill", "v2", "100m", "info"],
        HAMI_SLICE_FILE=str(slice_file),
        CUDA_DEVICE_MEMORY_LIMIT="4g",
        CUDA_VISIBLE_DEVICES="0",
    )
    assert r.one("env") == ["env", "CUDA_VISIBLE_DEVICES", "1"]
    assert r.one("fill")[2] == "5"
    assert r.err.count("not KEY=VALUE") == 1
    snap = read_region(node.region())
    assert snap.device(1).limit_bytes == 512 * MiB


def test_missing_slice_file_falls_back_to_environment(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "fill", "v2", "100m"],
        HAMI_SLICE_FILE=str(node.tmp / "absent"),
        CUDA_DEVICE_MEMORY_LIMIT="300m",
    )
    assert r.one("fill")[2] == "3"
    assert r.err.count("HAMI_SLICE_FILE") == 1


def test_reader_lists_each_process(node: Node) -> None:
    a = node.start(
        ["init", "ctx", "0", "alloc", "v2", "300m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="1g"
    )
    node.wait_line(a, "ready")
    b = node.start(
        ["init", "ctx", "0", "alloc", "v2", "200m", "hold"], CUDA_DEVICE_MEMORY_LIMIT="1g"
    )
    node.wait_line(b, "ready")
    snap = read_region(node.region())
    assert {p.pid: p.used_bytes[0] for p in snap.processes} == {a.pid: 300 * MiB, b.pid: 200 * MiB}
    assert snap.device(0).used_bytes == 500 * MiB


def test_startup_is_not_serialised(node: Node) -> None:
    # The fake cuInit takes 400 ms, like a driver initialising; a limiter that holds a
    # container-wide lock across it (HAMi's 6x) would take 20 x 400 ms here.
    args = ["init", "ctx", "0", "alloc", "v2", "10m"]
    env = {"FAKE_CUDA_INIT_MS": "400", "CUDA_DEVICE_MEMORY_LIMIT": "1g"}
    t0 = time.monotonic()
    assert node.run(args, **env).rc == 0
    one = time.monotonic() - t0
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [str(node_cutest()), *args],
            env=node.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(20)
    ]
    results = [p.communicate(timeout=30) for p in procs]
    twenty = time.monotonic() - t0
    assert all(p.returncode == 0 for p in procs), results
    assert twenty <= 2 * one, (one, twenty)


def node_cutest() -> str:
    from .conftest import CUTEST

    return str(CUTEST)


def test_forked_child_has_its_own_slot_under_the_same_limit(node: Node) -> None:
    r = node.run(
        [
            "init",
            "ctx",
            "0",
            "alloc",
            "v2",
            "600m",
            "fork",
            "alloc",
            "v2",
            "500m",
            "alloc",
            "v2",
            "400m",
            "info",
            "endfork",
            "info",
        ],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
    )
    assert r.one("child") == ["child", "0"]
    assert [a[3] for a in r.lines("alloc")] == ["0", "2", "0"]
    child_info, parent_info = r.lines("info")
    assert child_info == ["info", "0", str(24 * MiB), str(GiB)]
    assert parent_info == ["info", "0", str(424 * MiB), str(GiB)]  # the child's 400m went with it


def test_calls_before_cuinit_do_not_disable_the_limiter(node: Node) -> None:
    # The allocation fails (no context, driver not initialised); the limit must still hold
    # once the program initialises properly.
    r = node.run(
        ["alloc", "v2", "1m", "init", "ctx", "0", "fill", "v2", "100m"],
        CUDA_DEVICE_MEMORY_LIMIT="300m",
    )
    assert r.lines("alloc")[0][3] != "0"
    assert r.one("fill")[2] == "3"
