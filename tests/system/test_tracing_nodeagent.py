"""The node agent's hop in a request's trace: placement -> ledger KV -> node agent.

Placement's decision reaches the node agent as a ledger KV entry, not a message, so the
entry carries the decision's ``traceparent`` (``LedgerAlloc.traceparent``) and the node
agent continues that trace when it prepares the slice and when it releases it. Checked
against the real OTLP exporter and the in-test receiver (tests/otlp_collector.py): one
trace from the client's submit to the node agent's spans, every parent link in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace

from hami.system import System
from shared import subjects, tracing
from shared.bus import Bus
from shared.config import Config
from shared.schemas import (
    AllocRequested,
    ContainerAsk,
    DeviceAsk,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)
from tests.otlp_collector import Collector, Span
from tests.system.test_cli import HAMI, run
from tests.system.test_otlp import check_trace


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c


@pytest.fixture
def otlp(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """This process exports to ``collector`` over HTTP/protobuf; after the test, nothing."""
    monkeypatch.delenv("HAMI_TRACE_EXPORT", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.http_endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    tracing.setup("test", force=True)
    yield collector
    tracing.shutdown()
    tracing.setup("tests", mode="none", force=True)


def _named(spans: list[Span], name: str, uid: str) -> Span:
    [s] = [s for s in spans if s.name == name and s.attributes.get("hami.uid") == uid]
    return s


async def test_one_trace_from_submit_to_the_node_agent(
    nats_url: str, cfg: Config, bus: Bus, otlp: Collector
) -> None:
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["T4:2"], metrics_port=0)
    await s.start()
    try:
        req = SubmitRequest(
            name="traced-node", containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=25)])]
        )
        r = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=10)
        assert r.ok and r.decision is not None, r.error
        node = r.decision.node
        ledger, _ = await bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
        assert ledger is not None
        entry = ledger.allocs[r.uid].traceparent
        # The node agent's span is exported once it has prepared the slice.
        await asyncio.to_thread(
            otlp.wait_for, lambda sp: any(x.name == "nodeagent.prepare" for x in sp)
        )
        rel = await bus.request(
            subjects.API_RELEASE, ReleaseRequest(name="traced-node"), ReleaseReply, timeout=10
        )
        assert rel.ok, rel.error
        await asyncio.to_thread(
            otlp.wait_for, lambda sp: any(x.name == "nodeagent.release" for x in sp)
        )
    finally:
        await s.stop()
    tracing.shutdown()  # flushes the batch
    spans = otlp.spans()

    decide = _named(spans, "placement.decide", r.uid)
    prepare = _named(spans, "nodeagent.prepare", r.uid)
    release = _named(spans, "nodeagent.release", r.uid)
    tr = [x for x in spans if x.trace_id == decide.trace_id]
    by_id = {x.span_id: x for x in tr}

    # One trace, from the client's request to the node agent, and a tree: one root,
    # every parent in it.
    [root] = [x for x in tr if not x.parent_id]
    assert root.name == f"publish {subjects.API_SUBMIT}" and root.service == "hami-test"
    assert all(x.parent_id in by_id for x in tr if x.parent_id)
    assert {"hami-test", "hami-binder", "hami-placement", "hami-metrics", "hami-nodeagent"} <= {
        x.service for x in tr
    }

    # The ledger entry names the decision, and the node agent's spans are its children.
    version, tid, sid, flags = entry.split("-")
    assert (version, tid, sid) == ("00", decide.trace_id, decide.span_id)
    assert int(flags, 16) & 1  # sampled
    for x in (prepare, release):
        assert x.trace_id == decide.trace_id and x.parent_id == decide.span_id
        assert x.service == "hami-nodeagent" and x.kind == "internal"
        assert x.attributes["hami.node"] == node == decide.attributes["hami.node"]
        assert x.attributes["hami.cards"] == decide.attributes["hami.cards"]
        assert x.attributes["hami.slices"] == ["0"]
    # decide's ancestry reaches the client's submit.
    chain, x = [], decide
    while x.parent_id:
        x = by_id[x.parent_id]
        chain.append(x.name)
    assert chain[-1] == f"publish {subjects.API_SUBMIT}" and "binder.submit" in chain
    # The prepared event is published within the prepare span, and its receivers
    # (metrics) continue from there.
    [pub] = [x for x in tr if x.name == "publish hami.evt.alloc.prepared"]
    assert pub.parent_id == prepare.span_id and pub.kind == "producer"
    assert pub.attributes["messaging.message.id"] == f"prepared:{r.uid}:0"
    assert any(x.parent_id == pub.span_id and x.kind == "consumer" for x in tr)


async def test_each_decision_of_a_batch_is_continued_in_its_own_trace(
    nats_url: str, cfg: Config, bus: Bus, otlp: Collector
) -> None:
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["T4:4"], metrics_port=0)
    await s.start()
    placement = s.services[1]
    client = tracing.tracer("hami.test")
    roots: dict[str, int] = {}  # uid -> the trace id its client started
    try:
        async with placement.lock:  # held: the requests queue up, decided in one batch
            for i in range(3):
                req = AllocRequested(
                    uid=f"nb-{i}",
                    name=f"nb-{i}",
                    pending=False,
                    containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=10)])],
                )
                with tracing.span(client, "client.submit") as sp:
                    roots[req.uid] = sp.get_span_context().trace_id
                    await bus.publish_event(subjects.alloc("requested"), req, msg_id=req.uid)
            async with asyncio.timeout(10):
                while placement._sub.queue.qsize() < 2:  # noqa: ASYNC110 - the queue has no event
                    await asyncio.sleep(0.01)
        await asyncio.to_thread(
            otlp.wait_for,
            lambda sp: sum(x.name == "nodeagent.prepare" for x in sp) >= len(roots),
        )
    finally:
        await s.stop()
    tracing.shutdown()
    spans = otlp.spans()
    assert any(x.name == "placement.batch" for x in spans)  # they were decided together
    for uid, tid in roots.items():
        decide = _named(spans, "placement.decide", uid)
        prepare = _named(spans, "nodeagent.prepare", uid)
        assert int(decide.trace_id, 16) == tid
        assert prepare.trace_id == decide.trace_id and prepare.parent_id == decide.span_id


def test_one_hami_submit_under_hami_up_is_one_trace_through_every_service(
    tmp_path: Path, collector: Collector
) -> None:
    """What an operator does: ``hami up`` exporting over OTLP/gRPC by the standard
    environment, one ``hami submit``; its trace holds every service it crossed."""
    env = dict(
        os.environ,
        HAMI_STATE_FILE=str(tmp_path / "state.json"),
        HAMI_LOG_LEVEL="WARNING",
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.grpc_endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",  # spans leave while it runs, not only at its stop
    )
    for k in ("HAMI_NATS_URL", "HAMI_TRACE_EXPORT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        env.pop(k, None)
    proc = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", "2", "--sim-gpus", "T4:2", "--metrics-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "hami is up" in line:
                break
        else:
            raise AssertionError(proc.stderr.read() if proc.stderr else "hami up ended")
        r = run(env, "submit", "traced-up", "--mem-percent", "25", "--json")
        assert r.returncode == 0, r.stderr
        uid = json.loads(r.stdout)["uid"]
        # The node agent prepares the slice on its own time: wait for its span.
        spans = collector.wait_for(
            lambda sp: any(x.name == "nodeagent.prepare" and x.attributes.get("hami.uid") == uid
                           for x in sp)
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    spans = collector.spans()
    check_trace(spans, uid, {"sim-node-0", "sim-node-1"})
    decide = _named(spans, "placement.decide", uid)
    prepare = _named(spans, "nodeagent.prepare", uid)
    assert prepare.trace_id == decide.trace_id and prepare.parent_id == decide.span_id
    services = {x.service for x in spans if x.trace_id == decide.trace_id}
    assert services == {"hami-binder", "hami-placement", "hami-metrics", "hami-nodeagent"}


def test_resume_without_an_exporter_still_passes_the_trace_on() -> None:
    """No exporter here (or a trace not sampled): no span is made, but what the work
    sends carries the stored trace; an entry without one starts nothing."""
    tracing.setup("tests", mode="none", force=True)
    t = tracing.tracer("hami.nodeagent")
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.resume(t, "nodeagent.prepare", stored) as sp:
        assert not sp.is_recording()
        assert tracing.traceparent() == stored
        assert tracing.inject({})["traceparent"] == stored
    assert tracing.traceparent() == ""
    with tracing.resume(t, "nodeagent.prepare", "") as sp:
        assert sp is trace.INVALID_SPAN and tracing.traceparent() == ""
    with tracing.resume(t, "nodeagent.prepare", "not-a-traceparent") as sp:
        assert tracing.traceparent() == ""
