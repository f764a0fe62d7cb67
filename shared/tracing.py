"""OpenTelemetry set-up and W3C trace-context propagation through NATS headers.

Every service calls :func:`setup` once. Spans are exported where ``HAMI_TRACE_EXPORT``
says: ``console`` (stderr), ``memory`` (kept in :data:`MEMORY` for tests), or nowhere
(the default, spans still propagate so a downstream exporter sees whole traces).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

MEMORY = InMemorySpanExporter()
_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False


def setup(service: str, mode: str | None = None) -> None:
    """Install the tracer provider once per process; ``mode`` overrides the env."""
    global _configured
    if _configured:
        return
    _configured = True
    provider = TracerProvider(resource=Resource.create({"service.name": f"hami-{service}"}))
    mode = os.environ.get("HAMI_TRACE_EXPORT", "") if mode is None else mode
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif mode == "memory":
        provider.add_span_processor(SimpleSpanProcessor(MEMORY))
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) of the current span to ``headers``."""
    _PROPAGATOR.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context carried by a message's headers (empty context if none)."""
    return _PROPAGATOR.extract(dict(headers or {}))
