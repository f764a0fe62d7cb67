"""OTLP export against a real receiver: one submit is one trace across the services.

The in-test collector (tests/otlp_collector.py) receives what opentelemetry's own OTLP
exporters send, over gRPC from a real ``hami up`` (configured by nothing but the
standard OTEL_* environment, flushed when it stops), and over HTTP/protobuf from the
services run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hami.system import System
from shared import subjects, tracing
from shared.bus import Bus
from shared.config import Config
from shared.schemas import ContainerAsk, DeviceAsk, SubmitReply, SubmitRequest
from tests.otlp_collector import Collector, Span
from tests.system.test_cli import HAMI, run


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c


@pytest.fixture
def untraced() -> Iterator[None]:
    """Whatever a test configures, the tests after it run without an exporter."""
    yield
    tracing.shutdown()
    tracing.setup("tests", mode="none", force=True)


def one_trace(spans: list[Span], uid: str) -> list[Span]:
    """Every span of the trace holding the decision of ``uid``; exactly one such trace."""
    traces = {s.trace_id for s in spans if s.attributes.get("hami.uid") == uid}
    assert len(traces) == 1, traces
    tid = traces.pop()
    return [s for s in spans if s.trace_id == tid]


def check_trace(spans: list[Span], uid: str, node_names: set[str]) -> None:
    tr = one_trace(spans, uid)
    by_id = {s.span_id: s for s in tr}
    # A tree: one root, every other span's parent is in the trace.
    roots = [s for s in tr if not s.parent_id]
    assert len(roots) == 1, [(s.service, s.name) for s in roots]
    assert all(s.parent_id in by_id for s in tr if s.parent_id)
    [api] = [s for s in tr if s.name == f"receive {subjects.API_SUBMIT}"]
    assert api.service == "hami-binder" and api.kind == "consumer"
    # The root is the binder's, or a traced client's request (the CLI does not trace).
    assert roots[0] is api or (
        roots[0].name == f"publish {subjects.API_SUBMIT}" and by_id[api.parent_id] is roots[0]
    )

    def parent(s: Span) -> Span:
        return by_id[s.parent_id]

    def ancestors(s: Span) -> list[str]:
        out = []
        while s.parent_id:
            s = parent(s)
            out.append(s.name)
        return out

    # Every service the request crossed.
    assert {"hami-binder", "hami-placement", "hami-metrics"} <= {s.service for s in tr}

    # submit -> publish requested -> (placement) receive -> decide -> publish decided
    # -> (binder) receive -> bind -> publish bound.
    [decide] = [s for s in tr if s.name == "placement.decide"]
    assert decide.service == "hami-placement"
    recv = parent(decide)
    assert recv.name == "receive hami.evt.alloc.requested" and recv.kind == "consumer"
    pub = parent(recv)
    assert pub.name == "publish hami.evt.alloc.requested" and pub.service == "hami-binder"
    assert pub.kind == "producer" and parent(pub).name == "binder.submit"
    [bind] = [s for s in tr if s.name == "binder.bind"]
    assert ancestors(bind)[:3] == [
        "receive hami.evt.alloc.decided",
        "publish hami.evt.alloc.decided",
        "placement.decide",
    ]
    assert any(s.name == "publish hami.evt.alloc.bound" and parent(s) is bind for s in tr)
    # metrics follows the events: its receive spans are children of the publishes.
    got = [s for s in tr if s.service == "hami-metrics"]
    assert got and all(parent(s).kind == "producer" for s in got)

    # Messaging conventions on the publish and receive spans.
    for s in (pub, recv):
        a = s.attributes
        assert a["messaging.system"] == "nats"
        assert a["messaging.destination.name"] == "hami.evt.alloc.requested"
        assert a["messaging.message.id"] == f"requested:{uid}"
    assert pub.attributes["messaging.operation.type"] == "send"
    assert recv.attributes["messaging.operation.type"] == "process"
    [dpub] = [s for s in tr if s.name == "publish hami.evt.alloc.decided"]
    assert dpub.attributes["messaging.destination.name"].startswith("hami.evt.alloc.decided.")
    assert dpub.attributes["messaging.destination.template"] == "hami.evt.alloc.decided"

    # The decision says why.
    a = decide.attributes
    assert a["hami.outcome"] == "placed" and a["hami.node"] in node_names
    assert a["hami.policy.node"] == Config().scheduler.node_policy.lower()  # the default
    assert a["hami.request.gpus"] == 1
    assert a["hami.request.mem_percent"] == [25]
    assert len(a["hami.cards"]) == 1 and a["hami.card.mem_mib"][0] > 0
    assert a["hami.ledger.revision"] >= 1
    assert a["hami.nodes.total"] == len(node_names)
    assert a["hami.nodes.candidates"] + a["hami.nodes.rejected"] == len(node_names)
    assert a["hami.decide_ms"] >= 0 and a["hami.commit_ms"] >= 0
    assert "hami.node.score" in a


def test_hami_up_exports_one_trace_over_grpc(tmp_path: Path, collector: Collector) -> None:
    env = dict(
        os.environ,
        HAMI_STATE_FILE=str(tmp_path / "state.json"),
        HAMI_LOG_LEVEL="WARNING",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint,
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=otlp-test",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="1.0",
    )
    for k in ("HAMI_NATS_URL", "HAMI_TRACE_EXPORT"):
        env.pop(k, None)
    proc = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", "2", "--sim-gpus", "T4:2", "--metrics-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "hami is up" in line:
                break
        else:
            raise AssertionError(proc.stderr.read() if proc.stderr else "hami up ended")
        r = run(env, "submit", "traced", "--mem-percent", "25", "--json")
        assert r.returncode == 0, r.stderr
        uid = json.loads(r.stdout)["uid"]
    finally:
        proc.send_signal(signal.SIGINT)  # its shutdown flushes the batch
        proc.wait(30)
    spans = collector.wait_for(lambda sp: any(s.attributes.get("hami.uid") == uid for s in sp))
    assert {p for p, _ in collector.requests} == {"grpc"}
    check_trace(spans, uid, {"sim-node-0", "sim-node-1"})
    svc = {s.service: s.resource for s in spans}
    assert svc["hami-placement"]["deployment.environment"] == "otlp-test"


async def test_services_export_over_http_protobuf(
    nats_url: str,
    cfg: Config,
    bus: Bus,
    collector: Collector,
    untraced: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HAMI_TRACE_EXPORT", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.http_endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "otlp-tests")
    tracing.setup("test", force=True)  # the process is the "test" bus's service
    s = System(cfg, nats_url=nats_url, sim_nodes=3, sim_gpus=["T4:2"], metrics_port=0)
    await s.start()
    try:
        req = SubmitRequest(
            name="traced-http", containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=25)])]
        )
        r = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=10)
        assert r.ok
        # A request that fits nowhere: its decision span says why, with counts.
        big = SubmitRequest(
            name="too-big",
            wait=False,
            containers=[ContainerAsk(devices=[DeviceAsk(nums=3, mem_percent=10)])],
        )
        f = await bus.request(subjects.API_SUBMIT, big, SubmitReply, timeout=10)
        assert not f.ok and f.failure is not None
    finally:
        await s.stop()
    tracing.shutdown()  # flushes the batch
    spans = collector.spans()
    assert {p for p, _ in collector.requests} == {"http/protobuf"}
    check_trace(spans, r.uid, {"sim-node-0", "sim-node-1", "sim-node-2"})
    [failed] = [
        x for x in spans if x.name == "placement.decide" and x.attributes.get("hami.uid") == f.uid
    ]
    a = failed.attributes
    assert a["hami.outcome"] == "failed" and a["hami.nodes.total"] == 3
    assert (
        dict(zip(a["hami.rejected.reasons"], a["hami.rejected.counts"], strict=True))
        == f.failure.reasons
    )
    assert a["hami.failure.message"] == f.failure.message
    # OTEL_SERVICE_NAME names the process's own service (the client's bus here); the
    # services it runs in-process keep their own names.
    [client] = [x for x in one_trace(spans, r.uid) if not x.parent_id]
    assert client.service == "otlp-tests" and client.name == f"publish {subjects.API_SUBMIT}"
