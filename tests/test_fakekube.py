"""tests/fakekube driven through the real ``kubernetes.aio`` client (raw aiohttp only where
the client cannot express a request), checking the API-server behaviour our services rely on."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pydantic
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.aio import client, watch
from kubernetes.aio.client.exceptions import ApiException

from tests.fakekube import FakeKube, merge_patch, strategic_merge_patch

pytestmark = pytest.mark.timeout(30)

MERGE = "application/merge-patch+json"


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.05) as k:
        yield k


@pytest.fixture
def api(kube: FakeKube) -> Any:
    return kube.core_v1()


def pod(name: str, *, labels: dict[str, str] | None = None, containers: int = 1) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(name=f"c{i}", image=f"img{i}:1") for i in range(containers)
            ]
        ),
    )


def binding(name: str, node: str, **annotations: str) -> client.V1Binding:
    return client.V1Binding(
        metadata=client.V1ObjectMeta(name=name, annotations=annotations or None),
        target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
    )


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == exc.status
    return body


async def collect(stream: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` events of a kubernetes.aio watch stream."""
    out = []
    async for ev in stream:
        out.append(ev)
        if len(out) == n:
            break
    return out


# --------------------------------------------------------------------------- CRUD and errors


async def test_pod_crud_and_resource_versions(kube: FakeKube, api: Any) -> None:
    created = await api.create_namespaced_pod("default", pod("a"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.generation == 1
    assert created.status.phase == "Pending"
    assert created.spec.scheduler_name == "default-scheduler"
    rv1 = int(created.metadata.resource_version)
    assert rv1 == kube.resource_version

    await api.create_namespaced_pod("default", pod("b"))
    got = await api.read_namespaced_pod("a", "default")
    assert got.metadata.uid == created.metadata.uid

    listed = await api.list_namespaced_pod("default")
    assert [p.metadata.name for p in listed.items] == ["a", "b"]
    assert int(listed.metadata.resource_version) == kube.resource_version == rv1 + 1

    kube.add_namespace("other")
    await api.create_namespaced_pod("other", pod("c"))
    everywhere = await api.list_pod_for_all_namespaces()
    assert {(p.metadata.namespace, p.metadata.name) for p in everywhere.items} == {
        ("default", "a"),
        ("default", "b"),
        ("other", "c"),
    }

    got.metadata.labels = {"tier": "x"}
    replaced = await api.replace_namespaced_pod("a", "default", got)
    assert replaced.metadata.labels == {"tier": "x"}
    assert int(replaced.metadata.resource_version) > rv1
    assert replaced.metadata.generation == 1  # metadata-only change

    deleted = await api.delete_namespaced_pod("a", "default", grace_period_seconds=30)
    assert deleted.metadata.name == "a"  # pods answer DELETE with the object
    assert kube.get("pods", "default", "a") is None
    with pytest.raises(ApiException) as err:
        await api.read_namespaced_pod("a", "default")
    assert err.value.status == 404


async def test_not_found_and_already_exists_bodies(api: Any) -> None:
    with pytest.raises(ApiException) as err:
        await api.read_namespaced_pod("ghost", "default")
    body = status_of(err.value)
    assert (body["reason"], body["message"]) == ("NotFound", 'pods "ghost" not found')
    assert body["details"] == {"name": "ghost", "kind": "pods"}

    await api.create_namespaced_pod("default", pod("a"))
    with pytest.raises(ApiException) as err:
        await api.create_namespaced_pod("default", pod("a"))
    body = status_of(err.value)
    assert err.value.status == 409 and body["reason"] == "AlreadyExists"
    assert body["message"] == 'pods "a" already exists'

    with pytest.raises(ApiException) as err:
        await api.create_namespaced_pod("nowhere", pod("a"))
    body = status_of(err.value)
    assert err.value.status == 404 and body["message"] == 'namespaces "nowhere" not found'


async def test_stale_writes_conflict(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("a"))
    old = await api.read_namespaced_pod("a", "default")
    await api.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"v": "2"}}})

    old.metadata.labels = {"v": "stale"}
    with pytest.raises(ApiException) as err:
        await api.replace_namespaced_pod("a", "default", old)
    body = status_of(err.value)
    assert err.value.status == 409 and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]

    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_pod(
            "a",
            "default",
            {"metadata": {"resourceVersion": old.metadata.resource_version, "labels": {"v": "3"}}},
        )
    assert err.value.status == 409
    assert kube.get("pods", "default", "a")["metadata"]["labels"] == {"v": "2"}

    # A write carrying the current resourceVersion goes through; none at all is unconditional.
    fresh = await api.read_namespaced_pod("a", "default")
    fresh.metadata.labels = {"v": "4"}
    await api.replace_namespaced_pod("a", "default", fresh)
    fresh.metadata.resource_version = None
    fresh.metadata.labels = {"v": "5"}
    await api.replace_namespaced_pod("a", "default", fresh)
    assert kube.get("pods", "default", "a")["metadata"]["labels"] == {"v": "5"}


