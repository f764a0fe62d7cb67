"""OpenTelemetry set-up and W3C trace-context propagation through NATS headers.

Every service calls :func:`setup` once. Spans are exported where ``HAMI_TRACE_EXPORT``
says: ``console`` (stderr), ``memory`` (kept in :data:`MEMORY` for tests), or nowhere
(the default). With no exporter nothing is recorded — a recorded span per decision was
a tenth of placement's CPU — but the trace context still propagates through every
message, and a trace sampled upstream (a client that traces) is recorded here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

MEMORY = InMemorySpanExporter()
_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False
_recording = False  # an exporter is set: every span is recorded


def setup(service: str, mode: str | None = None) -> None:
    """Install the tracer provider once per process; ``mode`` overrides the env."""
    global _configured
    if _configured:
        return
    _configured = True
    global _recording
    mode = os.environ.get("HAMI_TRACE_EXPORT", "") if mode is None else mode
    _recording = mode in ("console", "memory")
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"hami-{service}"}),
        sampler=ParentBased(ALWAYS_ON if _recording else ALWAYS_OFF),
    )
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif mode == "memory":
        provider.add_span_processor(SimpleSpanProcessor(MEMORY))
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def span(tracer: trace.Tracer, name: str) -> AbstractContextManager[trace.Span]:
    """A span around a unit of work, made only when it will be recorded.

    Unrecorded, it would only carry a fresh id downstream; without it the messages
    this work sends carry the incoming context, and the trace stays whole all the same.
    """
    if _recording or trace.get_current_span().get_span_context().trace_flags.sampled:
        return tracer.start_as_current_span(name)
    return nullcontext(trace.INVALID_SPAN)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) of the current span to ``headers``."""
    _PROPAGATOR.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context carried by a message's headers (empty context if none)."""
    return _PROPAGATOR.extract(dict(headers or {}))
