"""The binder as kube-scheduler's extender (scheduler.mode: extender), end to end:
FakeKube + real NATS + inventory, placement, simulated node agents, the Kubernetes
binder serving ``POST /filter`` and ``POST /bind`` over real HTTP. Bodies are shaped
exactly as kube-scheduler marshals ``k8s.io/kube-scheduler/extender/v1`` types."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from services.binder.kube import KubeBinder
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config
from shared.hami import annotations as ann
from shared.kube import Kube
from shared.leader import LeaderElector
from shared.schemas import AllocBound, AllocReleased
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, card_totals, gpu_container
from tests.kube.scheduler_loop import LoopStats, SchedulerLoop, binding_args, extender_args

SCHED = "hami-scheduler"
NODES = {"node-a": ["A100-80GB:2"], "node-b": ["A100-80GB:2"], "node-c": ["A100-80GB:2"]}
ALL = list(NODES)

Cluster = Callable[..., Awaitable[KubeCluster]]


@pytest.fixture
def xcfg(cfg: Config) -> Config:
    cfg.scheduler.mode = "extender"
    return cfg


@pytest.fixture
async def cluster(fake: FakeKube, nats_url: str, xcfg: Config) -> AsyncIterator[Cluster]:
    """``await cluster(nodes=..., extender_timeout_s=...)`` starts one, stopped after."""
    started: list[KubeCluster] = []

    async def make(nodes: dict[str, list[str]] | None = None, **kw: Any) -> KubeCluster:
        kc = KubeCluster(fake, nats_url, xcfg, nodes or NODES, **kw)
        started.append(await kc.start())
        return kc

    yield make
    for kc in started:
        await kc.stop()


@pytest.fixture
async def kc(cluster: Cluster) -> KubeCluster:
    return await cluster()


def add_pod(fake: FakeKube, name: str, *containers: dict[str, Any]) -> dict[str, Any]:
    pod = {"metadata": {"name": name},
           "spec": {"schedulerName": SCHED,
                    "containers": list(containers) or [gpu_container(gpu=1, gpumem=1000)]}}
    return fake.create("pods", pod, "default")


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.post(url, **kw) as r:
        return r.status, await r.json(content_type=None)


async def filter_(http: aiohttp.ClientSession, kc: KubeCluster, pod: dict[str, Any],
                  nodes: list[str]) -> dict[str, Any]:
    status, res = await post(http, f"{kc.extender_url}/filter", extender_args(pod, nodes))
    assert status == 200, res
    return res


async def bind(http: aiohttp.ClientSession, kc: KubeCluster, pod: dict[str, Any],
               node: str) -> dict[str, Any]:
    status, res = await post(http, f"{kc.extender_url}/bind", binding_args(pod, node))
    assert status == 200, res
    return res


async def held_on(kc: KubeCluster, uid: str) -> str | None:
    got = (await kc.ledger()).get(uid)
    return got[0] if got else None


# ----------------------------------------------------------------------- filter


async def test_filter_picks_among_the_offered_nodes_only(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    p1 = add_pod(fake, "only-c")
    res = await filter_(http, kc, p1, ["node-c"])
    assert res["nodenames"] == ["node-c"] and "error" not in res
    assert await held_on(kc, p1["metadata"]["uid"]) == "node-c"
    # Two offered: one chosen, the other rejected with a reason; node-a never used.
    p2 = add_pod(fake, "b-or-c")
    res = await filter_(http, kc, p2, ["node-b", "node-c"])
    (chosen,) = res["nodenames"]
    assert chosen in ("node-b", "node-c")
    assert set(res["failedNodes"]) == {"node-b", "node-c"} - {chosen}
    assert await held_on(kc, p2["metadata"]["uid"]) == chosen
    # Without nodeCacheCapable the scheduler sends a v1.NodeList and reads one back.
    p3 = add_pod(fake, "listed")
    nodes = {"apiVersion": "v1", "kind": "NodeList", "metadata": {},
             "items": [fake.get("nodes", None, "node-a"), fake.get("nodes", None, "node-b")]}
    status, res = await post(http, f"{kc.extender_url}/filter", extender_args(p3, node_list=nodes))
    assert status == 200 and "nodenames" not in res
    assert [n["metadata"]["name"] for n in res["nodes"]["items"]] == [await held_on(kc, p3["metadata"]["uid"])]
    assert res["nodes"]["items"][0]["status"]["capacity"]  # the Node object itself, untouched


async def test_a_pod_that_fits_nowhere_gets_each_node_with_its_reason(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    huge = add_pod(fake, "huge", gpu_container(gpu=1, gpumem=500000))
    res = await filter_(http, kc, huge, [*ALL, "no-agent"])
    assert res["nodenames"] == [] and "error" not in res
    assert res["failedNodes"] == dict.fromkeys(ALL, "2/2 CardInsufficientMemory")  # HAMi's per-node text
    assert set(res["failedAndUnresolvableNodes"]) == {"no-agent"}  # no cards to preempt for
    three = add_pod(fake, "three-cards", gpu_container(gpu=3, gpumem=1000))
    res = await filter_(http, kc, three, ["node-a"])
    assert res["failedNodes"] == {"node-a": "NodeInsufficientDevice"}
    assert not await kc.ledger()


async def test_a_pod_without_hami_resources_passes_through(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    plain = add_pod(fake, "plain", {"name": "main", "image": "busybox:1.36"})
    res = await filter_(http, kc, plain, ALL)
    assert res == {"nodenames": ALL}
    assert not await kc.ledger()


async def test_pending_pods_are_not_requested_by_the_watch(
    kc: KubeCluster, fake: FakeKube, bus: Bus
) -> None:
    seen: list[bytes] = []

    async def on(msg: Any) -> None:
        seen.append(msg.data)

    sub = await bus.nc.subscribe(subjects.alloc("requested"), cb=on)
    add_pod(fake, "waits")
    assert kc.binder is not None
    uid = fake.get("pods", "default", "waits")["metadata"]["uid"]  # type: ignore[index]
    await kc.wait_for(lambda: uid in kc.binder.pods, desc="the watch saw the pod")  # type: ignore[union-attr]
    await asyncio.sleep(0.5)  # what a direct-mode binder publishes at once
    await sub.unsubscribe()
    assert seen == [] and not await kc.ledger()
    assert not fake.get("pods", "default", "waits")["spec"].get("nodeName")  # type: ignore[index]


# ------------------------------------------------------------------------- bind


async def test_filter_then_bind_writes_hami_annotations_and_a_binding(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, bus: Bus
) -> None:
    bound: list[AllocBound] = []

    async def on(msg: Any) -> None:
        ev = decode_event(msg.data)
        assert isinstance(ev, AllocBound)
        bound.append(ev)

    await bus.nc.subscribe(subjects.alloc_any("bound"), cb=on)
    pod = add_pod(fake, "train", gpu_container("app", gpu=2, gpumem=5000, gpucores=30))
    uid = pod["metadata"]["uid"]
    (node,) = (await filter_(http, kc, pod, ALL))["nodenames"]
    assert await bind(http, kc, pod, node) == {}
    got = fake.get("pods", "default", "train")
    assert got is not None and got["spec"]["nodeName"] == node
    a = got["metadata"]["annotations"]
    led_node, alloc = (await kc.ledger())[uid]
    assert led_node == node and a[ann.VGPU_NODE] == node
    assert a[ann.DEVICES_ALLOCATED] == a[ann.DEVICES_TO_ALLOCATE] == ann.encode_pod_devices(alloc.containers)
    assert a[ann.BIND_PHASE] == "allocating" and a[ann.BIND_TIME].isdigit()
    assert fake.store.bindings[("default", "train")] == 1
    await kc.wait_for(lambda: bound, desc="bound event")
    assert bound[0].uid == uid and bound[0].node == node
    # The scheduler retries a bind whose answer it lost: success, no second Binding.
    assert await bind(http, kc, pod, node) == {}
    assert fake.store.bindings[("default", "train")] == 1
    await kc.wait_for(lambda: kc.events("train", "BindingSucceed"), desc="BindingSucceed")


async def test_bind_needs_the_reservation_on_that_node(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    pod = add_pod(fake, "p")
    never = add_pod(fake, "never-filtered")
    assert "no reservation" in (await bind(http, kc, never, "node-a"))["error"]
    (node,) = (await filter_(http, kc, pod, ["node-b"]))["nodenames"]
    assert node == "node-b"
    res = await bind(http, kc, pod, "node-a")
    assert "reserved on node-b" in res["error"]
    for name in ("p", "never-filtered"):
        assert not fake.get("pods", "default", name)["spec"].get("nodeName")  # type: ignore[index]
        assert ("default", name) not in fake.store.bindings
    assert await bind(http, kc, pod, "node-b") == {}


async def test_bind_checks_the_ledger_not_only_its_own_table(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession, bus: Bus
) -> None:
    pod = add_pod(fake, "freed")
    uid = pod["metadata"]["uid"]
    (node,) = (await filter_(http, kc, pod, ALL))["nodenames"]
    # Freed behind the extender's back (an operator's release, say).
    await bus.publish_event(subjects.alloc("released", node),
                            AllocReleased(uid=uid, name="freed", namespace="default", node=node),
                            msg_id="released:freed:by-hand")

    async def freed() -> bool:
        return await held_on(kc, uid) is None

    await kc.wait_for(freed, desc="released in the ledger")
    assert "no longer in the ledger" in (await bind(http, kc, pod, node))["error"]
    assert ("default", "freed") not in fake.store.bindings


async def test_a_failed_binding_answers_error_and_frees_the_reservation(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    pod = add_pod(fake, "flaky")
    uid = pod["metadata"]["uid"]
    (node,) = (await filter_(http, kc, pod, ALL))["nodenames"]
    fake.fail_next("create", "pods/binding", 500, name="flaky")
    assert (await bind(http, kc, pod, node))["error"]

    async def freed() -> bool:
        return await held_on(kc, uid) is None

    await kc.wait_for(freed, desc="bind-failed reservation released")
    # The scheduler's next attempt filters and binds afresh.
    (node,) = (await filter_(http, kc, pod, ALL))["nodenames"]
    assert await bind(http, kc, pod, node) == {}
    assert fake.get("pods", "default", "flaky")["spec"]["nodeName"] == node  # type: ignore[index]


# ---------------------------------------------------------- idempotence, bad input


async def test_repeated_filter_is_idempotent(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    pod = add_pod(fake, "again", gpu_container(gpu=1, gpumem=30000))
    uid = pod["metadata"]["uid"]
    (first,) = (await filter_(http, kc, pod, ALL))["nodenames"]
    for _ in range(3):
        assert (await filter_(http, kc, pod, ALL))["nodenames"] == [first]
    ledger = await kc.ledger()
    assert list(ledger) == [uid] and ledger[uid][0] == first
    # Its node is not offered any more: released there, decided among the others.
    others = [n for n in ALL if n != first]
    (second,) = (await filter_(http, kc, pod, others))["nodenames"]
    assert second in others

    async def moved() -> bool:
        led = await kc.ledger()
        return list(led) == [uid] and led[uid][0] == second

    await kc.wait_for(moved, desc="one reservation, on the new node")


@pytest.mark.parametrize("verb,body", [
    ("filter", b"{not json"),
    ("filter", b"[]"),
    ("filter", b'{"pod": null, "nodes": null, "nodenames": ["node-a"]}'),
    ("filter", b'{"pod": {"metadata": {"name": "x"}}, "nodenames": ["node-a"]}'),
    ("filter", b'{"pod": {"metadata": {"name": "x", "uid": "u"}}, "nodenames": "node-a"}'),
    ("bind", b'{"podName": "x", "podNamespace": "default", "node": "node-a"}'),
    ("bind", b'{"podName": 3, "podUID": "u", "node": "node-a"}'),
])
async def test_a_malformed_body_is_a_400_with_error_and_reserves_nothing(
    kc: KubeCluster, http: aiohttp.ClientSession, verb: str, body: bytes
) -> None:
    status, res = await post(http, f"{kc.extender_url}/{verb}", body)
    assert status == 400 and res["error"]
    assert not await kc.ledger()


async def test_go_field_names_in_any_case_are_understood(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    """Go's json decoder matches keys case-insensitively; so does ours."""
    pod = add_pod(fake, "cased")
    status, res = await post(http, f"{kc.extender_url}/filter",
                             {"Pod": pod, "Nodes": None, "NodeNames": ["node-a"]})
    assert status == 200 and res["nodenames"] == ["node-a"]
    m = pod["metadata"]
    status, res = await post(http, f"{kc.extender_url}/bind",
                             {"PodName": m["name"], "PodNamespace": "default", "PodUID": m["uid"],
                              "Node": "node-a"})
    assert status == 200 and res == {}


