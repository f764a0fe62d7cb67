"""Binder, Kubernetes mode, end to end: FakeKube + real NATS + inventory, placement and
simulated node agents. A pod created in the API gets HAMi's annotations and a Binding;
deletion, completion and bind failures release; dropped watches and restarts recover."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.binder.kube import KubeBackend
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.hami import annotations as ann
from shared.kube import Kube
from shared.schemas import LedgerAlloc, NodeInventory, NodeLedger, Quota
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, card_totals, gpu_container

SCHED = "hami-scheduler"
NODES = {"node-a": ["A100-80GB:2"], "node-b": ["A100-80GB:2"]}


@pytest.fixture
async def kc(fake: FakeKube, nats_url: str, cfg: Config) -> AsyncIterator[KubeCluster]:
    async with KubeCluster(fake, nats_url, cfg, NODES) as k:
        yield k


def add_pod(fake: FakeKube, name: str, *containers: dict[str, Any], init: list[dict[str, Any]] | None = None,
            annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = {"metadata": {"name": name, "annotations": annotations or {}},
           "spec": {"schedulerName": SCHED, "containers": list(containers) or [gpu_container(gpu=1, gpumem=1000)]}}
    if init:
        pod["spec"]["initContainers"] = init
    return fake.create("pods", pod, "default")


async def test_pod_gets_hami_annotations_binding_and_events(kc: KubeCluster, fake: FakeKube) -> None:
    created = add_pod(
        fake, "train",
        gpu_container("app1", gpu=1, gpumem=3000, gpucores=30),
        gpu_container("app2", gpu=2, gpumem=5000, gpucores=30),
        init=[gpu_container("setup")],
    )
    uid = created["metadata"]["uid"]
    pod = await kc.wait_bound("default", "train")
    a = pod["metadata"]["annotations"]
    node = pod["spec"]["nodeName"]
    assert a[ann.VGPU_NODE] == node
    # The label follows the binds (with the Events), once the binder is quiet.
    await kc.wait_for(
        lambda: (fake.get("pods", "default", "train")["metadata"].get("labels") or {}).get(ann.VGPU_NODE) == node,
        desc="hami.io/vgpu-node label",
    )
    # REFERENCE §4 encoding: init container without devices first, then app containers.
    pattern = r";GPU-[^,;:]+,NVIDIA,3000,30:;GPU-[^,;:]+,NVIDIA,5000,30:GPU-[^,;:]+,NVIDIA,5000,30:;"
    assert re.fullmatch(pattern, a[ann.DEVICES_TO_ALLOCATE]), a[ann.DEVICES_TO_ALLOCATE]
    assert a[ann.DEVICES_ALLOCATED] == a[ann.DEVICES_TO_ALLOCATE]
    assert a[ann.BIND_PHASE] == "allocating"
    assert a[ann.VGPU_TIME].isdigit() and a[ann.BIND_TIME].isdigit()
    assert set(a) >= {ann.VGPU_NODE, ann.VGPU_TIME, ann.DEVICES_TO_ALLOCATE,
                      ann.DEVICES_ALLOCATED, ann.BIND_PHASE, ann.BIND_TIME}
    # The annotation is exactly the ledger's reservation, in pod order.
    led_node, alloc = (await kc.ledger())[uid]
    assert led_node == node
    assert a[ann.DEVICES_ALLOCATED] == ann.encode_pod_devices(alloc.containers)
    # Only real card UUIDs of the chosen node.
    assert kc.bus is not None
    inv, _ = await kc.bus.kv_get(subjects.NODES_BUCKET, node, NodeInventory)
    assert inv is not None
    used = {d.uuid for devs in ann.decode_pod_devices(a[ann.DEVICES_ALLOCATED]) for d in devs}
    assert len(used) == 2 and used <= {d.uuid for d in inv.devices}
    await kc.wait_for(lambda: kc.events("train", "BindingSucceed"), desc="BindingSucceed event")
    ev = kc.events("train", "FilteringSucceed")
    assert ev and ev[0]["type"] == "Normal" and ev[0]["involvedObject"]["uid"] == uid
    assert ev[0]["source"]["component"] == "hami-scheduler"
    # HAMi's genSuccessMsg: both empty nodes fit with score 0; the chosen one is last
    other = next(n for n in NODES if n != node)
    assert ev[0]["message"] == f"find fit node({node}), 0 nodes not fit, 2 nodes fit({other}:0.00,{node}:0.00)"


async def test_binding_status_body_needs_raw_response(kc: KubeCluster, fake: FakeKube) -> None:
    """The generated client raises on the Status a successful binding returns; ours binds."""
    from kubernetes.aio import client

    for n in ("s1", "s2"):
        fake.create("pods", {"metadata": {"name": n}, "spec": {"containers": [gpu_container()]}}, "default")
    kube = await Kube.connect(host=fake.url)
    try:
        core = client.CoreV1Api(kube.api)
        body = client.V1Binding(metadata=client.V1ObjectMeta(name="s1"),
                                target=client.V1ObjectReference(kind="Node", name="node-a"))
        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, it raises
            await core.create_namespaced_pod_binding("s1", "default", body)
        assert fake.get("pods", "default", "s1")["spec"]["nodeName"] == "node-a"  # it did bind
        uid = fake.get("pods", "default", "s2")["metadata"]["uid"]
        await KubeBackend(kube).create_binding("default", "s2", uid, "node-b")
        assert fake.get("pods", "default", "s2")["spec"]["nodeName"] == "node-b"
    finally:
        await kube.close()


async def test_delete_and_completion_release_the_reservation(kc: KubeCluster, fake: FakeKube) -> None:
    uids = {}
    for n in ("d1", "d2"):
        uids[n] = add_pod(fake, n)["metadata"]["uid"]
        await kc.wait_bound("default", n)
    assert set(uids.values()) <= set(await kc.ledger())
    fake.delete("pods", "default", "d1")
    fake.patch("pods", "default", "d2", {"status": {"phase": "Succeeded"}}, subresource="status")

    async def freed() -> bool:
        return not (set(uids.values()) & set(await kc.ledger()))

    await kc.wait_for(freed, desc="both reservations freed")


async def test_bind_failure_releases_then_retries(kc: KubeCluster, fake: FakeKube) -> None:
    fake.fail_next("create", "pods/binding", 500, name="flaky")
    uid = add_pod(fake, "flaky")["metadata"]["uid"]
    await kc.wait_for(lambda: kc.events("flaky", "BindingFailed"), desc="BindingFailed event")
    pod = await kc.wait_bound("default", "flaky")
    assert pod["metadata"]["annotations"][ann.BIND_PHASE] == "allocating"
    ledger = await kc.ledger()
    assert uid in ledger and ledger[uid][0] == pod["spec"]["nodeName"]
    assert len(ledger) == 1  # the failed attempt's reservation was released, not leaked


async def test_bind_failure_for_a_vanished_pod_frees_it(kc: KubeCluster, fake: FakeKube) -> None:
    """The pod is deleted between decision and binding: the Binding fails, nothing leaks."""
    fake.fail_next("create", "pods/binding", 404, name="ghost", times=5)
    uid = add_pod(fake, "ghost")["metadata"]["uid"]
    await kc.wait_for(lambda: kc.events("ghost", "BindingFailed"), desc="BindingFailed")
    fake.delete("pods", "default", "ghost")

    async def gone() -> bool:
        return uid not in await kc.ledger()

    await kc.wait_for(gone, desc="ghost released")


async def test_no_fit_reports_filtering_failed_with_reason_counts(kc: KubeCluster, fake: FakeKube) -> None:
    add_pod(fake, "huge", gpu_container(gpu=1, gpumem=500000))
    evs = await kc.wait_for(lambda: len(kc.events("huge", "FilteringFailed")) >= 2 and
                            kc.events("huge", "FilteringFailed"), desc="FilteringFailed")
    assert {e["type"] for e in evs} == {"Warning"}
    # HAMi's events: one per reason naming its nodes, and the count of nodes judged
    # (several senders post them: the API server may get them in either order)
    nodes = sorted(n["metadata"]["name"] for n in fake.list("nodes"))
    assert sorted(e["message"] for e in evs) == [
        f"{len(nodes)} nodes CardInsufficientMemory({','.join(nodes)})",
        f"no available node, {len(nodes)} nodes do not meet",
    ]
    assert fake.get("pods", "default", "huge")["spec"].get("nodeName") is None


async def test_invalid_pod_gets_a_warning_and_stays_pending(kc: KubeCluster, fake: FakeKube) -> None:
    add_pod(fake, "bad", gpu_container(gpu=1), annotations={ann.VGPU_MODE: "nonsense"})
    evs = await kc.wait_for(lambda: kc.events("bad", "FilteringFailed"), desc="warning")
    assert "nvidia.com/vgpu-mode" in evs[0]["message"]


async def test_dropped_and_expired_watches_recover(kc: KubeCluster, fake: FakeKube) -> None:
    assert kc.binder is not None
    add_pod(fake, "w0")
    await kc.wait_bound("default", "w0")
    fake.drop_watches(abort=True)  # cut mid-stream
    add_pod(fake, "w1")
    await kc.wait_bound("default", "w1")
    fake.drop_watches()  # clean end, as a server timeout
    add_pod(fake, "w2")
    await kc.wait_bound("default", "w2")
    # While no watch is open, a pod is deleted and another created, then history is
    # compacted: the resume gets 410 and the binder relists.
    relists = kc.binder.pod_watch.relists
    fake.fail_next("*", "pods", 503, times=3)  # the re-watch fails a few times first
    fake.drop_watches()
    uid0 = fake.get("pods", "default", "w0")["metadata"]["uid"]
    fake.delete("pods", "default", "w0")
    add_pod(fake, "w3")
    fake.compact()
    await kc.wait_bound("default", "w3")

    async def released() -> bool:
        return uid0 not in await kc.ledger()

    await kc.wait_for(released, desc="w0 released after relist")
    assert kc.binder.pod_watch.relists > relists


async def test_quota_is_published_for_placement(kc: KubeCluster, fake: FakeKube) -> None:
    assert kc.bus is not None
    fake.create("resourcequotas", {"metadata": {"name": "gpu"}, "spec": {"hard": {
        "limits.nvidia.com/gpumem": "20000", "limits.nvidia.com/gpucores": "150"}}}, "default")

    async def quota() -> Quota | None:
        return (await kc.bus.kv_get(subjects.QUOTA_BUCKET, "default", Quota))[0]  # type: ignore[union-attr]

    assert await kc.wait_for(quota, desc="quota") == Quota(memory_mib=20000, cores=150)
    fake.delete("resourcequotas", "default", "gpu")
    await kc.wait_for(lambda: _none(quota()), desc="quota removed")


async def _none(coro: Any) -> bool:
    return (await coro) is None


async def test_binder_restart_mid_burst(kc: KubeCluster, fake: FakeKube) -> None:
    """Stop the binder while a burst is in flight, change pods while it is down, start a
    new one: every live pod ends bound, the ledger is exactly the live pods, no card is
    over-committed, and deleting everything leaves the ledger empty."""
    n = 24
    for i in range(n):
        add_pod(fake, f"b{i}", gpu_container(gpu=1, gpumem=16000, gpucores=20))

    def bound_count() -> int:
        return sum(1 for p in fake.list("pods") if p["spec"].get("nodeName"))

    await kc.wait_for(lambda: bound_count() >= 4, desc="some bound")
    await kc.stop_binder()  # mid-burst: decisions in flight, some pods unbound
    for i in range(n, n + 6):
        add_pod(fake, f"b{i}", gpu_container(gpu=1, gpumem=16000, gpucores=20))
    for i in (0, 1, n - 1):  # deleted while the binder is down (bound or not)
        fake.delete("pods", "default", f"b{i}")
    await kc.start_binder()
    live = {p["metadata"]["name"] for p in fake.list("pods")}
    # 4 cards x (100 cores / 20, 81920 MiB / 16000) = 20 fit; 27 live pods: 20 bound, 7 stay pending.
    await kc.wait_for(lambda: bound_count() >= 20, timeout=25, desc="20 bound")

    async def consistent() -> bool:
        pods = fake.list("pods")
        bound = {p["metadata"]["uid"]: p for p in pods if p["spec"].get("nodeName")}
        ledger = await kc.ledger()
        return set(ledger) == set(bound)

    await kc.wait_for(consistent, timeout=15, desc="ledger == bound pods")
    pods = [p for p in fake.list("pods") if p["spec"].get("nodeName")]
    assert len(pods) == 20 and {p["metadata"]["name"] for p in pods} <= live
    ledger = await kc.ledger()
    for p in pods:
        node, alloc = ledger[p["metadata"]["uid"]]
        assert node == p["spec"]["nodeName"]
        assert p["metadata"]["annotations"][ann.DEVICES_ALLOCATED] == ann.encode_pod_devices(alloc.containers)
    for uuid, (mem, cores) in card_totals(pods).items():
        assert cores <= 100 and mem <= 81920, (uuid, mem, cores)
    for p in fake.list("pods"):
        fake.delete("pods", "default", p["metadata"]["name"])

    async def empty() -> bool:
        return not await kc.ledger()

    await kc.wait_for(empty, timeout=15, desc="ledger empty")


async def test_restart_reconciles_leaked_and_lost_reservations(kc: KubeCluster, fake: FakeKube) -> None:
    """A reservation whose pod is gone is released; a bound pod missing from the ledger
    is re-adopted on exactly its cards."""
    assert kc.bus is not None
    uid = add_pod(fake, "keep", gpu_container(gpu=1, gpumem=30000, gpucores=40))["metadata"]["uid"]
    pod = await kc.wait_bound("default", "keep")
    node = pod["spec"]["nodeName"]
    held = pod["metadata"]["annotations"][ann.DEVICES_ALLOCATED]
    await kc.stop_binder()
    # Corrupt the ledger behind everyone's back: drop "keep", add a leaked "ghost".
    led, rev = await kc.bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
    assert led is not None
    ghost = LedgerAlloc(uid="ghost-uid", name="ghost", namespace="default", source="kube",
                        containers=led.allocs[uid].containers)
    allocs = {k: v for k, v in led.allocs.items() if k != uid}
    allocs["ghost-uid"] = ghost
    await kc.bus.kv_cas(subjects.LEDGER_BUCKET, node, NodeLedger(node=node, allocs=allocs), rev)
    # Placement follows the ledger through its KV watch; let it see the change first (in
    # real life only placement writes the ledger, so it never lags behind itself).
    assert kc.placement is not None
    await kc.wait_for(lambda: uid not in kc.placement.owner and "ghost-uid" in kc.placement.owner,  # type: ignore[union-attr]
                      desc="placement sees the corrupted ledger")
    await kc.start_binder()

    async def healed() -> bool:
        ledger = await kc.ledger()
        return "ghost-uid" not in ledger and uid in ledger

    await kc.wait_for(healed, desc="ghost released, keep re-adopted")
    node2, alloc = (await kc.ledger())[uid]
    assert node2 == node and ann.encode_pod_devices(alloc.containers) == held
    # and the pod's annotations were not rewritten
    assert fake.get("pods", "default", "keep")["metadata"]["annotations"][ann.DEVICES_ALLOCATED] == held


async def test_cli_allocations_are_left_alone(kc: KubeCluster, bus: Bus) -> None:
    """Reconcile touches kube-sourced reservations only."""
    node = "node-a"
    led, rev = await bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
    allocs = dict(led.allocs) if led else {}
    allocs["cli-1"] = LedgerAlloc(uid="cli-1", name="job", source="cli")
    await bus.kv_cas(subjects.LEDGER_BUCKET, node, NodeLedger(node=node, allocs=allocs), rev)
    await kc.stop_binder()
    await kc.start_binder()
    assert "cli-1" in await kc.ledger()
