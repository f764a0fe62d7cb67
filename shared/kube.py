"""Kubernetes API access shared by the services: client construction and typed errors.

Three ways to reach an API server, one function (:func:`api_client`): a kubeconfig file
(``kubeconfig=``, optionally a ``context``), the pod's service account
(``in_cluster=True``), or a plain URL with no auth (``host=``, what the tests' fake API
server serves).

Errors: the ``kubernetes.aio`` client raises ``ApiException`` with the HTTP status and the
raw body; code that wants to react to "not found" or "conflict" should not parse bodies.
:func:`translate` (or the :func:`kube_errors` context manager) turns it into a
:class:`KubeError` subclass carrying the API's own ``Status`` (reason, message, details),
as Kopf does: :class:`NotFound` 404, :class:`Conflict` 409 (stale write *and*
AlreadyExists), :class:`Gone` 410 (watch resourceVersion too old), :class:`Invalid` 422.

:class:`Kube` adds raw JSON calls on top of an ApiClient (dicts in, dicts out, no model
deserialisation): the services keep pod specs as the API returns them, the watch stream
is read line by line, and responses whose body is a ``Status`` (a successful Binding)
are not forced through a model that cannot hold them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig
from kubernetes.aio.client.exceptions import ApiException

JSON = "application/json"
# Answers and watch lines are decoded by msgspec: several times faster than json, and
# the binder decodes every pod of a burst a few times.
_DECODE = msgspec.json.Decoder().decode
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


# ---------------------------------------------------------------------------- errors


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP code, the rest comes from its Status."""

    def __init__(
        self, status: int, reason: str = "", message: str = "", body: Mapping[str, Any] | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.body: dict[str, Any] = dict(body or {})
        super().__init__(f"({status} {reason}) {message}".strip())

    @property
    def details(self) -> dict[str, Any]:
        d = self.body.get("details")
        return d if isinstance(d, dict) else {}


class NotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: a write against a stale resourceVersion, or AlreadyExists on create."""

    @property
    def already_exists(self) -> bool:
        return self.reason == "AlreadyExists"


class Gone(KubeError):
    """410: the resourceVersion asked for is older than the server keeps; relist."""


class Invalid(KubeError):
    """422: the object failed validation; ``details.causes`` names the fields."""


_BY_STATUS: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone, 422: Invalid}


def error_from_status(status: int, body: Any) -> KubeError:
    """The :class:`KubeError` for an HTTP status and a response body (Status or text)."""
    parsed: Any = body
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {"message": body}
    if not isinstance(parsed, dict):
        parsed = {}
    # A Status inside a watch ERROR event carries its own code.
    code = int(parsed.get("code") or status or 0)
    cls = _BY_STATUS.get(code, KubeError)
    return cls(code, str(parsed.get("reason") or ""), str(parsed.get("message") or ""), parsed)


def translate(exc: BaseException) -> KubeError:
    """An ``ApiException`` as the matching :class:`KubeError`; other errors wrapped as 0."""
    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        err = error_from_status(int(exc.status or 0), exc.body)
        if not err.reason and exc.reason:
            err.reason = str(exc.reason)
        return err
    return KubeError(0, type(exc).__name__, str(exc))


@contextlib.asynccontextmanager
async def kube_errors() -> AsyncIterator[None]:
    """``async with kube_errors(): await api.read_namespaced_pod(...)`` raises KubeError."""
    try:
        yield
    except ApiException as exc:
        raise translate(exc) from exc


# ---------------------------------------------------------------------------- clients


async def configuration(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    in_cluster: bool = False,
    host: str | None = None,
) -> kclient.Configuration:
    """A client Configuration from exactly one of kubeconfig / in-cluster / host."""
    chosen = sum(1 for x in (kubeconfig, in_cluster or None, host) if x)
    if chosen != 1:
        raise ValueError("give exactly one of kubeconfig=, in_cluster=True or host=")
    cfg = kclient.Configuration()
    if host:
        cfg.host = host.rstrip("/")
        # A plain URL is a local test server: the environment's proxies must not apply.
        cfg.client_session_kwargs = {"trust_env": False}
    elif in_cluster:
        kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        await kconfig.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=cfg
        )
    return cfg


async def api_client(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    in_cluster: bool = False,
    host: str | None = None,
) -> kclient.ApiClient:
    """A ``kubernetes.aio`` ApiClient; close it with ``await client.close()``."""
    cfg = await configuration(kubeconfig=kubeconfig, context=context, in_cluster=in_cluster,
                              host=host)
    return kclient.ApiClient(cfg)


def path(
    resource: str,
    namespace: str | None = None,
    name: str | None = None,
    sub: str | None = None,
    *,
    group: str = "",
    version: str = "v1",
) -> str:
    """The REST path of a resource collection or object (core group by default)."""
    parts = ["/api", version] if not group else ["/apis", group, version]
    if namespace is not None:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(resource)
    if name is not None:
        parts.append(quote(name, safe=""))
    if sub is not None:
        parts.append(sub)
    return "/".join(parts)


class Kube:
    """Raw JSON calls over an ApiClient (its auth, TLS and connection pool).

    Every call raises :class:`KubeError` subclasses on non-2xx answers.
    """

    def __init__(self, api: kclient.ApiClient) -> None:
        self.api = api

    @classmethod
    async def connect(
        cls,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        in_cluster: bool = False,
        host: str | None = None,
    ) -> Kube:
        return cls(await api_client(kubeconfig=kubeconfig, context=context,
                                    in_cluster=in_cluster, host=host))

    async def close(self) -> None:
        await self.api.close()  # type: ignore[no-untyped-call]

    async def _send(
        self,
        method: str,
        resource_path: str,
        query: Mapping[str, Any] | None,
        body: Any,
        content_type: str,
        timeout: float | None,
    ) -> Any:
        headers = {"Accept": JSON, "Content-Type": content_type}
        q = [(k, v) for k, v in (query or {}).items() if v is not None]
        try:
            serialized = await self.api.param_serialize(
                method=method,
                resource_path=resource_path,
                query_params=q,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            return await self.api.call_api(
                *serialized, _request_timeout=timeout, _preload_content=False
            )
        except ApiException as exc:
            raise translate(exc) from exc

    async def request(
        self,
        method: str,
        resource_path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: float | None = 30.0,
    ) -> Any:
        """One call; the decoded JSON answer (a Status for some successful writes)."""
        resp = await self._send(method, resource_path, query, body, content_type, timeout)
        try:
            data = await resp.read()
        finally:
            resp.response.release()
        if not 200 <= int(resp.status) <= 299:
            raise error_from_status(int(resp.status), data)
        return _DECODE(data) if data else None

    async def get(self, resource_path: str, **query: Any) -> Any:
        return await self.request("GET", resource_path, query=query)

    async def patch(
        self, resource_path: str, body: Any, content_type: str = MERGE_PATCH
    ) -> Any:
        return await self.request("PATCH", resource_path, body=body, content_type=content_type)

    async def post(self, resource_path: str, body: Any) -> Any:
        return await self.request("POST", resource_path, body=body)

    async def delete(self, resource_path: str) -> Any:
        return await self.request("DELETE", resource_path)

    async def watch(
        self, resource_path: str, *, timeout: float | None = None, **query: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request (``watch=true`` added), as dicts.

        Ends when the server ends the stream. An ``ERROR`` event is raised as its
        KubeError (a 410 :class:`Gone` means: relist).
        """
        q = dict(query, watch="true")
        resp = await self._send("GET", resource_path, q, None, JSON, timeout)
        try:
            if not 200 <= int(resp.status) <= 299:
                raise error_from_status(int(resp.status), await resp.read())
            content = resp.response.content
            while True:
                line = await content.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                ev = _DECODE(line)
                if ev.get("type") == "ERROR":
                    raise error_from_status(0, ev.get("object") or {})
                yield ev
        finally:
            resp.response.release()


# ------------------------------------------------ how the services find the API server


def default_kubeconfig(given: str | None) -> str | None:
    if given or os.environ.get("KUBECONFIG"):
        return given or os.environ["KUBECONFIG"]
    home = Path("~/.kube/config").expanduser()
    return str(home) if home.exists() else None


async def connect_from(args: argparse.Namespace) -> Kube:
    """The API server :func:`shared.runner.kube_flags` name: ``--kube-host`` (no auth),
    ``--in-cluster``, ``--kubeconfig`` (or ``$KUBECONFIG``, or ``~/.kube/config``),
    else the pod's service account."""
    kubeconfig = default_kubeconfig(args.kubeconfig)
    if args.kube_host:
        return await Kube.connect(host=args.kube_host)
    if args.in_cluster or not kubeconfig:
        return await Kube.connect(in_cluster=True)
    return await Kube.connect(kubeconfig=kubeconfig, context=args.context)
