"""Property: the vectorised failure explanation equals the reference loop.

``Placer._explain`` computes each node's reasons with numpy; ``Placer._explain_ref`` is
a Python loop over nodes that judges their cards with the pure HAMi steps of
``engine.hami``, kept as the specification; the per-node texts must agree too. On random clusters
(dead rows, unhealthy nodes, cordoned/unhealthy cards, slots, NUMA, taints, labels,
CPU/memory/pod limits, quotas, existing reservations) and random requests (several
containers and asks, init containers, NUMA binding, mutex, pins, selectors, affinity,
tolerations, model and UUID filters) both must give the same reasons, in the same
dict order, and the same failure message.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.placement.engine import ClusterState, Failure, Placement, Placer
from services.placement.engine import placer as placer_mod
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    Constraints,
    ContainerAsk,
    Device,
    DeviceAsk,
    NodeInventory,
    Quota,
    SelectorRequirement,
    Taint,
    Toleration,
)

MODELS = [("NVIDIA-T4", 4000), ("NVIDIA-A10", 8000), ("NVIDIA-A100", 16000)]


class _Checked(Placer):
    """A placer whose every explanation is computed both ways and compared."""

    compared = 0

    def _explain(self, *args: Any) -> dict[str, int]:
        got = super()._explain(*args)
        want = self._explain_ref(*args)
        assert list(got.items()) == list(want.items()), (got, want)
        # and node by node, HAMi's text ("1/2 CardInsufficientMemory, 1/2 CardNotHealth")
        cons, cpu, mem, flat, static, ns, tried = args
        rs = self._reason_ids(*args)
        ref = self._node_texts_ref(cons, cpu, mem, flat, ns, tried)
        assert {r: rs.text(r) for r in ref} == ref
        _Checked.compared += 1
        return got


devices = st.builds(
    dict,
    model=st.integers(0, len(MODELS) - 1),
    count=st.sampled_from([1, 2, 4, 10]),
    numa=st.integers(0, 1),
    health=st.sampled_from([True, True, True, False]),
    cordon=st.sampled_from([False, False, False, True]),
    mode=st.sampled_from(["hami-core", "hami-core", "mig"]),
)
nodes = st.builds(
    dict,
    cards=st.lists(devices, max_size=5),
    cpu=st.sampled_from([0, 4000, 16000]),
    mem=st.sampled_from([0, 8000, 65536]),
    max_pods=st.sampled_from([0, 0, 2, 5]),
    zone=st.sampled_from(["a", "b", None]),
    taint=st.sampled_from([None, None, ("gpu", "yes", "NoSchedule"), ("x", "", "NoExecute"), ("p", "", "PreferNoSchedule")]),
    unsched=st.sampled_from([False, False, False, True]),
    healthy=st.sampled_from([True, True, True, False]),
)
asks = st.builds(
    DeviceAsk,
    nums=st.sampled_from([1, 1, 2, 3, 6]),
    mem=st.sampled_from([0, 0, 1000, 3000, 9000]),
    mem_percent=st.sampled_from([None, 25, 50, 100]),
    cores=st.sampled_from([0, 25, 50, 100]),
)
containers = st.builds(
    ContainerAsk,
    name=st.just("c"),
    init=st.sampled_from([False, False, True]),
    devices=st.lists(asks, max_size=2),
    cpu_milli=st.sampled_from([0, 1000, 8000]),
    memory_mib=st.sampled_from([0, 4000, 40000]),
)
constraints = st.builds(
    Constraints,
    gpu_policy=st.sampled_from([None, "binpack", "spread,numa", "binpack,mutex"]),
    use_types=st.sampled_from([[], ["T4"], ["a10", "A100"]]),
    nouse_types=st.sampled_from([[], [], ["A100"]]),
    use_uuids=st.sampled_from([[], [], ["G0-0", "G1-1"]]),
    nouse_uuids=st.sampled_from([[], [], ["G2-0"]]),
    numa_bind=st.sampled_from([False, False, True]),
    vgpu_mode=st.sampled_from([None, None, "mig"]),
    node_selector=st.sampled_from([{}, {}, {"zone": "a"}]),
    affinity=st.sampled_from(
        [[], [], [[SelectorRequirement(key="zone", operator="In", values=["b"])], [SelectorRequirement(key="zone", operator="DoesNotExist")]]]
    ),
    tolerations=st.sampled_from([[], [], [Toleration(key="gpu", operator="Exists")], [Toleration(operator="Exists", effect="NoExecute")]]),
    node_name=st.sampled_from([None, None, None, "n1", "nope"]),
)
requests = st.tuples(st.lists(containers, min_size=1, max_size=3), constraints, st.sampled_from(["", "", "team"]))


def _inventory(i: int, spec: dict[str, Any]) -> NodeInventory:
    devs = []
    for j, c in enumerate(spec["cards"]):
        model, mem = MODELS[c["model"]]
        devs.append(
            Device(uuid=f"G{i}-{j}", index=j, type=model, devmem=mem, count=c["count"], numa=c["numa"], health=c["health"], mode=c["mode"])
        )
    taints = [Taint(key=spec["taint"][0], value=spec["taint"][1], effect=spec["taint"][2])] if spec["taint"] else []
    return NodeInventory(
        node=f"n{i}",
        devices=devs,
        cpu_milli=spec["cpu"],
        memory_mib=spec["mem"],
        max_pods=spec["max_pods"],
        labels={"zone": spec["zone"]} if spec["zone"] else {},
        taints=taints,
        unschedulable=spec["unsched"],
        cordoned=[d.uuid for d, c in zip(devs, spec["cards"], strict=True) if c["cordon"]],
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(nodes, min_size=1, max_size=8),
    removed=st.sets(st.integers(0, 7), max_size=2),
    quota=st.sampled_from([None, Quota(memory_mib=6000), Quota(cores=60), Quota(memory_mib=20000, cores=300)]),
    reqs=st.lists(requests, min_size=1, max_size=8),
    policy=st.sampled_from(["binpack", "spread", "fgd", "frag"]),
)
def test_vectorised_explain_matches_reference(
    specs: list[dict[str, Any]], removed: set[int], quota: Quota | None, reqs: list[tuple[Any, ...]], policy: str
) -> None:
    cl = ClusterState()
    for i, spec in enumerate(specs):
        cl.upsert_node(_inventory(i, spec))
        if not spec["healthy"]:
            cl.set_health(f"n{i}", False)
    for i in removed:
        cl.remove_node(f"n{i}")  # dead rows (or compaction) in the arrays
    if quota is not None:
        cl.set_quota("team", quota)
    p = _Checked(cl, SchedulerSettings(node_policy=policy, gpu_policy="binpack"), NodeSettings(), seed=3)
    for k, (conts, cons, ns) in enumerate(reqs):
        req = AllocRequested(uid=f"u{k}", name=f"p{k}", namespace=ns, containers=conts, constraints=cons)
        p.observe(req)
        got = p.decide(req)
        if isinstance(got, Placement):
            cl.reserve(got.node, got.to_alloc(req))  # later requests see used cards
        else:
            assert isinstance(got, Failure)
            # a node counts once per reason of its text: at least once in all
            assert got.nodes_total == cl.nodes_total()
            assert sum(got.reasons.values()) >= got.nodes_total


def test_the_property_reaches_failures() -> None:
    """The strategies above must actually exercise the failure path."""
    before = _Checked.compared
    test_vectorised_explain_matches_reference()
    assert _Checked.compared - before > 50
    assert placer_mod.Placer._explain is not placer_mod.Placer._explain_ref
