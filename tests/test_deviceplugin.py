"""The node agent's kubelet device plugin against the fake kubelet (real gRPC, unix sockets)."""

from __future__ import annotations

import asyncio
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from services.nodeagent.csi.v1 import csi_pb2
from services.nodeagent.deviceplugin.server import (
    AllocationError,
    ContainerAllocation,
    DevicePlugin,
    DeviceState,
)
from services.nodeagent.deviceplugin.v1beta1 import HEALTHY, UNHEALTHY, api_pb2, api_pb2_grpc
from services.nodeagent.pluginregistration.v1 import api_pb2 as reg_pb2
from tests.fakekubelet import AllocationFailed, FakeKubelet

ROOT = Path(__file__).resolve().parent.parent
RES = "nvidia.com/gpu"
POLL = 0.05

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="dp-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def kubelet(plugin_dir: Path) -> AsyncIterator[FakeKubelet]:
    k = FakeKubelet(plugin_dir, timeout=5.0)
    await k.start()
    try:
        yield k
    finally:
        await k.stop()


class Recorder:
    """Callbacks that record their arguments."""

    def __init__(self) -> None:
        self.allocate_calls: list[list[list[str]]] = []
        self.preferred_calls: list[tuple[list[str], list[str], int]] = []
        self.fail: Exception | None = None

    async def allocate(self, requests: list[list[str]]) -> list[ContainerAllocation]:
        self.allocate_calls.append(requests)
        if self.fail is not None:
            raise self.fail
        return [
            ContainerAllocation(
                envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids), "CUDA_DEVICE_SM_LIMIT": "30"},
                mounts=[("/usr/local/vgpu/libvgpu.so", "/usr/local/vgpu/libvgpu.so", True)],
                devices=[("/dev/nvidia0", "/dev/nvidia0", "rw")],
                annotations={"hami.io/test": "yes"},
            )
            for ids in requests
        ]

    def preferred(self, available: list[str], must: list[str], size: int) -> list[str]:
        self.preferred_calls.append((available, must, size))
        if self.fail is not None:
            raise self.fail
        return sorted(available, reverse=True)[:size]  # the highest IDs


def gpus(n: int = 4, numa: int | None = 0) -> list[DeviceState]:
    return [DeviceState(f"GPU-{i}", True, numa) for i in range(n)]


@pytest.fixture
async def plugin(plugin_dir: Path) -> AsyncIterator[tuple[DevicePlugin, Recorder]]:
    rec = Recorder()
    p = DevicePlugin(
        RES, gpus(), rec.allocate, rec.preferred, plugin_dir=plugin_dir, poll_interval=POLL
    )
    await p.start()
    try:
        yield p, rec
    finally:
        await p.stop()


async def plugin_stub(p: DevicePlugin) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(f"unix:{p.socket_path}")
    stub: Any = api_pb2_grpc.DevicePluginStub(channel)  # type: ignore[no-untyped-call]
    return channel, stub