async def test_noop_patch_keeps_resource_version(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("a", labels={"x": "1"}))
    rv = kube.resource_version
    out = await api.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "1"}}})
    assert out.metadata.resource_version == str(rv) == str(kube.resource_version)


async def test_pod_spec_is_immutable_except_images(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("a"))
    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_pod("a", "default", {"spec": {"nodeName": "n1"}})
    body = status_of(err.value)
    assert err.value.status == 422 and body["reason"] == "Invalid"
    assert "pod updates may not change fields" in body["message"]
    out = await api.patch_namespaced_pod(
        "a", "default", {"spec": {"containers": [{"name": "c0", "image": "img0:2"}]}}
    )
    assert out.spec.containers[0].image == "img0:2"
    assert out.metadata.generation == 2


# --------------------------------------------------------------------------- patch types


async def test_json_patch_ops_and_failed_test_is_422(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("a", labels={"app": "x", "gone": "y"}))
    ops = [
        {"op": "test", "path": "/metadata/labels/app", "value": "x"},
        {"op": "add", "path": "/metadata/annotations", "value": {}},
        {"op": "add", "path": "/metadata/annotations/hami.io~1vgpu-node", "value": "n1"},
        {"op": "copy", "from": "/metadata/labels/app", "path": "/metadata/labels/copied"},
        {"op": "move", "from": "/metadata/labels/gone", "path": "/metadata/labels/moved"},
        {"op": "replace", "path": "/metadata/labels/app", "value": "z"},
        {"op": "remove", "path": "/metadata/labels/copied"},
    ]
    out = await api.patch_namespaced_pod("a", "default", ops)
    assert kube.requests[-1].content_type == "application/json-patch+json"
    assert out.metadata.annotations == {"hami.io/vgpu-node": "n1"}
    assert out.metadata.labels == {"app": "z", "moved": "y"}

    rv = kube.resource_version
    failing = [
        {"op": "test", "path": "/metadata/annotations/hami.io~1vgpu-node", "value": "other"},
        {"op": "replace", "path": "/metadata/labels/app", "value": "never"},
    ]
    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_pod("a", "default", failing)
    body = status_of(err.value)
    assert err.value.status == 422 and body["reason"] == "Invalid"
    assert kube.resource_version == rv  # nothing written
    assert kube.get("pods", "default", "a")["metadata"]["labels"]["app"] == "z"

    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_pod(
            "a", "default", [{"op": "remove", "path": "/metadata/labels/absent"}]
        )
    assert err.value.status == 422


