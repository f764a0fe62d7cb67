"""A non-root workload keeps its shared usage region in a directory the node agent prepared.

The node agent (services/nodeagent/slices.py) writes a container's slice directory as
root; the workload may run as any user. Here the real SliceWriter prepares the directory,
it is bind-mounted at the container path ``/usr/local/vgpu/slice`` in a private mount
namespace (as the CSI volume does in a pod), and the fake CUDA program runs under the
limiter as ``nobody``: it must account in the shared region, and must not be able to
create anything else in its directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from services.nodeagent.slices import CONTAINERS_DIR, REGION_FILE, REGION_SIZE, SliceWriter
from shared.config import NodeSettings
from shared.region import read_region
from tests.node.util import grant, pod

from .conftest import CUTEST, FAKE, LIB, MiB

NOBODY = 65534
CARD0 = "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"  # the fake driver's card 0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="needs root, unshare and setpriv (mount namespace, then drop to nobody)",
)


@pytest.fixture
def world() -> Iterator[Path]:
    # pytest's tmp_path is 0700 under root's directory: nobody could not reach it.
    d = Path(tempfile.mkdtemp(prefix="nonroot-"))
    try:
        os.chmod(d, 0o755)
        (d / "host").mkdir(mode=0o755)
        (d / "gpu").mkdir()
        os.chmod(d / "gpu", 0o777)  # the fake driver's shared state, any user
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def prepare(host_root: Path) -> Path:
    w = SliceWriter(host_root, "n1", NodeSettings())
    asyncio.run(w.sync({"u1": pod("u1", grant("main", [CARD0], mem=1024))}))
    return host_root / CONTAINERS_DIR / "u1_main"


def as_nobody_in_slice(world: Path, slice_dir: Path, argv: Sequence[str]) -> list[str]:
    """argv in a private mount namespace where ``slice_dir`` is /usr/local/vgpu/slice (a
    tmpfs over /usr/local keeps the host's untouched), run as nobody."""
    script = (
        "set -e; mount -t tmpfs none /usr/local; mkdir -p /usr/local/vgpu/slice; "
        'mount --bind "$0" /usr/local/vgpu/slice; '
        f'exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(slice_dir),
        *argv,
    ]


def limiter_env(world: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LD_LIBRARY_PATH": str(FAKE),
        "LD_PRELOAD": str(LIB),
        "HAMI_REAL_LIBCUDA": str(FAKE / "libcuda.so.1"),
        "HAMI_REAL_LIBNVML": str(FAKE / "libnvidia-ml.so.1"),
        "FAKE_GPU_STATE": str(world / "gpu" / "fakegpu.state"),
        # HAMI_SLICE_FILE unset: the limiter reads /usr/local/vgpu/slice/env, as in a pod,
        # and that file points CUDA_DEVICE_MEMORY_SHARED_CACHE at the region beside it.
    }


def test_prepared_directory_modes(world: Path) -> None:
    d = prepare(world / "host")
    st_dir, st_region = d.stat(), (d / REGION_FILE).stat()
    assert (st_dir.st_uid, stat.S_IMODE(st_dir.st_mode)) == (0, 0o755)
    assert stat.S_IMODE(st_region.st_mode) == 0o666
    assert st_region.st_size == REGION_SIZE
    assert stat.S_IMODE((d / "env").stat().st_mode) == 0o644


def test_nobody_maps_and_updates_the_prepared_region(world: Path) -> None:
    d = prepare(world / "host")
    p = subprocess.Popen(
        as_nobody_in_slice(
            world, d, [str(CUTEST), "init", "ctx", "0", "alloc", "v2", "300m", "hold"]
        ),
        env=limiter_env(world),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        else:
            raise AssertionError(
                f"cutest ended early: {lines} {p.stderr.read() if p.stderr else ''}"
            )
        snap = read_region(d / REGION_FILE)
        dev = snap.device(0)
        # The slice file's limit, and this process's allocation, in the shared region.
        assert (dev.limit_bytes, dev.used_bytes) == (1024 * MiB, 300 * MiB)
        assert [e.used_bytes[0] for e in snap.processes] == [300 * MiB]
        assert os.path.getsize(d / REGION_FILE) == REGION_SIZE  # the size the limiter wants
    finally:
        p.kill()
        _, err = p.communicate(timeout=30)
    assert "cannot open region" not in err and "accounting this process alone" not in err, err


def test_without_the_prepared_region_nobody_accounts_alone(world: Path) -> None:
    # What non-root workloads got before: a root 0755 directory and no region file.
    d = prepare(world / "host")
    (d / REGION_FILE).unlink()
    r = subprocess.run(
        as_nobody_in_slice(world, d, [str(CUTEST), "init", "ctx", "0", "alloc", "v2", "1m"]),
        env=limiter_env(world),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "cannot open region" in r.stderr
    assert not (d / REGION_FILE).exists()


def test_nobody_cannot_create_files_in_its_slice_directory(world: Path) -> None:
    d = prepare(world / "host")
    r = subprocess.run(
        as_nobody_in_slice(world, d, ["sh", "-c", "echo x > /usr/local/vgpu/slice/env2"]),
        env=limiter_env(world) | {"LD_PRELOAD": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["env", REGION_FILE]
