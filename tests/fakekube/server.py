"""HTTP front of the fake API server, and ``FakeKube``, the handle tests hold.

``FakeKube`` serves the Kubernetes REST paths we use on 127.0.0.1 (a free port) with
aiohttp, so the real ``kubernetes.aio`` client talks to it unchanged::

    async with FakeKube() as kube:
        api = kube.core_v1()                       # kubernetes.aio CoreV1Api
        kube.add_node("n1", capacity={"nvidia.com/gpu": "4"})
        await api.create_namespaced_pod("default", pod)
        assert kube.get("pods", "default", "p")["spec"]["nodeName"] == ...
        kube.fail_next("patch", "pods", 409)       # next PATCH of a pod -> 409 Conflict
        kube.drop_watches()                        # every open watch stream ends now
        kube.compact()                             # watches from older rvs get 410
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from . import errors
from .errors import ApiError
from .patch import APPLY_YAML, JSONPATCH, MERGEPATCH, STRATEGIC
from .resources import BY_PATH, Obj, Resource, lookup
from .selectors import SelectorError, parse_field_selector, parse_label_selector
from .store import ABORT, CLOSE, Fault, Store, Watcher

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
PATCH_TYPES = (JSONPATCH, MERGEPATCH, STRATEGIC)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # path and query string
    content_type: str


@dataclass(frozen=True)
class Target:
    """What a request path names."""

    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None


def _not_found_path() -> ApiError:
    return ApiError(
        errors.status_body(404, "NotFound", "the server could not find the requested resource", {})
    )


def parse_path(path: str) -> Target | None:
    """Map a REST path to a Target, or None for a bindings collection POST target."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise _not_found_path()
    namespace: str | None = None
    if (
        len(rest) >= 3
        and rest[0] == "namespaces"
        and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
    ):
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        raise _not_found_path()
    if group == "" and rest[0] == "bindings" and namespace is not None and len(rest) == 1:
        return None
    res = BY_PATH.get((group, version, rest[0]))
    if res is None or (namespace is not None and not res.namespaced):
        raise _not_found_path()
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and sub not in res.subresources:
        raise _not_found_path()
    return Target(res, namespace, name, sub)


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(body), status=status, content_type="application/json")