# -- generated code -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "stem"),
    [("deviceplugin/v1beta1", "api"), ("csi/v1", "csi"), ("pluginregistration/v1", "api")],
)
def test_generated_stubs_match_proto(tmp_path: Path, api: str, stem: str) -> None:
    subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    generated = tmp_path / api
    committed = ROOT / "services/nodeagent" / api
    names = sorted(p.name for p in generated.iterdir())
    assert names == [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert not mismatch and not errors, (
        f"generated stubs differ from the committed ones: {mismatch + errors}; "
        "run proto/generate.sh and commit the result"
    )


def test_csi_wire_names_and_numbers_match_the_spec() -> None:
    d = csi_pb2.DESCRIPTOR
    assert d.package == "csi.v1"
    numbers = {
        "GetPluginInfoResponse": {"name": 1, "vendor_version": 2, "manifest": 3},
        "GetPluginCapabilitiesResponse": {"capabilities": 1},
        "PluginCapability": {"service": 1},
        "ProbeResponse": {"ready": 1},
        "VolumeCapability": {"block": 1, "mount": 2, "access_mode": 3},
        "NodePublishVolumeRequest": {
            "volume_id": 1,
            "publish_context": 2,
            "staging_target_path": 3,
            "target_path": 4,
            "volume_capability": 5,
            "readonly": 6,
            "secrets": 7,
            "volume_context": 8,
        },
        "NodeUnpublishVolumeRequest": {"volume_id": 1, "target_path": 2},
        "NodeGetCapabilitiesResponse": {"capabilities": 1},
        "NodeServiceCapability": {"rpc": 1},
        "NodeGetInfoResponse": {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3},
        "Topology": {"segments": 1},
    }
    for message, fields in numbers.items():
        desc = d.message_types_by_name[message]
        assert {f.name: f.number for f in desc.fields} == fields, message
    mount = d.message_types_by_name["VolumeCapability"].nested_types_by_name["MountVolume"]
    assert {f.name: f.number for f in mount.fields} == {"fs_type": 1, "mount_flags": 2}
    mode = d.message_types_by_name["VolumeCapability"].nested_types_by_name["AccessMode"]
    assert mode.enum_types_by_name["Mode"].values_by_name["SINGLE_NODE_WRITER"].number == 1
    rpc = d.message_types_by_name["NodeServiceCapability"].nested_types_by_name["RPC"]
    assert rpc.enum_types_by_name["Type"].values_by_name["STAGE_UNSTAGE_VOLUME"].number == 1
    assert [m.name for m in d.services_by_name["Identity"].methods] == [
        "GetPluginInfo",
        "GetPluginCapabilities",
        "Probe",
    ]
    assert {m.name for m in d.services_by_name["Node"].methods} == {
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    }
    # The kubelet calls /csi.v1.Node/NodePublishVolume.
    assert d.services_by_name["Node"].full_name == "csi.v1.Node"


def test_plugin_registration_wire_names_match_the_kubelet() -> None:
    d = reg_pb2.DESCRIPTOR
    # The kubelet's package has no version in it: /pluginregistration.Registration/GetInfo.
    assert d.services_by_name["Registration"].full_name == "pluginregistration.Registration"
    numbers = {
        "PluginInfo": {"type": 1, "name": 2, "endpoint": 3, "supported_versions": 4},
        "RegistrationStatus": {"plugin_registered": 1, "error": 2},
        "RegistrationStatusResponse": {},
        "InfoRequest": {},
    }
    for message, fields in numbers.items():
        desc = d.message_types_by_name[message]
        assert {f.name: f.number for f in desc.fields} == fields, message
    assert [m.name for m in d.services_by_name["Registration"].methods] == [
        "GetInfo",
        "NotifyRegistrationStatus",
    ]


def test_wire_field_numbers_match_upstream() -> None:
    d = api_pb2.DESCRIPTOR
    assert d.package == "v1beta1"
    numbers = {
        "RegisterRequest": {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4},
        "DevicePluginOptions": {"pre_start_required": 1, "get_preferred_allocation_available": 2},
        "Device": {"ID": 1, "health": 2, "topology": 3},
        "ContainerPreferredAllocationRequest": {
            "available_deviceIDs": 1,
            "must_include_deviceIDs": 2,
            "allocation_size": 3,
        },
        "ContainerAllocateRequest": {"devices_ids": 1},
        "ContainerAllocateResponse": {
            "envs": 1,
            "mounts": 2,
            "devices": 3,
            "annotations": 4,
            "cdi_devices": 5,
        },
        "Mount": {"container_path": 1, "host_path": 2, "read_only": 3},
        "DeviceSpec": {"container_path": 1, "host_path": 2, "permissions": 3},
    }
    for message, fields in numbers.items():
        desc = d.message_types_by_name[message]
        assert {f.name: f.number for f in desc.fields} == fields, message
    methods = [m.name for m in d.services_by_name["DevicePlugin"].methods]
    assert methods == [
        "GetDevicePluginOptions",
        "ListAndWatch",
        "GetPreferredAllocation",
        "Allocate",
        "PreStartContainer",
    ]
    assert d.services_by_name["DevicePlugin"].methods_by_name["ListAndWatch"].server_streaming


# -- registration and ListAndWatch ------------------------------------------------------


async def test_registers_and_streams_devices(kubelet: FakeKubelet, plugin: Any) -> None:
    p, _ = plugin
    await kubelet.wait_registered(RES)
    reg = kubelet.registrations[0]
    assert reg.version == "v1beta1"
    assert reg.endpoint == "nvidia.com-gpu.sock" == p.socket_path.name
    assert reg.resource_name == RES
    assert reg.options.get_preferred_allocation_available
    assert not reg.options.pre_start_required
    devs = await kubelet.wait_devices(RES)
    assert sorted(devs) == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    assert all(d.health == HEALTHY and d.topology.nodes[0].ID == 0 for d in devs.values())
    assert p.registered and p.registrations == 1


async def test_plugin_before_kubelet_registers_when_kubelet_appears(plugin_dir: Path) -> None:
    rec = Recorder()
    async with DevicePlugin(
        RES, gpus(2, None), rec.allocate, plugin_dir=plugin_dir, poll_interval=POLL
    ) as p:
        assert not p.registered
        async with FakeKubelet(plugin_dir) as k:
            await k.wait_registered(RES)
            devs = await k.wait_devices(RES)
            assert not devs["GPU-0"].HasField("topology")
            # no preferred callback: not offered to the kubelet
            assert not k.registrations[0].options.get_preferred_allocation_available
            async with asyncio.timeout(2):
                await p.wait_registered()
    assert not p.socket_path.exists()  # stop() removes its socket


async def test_health_change_and_provider_refresh(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    state = {"GPU-0": True, "GPU-1": True}
    rec = Recorder()

    def provider() -> list[tuple[str, bool, int | None]]:
        return [(i, ok, 1) for i, ok in state.items()]

    async with DevicePlugin(
        RES, provider, rec.allocate, plugin_dir=plugin_dir, poll_interval=POLL
    ) as p:
        await kubelet.wait_devices(RES, lambda d: len(d) == 2)
        # explicit list
        p.update_devices([DeviceState("GPU-0", True, 1), DeviceState("GPU-1", False, 1)])
        devs = await kubelet.wait_devices(RES, lambda d: d["GPU-1"].health == UNHEALTHY)
        assert devs["GPU-0"].health == HEALTHY
        assert kubelet.healthy(RES) == ["GPU-0"]
        # provider re-queried
        state["GPU-1"] = True
        state["GPU-2"] = True
        p.update_devices()
        await kubelet.wait_devices(RES, lambda d: len(d) == 3)
        assert kubelet.healthy(RES) == ["GPU-0", "GPU-1", "GPU-2"]
        assert p.devices == [DeviceState(f"GPU-{i}", True, 1) for i in range(3)]
        # from another thread
        await asyncio.to_thread(p.update_devices_threadsafe, [("GPU-7", True, 0)])
        await kubelet.wait_devices(RES, lambda d: list(d) == ["GPU-7"])
        # an unhealthy device is never allocated
        p.update_devices([("GPU-0", False, 1), ("GPU-1", True, 1)])
        await kubelet.wait_devices(RES, lambda d: len(d) == 2)
        await kubelet.allocate(RES, 1)
        assert rec.allocate_calls[-1] == [["GPU-1"]]
        with pytest.raises(AllocationFailed, match="requested 1, available 0"):
            await kubelet.allocate(RES, 1)


async def test_rapid_updates_deliver_the_latest_list(kubelet: FakeKubelet, plugin: Any) -> None:
    p, _ = plugin
    await kubelet.wait_devices(RES)
    for n in range(1, 50):
        p.update_devices(gpus(n))
    devs = await kubelet.wait_devices(RES, lambda d: len(d) == 49)
    assert len(devs) == 49
    assert p.open_streams == 1


# -- allocation --------------------------------------------------------------------------


async def test_preferred_allocation_is_used(kubelet: FakeKubelet, plugin: Any) -> None:
    _, rec = plugin
    await kubelet.wait_devices(RES)
    await kubelet.allocate(RES, 2, pod_uid="pod-a")
    assert rec.preferred_calls == [(["GPU-0", "GPU-1", "GPU-2", "GPU-3"], [], 2)]
    assert rec.allocate_calls == [[["GPU-3", "GPU-2"]]]
    assert kubelet.pod_devices("pod-a") == {RES: ["GPU-2", "GPU-3"]}
    # the next request only offers what is left
    await kubelet.allocate(RES, 1, pod_uid="pod-b")
    assert rec.preferred_calls[-1] == (["GPU-0", "GPU-1"], [], 1)
    assert kubelet.pod_devices("pod-b") == {RES: ["GPU-1"]}
    # adversarial strategy: no preferred call, random pick among the free ones
    await kubelet.allocate(RES, 1, "random", pod_uid="pod-c")
    assert len(rec.preferred_calls) == 2
    assert kubelet.pod_devices("pod-c") == {RES: ["GPU-0"]}
    assert kubelet.release("pod-a") == 2
    assert kubelet.available(RES) == ["GPU-2", "GPU-3"]


async def test_allocate_passes_callback_response_through(kubelet: FakeKubelet, plugin: Any) -> None:
    _, rec = plugin
    await kubelet.wait_devices(RES)
    resp = await kubelet.allocate(RES, 1, "first")
    assert rec.allocate_calls == [[["GPU-0"]]]
    assert dict(resp.envs) == {"NVIDIA_VISIBLE_DEVICES": "GPU-0", "CUDA_DEVICE_SM_LIMIT": "30"}
    assert [(m.container_path, m.host_path, m.read_only) for m in resp.mounts] == [
        ("/usr/local/vgpu/libvgpu.so", "/usr/local/vgpu/libvgpu.so", True)
    ]
    assert [(d.container_path, d.host_path, d.permissions) for d in resp.devices] == [
        ("/dev/nvidia0", "/dev/nvidia0", "rw")
    ]
    assert dict(resp.annotations) == {"hami.io/test": "yes"}


async def test_admit_pod_container_by_container(kubelet: FakeKubelet, plugin_dir: Path) -> None:
    rec = Recorder()
    mem = [DeviceState(f"MEM-{i}", True, None) for i in range(3)]
    async with (
        DevicePlugin(RES, gpus(), rec.allocate, rec.preferred, plugin_dir=plugin_dir),
        DevicePlugin("nvidia.com/gpumem", mem, rec.allocate, plugin_dir=plugin_dir),
    ):
        await kubelet.wait_devices(RES)
        await kubelet.wait_devices("nvidia.com/gpumem")
        out = await kubelet.admit_pod(
            "pod-1", [{RES: 1, "nvidia.com/gpumem": 2}, {RES: 2}, {RES: 0}]
        )
        assert [sorted(c) for c in out] == [sorted([RES, "nvidia.com/gpumem"]), [RES], []]
        assert [c[0] for c in rec.allocate_calls] == [
            ["GPU-3"],
            ["MEM-0", "MEM-1"],
            ["GPU-2", "GPU-1"],
        ]
        assert [(a.container, a.resource) for a in kubelet.allocations] == [
            (0, RES),
            (0, "nvidia.com/gpumem"),
            (1, RES),
        ]
        # the second container does not fit: the whole pod is rolled back
        with pytest.raises(AllocationFailed):
            await kubelet.admit_pod("pod-2", [{RES: 1}, {RES: 1}])
        assert kubelet.pod_devices("pod-2") == {}
        assert kubelet.available(RES) == ["GPU-0"]
        assert kubelet.release("pod-1") == 5
        assert kubelet.available(RES) == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]


async def test_callback_errors_become_grpc_errors(kubelet: FakeKubelet, plugin: Any) -> None:
    p, rec = plugin
    await kubelet.wait_devices(RES)
    rec.fail = RuntimeError("no decision for this pod")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kubelet.allocate(RES, 1, "first")
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert "no decision for this pod" in (err.value.details() or "")
    assert "Allocate" in (err.value.details() or "")
    assert kubelet.available(RES) == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]  # not kept
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kubelet.allocate(RES, 1)  # the preferred callback fails first
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert "GetPreferredAllocation" in (err.value.details() or "")
    rec.fail = AllocationError("slice not decided yet")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kubelet.allocate(RES, 1, "first")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "slice not decided yet" in (err.value.details() or "")
    # the server survives and the stream is still open
    rec.fail = None
    resp = await kubelet.allocate(RES, 1)
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-3"
    p.update_devices(gpus(5))
    await kubelet.wait_devices(RES, lambda d: len(d) == 5)


