"""The binder's wiring: decisions become bindings; clients' asks become requests.

Decisions arrive on a durable consumer shared by the binder replicas. What "binding"
means is the backend's business: in standalone mode (this module's
:class:`StandaloneBackend`) a decision is bound at once; the Kubernetes backend writes
HAMi's annotations and creates the Binding. Either way the binder then publishes
``bound`` (or ``bind_failed`` plus ``released``, so placement frees the reservation).

For direct clients (``hami submit`` / ``hami release``) the binder answers
``hami.api.submit``, ``hami.api.release`` and ``hami.api.withdraw``, each request in a
task of its own (``shared.bus.add_service``), so one submit waiting for capacity holds
back no other request.

Every submit gets one answer, and nothing stays allocated that its client was not told
about. The rules:

1. A submit has a deadline: taken at + ``timeout`` (more than 0, at most
   ``bus.maxWait``; anything else is refused). Its uid may be the client's own, so the
   client can withdraw it by uid whatever happens to the binder that took it.
2. Any replica's waiter is answered: every replica follows ``decided``, ``bound``,
   ``bind_failed``, ``failed`` and ``released`` with a plain subscription, whichever
   replica the shared work queue hands the decision to. A waiter replies "placed" once
   its decision is bound, and only after recording the outcome ``answered`` in the
   ``hami-outcomes`` bucket (``shared.outcomes``) with a create.
3. A waiter that reaches its deadline, a ``hami.api.withdraw`` and a stopping binder
   record ``withdrawn`` there and publish ``released`` (reason "withdrawn"), so
   placement never places the request and frees it if it did. A create loses to a
   record already there, so "answered" and "withdrawn" never both hold for a client.
4. The work-queue handler, after binding a decision of a direct client (source
   "cli"), reads the outcome: ``withdrawn``: it releases the allocation (reason
   "orphaned"); ``answered``: done; none yet: it looks again at the request's deadline
   (plus a grace for clocks), and if nobody answered by then it records ``withdrawn``
   and releases it. So a binder that dies holding a waiter leaves nothing allocated
   past the deadline, and a client whose reply was lost withdraws by uid at once
   (``hami submit`` does, also on Ctrl-C and on its own timeout).

The look at the deadline is kept in memory by the replica that bound the decision;
that replica dying too before the deadline leaves the allocation to its client's
withdrawal (``hami submit`` always withdraws when it has no answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from nats.aio.msg import Msg

from shared import limits, logs, subjects, tracing
from shared.bus import (
    ApiService,
    BadMessage,
    Bus,
    WorkQueue,
    add_service,
    decode,
    decode_entry,
    decode_event,
)
from shared.config import Config
from shared.hami.codec import NODE_POLICIES, parse_gpu_policy
from shared.lifecycle import Background
from shared.outcomes import ANSWERED, WITHDRAWN, Outcomes
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
    RequestOutcome,
    SubmitReply,
    SubmitRequest,
    WithdrawReply,
    WithdrawRequest,
)

log = logging.getLogger("hami.binder")
noisy = logs.RateLimited(log)  # repeated garbage: a line a minute, with a count
tracer = tracing.tracer("hami.binder")

BINDER_CONSUMER = "binder"
# A client's own allocation id: UUID-like, bounded (it is a KV key and in message ids).
UID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{7,63}")
# Past a decision's deadline, how long before nobody's answer counts as none (clocks of
# two binder replicas may differ by this much).
ORPHAN_GRACE_S = 2.0


class BindError(Exception):
    """The backend could not bind; the reservation is released."""


class Backend(Protocol):
    async def bind(self, decision: AllocDecided) -> None: ...


class StandaloneBackend:
    """No cluster: a decision is bound the moment it is made."""

    async def bind(self, decision: AllocDecided) -> None:
        return None


def validate_uid(uid: str) -> None:
    if not UID_RE.fullmatch(uid):
        raise ValueError(
            f"uid {uid[:80]!r}: 8 to 64 letters, digits, '-' or '_' are required, starting with a letter or digit"
        )


def validate_submit(req: SubmitRequest, max_wait: float = 3600.0) -> None:
    if not req.name or len(req.name) > 253:
        raise ValueError("a name of 1 to 253 characters is required")
    # No endless wait: a request nobody answers must end, so that it is never placed late.
    if not 0 < req.timeout <= max_wait:
        raise ValueError(f"timeout must be more than 0 and at most {max_wait:g}s (bus.maxWait), got {req.timeout:g}")
    if req.uid:
        validate_uid(req.uid)
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


@dataclass
class _Waiter:
    """A submit waiting for its answer; filled from the followed events."""

    deadline: float
    fut: asyncio.Future[AllocDecided | AllocFailed | AllocReleased]
    decided: AllocDecided | None = None
    bound: bool = False
    last_failure: AllocFailed | None = None  # the latest "still pending" answer, for a timeout's why


@dataclass(order=True)
class _Due:
    """A decision nobody had answered when it was bound: look again at ``at``."""

    at: float
    decision: AllocDecided = field(compare=False)


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
        self.waiters: dict[str, _Waiter] = {}
        self.outcomes = Outcomes(bus, cfg.bus.max_wait)
        self._due: list[_Due] = []  # heap: decisions to look at again at their deadline
        self._due_changed = asyncio.Event()
        self.gone: dict[str, asyncio.Event] = {}  # uid -> set when it leaves the ledger
        self.ledger_uids: dict[str, set[str]] = {}  # node -> uids in its ledger
        self.names: dict[str, tuple[str, str]] = {}  # uid -> (name, namespace), ledger's
        self.serve_api = True
        self._bg = Background()
        self._sub: WorkQueue | None = None
        self._svc: ApiService | None = None

    @staticmethod
    def key(name: str, namespace: str = "") -> str:
        # The namespace escaped (no "/" left in it): ("a/b", "c") and ("a", "b/c") differ.
        return f"{subjects.token(namespace)}/{name}"

    # -------------------------------------------------------------- ledger view

    async def _on_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            return
        led, why = decode_entry(value, NodeLedger, key, limits.ledger_problems)
        if led is None:
            # The names in use there stay as last read: forgetting them would let a
            # second submit take a name the node may still hold. Placement sets the
            # node aside and inventory announces it.
            noisy.warning(f"garbage:{key}", "ignoring garbage ledger entry of %s: %s",
                          limits.node_of_key(key), why)
            return
        now = set(led.allocs)
        for uid in self.ledger_uids.get(led.node, set()) - now:
            if any(uid in held for n, held in self.ledger_uids.items() if n != led.node):
                continue  # moved to another node (hami defrag --apply): still held
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
        if d.source == "cli":
            await self.settle_cli(d)

    async def handle_failed(self, f: AllocFailed) -> None:
        """Waiters are answered from the followed events (:meth:`_follow`)."""

    # ------------------------------------------------------------------ outcomes

    async def settle_cli(self, d: AllocDecided, *, due: bool = False) -> None:
        """Rule 4: a bound decision of a direct client is kept only if its client was
        (or, before its deadline, may still be) told; else it is released."""
        held = await self.outcomes.get(d.uid)
        if held is not None and held.state == ANSWERED:
            return
        if held is None:
            if not due and d.uid in self.waiters:
                return  # this replica's waiter answers it or withdraws it (rule 3)
            if not due and (d.deadline <= 0 or time.time() < d.deadline + ORPHAN_GRACE_S):
                if d.deadline > 0:  # a waiter (here, on another replica) may still answer
                    heapq.heappush(self._due, _Due(d.deadline + ORPHAN_GRACE_S, d))
                    self._due_changed.set()
                return
            held = await self.outcomes.claim(RequestOutcome(
                uid=d.uid, state=WITHDRAWN, name=d.name, namespace=d.namespace,
                deadline=d.deadline, at=time.time(),
            ))
            if held.state == ANSWERED:
                return
        log.info("releasing %s on %s: nobody waits for it", d.name, d.node)
        await self.release(d.uid, d.name, d.namespace, d.node, "orphaned",
                           msg_id=f"released:{d.uid}:orphaned:{d.decided_at}")

    async def _sweep_due(self) -> None:
        """Look again at the decisions nobody had answered, at their deadlines."""
        while True:
            if not self._due:
                self._due_changed.clear()
                await self._due_changed.wait()
                continue
            wait = self._due[0].at - time.time()
            if wait > 0:
                self._due_changed.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that
                # meets the event being set, and this loop would then outlive stop().
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._due_changed.wait()
                continue
            d = heapq.heappop(self._due).decision
            try:
                await self.settle_cli(d, due=True)
            except Exception as exc:  # NATS away: look again shortly
                log.warning("cannot settle %s yet: %s", d.uid, exc)
                heapq.heappush(self._due, _Due(time.time() + 1.0, d))

    async def _follow(self, msg: Msg) -> None:
        """Rule 2: answer this replica's waiters from the events, whoever handled them."""
        if not self.waiters:
            return
        ev = decode_event(msg.data)
        w = self.waiters.get(getattr(ev, "uid", ""))
        if w is None or w.fut.done():
            return
        if isinstance(ev, AllocDecided):
            w.decided = ev
        elif isinstance(ev, AllocBound):
            w.bound = True
        elif isinstance(ev, AllocBindFailed):  # released; a new decision may follow
            w.decided, w.bound = None, False
            return
        elif isinstance(ev, AllocFailed):
            if not ev.pending:
                w.fut.set_result(ev)
            else:
                w.last_failure = ev
            return
        elif isinstance(ev, AllocReleased):
            if ev.reason == "withdrawn":  # withdrawn through another replica
                w.fut.set_result(ev)
            return
        if w.decided is not None and w.bound:
            w.fut.set_result(w.decided)

    async def withdraw(self, uid: str, name: str, namespace: str, node: str = "",
                       deadline: float = 0.0) -> None:
        """Rule 3: nobody waits for ``uid``: never place it, release it if placed."""
        await self.outcomes.withdraw(uid, name, namespace, deadline)
        await self.release(uid, name, namespace, node, "withdrawn",
                           msg_id=f"released:{uid}:withdrawn")

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
        with tracing.receive(self.bus.tracer, msg.subject, msg.headers):
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
        validate_submit(req, self.cfg.bus.max_wait)
        k = self.key(req.name, req.namespace)
        if k in self.by_name or k in self.inflight:
            return SubmitReply(ok=False, name=req.name, error=f"{req.name} already has an allocation; release it first")
        uid = req.uid or str(uuid.uuid4())
        if req.uid and (uid in self.waiters or uid in self.names or await self.outcomes.get(uid) is not None):
            # Reused (a retry of a submit already taken, or withdrawn): a second request
            # under one uid would be taken for the first.
            return SubmitReply(ok=False, uid=uid, name=req.name, error=f"uid {uid} is already used; choose another")
        now = time.time()
        w = _Waiter(deadline=now + req.timeout, fut=asyncio.get_running_loop().create_future())
        self.waiters[uid] = w
        self.inflight[k] = uid
        try:
            return await self._wait(req, uid, w, now)
        except asyncio.CancelledError:
            # The binder is stopping: its client will hear "stopping", so nobody waits.
            node = w.decided.node if w.decided is not None else ""
            with contextlib.suppress(Exception):
                await asyncio.shield(self.withdraw(uid, req.name, req.namespace, node, w.deadline))
            raise
        finally:
            self.waiters.pop(uid, None)
            if self.inflight.get(k) == uid:
                del self.inflight[k]

    async def _wait(self, req: SubmitRequest, uid: str, w: _Waiter, now: float) -> SubmitReply:
        ask = AllocRequested(
            uid=uid, name=req.name, namespace=req.namespace, containers=req.containers,
            constraints=req.constraints, priority=req.priority, pending=req.wait or bool(req.gang),
            source="cli", requested_at=now, deadline=w.deadline, pod_priority=req.pod_priority,
            queue=req.queue,
            # a gang member waits for its gang (its reservation deadline bounds that)
            gang=req.gang, gang_size=req.gang_size, gang_timeout=req.gang_timeout,
            movable=req.movable,
        )
        with tracing.span(tracer, "binder.submit") as span:
            span.set_attribute("hami.uid", uid)
            await self.bus.publish_event(subjects.alloc("requested"), ask, msg_id=f"requested:{uid}")
        try:
            result = await asyncio.wait_for(asyncio.shield(w.fut), timeout=max(w.deadline - time.time(), 0.0))
        except TimeoutError:
            result = None
        if isinstance(result, AllocDecided):
            held = await self.outcomes.claim(RequestOutcome(
                uid=uid, state=ANSWERED, name=req.name, namespace=req.namespace,
                deadline=w.deadline, at=time.time(),
            ))
            if held.state == ANSWERED:
                return SubmitReply(ok=True, uid=uid, name=req.name, decision=result)
            # Withdrawn first (by its client, through another replica): the allocation
            # is released by rule 4; the answer says so.
            return SubmitReply(ok=False, uid=uid, name=req.name, error="withdrawn")
        if isinstance(result, AllocFailed):
            return SubmitReply(ok=False, uid=uid, name=req.name, failure=result)
        if isinstance(result, AllocReleased):
            return SubmitReply(ok=False, uid=uid, name=req.name, error="withdrawn")
        # No answer by the deadline: withdraw it so that nothing places it later (and a
        # decision not yet bound is released).
        node = w.decided.node if w.decided is not None else ""
        await self.withdraw(uid, req.name, req.namespace, node, w.deadline)
        # The last reasons placement gave while it kept the request pending say why.
        return SubmitReply(ok=False, uid=uid, name=req.name, failure=w.last_failure,
                           error=f"no placement within {req.timeout:g}s")

    async def withdraw_endpoint(self, data: bytes) -> WithdrawReply:
        req = decode(data, WithdrawRequest)
        validate_uid(req.uid)
        name, namespace = self.names.get(req.uid, (req.name, req.namespace))
        node = next((n for n, uids in self.ledger_uids.items() if req.uid in uids), "")
        w = self.waiters.get(req.uid)
        if not node and w is not None and w.decided is not None:
            node = w.decided.node
        await self.withdraw(req.uid, name, namespace, node)
        return WithdrawReply(ok=True, uid=req.uid, node=node)

    async def release_endpoint(self, data: bytes) -> ReleaseReply:
        req = decode(data, ReleaseRequest)
        k = self.key(req.name, req.namespace)
        found = self.by_name.get(k)
        if found is None:
            return ReleaseReply(ok=False, error=f"{req.name}: no such allocation")
        uid, node = found
        gone = self.gone.setdefault(uid, asyncio.Event())
        await self.outcomes.release(uid, req.name, req.namespace)
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
        await self.outcomes.ensure()
        self._sub = await self.bus.work_queue(
            BINDER_CONSUMER, [subjects.alloc_any("decided"), subjects.alloc("failed")]
        )
        self._bg.spawn(self._consume(), "binder-consume")
        self._bg.spawn(self._sweep_due(), "binder-orphans")
        if serve_api:
            for subject in (subjects.alloc_any("decided"), subjects.alloc("failed"),
                            subjects.alloc_any("bound"), subjects.alloc_any("bind_failed"),
                            subjects.alloc("released")):
                self._bg.add_sub(await self.bus.subscribe(subject, self._follow))
            self._svc = await add_service(
                self.bus, "hami-binder",
                {subjects.API_SUBMIT: self.submit, subjects.API_RELEASE: self.release_endpoint,
                 subjects.API_WITHDRAW: self.withdraw_endpoint},
                concurrency=self.cfg.bus.api_concurrency,
            )

    async def stop(self) -> None:
        if self._svc is not None:
            # First, while the bus is whole: the waiting submits withdraw and answer.
            await self._svc.stop()
            self._svc = None
        await self._bg.stop()
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