# -------------------------------------------------------------- expiry, deletion


async def test_a_reservation_whose_bind_never_comes_is_released_and_a_late_bind_fails(
    cluster: Cluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    kc = await cluster(nodes={"node-a": ["A100-80GB:1"]}, extender_timeout_s=0.6)
    whole = gpu_container(gpu=1, gpumem=81920, gpucores=100)
    first = add_pod(fake, "first", whole)
    assert (await filter_(http, kc, first, ["node-a"]))["nodenames"] == ["node-a"]
    second = add_pod(fake, "second", whole)
    assert (await filter_(http, kc, second, ["node-a"]))["nodenames"] == []  # the card is taken

    async def expired() -> bool:
        return not await kc.ledger()

    await kc.wait_for(expired, desc="reservation released after the timeout")
    assert kc.binder is not None and kc.binder.extender is not None
    assert kc.binder.extender.expired == 1
    # The capacity is free again.
    assert (await filter_(http, kc, second, ["node-a"]))["nodenames"] == ["node-a"]
    # The scheduler's bind of the first, late: refused, nothing bound, nothing double-booked.
    res = await bind(http, kc, first, "node-a")
    assert "no reservation" in res["error"]
    assert not fake.get("pods", "default", "first")["spec"].get("nodeName")  # type: ignore[index]
    assert await bind(http, kc, second, "node-a") == {}
    assert set(await kc.ledger()) == {second["metadata"]["uid"]}


async def test_a_deleted_pods_reservation_is_released(
    kc: KubeCluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    pod = add_pod(fake, "gone")
    uid = pod["metadata"]["uid"]
    (node,) = (await filter_(http, kc, pod, ALL))["nodenames"]
    assert await held_on(kc, uid) == node
    fake.delete("pods", "default", "gone")

    async def released() -> bool:
        return await held_on(kc, uid) is None

    await kc.wait_for(released, desc="deleted pod's reservation released")
    assert "no reservation" in (await bind(http, kc, pod, node))["error"]
    # A stale filter of the deleted pod (racing its deletion) reserves nothing.
    res = await filter_(http, kc, pod, ALL)
    assert res["nodenames"] == [] and set(res["failedAndUnresolvableNodes"]) == set(ALL)
    assert not await kc.ledger()


# ------------------------------------------------------------- restart, standby


async def test_restart_rebuilds_the_reservations_from_the_ledger(
    cluster: Cluster, fake: FakeKube, http: aiohttp.ClientSession
) -> None:
    kc = await cluster(extender_timeout_s=1.5)
    kept = add_pod(fake, "kept")
    lost = add_pod(fake, "lost")
    (kept_node,) = (await filter_(http, kc, kept, ALL))["nodenames"]
    (lost_node,) = (await filter_(http, kc, lost, ALL))["nodenames"]
    await kc.stop_binder()
    await kc.start_binder()  # a fresh process: its table comes from the ledger
    # The scheduler's bind after the restart finds the reservation...
    assert await bind(http, kc, kept, kept_node) == {}
    assert fake.get("pods", "default", "kept")["spec"]["nodeName"] == kept_node  # type: ignore[index]
    # ...and one whose bind never comes is still swept.

    async def swept() -> bool:
        return await held_on(kc, lost["metadata"]["uid"]) is None

    await kc.wait_for(swept, desc="pre-restart reservation swept")
    assert "no reservation" in (await bind(http, kc, lost, lost_node))["error"]
    assert set(await kc.ledger()) == {kept["metadata"]["uid"]}


async def test_a_standby_hands_calls_to_the_lease_holder_and_reserves_nothing(
    kc: KubeCluster, fake: FakeKube, xcfg: Config, nats_url: str, http: aiohttp.ClientSession
) -> None:
    """The kube-scheduler sidecar may sit beside a standby binder (the two leader
    elections are independent): its calls are answered by the Lease holder (kc's binder),
    and with no holder at all the standby says 503 at once."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fake.create("leases.coordination.k8s.io", {"metadata": {"name": "hami-binder"}, "spec": {
        "holderIdentity": "the-leader", "leaseDurationSeconds": 3600,
        "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}, "default")
    bus = await Bus.connect(nats_url, "standby")
    kube = await Kube.connect(host=fake.url)
    standby = KubeBinder(bus, xcfg, kube, extender_host="127.0.0.1", extender_port=0)
    elector = LeaderElector(kube, "default", "hami-binder", identity="standby",
                            on_start=standby.start_watches, on_stop=standby.stop_watches)
    try:
        await standby.start(serve_api=False, leader=elector)
        assert standby.extender_server is not None and standby.extender is not None
        url = standby.extender_server.url
        pod = add_pod(fake, "p")
        status, res = await post(http, f"{url}/filter", extender_args(pod, ALL))
        assert status == 200, res
        (node,) = res["nodenames"]
        assert standby.extender.held == {}  # the holder's reservation, not the standby's
        assert kc.binder is not None and kc.binder.extender is not None
        assert pod["metadata"]["uid"] in kc.binder.extender.held
        status, res = await post(http, f"{url}/bind", binding_args(pod, node))
        assert (status, res) == (200, {})
        assert fake.get("pods", "default", "p")["spec"]["nodeName"] == node  # type: ignore[index]
        assert ("extender", None) in standby.ready_checks()
        # No holder (kc's binder gone): 503 at once, nothing reserved.
        await kc.stop_binder()
        other = add_pod(fake, "q")
        status, res = await post(http, f"{url}/filter", extender_args(other, ALL))
        assert status == 503 and "Lease" in res["error"]
        status, res = await post(http, f"{url}/bind", binding_args(other, "node-a"))
        assert status == 503 and res["error"]
        assert set(await kc.ledger()) == {pod["metadata"]["uid"]}
    finally:
        await standby.stop()
        await bus.close()
        await kube.close()


# ------------------------------------------------------------ a scheduler's burst


async def test_scheduler_loop_burst_binds_what_it_reserved(cluster: Cluster, fake: FakeKube) -> None:
    """kube-scheduler's way (serial filter, concurrent binds) over a burst: every pod
    bound where its reservation is, nothing leaked, no card over capacity."""
    nodes = {f"node-{i}": ["A100-80GB:4"] for i in range(3)}
    kc = await cluster(nodes=nodes)
    # 12 cards x 5 (20 cores of 100 each, 16000 of 81920 MiB): 60 fit, 6 fit nowhere.
    n = 66
    for i in range(n):
        add_pod(fake, f"burst-{i:03d}", gpu_container(gpu=1, gpumem=16000, gpucores=20))
    loop = SchedulerLoop(fake.url, kc.extender_url, nodes=list(nodes))

    def settled(s: LoopStats) -> bool:
        return len(s.bound) + len(s.unschedulable) >= n

    stats = await loop.run(settled, timeout=60)
    assert not stats.timed_out, (len(stats.bound), len(stats.unschedulable), stats.filter_errors[:3])
    assert len(stats.bound) == 60 and len(stats.unschedulable) == 6
    assert not stats.filter_errors and not stats.bind_errors
    ledger = await kc.ledger()
    pods = {p["metadata"]["uid"]: p for p in fake.list("pods")}
    mismatches = [uid for uid, node in stats.bound.items()
                  if pods[uid]["spec"].get("nodeName") != node or ledger.get(uid, ("",))[0] != node
                  or pods[uid]["metadata"]["annotations"][ann.DEVICES_ALLOCATED]
                  != ann.encode_pod_devices(ledger[uid][1].containers)]
    assert mismatches == []
    leaked = set(ledger) - set(stats.bound)
    assert leaked == set()
    assert all(v == 1 for v in fake.store.bindings.values()) and len(fake.store.bindings) == 60
    bound = [p for p in pods.values() if p["spec"].get("nodeName")]
    for uuid, (mem, cores) in card_totals(bound).items():
        assert mem <= 81920 and cores <= 100, (uuid, mem, cores)
    assert kc.binder is not None and kc.binder.extender is not None
    assert kc.binder.extender.held == {}