async def test_direct_rpcs(kubelet: FakeKubelet, plugin: Any) -> None:
    p, rec = plugin
    await kubelet.wait_devices(RES)
    channel, stub = await plugin_stub(p)
    async with channel:
        opts = await stub.GetDevicePluginOptions(api_pb2.Empty())
        assert opts.get_preferred_allocation_available and not opts.pre_start_required
        await stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["GPU-0"]))
        # several containers in one request
        resp = await stub.Allocate(
            api_pb2.AllocateRequest(
                container_requests=[
                    api_pb2.ContainerAllocateRequest(devices_ids=["GPU-0"]),
                    api_pb2.ContainerAllocateRequest(devices_ids=["GPU-1", "GPU-2"]),
                ]
            )
        )
        assert [r.envs["NVIDIA_VISIBLE_DEVICES"] for r in resp.container_responses] == [
            "GPU-0",
            "GPU-1,GPU-2",
        ]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Allocate(
                api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["GPU-9"])]
                )
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "GPU-9" in (err.value.details() or "")
        assert len(rec.allocate_calls) == 1  # the unknown device never reached the callback


async def test_kubelet_rejects_bad_registration(kubelet: FakeKubelet) -> None:
    async with grpc.aio.insecure_channel(f"unix:{kubelet.socket_path}") as channel:
        stub: Any = api_pb2_grpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError, match="not supported"):
            await stub.Register(
                api_pb2.RegisterRequest(version="v1alpha", endpoint="x.sock", resource_name=RES)
            )
        with pytest.raises(grpc.aio.AioRpcError, match="invalid extended resource"):
            await stub.Register(
                api_pb2.RegisterRequest(version="v1beta1", endpoint="x.sock", resource_name="gpu")
            )
    assert kubelet.registrations == [] and len(kubelet.rejected_registrations) == 2