async def test_merge_patch_replaces_lists_and_null_deletes(kube: FakeKube, api: Any) -> None:
    kube.add_node("n1", annotations={"keep": "1", "drop": "2"})
    taints = [{"key": "a", "effect": "NoSchedule"}, {"key": "b", "effect": "NoSchedule"}]
    await api.patch_node("n1", {"spec": {"taints": taints}}, _content_type=MERGE)
    out = await api.patch_node(
        "n1",
        {"metadata": {"annotations": {"drop": None, "new": "3"}}, "spec": {"taints": [taints[1]]}},
        _content_type=MERGE,
    )
    assert kube.requests[-1].content_type == MERGE
    assert out.metadata.annotations == {"keep": "1", "new": "3"}
    assert [t.key for t in out.spec.taints] == ["b"]

    # A merge patch replaces the containers list, which a pod update may not do.
    await api.create_namespaced_pod("default", pod("p", containers=2))
    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_pod(
            "p",
            "default",
            {"spec": {"containers": [{"name": "c1", "image": "new:1"}]}},
            _content_type=MERGE,
        )
    assert err.value.status == 422


async def test_strategic_merge_patch_merges_keyed_lists(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("p", containers=2, labels={"a": "1", "b": "2"}))
    # The client sends a dict body as strategic merge; containers merge by name.
    out = await api.patch_namespaced_pod(
        "p",
        "default",
        {
            "metadata": {
                "annotations": {"hami.io/bind-phase": "allocating"},
                "labels": {"b": None},
            },
            "spec": {"containers": [{"name": "c1", "image": "img1:2"}]},
        },
    )
    assert kube.requests[-1].content_type == "application/strategic-merge-patch+json"
    assert [(c.name, c.image) for c in out.spec.containers] == [("c0", "img0:1"), ("c1", "img1:2")]
    assert out.metadata.annotations == {"hami.io/bind-phase": "allocating"}
    assert out.metadata.labels == {"a": "1"}

    # Node conditions merge by type; `$patch: delete` removes a keyed element and a map.
    kube.add_node("n1", labels={"gpu": "yes"})
    out = await api.patch_node_status(
        "n1", {"status": {"conditions": [{"type": "GPUHealthy", "status": "True"}]}}
    )
    assert {c.type for c in out.status.conditions} == {"Ready", "GPUHealthy"}
    out = await api.patch_node_status(
        "n1", {"status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}}
    )
    assert [c.type for c in out.status.conditions] == ["GPUHealthy"]
    out = await api.patch_node("n1", {"metadata": {"annotations": {"$patch": "delete"}}})
    assert out.metadata.annotations is None and out.metadata.labels["gpu"] == "yes"


def test_strategic_merge_patch_keys() -> None:
    spec = {
        "containers": [
            {
                "name": "c",
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "ports": [{"containerPort": 80, "protocol": "TCP"}],
                "volumeMounts": [{"mountPath": "/a", "name": "va"}],
            }
        ],
        "tolerations": [{"key": "x", "operator": "Exists"}],
    }
    patch = {
        "containers": [
            {
                "name": "c",
                "env": [{"name": "B", "value": "3"}, {"name": "A", "$patch": "delete"}],
                "ports": [{"containerPort": 81}],
                "volumeMounts": [{"mountPath": "/a", "readOnly": True}],
            }
        ],
        "tolerations": [{"key": "y", "operator": "Exists"}],  # atomic list: replaced
    }
    out = strategic_merge_patch(spec, patch)
    c = out["containers"][0]
    assert c["env"] == [{"name": "B", "value": "3"}]
    assert [p["containerPort"] for p in c["ports"]] == [80, 81]
    assert c["volumeMounts"] == [{"mountPath": "/a", "name": "va", "readOnly": True}]
    assert out["tolerations"] == [{"key": "y", "operator": "Exists"}]
    assert spec["containers"][0]["env"][0] == {"name": "A", "value": "1"}  # input untouched


_json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=3)
_maps = st.recursive(
    st.dictionaries(st.sampled_from("abc"), _json_scalars, max_size=3),
    lambda inner: st.dictionaries(st.sampled_from("abc"), inner | _json_scalars, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(_maps, _maps)
def test_strategic_equals_merge_patch_on_plain_maps(
    target: dict[str, Any], patch: dict[str, Any]
) -> None:
    assert strategic_merge_patch(target, patch) == merge_patch(target, patch)


# --------------------------------------------------------------------------- subresources


async def test_binding_status_body_and_preload_content(kube: FakeKube, api: Any) -> None:
    kube.add_node("n1")
    for name in ("p1", "p2"):
        await api.create_namespaced_pod("default", pod(name))

    # The real server answers a binding with 201 and a Status, which the 37.x client
    # tries to deserialize as V1Binding and fails on -- after the pod was bound.
    with pytest.raises(pydantic.ValidationError):
        await api.create_namespaced_pod_binding("p1", "default", binding("p1", "n1"))
    assert kube.get("pods", "default", "p1")["spec"]["nodeName"] == "n1"
    # 37.x rejects the _preload_content keyword on the plain method ...
    with pytest.raises(pydantic.ValidationError):
        await api.create_namespaced_pod_binding(
            "p2", "default", binding("p2", "n1"), _preload_content=False
        )
    # ... and offers it as *_without_preload_content: the raw aiohttp response.
    resp = await api.create_namespaced_pod_binding_without_preload_content(
        "p2", "default", binding("p2", "n1", **{"hami.io/bind-phase": "allocating"})
    )
    assert resp.status == 201
    assert await resp.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": 201,
    }
    bound = await api.read_namespaced_pod("p2", "default")
    assert bound.spec.node_name == "n1"
    assert bound.metadata.annotations == {"hami.io/bind-phase": "allocating"}
    assert [(c.type, c.status) for c in bound.status.conditions] == [("PodScheduled", "True")]

    # That variant does not raise: the caller reads the status code.
    resp = await api.create_namespaced_pod_binding_without_preload_content(
        "p2", "default", binding("p2", "n2")
    )
    body = await resp.json()
    assert resp.status == 409 and body["reason"] == "Conflict"
    assert body["message"] == (
        'Operation cannot be fulfilled on pods/binding "p2": pod p2 is already assigned to node "n1"'
    )
    resp = await api.create_namespaced_pod_binding_without_preload_content(
        "ghost", "default", binding("ghost", "n1")
    )
    assert resp.status == 404 and (await resp.json())["reason"] == "NotFound"
    assert kube.get("pods", "default", "p2")["spec"]["nodeName"] == "n1"


async def test_status_subresource_separates_spec_and_status(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("a"))
    out = await api.patch_namespaced_pod_status(
        "a", "default", {"status": {"phase": "Running"}, "spec": {"nodeName": "sneaky"}}
    )
    assert out.status.phase == "Running" and out.spec.node_name is None
    read = await api.read_namespaced_pod_status("a", "default")
    assert read.status.phase == "Running"
    # The main resource ignores status changes.
    out = await api.patch_namespaced_pod(
        "a", "default", {"status": {"phase": "Failed"}, "metadata": {"labels": {"l": "1"}}}
    )
    assert out.status.phase == "Running" and out.metadata.labels == {"l": "1"}
    read.status.phase = "Succeeded"
    with pytest.raises(ApiException) as err:  # `read` predates the label patch
        await api.replace_namespaced_pod_status("a", "default", read)
    assert err.value.status == 409
    read = await api.read_namespaced_pod_status("a", "default")
    read.status.phase = "Succeeded"
    await api.replace_namespaced_pod_status("a", "default", read)
    assert kube.get("pods", "default", "a")["status"]["phase"] == "Succeeded"


# --------------------------------------------------------------------------- other kinds


async def test_nodes_namespaces_quotas_events(kube: FakeKube, api: Any) -> None:
    kube.add_node("n1", labels={"gpu": "on"}, capacity={"nvidia.com/gpu": "4"})
    kube.add_node("n2")
    nodes = await api.list_node(label_selector="gpu=on")
    assert [n.metadata.name for n in nodes.items] == ["n1"]
    out = await api.patch_node(
        "n1", {"metadata": {"annotations": {"hami.io/node-nvidia-register": "[]"}}}
    )
    assert out.metadata.annotations["hami.io/node-nvidia-register"] == "[]"
    assert out.status.capacity == {"nvidia.com/gpu": "4"}
    deleted = await api.delete_node("n2")
    assert deleted["kind"] == "Status" and deleted["status"] == "Success"  # the client gives a dict
    assert deleted["details"]["name"] == "n2"

    ns = await api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team")))
    assert ns.status.phase == "Active"
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="q"),
        spec=client.V1ResourceQuotaSpec(hard={"nvidia.com/gpu": "2"}),
    )
    await api.create_namespaced_resource_quota("team", quota)
    await api.patch_namespaced_resource_quota_status(
        "q", "team", {"status": {"hard": {"nvidia.com/gpu": "2"}, "used": {"nvidia.com/gpu": "1"}}}
    )
    q = await api.read_namespaced_resource_quota("q", "team")
    assert q.status.used == {"nvidia.com/gpu": "1"}

    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e1"),
        involved_object=client.V1ObjectReference(kind="Pod", name="p", namespace="team"),
        reason="FilteringFailed",
        message="no node fits",
        type="Warning",
        event_time=datetime.now(UTC),  # required by events.k8s.io/v1 (and its client model)
    )
    await api.create_namespaced_event("team", event)
    events = await api.list_namespaced_event("team", field_selector="involvedObject.name=p")
    assert [e.reason for e in events.items] == ["FilteringFailed"]
    # The same event through events.k8s.io/v1, with its renamed fields.
    v1 = await kube.events_v1().read_namespaced_event("e1", "team")
    assert (v1.regarding.name, v1.note) == ("p", "no node fits")
    new = client.EventsV1Event(
        metadata=client.V1ObjectMeta(name="e2"),
        event_time=datetime.now(UTC),
        regarding=client.V1ObjectReference(kind="Pod", name="q", namespace="team"),
        reason="BindingSucceed",
        note="bound",
        action="Binding",
        reporting_controller="hami-scheduler",
        reporting_instance="hami-scheduler-0",
        type="Normal",
    )
    await kube.events_v1().create_namespaced_event("team", new)
    core = await api.read_namespaced_event("e2", "team")
    assert (core.involved_object.name, core.message, core.reporting_component) == (
        "q",
        "bound",
        "hami-scheduler",
    )

    gone = await api.delete_namespace("team")  # the fake finalizes at once
    assert gone["status"]["phase"] == "Terminating" and gone["metadata"]["deletionTimestamp"]
    assert kube.get("namespaces", None, "team") is None
    assert kube.get("resourcequotas", "team", "q") is None
    assert kube.get("events", "team", "e1") is None


