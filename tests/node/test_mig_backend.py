"""Dynamic MIG on the node: simulated geometries, NVML through a fake card set, and the
slice writer's instance lifecycle (create on prepare, destroy on release, adopt on start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from services.nodeagent.backends import Discovery, MigError
from services.nodeagent.backends.nvml import NvmlBackend
from services.nodeagent.backends.sim import SimBackend, SimSpecError, parse_gpu_spec
from services.nodeagent.registration import register
from services.nodeagent.slices import SliceWriter, parse_env
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config, ConfigError, NodeSettings, load
from shared.hami import annotations as ann
from shared.schemas import (
    AllocFailed,
    AllocReleased,
    AllocRequested,
    CardGrant,
    ContainerAsk,
    ContainerGrant,
    DeviceAsk,
    LedgerAlloc,
    MigSlice,
)
from tests.fakekubelet import FakeKubelet
from tests.node import test_kube_node as kube_node
from tests.node.util import container_view

# ------------------------------------------------------------------------ simulator


@pytest.mark.parametrize(
    ("text", "mode", "mem"),
    [
        ("A100-SXM4-40GB:2:mig", "mig", 40960),
        ("A100-SXM4-40GB:2:40960:MIG", "mig", 40960),
        ("H100-SXM5-80GB:1:mig", "mig", 81920),
        ("A100-SXM4-40GB:2", "hami-core", 40960),
    ],
)
def test_sim_spec_spells_mig_mode_last(text: str, mode: str, mem: int) -> None:
    spec = parse_gpu_spec(text)
    assert (spec.mode, spec.memory_mib) == (mode, mem)


@pytest.mark.parametrize("bad", ["T4:2:mig", "V100-16GB:1:16384:mig", "A100:mig"])
def test_sim_spec_refuses_mig_without_a_geometry(bad: str) -> None:
    with pytest.raises(SimSpecError):
        parse_gpu_spec(bad)


def test_sim_mig_cards_register_mode_profiles_and_no_scaling() -> None:
    backend = SimBackend(
        "n", [parse_gpu_spec("A100-SXM4-40GB:1:mig"), parse_gpu_spec("A100-SXM4-40GB:1")]
    )
    settings = NodeSettings(
        device_split_count=4, device_memory_scaling=2.0, device_core_scaling=2.0
    )
    mig, core = register(backend.discover(), settings)[0]
    # HAMi scales neither memory nor cores of a MIG card; it holds 7 (1g) instances
    assert (mig.mode, mig.devmem, mig.devcore, mig.count) == ("mig", 40960, 100, 7)
    assert (core.mode, core.devmem, core.devcore, core.count, core.mig_profiles) == (
        "hami-core",
        81920,
        200,
        4,
        [],
    )
    names = [p.name for p in mig.mig_profiles]
    # the card has a 4g.20gb too, but HAMi's chart allowlist leaves it out
    assert names == ["1g.5gb", "2g.10gb", "3g.20gb", "7g.40gb"]
    three = mig.mig_profiles[2]
    assert [(x.start, x.size) for x in three.placements] == [(0, 4), (4, 4)]
    # the node register annotation carries them as HAMi writes migProfiles
    back = ann.decode_node_devices(ann.encode_node_devices([mig]))
    assert back[0].mig_profiles == mig.mig_profiles and back[0].mode == "mig"


def test_sim_creates_only_legal_non_overlapping_instances() -> None:
    backend = SimBackend("n", [parse_gpu_spec("A100-SXM4-40GB:1:mig"), parse_gpu_spec("T4:1")])
    gpu, t4 = (c.uuid for c in backend.discover().cards)
    three = backend.create_mig(gpu, "3g.20gb", 4, 4)
    assert three.uuid.startswith("MIG-") and backend.mig_instances(gpu) == [three]
    with pytest.raises(MigError, match="not valid"):
        backend.create_mig(gpu, "3g.20gb", 2, 4)  # 3g starts at 0 or 4 only
    with pytest.raises(MigError, match="overlaps"):
        backend.create_mig(gpu, "1g.5gb", 5, 1)
    with pytest.raises(MigError, match="no MIG profile"):
        backend.create_mig(gpu, "1g.10gb", 0, 2)  # an A100-80GB profile
    with pytest.raises(MigError, match="not in MIG mode"):
        backend.create_mig(t4, "1g.5gb", 0, 1)
    backend.destroy_mig(three)
    backend.destroy_mig(three)  # gone already: not an error
    assert backend.mig_instances(gpu) == []
    assert backend.create_mig(gpu, "1g.5gb", 5, 1).start == 5


# -------------------------------------------------------------------- NVML (faked)


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


# NVML's answers for an A100-SXM4-40GB: GI profile enum -> (id, slices, instances, SMs, MiB, name)
A100_40 = {
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: (19, 1, 7, 14, 4864, b"MIG 1g.5gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: (14, 2, 3, 28, 9856, b"MIG 2g.10gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: (9, 3, 2, 42, 19968, b"MIG 3g.20gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: (5, 4, 1, 56, 19968, b"MIG 4g.20gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: (0, 7, 1, 98, 40192, b"MIG 7g.40gb"),
}
PLACEMENTS = {19: [(s, 1) for s in range(7)], 14: [(0, 2), (2, 2), (4, 2)], 9: [(0, 4), (4, 4)],
              5: [(0, 4)], 0: [(0, 8)]}  # fmt: skip


class FakeNvml:
    """The pynvml functions the NVML backend calls, over one A100-40GB in MIG mode and
    one T4; records every MIG call so tests can check what was asked of the driver."""

    NVMLError = FakeNvmlError
    NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_TEMPERATURE_GPU = 0
    NVML_FEATURE_ENABLED = 1
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED = 0
    c_nvmlGpuInstancePlacement_t = pynvml.c_nvmlGpuInstancePlacement_t

    def __init__(self) -> None:
        for k in dir(pynvml):
            if k.startswith(
                ("NVML_GPU_INSTANCE_PROFILE_", "NVML_COMPUTE_INSTANCE_PROFILE_", "NVML_TOPOLOGY_")
            ):
                setattr(self, k, getattr(pynvml, k))
        self.cards = [
            {"uuid": "GPU-a100", "name": "NVIDIA A100-SXM4-40GB", "mem": 40960 << 20, "mig": True},
            {"uuid": "GPU-t4", "name": "Tesla T4", "mem": 15360 << 20, "mig": False},
        ]
        self.gis: dict[int, dict[str, Any]] = {}  # GI id -> {profile, start, size, cis}
        self.calls: list[tuple[Any, ...]] = []
        self.fail_ci = False
        self._next = 1

    def _nf(self) -> FakeNvmlError:
        return FakeNvmlError(pynvml.NVML_ERROR_NOT_FOUND)

    # discovery
    def nvmlInit(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for i, c in enumerate(self.cards):
            if c["uuid"] == uuid:
                return i
        raise self._nf()

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        return 0

    def nvmlDeviceGetMigMode(self, h: Any) -> list[int]:
        if isinstance(h, tuple):
            raise FakeNvmlError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        on = int(self.cards[h]["mig"])
        return [on, on]

    def nvmlDeviceGetTemperature(self, h: int, kind: int) -> int:
        return 40

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return str(self.cards[h]["name"]).encode()

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        if isinstance(h, tuple):  # a MIG device handle: (card, GI id)
            return f"MIG-{h[1]:04d}"
        return str(self.cards[h]["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return _Obj(total=self.cards[h]["mem"], used=0)

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return _Obj(busId=f"0000:0{h}:00.0".encode())

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return int(pynvml.NVML_TOPOLOGY_SYSTEM)

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        raise FakeNvmlError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # MIG
    def nvmlDeviceGetGpuInstanceProfileInfo(self, h: int, enum: int) -> Any:
        if not self.cards[h]["mig"] or enum not in A100_40:
            raise FakeNvmlError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        pid, slices, inst, sm, mem, name = A100_40[enum]
        return _Obj(id=pid, sliceCount=slices, instanceCount=inst, multiprocessorCount=sm, memorySizeMB=mem,
                    name=name)  # fmt: skip

    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self, h: int, pid: int, arr: Any, count: Any
    ) -> int:
        got = PLACEMENTS[pid]
        for k, (start, size) in enumerate(got):
            arr[k].start, arr[k].size = start, size
        count._obj.value = len(got)
        return 0

    def nvmlDeviceCreateGpuInstanceWithPlacement(self, h: int, pid: int, placement: Any) -> int:
        p = placement._obj
        self.calls.append(("create_gi", h, pid, p.start, p.size))
        for gi in self.gis.values():
            if p.start < gi["start"] + gi["size"] and gi["start"] < p.start + p.size:
                raise FakeNvmlError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        gid = self._next
        self._next += 1
        self.gis[gid] = {"profile": pid, "start": p.start, "size": p.size, "cis": set()}
        return gid

    def nvmlGpuInstanceGetInfo(self, gi: int) -> Any:
        g = self.gis[gi]
        return _Obj(id=gi, profileId=g["profile"], placement=_Obj(start=g["start"], size=g["size"]))

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, gi: int, enum: int, eng: int) -> Any:
        return _Obj(id=100 + enum)

    def nvmlGpuInstanceCreateComputeInstance(self, gi: int, pid: int) -> tuple[int, int]:
        self.calls.append(("create_ci", gi, pid))
        if self.fail_ci:
            raise FakeNvmlError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        self.gis[gi]["cis"].add(0)
        return (gi, 0)

    def nvmlComputeInstanceGetInfo(self, ci: tuple[int, int]) -> Any:
        return _Obj(id=ci[1])

    def nvmlComputeInstanceDestroy(self, ci: tuple[int, int]) -> None:
        self.calls.append(("destroy_ci", ci[0], ci[1]))
        self.gis[ci[0]]["cis"].discard(ci[1])

    def nvmlGpuInstanceDestroy(self, gi: int) -> None:
        self.calls.append(("destroy_gi", gi))
        if gi not in self.gis:
            raise self._nf()
        del self.gis[gi]

    def nvmlDeviceGetGpuInstanceById(self, h: int, gid: int) -> int:
        if gid not in self.gis:
            raise self._nf()
        return gid

    def nvmlGpuInstanceGetComputeInstanceById(self, gi: int, cid: int) -> tuple[int, int]:
        if cid not in self.gis[gi]["cis"]:
            raise self._nf()
        return (gi, cid)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: int) -> int:
        return 7 if self.cards[h]["mig"] else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: int, k: int) -> tuple[int, int]:
        live = sorted(g for g, v in self.gis.items() if v["cis"])
        if k >= len(live):
            raise self._nf()
        return (h, live[k])

    def nvmlDeviceGetGpuInstanceId(self, mh: tuple[int, int]) -> int:
        return mh[1]

    def nvmlDeviceGetComputeInstanceId(self, mh: tuple[int, int]) -> int:
        return 0


def test_nvml_reports_mig_mode_and_profiles_from_the_driver() -> None:
    cards = NvmlBackend(nv=FakeNvml()).discover().cards
    a100, t4 = cards
    assert (a100.mode, t4.mode, t4.mig_profiles) == ("mig", "hami-core", ())
    got = [(p.name, p.memory_mb, p.core, p.slice_count) for p in a100.mig_profiles]
    # the compute share is the profile's SMs over the whole card's (98)
    assert got == [("1g.5gb", 4864, 14, 1), ("2g.10gb", 9856, 29, 2), ("3g.20gb", 19968, 43, 3),
                   ("4g.20gb", 19968, 57, 4), ("7g.40gb", 40192, 100, 7)]  # fmt: skip
    assert [(x.start, x.size) for x in a100.mig_profiles[1].placements] == [(0, 2), (2, 2), (4, 2)]
    # registration keeps what the allowlist allows: HAMi chart's default leaves out 4g
    (dev,) = register(Discovery(cards=[a100]), NodeSettings())[0]
    assert [p.name for p in dev.mig_profiles] == ["1g.5gb", "2g.10gb", "3g.20gb", "7g.40gb"]


@pytest.mark.parametrize(
    ("allowlist", "names", "count"),
    [
        (
            [{"models": ["A100-SXM4-40GB"], "profiles": ["4g.20gb", "1g.5gb"]}],
            ["1g.5gb", "4g.20gb"],
            7,
        ),
        (
            [{"models": ["A100"], "profiles": ["4g.20gb"]}],
            ["4g.20gb"],
            1,
        ),  # a substring of the model
        (
            [{"models": ["H100-SXM5-80GB"], "profiles": ["1g.10gb"]}],
            [],
            1,
        ),  # no entry names it: none
    ],
)
def test_the_allowlist_setting_chooses_the_profiles(
    allowlist: list[dict[str, list[str]]], names: list[str], count: int
) -> None:
    cfg = load(None, env={"HAMI__NODE__MIGPROFILEALLOWLIST": json.dumps(allowlist)})
    a100 = NvmlBackend(nv=FakeNvml()).discover().cards[0]
    (dev,) = register(Discovery(cards=[a100]), cfg.node)[0]
    assert ([p.name for p in dev.mig_profiles], dev.count) == (names, count)


@pytest.mark.parametrize(
    ("allowlist", "error"),
    [
        ([{"models": ["A100"]}], "MIG profile allowlist must define models and profiles"),
        ([{"models": ["A100"], "profiles": ["1g5gb"]}], "invalid MIG profile '1g5gb'"),
        ([{"models": ["A100"], "profiles": ["g.5gb"]}], "invalid MIG profile 'g.5gb'"),
    ],
)
def test_a_bad_allowlist_is_refused_with_hamis_text(
    allowlist: list[dict[str, list[str]]], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        load(None, env={"HAMI__NODE__MIGPROFILEALLOWLIST": json.dumps(allowlist)})


def test_nvml_creates_exactly_the_placement_asked_and_destroys_it() -> None:
    nv = FakeNvml()
    backend = NvmlBackend(nv=nv)
    backend.discover()
    inst = backend.create_mig("GPU-a100", "2g.10gb", 2, 2)
    assert nv.calls[:2] == [("create_gi", 0, 14, 2, 2), ("create_ci", inst.gpu_instance, 101)]
    assert inst.uuid == f"MIG-{inst.gpu_instance:04d}" and (inst.start, inst.size) == (2, 2)
    assert backend.mig_instances("GPU-a100") == [inst]
    with pytest.raises(MigError, match="not valid"):
        backend.create_mig("GPU-a100", "2g.10gb", 1, 2)  # never another placement
    with pytest.raises(MigError, match="create GPU instance"):
        backend.create_mig("GPU-a100", "1g.5gb", 3, 1)  # the driver refuses the overlap
    backend.destroy_mig(inst)
    assert ("destroy_ci", inst.gpu_instance, 0) in nv.calls and nv.gis == {}
    backend.destroy_mig(inst)  # gone already


def test_nvml_rolls_back_a_half_created_instance() -> None:
    nv = FakeNvml()
    nv.fail_ci = True
    backend = NvmlBackend(nv=nv)
    with pytest.raises(MigError, match="compute instance"):
        backend.create_mig("GPU-a100", "1g.5gb", 6, 1)
    assert nv.gis == {} and nv.calls[-1][0] == "destroy_gi"


def test_nvml_refuses_a_profile_it_cannot_map() -> None:
    with pytest.raises(MigError, match="unsupported"):
        NvmlBackend(nv=FakeNvml()).create_mig("GPU-a100", "1c.2g.10gb", 0, 2)


# ----------------------------------------------------------- slice writer lifecycle


def mig_alloc(
    uid: str, gpu: str, profile: str, start: int, size: int, mem: int = 9856
) -> LedgerAlloc:
    d = CardGrant(
        uuid=gpu, mem=mem, cores=29, mig=MigSlice(profile=profile, start=start, size=size)
    )
    return LedgerAlloc(uid=uid, name=uid, containers=[ContainerGrant(name="main", devices=[d])])


@pytest.fixture
def sim() -> tuple[SimBackend, str]:
    backend = SimBackend("n", [parse_gpu_spec("A100-SXM4-40GB:1:mig")])
    return backend, backend.discover().cards[0].uuid


async def test_prepare_creates_the_instance_and_release_destroys_it(
    tmp_path: Path, sim: tuple[SimBackend, str]
) -> None:
    backend, gpu = sim
    w = SliceWriter(tmp_path, "n", NodeSettings(), mig=backend)
    a = mig_alloc("pod-a", gpu, "2g.10gb", 2, 2)
    new = await w.sync({"pod-a": a})
    assert [x.uid for x in new] == ["pod-a"]
    (inst,) = backend.mig_instances(gpu)
    assert (inst.profile, inst.start, inst.size) == ("2g.10gb", 2, 2)
    env = parse_env(w.env_path("pod-a", "main").read_text())
    # the container sees the instance, not the card, and no SM limit inside it
    assert env["CUDA_VISIBLE_DEVICES"] == inst.uuid
    assert (env["CUDA_DEVICE_MEMORY_LIMIT_0"], env["CUDA_DEVICE_SM_LIMIT_0"]) == ("9856m", "100")
    shown = w.realised(a.containers[0].devices[0])
    assert shown.mig is not None and (shown.mig.uuid, shown.mig.gpu_instance) == (
        inst.uuid,
        inst.gpu_instance,
    )
    await w.sync({})
    assert backend.mig_instances(gpu) == [] and not w.env_path("pod-a", "main").exists()


async def test_a_pod_whose_instance_cannot_be_made_is_not_prepared(
    tmp_path: Path, sim: tuple[SimBackend, str]
) -> None:
    backend, gpu = sim
    w = SliceWriter(tmp_path, "n", NodeSettings(), mig=backend)
    await w.sync({})
    foreign = backend.create_mig(gpu, "3g.20gb", 0, 4)  # someone else's, created after start
    b = mig_alloc("pod-b", gpu, "2g.10gb", 2, 2)
    assert await w.sync({"pod-b": b}) == []
    assert not w.env_path("pod-b", "main").exists() and "overlaps" in next(
        iter(w.mig_failed.values())
    )
    backend.destroy_mig(foreign)
    assert [x.uid for x in await w.sync({"pod-b": b})] == ["pod-b"]  # retried at the next change
    assert w.env_path("pod-b", "main").exists() and w.mig_failed == {}


async def test_restart_adopts_reserved_instances_and_destroys_stale_ones(
    tmp_path: Path, sim: tuple[SimBackend, str]
) -> None:
    backend, gpu = sim
    kept = backend.create_mig(gpu, "1g.5gb", 6, 1)
    stale = backend.create_mig(
        gpu, "3g.20gb", 0, 4
    )  # its pod was released while the agent was down
    w = SliceWriter(tmp_path, "n", NodeSettings(), mig=backend)
    await w.sync({"pod-c": mig_alloc("pod-c", gpu, "1g.5gb", 6, 1, mem=4864)})
    assert backend.mig_instances(gpu) == [kept]
    assert stale not in backend.mig_instances(gpu)
    env = parse_env(w.env_path("pod-c", "main").read_text())
    assert env["CUDA_VISIBLE_DEVICES"] == kept.uuid


async def test_writer_without_a_mig_backend_is_unchanged(tmp_path: Path) -> None:
    w = SliceWriter(tmp_path, "n", NodeSettings(), mig=object())
    plain = LedgerAlloc(
        uid="p",
        name="p",
        containers=[
            ContainerGrant(name="c", devices=[CardGrant(uuid="GPU-1", mem=1000, cores=30)])
        ],
    )
    assert [x.uid for x in await w.sync({"p": plain})] == ["p"]
    env = parse_env(w.env_path("p", "c").read_text())
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_SM_LIMIT_0"]) == ("GPU-1", "30")


# ------------------------------------------------------ end to end, Kubernetes mode

NODE, RES, make_node, until = kube_node.NODE, kube_node.RES, kube_node.make_node, kube_node.until
dirs, kubelet = kube_node.dirs, kube_node.kubelet  # the Kubernetes-mode node's fixtures


async def test_kube_node_realises_placements_mig_grants_and_frees_them(
    nats_url: str, bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet
) -> None:
    """Real placement decides on a simulated MIG card, the node agent creates each
    instance, the kubelet's Allocate and the slice file point the container at it; a
    release destroys it and the freed placement serves the next pod."""
    pbus = await Bus.connect(nats_url, "placement")
    placement = PlacementService(pbus, cfg)
    await placement.start()
    backend = SimBackend(NODE, [parse_gpu_spec("A100-SXM4-40GB:1:mig")])
    gpu = backend.discover().cards[0].uuid
    failed: list[AllocFailed] = []

    async def on_failed(msg: object) -> None:
        ev = decode_event(msg.data)  # type: ignore[attr-defined]
        assert isinstance(ev, AllocFailed)
        failed.append(ev)

    await bus.subscribe(subjects.alloc("failed"), on_failed)
    node = await make_node(bus, cfg, dirs, backend=backend)
    try:
        await kubelet.wait_devices(RES, lambda d: len(d) == 7)  # one replica per instance
        for i in range(3):
            await bus.publish_event(subjects.alloc("requested"), ask(f"u{i}", 9000), msg_id=f"u{i}")
        await until(lambda: len(node.agent.allocs) == 3 and len(backend.mig_instances(gpu)) == 3)
        by_start = {i.start: i for i in backend.mig_instances(gpu)}
        assert sorted(by_start) == [0, 2, 4] and {i.profile for i in by_start.values()} == {
            "2g.10gb"
        }
        for uid in ("u0", "u1", "u2"):
            a = node.agent.allocs[uid]
            d = a.containers[0].devices[0]
            assert d.mig is not None and (d.mem, d.cores) == (9856, 29)
            [resp] = await kubelet.admit_pod(uid, [{RES: 1}])
            inst = by_start[d.mig.start]
            # the three asks look alike to Allocate: every candidate's instance is made
            # visible, never the whole card, and the pod's own slice file narrows CUDA
            # to its instance
            visible = resp[RES].envs["NVIDIA_VISIBLE_DEVICES"].split(",")
            assert inst.uuid in visible and gpu not in visible
            assert set(visible) <= {i.uuid for i in by_start.values()}
            assert container_view(dirs[1], uid, "main")["CUDA_VISIBLE_DEVICES"] == inst.uuid
        # free memory is left (40960 - 3 x 9856) but no 2g/3g/7g placement: refused
        await bus.publish_event(
            subjects.alloc("requested"), ask("u3", 9000, pending=False), msg_id="u3"
        )
        await until(lambda: len(failed) == 1)
        assert failed[0].uid == "u3" and "CardMigTopologyInfeasible" in failed[0].message
        # release the middle one: its instance goes, and the next pod gets its slices
        released = AllocReleased(uid="u1", name="u1", node=NODE, reason="deleted")
        await bus.publish_event(subjects.alloc("released", NODE), released, msg_id="rel-u1")
        await until(lambda: sorted(i.start for i in backend.mig_instances(gpu)) == [0, 4])
        await bus.publish_event(subjects.alloc("requested"), ask("u4", 9000), msg_id="u4")
        await until(lambda: "u4" in node.agent.allocs and len(backend.mig_instances(gpu)) == 3)
        d4 = node.agent.allocs["u4"].containers[0].devices[0]
        assert d4.mig is not None and d4.mig.start == 2
    finally:
        await node.stop()
        await placement.stop()
        await pbus.close()


def ask(uid: str, mem: int, pending: bool = True) -> AllocRequested:
    return AllocRequested(
        uid=uid, name=uid, namespace="default", source="kube", pending=pending,
        containers=[ContainerAsk(name="main", devices=[DeviceAsk(mem=mem)])],
    )  # fmt: skip
