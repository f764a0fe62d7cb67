"""Property: no sequence of placements and releases ever overcommits a card or a node."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.placement.engine import NODE_POLICIES, ClusterState, Placement, Placer
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    Constraints,
    ContainerAsk,
    Device,
    DeviceAsk,
    NodeInventory,
    card_usage,
)

asks = st.builds(
    DeviceAsk,
    nums=st.integers(1, 3),
    mem=st.sampled_from([0, 0, 500, 1500, 3000, 4000]),
    mem_percent=st.sampled_from([None, 10, 30, 50, 100]),
    cores=st.sampled_from([0, 10, 30, 50, 100]),
)
containers = st.builds(
    ContainerAsk,
    init=st.booleans(),
    devices=st.lists(asks, max_size=1),
    cpu_milli=st.sampled_from([0, 500, 1000]),
    memory_mib=st.sampled_from([0, 256, 1024]),
)
constraints = st.builds(
    Constraints,
    node_policy=st.sampled_from([None, *NODE_POLICIES]),
    gpu_policy=st.sampled_from([None, "binpack", "spread", "mutex", "numa,binpack", "topology-aware"]),
    numa_bind=st.booleans(),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("place"), st.lists(containers, min_size=1, max_size=3), constraints),
        st.tuples(st.just("release"), st.integers(0, 50), st.none()),
    ),
    max_size=25,
)


def _cluster() -> ClusterState:
    cl = ClusterState()
    for n in range(3):
        devs = [
            Device(uuid=f"G{n}{i}", index=i, type="NVIDIA-T4", devmem=4000 + 2000 * n, count=2 + i, numa=i % 2)
            for i in range(n + 1)
        ]
        links = [[0 if i == j else 20 + 100 * (i // 2 == j // 2) for j in range(n + 1)] for i in range(n + 1)]
        cl.upsert_node(NodeInventory(node=f"n{n}", devices=devs, links=links, cpu_milli=3000, memory_mib=2048, max_pods=4))
    return cl


def _check(cl: ClusterState) -> None:
    for ns in cl.status().nodes:
        for c in ns.cards:
            assert 0 <= c.used_mem <= c.total_mem
            assert 0 <= c.used_cores <= c.total_cores
            assert 0 <= c.used_slots <= c.total_slots
        inv = cl.nodes[ns.node].inv
        allocs = cl.ledger(ns.node).allocs.values()
        assert len(allocs) <= inv.max_pods
        assert sum(a.cpu_milli for a in allocs) <= inv.cpu_milli
        assert sum(a.memory_mib for a in allocs) <= inv.memory_mib
        # the arrays are exactly the sum of the ledger
        want: dict[str, list[int]] = {}
        for a in allocs:
            for u, use in card_usage(a.containers).items():
                w = want.setdefault(u, [0, 0, 0])
                for k in range(3):
                    w[k] += use[k]
        for c in ns.cards:
            assert [c.used_mem, c.used_cores, c.used_slots] == want.get(c.uuid, [0, 0, 0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, seed=st.integers(0, 3))
def test_never_overcommits(ops: list[tuple[str, object, object]], seed: int) -> None:
    cl = _cluster()
    p = Placer(cl, SchedulerSettings(), NodeSettings(), seed=seed)
    live: list[tuple[str, str]] = []
    for i, (kind, arg, cons) in enumerate(ops):
        if kind == "place":
            assert isinstance(arg, list) and isinstance(cons, Constraints)
            req = AllocRequested(uid=f"u{i}", name=f"p{i}", containers=arg, constraints=cons)
            p.observe(req)
            got = p.decide(req)
            if isinstance(got, Placement):
                assert len(got.containers) == len(arg)
                cl.reserve(got.node, got.to_alloc(req))
                live.append((got.node, req.uid))
        elif live:
            assert isinstance(arg, int)
            node, uid = live.pop(arg % len(live))
            cl.unreserve(node, uid)
        _check(cl)