# --------------------------------------------------------------------------- selectors


async def test_label_and_field_selectors(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a", labels={"app": "x", "tier": "1"}, scheduler_name="hami-scheduler")
    kube.add_pod("b", labels={"app": "y"}, node_name="n1")
    kube.add_pod("c")

    async def names(**kw: str) -> list[str]:
        return [p.metadata.name for p in (await api.list_namespaced_pod("default", **kw)).items]

    assert await names(label_selector="app=x") == ["a"]
    assert await names(label_selector="app==y") == ["b"]
    assert await names(label_selector="app!=x") == ["b", "c"]  # absent label matches !=
    assert await names(label_selector="app in (x, y)") == ["a", "b"]
    assert await names(label_selector="app notin (x)") == ["b", "c"]
    assert await names(label_selector="tier") == ["a"]
    assert await names(label_selector="!tier") == ["b", "c"]
    assert await names(label_selector="app in (x,y),!tier") == ["b"]
    assert await names(field_selector="spec.nodeName=") == ["a", "c"]
    assert await names(field_selector="spec.nodeName!=") == ["b"]
    assert await names(field_selector="spec.schedulerName=hami-scheduler") == ["a"]
    assert await names(field_selector="metadata.name=c,status.phase=Pending") == ["c"]
    assert await names(field_selector="metadata.namespace==default", label_selector="app") == [
        "a",
        "b",
    ]
    for bad in ({"field_selector": "spec.bogus=1"}, {"label_selector": "app in x"}):
        with pytest.raises(ApiException) as err:
            await names(**bad)
        assert err.value.status == 400 and status_of(err.value)["reason"] == "BadRequest"


async def test_list_pagination(kube: FakeKube, api: Any) -> None:
    for i in range(5):
        kube.add_pod(f"p{i}")
    first = await api.list_namespaced_pod("default", limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3
    rest = await api.list_namespaced_pod("default", limit=10, _continue=first.metadata.var_continue)
    assert [p.metadata.name for p in rest.items] == ["p2", "p3", "p4"]
    assert rest.metadata.var_continue is None


# --------------------------------------------------------------------------- watch


async def test_list_then_watch_from_resource_version(kube: FakeKube, api: Any) -> None:
    kube.add_pod("old")
    listed = await api.list_namespaced_pod("default")
    rv = listed.metadata.resource_version

    await api.create_namespaced_pod("default", pod("new"))
    await api.patch_namespaced_pod("new", "default", {"metadata": {"labels": {"v": "1"}}})
    await api.delete_namespaced_pod("old", "default")
    kube.add_namespace("elsewhere")
    kube.add_pod("other-ns", "elsewhere")  # not in this watch's namespace

    w = watch.Watch()
    stream = w.stream(api.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=5)
    events = await collect(stream, 3)
    await w.close()
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "new"),
        ("MODIFIED", "new"),
        ("DELETED", "old"),
    ]
    rvs = [int(e["object"].metadata.resource_version) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    assert events[1]["object"].metadata.labels == {"v": "1"}


async def test_watch_without_resource_version_lists_then_follows(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a")
    kube.add_pod("b")
    w = watch.Watch()
    stream = w.stream(api.list_namespaced_pod, "default", timeout_seconds=5)
    first = await collect(stream, 2)
    assert [(e["type"], e["object"].metadata.name) for e in first] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]
    await api.create_namespaced_pod_binding_without_preload_content(
        "a", "default", binding("a", "n1")
    )
    (ev,) = await collect(stream, 1)
    await w.close()
    assert ev["type"] == "MODIFIED" and ev["object"].spec.node_name == "n1"
    assert w.resource_version == str(kube.resource_version)


async def test_filtered_watch_sees_objects_enter_and_leave(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a")
    w = watch.Watch()
    stream = w.stream(
        api.list_namespaced_pod,
        "default",
        label_selector="gpu=yes",
        resource_version=str(kube.resource_version),
        timeout_seconds=5,
    )
    await api.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"gpu": "yes"}}})
    await api.patch_namespaced_pod("a", "default", {"metadata": {"annotations": {"x": "1"}}})
    await api.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"gpu": "no"}}})
    events = await collect(stream, 3)
    await w.close()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]


