"""The HAMi codecs, table-driven: pod -> request (REFERENCE §1-2), device and node
annotations (§4-5), quotas, quantities."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from shared.config import NodeSettings, ResourceNames
from shared.hami import annotations as ann
from shared.hami.codec import PodSpecError, pod_request, quota_from_resource_quotas
from shared.hami.quantity import QuantityError, mib, milli, parse_quantity
from shared.schemas import CardGrant, ContainerGrant, Device, DeviceAsk, Quota, ScoringWeights


def pod(*containers: dict[str, Any], init: list[dict[str, Any]] | None = None,
        annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1",
                     "annotations": annotations or {}},
        "spec": {"containers": list(containers), "initContainers": init or [], **spec},
    }


def lim(name: str = "c", limits: dict[str, Any] | None = None,
        requests: dict[str, Any] | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if limits is not None:
        res["limits"] = limits
    if requests is not None:
        res["requests"] = requests
    return {"name": name, "image": "x", "resources": res}


G, M, P, C = "nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage", "nvidia.com/gpucores"

# (limits, settings overrides, expected DeviceAsk or None)
RESOURCE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], DeviceAsk | None]] = [
    # A bare count books 0 cores here, as in HAMi's scheduler: the webhook is what writes
    # gpucores: 100 into such a spec (tests/kube/test_webhook_hami_cases.py).
    ("bare gpu = whole memory, cores as given", {G: "1"}, {}, DeviceAsk(nums=1, mem_percent=100, cores=0)),
    ("two whole cards", {G: 2}, {}, DeviceAsk(nums=2, mem_percent=100, cores=0)),
    ("mem and cores", {G: "1", M: "3000", C: "30"}, {}, DeviceAsk(nums=1, mem=3000, cores=30)),
    ("memoryFactor multiplies gpumem", {G: "1", M: "3"}, {"memory_factor": 1000}, DeviceAsk(nums=1, mem=3000)),
    ("percentage", {G: "1", P: "50"}, {}, DeviceAsk(nums=1, mem_percent=50)),
    ("percentage >100 clamps", {G: "1", P: "150"}, {}, DeviceAsk(nums=1, mem_percent=100, cores=0)),
    ("percentage <=0 ignored -> whole card", {G: "1", P: "0", C: "20"}, {}, DeviceAsk(nums=1, mem_percent=100, cores=20)),
    ("gpumem wins over percentage", {G: "1", M: "1024", P: "50"}, {}, DeviceAsk(nums=1, mem=1024)),
    ("cores clamp at 100", {G: "1", M: "1000", C: "300"}, {}, DeviceAsk(nums=1, mem=1000, cores=100)),
    ("cores without gpu -> defaultGPUNum", {C: "30"}, {"default_gpu_num": 1}, DeviceAsk(nums=1, mem_percent=100, cores=30)),
    ("mem without gpu -> defaultGPUNum 2", {M: "2000"}, {"default_gpu_num": 2}, DeviceAsk(nums=2, mem=2000)),
    ("defaultMemory", {G: "1"}, {"default_memory": 4096}, DeviceAsk(nums=1, mem=4096)),
    ("defaultCores", {G: "1", M: "1000"}, {"default_cores": 10}, DeviceAsk(nums=1, mem=1000, cores=10)),
    ("gpu 0 asks nothing", {G: "0"}, {}, None),
    ("no HAMi resources", {"cpu": "1"}, {}, None),
]


@pytest.mark.parametrize(("why", "limits", "over", "want"), RESOURCE_CASES, ids=[c[0] for c in RESOURCE_CASES])
def test_resources(why: str, limits: dict[str, Any], over: dict[str, Any], want: DeviceAsk | None) -> None:
    s = NodeSettings(**over)
    req = pod_request(pod(lim(limits=limits)), s)
    got = req.containers[0].devices
    assert got == ([] if want is None else [want])


def test_requests_are_read_when_limits_lack_the_resource() -> None:
    req = pod_request(pod(lim(limits={"cpu": "1"}, requests={G: "1", M: "1000"})))
    assert req.containers[0].devices == [DeviceAsk(nums=1, mem=1000)]


def test_order_priority_node_resources_and_identity() -> None:
    p = pod(
        lim("app1", limits={G: "1", M: "5000", C: "30", "nvidia.com/priority": "0"},
            requests={"cpu": "500m", "memory": "1Gi"}),
        lim("app2", limits={"cpu": "2", "memory": "512Mi"}),
        init=[lim("init1", limits={G: "1", M: "3000"})],
    )
    req = pod_request(p, now=12.5)
    assert [(c.name, c.init) for c in req.containers] == [("init1", True), ("app1", False), ("app2", False)]
    assert (req.containers[1].cpu_milli, req.containers[1].memory_mib) == (500, 1024)
    assert (req.containers[2].cpu_milli, req.containers[2].memory_mib) == (2000, 512)
    assert req.priority == 0
    assert (req.uid, req.name, req.namespace, req.source, req.pending, req.requested_at) == (
        "u-1", "p", "ns", "kube", True, 12.5)
    assert pod_request(pod(lim(limits={G: "1"}))).priority == 1


def test_configurable_resource_names() -> None:
    names = ResourceNames(count="example.com/vgpu", memory="example.com/vmem")
    req = pod_request(pod(lim(limits={"example.com/vgpu": "1", "example.com/vmem": "100"})), names=names)
    assert req.containers[0].devices == [DeviceAsk(nums=1, mem=100)]


ERROR_CASES = [
    ({G: "1.5"}, {}, 'container "c": nvidia.com/gpu must be a whole number, got \'1.5\''),
    ({G: "-1"}, {}, "nvidia.com/gpu must not be negative"),
    ({G: "1", M: "lots"}, {}, "nvidia.com/gpumem must be a whole number"),
    ({G: "1", "cpu": "fast"}, {}, "cpu 'fast' is not a quantity"),
    ({G: "1"}, {ann.NODE_SCHEDULER_POLICY: "roundrobin"}, "is not one of binpack, spread"),
    ({G: "1"}, {ann.GPU_SCHEDULER_POLICY: "binpack,fastest"}, "unknown 'fastest'"),
    ({G: "1"}, {ann.DEVICE_SCORING_WEIGHTS: "slot=1,core=1"}, "missing memory"),
    ({G: "1"}, {ann.DEVICE_SCORING_WEIGHTS: "slot=0,core=0,memory=0"}, "at least one weight must be positive"),
    ({G: "1"}, {ann.DEVICE_SCORING_WEIGHTS: "slot=-1,core=1,memory=1"}, "slot must not be negative"),
    ({G: "1"}, {ann.DEVICE_SCORING_WEIGHTS: "slot=a,core=1,memory=1"}, "slot must be a whole number"),
    ({G: "1"}, {ann.DEVICE_SCORING_WEIGHTS: "gpu=1,core=1,memory=1"}, "'gpu=1' is not one of"),
    ({G: "1"}, {ann.VGPU_MODE: "vgpu"}, "is not one of hami-core, mig, mps"),
]


@pytest.mark.parametrize(("limits", "annotations", "msg"), ERROR_CASES)
def test_errors_say_what_is_wrong(limits: dict[str, Any], annotations: dict[str, str], msg: str) -> None:
    with pytest.raises(PodSpecError) as err:
        pod_request(pod(lim(limits=limits), annotations=annotations))
    assert msg in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(PodSpecError) as err:
        pod_request(pod(lim("a", limits={G: "x"}), lim("b", limits={C: "y"}),
                        annotations={ann.VGPU_MODE: "bad"}))
    assert len(err.value.problems) == 3


def test_constraints_from_annotations_and_spec() -> None:
    p = pod(
        lim(limits={G: "1"}),
        annotations={
            ann.NODE_SCHEDULER_POLICY: "spread",
            ann.GPU_SCHEDULER_POLICY: "Binpack, numa",
            ann.DEVICE_SCORING_WEIGHTS: "slot=1,core=2,memory=3",
            ann.USE_GPUTYPE: "A100, H100",
            ann.NOUSE_GPUTYPE: "T4",
            ann.USE_GPUUUID: "GPU-a,GPU-b",
            ann.NOUSE_GPUUUID: "GPU-c",
            ann.NUMA_BIND: "true",
            ann.VGPU_MODE: "mig",
        },
        nodeSelector={"zone": "a"},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
            ]}}},
    )
    c = pod_request(p).constraints
    assert c.node_policy == "spread"
    assert c.gpu_policy == "binpack,numa"
    assert c.weights == ScoringWeights(slot=1, core=2, memory=3)
    assert (c.use_types, c.nouse_types) == (["A100", "H100"], ["T4"])
    assert (c.use_uuids, c.nouse_uuids) == (["GPU-a", "GPU-b"], ["GPU-c"])
    assert c.numa_bind and c.vgpu_mode == "mig"
    assert c.node_selector == {"zone": "a"}
    assert [[(r.key, r.operator, r.values) for r in t] for t in c.affinity] == [
        [("k", "In", ["v"])], [("kubernetes.io/hostname", "In", ["n1"])]]
    assert c.tolerations[0].operator == "Exists" and c.tolerations[0].key == "gpu"


# ------------------------------------------------------------------ device annotations


def g(uuid: str, mem: int, cores: int) -> CardGrant:
    return CardGrant(uuid=uuid, mem=mem, cores=cores)


ENCODE_CASES = [
    # REFERENCE §4's example: no-GPU init container, then two app containers.
    ([ContainerGrant(init=True), ContainerGrant(devices=[g("GPU-aaa", 3000, 0)]),
      ContainerGrant(devices=[g("GPU-aaa", 5000, 30), g("GPU-bbb", 5000, 30)])],
     ";GPU-aaa,NVIDIA,3000,0:;GPU-aaa,NVIDIA,5000,30:GPU-bbb,NVIDIA,5000,30:;"),
    ([ContainerGrant(devices=[g("GPU-1", 81920, 100)])], "GPU-1,NVIDIA,81920,100:;"),
    ([ContainerGrant(), ContainerGrant()], ";;"),
    ([], ""),
]


@pytest.mark.parametrize(("containers", "text"), ENCODE_CASES)
def test_pod_device_encoding_round_trip(containers: list[ContainerGrant], text: str) -> None:
    assert ann.encode_pod_devices(containers) == text
    # HAMi's split keeps the entry after the final ';' (and reads "" as one container).
    assert ann.decode_pod_devices(text) == [c.devices for c in containers] + [[]]


def test_pod_device_encoding_keeps_only_the_vendor() -> None:
    other = CardGrant(uuid="MLU-1", vendor="MLU", mem=1, cores=1)
    assert ann.encode_pod_devices([ContainerGrant(devices=[other, g("GPU-1", 1, 2)])]) == "GPU-1,NVIDIA,1,2:;"


def test_consume_next_container_like_the_device_plugin() -> None:
    text = ";GPU-aaa,NVIDIA,3000,0:;GPU-bbb,NVIDIA,5000,30:;"
    pos, devs, rest = ann.consume_next_container(text)
    # HAMi re-encodes the trailing empty entry too: one more ';' per write-back.
    assert (pos, [d.uuid for d in devs], rest) == (1, ["GPU-aaa"], ";;GPU-bbb,NVIDIA,5000,30:;;")
    pos, devs, rest = ann.consume_next_container(rest)
    assert (pos, rest) == (2, ";;;;;")
    assert ann.consume_next_container(rest) == (-1, [], ";;;;;")


@pytest.mark.parametrize("bad", ["GPU-1,NVIDIA,100:;", "GPU-1,NVIDIA,x,1:;"])
def test_pod_device_decode_errors(bad: str) -> None:
    with pytest.raises(ann.AnnotationError):
        ann.decode_pod_devices(bad)


# -------------------------------------------------------------------- node annotations

DEVS = [
    Device(uuid="GPU-0", index=0, type="NVIDIA-A100-80GB", devmem=81920, numa=0),
    Device(uuid="GPU-1", index=1, type="NVIDIA-A100-80GB", devmem=81920, numa=1,
           health=False, mode="mig", count=7, devcore=200),
]


def test_node_register_json_is_hamis_omitempty_form() -> None:
    text = ann.encode_node_devices(DEVS)
    assert text == (
        '[{"id":"GPU-0","count":10,"devmem":81920,"devcore":100,"type":"NVIDIA-A100-80GB",'
        '"mode":"hami-core","health":true},'
        '{"id":"GPU-1","index":1,"count":7,"devmem":81920,"devcore":200,"type":"NVIDIA-A100-80GB",'
        '"numa":1,"mode":"mig"}]'
    )
    assert ann.decode_node_devices(text) == DEVS


def test_node_register_colon_form() -> None:
    text = ann.encode_node_devices_colon(DEVS)
    assert text == ("GPU-0,10,81920,100,NVIDIA-A100-80GB,0,true,0,hami-core:"
                    "GPU-1,7,81920,200,NVIDIA-A100-80GB,1,false,1,mig:")
    assert ann.decode_node_devices(text) == DEVS
    # the seven-field form of older writers carries no index: HAMi reads 0 for each
    old = ann.decode_node_devices("GPU-9,4,1000,100,NVIDIA-T4,0,true:GPU-8,4,1000,100,NVIDIA-T4,0,true")
    assert [(d.uuid, d.index, d.mode) for d in old] == [("GPU-9", 0, "hami-core"), ("GPU-8", 0, "hami-core")]


@pytest.mark.parametrize("bad", ["[{\"index\":1}]", "[1", "{}", "GPU-1,x,1,1,T,0,true:",
                                 "GPU-1,1,1,1,T,0,maybe:", "", "[]"])
def test_node_register_errors(bad: str) -> None:
    with pytest.raises(ann.AnnotationError):
        ann.decode_node_devices(bad)


def test_node_scores_round_trip() -> None:
    links = [[0, 140], [140, 0]]
    text = ann.encode_node_scores(DEVS, links)
    assert text == '[{"uuid":"GPU-0","score":{"GPU-1":140}},{"uuid":"GPU-1","score":{"GPU-0":140}}]'
    assert ann.decode_node_scores(text, DEVS) == links


# ------------------------------------------------------------------ quota, quantities


def test_quota_tightest_wins_and_memory_factor() -> None:
    rqs = [{"spec": {"hard": {"limits.nvidia.com/gpumem": "20000", "pods": "10"}}},
           {"spec": {"hard": {"limits.nvidia.com/gpumem": "10000", "limits.nvidia.com/gpucores": "200"}}}]
    assert quota_from_resource_quotas(rqs) == Quota(memory_mib=10000, cores=200)
    assert quota_from_resource_quotas(rqs[:1], NodeSettings(memory_factor=2)) == Quota(memory_mib=40000)
    assert quota_from_resource_quotas([{"spec": {"hard": {"pods": "1"}}}]) is None


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), ("500m", Fraction(1, 2)), ("2Gi", 2 << 30), ("1e3", 1000), ("1.5k", 1500),
    (".5", Fraction(1, 2)), (3, 3), ("100M", 10**8),
])
def test_quantities(text: Any, value: Fraction) -> None:
    assert parse_quantity(text) == value


def test_quantity_helpers_and_errors() -> None:
    assert milli("0.1") == 100 and milli("1") == 1000 and mib("1Gi") == 1024 and mib("1") == 1
    for bad in ("", "1Gb", "abc", "1..2"):
        with pytest.raises(QuantityError):
            parse_quantity(bad)
