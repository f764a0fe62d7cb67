"""The node agent's CSI node plugin against the fake kubelet: plugin registration over
gRPC, then NodePublishVolume/NodeUnpublishVolume with real bind mounts (the tests run as
root and can mount; without CAP_SYS_ADMIN they are skipped)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from services.nodeagent.csi.mount import BindMounter, can_mount, mount_points
from services.nodeagent.csi.server import SlicePlugin
from services.nodeagent.csi.v1 import EPHEMERAL, POD_UID, csi_pb2
from services.nodeagent.csi.volume import DRIVER, PublishError, parse_publish
from services.nodeagent.slices import CONTAINERS_DIR, REGION_FILE, REGION_SIZE
from tests.fakekubelet import CsiRegistrationFailed, FakeCsiKubelet

pytestmark = pytest.mark.timeout(30)
needs_mount = pytest.mark.skipif(not can_mount(), reason="needs CAP_SYS_ADMIN (bind mounts)")

UID_A = "5d0e4f7a-1c2b-4a9e-8f00-000000000001"
UID_B = "5d0e4f7a-1c2b-4a9e-8f00-000000000002"


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(p for p in mount_points(f.read()) if p.startswith(str(root)))


@pytest.fixture
def world() -> Iterator[Path]:
    # Short paths: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="csi-"))
    try:
        yield d
    finally:
        for m in reversed(mounts_under(d)):  # a failed test must not leak mounts
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def plugin(world: Path) -> AsyncIterator[SlicePlugin]:
    p = SlicePlugin(
        "node-1",
        world / "host",
        plugins_dir=world / "plugins",
        registry_dir=world / "registry",
    )
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def kubelet(world: Path, plugin: SlicePlugin) -> AsyncIterator[FakeCsiKubelet]:
    k = FakeCsiKubelet(world / "kubelet")
    await k.register(plugin.registry_socket)
    try:
        yield k
    finally:
        await k.close()


def slice_dir(world: Path, uid: str, container: str) -> Path:
    return world / "host" / CONTAINERS_DIR / f"{uid}_{container}"


def write_head(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)


def put_env(world: Path, uid: str, container: str, text: str) -> None:
    d = slice_dir(world, uid, container)
    d.mkdir(parents=True, exist_ok=True)
    (d / "env").write_text(text)


# ---------------------------------------------------------------------- pure checks


@pytest.mark.parametrize(
    ("ctx", "target", "message"),
    [
        ({POD_UID: UID_A, "container": "main"}, f"/k/pods/{UID_A}/volumes/v/mount", "ephemeral"),
        ({EPHEMERAL: "true", "container": "main"}, f"/k/pods/{UID_A}/volumes/v/mount", "pod UID"),
        (
            {EPHEMERAL: "true", POD_UID: "../etc", "container": "main"},
            "/k/pods/x/volumes/v/m",
            "pod UID",
        ),
        (
            {EPHEMERAL: "true", POD_UID: "..", "container": "main"},
            "/k/pods/../volumes/v/m",
            "pod UID",
        ),
        ({EPHEMERAL: "true", POD_UID: UID_A}, f"/k/pods/{UID_A}/volumes/v/mount", "container"),
        (
            {EPHEMERAL: "true", POD_UID: UID_A, "container": "../../x"},
            f"/k/pods/{UID_A}/volumes/v/m",
            "container",
        ),
        (
            {EPHEMERAL: "true", POD_UID: UID_A, "container": "a/b"},
            f"/k/pods/{UID_A}/volumes/v/m",
            "container",
        ),
        ({EPHEMERAL: "true", POD_UID: UID_A, "container": "main"}, "relative/mount", "absolute"),
        (
            {EPHEMERAL: "true", POD_UID: UID_A, "container": "main"},
            f"/k/pods/{UID_A}/volumes/../../x",
            "normalised",
        ),
        # a target inside another pod's directory
        (
            {EPHEMERAL: "true", POD_UID: UID_A, "container": "main"},
            f"/k/pods/{UID_B}/volumes/v/mount",
            "not a volume path",
        ),
    ],
)
def test_publish_requests_that_are_not_our_slices(
    ctx: dict[str, str], target: str, message: str
) -> None:
    with pytest.raises(PublishError, match=message):
        parse_publish(ctx, target)


def test_a_good_request_names_its_slice() -> None:
    v = parse_publish(
        {EPHEMERAL: "true", POD_UID: UID_A, "container": "main"},
        f"/var/lib/kubelet/pods/{UID_A}/volumes/kubernetes.io~csi/hami-slice-0/mount",
    )
    assert v.dir_name == f"{UID_A}_main"


def test_mountinfo_escapes() -> None:
    line = r"36 35 98:0 /mnt1 /mnt\040with\040space rw,noatime master:1 - ext3 /dev/root rw"
    assert mount_points(line) == {"/mnt with space"}


# ---------------------------------------------------------------------- over gRPC


async def test_registration_through_the_plugin_watcher(
    plugin: SlicePlugin, kubelet: FakeCsiKubelet
) -> None:
    d = kubelet.drivers[DRIVER]
    assert (d.name, d.endpoint, d.versions, d.node_id) == (
        DRIVER,
        str(plugin.socket_path),
        ["1.0.0"],
        "node-1",
    )
    assert plugin.registered is True and plugin.registration_error == ""
    caps = await d.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []  # node only: the kubelet never calls a controller
    ncaps = await d.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert list(ncaps.capabilities) == []  # no staging: publish is called directly
    probe = await d.identity.Probe(csi_pb2.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value


async def test_a_kubelet_refusal_is_reported_to_the_plugin(
    world: Path, plugin: SlicePlugin
) -> None:
    # A registration that names another driver than its endpoint answers to.
    liar = SlicePlugin("n", world / "host", registry_dir=world / "r2", driver="someone.else.io")
    liar.socket_path = plugin.socket_path
    server = await liar._serve(liar.registry_socket, liar._add_registration)
    try:
        with pytest.raises(CsiRegistrationFailed, match="endpoint says"):
            await FakeCsiKubelet(world / "kubelet").register(liar.registry_socket)
        assert liar.registered is False and "endpoint says" in liar.registration_error
    finally:
        await server.stop(None)


@needs_mount
async def test_publish_binds_exactly_the_pods_own_directory(
    world: Path, plugin: SlicePlugin, kubelet: FakeCsiKubelet
) -> None:
    put_env(world, UID_A, "main", "CUDA_VISIBLE_DEVICES=GPU-a\n")
    put_env(world, UID_A, "side", "CUDA_VISIBLE_DEVICES=GPU-b\n")
    put_env(world, UID_B, "main", "CUDA_VISIBLE_DEVICES=GPU-c\n")
    ta = await kubelet.publish(DRIVER, UID_A, "hami-slice-0", {"container": "main"})
    tb = await kubelet.publish(DRIVER, UID_B, "hami-slice-0", {"container": "main"})
    assert (ta / "env").read_text() == "CUDA_VISIBLE_DEVICES=GPU-a\n"
    assert (tb / "env").read_text() == "CUDA_VISIBLE_DEVICES=GPU-c\n"
    assert sorted(p.name for p in ta.iterdir()) == ["env", REGION_FILE]  # nothing else
    # The container's writes land in its own host directory (its usage region).
    assert (ta / REGION_FILE).stat().st_size == REGION_SIZE
    write_head(ta / REGION_FILE, b"HVGR")
    assert (slice_dir(world, UID_A, "main") / REGION_FILE).read_bytes()[:4] == b"HVGR"
    assert (slice_dir(world, UID_B, "main") / REGION_FILE).read_bytes()[:4] == b"\0" * 4
    # Idempotent: the kubelet retries after a lost answer; still one mount.
    assert await kubelet.publish(DRIVER, UID_A, "hami-slice-0", {"container": "main"}) == ta
    assert mounts_under(world) == sorted([str(ta), str(tb)])
    await kubelet.unpublish(DRIVER, ta)
    assert not ta.exists() and mounts_under(world) == [str(tb)]
    # The slice itself is the slice writer's: unpublish leaves it.
    assert (slice_dir(world, UID_A, "main") / "env").is_file()
    await kubelet.unpublish(DRIVER, ta)  # again: OK
    await kubelet.unpublish(DRIVER, tb)
    assert mounts_under(world) == []


@needs_mount
async def test_publish_before_the_slice_is_written_makes_the_directory(
    world: Path, plugin: SlicePlugin, kubelet: FakeCsiKubelet
) -> None:
    t = await kubelet.publish(DRIVER, UID_A, "v", {"container": "main"})
    assert [p.name for p in t.iterdir()] == [REGION_FILE]
    put_env(world, UID_A, "main", "X=1\n")  # the slice writer, later: seen at once
    assert (t / "env").read_text() == "X=1\n"
    await kubelet.unpublish(DRIVER, t)


@needs_mount
async def test_readonly_publish(world: Path, plugin: SlicePlugin, kubelet: FakeCsiKubelet) -> None:
    put_env(world, UID_A, "main", "X=1\n")
    t = await kubelet.publish(DRIVER, UID_A, "v", {"container": "main"}, readonly=True)
    with pytest.raises(OSError, match="Read-only"):
        (t / "new").write_text("x")
    await kubelet.unpublish(DRIVER, t)


@pytest.mark.parametrize(
    ("attrs", "kw", "message"),
    [
        ({"container": "../../etc"}, {}, "container"),
        ({}, {}, "container"),
        ({"container": "main"}, {"pod_info_on_mount": False}, "ephemeral"),
    ],
)
async def test_bad_publish_is_invalid_argument_and_touches_nothing(
    world: Path,
    plugin: SlicePlugin,
    kubelet: FakeCsiKubelet,
    attrs: dict[str, str],
    kw: dict[str, bool],
    message: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await kubelet.publish(DRIVER, UID_A, "v", attrs, **kw)  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (e.value.details() or "")
    assert not (world / "host").exists() and mounts_under(world) == []


async def test_a_target_in_another_pods_directory_is_refused(
    world: Path, plugin: SlicePlugin, kubelet: FakeCsiKubelet
) -> None:
    other = kubelet.target(UID_B, "v")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await kubelet.publish(DRIVER, UID_A, "v", {"container": "main"}, target=str(other))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mounts_under(world) == []


def test_bind_mounter_is_the_default() -> None:
    assert isinstance(SlicePlugin("n", "/nonexistent").mounter, BindMounter)
