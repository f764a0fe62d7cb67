"""Coscheduling PodGroups as gangs, end to end (docs/gangs.md, "Kubernetes").

FakeKube (serving ``podgroups.scheduling.x-k8s.io``) + real NATS + inventory, placement,
simulated node agents and the Kubernetes binder. In extender mode the stand-in
kube-scheduler (tests/kube/scheduler_loop.py) drives the pods through ``filter`` and
``bind``, trying unschedulable pods again as kube-scheduler does on cluster events: a
member whose gang is not complete is answered "waiting for gang" and is not bound; once
the gang commits, every member is bound where placement reserved it. Direct mode is
checked too. Timeouts here are safety nets, not speed limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp
import pytest

from shared.config import Config
from shared.hami.podgroup import LEGACY_POD_GROUP_LABEL, POD_GROUP_LABEL
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container
from tests.kube.scheduler_loop import LoopStats, SchedulerLoop, binding_args, extender_args

SCHED = "hami-scheduler"
NODES = {"node-a": ["A100-80GB:2"], "node-b": ["A100-80GB:2"]}  # four cards
ALL = list(NODES)
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite

Cluster = Callable[..., Awaitable[KubeCluster]]
Obj = dict[str, Any]


def _cluster_fixture(mode: str) -> Any:
    @pytest.fixture
    async def make(fake: FakeKube, nats_url: str, cfg: Config) -> AsyncIterator[KubeCluster]:
        cfg.scheduler.mode = mode
        kc = KubeCluster(fake, nats_url, cfg, NODES)
        await kc.start()
        try:
            yield kc
        finally:
            await kc.stop()

    return make


kc = _cluster_fixture("extender")
direct = _cluster_fixture("direct")


def add_group(fake: FakeKube, name: str, spec: Obj) -> Obj:
    return fake.create(
        "podgroups.scheduling.x-k8s.io",
        {
            "apiVersion": "scheduling.x-k8s.io/v1alpha1",
            "kind": "PodGroup",
            "metadata": {"name": name},
            "spec": spec,
        },
        "default",
    )


def add_member(
    fake: FakeKube, name: str, group: str, *, label: str = POD_GROUP_LABEL, whole_card: bool = True
) -> Obj:
    c = gpu_container(gpu=1, gpucores=100) if whole_card else gpu_container(gpu=1, gpumem=1000)
    pod = {
        "metadata": {"name": name, "labels": {label: group}},
        "spec": {"schedulerName": SCHED, "containers": [c]},
    }
    return fake.create("pods", pod, "default")


def bound_node(fake: FakeKube, name: str) -> str:
    p = fake.get("pods", "default", name)
    return str((p or {}).get("spec", {}).get("nodeName") or "")


async def filter_(http: aiohttp.ClientSession, kc: KubeCluster, pod: Obj) -> Obj:
    async with http.post(f"{kc.extender_url}/filter", json=extender_args(pod, ALL)) as r:
        assert r.status == 200
        out: Obj = await r.json(content_type=None)
        return out


def reasons(res: Obj) -> set[str]:
    return set((res.get("failedAndUnresolvableNodes") or {}).values())


async def run_loop(kc: KubeCluster, fake: FakeKube, done: Callable[[LoopStats], bool]) -> LoopStats:
    loop = SchedulerLoop(
        fake.url, kc.extender_url, nodes=ALL, retry_s=0.1, retry_unschedulable=True
    )
    stats = await loop.run(done, timeout=GUARD_S)
    assert not stats.timed_out, (stats.bound, stats.filter_errors[-3:], stats.bind_errors)
    return stats


def waiting(stats: LoopStats, uid: str) -> str:
    """The reason of a pod's last unschedulable answer ("" when it has none)."""
    res = stats.unschedulable.get(uid) or {}
    return next(iter(reasons(res)), "")


# ------------------------------------------------------------------------ extender