# -- kubelet restart --------------------------------------------------------------------


async def test_kubelet_restart_reregisters_and_serves_again(
    kubelet: FakeKubelet, plugin: Any
) -> None:
    p, rec = plugin
    await kubelet.wait_devices(RES)
    await kubelet.allocate(RES, 1, pod_uid="before")
    await kubelet.restart()  # removes kubelet.sock and the plugin's socket
    assert len(kubelet.registrations) == 2
    assert p.socket_path.exists()
    assert p.registrations == 2
    devs = kubelet.devices(RES)
    assert sorted(devs) == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    # allocations survive the restart (the kubelet's checkpoint) and new ones work
    assert kubelet.pod_devices("before") == {RES: ["GPU-3"]}
    resp = await kubelet.allocate(RES, 1)
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-2"
    p.update_devices(gpus(2))
    await kubelet.wait_devices(RES, lambda d: len(d) == 2)
    # and once more
    await kubelet.restart()
    assert p.registrations == 3
    async with asyncio.timeout(2):
        await p.wait_registered()


async def test_kubelet_down_then_up(plugin_dir: Path, plugin: Any) -> None:
    p, _ = plugin
    k = FakeKubelet(plugin_dir)
    await k.start()
    await k.wait_devices(RES)
    await k.stop()
    await asyncio.sleep(3 * POLL)
    assert not p.registered
    k2 = FakeKubelet(plugin_dir)
    await k2.start()
    try:
        await k2.wait_devices(RES)
        assert p.registrations == 2
    finally:
        await k2.stop()


async def test_quick_kubelet_restart_keeping_plugin_socket(plugin_dir: Path, plugin: Any) -> None:
    """kubelet.sock replaced within one poll (inode may be reused): still re-registers."""
    p, _ = plugin
    k = FakeKubelet(plugin_dir)
    await k.start()
    try:
        await k.wait_devices(RES)
        await k.stop()
        await k.start()  # the plugin's socket is left in place this time
        await k.wait_registered(RES, count=2)
        await k.wait_devices(RES)
        assert p.registrations == 2
    finally:
        await k.stop()
