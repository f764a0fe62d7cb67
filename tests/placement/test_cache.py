"""Property: the per-node caches never change a decision.

A placer with its caches (card masks per ask, node scores, the fragmentation policies'
best card per node) and one recomputing everything must agree on every decision of any
sequence of placements, releases, health changes and quota changes.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.placement.engine import ClusterState, Placement, Placer
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    Constraints,
    ContainerAsk,
    Device,
    DeviceAsk,
    NodeInventory,
    Quota,
)

asks = st.builds(
    DeviceAsk,
    nums=st.sampled_from([1, 1, 1, 2, 4]),
    mem=st.sampled_from([0, 0, 1000, 3000]),
    mem_percent=st.sampled_from([None, 25, 50, 100]),
    cores=st.sampled_from([0, 25, 50, 100]),
)
requests = st.tuples(
    st.lists(asks, max_size=1),
    st.sampled_from([0, 1000, 4000]),  # CPU
    st.sampled_from([[], ["T4"], ["A10"]]),  # allowed models
    st.sampled_from(["", "", "team"]),  # namespace ("team" may get a quota)
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("place"), requests),
        st.tuples(st.just("release"), st.integers(0, 100)),
        st.tuples(st.just("health"), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("quota"), st.sampled_from([None, 8000, 40000])),
    ),
    min_size=5,
    max_size=40,
)


def _cluster() -> ClusterState:
    cl = ClusterState()
    for n in range(6):
        model, mem = (("NVIDIA-T4", 4000), ("NVIDIA-A10", 8000))[n % 2]
        devs = [Device(uuid=f"G{n}-{i}", index=i, type=model, devmem=mem, count=4) for i in range(2 + 2 * (n % 3))]
        cl.upsert_node(NodeInventory(node=f"n{n}", devices=devs, cpu_milli=16000, memory_mib=1 << 16))
    return cl


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, policy=st.sampled_from(["binpack", "spread", "bestfit", "fgd", "frag"]))
def test_cached_and_uncached_decisions_agree(ops: list[tuple], policy: str) -> None:  # type: ignore[type-arg]
    cl = _cluster()
    sched = SchedulerSettings(node_policy=policy, gpu_policy="binpack")
    fast = Placer(cl, sched, NodeSettings(), seed=7)
    slow = Placer(cl, sched, NodeSettings(), seed=7)
    slow.use_cache = False
    live: list[tuple[str, str]] = []
    for i, op in enumerate(ops):
        if op[0] == "place":
            devs, cpu, types, ns = op[1]
            req = AllocRequested(
                uid=f"u{i}",
                name=f"p{i}",
                namespace=ns,
                containers=[ContainerAsk(name="main", devices=devs, cpu_milli=cpu)],
                constraints=Constraints(use_types=types),
            )
            fast.observe(req)
            slow.observe(req)
            got, want = fast.decide(req), slow.decide(req)
            assert got == want
            if isinstance(got, Placement):
                cl.reserve(got.node, got.to_alloc(req))
                live.append((got.node, req.uid))
        elif op[0] == "release" and live:
            node, uid = live.pop(op[1] % len(live))
            cl.unreserve(node, uid)
        elif op[0] == "health":
            cl.set_health(f"n{op[1]}", op[2])
        elif op[0] == "quota":
            cl.set_quota("team", None if op[1] is None else Quota(memory_mib=op[1]))
