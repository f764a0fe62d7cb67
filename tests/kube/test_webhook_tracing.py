"""A Kubernetes pod's trace starts at admission: ``webhook.admit`` is its root.

The webhook writes its span's traceparent into the pod it mutates
(``hami.io/trace-context``, only while tracing is on); the Kubernetes binder continues
that trace when it publishes the pod's ``requested``, so placement's decision, the bind
and the node agent's work are one trace with the admission. Checked through the real
OTLP exporter and the in-test receiver (tests/otlp_collector.py), with the webhook's
HTTP server, the fake API server, the binder, placement and a node agent all real. With
tracing off the webhook's answer is exactly HAMi's: no annotation.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.binder.webhook import (
    TRACE_ANNOTATION,
    WebhookServer,
    WebhookSettings,
    review,
)
from shared import tracing
from shared.bus import Bus
from shared.config import Config, NodeSettings
from tests.fakekube import FakeKube
from tests.fakekube.patch import json_patch as apply_patch
from tests.fakekubelet import FakeKubelet
from tests.kube.harness import KubeCluster, gpu_container
from tests.node import test_kube_node as kn
from tests.node.test_kube_node import NODE, RES, make_node, until
from tests.otlp_collector import Collector, Span

pytestmark = pytest.mark.timeout(60)

S = WebhookSettings()
dirs = kn.dirs  # the node-side tests' fixtures: short socket paths, a fake kubelet
kubelet = kn.kubelet
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def pod(
    name: str, *containers: dict[str, Any], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"containers": list(containers)}}


def adm(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "r-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "default",
            "name": p["metadata"]["name"],
            "object": p,
        },
    }


def ops_of(resp: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(base64.b64decode(resp["patch"])) if "patch" in resp else []


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookServer]:
    server = WebhookServer(S, certfile=None, keyfile=None, host="127.0.0.1", port=0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """This process exports to the receiver over HTTP/protobuf; after the test, nothing."""
    with Collector() as c:
        monkeypatch.delenv("HAMI_TRACE_EXPORT", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", c.http_endpoint)
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        tracing.setup("test", force=True)
        try:
            yield c
        finally:
            tracing.shutdown()
            tracing.setup("tests", mode="none", force=True)


async def post(
    server: WebhookServer, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.post(
            f"http://127.0.0.1:{server.port}/mutate", json=body, headers=headers or {}
        ) as r:
            assert r.status == 200
            return await r.json()  # type: ignore[no-any-return]


# ------------------------------------------------------------------ tracing off


async def test_without_tracing_the_answer_is_hamis_and_has_no_annotation(
    webhook: WebhookServer,
) -> None:
    tracing.setup("tests", mode="none", force=True)
    p = pod("p", gpu_container(gpu=1, gpumem=3000), annotations={"team": "a"})
    got = await post(webhook, adm(p))
    # The server adds nothing to what the pure review (HAMi's answer) gives.
    assert got == review(adm(p), S)
    ops = ops_of(got["response"])
    assert ops and not [op for op in ops if op["path"].startswith("/metadata")]
    assert TRACE_ANNOTATION not in apply_patch(p, ops)["metadata"]["annotations"]


# ------------------------------------------------------------------ the patch, pure


@pytest.mark.parametrize("annotations", [None, {}, {"team": "a"}])
def test_a_traced_review_adds_the_annotation_after_hamis_ops(
    annotations: dict[str, str] | None,
) -> None:
    p = pod("p", gpu_container(gpu=1, gpumem=3000), annotations=annotations)
    plain = ops_of(review(adm(p), S)["response"])
    traced = ops_of(review(adm(p), S, trace_context=TP)["response"])
    assert traced[:-1] == plain  # HAMi's patch, then ours
    out = apply_patch(p, traced)
    assert out["metadata"]["annotations"] == {**(annotations or {}), TRACE_ANNOTATION: TP}
    assert out["spec"] == apply_patch(p, plain)["spec"]


def test_only_a_pod_given_cards_carries_the_trace() -> None:
    force = WebhookSettings(node=NodeSettings(gpu_core_policy="force"))
    cpu_only = pod("cpu", {"name": "main", "image": "x", "resources": {"limits": {"cpu": "1"}}})
    resp = review(adm(cpu_only), force, trace_context=TP)["response"]
    assert resp["allowed"] and ops_of(resp)  # mutated (env), but not ours to place
    assert not [op for op in ops_of(resp) if op["path"].startswith("/metadata")]
    privileged = gpu_container(gpu=1)
    privileged["securityContext"] = {"privileged": True}
    resp = review(adm(pod("priv", privileged)), S, trace_context=TP)["response"]
    assert not resp["allowed"] and "patch" not in resp


# ------------------------------------------------------------------ one trace, end to end


def _one(spans: list[Span], name: str, **attrs: Any) -> Span:
    [s] = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())
    ]
    return s


async def test_one_trace_from_admission_to_the_node_agent(
    fake: FakeKube,
    nats_url: str,
    cfg: Config,
    bus: Bus,
    dirs: tuple[Path, Path],
    kubelet: FakeKubelet,
    webhook: WebhookServer,
    otlp: Collector,
) -> None:
    # Placement and the Kubernetes binder (the harness), and one Kubernetes node agent
    # (slice writer and device plugin) under the fake kubelet.
    async with KubeCluster(fake, nats_url, cfg, {}) as kc:
        fake.add_node(NODE)
        node = await make_node(bus, cfg, dirs)
        try:
            placement = kc.placement
            assert placement is not None
            await kc.wait_for(lambda: NODE in placement.cluster.nodes, desc="node known")
            p = pod("traced", gpu_container(gpu=1, gpumem=3000, gpucores=30))
            resp = (await post(webhook, adm(p)))["response"]
            assert resp["allowed"]
            admitted = apply_patch(p, ops_of(resp))
            tp = admitted["metadata"]["annotations"][TRACE_ANNOTATION]
            created = fake.create("pods", admitted, "default")  # as the API server stores it
            uid = created["metadata"]["uid"]
            bound = await kc.wait_bound("default", "traced")
            assert bound["spec"]["nodeName"] == NODE
            assert bound["metadata"]["annotations"][TRACE_ANNOTATION] == tp
            await until(lambda: uid in node.slices.prepared, timeout=10)
            await kubelet.admit_pod(uid, [{RES: 1}])  # the container's creation: Allocate
            # A refused pod: its admission span says why, in error, and nothing follows.
            bad = gpu_container(gpu=1)
            bad["securityContext"] = {"privileged": True}
            assert not (await post(webhook, adm(pod("refused", bad))))["response"]["allowed"]
        finally:
            await node.stop()
    tracing.shutdown()  # flushes the batch
    spans = otlp.spans()

    admit = _one(spans, "webhook.admit", **{"k8s.pod.name": "traced"})
    assert (admit.service, admit.kind, admit.parent_id) == ("hami-binder", "server", "")
    assert admit.attributes["k8s.namespace.name"] == "default"
    assert admit.attributes["hami.admission.allowed"] is True
    assert admit.attributes["hami.admission.patched"] is True
    assert admit.attributes["hami.resources"] == [
        "main nvidia.com/gpu=1",
        "main nvidia.com/gpumem=3000",
        "main nvidia.com/gpucores=30",
    ]
    assert admit.error is None
    # The annotation names the admission span.
    version, tid, sid, flags = tp.split("-")
    assert (version, tid, sid) == ("00", admit.trace_id, admit.span_id)
    assert int(flags, 16) & 1  # sampled

    tr = [x for x in spans if x.trace_id == admit.trace_id]
    by_id = {x.span_id: x for x in tr}
    [root] = [x for x in tr if not x.parent_id]
    assert root is admit
    assert all(x.parent_id in by_id for x in tr if x.parent_id)  # a tree, no orphan

    pod_span = _one(tr, "binder.pod", **{"hami.uid": uid})
    assert pod_span.parent_id == admit.span_id and pod_span.attributes["k8s.pod.name"] == "traced"
    [publish] = [x for x in tr if x.name == "publish hami.evt.alloc.requested"]
    assert publish.parent_id == pod_span.span_id and publish.kind == "producer"
    decide = _one(tr, "placement.decide", **{"hami.uid": uid})
    bind = _one(tr, "binder.bind", **{"hami.uid": uid})
    prepare = _one(tr, "nodeagent.prepare", **{"hami.uid": uid})
    allocate = _one(tr, "nodeagent.allocate", **{"hami.uid": uid})
    for x in (prepare, allocate):
        assert x.parent_id == decide.span_id and x.service == "hami-nodeagent"

    def ancestors(x: Span) -> list[str]:
        out = []
        while x.parent_id:
            x = by_id[x.parent_id]
            out.append(x.name)
        return out

    # Decision and bind descend from the request the binder published for this pod.
    for x in (decide, bind):
        assert (
            "publish hami.evt.alloc.requested" in ancestors(x)
            and ancestors(x)[-1] == "webhook.admit"
        )
    assert {"hami-binder", "hami-placement", "hami-nodeagent"} <= {x.service for x in tr}

    refused = _one(spans, "webhook.admit", **{"k8s.pod.name": "refused"})
    assert refused.attributes["hami.admission.allowed"] is False
    assert refused.attributes["hami.admission.code"] == 403
    assert refused.error == "container main is privileged"
    assert [x for x in spans if x.trace_id == refused.trace_id] == [refused]


async def test_a_sampled_traceparent_from_the_api_server_is_the_parent(
    webhook: WebhookServer, otlp: Collector
) -> None:
    sampled = "00-11111111111111111111111111111111-2222222222222222-01"
    unsampled = "00-33333333333333333333333333333333-4444444444444444-00"
    for name, header in (("a", sampled), ("b", unsampled)):
        p = pod(name, gpu_container(gpu=1))
        resp = (await post(webhook, adm(p), {"traceparent": header}))["response"]
        assert TRACE_ANNOTATION in apply_patch(p, ops_of(resp))["metadata"]["annotations"]
    tracing.shutdown()
    spans = otlp.spans()
    a = _one(spans, "webhook.admit", **{"k8s.pod.name": "a"})
    assert (a.trace_id, a.parent_id) == ("1" * 32, "2" * 16)
    # An unsampled one would silence the pod's trace: the review is a root instead.
    b = _one(spans, "webhook.admit", **{"k8s.pod.name": "b"})
    assert b.parent_id == "" and b.trace_id != "3" * 32
