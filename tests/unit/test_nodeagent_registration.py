"""HAMi registration semantics and the simulator's layouts."""

from __future__ import annotations

import pytest

from services.nodeagent.backends.sim import (
    CROSS_CPU,
    NVLINK_LANE,
    SAME_CPU,
    SimBackend,
    SimSpecError,
    link_matrix,
    parse_gpu_spec,
    sim_uuid,
)
from services.nodeagent.registration import register
from shared.config import NodeSettings


@pytest.mark.parametrize(
    ("text", "model", "count", "mem"),
    [("A100-80GB:4:81920", "A100-80GB", 4, 81920), ("A100-40GB:2", "A100-40GB", 2, 40960),
     ("T4:1", "T4", 1, 16384)],
)
def test_parse_gpu_spec(text: str, model: str, count: int, mem: int) -> None:
    spec = parse_gpu_spec(text)
    assert (spec.model, spec.count, spec.memory_mib) == (model, count, mem)


@pytest.mark.parametrize("bad", ["A100", "A100:x", ":4", "A100:4:-1", "A100:100"])
def test_parse_gpu_spec_rejects(bad: str) -> None:
    with pytest.raises(SimSpecError):
        parse_gpu_spec(bad)


def test_registration_applies_split_scaling_and_filter() -> None:
    backend = SimBackend("n", [parse_gpu_spec("A100-80GB:4:81920")], numa_nodes=2)
    found = backend.discover()
    settings = NodeSettings(device_split_count=4, device_memory_scaling=1.5,
                            device_core_scaling=2.0, filterdevices=["1", sim_uuid("n", 3)])
    devices, links = register(found, settings)
    assert [d.index for d in devices] == [0, 2]
    d = devices[0]
    assert (d.count, d.devmem, d.devcore, d.type, d.physical_mem) == (4, 122880, 200, "NVIDIA-A100-80GB", 81920)
    assert [d.numa for d in devices] == [0, 1]
    assert links == [[0, CROSS_CPU], [CROSS_CPU, 0]]


def test_uuids_are_stable_per_node_and_index() -> None:
    a = SimBackend("n", [parse_gpu_spec("T4:2")]).discover()
    b = SimBackend("n", [parse_gpu_spec("T4:2")]).discover()
    c = SimBackend("m", [parse_gpu_spec("T4:2")]).discover()
    assert [x.uuid for x in a.cards] == [x.uuid for x in b.cards]
    assert not {x.uuid for x in a.cards} & {x.uuid for x in c.cards}


def test_dgx1_hybrid_cube_mesh_has_six_links_per_card() -> None:
    m = link_matrix(8, [0] * 4 + [1] * 4, "dgx1")
    for i in range(8):
        lanes = sum(m[i][j] // NVLINK_LANE for j in range(8) if j != i)
        assert lanes == 6
    assert m[0][4] > m[0][5]  # the cross-quad peer is linked, its neighbour is not
    assert m[0][5] == CROSS_CPU
    pcie = link_matrix(4, [0, 0, 1, 1], "pcie")
    assert pcie[0][1] == SAME_CPU and pcie[0][2] == CROSS_CPU


def test_unhealthy_sim_card_is_registered_unhealthy() -> None:
    backend = SimBackend("n", [parse_gpu_spec("T4:2")])
    backend.unhealthy.add(1)
    devices, _ = register(backend.discover(), NodeSettings())
    assert [d.health for d in devices] == [True, False]
