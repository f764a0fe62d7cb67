"""A Kubernetes-mode node end to end: real nats-server, the fake kubelet over unix
sockets, the fake API server; the ledger written directly or by the real placement."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec
from services.nodeagent.csi.mount import can_mount
from services.nodeagent.csi.volume import DRIVER
from services.nodeagent.deviceplugin.v1beta1 import HEALTHY, UNHEALTHY
from services.nodeagent.kube.node import KubeNode, start_node
from services.nodeagent.slices import CONTAINERS_DIR, REGION_FILE, parse_env
from services.placement.service import PlacementService
from shared import kube, region, subjects
from shared.bus import Bus, decode, decode_event
from shared.config import Config
from shared.hami.annotations import NODE_REGISTER, decode_node_devices
from shared.kube import Kube
from shared.schemas import (
    AllocPrepared,
    AllocRequested,
    ContainerAsk,
    DeviceAsk,
    LedgerAlloc,
    NodeLedger,
    Telemetry,
)
from tests.fakekube import FakeKube
from tests.fakekubelet import FakeCsiKubelet, FakeKubelet
from tests.node.util import check_container, container_view, effective_env, grant, pod

RES = "nvidia.com/gpu"
NODE = "n1"
pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    # Short paths: unix socket paths are limited to 107 bytes.
    plugin_dir = Path(tempfile.mkdtemp(prefix="dp-"))
    host_root = Path(tempfile.mkdtemp(prefix="hr-"))
    try:
        yield plugin_dir, host_root
    finally:
        shutil.rmtree(plugin_dir, ignore_errors=True)
        shutil.rmtree(host_root, ignore_errors=True)
        Path(f"{host_root}.libvgpu.so").unlink(missing_ok=True)


def sim(gpus: str = "A100-80GB:4") -> SimBackend:
    return SimBackend(NODE, [parse_gpu_spec(gpus)])


async def make_node(
    bus: Bus,
    cfg: Config,
    dirs: tuple[Path, Path],
    *,
    backend: SimBackend | None = None,
    kube: Kube | None = None,
    telemetry_interval: float | None = None,
) -> KubeNode:
    plugin_dir, host_root = dirs
    lib = host_root.parent / f"{host_root.name}.libvgpu.so"  # the image's copy
    lib.write_bytes(b"\x7fELF fake limiter")
    return await start_node(
        bus,
        NODE,
        cfg,
        backend or sim(),
        host_root=host_root,
        plugin_dir=plugin_dir,
        kube=kube,
        telemetry_interval=telemetry_interval,
        poll_interval=0.05,
        wait_timeout=2.0,
        limiter_source=lib,
    )


@pytest.fixture
async def kubelet(dirs: tuple[Path, Path]) -> AsyncIterator[FakeKubelet]:
    k = FakeKubelet(dirs[0], strategy="random", seed=7, timeout=5.0)
    await k.start()
    try:
        yield k
    finally:
        await k.stop()


async def put_ledger(bus: Bus, allocs: list[LedgerAlloc]) -> None:
    await bus.kv_put(
        subjects.LEDGER_BUCKET, NODE, NodeLedger(node=NODE, allocs={a.uid: a for a in allocs})
    )


async def until(pred: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def cards(node: KubeNode) -> list[str]:
    assert node.agent.inventory is not None
    return [d.uuid for d in node.agent.inventory.devices]


def kubelet_asks(a: LedgerAlloc) -> list[dict[str, int]]:
    return [{RES: len(c.devices)} if c.devices else {} for c in a.containers]


async def start_and_check(kubelet: FakeKubelet, host_root: Path, a: LedgerAlloc) -> list[str]:
    """Admit the pod and 'start' each container: its env is the kubelet's (Allocate)
    overlaid with the slice file found by its own pod UID and name."""
    responses = await kubelet.admit_pod(a.uid, kubelet_asks(a))
    errs: list[str] = []
    for g, resp in zip(a.containers, responses, strict=True):
        if not g.devices:
            continue
        envs = dict(resp[RES].envs)
        env = effective_env(envs, container_view(host_root, a.uid, g.name))
        errs += check_container(env, envs["NVIDIA_VISIBLE_DEVICES"].split(","), g)
        mounts = {(m.container_path, m.host_path, m.read_only) for m in resp[RES].mounts}
        assert mounts == {
            ("/usr/local/vgpu/libvgpu.so", "/usr/local/vgpu/libvgpu.so", True),
            ("/etc/ld.so.preload", "/usr/local/vgpu/ld.so.preload", True),
        }
    return errs


# ---------------------------------------------------------------------------- slices


async def test_slices_follow_the_ledger_and_prepared_is_published(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path]
) -> None:
    prepared: list[AllocPrepared] = []

    async def on_prepared(msg: object) -> None:
        ev = decode_event(msg.data)  # type: ignore[attr-defined]
        assert isinstance(ev, AllocPrepared)
        prepared.append(ev)

    await bus.subscribe(subjects.alloc("prepared", NODE), on_prepared)
    node = await make_node(bus, cfg, dirs)
    root = dirs[1] / CONTAINERS_DIR
    try:
        c = cards(node)
        a = pod("a", grant("init", [], init=True), grant("main", [c[0], c[1]], mem=3000, cores=30))
        b = pod("b", grant("x", [c[2]], mem=5000, cores=0), grant("y", [c[2]], mem=7000, cores=50))
        await put_ledger(bus, [a, b])
        await until(lambda: len(prepared) == 3)
        assert sorted(p.name for p in root.iterdir()) == ["a_main", "b_x", "b_y"]
        assert container_view(dirs[1], "a", "main") == {
            "CUDA_VISIBLE_DEVICES": f"{c[0]},{c[1]}",
            "CUDA_DEVICE_MEMORY_LIMIT_0": "3000m",
            "CUDA_DEVICE_MEMORY_LIMIT_1": "3000m",
            "CUDA_DEVICE_SM_LIMIT_0": "30",
            "CUDA_DEVICE_SM_LIMIT_1": "30",
            "CUDA_DEVICE_MEMORY_SHARED_CACHE": "/usr/local/vgpu/slice/region.cache",
            "GPU_CORE_UTILIZATION_POLICY": "default",
        }
        assert container_view(dirs[1], "b", "y")["CUDA_DEVICE_MEMORY_LIMIT_0"] == "7000m"
        assert {(p.uid, p.container) for p in prepared} == {("a", "main"), ("b", "x"), ("b", "y")}
        assert [d.uuid for d in next(p for p in prepared if p.uid == "a").devices] == c[:2]
        await put_ledger(bus, [b])  # a released
        await until(lambda: not (root / "a_main").exists())
        assert sorted(p.name for p in root.iterdir()) == ["b_x", "b_y"]
        await bus.kv_delete(subjects.LEDGER_BUCKET, NODE)
        await until(lambda: not any(root.iterdir()))
    finally:
        await node.stop()


# ---------------------------------------------------------------------------- Allocate


async def test_unique_candidate_gets_hamis_exact_env(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    cfg.node.device_memory_scaling = 1.5
    node = await make_node(bus, cfg, dirs)
    try:
        await kubelet.wait_devices(RES, lambda d: len(d) == 40)
        c = cards(node)
        a = pod("a", grant("main", [c[3], c[1]], mem=2048, cores=25))
        await put_ledger(bus, [a])
        [resp] = await kubelet.admit_pod("a", [{RES: 2}])
        assert dict(resp[RES].envs) == {
            "NVIDIA_VISIBLE_DEVICES": f"{c[3]},{c[1]}",
            "CUDA_DEVICE_MEMORY_LIMIT_0": "2048m",
            "CUDA_DEVICE_MEMORY_LIMIT_1": "2048m",
            "CUDA_DEVICE_SM_LIMIT": "25",
            "CUDA_DEVICE_MEMORY_SHARED_CACHE": "/usr/local/vgpu/slice/region.cache",
            "GPU_CORE_UTILIZATION_POLICY": "default",
            "CUDA_OVERSUBSCRIBE": "true",
        }
        assert node.plugin.exact == 1 and node.plugin.ambiguous == 0
        # GetPreferredAllocation steers the kubelet to replicas of the decided cards.
        b = pod("b", grant("main", [c[2]], mem=100, cores=5))
        await put_ledger(bus, [a, b])
        await kubelet.admit_pod("b", [{RES: 1}], strategy="preferred")
        assert [i.split("::")[0] for i in kubelet.pod_devices("b")[RES]] == [c[2]]
    finally:
        await node.stop()


async def test_start_installs_the_limiter_and_allocate_mounts_only_what_exists(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    vgpu = dirs[1] / "usr/local/vgpu"
    vgpu.mkdir(parents=True)
    (vgpu / "ld.so.preload").write_text("/stale/lib.so\n")  # a previous version's
    node = await make_node(bus, cfg, dirs)
    try:
        assert (vgpu / "libvgpu.so").read_bytes() == b"\x7fELF fake limiter"
        assert (vgpu / "ld.so.preload").read_text() == "/usr/local/vgpu/libvgpu.so\n"
        assert {p.name for p in vgpu.iterdir()} == {"libvgpu.so", "ld.so.preload", "containers"}
        assert (vgpu / "ld.so.preload").stat().st_mode & 0o777 == 0o644
        await kubelet.wait_devices(RES, lambda d: len(d) == 40)
        c = cards(node)
        a, b = pod("a", grant("m", [c[0]], mem=100)), pod("b", grant("m", [c[1]], mem=100))
        await put_ledger(bus, [a])
        assert await start_and_check(kubelet, dirs[1], a) == []  # both mounts
        # Without the library on the host neither file is mounted (a preload naming a
        # missing library would break every program in the container).
        (vgpu / "libvgpu.so").unlink()
        await put_ledger(bus, [a, b])
        [resp] = await kubelet.admit_pod("b", [{RES: 1}])
        assert list(resp[RES].mounts) == []
    finally:
        await node.stop()
    # The next start puts it back.
    node = await make_node(bus, cfg, dirs)
    await node.stop()
    assert (vgpu / "libvgpu.so").is_file()


@pytest.mark.skipif(not can_mount(), reason="needs CAP_SYS_ADMIN (bind mounts)")
async def test_the_containers_csi_volume_is_its_own_slice(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    plugin_dir, host_root = dirs
    node = await start_node(
        bus,
        NODE,
        cfg,
        sim(),
        host_root=host_root,
        plugin_dir=plugin_dir,
        telemetry_interval=None,
        poll_interval=0.05,
        wait_timeout=2.0,
        csi_plugins_dir=plugin_dir / "p",
        csi_registry_dir=plugin_dir / "r",
    )
    csi = FakeCsiKubelet(plugin_dir / "k")
    targets: list[Path] = []
    try:
        assert node.csi is not None
        await csi.register(node.csi.registry_socket)
        await kubelet.wait_devices(RES, lambda d: len(d) == 40)
        c = cards(node)
        a = pod("a", grant("x", [c[0]], mem=700), grant("y", [c[2], c[3]], mem=900))
        await put_ledger(bus, [a])
        await kubelet.admit_pod("a", kubelet_asks(a))
        for i, g in enumerate(a.containers):
            t = await csi.publish(DRIVER, "a", f"hami-slice-{i}", {"container": g.name})
            targets.append(t)
            seen = parse_env((t / "env").read_text())  # what the container reads
            assert check_container(seen, [d.uuid for d in g.devices], g) == []
    finally:
        for t in targets:
            await csi.unpublish(DRIVER, t)
        await csi.close()
        await node.stop()
    assert node.csi is not None and not node.csi.registry_socket.exists()


async def test_allocate_waits_briefly_for_a_late_decision_then_refuses(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs)
    try:
        await kubelet.wait_devices(RES)
        c = cards(node)
        late = pod("late", grant("main", [c[0]]))
        admit = asyncio.create_task(kubelet.admit_pod("late", [{RES: 1}]))
        await asyncio.sleep(0.3)
        await put_ledger(bus, [late])  # the decision arrives while Allocate waits
        [resp] = await admit
        assert resp[RES].envs["NVIDIA_VISIBLE_DEVICES"] == c[0]
        t0 = time.monotonic()
        with pytest.raises(Exception, match="no pod placed here asks for 3"):
            await kubelet.admit_pod("nobody", [{RES: 3}])
        assert time.monotonic() - t0 < 4.0  # bounded (wait_timeout=2s), never minutes
    finally:
        await node.stop()


async def test_burst_with_random_replicas_zero_mismatches(
    nats_url: str, bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    """Real placement decides a burst of pods with mixed slice sizes on one node; the
    kubelet picks replicas at random and admits them in random order. Every container
    'starts' with exactly its decided cards and limits."""
    pbus = await Bus.connect(nats_url, "placement")
    placement = PlacementService(pbus, cfg)
    await placement.start()
    node = await make_node(bus, cfg, dirs, backend=sim("A100-80GB:8"))
    try:
        await kubelet.wait_devices(RES, lambda d: len(d) == 80)
        shapes = [[(1, 10)], [(2, 20)], [(1, 5), (1, 15)], [(3, 10)], [(1, 25)], [(2, 5), (1, 5)]]
        reqs = []
        for i in range(25):
            # Four pods of each shape (indistinguishable to Allocate), and one of its own.
            shape = shapes[i % len(shapes)] if i < 24 else [(4, 10)]
            reqs.append(
                AllocRequested(
                    uid=f"u{i}",
                    name=f"p{i}",
                    namespace="default",
                    source="kube",
                    containers=[
                        ContainerAsk(
                            name=f"c{j}",
                            devices=[DeviceAsk(nums=n, mem=1000 + 100 * i, cores=cores)],
                        )
                        for j, (n, cores) in enumerate(shape)
                    ],
                )
            )
        await asyncio.gather(
            *(bus.publish_event(subjects.alloc("requested"), r, msg_id=r.uid) for r in reqs)
        )
        await until(lambda: len(node.agent.allocs) == len(reqs), 10.0)
        allocs = list(node.agent.allocs.values())
        import random

        random.Random(3).shuffle(allocs)
        results = await asyncio.gather(*(start_and_check(kubelet, dirs[1], a) for a in allocs))
        mismatches = [e for errs in results for e in errs]
        assert mismatches == []
        assert node.plugin.exact + node.plugin.ambiguous == sum(len(s) for s in shapes * 4) + 1
        assert node.plugin.exact >= 1  # the one-of-a-kind pod got HAMi's exact env
        assert node.plugin.matcher.pending() == set()  # every pod known allocated
    finally:
        await node.stop()
        await placement.stop()
        await pbus.close()


async def test_kubelet_restart_reregisters_and_allocation_works_again(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs)
    try:
        await kubelet.wait_devices(RES)
        c = cards(node)
        a, b = pod("a", grant("m", [c[0]])), pod("b", grant("m", [c[1], c[2]]))
        await put_ledger(bus, [a])
        assert await start_and_check(kubelet, dirs[1], a) == []
        await kubelet.restart()
        assert node.plugin.plugin.registrations == 2
        await put_ledger(bus, [a, b])
        assert await start_and_check(kubelet, dirs[1], b) == []
        # Health follows the inventory: a broken card's replicas turn unhealthy.
        node.backend.unhealthy.add(0)  # type: ignore[attr-defined]
        await node.agent.publish_inventory()
        devs = await kubelet.wait_devices(RES, lambda d: d[f"{c[0]}::0"].health == UNHEALTHY)
        assert all(
            d.health == (UNHEALTHY if i.startswith(c[0]) else HEALTHY) for i, d in devs.items()
        )
    finally:
        await node.stop()


async def test_agent_restart_reconciles_slices_and_keeps_matching_state(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    node = await make_node(bus, cfg, dirs)
    root = dirs[1] / CONTAINERS_DIR
    c = cards(node)
    a, b = pod("a", grant("m", [c[0]])), pod("b", grant("m", [c[1]]))
    await put_ledger(bus, [a, b])
    await until(lambda: (root / "b_m").exists())
    await kubelet.admit_pod("a", [{RES: 1}])  # ambiguous between a and b ...
    await kubelet.admit_pod("b", [{RES: 1}])  # ... and now both are known allocated
    await node.stop()
    # While the agent is down: b is released, d is placed, and junk is left behind.
    d = pod("d", grant("m", [c[3]]))
    await put_ledger(bus, [a, d])
    (root / "gone_m").mkdir()
    (root / "gone_m" / "env").write_text("CUDA_VISIBLE_DEVICES=x\n")
    node = await make_node(bus, cfg, dirs)
    try:
        assert sorted(p.name for p in root.iterdir()) == ["a_m", "d_m"]
        assert container_view(dirs[1], "d", "m")["CUDA_VISIBLE_DEVICES"] == c[3]
        await kubelet.wait_registered(RES, 2)  # the new plugin registered again
        await kubelet.wait_devices(RES)
        # The saved matcher knows a was allocated: d's call is exact, not a union.
        [resp] = await kubelet.admit_pod("d", [{RES: 1}])
        assert resp[RES].envs["NVIDIA_VISIBLE_DEVICES"] == c[3]
        assert node.plugin.exact == 1
    finally:
        await node.stop()


# --------------------------------------------------------------- annotations, telemetry


async def test_node_annotation_in_hami_format(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path]
) -> None:
    async with FakeKube() as fk:
        fk.add_node(NODE)
        client = await kube.Kube.connect(host=fk.url)
        node = await make_node(bus, cfg, dirs, kube=client)
        try:
            assert node.annotator is not None
            async with asyncio.timeout(5):
                await node.annotator.wait_synced()
            ann = fk.get("nodes", None, NODE)["metadata"]["annotations"]  # type: ignore[index]
            raw = json.loads(ann[NODE_REGISTER])
            assert raw[0] == {
                "id": cards(node)[0],
                "count": 10,
                "devmem": 81920,
                "devcore": 100,
                "type": "NVIDIA-A100-80GB",
                "mode": "hami-core",
                "health": True,
            }
            assert [d.index for d in decode_node_devices(ann[NODE_REGISTER])] == [0, 1, 2, 3]
            node.backend.unhealthy.add(2)  # type: ignore[attr-defined]
            await node.agent.publish_inventory()
            await until(
                lambda: (
                    '"health"'
                    not in json.loads(
                        fk.get("nodes", None, NODE)["metadata"]["annotations"][NODE_REGISTER]  # type: ignore[index]
                    )[2]
                )
            )
        finally:
            await node.stop()
            await client.close()


def write_region(path: Path, devices: list[tuple[str, int, int, int, int]]) -> None:
    """A region file as the limiter lays it out: (uuid, limit, used, util, last_kernel_ns)."""
    header, slot, slots, maxdev = 4096, 384, 1024, 16
    buf = bytearray(header + slot * slots)
    struct.pack_into(
        "<IIIIIIIiIIQ",
        buf,
        0,
        region.MAGIC,
        region.VERSION,
        header,
        slot,
        slots,
        maxdev,
        len(devices),
        1,
        0,
        0,
        0,
    )
    for i, (uuid, limit, used, util, last) in enumerate(devices):
        off = 128 + 192 * i
        struct.pack_into("<QQQ", buf, off, limit, used, last)
        struct.pack_into("<II", buf, off + 60, util, 80)
        struct.pack_into("48s", buf, off + 144, uuid.encode())
    path.write_bytes(bytes(buf))


async def test_telemetry_reads_regions_and_publishes(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path]
) -> None:
    got: list[Telemetry] = []

    async def on_tel(msg: object) -> None:
        got.append(decode(msg.data, Telemetry))  # type: ignore[attr-defined]

    await bus.subscribe(subjects.telemetry(NODE), on_tel)
    node = await make_node(bus, cfg, dirs, telemetry_interval=0.1)
    try:
        c = cards(node)
        await put_ledger(
            bus,
            [pod("a", grant("m", [c[0], c[1]], mem=1000)), pod("b", grant("m", [c[0]], mem=500))],
        )
        await until(lambda: (dirs[1] / CONTAINERS_DIR / "b_m").exists())
        now_ns = time.time_ns()
        write_region(
            dirs[1] / CONTAINERS_DIR / "a_m" / REGION_FILE,
            [(c[0], 1000 << 20, 300 << 20, 40, now_ns), (c[1], 1000 << 20, 0, 0, 0)],
        )
        await until(lambda: bool(got) and any(x.memory_used_bytes for x in got[-1].containers))
        tel = got[-1]
        rows = {(x.uid, x.uuid): x for x in tel.containers}
        assert rows[("a", c[0])].memory_used_bytes == 300 << 20
        assert rows[("a", c[0])].utilization == pytest.approx(0.4)
        assert rows[("a", c[0])].last_kernel_at == pytest.approx(now_ns / 1e9)
        # b never touched CUDA: reported anyway, with its granted limit.
        assert (rows[("b", c[0])].memory_used_bytes, rows[("b", c[0])].memory_limit_bytes) == (
            0,
            500 << 20,
        )
        # Host rows: the simulator's usage model, every card (the same driver baseline on
        # each, plus what the slices report; utilisation summed over the slices).
        dev = {d.uuid: d for d in tel.devices}
        assert set(dev) == set(c)
        assert dev[c[0]].memory_used_mib - dev[c[1]].memory_used_mib == 300
        assert dev[c[0]].utilization == pytest.approx(0.4) and dev[c[1]].utilization == 0.0
    finally:
        await node.stop()