async def test_bookmarks_only_when_allowed(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a")
    rv = str(kube.resource_version)
    w = watch.Watch()
    stream = w.stream(
        api.list_namespaced_pod,
        "default",
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=5,
    )
    (bm,) = await collect(stream, 1)
    assert bm["type"] == "BOOKMARK"
    assert bm["raw_object"]["kind"] == "Pod"
    assert bm["raw_object"]["metadata"]["resourceVersion"] == rv
    kube.add_pod("b")
    events = await collect(stream, 2)
    await w.close()
    assert events[0]["type"] == "ADDED"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["raw_object"]["metadata"]["resourceVersion"] == str(kube.resource_version)

    w = watch.Watch()
    plain = [
        e
        async for e in w.stream(
            api.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1
        )
    ]
    await w.close()
    assert [e["type"] for e in plain] == ["ADDED"]  # b, and no bookmarks


async def test_watch_timeout_seconds_is_honoured(kube: FakeKube, api: Any) -> None:
    w = watch.Watch()
    start = time.monotonic()
    events = [e async for e in w.stream(api.list_namespaced_pod, "default", timeout_seconds=1)]
    await w.close()
    assert events == [] and 0.9 <= time.monotonic() - start < 3
    assert kube.watch_count == 0


async def test_compacted_history_gives_410(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a")
    rv = str(kube.resource_version)
    kube.add_pod("b")
    kube.compact()
    w = watch.Watch()
    with pytest.raises(ApiException) as err:
        await collect(
            w.stream(api.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=5), 1
        )
    assert err.value.status == 410 and "too old resource version" in err.value.reason

    # On the wire: HTTP 200, then one ERROR event carrying an Expired Status, then EOF.
    async with aiohttp.ClientSession() as http:
        url = f"{kube.url}/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"
        async with http.get(url) as resp:
            assert resp.status == 200
            lines = (await resp.read()).decode().splitlines()
    assert len(lines) == 1
    ev = json.loads(lines[0])
    assert ev["type"] == "ERROR"
    assert {k: ev["object"][k] for k in ("kind", "status", "reason", "code")} == {
        "kind": "Status",
        "status": "Failure",
        "reason": "Expired",
        "code": 410,
    }
    # Watching from the compaction point itself is still fine.
    w = watch.Watch()
    stream = w.stream(
        api.list_namespaced_pod,
        "default",
        resource_version=str(kube.resource_version),
        timeout_seconds=5,
    )
    kube.add_pod("c")
    (ev2,) = await collect(stream, 1)
    await w.close()
    assert ev2["object"].metadata.name == "c"


async def test_small_history_expires_old_resource_versions() -> None:
    async with FakeKube(history_size=2) as kube:
        api = kube.core_v1()
        rv = str(kube.resource_version)
        for i in range(3):
            kube.add_pod(f"p{i}")
        with pytest.raises(ApiException) as err:
            w = watch.Watch()
            await collect(
                w.stream(
                    api.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=5
                ),
                1,
            )
        assert err.value.status == 410


# --------------------------------------------------------------------------- faults


async def test_fail_next_write(kube: FakeKube, api: Any) -> None:
    await api.create_namespaced_pod("default", pod("a"))
    kube.fail_next("patch", "pods", 409)
    with pytest.raises(ApiException) as err:
        await api.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "1"}}})
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    await api.patch_namespaced_pod(
        "a", "default", {"metadata": {"labels": {"x": "1"}}}
    )  # only once
    assert kube.get("pods", "default", "a")["metadata"]["labels"] == {"x": "1"}

    kube.fail_next("create", "pods/binding", 500, times=2)
    for _ in range(2):
        resp = await api.create_namespaced_pod_binding_without_preload_content(
            "a", "default", binding("a", "n1")
        )
        assert resp.status == 500 and (await resp.json())["reason"] == "InternalError"
    assert "nodeName" not in kube.get("pods", "default", "a")["spec"]
    resp = await api.create_namespaced_pod_binding_without_preload_content(
        "a", "default", binding("a", "n1")
    )
    assert resp.status == 201

    kube.fail_next("patch", "nodes", 503, name="n2")
    kube.add_node("n1")
    kube.add_node("n2")
    await api.patch_node("n1", {"metadata": {"labels": {"ok": "1"}}})  # other name: unaffected
    with pytest.raises(ApiException) as err:
        await api.patch_node("n2", {"metadata": {"labels": {"ok": "1"}}})
    assert err.value.status == 503


