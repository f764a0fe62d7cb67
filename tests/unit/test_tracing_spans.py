"""tracing.span: spans only where they are recorded; the context propagates regardless."""

from __future__ import annotations

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from shared import tracing

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def no_exporter(monkeypatch: pytest.MonkeyPatch) -> trace.Tracer:
    """A tracer as setup() makes it without an exporter (a local provider: the global
    one is set once per process, by whichever test came first)."""
    monkeypatch.setattr(tracing, "_recording", False)
    return TracerProvider(sampler=ParentBased(ALWAYS_OFF)).get_tracer("tests")


def test_unsampled_work_makes_no_span_and_passes_the_incoming_context_on(
    no_exporter: trace.Tracer,
) -> None:
    token = context.attach(tracing.extract({"traceparent": UNSAMPLED}))
    try:
        with tracing.span(no_exporter, "work") as span:
            assert span is trace.INVALID_SPAN
            span.set_attribute("k", "v")  # harmless
            assert tracing.inject({})["traceparent"] == UNSAMPLED  # the trace continues
    finally:
        context.detach(token)


def test_a_trace_sampled_upstream_is_recorded(no_exporter: trace.Tracer) -> None:
    token = context.attach(tracing.extract({"traceparent": SAMPLED}))
    try:
        with tracing.span(no_exporter, "work") as span:
            assert span.is_recording()
            out = tracing.inject({})["traceparent"]
            assert out.startswith("00-0af7651916cd43dd8448eb211c80319c-")  # same trace
            assert out != SAMPLED  # ... under this span
    finally:
        context.detach(token)


def test_with_an_exporter_every_unit_of_work_is_a_span(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_recording", True)
    tracer = TracerProvider(sampler=ParentBased(ALWAYS_ON)).get_tracer("tests")
    with tracing.span(tracer, "work") as span:
        assert span.is_recording()
