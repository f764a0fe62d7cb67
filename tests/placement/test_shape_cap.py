"""The learned shape table is capped (scheduler.shapeTableMax), deterministically."""

from __future__ import annotations

from services.placement.engine.frag import ShapeModel
from shared.config import NodeSettings
from shared.schemas import AllocRequested, ContainerAsk, DeviceAsk


def req(mem: int) -> AllocRequested:
    return AllocRequested(uid=f"u{mem}", name="n",
                          containers=[ContainerAsk(devices=[DeviceAsk(nums=1, mem=mem)])])


def test_table_never_exceeds_its_cap_and_keeps_the_common_shapes() -> None:
    settings = NodeSettings()
    sm = ShapeModel(table_max=64)
    for _ in range(50):  # two common shapes
        sm.observe(req(1000), settings)
        sm.observe(req(2000), settings)
    for mem in range(10_000, 12_000):  # a stream of distinct, rare shapes
        sm.observe(req(mem), settings)
        assert len(sm.counts) <= 64
        assert sm.total == sum(sm.counts.values())
    kept = {s.gmem for s in sm.counts}
    assert {1000, 2000} <= kept
    assert 11_999 in kept  # the newest rare shape stays; older rare ones went first
    assert sm.evicted == 2002 - len(sm.counts)
    shapes, weights = sm.top()
    assert shapes[0].gmem in (1000, 2000) and abs(float(weights.sum()) - 1.0) < 1e-9
    sm.top_gpu()  # names only shapes still counted


def test_eviction_is_deterministic() -> None:
    settings = NodeSettings()
    a, b = ShapeModel(table_max=16), ShapeModel(table_max=16)
    for m in [(i * 7919) % 500 for i in range(3000)]:
        a.observe(req(m), settings)
        b.observe(req(m), settings)
    assert a.counts == b.counts
