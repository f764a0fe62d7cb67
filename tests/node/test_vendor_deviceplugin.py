"""Other vendors' kubelet device plugins end to end: a simulated Ascend node and a
simulated Cambricon node in Kubernetes mode, the fake kubelet over real gRPC on unix
sockets, a real nats-server; the ledger written as placement writes it."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from services.nodeagent.backends.sim import SimBackend, parse_gpu_specs
from services.nodeagent.kube.node import KubeNode, start_node
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import CardGrant, ContainerGrant, Device, LedgerAlloc, NodeLedger
from tests.fakekubelet import FakeKubelet

NODE = "n1"
GPU = "nvidia.com/gpu"
pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    plugin_dir = Path(tempfile.mkdtemp(prefix="dp-"))  # short: unix socket path limit
    host_root = Path(tempfile.mkdtemp(prefix="hr-"))
    try:
        yield plugin_dir, host_root
    finally:
        shutil.rmtree(plugin_dir, ignore_errors=True)
        shutil.rmtree(host_root, ignore_errors=True)


@pytest.fixture
async def kubelet(dirs: tuple[Path, Path]) -> AsyncIterator[FakeKubelet]:
    k = FakeKubelet(dirs[0], strategy="random", seed=3, timeout=5.0)
    await k.start()
    try:
        yield k
    finally:
        await k.stop()


async def make_node(bus: Bus, cfg: Config, dirs: tuple[Path, Path], specs: str) -> KubeNode:
    return await start_node(
        bus,
        NODE,
        cfg,
        SimBackend(NODE, parse_gpu_specs([specs])),
        host_root=dirs[1],
        plugin_dir=dirs[0],
        telemetry_interval=None,
        poll_interval=0.05,
        wait_timeout=2.0,
    )


def of(node: KubeNode, vendor: str) -> list[Device]:
    assert node.agent.inventory is not None
    return [d for d in node.agent.inventory.devices if d.vendor == vendor]


def grant(name: str, cards: list[Device], mem: int, cores: int) -> ContainerGrant:
    return ContainerGrant(
        name=name,
        devices=[
            CardGrant(
                uuid=d.uuid, index=d.index, type=d.type, vendor=d.vendor, mem=mem, cores=cores
            )
            for d in cards
        ],
    )


async def put_ledger(bus: Bus, *allocs: LedgerAlloc) -> None:
    await bus.kv_put(
        subjects.LEDGER_BUCKET, NODE, NodeLedger(node=NODE, allocs={a.uid: a for a in allocs})
    )


def kube_pod(uid: str, *containers: ContainerGrant, at: float) -> LedgerAlloc:
    return LedgerAlloc(
        uid=uid, name=f"pod-{uid}", containers=list(containers), decided_at=at, source="kube"
    )


async def test_ascend_node_registers_its_resource_and_answers_the_pods_decision(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs, "Ascend910B3:4")
    res = "huawei.com/Ascend910B3"  # the registry's count resource for the chip
    try:
        npu = of(node, "Ascend910B3")
        per_card = npu[0].count
        await kubelet.wait_devices(res, lambda d: len(d) == 4 * per_card)
        assert kubelet.devices(GPU) == {}  # no NVIDIA card: no nvidia.com/gpu device
        # a vNPU slice on card 2 and, in another pod, two whole cards 3 and 0
        a = kube_pod("a", grant("main", [npu[2]], mem=16384, cores=25), at=1.0)
        b = kube_pod("b", grant("train", [npu[3], npu[0]], mem=npu[0].devmem, cores=100), at=2.0)
        await put_ledger(bus, a, b)
        [ra] = await kubelet.admit_pod("a", [{res: 1}])
        assert dict(ra[res].envs) == {
            "ASCEND_VISIBLE_DEVICES": "2",
            "ASCEND_VNPU_SPECS": "vir05_1c_16g",
        }
        [rb] = await kubelet.admit_pod("b", [{res: 2}])
        assert dict(rb[res].envs) == {"ASCEND_VISIBLE_DEVICES": "3,0"}
        plugin = node.vendors.plugins["Ascend910B3"]
        assert (plugin.exact, plugin.ambiguous) == (2, 0)
        # a call no pod placed here can be for is refused, not guessed
        with pytest.raises(grpc.aio.AioRpcError, match="no pod placed here"):
            await kubelet.admit_pod("c", [{res: 3}])
    finally:
        await node.stop()


async def test_cambricon_node_answers_device_nodes_and_a_mixed_pod_per_resource(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs, "MLU370:2,A100-80GB:1")
    res = "cambricon.com/vmlu"
    try:
        mlu, gpu = of(node, "MLU"), of(node, "NVIDIA")
        await kubelet.wait_devices(res, lambda d: len(d) == 2 * mlu[0].count)
        # the NVIDIA plugin advertises its own card only
        await kubelet.wait_devices(GPU, lambda d: len(d) == gpu[0].count)
        assert all(i.startswith(gpu[0].uuid) for i in kubelet.devices(GPU))
        # one pod: an MLU slice in one container, the A100 in the other
        p = kube_pod(
            "p",
            grant("infer", [mlu[1]], mem=4096, cores=20),
            grant("cuda", gpu, mem=2048, cores=30),
            at=1.0,
        )
        await put_ledger(bus, p)
        r0, r1 = await kubelet.admit_pod("p", [{res: 1}, {GPU: 1}])
        assert dict(r0[res].envs) == {"CAMBRICON_VISIBLE_DEVICES": "1"}
        assert [d.host_path for d in r0[res].devices] == [
            "/dev/cambricon_dev1",
            "/dev/cambricon_ipcm1",
            "/dev/cambricon-caps/cap_dev1_mi0",  # a partial card: its sMLU node
            "/dev/cambricon_ctl",
        ]
        assert r1[GPU].envs["NVIDIA_VISIBLE_DEVICES"] == gpu[0].uuid
        assert r1[GPU].envs["CUDA_DEVICE_MEMORY_LIMIT_0"] == "2048m"
    finally:
        await node.stop()


async def test_hygon_slice_writes_its_vdev_file_before_answering(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs, "K100-AI:2")
    res = "hygon.com/dcunum"
    try:
        dcu = of(node, "DCU")
        await kubelet.wait_devices(res, lambda d: len(d) == 2 * dcu[0].count)
        await put_ledger(bus, kube_pod("h", grant("c", [dcu[1]], mem=8192, cores=25), at=1.0))
        [r] = await kubelet.admit_pod("h", [{res: 1}])
        conf = dirs[1] / "etc/vdev/docker/h_c/vdev0.conf"
        assert "mem: 8192 MiB" in conf.read_text() and "device_id: 1" in conf.read_text()
        assert ("/etc/vdev/docker", "/etc/vdev/docker/h_c") in [
            (m.container_path, m.host_path) for m in r[res].mounts
        ]
        assert not any(k.endswith("VISIBLE_DEVICES") for k in r[res].envs)
    finally:
        await node.stop()


async def test_amd_slices_sharing_a_card_get_disjoint_compute_units(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs, "MI300X:1")
    res = "amd.com/gpu"
    try:
        (gpu,) = of(node, "AMDGPU")
        await kubelet.wait_devices(res, lambda d: len(d) == gpu.count)
        # placement books an AMD slice's cores as compute units of the card
        a = kube_pod("a", grant("x", [gpu], mem=65536, cores=100), at=1.0)
        b = kube_pod("b", grant("y", [gpu], mem=65536, cores=100), at=2.0)
        await put_ledger(bus, a, b)
        [ra] = await kubelet.admit_pod("a", [{res: 1}])
        [rb] = await kubelet.admit_pod("b", [{res: 1}])
        assert ra[res].envs["HSA_CU_MASK"] == "0:0-99"
        assert rb[res].envs["HSA_CU_MASK"] == "0:100-199"
        assert rb[res].envs["ROCR_VISIBLE_DEVICES"] == gpu.uuid
        assert rb[res].envs["HIP_DEVICE_MEMORY_LIMIT"] == "65536m"
        # a released pod's units are free for the next one
        c = kube_pod("c", grant("z", [gpu], mem=65536, cores=50), at=3.0)
        await put_ledger(bus, b, c)
        plugin = node.vendors.plugins["AMDGPU"]
        while ("a", "x") in plugin.cus:  # noqa: ASYNC110 - the ledger watch is a callback
            await asyncio.sleep(0.02)
        kubelet.release("a")
        [rc] = await kubelet.admit_pod("c", [{res: 1}])
        assert rc[res].envs["HSA_CU_MASK"] == "0:0-49"
    finally:
        await node.stop()
