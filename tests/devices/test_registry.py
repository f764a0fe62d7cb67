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
    a = allocate_response("XPU", [Allocated("xpu-3", 3, 24576, 25)])
    assert a.envs == {"XPU_VISIBLE_DEVICES": "3"}
    assert a.devices == [
        DeviceSpec("/dev/xpu3", "/dev/xpu3"),
        DeviceSpec("/dev/xpuctrl", "/dev/xpuctrl"),
    ]
    assert a.mounts == [] and a.files == {}
    a = allocate_response(
        REGISTRY.family("Ascend910B3"), [Allocated("die", 5, 16384, 0, template="vir05_1c_16g")]
    )
    assert a.envs == {"ASCEND_VISIBLE_DEVICES": "5", "ASCEND_VNPU_SPECS": "vir05_1c_16g"}
    # the template from the chip's table when the grant names none
    a = allocate_response("Ascend910B3", [Allocated("die", 5, 10000, 25, card_mem=65536)])
    assert a.envs["ASCEND_VNPU_SPECS"] == "vir05_1c_16g"
    a = allocate_response("Ascend910B3", [Allocated("d", 0, 65536, 100, card_mem=65536)] * 2)
    assert a.envs == {"ASCEND_VISIBLE_DEVICES": "0,0"}  # whole cards: no vNPU


def test_amd_answer_as_hamis_plugin_gives_it() -> None:
    """ROCr IDs, container-local HIP indexes, a CU mask per card (all CUs of a whole
    one), the memory limiter only for a slice, the limiter library always mounted."""
    whole = [
        Allocated("u0", 0, 196608, 304, card_mem=196608, card_cores=304, local_id="GPU-a"),
        Allocated("u1", 1, 196608, 304, card_mem=196608, card_cores=304),
    ]
    a = allocate_response("AMDGPU", whole)
    assert a.envs == {
        "ROCR_VISIBLE_DEVICES": "GPU-a,u1",
        "HIP_VISIBLE_DEVICES": "0,1",
        "HSA_CU_MASK": "0:0-303;1:0-303",
    }
    assert [d.host_path for d in a.devices] == [
        "/dev/kfd", "/dev/dri/card0", "/dev/dri/renderD128", "/dev/dri/card1", "/dev/dri/renderD129"
    ]  # fmt: skip
    assert [m.container_path for m in a.mounts] == ["/usr/local/vgpu/libamvgpu.so"]
    part = allocate_response(
        "AMDGPU", [Allocated("u0", 0, 65536, 152, card_mem=196608, card_cores=304)]
    )
    assert (
        part.envs["HSA_CU_MASK"] == "0:0-151" and part.envs["HIP_DEVICE_MEMORY_LIMIT"] == "65536m"
    )
    assert part.envs["LD_AUDIT"] == "/usr/local/vgpu/libamvgpu.so"


def test_neuron_cores_are_the_grants_bits() -> None:
    a = allocate_response("AWSNeuron", [Allocated("n-AWSNeuron-1", 1, 0, 2)])
    assert a.envs == {"NEURON_RT_VISIBLE_CORES": "3"}
    assert a.devices == [DeviceSpec("/dev/neuron1", "/dev/neuron1")]
    a = allocate_response("AWSNeuron", [Allocated("n-AWSNeuron-1", 1, 0, 0)])
    assert a.envs == {"NEURON_RT_VISIBLE_CORES": "2,3"}  # no bits: the whole device


def test_biren_answer_names_the_cards() -> None:
    a = allocate_response("Biren", [Allocated("br-7", 0), Allocated("br-9", 1)])
    assert a.envs == {"BR_PHY_CARDS": "br-7,br-9"}
    assert [d.host_path for d in a.devices] == ["/dev/biren/br-7", "/dev/biren/br-9"]


def test_amd_slices_on_one_card_get_disjoint_cus() -> None:
    from shared.devices.amd import CU_ALLOCATED, cus_held, id_list, parse_id_list
    from shared.devices.base import AllocateContext

    slice_ = Allocated("u0", 0, 65536, 100, card_mem=196608, card_cores=304)
    first = allocate_response("AMDGPU", [slice_])
    held = cus_held(first.annotations)
    assert held == {"u0": frozenset(range(100))} and first.envs["HSA_CU_MASK"] == "0:0-99"
    second = allocate_response("AMDGPU", [slice_], AllocateContext(busy_cus=held))
    assert second.envs["HSA_CU_MASK"] == "0:100-199"
    assert second.annotations[CU_ALLOCATED] == '{"u0":"100-199"}'
    assert id_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert parse_id_list("0-2,5,7-8") == frozenset({0, 1, 2, 5, 7, 8})
