"""shared.tracing: spans only where an exporter takes them, the context propagates
regardless; messaging spans, sampling from the environment, per-service resources."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from shared import tracing

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
OTEL_VARS = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "HAMI_TRACE_EXPORT",
)


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in OTEL_VARS:
        monkeypatch.delenv(k, raising=False)
    tracing.MEMORY.clear()
    yield
    tracing.shutdown()
    tracing.setup("tests", mode="none", force=True)
    tracing.MEMORY.clear()


def memory(service: str = "tests") -> None:
    tracing.setup(service, mode="memory", force=True)


def test_without_an_exporter_no_span_is_made_and_the_incoming_trace_passes_on() -> None:
    tracing.setup("tests", mode="none", force=True)
    tr = tracing.tracer("hami.tests")
    for incoming in (SAMPLED, UNSAMPLED):
        with tracing.receive(tr, "hami.evt.alloc.requested", {"traceparent": incoming}) as sp:
            assert sp is trace.INVALID_SPAN
            with tracing.span(tr, "work") as inner, tracing.publish(tr, "x.y") as pub:
                assert inner is trace.INVALID_SPAN and pub is trace.INVALID_SPAN
                inner.set_attribute("k", "v")  # harmless
                # what this process sends carries the trace it received, unchanged
                assert tracing.inject({})["traceparent"] == incoming
        assert "traceparent" not in tracing.inject({})  # detached again
        with tracing.receive(tr, "hami.evt.alloc.requested", {"traceparent": incoming}):
            # a span its caller ends later is the incoming one: what is sent under it
            # still carries the trace
            held = tracing.start(tr, "open")
            assert not held.is_recording()
            with trace.use_span(held, end_on_exit=False):
                assert tracing.inject({})["traceparent"] == incoming
            held.end()  # harmless
    assert not tracing.recording()


def test_receive_and_publish_spans_follow_the_messaging_conventions() -> None:
    memory()
    tr = tracing.tracer("hami.tests")
    hdrs = {"traceparent": SAMPLED, "Nats-Msg-Id": "requested:u1"}
    with tracing.receive(tr, "hami.evt.alloc.requested", hdrs) as recv:
        with tracing.publish(tr, "hami.evt.alloc.decided.node-1", "decided:u1") as pub:
            sent = tracing.inject({})["traceparent"]
    spans = {s.name: s for s in tracing.MEMORY.get_finished_spans()}
    r, p = spans["receive hami.evt.alloc.requested"], spans["publish hami.evt.alloc.decided"]
    assert r.kind == SpanKind.CONSUMER and p.kind == SpanKind.PRODUCER
    assert r.context.trace_id == TRACE_ID and r.parent is not None
    assert r.parent.span_id == 0xB7AD6B7169203331 and r.parent.is_remote
    assert p.parent is not None and p.parent.span_id == recv.get_span_context().span_id
    # the message sent names the publish span as its parent
    assert sent == f"00-{TRACE_ID:032x}-{pub.get_span_context().span_id:016x}-01"
    assert dict(r.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.destination.name": "hami.evt.alloc.requested",
        "messaging.operation.type": "process",
        "messaging.operation.name": "receive",
        "messaging.message.id": "requested:u1",
    }
    pa = dict(p.attributes or {})
    assert pa["messaging.operation.type"] == "send" and pa["messaging.message.id"] == "decided:u1"
    assert pa["messaging.destination.name"] == "hami.evt.alloc.decided.node-1"
    assert pa["messaging.destination.template"] == "hami.evt.alloc.decided"


def test_heartbeats_start_no_trace() -> None:
    memory()
    tr = tracing.tracer("hami.tests")
    with tracing.publish(tr, "hami.hb.node-1", root=False) as p:
        assert p is trace.INVALID_SPAN
    with tracing.receive(tr, "hami.hb.node-1", {}, root=False) as r:
        assert r is trace.INVALID_SPAN
    with tracing.receive(tr, "hami.evt.alloc.bound.n", {"traceparent": SAMPLED}, root=False) as r:
        assert r.is_recording()  # within a trace: a span
    assert [s.name for s in tracing.MEMORY.get_finished_spans()] == ["receive hami.evt.alloc.bound"]


def test_the_sampler_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    memory()
    tr = tracing.tracer("hami.tests")
    with tracing.span(tr, "root") as sp:
        assert not sp.is_recording()  # ratio 0: a new trace is never kept
        flags = int(tracing.inject({})["traceparent"].rsplit("-", 1)[1], 16)
        assert not flags & 1  # ...and says so downstream
    with tracing.receive(tr, "hami.evt.alloc.requested", {"traceparent": SAMPLED}) as sp:
        assert sp.is_recording()  # a sampled parent is followed
    with tracing.receive(tr, "hami.evt.alloc.requested", {"traceparent": UNSAMPLED}) as sp:
        # within a trace not sampled no span is made at all (not even a non-recording
        # one, which costs as much to start), and the trace goes on unchanged
        assert sp is trace.INVALID_SPAN
        assert tracing.inject({})["traceparent"] == UNSAMPLED
        with tracing.span(tr, "work") as inner, tracing.publish(tr, "hami.evt.x") as pub:
            assert inner is trace.INVALID_SPAN and pub is trace.INVALID_SPAN
    # A root span linked to a sampled trace is kept (a batch of decisions).
    links = tracing.links([{"traceparent": UNSAMPLED}, {}, {"traceparent": SAMPLED}, None])
    assert [ln.context.trace_id for ln in links] == [TRACE_ID]
    sp = tracing.start(tr, "batch", links=links)
    assert sp.is_recording()
    sp.end()
    sp = tracing.start(tr, "batch", links=[Link(trace.INVALID_SPAN_CONTEXT)])
    assert not sp.is_recording()


def test_a_ratio_samples_roots_at_that_ratio_and_a_dropped_root_still_passes_a_trace_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A root's sampling is decided before its span is made (a dropped root makes none);
    # a kept one must then be made under the very trace id that was sampled, or the
    # SDK would sample a second id and keep a quarter, not a half.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    memory()
    tr = tracing.tracer("hami.tests")
    bound = round(0.5 * (1 << 64))
    sent: list[str] = []
    n = 2000
    for i in range(n // 4):
        with tracing.receive(tr, "hami.evt.alloc.requested", {"Nats-Msg-Id": f"r{i}"}):
            sent.append(tracing.inject({})["traceparent"])
        with tracing.publish(tr, "hami.evt.alloc.requested", f"p{i}"):
            sent.append(tracing.inject({})["traceparent"])
        with tracing.span(tr, "root"):
            sent.append(tracing.inject({})["traceparent"])
        held = tracing.start(tr, "held")
        with trace.use_span(held, end_on_exit=False):
            sent.append(tracing.inject({})["traceparent"])
        held.end()
    kept = [t for t in sent if t.endswith("-01") or t.endswith("-03")]
    assert 0.42 * n < len(kept) < 0.58 * n  # a binomial(2000, 0.5) is ~1000 +- 22
    ids = [int(t.split("-")[1], 16) for t in sent]
    assert len(set(ids)) == n  # each root a trace of its own, kept or not
    recorded = {s.context.trace_id for s in tracing.MEMORY.get_finished_spans()}
    assert recorded == {int(t.split("-")[1], 16) for t in kept}
    # every kept id is one the ratio keeps, every dropped one one it drops
    assert all((i & ((1 << 64) - 1) < bound) == (t in kept) for i, t in zip(ids, sent, strict=True))
    # what a dropped root sends says "not sampled", so downstream drops it too
    assert all(int(t.rsplit("-", 1)[1], 16) & 1 == 0 for t in sent if t not in kept)


def test_a_sampler_that_ignores_parents_ignores_links_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    memory()
    tr = tracing.tracer("hami.tests")
    sp = tracing.start(tr, "batch", links=tracing.links([{"traceparent": SAMPLED}]))
    assert not sp.is_recording()


def test_each_service_names_its_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-scheduler")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=x")
    memory("placement")
    for component in ("hami.placement", "hami.binder"):
        with tracing.span(tracing.tracer(component), "work"):
            pass
    res = {
        s.instrumentation_scope.name if s.instrumentation_scope else "": s.resource.attributes
        for s in tracing.MEMORY.get_finished_spans()
    }
    # OTEL_SERVICE_NAME names the process's own service, over OTEL_RESOURCE_ATTRIBUTES;
    # another service run in the same process (hami up) keeps its own name.
    assert res["hami.placement"]["service.name"] == "my-scheduler"
    assert res["hami.binder"]["service.name"] == "hami-binder"
    assert all(r["deployment.environment"] == "prod" for r in res.values())


def test_exporter_and_protocol_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
    assert tracing.exporter_names() == ["otlp", "console"]
    monkeypatch.setenv("HAMI_TRACE_EXPORT", "memory")  # ours, for development, wins
    assert tracing.exporter_names() == ["memory"]
    monkeypatch.setenv("HAMI_TRACE_EXPORT", "none")
    assert tracing.exporter_names() == []
    with pytest.raises(tracing.TracingError, match="zipkin"):
        tracing.exporter_names("zipkin")
    assert tracing.otlp_protocol() == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert tracing.otlp_protocol() == "http/protobuf"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(tracing.TracingError, match="http/json"):
        tracing.setup("tests", mode="otlp", force=True)
    assert not tracing.recording()  # a refused set-up changes nothing


def test_shutdown_sends_what_is_batched_and_stops_recording() -> None:
    memory()
    with tracing.span(tracing.tracer("hami.tests"), "last"):
        pass
    tracing.shutdown()
    assert [s.name for s in tracing.MEMORY.get_finished_spans()] == ["last"]
    assert not tracing.recording()
    with tracing.span(tracing.tracer("hami.tests"), "after") as sp:
        assert sp is trace.INVALID_SPAN
    tracing.shutdown()  # twice is harmless