class FakeKube:
    """A faithful-enough Kubernetes API server for tests and benchmarks.

    ``bookmark_interval``: seconds between BOOKMARK events on watches that allow them
    (the real server sends one about every minute).  ``history_size``: changes kept for
    watches resuming from a resourceVersion; older ones get 410 Expired.
    ``auto_create_namespaces``: create a missing namespace on first use instead of
    answering 404 like the real NamespaceLifecycle admission.
    """

    def __init__(
        self,
        *,
        bookmark_interval: float = 1.0,
        history_size: int = 1000,
        auto_create_namespaces: bool = False,
        namespaces: tuple[str, ...] = DEFAULT_NAMESPACES,
    ) -> None:
        self.store = Store(history_size)
        self.store.auto_namespaces = auto_create_namespaces
        self.bookmark_interval = bookmark_interval
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)  # newest last
        self._runner: web.AppRunner | None = None
        self._clients: list[Any] = []
        self.port = 0
        for ns in namespaces:
            self.create("namespaces", {"metadata": {"name": ns}})

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeKube:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self.store.drop_watches(CLOSE)
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeKube:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ clients

    def configuration(self) -> Any:
        """A ``kubernetes.aio`` Configuration pointing here (plain HTTP, no auth)."""
        from kubernetes.aio import client

        config = client.Configuration(host=self.url)
        # Proxies from the environment must not capture 127.0.0.1.
        config.client_session_kwargs = {"trust_env": False}
        return config

    def api_client(self) -> Any:
        """A new ``kubernetes.aio`` ApiClient; closed by ``stop()``."""
        from kubernetes.aio import client

        api = client.ApiClient(self.configuration())
        self._clients.append(api)
        return api

    def core_v1(self) -> Any:
        from kubernetes.aio import client

        return client.CoreV1Api(self.api_client())

    def events_v1(self) -> Any:
        from kubernetes.aio import client

        return client.EventsV1Api(self.api_client())

    # ------------------------------------------------------------------ direct store access

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        return self.store.rv

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of the stored object, or None.  ``resource``: "pods", "nodes", ..."""
        try:
            return self.store.get(lookup(resource), namespace, name)
        except ApiError:
            return None

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[Obj]:
        res = lookup(resource)
        return self.store.list_views(
            res,
            namespace,
            parse_label_selector(label_selector),
            parse_field_selector(field_selector, res.supports_field),
        )

    def create(self, resource: str, obj: Obj, namespace: str | None = None) -> Obj:
        """Create as a client would (defaulting, events to watchers); raises ApiError."""
        res = lookup(resource)
        ns = (namespace or obj.get("metadata", {}).get("namespace")) if res.namespaced else None
        return self.store.create(res, ns, obj)

    def update(self, resource: str, obj: Obj, subresource: str | None = None) -> Obj:
        res = lookup(resource)
        meta = obj["metadata"]
        return self.store.update(res, meta.get("namespace"), meta["name"], obj, subresource)[0]

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        content_type: str = STRATEGIC,
        subresource: str | None = None,
    ) -> Obj:
        return self.store.patch(lookup(resource), namespace, name, content_type, patch, subresource)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        self.store.delete(lookup(resource), namespace, name)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> Obj:
        return self.create("namespaces", {"metadata": {"name": name, "labels": dict(labels or {})}})

    def add_node(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        capacity: dict[str, str] | None = None,
        allocatable: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Obj:
        """Register a node the way a kubelet would (status included)."""
        capacity = dict(capacity or {"cpu": "8", "memory": "32Gi", "pods": "110"})
        node = {
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    **(labels or {}),
                },
                "annotations": dict(annotations or {}),
            },
            "spec": {},
            "status": {
                "capacity": capacity,
                "allocatable": dict(allocatable or capacity),
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "KubeletReady",
                    }
                ],
                "addresses": [{"type": "Hostname", "address": name}],
            },
        }
        return self.create("nodes", node)

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        containers: builtins.list[Obj] | None = None,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        scheduler_name: str | None = None,
        node_name: str | None = None,
    ) -> Obj:
        spec: Obj = {"containers": containers or [{"name": "main", "image": "busybox:1.36"}]}
        if scheduler_name:
            spec["schedulerName"] = scheduler_name
        if node_name:
            spec["nodeName"] = node_name
        pod = {
            "metadata": {
                "name": name,
                "labels": dict(labels or {}),
                "annotations": dict(annotations or {}),
            },
            "spec": spec,
        }
        return self.create("pods", pod, namespace)

    # ------------------------------------------------------------------ faults

    def fail_next(
        self,
        verb: str,
        resource: str,
        code: int = 500,
        *,
        times: int = 1,
        name: str | None = None,
        namespace: str | None = None,
        message: str | None = None,
    ) -> None:
        """Fail the next ``times`` matching HTTP requests with ``code`` (a real-shaped Status).

        ``verb``: create, update, patch, delete, deletecollection, get, list or "*".
        ``resource``: "pods", "pods/status", "pods/binding", "nodes", "nodes/status",
        "events", "events.events.k8s.io", ... or "*".  A binding is a create of
        "pods/binding".  409 gives the stale-write Conflict, 404 a NotFound.
        """
        self.store.faults.append(Fault(verb, resource, code, times, name, namespace, message))

    def drop_watches(self, *, abort: bool = False) -> int:
        """End every open watch: cleanly (as on a server timeout) or by cutting the
        connection mid-stream (``abort=True``).  Returns how many were open."""
        return self.store.drop_watches(ABORT if abort else CLOSE)

    def compact(self, rv: int | None = None) -> None:
        """Forget watch history up to ``rv`` (default: now); older watches get 410."""
        self.store.compact(rv)

    @property
    def watch_count(self) -> int:
        return len(self.store.watchers)

    # ------------------------------------------------------------------ HTTP

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(RequestRecord(request.method, request.path_qs, request.content_type))
        try:
            if request.path in ("/healthz", "/readyz", "/livez"):
                return web.Response(text="ok")
            if request.path == "/version":
                return _json(
                    {
                        "major": "1",
                        "minor": "34",
                        "gitVersion": "v1.34.0-fakekube",
                        "platform": "linux/amd64",
                    }
                )
            if request.path == "/api":
                return _json(
                    {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
                )
            target = parse_path(request.path)
            return await self._serve(request, target)
        except ApiError as exc:
            return _json(exc.body, exc.code)
        except SelectorError as exc:
            return _json(errors.status_body(400, "BadRequest", str(exc)), 400)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return _dec.decode(raw) if raw else None
        except ValueError as exc:  # msgspec.DecodeError is one
            raise errors.bad_request(f"error decoding request body: {exc}") from None

    def _fault(self, verb: str, target: Target, name: str | None = None) -> None:
        resource = target.resource.qualified + (
            f"/{target.subresource}" if target.subresource else ""
        )
        err = self.store.take_fault(verb, resource, target.namespace, name or target.name)
        if err is not None:
            raise err

    async def _serve(self, request: web.Request, target: Target | None) -> web.StreamResponse:
        method, query = request.method, request.query
        dry_run = query.get("dryRun") == "All"
        if target is None:  # POST /api/v1/namespaces/{ns}/bindings
            if method != "POST":
                raise ApiError(
                    errors.status_body(
                        405,
                        "MethodNotAllowed",
                        "the server does not allow this method on the requested resource",
                    )
                )
            body = await self._body(request)
            bns = request.path.split("/")[4]
            bname: str = ((body or {}).get("metadata") or {}).get("name") or ""
            self._fault("create", Target(lookup("pods"), bns, bname, "binding"))
            return _json(self.store.bind(bns, bname, body), 201)
        res, ns, name, sub = target.resource, target.namespace, target.name, target.subresource
        if name is None:
            if method == "GET":
                if _truthy(query.get("watch")):
                    return await self._watch(request, target)
                self._fault("list", target)
                return _json(self._list(target, query))
            if method == "POST" and (ns is not None or not res.namespaced):
                body = await self._body(request)
                self._fault("create", target, ((body or {}).get("metadata") or {}).get("name"))
                return _json(self.store.create(res, ns, body, dry_run=dry_run), 201)
            if method == "DELETE" and (ns is not None or not res.namespaced):
                self._fault("deletecollection", target)
                return _json(self._delete_collection(target, query, dry_run))
            raise ApiError(
                errors.status_body(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            )
        if sub == "binding":
            if method != "POST":
                raise _not_found_path()
            body = await self._body(request)
            self._fault("create", target)
            return _json(self.store.bind(ns or "", name, body), 201)
        if sub == "eviction":
            if method != "POST":
                raise _not_found_path()
            body = await self._body(request)
            self._fault("create", target)
            return _json(self.store.evict(ns or "", name, body, dry_run=dry_run), 201)
        if method == "GET":
            self._fault("get", target)
            return _json(self.store.get(res, ns, name))
        if method == "PUT":
            body = await self._body(request)
            self._fault("update", target)
            obj, created = self.store.update(res, ns, name, body, sub, dry_run=dry_run)
            return _json(obj, 201 if created else 200)
        if method == "PATCH":
            ctype = request.content_type
            if ctype not in PATCH_TYPES:
                why = (
                    "server-side apply is not implemented by fakekube"
                    if ctype == APPLY_YAML
                    else f"the body of the request was in an unknown format - accepted media types include: {', '.join(PATCH_TYPES)}"
                )
                raise ApiError(errors.status_body(415, "UnsupportedMediaType", why))
            body = await self._body(request)
            self._fault("patch", target)
            return _json(self.store.patch(res, ns, name, ctype, body, sub, dry_run=dry_run))
        if method == "DELETE" and sub is None:
            body = await self._body(request)
            self._fault("delete", target)
            return _json(self.store.delete(res, ns, name, body, dry_run=dry_run))
        raise ApiError(
            errors.status_body(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        )

    def _selectors(self, res: Resource, query: Any) -> tuple[Any, Any]:
        return (
            parse_label_selector(query.get("labelSelector")),
            parse_field_selector(query.get("fieldSelector"), res.supports_field),
        )

    def _list(self, target: Target, query: Any) -> Obj:
        res = target.resource
        labels, fields = self._selectors(res, query)
        items = self.store.list_views(res, target.namespace, labels, fields)
        for item in items:  # list items carry no kind/apiVersion, as in the real server
            item.pop("kind", None)
            item.pop("apiVersion", None)
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        token = query.get("continue")
        if token:
            try:
                start = json.loads(base64.urlsafe_b64decode(token))["start"]
            except (ValueError, KeyError, TypeError):
                raise errors.bad_request("continue key is not valid") from None
            items = [
                i
                for i in items
                if [i["metadata"].get("namespace", ""), i["metadata"]["name"]] > start
            ]
        limit = int(query.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            key = [last.get("namespace", ""), last["name"]]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"start": key}).encode()
            ).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": items,
        }

    def _delete_collection(self, target: Target, query: Any, dry_run: bool) -> Obj:
        res = target.resource
        labels, fields = self._selectors(res, query)
        deleted = []
        for obj in self.store.select(res, target.namespace, labels, fields):
            meta = obj["metadata"]
            out = self.store.delete(res, meta.get("namespace"), meta["name"], dry_run=dry_run)
            if out.get("kind") != "Status":
                deleted.append(out)
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": deleted,
        }

    async def _watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        res, query = target.resource, request.query
        labels, fields = self._selectors(res, query)
        w = self.store.watch(res, target.namespace, query.get("resourceVersion"), labels, fields)
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        if bookmarks and _truthy(query.get("sendInitialEvents")):
            w.queue.put_nowait(self._bookmark(res, {"k8s.io/initial-events-end": "true"}))
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            await self._pump(request, resp, w, timeout, bookmarks)
        finally:
            self.store.unwatch(w)
        return resp

    def _bookmark(self, res: Resource, annotations: dict[str, str] | None = None) -> Obj:
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        if annotations:
            meta["annotations"] = annotations
        return {
            "type": "BOOKMARK",
            "object": {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta},
        }

    async def _pump(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        w: Watcher,
        duration: float | None,
        bookmarks: bool,
    ) -> None:
        start = time.monotonic()
        deadline = start + duration if duration is not None else None
        next_bookmark = start + self.bookmark_interval if bookmarks else None
        while True:
            now = time.monotonic()
            waits = [t - now for t in (deadline, next_bookmark) if t is not None]
            try:
                item = await asyncio.wait_for(
                    w.queue.get(), max(0.0, min(waits)) if waits else None
                )
            except TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if next_bookmark is not None and now >= next_bookmark:
                    # The queue is empty: every change up to store.rv has been sent.
                    item = self._bookmark(w.resource)
                    next_bookmark = now + self.bookmark_interval
                else:
                    continue
            if item == CLOSE:
                break
            if item == ABORT:
                if request.transport is not None:
                    request.transport.close()
                return
            if isinstance(item, dict):
                item = _enc.encode(item) + b"\n"
            assert isinstance(item, bytes)
            await resp.write(item)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
