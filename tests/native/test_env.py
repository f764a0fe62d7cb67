"""Bad environment: one clear log line per bad variable, a documented safe behaviour, and
never a crash."""

from __future__ import annotations

import pytest

from .conftest import GiB, Node

FILL = ["init", "ctx", "0", "fill", "v2", "1g", "freeall"]


@pytest.mark.parametrize(
    ("value", "fits", "message"),
    [
        ("abc", 16, "is not a size"),  # ignored: no limit, the whole 16 GiB card
        ("-5g", 16, "is not a size"),
        ("12q", 16, "is not a size"),
        ("99999999999999999999999g", 16, "overflows"),  # larger than any card
        ("18014398509481984g", 16, "overflows"),  # fits 64 bits as a number, not in bytes
    ],
)
def test_bad_memory_limit(node: Node, value: str, fits: int, message: str) -> None:
    r = node.run(FILL, CUDA_DEVICE_MEMORY_LIMIT=value)
    assert r.rc == 0
    assert r.one("fill")[2] == str(fits)
    logged = [ln for ln in r.err.splitlines() if "CUDA_DEVICE_MEMORY_LIMIT" in ln]
    assert len(logged) == 1 and message in logged[0], r.err


def test_bad_per_device_limit_falls_back_to_the_default(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "fill", "v2", "100m"],
        CUDA_DEVICE_MEMORY_LIMIT="1g",
        CUDA_DEVICE_MEMORY_LIMIT_0="x1",
    )
    assert r.one("fill")[2] == "10"
    assert r.err.count("CUDA_DEVICE_MEMORY_LIMIT_0='x1'") == 1


@pytest.mark.parametrize(
    "suffix", ["1073741824", "1048576k", "1024m", "1g", "1G", "1024MiB", " 1g "]
)
def test_size_spellings(node: Node, suffix: str) -> None:
    r = node.run(["init", "ctx", "0", "info"], CUDA_DEVICE_MEMORY_LIMIT=suffix)
    assert r.one("info") == ["info", "0", str(GiB), str(GiB)]
    assert r.err == ""


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CUDA_DEVICE_SM_LIMIT", "half", "not a percentage"),
        ("CUDA_DEVICE_SM_LIMIT", "-30", "not a percentage"),
        ("CUDA_DEVICE_SM_LIMIT", "250", "above 100"),
        ("GPU_CORE_UTILIZATION_POLICY", "sometimes", "default|force|disable"),
        ("CUDA_TASK_PRIORITY", "urgent", "integer"),
        ("LIBCUDA_LOG_LEVEL", "loud", "0-4"),
        ("HAMI_UTIL_PERIOD_MS", "99999999999999999999", "10-10000"),
    ],
)
def test_bad_control_values_log_once_and_run(
    node: Node, name: str, value: str, message: str
) -> None:
    r = node.run(
        ["init", "ctx", "0", "alloc", "v2", "1m", "launch", "kernel", "300", "100", "0"],
        FAKE_CUDA_NS_PER_BLOCK="1000",
        **{name: value},
    )
    assert r.rc == 0, r.err
    logged = [ln for ln in r.err.splitlines() if name in ln]
    assert len(logged) == 1 and message in logged[0], r.err
    assert "[HAMI-vgpu" in logged[0] and "WARN" in logged[0]
    # a bad cap means no cap: the tenant runs at full speed
    assert float(r.one("launch")[4].split("=")[1]) >= 80


def test_log_level_zero_silences_warnings(node: Node) -> None:
    r = node.run(FILL, CUDA_DEVICE_MEMORY_LIMIT="junk", LIBCUDA_LOG_LEVEL="0")
    assert r.rc == 0 and r.err == ""


def test_unwritable_region_falls_back_to_process_accounting(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "fill", "v2", "100m"],
        CUDA_DEVICE_MEMORY_SHARED_CACHE="/proc/forbidden/region",
        CUDA_DEVICE_MEMORY_LIMIT="1g",
    )
    assert r.one("fill")[2] == "10"
    assert r.err.count("cannot open region") == 1


def test_unloadable_real_driver_path_falls_back_to_the_default(node: Node) -> None:
    r = node.run(
        ["init", "ctx", "0", "fill", "v2", "100m"],
        HAMI_REAL_LIBCUDA="/nonexistent/libcuda.so.1",
        CUDA_DEVICE_MEMORY_LIMIT="300m",
    )
    assert r.one("init") == ["init", "0"]
    assert r.one("fill")[2] == "3"  # the limiter still applies, through libcuda.so.1
    assert r.err.count("HAMI_REAL_LIBCUDA") == 1
