"""The binder as a kube-scheduler extender: ``filter`` and ``bind`` over HTTP(S).

In extender mode (``scheduler.mode: extender``, the Kubernetes default) the upstream
kube-scheduler schedules our pods with every plugin it has (volume binding, inter-pod
affinity, topology spread, preemption) and calls this extender for what it cannot do:
HAMi's devices. The wire types are kube-scheduler's own
(``k8s.io/kube-scheduler/extender/v1``); their Go structs carry no json tags, so the
JSON names are the Go field names: ``Pod``, ``Nodes``, ``NodeNames``, ``FailedNodes``,
``FailedAndUnresolvableNodes``, ``Error``, ``PodName``, ``PodNamespace``, ``PodUID``,
``Node``. The scheduler answers non-200 as an error; so do we for a body that is not
one of these types, and a 200 with ``Error`` for everything else.

``filter``: the pod (with the offered nodes: ``NodeNames`` when ``nodeCacheCapable``,
else ``Nodes``) becomes a one-shot ``requested`` whose ``Constraints.nodes`` are the
offered nodes. Placement decides among those only and reserves by compare-and-set on
the node's ledger entry, as always. Answer: the chosen node alone (``NodeNames`` or
``Nodes``, as asked), or, when nothing fits, every offered node in ``FailedNodes`` with
HAMi's reason (``CardInsufficientMemory``...); nodes placement does not know at all go
to ``FailedAndUnresolvableNodes`` (preemption cannot give them cards).

Filter is idempotent per pod UID: kube-scheduler calls it again on each scheduling
attempt. A pod that holds a reservation on one of the offered nodes gets that node
again; one whose reserved node is not offered is released and decided afresh.

``bind``: the pod's reservation must be on ``Node`` (else an error and nothing is
bound); then the Binding is created with HAMi's annotations, exactly as direct mode
does (:class:`~services.binder.kube.KubeBackend`), and ``bound`` is published. A bind
that finds no reservation (it expired while a PreBind plugin waited, or the binder
restarted) re-reserves on ``Node`` first and binds only if that succeeds.

A reservation whose bind never comes (the scheduler failed the pod after filter, e.g.
volume binding at PreBind) is released ``scheduler.extenderReservationTimeout`` seconds
after its last filter, or at once when the pod is deleted or ends (the pod watch). A
pod found bound to the reserved node when the timeout strikes keeps its reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from aiohttp import web

from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.hami.codec import PodSpecError, pod_request
from shared.schemas import AllocDecided, AllocFailed, AllocReleased, AllocRequested

log = logging.getLogger("hami.binder.extender")

Obj = dict[str, Any]

# What placement reports for a node it has no inventory of (no node agent: no cards).
UNKNOWN_NODE = "node unregistered"
# How long a filter waits for placement; below kube-scheduler's default httpTimeout
# (30 s), so the scheduler reads our error rather than its own timeout.
ANSWER_TIMEOUT_S = 25.0


# ----------------------------------------------------------------- the wire types


class ExtenderArgs(msgspec.Struct):
    """``extenderv1.ExtenderArgs``: what kube-scheduler posts to filter/prioritize."""

    Pod: Obj | None = None
    Nodes: Obj | None = None  # a v1.NodeList, when nodeCacheCapable is false
    NodeNames: list[str] | None = None  # when nodeCacheCapable is true


class ExtenderFilterResult(msgspec.Struct):
    """``extenderv1.ExtenderFilterResult`` (every field written, as Go marshals it)."""

    Nodes: Obj | None = None
    NodeNames: list[str] | None = None
    FailedNodes: dict[str, str] | None = None
    FailedAndUnresolvableNodes: dict[str, str] | None = None
    Error: str = ""


class ExtenderBindingArgs(msgspec.Struct):
    """``extenderv1.ExtenderBindingArgs``."""

    PodName: str = ""
    PodNamespace: str = ""
    PodUID: str = ""
    Node: str = ""


class ExtenderBindingResult(msgspec.Struct):
    """``extenderv1.ExtenderBindingResult``."""

    Error: str = ""


# ------------------------------------------------------------------- pure helpers


def offered_nodes(args: ExtenderArgs) -> list[str]:
    """The candidate node names, from ``NodeNames`` or the ``Nodes`` list."""
    if args.NodeNames is not None:
        return list(args.NodeNames)
    items = (args.Nodes or {}).get("items") or []
    return [str((n.get("metadata") or {}).get("name") or "") for n in items if isinstance(n, dict)]


def chosen(args: ExtenderArgs, names: list[str]) -> ExtenderFilterResult:
    """A result passing ``names``, in the form the scheduler asked in."""
    if args.NodeNames is not None or args.Nodes is None:
        return ExtenderFilterResult(NodeNames=names)
    keep = set(names)
    items = [n for n in (args.Nodes.get("items") or [])
             if (n.get("metadata") or {}).get("name") in keep]
    return ExtenderFilterResult(Nodes={**args.Nodes, "items": items})


def failed_result(args: ExtenderArgs, names: list[str], failure: AllocFailed) -> ExtenderFilterResult:
    """Every offered node rejected, with its reason: HAMi's per node where placement
    gave one, else its summary; nodes placement does not know are unresolvable."""
    failed: dict[str, str] = {}
    unresolvable: dict[str, str] = {}
    summary = failure.message or ", ".join(f"{n} {r}" for r, n in sorted(failure.reasons.items()))
    for n in names:
        why = failure.node_reasons.get(n)
        if why is None and failure.node_reasons:
            unresolvable[n] = UNKNOWN_NODE
        elif why == UNKNOWN_NODE:
            unresolvable[n] = why
        else:
            failed[n] = why or summary
    res = chosen(args, [])
    res.FailedNodes = failed
    res.FailedAndUnresolvableNodes = unresolvable
    return res


def asks_devices(req: AllocRequested) -> bool:
    return any(d.nums > 0 for c in req.containers for d in c.devices)


# ------------------------------------------------------------------ the extender


@dataclass(slots=True)
class Held:
    """A reservation made for a filter, not bound yet."""

    decision: AllocDecided
    since: float  # monotonic time of its last filter (or of its adoption)


class PodSource(Protocol):
    """What the extender needs of the Kubernetes binder."""

    pods: Mapping[str, Obj]  # the pod watch's cache, uid -> pod

    async def bind_decision(self, d: AllocDecided) -> str | None:
        """Bind as direct mode does (annotations, Binding, ``bound``); the error or None."""
        ...

    async def read_pod(self, namespace: str, name: str) -> Obj | None:
        """The pod now (None when it does not exist)."""
        ...


class Extender:
    """The filter and bind verbs, the reservations they hold, and their timeout."""

    def __init__(
        self, bus: Bus, cfg: Config, binder: PodSource, *,
        timeout_s: float | None = None, answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.bus = bus
        self.cfg = cfg
        self.binder = binder
        self.timeout_s = cfg.scheduler.extender_reservation_timeout if timeout_s is None else timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.held: dict[str, Held] = {}
        self.waiters: dict[str, asyncio.Future[AllocDecided | AllocFailed]] = {}
        self.gone: set[str] = set()  # uids whose pod was deleted or ended
        self._locks: dict[str, asyncio.Lock] = {}
        self._seq = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None
        self.filters = 0
        self.expired = 0

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def _msg_id(self, what: str, uid: str) -> str:
        # Unique per attempt: a filter after a release must not be deduplicated away.
        return f"{what}:{uid}:x{time.time_ns()}.{next(self._seq)}"

    async def _release(self, d: AllocDecided, reason: str) -> None:
        ev = AllocReleased(uid=d.uid, name=d.name, namespace=d.namespace, node=d.node,
                           reason=reason, at=time.time())
        await self.bus.publish_event(subjects.alloc("released", d.node), ev,
                                     msg_id=self._msg_id("released", d.uid))

    async def _decide(self, req: AllocRequested) -> AllocDecided | AllocFailed | None:
        """Publish a one-shot request and wait for placement's answer (None: no answer)."""
        fut: asyncio.Future[AllocDecided | AllocFailed] = asyncio.get_running_loop().create_future()
        self.waiters[req.uid] = fut
        try:
            await self.bus.publish_event(subjects.alloc("requested"), req,
                                         msg_id=self._msg_id("requested", req.uid))
            return await asyncio.wait_for(fut, self.answer_timeout_s)
        except TimeoutError:
            return None
        finally:
            if self.waiters.get(req.uid) is fut:
                del self.waiters[req.uid]

    # ------------------------------------------------------------------ filter

    async def filter(self, args: ExtenderArgs) -> ExtenderFilterResult:
        pod = args.Pod
        if not isinstance(pod, dict):
            return ExtenderFilterResult(Error="ExtenderArgs has no Pod")
        names = offered_nodes(args)
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if not uid:
            return ExtenderFilterResult(Error="the Pod has no metadata.uid")
        try:
            req = pod_request(pod, self.cfg.node, self.cfg.resources, now=time.time())
        except PodSpecError as exc:
            return ExtenderFilterResult(Error=f"invalid request: {exc}")
        if not asks_devices(req):
            return chosen(args, names)  # nothing of HAMi's to decide
        if not names:
            return chosen(args, [])
        self.filters += 1
        cons = msgspec.structs.replace(req.constraints, nodes=names)
        req = msgspec.structs.replace(req, constraints=cons, pending=False, source="kube")
        async with self._lock(uid):
            self.gone.discard(uid)
            held = self.held.get(uid)
            if held is not None:
                if held.decision.node in names:
                    held.since = time.monotonic()
                    return chosen(args, [held.decision.node])
                # Reserved on a node the scheduler no longer offers: decide again.
                del self.held[uid]
                await self._release(held.decision, "refiltered")
            for _ in range(3):
                got = await self._decide(req)
                if got is None:
                    return ExtenderFilterResult(
                        Error=f"no placement decision within {self.answer_timeout_s:g}s")
                if isinstance(got, AllocFailed):
                    return failed_result(args, names, got)
                if got.node in names:
                    self.held[uid] = Held(got, time.monotonic())
                    return chosen(args, [got.node])
                # An older reservation placement still held (its decision came late):
                # free it and ask again.
                await self._release(got, "refiltered")
            return ExtenderFilterResult(Error="placement kept answering a node not offered")

    # -------------------------------------------------------------------- bind

    async def bind(self, args: ExtenderBindingArgs) -> ExtenderBindingResult:
        uid, node = args.PodUID, args.Node
        if not uid or not node or not args.PodName:
            return ExtenderBindingResult(Error="ExtenderBindingArgs needs PodName, PodUID and Node")
        async with self._lock(uid):
            held = self.held.get(uid)
            if held is None:
                got = await self._rereserve(args)
                if isinstance(got, ExtenderBindingResult):
                    return got
                held = Held(got, time.monotonic())
                self.held[uid] = held
            d = held.decision
            if d.node != node:
                return ExtenderBindingResult(
                    Error=f"pod {args.PodNamespace}/{args.PodName} is reserved on {d.node}, "
                          f"not {node}; nothing bound")
            err = await self.binder.bind_decision(d)
            # Bound, or failed and released by the bind (bind_failed + released).
            self.held.pop(uid, None)
            return ExtenderBindingResult(Error=err or "")

    async def _rereserve(self, args: ExtenderBindingArgs) -> AllocDecided | ExtenderBindingResult:
        """No reservation at bind time: reserve on ``Node`` now, or say why not."""
        ns = args.PodNamespace or "default"
        pod = await self.binder.read_pod(ns, args.PodName)
        if pod is None or (pod.get("metadata") or {}).get("uid") != args.PodUID:
            return ExtenderBindingResult(Error=f"pod {ns}/{args.PodName} ({args.PodUID}) no longer exists")
        if (pod.get("spec") or {}).get("nodeName") == args.Node:
            return ExtenderBindingResult()  # bound already: a repeated bind
        try:
            req = pod_request(pod, self.cfg.node, self.cfg.resources, now=time.time())
        except PodSpecError as exc:
            return ExtenderBindingResult(Error=f"invalid request: {exc}")
        cons = msgspec.structs.replace(req.constraints, node_name=args.Node, nodes=[args.Node])
        req = msgspec.structs.replace(req, constraints=cons, pending=False, source="kube")
        got = await self._decide(req)
        if isinstance(got, AllocDecided) and got.node == args.Node:
            return got
        if isinstance(got, AllocDecided):
            await self._release(got, "refiltered")
        why = got.node_reasons.get(args.Node) or got.message if isinstance(got, AllocFailed) else "no decision"
        return ExtenderBindingResult(
            Error=f"no reservation for {ns}/{args.PodName} on {args.Node} (expired?) and it no longer fits: {why}")

    # ------------------------------------------------------- decisions, pods

    def on_decided(self, d: AllocDecided) -> bool:
        """A decision for a pod of ours: True when the extender takes it (a filter's
        answer, or a late one it now holds, to be reused or released on time)."""
        fut = self.waiters.pop(d.uid, None)
        if fut is not None and not fut.done():
            fut.set_result(d)
            return True
        if d.uid in self.gone:
            asyncio.get_running_loop().create_task(self._release(d, "deleted"))
            return True
        cur = self.held.get(d.uid)
        if cur is None or cur.decision.node != d.node:
            self.held[d.uid] = Held(d, time.monotonic())
        return True

    def on_failed(self, f: AllocFailed) -> bool:
        fut = self.waiters.pop(f.uid, None)
        if fut is not None and not fut.done():
            fut.set_result(f)
            return True
        return False

    def adopt(self, d: AllocDecided) -> None:
        """A ledger reservation of a pending pod found at a (re)start: held as if just
        filtered, so it is bound if the scheduler's bind comes, else released on time."""
        self.held.setdefault(d.uid, Held(d, time.monotonic()))

    def forget(self, uid: str) -> None:
        """The pod was deleted or ended (its ``released`` is published by the watch)."""
        self.held.pop(uid, None)
        self.gone.add(uid)
        lk = self._locks.get(uid)
        if lk is not None and not lk.locked():
            del self._locks[uid]

    # ----------------------------------------------------------------- timeout

    async def sweep(self) -> int:
        """Release every reservation older than the timeout whose pod is not bound to
        it; returns how many were released."""
        now = time.monotonic()
        released = 0
        for uid, h in list(self.held.items()):
            if now - h.since <= self.timeout_s or self._lock(uid).locked():
                continue
            async with self._lock(uid):
                if self.held.get(uid) is not h:
                    continue
                d = h.decision
                pod = self.binder.pods.get(uid)
                if pod is None or not (pod.get("spec") or {}).get("nodeName"):
                    with contextlib.suppress(Exception):
                        pod = await self.binder.read_pod(d.namespace or "default", d.name)
                del self.held[uid]
                if (pod is not None and (pod.get("metadata") or {}).get("uid") == uid
                        and (pod.get("spec") or {}).get("nodeName") == d.node):
                    continue  # bound after all (e.g. by a binder before a restart)
                log.info("reservation of %s/%s on %s had no bind for %.0fs; releasing",
                         d.namespace, d.name, d.node, self.timeout_s)
                await self._release(d, "extender-timeout")
                self.expired += 1
                released += 1
        return released

    async def _sweep_loop(self) -> None:
        period = max(0.05, min(self.timeout_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reservation sweep failed; trying again")

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="extender-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for fut in self.waiters.values():
            fut.cancel()
        self.waiters.clear()


# ------------------------------------------------------------------ HTTP server

_ENC = msgspec.json.Encoder()


class ExtenderServer:
    """``POST /filter`` and ``POST /bind``: HTTPS when given a certificate, else HTTP."""

    def __init__(
        self, extender: Extender, *, host: str = "127.0.0.1", port: int = 8888,
        certfile: str | None = None, keyfile: str | None = None,
    ) -> None:
        self.extender = extender
        self.host = host
        self.port = port
        self.certfile, self.keyfile = certfile, keyfile
        self._runner: web.AppRunner | None = None

    @staticmethod
    def _route(
        kind: type[msgspec.Struct], call: Callable[[Any], Awaitable[msgspec.Struct]],
        bad: Callable[[str], msgspec.Struct],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                args = msgspec.json.decode(body, type=kind)
            except msgspec.DecodeError as exc:
                return web.Response(status=400, body=_ENC.encode(bad(f"bad {kind.__name__}: {exc}")),
                                    content_type="application/json")
            try:
                out = await call(args)
            except Exception as exc:  # an answer, not a dropped connection
                log.exception("%s failed", request.path)
                out = bad(f"{request.path}: {exc}")
            return web.Response(body=_ENC.encode(out), content_type="application/json")

        return handle

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        ext = self.extender
        app.router.add_post("/filter", self._route(
            ExtenderArgs, ext.filter, lambda e: ExtenderFilterResult(Error=e)))
        app.router.add_post("/bind", self._route(
            ExtenderBindingArgs, ext.bind, lambda e: ExtenderBindingResult(Error=e)))
        ctx: ssl.SSLContext | None = None
        if self.certfile:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.certfile, self.keyfile)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ctx)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        ext.start()
        log.info("extender listening on %s://%s:%d", "https" if ctx else "http", self.host, self.port)

    async def stop(self) -> None:
        await self.extender.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
