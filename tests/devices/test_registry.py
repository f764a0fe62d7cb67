"""The registry: lookups, a pod asking several families, clear errors, Allocate data."""

from __future__ import annotations

import pytest

from shared.devices import ascend, registry
from shared.devices.ascend import Template
from shared.devices.base import Allocated, Ask, DeviceSpec, RequestError
from shared.devices.registry import REGISTRY, PodAskError, allocate_response


def test_every_family_once_and_every_resource_once() -> None:
    names = [f.name for f in REGISTRY.families]
    assert len(names) == len(set(names))
    assert REGISTRY.family("NVIDIA").engine_native
    assert not any(f.engine_native for f in REGISTRY.families if f.name != "NVIDIA")
    for f in REGISTRY.families:
        for r in f.resources.all():
            assert REGISTRY.for_resource(r) is f


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="no device family 'TPU'.*MLU"):
        REGISTRY.family("TPU")


def test_duplicate_resource_is_refused() -> None:
    dup = ascend.family("AscendX", 1, 1, 1, [Template("t", 1, 1)])
    clash = ascend.family("AscendY", 1, 1, 1, [])
    object.__setattr__(clash, "resources", dup.resources)
    with pytest.raises(ValueError, match="belongs to both AscendX and AscendY"):
        registry.Registry([dup, clash])


def test_pod_with_several_families_in_different_containers() -> None:
    pod = {
        "metadata": {"annotations": {}},
        "spec": {
            "initContainers": [
                {"name": "warm", "resources": {"limits": {"cambricon.com/vmlu": 1}}}
            ],
            "containers": [
                {
                    "name": "gpu",
                    "resources": {"limits": {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000}},
                },
                {
                    "name": "npu",
                    "resources": {
                        "limits": {
                            "huawei.com/Ascend910B3": 1,
                            "huawei.com/Ascend910B3-memory": 20000,
                        }
                    },
                },
                {"name": "cpu", "resources": {"limits": {"cpu": 1}}},
            ],
        },
    }
    got = REGISTRY.pod_asks(pod)
    assert [(c.name, c.init, c.family.name if c.family else None) for c in got] == [
        ("warm", True, "MLU"),
        ("gpu", False, "NVIDIA"),
        ("npu", False, "Ascend910B3"),
        ("cpu", False, None),
    ]
    assert got[2].ask == Ask("Ascend910B3", 1, 32768, 0, 0)


def test_a_container_asks_one_family_and_every_problem_is_listed() -> None:
    pod = {
        "spec": {
            "containers": [
                {
                    "name": "both",
                    "resources": {"limits": {"nvidia.com/gpu": 1, "hygon.com/dcunum": 1}},
                },
                {"name": "nocount", "resources": {"limits": {"mthreads.com/sgpu-memory": 4}}},
                {
                    "name": "bad",
                    "resources": {
                        "limits": {"mthreads.com/vgpu": 1, "mthreads.com/sgpu-memory": 5}
                    },
                },
            ]
        }
    }
    with pytest.raises(PodAskError) as exc:
        REGISTRY.pod_asks(pod)
    p = exc.value.problems
    assert len(p) == 3
    assert p[0] == (
        'container "both" asks for NVIDIA and DCU: a container asks one device family; '
        "put each in its own container"
    )
    assert p[1].startswith(
        'container "nocount": mthreads.com/sgpu-memory without mthreads.com/vgpu'
    )
    assert p[2].startswith('container "bad": mthreads.com/sgpu-memory must be one of 2, 4, 8')


def test_not_a_whole_number() -> None:
    with pytest.raises(RequestError, match="must be a whole number"):
        REGISTRY.container_ask({"name": "x", "resources": {"limits": {"hygon.com/dcunum": "1.5"}}})


def test_allocate_response_shape() -> None:
    envs, specs, mounts = allocate_response("XPU", [Allocated("xpu-3", 3, 24576, 25)])
    assert envs == {"XPU_VISIBLE_DEVICES": "3"}
    assert DeviceSpec("/dev/xpu3", "/dev/xpu3") in specs and mounts == []
    envs, _, _ = allocate_response(
        REGISTRY.family("Ascend910B3"), [Allocated("die", 5, 16384, 0, template="vir05_1c_16g")]
    )
    assert envs == {"ASCEND_VISIBLE_DEVICES": "5", "ASCEND_VNPU_SPECS": "vir05_1c_16g"}
    envs, specs, mounts = allocate_response(
        "AMDGPU", [Allocated("u0", 0, 4096, 76), Allocated("u1", 1, 0, 0)]
    )
    assert envs["ROCR_VISIBLE_DEVICES"] == "u0,u1" and envs["HIP_DEVICE_MEMORY_LIMIT_0"] == "4096m"
    assert "HIP_DEVICE_MEMORY_LIMIT_1" not in envs and envs["LD_AUDIT"].endswith("libamvgpu.so")
    assert DeviceSpec("/dev/kfd", "/dev/kfd") in specs and len(mounts) == 1
    envs, _, _ = allocate_response("AWSNeuron", [Allocated("n-AWSNeuron-1", 1, 0, 2)])
    assert envs == {"NEURON_RT_VISIBLE_CORES": "3"}
