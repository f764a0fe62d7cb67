"""Harness for the native limiter tests: builds libvgpu.so and the fake driver with make,
then runs the cutest driver (isolation/native/fake/cutest.c) under LD_PRELOAD."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "isolation" / "native"
BUILD = NATIVE / "build"
FAKE = BUILD / "fake"
LIB = BUILD / "libvgpu.so"
CUTEST = FAKE / "cutest"

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="session", autouse=True)
def native_build() -> None:
    subprocess.run(["make", "-s", "-C", str(NATIVE), "fakes"], check=True, timeout=240)


@dataclass
class Result:
    rc: int
    out: list[list[str]]
    err: str

    def lines(self, op: str) -> list[list[str]]:
        return [ln for ln in self.out if ln and ln[0] == op]

    def one(self, op: str) -> list[str]:
        found = self.lines(op)
        assert len(found) == 1, (op, self.out, self.err)
        return found[0]


@dataclass
class Node:
    """One fake GPU node (shared fake device state) in a temp dir."""

    tmp: Path
    base_env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def region(self, name: str = "c0") -> Path:
        return self.tmp / f"{name}.region"

    def env(self, container: str = "c0", **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LD_LIBRARY_PATH": str(FAKE),
            "LD_PRELOAD": str(LIB),
            "HAMI_REAL_LIBCUDA": str(FAKE / "libcuda.so.1"),
            "HAMI_REAL_LIBNVML": str(FAKE / "libnvidia-ml.so.1"),
            "HAMI_SLICE_FILE": "",
            "FAKE_GPU_STATE": str(self.tmp / "fakegpu.state"),
            "CUDA_DEVICE_MEMORY_SHARED_CACHE": str(self.region(container)),
        }
        env.update(self.base_env)
        env.update(extra)
        return env

    def run(
        self, args: Sequence[str], container: str = "c0", timeout: float = 30, **extra: str
    ) -> Result:
        p = subprocess.run(
            [str(CUTEST), *args],
            env=self.env(container, **extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(p.returncode, [ln.split() for ln in p.stdout.splitlines()], p.stderr)

    def start(
        self, args: Sequence[str], container: str = "c0", **extra: str
    ) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [str(CUTEST), *args],
            env=self.env(container, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    @staticmethod
    def wait_line(p: subprocess.Popen[str], word: str) -> list[str]:
        assert p.stdout is not None
        for line in p.stdout:
            parts = line.split()
            if parts and parts[0] == word:
                return parts
        raise AssertionError(
            f"process ended before printing {word!r}: {p.stderr.read() if p.stderr else ''}"
        )

    @staticmethod
    def finish(p: subprocess.Popen[str], timeout: float = 30) -> Result:
        out, err = p.communicate(timeout=timeout)
        return Result(p.returncode, [ln.split() for ln in out.splitlines()], err)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    for p in n.procs:
        if p.poll() is None:
            p.kill()
            p.wait()
