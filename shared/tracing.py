"""OpenTelemetry set-up, messaging spans and W3C trace-context propagation through NATS.

Every process calls :func:`setup` once and :func:`shutdown` when it stops (which flushes
what is still batched). Where spans go is read from the standard environment:

- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, ``none`` (the default), or a comma
  list; ``HAMI_TRACE_EXPORT`` (``console`` | ``memory`` | ``otlp`` | ``none``), when set,
  takes its place (development and tests: ``memory`` keeps spans in :data:`MEMORY`);
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``..._TRACES_PROTOCOL``): ``grpc`` (the default)
  or ``http/protobuf``; the endpoint, headers, timeout and TLS settings
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` ...) are read by the exporters themselves, and the
  batch processor's by itself (``OTEL_BSP_*``);
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` through the SDK's own parsing
  (default ``parentbased_always_on``);
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` for the resource.

Each service's spans carry their own ``service.name`` (``hami-<service>``, or
``OTEL_SERVICE_NAME`` for the service the process is): ``hami up`` runs every service in
one process, and a trace still shows which service did what. A tracer is asked for by
component (``tracer("hami.placement")``); its service is the part after ``hami.``.

With no exporter nothing is recorded and no span object is made (a recorded span per
decision was a tenth of placement's CPU), but the trace context of incoming messages is
still passed on in the messages sent while handling them, so a trace sampled upstream
stays whole through a process that does not export. With an exporter a span whose
parent is not sampled is not made either (the sampler says so once, cheaply). A span
that would start a trace is sampled before it is made: when dropped, only the context
of a new trace marked not sampled is made, which the work's messages carry on, so the
services downstream drop it too. A span with no parent but a sampled link (a batch of
decisions linked to the requests it decided) is recorded, so the link is never to
nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context, trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

log = logging.getLogger("hami.tracing")

MEMORY = InMemorySpanExporter()
_PROPAGATOR = TraceContextTextMapPropagator()
EXPORTERS = ("otlp", "console", "memory", "none")
PROTOCOLS = ("grpc", "http/protobuf")
# How long shutdown waits for the batch to reach the collector.
FLUSH_TIMEOUT_MS = 5000

_configured = False
_recording = False  # an exporter is set: spans are made (and sampled)
# The sampler follows the parent's decision (parentbased_*, the default): within a trace
# not sampled, no span is made at all, not even a non-recording one (at 1 % sampling the
# other 99 % would otherwise pay for three spans per decision).
_follows_parent = False
_process_service = ""
_processors: list[SpanProcessor] = []
_sampler: Sampler = ALWAYS_OFF
_base: Resource = Resource.get_empty()
_providers: dict[str, TracerProvider] = {}
_generation = 0  # bumped by each setup: tracers resolve their provider again
_atexit = False


class _Ids(RandomIdGenerator):
    """Random ids, except that a root's trace id drawn ahead (by :func:`_root`, to
    sample the root before any span is made) is the one its span then takes."""

    def __init__(self) -> None:
        self._ahead = threading.local()

    def ahead(self, trace_id: int) -> None:
        self._ahead.trace_id = trace_id

    def fresh_trace_id(self) -> int:
        """A new random trace id, never the one drawn ahead (which a tracer that made
        no span, a disabled one, may have left unused)."""
        return super().generate_trace_id()

    def generate_trace_id(self) -> int:
        t: int = getattr(self._ahead, "trace_id", 0)
        if t:
            self._ahead.trace_id = 0
            return t
        return super().generate_trace_id()


_IDS = _Ids()
_EMPTY = context.Context()  # a root's parent context
# A trace not sampled, of a random id (W3C level 2; the SDK sets the same flags)
_DROPPED = trace.TraceFlags(trace.TraceFlags.DEFAULT | trace.TraceFlags.RANDOM_TRACE_ID)


class TracingError(ValueError):
    """A tracing setting that cannot be honoured (an unknown exporter or protocol)."""


class _LinkSampled(Sampler):
    """The configured sampler, except that a root span with a sampled link is sampled
    (when the sampler follows parents: the link is then to a trace that is kept).

    A placement batch is a root span linked to the requests it decided; with ratio
    sampling it would otherwise be dropped exactly when one of its requests is kept.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.follow_links = isinstance(inner, ParentBased)

    def should_sample(
        self,
        parent_context: context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if (
            self.follow_links
            and links
            and not trace.get_current_span(parent_context).get_span_context().is_valid
        ):
            if any(link.context.trace_flags.sampled for link in links):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkSampled{{{self.inner.get_description()}}}"


def exporter_names(mode: str | None = None) -> list[str]:
    """The exporters asked for: ``mode``, else ``HAMI_TRACE_EXPORT``, else
    ``OTEL_TRACES_EXPORTER``; ``none`` or nothing is an empty list."""
    if mode is None:
        mode = os.environ.get("HAMI_TRACE_EXPORT") or os.environ.get("OTEL_TRACES_EXPORTER", "")
    names = [n.strip().lower() for n in mode.split(",") if n.strip()]
    for n in names:
        if n not in EXPORTERS:
            raise TracingError(
                f"unknown trace exporter {n!r} (OTEL_TRACES_EXPORTER / HAMI_TRACE_EXPORT: "
                f"one of {', '.join(EXPORTERS)})"
            )
    return [n for n in names if n != "none"]


def otlp_protocol() -> str:
    proto = (
        (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        .strip()
        .lower()
    )
    if proto not in PROTOCOLS:
        raise TracingError(
            f"unknown OTLP protocol {proto!r} (OTEL_EXPORTER_OTLP_PROTOCOL: one of "
            f"{', '.join(PROTOCOLS)})"
        )
    return proto


def _otlp_exporter() -> SpanExporter:
    # Imported only when asked for: gRPC's channel machinery is not loaded otherwise.
    if otlp_protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def _env_sampler() -> Sampler:
    # The SDK's own reading of OTEL_TRACES_SAMPLER / _ARG: a provider made without a
    # sampler takes it from the environment.
    return TracerProvider(shutdown_on_exit=False).sampler


def setup(service: str, mode: str | None = None, *, force: bool = False) -> None:
    """Configure tracing for this process, once (``force``: again, after a
    :func:`shutdown` of the previous set-up; for tests). ``mode`` overrides the env.

    Raises :class:`TracingError` for a setting that cannot be honoured.
    """
    global _configured, _recording, _process_service, _sampler, _base, _generation, _atexit
    global _follows_parent
    if _configured and not force:
        return
    names = exporter_names(mode)
    processors: list[SpanProcessor] = []
    for n in names:
        if n == "otlp":
            processors.append(BatchSpanProcessor(_otlp_exporter()))
        elif n == "console":
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif n == "memory":
            processors.append(SimpleSpanProcessor(MEMORY))
    inner = _env_sampler()
    sampler = _LinkSampled(inner) if processors else ALWAYS_OFF
    if _configured:
        shutdown()
    _configured = True
    _process_service = service
    _processors[:] = processors
    _recording = bool(processors)
    _sampler = sampler
    _follows_parent = isinstance(inner, ParentBased)
    _base = Resource.create({})
    _providers.clear()
    _generation += 1
    if _recording and not _atexit:
        # A process that ends without calling shutdown() still sends its last batch.
        atexit.register(shutdown)
        _atexit = True
    if _recording:
        log.info("tracing: %s, sampler %s", ", ".join(names), sampler.get_description())


def shutdown() -> None:
    """Send what is batched and stop exporting (idempotent). Spans end nowhere after."""
    global _recording
    _recording = False
    procs = list(_processors)
    _processors.clear()
    for p in procs:
        try:
            p.force_flush(FLUSH_TIMEOUT_MS)
            if getattr(p, "span_exporter", None) is not MEMORY:  # kept for the next set-up
                p.shutdown()
        except Exception as exc:  # an unreachable collector must not fail a stop
            log.warning("tracing: cannot flush spans: %s", exc)


def recording() -> bool:
    """True when spans are made (an exporter is configured)."""
    return _recording


def _resource(service: str) -> Resource:
    env_named = SERVICE_NAME in OTELResourceDetector().detect().attributes
    if service == _process_service and env_named:
        return _base  # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES)
    return _base.merge(Resource({SERVICE_NAME: f"hami-{service}"}))


def _provider(service: str) -> TracerProvider:
    p = _providers.get(service)
    if p is None:
        p = TracerProvider(
            resource=_resource(service),
            sampler=_sampler,
            id_generator=_IDS,
            shutdown_on_exit=False,
        )
        for proc in _processors:
            p.add_span_processor(proc)
        _providers[service] = p
    return p


class _Tracer(trace.Tracer):
    """A component's tracer, resolved against the current set-up at use (module-level
    tracers are made at import, before :func:`setup`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.service = name.removeprefix("hami.").split(".")[0] or name
        self._gen = -1
        self._tracer: trace.Tracer = trace.NoOpTracer()

    def _get(self) -> trace.Tracer:
        if self._gen != _generation:
            self._gen = _generation
            self._tracer = _provider(self.service).get_tracer(self.name)
        return self._tracer

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._get().start_span(*args, **kwargs)

    def start_as_current_span(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> AbstractContextManager[trace.Span]:
        return self._get().start_as_current_span(*args, **kwargs)


def tracer(name: str) -> trace.Tracer:
    """The tracer of a component, ``hami.<service>[.<part>]``."""
    return _Tracer(name)


def _unsampled(sc: trace.SpanContext) -> bool:
    """True when a span under ``sc`` would not be sampled anyway (no need to make it)."""
    return _follows_parent and sc.is_valid and not sc.trace_flags.sampled


def _quiet() -> bool:
    """No span is to be made here: no exporter, or within a trace not sampled."""
    return not _recording or _unsampled(trace.get_current_span().get_span_context())


def span(
    tracer: trace.Tracer,
    name: str,
    *,
    links: Sequence[Link] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> AbstractContextManager[trace.Span]:
    """A span around a unit of work, made only when spans are recorded.

    Unrecorded, the messages this work sends carry the incoming context, and the trace
    stays whole all the same.
    """
    if _quiet():
        return nullcontext(trace.INVALID_SPAN)
    dropped = _root(name, kind, links)
    if dropped is not None:
        return _within(dropped)
    return tracer.start_as_current_span(name, links=links, kind=kind)


def start(tracer: trace.Tracer, name: str, *, links: Sequence[Link] | None = None) -> trace.Span:
    """A span under the current context that its caller ends (``span.end()``): for work
    that outlives one block, such as a decision committed with its batch.

    Unrecorded, it is the current span itself (not recording: its ``end`` does
    nothing), so work done under it still sends the incoming trace context on.
    """
    if _quiet():
        return trace.get_current_span()
    dropped = _root(name, SpanKind.INTERNAL, links)
    if dropped is not None:
        return trace.get_current_span(dropped)
    return tracer.start_span(name, links=links)


def _root(name: str, kind: SpanKind, links: Sequence[Link] | None = None) -> context.Context | None:
    """With no span current, a span made now starts a trace: its sampling, decided
    before it is made. ``None`` when there is a current span or the root is sampled
    (the SDK then makes it, under the trace id drawn here); else a context holding a
    non-recording span of a new trace.

    Work under that context carries the trace on, marked not sampled, so no service
    downstream starts (and samples) a trace of its own for it. At 1 % sampling the
    other 99 % come here; the SDK's way of not making a span cost them three times
    as much.
    """
    if trace.get_current_span().get_span_context().is_valid:
        return None
    trace_id = _IDS.fresh_trace_id()
    result = _sampler.should_sample(_EMPTY, trace_id, name, kind, None, links)
    if result.decision is not Decision.DROP:
        _IDS.ahead(trace_id)
        return None
    sc = trace.SpanContext(
        trace_id,
        _IDS.generate_span_id(),
        is_remote=False,
        trace_flags=_DROPPED,
        trace_state=result.trace_state,
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(sc))


# ---------------------------------------------------------------- messaging spans


def destination(subject: str) -> str:
    """The subject without its node or id token (``hami.evt.alloc.decided.node-1`` ->
    ``hami.evt.alloc.decided``): span names stay few whatever the cluster's size."""
    if subject.startswith("hami.evt."):
        return ".".join(subject.split(".")[:4])
    return subject


def _messaging(subject: str, msg_id: str | None, op_type: str, op_name: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": op_type,
        "messaging.operation.name": op_name,
    }
    template = destination(subject)
    if template != subject:
        attrs["messaging.destination.template"] = template
    if msg_id:
        attrs["messaging.message.id"] = msg_id
    return attrs


def publish(
    tracer: trace.Tracer, subject: str, msg_id: str | None = None, *, root: bool = True
) -> AbstractContextManager[trace.Span]:
    """A producer span around sending one message (OpenTelemetry's messaging
    conventions: ``send``); the headers injected inside it make the receiver its child.

    ``root=False``: only within a trace (heartbeats and telemetry are no trace's start).
    """
    if _quiet():
        return nullcontext(trace.INVALID_SPAN)
    if not root and not trace.get_current_span().get_span_context().is_valid:
        return nullcontext(trace.INVALID_SPAN)
    dropped = _root(f"publish {destination(subject)}", SpanKind.PRODUCER)
    if dropped is not None:
        return _within(dropped)
    return _messaging_span(tracer, "publish", subject, msg_id, SpanKind.PRODUCER, None)


@contextmanager
def _messaging_span(
    tracer: trace.Tracer,
    op: str,
    subject: str,
    msg_id: str | None,
    kind: SpanKind,
    ctx: context.Context | None,
) -> Iterator[trace.Span]:
    # The attributes are set once the span is known to be sampled: a root span at a
    # low ratio is mostly not, and building them was a third of its cost.
    with tracer.start_as_current_span(f"{op} {destination(subject)}", context=ctx, kind=kind) as sp:
        if sp.is_recording():
            sp.set_attributes(
                _messaging(subject, msg_id, "send" if op == "publish" else "process", op)
            )
        yield sp


@contextmanager
def _within(ctx: context.Context) -> Iterator[trace.Span]:
    """Work done under ``ctx`` without a span of its own: what it sends carries ``ctx``."""
    token = context.attach(ctx)
    try:
        yield trace.INVALID_SPAN
    finally:
        context.detach(token)


@contextmanager
def receive(
    tracer: trace.Tracer, subject: str, headers: Mapping[str, str] | None, *, root: bool = True
) -> Iterator[trace.Span]:
    """Handle one received message under the trace its headers carry: a consumer span
    (``process``) child of the sender's span when recording, else that context alone.

    ``root=False``: a message that carries no trace gets no span.
    """
    ctx = extract(headers) if headers and "traceparent" in headers else None
    if (
        not _recording
        or (ctx is None and not root)
        or (ctx is not None and _unsampled(trace.get_current_span(ctx).get_span_context()))
    ):
        if ctx is None:
            yield trace.INVALID_SPAN
            return
        with _within(ctx):
            yield trace.INVALID_SPAN
        return
    if ctx is None:
        dropped = _root(f"receive {destination(subject)}", SpanKind.CONSUMER)
        if dropped is not None:
            with _within(dropped):
                yield trace.INVALID_SPAN
            return
    msg_id = headers.get("Nats-Msg-Id") if headers else None
    with _messaging_span(tracer, "receive", subject, msg_id, SpanKind.CONSUMER, ctx) as sp:
        yield sp


# ------------------------------------------------------------------ propagation


def links(headers: Iterable[Mapping[str, str] | None]) -> list[Link]:
    """Links to the sampled traces that messages' headers carry (for a span that
    handles many messages at once)."""
    out: list[Link] = []
    for h in headers:
        if h and "traceparent" in h:
            sc = trace.get_current_span(extract(h)).get_span_context()
            if sc.is_valid and sc.trace_flags.sampled:
                out.append(Link(sc))
    return out


def traceparent() -> str:
    """The W3C ``traceparent`` of the current span ("" outside any trace): trace context
    carried in a stored value rather than a message's headers (a ledger entry)."""
    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


@contextmanager
def resume(
    tracer: trace.Tracer, name: str, traceparent: str, *, start_time: int | None = None
) -> Iterator[trace.Span]:
    """Work done later for the trace that ``traceparent`` names (from :func:`traceparent`,
    through a stored value): a child span of it when recording, else that context alone,
    so what the work publishes still carries the trace. No trace (""): no span.

    ``start_time`` (ns since the epoch): when the work began, for a span opened once it
    is known which traces the work was for.
    """
    ctx = extract({"traceparent": traceparent}) if traceparent else None
    sc = trace.get_current_span(ctx).get_span_context() if ctx is not None else None
    if ctx is None or sc is None or not sc.is_valid:
        yield trace.INVALID_SPAN
        return
    if not _recording or _unsampled(sc):
        with _within(ctx):
            yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(name, context=ctx, start_time=start_time) as sp:
        yield sp


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``) of the current span to ``headers``."""
    _PROPAGATOR.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context carried by a message's headers (empty context if none)."""
    return _PROPAGATOR.extract(dict(headers or {}))