async def test_no_member_is_bound_until_the_whole_gang_is_reserved(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    add_group(fake, "train", {"minMember": 3, "scheduleTimeoutSeconds": 120})
    first = [add_member(fake, f"train-{i}", "train") for i in range(2)]
    uids = [p["metadata"]["uid"] for p in first]

    def two_waiting(s: LoopStats) -> bool:
        return all(
            waiting(s, u).startswith("waiting for gang default/train") for u in uids
        ) and "2 of 3" in waiting(s, uids[-1]) + waiting(s, uids[0])

    stats = await run_loop(kc, fake, two_waiting)
    assert stats.bound == {} and not stats.bind_errors
    assert all(not bound_node(fake, p["metadata"]["name"]) for p in first)
    ledger = await kc.ledger()
    assert {u: (a.gang, a.gang_size) for u, (_, a) in ledger.items()} == dict.fromkeys(
        uids, ("default/train", 3)
    )
    assert all(a.gang_expires > 0 for _, a in ledger.values())  # reservations, not committed
    # The scheduler binding a reserved member anyway gets nothing bound.
    async with http.post(
        f"{kc.extender_url}/bind", json=binding_args(first[0], ledger[uids[0]][0])
    ) as r:
        assert "error" in await r.json(content_type=None)
    assert not bound_node(fake, "train-0")

    third = add_member(fake, "train-2", "train")
    uids.append(third["metadata"]["uid"])
    stats = await run_loop(kc, fake, lambda s: set(uids) <= set(s.bound))
    ledger = await kc.ledger()
    for i, uid in enumerate(uids):
        node, alloc = ledger[uid]
        assert bound_node(fake, f"train-{i}") == node == stats.bound[uid]
        assert alloc.gang == "default/train" and alloc.gang_expires == 0  # committed
    assert not stats.bind_errors
    assert kc.binder is not None and kc.binder.extender is not None
    assert kc.binder.extender.held == {}


async def test_two_gangs_for_the_same_cards_one_completes_then_the_other(
    kc: KubeCluster, fake: FakeKube
) -> None:
    """Each gang needs all four cards; their members arrive in turns. One is placed
    whole, the other holds nothing bound; it is placed once the first's pods go."""
    for g in ("blue", "red"):
        add_group(fake, g, {"minMember": 4, "scheduleTimeoutSeconds": 120})
    pods: dict[str, list[Obj]] = {"blue": [], "red": []}
    for i in range(4):  # in turns (a list is in name order), so each could hold half
        for g in ("blue", "red"):
            pods[g].append(add_member(fake, f"m{i}-{g}", g))
    uids = {g: {p["metadata"]["uid"] for p in ps} for g, ps in pods.items()}

    def one_whole(s: LoopStats) -> bool:
        return any(us <= set(s.bound) for us in uids.values())

    stats = await run_loop(kc, fake, one_whole)
    (winner,) = [g for g, us in uids.items() if us <= set(stats.bound)]
    loser = "red" if winner == "blue" else "blue"
    assert not uids[loser] & set(stats.bound)
    assert all(not bound_node(fake, p["metadata"]["name"]) for p in pods[loser])
    ledger = await kc.ledger()
    assert not any(a.gang == f"default/{loser}" and a.gang_expires == 0 for _, a in ledger.values())

    for p in pods[winner]:
        fake.delete("pods", "default", p["metadata"]["name"])
    stats = await run_loop(kc, fake, lambda s: uids[loser] <= set(s.bound))
    ledger = await kc.ledger()
    assert {u for u, (_, a) in ledger.items()} == uids[loser]
    assert all(
        bound_node(fake, p["metadata"]["name"]) == ledger[p["metadata"]["uid"]][0]
        for p in pods[loser]
    )


async def test_a_missing_podgroup_keeps_the_pod_pending_until_it_exists(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    pod = add_member(fake, "orphan", "nope", label=LEGACY_POD_GROUP_LABEL, whole_card=False)
    res = await filter_(http, kc, pod)
    assert res["nodenames"] == [] and "error" not in res
    assert reasons(res) == {"PodGroup default/nope (scheduling.x-k8s.io/v1alpha1) not found"}
    assert not await kc.ledger()
    assert kc.binder is not None
    await kc.wait_for(lambda: kc.events("orphan", "PodGroupInvalid"), desc="a Warning Event")
    await filter_(http, kc, pod)  # asked again: told once
    await asyncio.sleep(0.3)
    (ev,) = kc.events("orphan", "PodGroupInvalid")
    assert ev["type"] == "Warning" and "not found" in ev["message"]
    # Once it exists (a gang of one), the pod is placed.
    add_group(fake, "nope", {"minMember": 1})
    stats = await run_loop(kc, fake, lambda s: pod["metadata"]["uid"] in s.bound)
    assert bound_node(fake, "orphan") == stats.bound[pod["metadata"]["uid"]]


async def test_an_invalid_podgroup_is_refused_with_a_clear_reason(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    add_group(fake, "zero", {"minMember": 0})
    add_group(fake, "late", {"minMember": 2, "scheduleTimeoutSeconds": -5})
    for name, group, needle in (
        ("z", "zero", "spec.minMember must be an integer of at least 1"),
        ("l", "late", "spec.scheduleTimeoutSeconds must be a non-negative"),
    ):
        pod = add_member(fake, name, group, whole_card=False)
        (why,) = reasons(await filter_(http, kc, pod))
        assert why.startswith(f"invalid PodGroup default/{group}") and needle in why
        await kc.wait_for(partial(kc.events, name, "PodGroupInvalid"), desc="a Warning Event")
    assert not await kc.ledger()


# -------------------------------------------------------------------------- direct


async def test_direct_mode_binds_a_gang_only_when_it_is_complete(
    direct: KubeCluster, fake: FakeKube
) -> None:
    add_group(fake, "pair", {"minMember": 2, "scheduleTimeoutSeconds": 120})
    one = add_member(fake, "pair-0", "pair")
    await direct.wait_for(lambda: _reserved(direct, one["metadata"]["uid"]), desc="reserved")
    await asyncio.sleep(0.5)  # a bind, were one coming, would be done by now
    assert not bound_node(fake, "pair-0")
    add_member(fake, "pair-1", "pair")
    a = await direct.wait_bound("default", "pair-0", timeout=GUARD_S)
    b = await direct.wait_bound("default", "pair-1", timeout=GUARD_S)
    ledger = await direct.ledger()
    assert a["spec"]["nodeName"] == ledger[a["metadata"]["uid"]][0]
    assert b["spec"]["nodeName"] == ledger[b["metadata"]["uid"]][0]
    assert all(al.gang == "default/pair" and al.gang_expires == 0 for _, al in ledger.values())


async def test_direct_mode_holds_a_pod_back_until_its_podgroup_exists(
    direct: KubeCluster, fake: FakeKube
) -> None:
    add_member(fake, "early", "later", whole_card=False)
    await direct.wait_for(lambda: direct.events("early", "PodGroupInvalid"), desc="a Warning Event")
    assert not await direct.ledger() and not bound_node(fake, "early")
    add_group(fake, "later", {"minMember": 1})  # its watch event asks for the pod again
    await direct.wait_bound("default", "early", timeout=GUARD_S)


async def _reserved(kc: KubeCluster, uid: str) -> bool:
    got = (await kc.ledger()).get(uid)
    return got is not None and got[1].gang_expires > 0