async def test_dropped_watch_resumes_from_last_resource_version(kube: FakeKube, api: Any) -> None:
    """Without timeout_seconds the client reconnects after EOF from the last rv it saw."""
    kube.add_pod("a")
    w = watch.Watch()
    stream = w.stream(api.list_namespaced_pod, "default")
    (first,) = await collect(stream, 1)
    assert first["object"].metadata.name == "a"
    assert kube.drop_watches() == 1
    kube.add_pod("b")  # happens while the client is reconnecting
    await api.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "1"}}})
    events = await collect(stream, 2)
    await w.close()
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
    ]
    watches = [r for r in kube.requests if "watch=true" in r.path]
    assert (
        len(watches) == 2
        and f"resourceVersion={first['object'].metadata.resource_version}" in watches[1].path
    )


async def test_aborted_watch_surfaces_an_error(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a")
    w = watch.Watch()
    stream = w.stream(api.list_namespaced_pod, "default", timeout_seconds=5)
    await collect(stream, 1)
    kube.drop_watches(abort=True)
    with pytest.raises(aiohttp.ClientError):
        await collect(stream, 1)


async def test_dropped_watch_after_compaction_gets_410(kube: FakeKube, api: Any) -> None:
    kube.add_pod("a")
    w = watch.Watch()
    stream = w.stream(api.list_namespaced_pod, "default")
    await collect(stream, 1)
    kube.add_namespace("x")  # another kind: the pod watch never sees a newer rv
    kube.compact()
    kube.drop_watches()
    with pytest.raises(ApiException) as err:  # the client retries 410 once, then raises
        await collect(stream, 1)
    assert err.value.status == 410


# --------------------------------------------------------------------------- raw HTTP details


async def test_raw_http_details(kube: FakeKube) -> None:
    kube.add_pod("a")
    base = f"{kube.url}/api/v1/namespaces/default/pods"
    async with aiohttp.ClientSession() as http:
        async with http.patch(
            f"{base}/a", data="{}", headers={"Content-Type": "application/apply-patch+yaml"}
        ) as resp:
            assert resp.status == 415
        uid = kube.get("pods", "default", "a")["metadata"]["uid"]
        async with http.delete(f"{base}/a", json={"preconditions": {"uid": "wrong"}}) as resp:
            assert resp.status == 409 and "Precondition failed" in (await resp.json())["message"]
        async with http.post(
            f"{base}?dryRun=All",
            json={
                "metadata": {"name": "dry"},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        ) as resp:
            assert resp.status == 201
        assert kube.get("pods", "default", "dry") is None
        async with http.post(
            base, json={"metadata": {"name": "bad"}, "spec": {"containers": []}}
        ) as resp:
            body = await resp.json()
            assert (
                resp.status == 422
                and body["message"] == 'Pod "bad" is invalid: spec.containers: Required value'
            )
        big = {"metadata": {"annotations": {"blob": "x" * (256 * 1024)}}}
        async with http.patch(
            f"{base}/a", json=big, headers={"Content-Type": "application/merge-patch+json"}
        ) as resp:
            assert resp.status == 422
        async with http.patch(
            f"{base}/a",
            json={"metadata": {"labels": {"hami.io/vgpu-node": "GPU-a,NVIDIA"}}},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as resp:
            assert resp.status == 422  # commas are not allowed in label values
        async with http.get(f"{kube.url}/api/v1/widgets") as resp:
            assert resp.status == 404
        async with http.delete(f"{base}/a", json={"preconditions": {"uid": uid}}) as resp:
            assert resp.status == 200


async def test_finalizers_delay_deletion(kube: FakeKube, api: Any) -> None:
    p = pod("a")
    p.metadata.finalizers = ["hami.io/cleanup"]
    await api.create_namespaced_pod("default", p)
    w = watch.Watch()
    stream = w.stream(
        api.list_namespaced_pod,
        "default",
        resource_version=str(kube.resource_version),
        timeout_seconds=5,
    )
    out = await api.delete_namespaced_pod("a", "default")
    assert out.metadata.deletion_timestamp is not None
    assert kube.get("pods", "default", "a") is not None
    await api.patch_namespaced_pod(
        "a", "default", [{"op": "remove", "path": "/metadata/finalizers"}]
    )
    events = await collect(stream, 2)
    await w.close()
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert kube.get("pods", "default", "a") is None


async def test_concurrent_clients_see_one_resource_version_sequence(
    kube: FakeKube, api: Any
) -> None:
    await asyncio.gather(*(api.create_namespaced_pod("default", pod(f"p{i}")) for i in range(20)))
    rvs = sorted(int(p["metadata"]["resourceVersion"]) for p in kube.list("pods", "default"))
    assert len(set(rvs)) == 20 and rvs[-1] == kube.resource_version
