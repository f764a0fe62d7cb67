"""An OTLP trace receiver for tests: what the real exporters send, as they send it.

Two endpoints on free ports, each on its own thread (an exporter flushes synchronously,
possibly from the event loop's own thread at shutdown, so the receiver must not need
that loop):

- gRPC: opentelemetry-proto's ``TraceService`` on a grpcio server;
- HTTP/protobuf: ``POST /v1/traces`` on an aiohttp server.

Both keep every ``ExportTraceServiceRequest`` and answer success. :meth:`Collector.spans`
flattens them into :class:`Span` records with their service and decoded attributes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

KINDS = {
    PbSpan.SPAN_KIND_INTERNAL: "internal",
    PbSpan.SPAN_KIND_SERVER: "server",
    PbSpan.SPAN_KIND_CLIENT: "client",
    PbSpan.SPAN_KIND_PRODUCER: "producer",
    PbSpan.SPAN_KIND_CONSUMER: "consumer",
}


def value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attrs(v.kvlist_value.values)
    return getattr(v, which) if which else None


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        assert isinstance(kv, KeyValue)
        out[kv.key] = value(kv.value)
    return out


@dataclass
class Span:
    service: str
    resource: dict[str, Any]
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    attributes: dict[str, Any]
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    duration_ns: int = 0
    error: str | None = None  # the status message of a span whose status is ERROR


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, col: Collector) -> None:
        self.col = col

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's name
        self.col._add(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Collector:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []  # (protocol, ExportTraceServiceRequest)
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _add(self, req: Any, protocol: str) -> None:
        with self._lock:
            self.requests.append((protocol, req))

    async def _on_http(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text=f"unsupported {request.content_type}")
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        self._add(req, "http/protobuf")
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def start(self) -> Collector:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Service(self), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self.http_port = _free_port()
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/v1/traces", self._on_http)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.http_port).start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="otlp-http", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the OTLP HTTP receiver did not start")
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self) -> list[Span]:
        out: list[Span] = []
        with self._lock:
            reqs = list(self.requests)
        for _, req in reqs:
            for rs in req.resource_spans:
                res = attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        out.append(
                            Span(
                                service=str(res.get("service.name", "")),
                                resource=res,
                                name=sp.name,
                                kind=KINDS.get(sp.kind, str(sp.kind)),
                                trace_id=sp.trace_id.hex(),
                                span_id=sp.span_id.hex(),
                                parent_id=sp.parent_span_id.hex(),
                                attributes=attrs(sp.attributes),
                                links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in sp.links],
                                duration_ns=sp.end_time_unix_nano - sp.start_time_unix_nano,
                                error=sp.status.message
                                if sp.status.code == sp.status.STATUS_CODE_ERROR
                                else None,
                            )
                        )
        return out

    def wait_for(self, pred: Any, timeout: float = 15.0) -> list[Span]:
        """The spans, once ``pred(spans)`` holds (polled; the exporters batch)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if pred(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)
