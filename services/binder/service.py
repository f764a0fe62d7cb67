"""The binder's wiring: decisions become bindings; clients' asks become requests.

Decisions arrive on a durable consumer shared by the binder replicas. What "binding"
means is the backend's business: in standalone mode (this module's
:class:`StandaloneBackend`) a decision is bound at once; the Kubernetes backend writes
HAMi's annotations and creates the Binding. Either way the binder then publishes
``bound`` (or ``bind_failed`` plus ``released``, so placement frees the reservation).

For direct clients (``hami submit`` / ``hami release``) the binder answers
``hami.api.submit`` and ``hami.api.release``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Protocol

from nats.aio.msg import Msg
from opentelemetry import context

from shared import limits, logs, subjects, tracing
from shared.bus import BadMessage, Bus, WorkQueue, add_service, decode, decode_event
from shared.config import Config
from shared.hami.codec import NODE_POLICIES, parse_gpu_policy
from shared.lifecycle import Background
from shared.schemas import (
    AllocBindFailed,
    AllocBound,
    AllocDecided,
    AllocFailed,
    AllocReleased,
    AllocRequested,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)

log = logging.getLogger("hami.binder")
noisy = logs.RateLimited(log)  # repeated garbage: a line a minute, with a count
tracer = tracing.tracer("hami.binder")

BINDER_CONSUMER = "binder"


class BindError(Exception):
    """The backend could not bind; the reservation is released."""


class Backend(Protocol):
    async def bind(self, decision: AllocDecided) -> None: ...


class StandaloneBackend:
    """No cluster: a decision is bound the moment it is made."""

    async def bind(self, decision: AllocDecided) -> None:
        return None


def validate_submit(req: SubmitRequest) -> None:
    if not req.name or len(req.name) > 253:
        raise ValueError("a name of 1 to 253 characters is required")
    if not req.containers:
        raise ValueError("a request needs at least one container")
    for c in req.containers:
        for d in c.devices:
            if d.nums < 1 or d.nums > 64:
                raise ValueError(f"gpus must be 1..64, got {d.nums}")
            if d.mem < 0:
                raise ValueError(f"memory must not be negative, got {d.mem}")
            if d.mem_percent is not None and not 0 < d.mem_percent <= 100:
                raise ValueError(f"memory percentage must be 1..100, got {d.mem_percent}")
            if not 0 <= d.cores <= 100:
                raise ValueError(f"cores must be 0..100, got {d.cores}")
    problems = limits.request_problems(
        name=req.name, namespace=req.namespace, containers=req.containers,
        constraints=req.constraints, priority=req.priority,
    )
    if problems:
        raise ValueError("; ".join(problems))
    pol = req.constraints.node_policy
    if pol is not None and pol not in NODE_POLICIES:
        raise ValueError(f"unknown node policy {pol!r}; use one of {', '.join(NODE_POLICIES)}")
    if req.constraints.gpu_policy is not None:
        try:
            parse_gpu_policy(req.constraints.gpu_policy)
        except ValueError as exc:
            raise ValueError(f"gpu policy: {exc}") from exc


class BinderService:
    def __init__(
        self, bus: Bus, cfg: Config, backend: Backend | None = None, concurrency: int = 64
    ) -> None:
        self.bus = bus
        self.concurrency = concurrency
        self.cfg = cfg
        self.backend: Backend = backend or StandaloneBackend()
        self.by_name: dict[str, tuple[str, str]] = {}  # "ns/name" -> (uid, node)
        self.inflight: dict[str, str] = {}  # "ns/name" -> uid, submitted not yet placed
        self.waiters: dict[str, asyncio.Future[AllocDecided | AllocFailed]] = {}
        self.gone: dict[str, asyncio.Event] = {}  # uid -> set when it leaves the ledger
        self.ledger_uids: dict[str, set[str]] = {}  # node -> uids in its ledger
        self.names: dict[str, tuple[str, str]] = {}  # uid -> (name, namespace), ledger's
        self.serve_api = True
        self._bg = Background()
        self._sub: WorkQueue | None = None
        self._svc: object | None = None

    @staticmethod
    def key(name: str, namespace: str = "") -> str:
        # The namespace escaped (no "/" left in it): ("a/b", "c") and ("a", "b/c") differ.
        return f"{subjects.token(namespace)}/{name}"

    # -------------------------------------------------------------- ledger view

    async def _on_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            return
        try:
            led = decode(value, NodeLedger)
            problems = limits.ledger_problems(led, key)
        except BadMessage as exc:
            problems = [str(exc)]
        if problems:
            # The names in use there stay as last read: forgetting them would let a
            # second submit take a name the node may still hold. Placement sets the
            # node aside and inventory announces it.
            noisy.warning(f"garbage:{key}", "ignoring garbage ledger entry of %s: %s",
                          limits.node_of_key(key), "; ".join(problems))
            return
        now = set(led.allocs)
        for uid in self.ledger_uids.get(led.node, set()) - now:
            ev = self.gone.pop(uid, None)
            if ev is not None:
                ev.set()
            k = self.key(*self.names.pop(uid, ("", "")))
            if self.by_name.get(k, ("",))[0] == uid:
                del self.by_name[k]
        self.ledger_uids[led.node] = now
        for a in led.allocs.values():
            self.by_name[self.key(a.name, a.namespace)] = (a.uid, led.node)
            self.names[a.uid] = (a.name, a.namespace)

    # ----------------------------------------------------------------- decisions

    async def handle_decided(self, d: AllocDecided) -> None:
        with tracing.span(tracer, "binder.bind") as span:
            span.set_attribute("hami.uid", d.uid)
            span.set_attribute("hami.node", d.node)
            try:
                await self.backend.bind(d)
            except BindError as exc:
                log.warning("binding %s to %s failed: %s", d.name, d.node, exc)
                now = time.time()
                await self.bus.publish_event(
                    subjects.alloc("bind_failed", d.node),
                    AllocBindFailed(uid=d.uid, name=d.name, namespace=d.namespace, node=d.node,
                                    message=str(exc), at=now),
                    msg_id=f"bind_failed:{d.uid}:{d.decided_at}",
                )
                # Keyed by the decision: a later decision of the same pod that also fails
                # to bind must not be deduplicated away (that would leak its reservation).
                await self.release(d.uid, d.name, d.namespace, d.node, "bind-failed",
                                   msg_id=f"released:{d.uid}:{d.decided_at}")
                return
            await self.bus.publish_event(
                subjects.alloc("bound", d.node),
                AllocBound(uid=d.uid, name=d.name, namespace=d.namespace, node=d.node,
                           bound_at=time.time()),
                msg_id=f"bound:{d.uid}:{d.decided_at}",
            )
        if self.serve_api:  # the ledger view removes it again; without it, nothing would
            self.by_name[self.key(d.name, d.namespace)] = (d.uid, d.node)
        self.inflight.pop(self.key(d.name, d.namespace), None)
        fut = self.waiters.pop(d.uid, None)
        if fut is not None and not fut.done():
            fut.set_result(d)

    async def handle_failed(self, f: AllocFailed) -> None:
        fut = self.waiters.get(f.uid)
        if fut is not None and not fut.done() and not f.pending:
            self.waiters.pop(f.uid, None)
            self.inflight.pop(self.key(f.name, f.namespace), None)
            fut.set_result(f)

    async def release(self, uid: str, name: str, namespace: str, node: str, reason: str,
                      msg_id: str | None = None) -> None:
        ev = AllocReleased(uid=uid, name=name, namespace=namespace, node=node, reason=reason,
                           at=time.time())
        subject = subjects.alloc("released", node) if node else subjects.alloc("released")
        await self.bus.publish_event(subject, ev, msg_id=msg_id or f"released:{uid}")

    async def _handle_msg(self, msg: Msg) -> None:
        try:
            ev = decode_event(msg.data)
        except BadMessage as exc:
            noisy.error(f"malformed:{msg.subject}", "dropping malformed message on %s: %s", msg.subject, exc)
            with contextlib.suppress(Exception):
                await msg.term()
            return
        token = context.attach(tracing.extract(msg.headers))
        try:
            if isinstance(ev, AllocDecided):
                await self.handle_decided(ev)
            elif isinstance(ev, AllocFailed):
                await self.handle_failed(ev)
        except asyncio.CancelledError:
            # Stopping mid-bind: hand the decision back now rather than after ack_wait,
            # so the next binder (a restart, another replica) takes it at once.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nak())
            raise
        except Exception as exc:
            await self._failed(msg, ev, exc)
            return
        finally:
            context.detach(token)
        with contextlib.suppress(Exception):  # redelivered, and handled idempotently
            await msg.ack()

    async def _failed(self, msg: Msg, ev: object, exc: Exception) -> None:
        """A message whose handling raised: redelivered with a growing delay until it
        was delivered ``bus.maxDeliveries`` times, then moved to the dead-letter subject;
        never redelivered forever."""
        try:
            n = max(1, int(msg.metadata.num_delivered or 1))
        except Exception:
            n = 1
        limit = self.cfg.bus.max_deliveries
        if n < limit:
            noisy.warning(f"retry:{type(exc).__name__}", "cannot handle %s (delivery %d of %d): %s: %s; "
                          "it will be redelivered", msg.subject, n, limit, type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(0.5 * 2 ** (n - 1), 8.0))
            return
        error = f"{type(exc).__name__}: {exc}"
        log.error("giving up on %s after %d deliveries; dead-lettered to %s", msg.subject, n,
                  subjects.dlq(BINDER_CONSUMER), exc_info=exc)
        try:
            await self.bus.dead_letter(BINDER_CONSUMER, msg, error)
        except Exception as dlq_exc:
            noisy.error("dlq-failed", "cannot dead-letter %s (%s); it will be redelivered", msg.subject, dlq_exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
            return
        # A waiting client is answered by its own deadline (the decision was never
        # bound, so it is not kept); the dead letter says why, for an operator.
        with contextlib.suppress(Exception):
            await msg.term()

    async def _consume(self) -> None:
        """Handle decisions concurrently: a Kubernetes bind is several API round trips,
        and binds of different pods do not depend on each other (a backend serialises
        what concerns one pod)."""
        wq = self._sub
        assert wq is not None
        room = asyncio.Semaphore(self.concurrency)
        inflight: set[asyncio.Task[None]] = set()

        def done(t: asyncio.Task[None]) -> None:
            inflight.discard(t)
            room.release()

        try:
            while True:
                for m in await wq.batch(64):
                    await room.acquire()
                    t = asyncio.create_task(self._handle_msg(m))
                    inflight.add(t)
                    t.add_done_callback(done)
        finally:
            for t in inflight:
                t.cancel()

    # ---------------------------------------------------------- direct clients

    async def submit(self, data: bytes) -> SubmitReply:
        req = decode(data, SubmitRequest)
        validate_submit(req)
        k = self.key(req.name, req.namespace)
        if k in self.by_name or k in self.inflight:
            return SubmitReply(ok=False, name=req.name, error=f"{req.name} already has an allocation; release it first")
        uid = str(uuid.uuid4())
        fut: asyncio.Future[AllocDecided | AllocFailed] = asyncio.get_running_loop().create_future()
        self.waiters[uid] = fut
        self.inflight[k] = uid
        ask = AllocRequested(
            uid=uid, name=req.name, namespace=req.namespace, containers=req.containers,
            constraints=req.constraints, priority=req.priority, pending=req.wait,
            source="cli", requested_at=time.time(),
        )
        with tracing.span(tracer, "binder.submit") as span:
            span.set_attribute("hami.uid", uid)
            await self.bus.publish_event(subjects.alloc("requested"), ask, msg_id=f"requested:{uid}")
        try:
            result = await asyncio.wait_for(fut, timeout=max(req.timeout, 0.1))
        except TimeoutError:
            self.waiters.pop(uid, None)
            self.inflight.pop(k, None)
            # Withdraw it so a later release does not place a request nobody waits for.
            await self.release(uid, req.name, req.namespace, "", "withdrawn")
            return SubmitReply(ok=False, uid=uid, name=req.name,
                               error=f"no placement within {req.timeout:g}s")
        if isinstance(result, AllocDecided):
            return SubmitReply(ok=True, uid=uid, name=req.name, decision=result)
        return SubmitReply(ok=False, uid=uid, name=req.name, failure=result)

    async def release_endpoint(self, data: bytes) -> ReleaseReply:
        req = decode(data, ReleaseRequest)
        k = self.key(req.name, req.namespace)
        found = self.by_name.get(k)
        if found is None:
            return ReleaseReply(ok=False, error=f"{req.name}: no such allocation")
        uid, node = found
        gone = self.gone.setdefault(uid, asyncio.Event())
        await self.release(uid, req.name, req.namespace, node, "released")
        try:
            # Answer once placement has freed it, so the caller's next ask sees the room.
            await asyncio.wait_for(gone.wait(), timeout=10)
        except TimeoutError:
            return ReleaseReply(ok=True, uid=uid, node=node, error="released; not yet freed")
        self.by_name.pop(k, None)
        return ReleaseReply(ok=True, uid=uid, node=node)

    # --------------------------------------------------------------------- life

    async def start(self, serve_api: bool = True) -> None:
        self.serve_api = serve_api
        if serve_api:
            # The ledger view answers the API (names in use, releases done); without
            # the API, following every node's ledger would be work for nobody.
            ready = asyncio.Event()
            self._bg.add(await self.bus.watch_kv(subjects.LEDGER_BUCKET, self._on_ledger, ready))
            await asyncio.wait_for(ready.wait(), 15)
        self._sub = await self.bus.work_queue(
            BINDER_CONSUMER, [subjects.alloc_any("decided"), subjects.alloc("failed")]
        )
        self._bg.spawn(self._consume(), "binder-consume")
        if serve_api:
            self._svc = await add_service(
                self.bus, "hami-binder",
                {subjects.API_SUBMIT: self.submit, subjects.API_RELEASE: self.release_endpoint},
            )

    async def stop(self) -> None:
        await self._bg.stop()
        if self._svc is not None:
            await self._svc.stop()  # type: ignore[attr-defined]
            self._svc = None
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
