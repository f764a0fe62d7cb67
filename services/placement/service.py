"""The placement service's wiring: requests in, reservations by compare-and-set, decisions out.

State comes from three KV watches (inventory, health, ledger) into the pure engine's
:class:`ClusterState`. Requests and releases arrive on one durable pull consumer shared
by all replicas (each message goes to one replica; one consumer keeps a release ahead
of the requests published after it). A reservation is written to the node's ledger
entry only if the entry is still at the revision this replica last saw; a conflict
means another replica got there first, so the node is re-read and the request decided
again. A request that fits nowhere stays pending (when it asks to) and is retried when
capacity changes — a release, a node registered or recovered — never on a timer.

A request nobody waits for is never placed. One past its ``deadline`` (set by the
binder for direct clients; 0 for Kubernetes pods) is dropped, from the batch or from
pending, and answered ``failed`` with reason "expired" once (one message id). One that
was withdrawn is dropped silently. Withdrawn is known two ways, both kept in one
bounded map (uid -> when to forget it; at most ``WITHDRAWN_CAP`` entries, none past
its request's deadline):

- the ``hami-outcomes`` bucket (``shared.outcomes``), followed by a KV watch: the binder
  records a withdrawal there *before* it publishes the ``released``, so every replica
  knows it, also one handed the request after a crash while another replica took the
  release (the work queue is shared: a request and its withdrawal may land on
  different replicas, in either order);
- a ``released`` of a uid this replica does not hold and with no node (withdrawn
  before placement, a deleted pending pod), or with reason "withdrawn"/"orphaned".

A withdrawal racing a decision on another replica may still lose (the ledger was
written first): its ``released`` then frees the reservation, or, when it reached a
replica that had not yet seen the write, the binder releases the bound decision it
finds withdrawn (services.binder, rule 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
from nats.aio.msg import Msg
from opentelemetry import context, trace

from services.placement.engine import ClusterState, Failure, Placement, Placer, defrag, preempt
from services.placement.engine import gang as gangs
from services.placement.engine import queues as fair
from services.placement.engine.model import NODE_UNFIT_POD
from shared import limits, logs, subjects, tracing
from shared.bus import (
    ApiService,
    BadMessage,
    Bus,
    Conflict,
    WorkQueue,
    add_service,
    decode,
    decode_entry,
    decode_event,
)
from shared.config import Config, ConfigError, QueueSettings, SchedulerSettings
from shared.lifecycle import Background
from shared.outcomes import CLOSED, Outcomes
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocPreempted,
    AllocReleased,
    AllocRequested,
    FilterSummary,
    FitNode,
    LedgerAlloc,
    MoveReply,
    MoveRequest,
    NodeHealth,
    NodeInventory,
    NodeLedger,
    PreemptReply,
    PreemptRequest,
    QueuesReply,
    QueuesRequest,
    QueueStatus,
    Quota,
    RequestOutcome,
)

log = logging.getLogger("hami.placement")
# Garbage on the bus or in a bucket repeats (every update of a broken writer): one line
# per kind a minute, with a count.
noisy = logs.RateLimited(log)
tracer = tracing.tracer("hami.placement")
# A handled message is acknowledged with the next batch's ledger writes (one socket
# write for both), or after this long when no batch follows.
ACK_DELAY_S = 0.005
STOP_SETTLE_S = 2.0  # at stop, for the stream to answer the events already sent

CAS_ATTEMPTS = 16
GANG_SWEEP_S = 0.5  # how often partial gangs are checked against their deadlines
# The share of time that explaining placed decisions in their traces may take (why not
# the other nodes), and the most it may save up while idle.
EXPLAIN_BUDGET = 0.005
EXPLAIN_BURST_S = 0.02  # one explanation at 5,000 nodes, then the budget
WITHDRAWN_CAP = 100_000  # withdrawn uids remembered at most (oldest forgotten first)
# Releases that mean "nobody waits for this request": never place it again.
WITHDRAWING = ("withdrawn", "orphaned")
# What a request answered by placement itself, not by the engine, fails with.
REASON_INVALID = "invalid"
REASON_INTERNAL = "internal-error"
REASON_PREEMPTED = "preempted"  # a victim's ``released``
REASON_MOVED = "moved"  # consolidation moved it (its ``released`` on the old node)
DECISION_FILTERS = [
    subjects.alloc("requested"),
    subjects.alloc("released"),
    subjects.alloc_any("released"),
]


def _deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered ``msg``, this time included."""
    try:
        return max(1, int(msg.metadata.num_delivered or 1))
    except Exception:  # not a JetStream message: no redelivery to count
        return 1


def _retrieve(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()


# ------------------------------------------------------------ decision span attributes
# What a decision span says about why (docs/operations.md, "Tracing"). Pure functions of
# the request and of what the engine returned; set only on spans that are recorded.


def _alloc_of(p: Placement, req: AllocRequested) -> LedgerAlloc:
    """The ledger entry of a placement, with the request's scheduling priority and the
    trace context of the decision (current here), for the node agent to continue."""
    return msgspec.structs.replace(
        p.to_alloc(req, time.time()),
        pod_priority=req.pod_priority,
        traceparent=tracing.traceparent(),
        movable=req.movable,  # consolidation may move it (hami defrag)
    )


def _alloc_of_request(req: AllocRequested) -> LedgerAlloc:
    """What a failure of a member not yet reserved is told about: its names."""
    return LedgerAlloc(uid=req.uid, name=req.name, namespace=req.namespace, source=req.source,
                       decided_at=req.requested_at)


def _standalone_priority(alloc: LedgerAlloc) -> int | None:
    """A direct client's allocation may be preempted; a pod's only by kube-scheduler, and
    a gang's reservation only by an older gang (its rollback requeues the whole gang)."""
    return None if alloc.source == "kube" or alloc.gang_expires > 0 else alloc.pod_priority


def request_attributes(req: AllocRequested, scheduler: SchedulerSettings) -> dict[str, Any]:
    """The request's shape and the policies it is decided by."""
    cons = req.constraints
    asks = [a for c in req.containers for a in c.devices if a.nums > 0]
    attrs: dict[str, Any] = {
        "hami.uid": req.uid,
        "hami.name": req.name,
        "hami.namespace": req.namespace,
        "hami.source": req.source,
        "hami.policy.node": (cons.node_policy or scheduler.node_policy).lower(),
        "hami.policy.gpu": cons.gpu_policy or scheduler.gpu_policy,
        "hami.request.containers": len(req.containers),
        "hami.request.gpus": sum(a.nums for a in asks),
        "hami.request.count": [a.nums for a in asks],
        "hami.request.mem_mib": [a.mem for a in asks],
        "hami.request.mem_percent": [a.mem_percent or 0 for a in asks],
        "hami.request.cores": [a.cores for a in asks],
        "hami.request.vendor": [a.vendor for a in asks],
    }
    for key, val in (("use_types", cons.use_types), ("nouse_types", cons.nouse_types),
                     ("use_uuids", cons.use_uuids), ("nouse_uuids", cons.nouse_uuids)):
        if val:
            attrs[f"hami.request.{key}"] = list(val)
    if cons.node_name:
        attrs["hami.request.node_name"] = cons.node_name
    if cons.nodes:
        attrs["hami.request.offered_nodes"] = len(cons.nodes)
    if cons.numa_bind:
        attrs["hami.request.numa_bind"] = True
    return attrs


def rejected_attributes(reasons: dict[str, int]) -> dict[str, Any]:
    """Nodes rejected, by reason with counts, most frequent first (two aligned arrays:
    reason strings are kube-scheduler's and may hold spaces)."""
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "hami.nodes.rejected": sum(reasons.values()),
        "hami.rejected.reasons": [r for r, _ in ranked],
        "hami.rejected.counts": [n for _, n in ranked],
    }


def placed_attributes(p: Placement) -> dict[str, Any]:
    """The chosen node and cards."""
    cards = [d for c in p.containers for d in c.devices]
    attrs: dict[str, Any] = {
        "hami.outcome": "placed",
        "hami.node": p.node,
        "hami.cards": [d.uuid for d in cards],
        "hami.card.index": [d.index for d in cards],
        "hami.card.type": [d.type for d in cards],
        "hami.card.mem_mib": [d.mem for d in cards],
        "hami.card.cores": [d.cores for d in cards],
    }
    if p.score:
        attrs["hami.policy.score"] = float(p.score)  # the fragmentation policies' own
    return attrs


def failed_attributes(f: Failure) -> dict[str, Any]:
    """Why no node fits: HAMi's reason counts and kube-scheduler's message."""
    return {
        "hami.outcome": "failed",
        "hami.nodes.total": f.nodes_total,
        # nodes that passed the filters and were fitted card by card
        "hami.nodes.candidates": len(f.tried),
        "hami.failure.message": f.message,
        **rejected_attributes(f.reasons),
    }


class _Decision:
    """A recorded decision span kept open from the decision to its ledger write."""

    __slots__ = ("span", "decided")

    def __init__(self, span: trace.Span, decided: float) -> None:
        self.span = span
        self.decided = decided  # perf_counter() when the decision was made


class PlacementService:
    def __init__(self, bus: Bus, cfg: Config, replica: str = "", fetch_batch: int = 64) -> None:
        self.bus = bus
        self.fetch_batch = fetch_batch
        self.cfg = cfg
        self.replica = replica or f"placement-{os.getpid()}-{id(self) % 10000}"
        self.cluster = ClusterState()
        self.placer = Placer(self.cluster, cfg.scheduler, cfg.node)
        # Queues with fair share (docs/queues.md): the configured ones and the Kubernetes
        # Queue resources (the hami-queues bucket); None: arrival order and no limits.
        self.kube_queues: dict[str, QueueSettings] = {}
        self.queues: fair.QueueTree | None = None
        self._queue_use: fair.UseCache | None = None
        # Over-quota rebalancing by preemption (docs/queues.md), only with
        # scheduler.preemption; scheduler.queueRebalance, off by default.
        self.queue_rebalance = cfg.scheduler.queue_rebalance
        try:
            self._set_queues()
        except fair.QueueError as exc:
            raise ConfigError(f"invalid configuration: queues: {exc}") from None
        self.revs: dict[str, int] = {}  # ledger revision per node, as last seen
        self._key_node: dict[str, str] = {}  # ledger KV key -> node name
        self._writing: set[str] = set()  # nodes whose ledger write awaits its reply
        self._deferred: dict[str, tuple[bytes, int]] = {}  # node -> watch update held meanwhile
        self.owner: dict[str, str] = {}  # alloc uid -> node
        self.pending: OrderedDict[str, AllocRequested] = OrderedDict()
        self.withdrawn: OrderedDict[str, float] = OrderedDict()  # uid -> forget after (epoch s)
        self.outcomes = Outcomes(bus, cfg.bus.max_wait)
        self.expired = 0
        self.lock = asyncio.Lock()
        self.capacity_changed = asyncio.Event()
        self._bg = Background()
        self._sub: WorkQueue | None = None
        self._acks_due: list[Msg] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self._unsettled = 0  # batches whose events the stream has not yet answered
        self._stopping = False
        self.decisions = 0
        self.conflicts = 0
        # Kubernetes pods decided and not yet announced: HAMi's FilteringSucceed facts
        self._filtered: dict[str, FilterSummary] = {}
        self.preemptions = 0  # allocations released to make room (scheduler.preemption)
        self._api: ApiService | None = None  # hami.placement.preempt (the extender's)
        # Nodes set aside because their inventory or ledger entry is garbage (KV key ->
        # why), and the health verdicts as last read, to restore when the entry heals.
        self.garbage: dict[str, str] = {}
        self._healthy: dict[str, bool] = {}
        self.dead_letters = 0
        self._open: dict[str, _Decision] = {}  # uid -> its decision span, until committed
        self._explain_credit = EXPLAIN_BURST_S  # seconds of explaining allowed now
        self._explain_at = time.monotonic()
        # Gangs (docs/gangs.md): each member's request as this replica last saw it (to
        # announce it at commit), and the nodes whose ledger holds a gang member.
        self.gang_reqs: dict[str, AllocRequested] = {}
        self._gang_nodes: set[str] = set()

    # ----------------------------------------------------------------- KV watches

    def _nodes_of_key(self, key: str) -> list[str]:
        return [n for n in list(self.cluster.nodes) if subjects.kv_key(n) == key]

    def _set_aside(self, bucket: str, key: str, why: str) -> None:
        """A garbage entry: its node takes no new placements until the entry is good.

        An unreadable inventory entry removes the node (nothing of it can be trusted);
        an unreadable ledger entry keeps it unhealthy, since what it holds is unknown
        and placing there could overcommit a card.
        """
        first = key not in self.garbage
        self.garbage[key] = why
        if bucket == subjects.NODES_BUCKET:
            for name in self._nodes_of_key(key):
                self.cluster.remove_node(name)
        else:
            for name in self._nodes_of_key(key):
                self.cluster.set_health(name, False)
        if first:
            log.warning("node %s set aside: %s entry is garbage: %s",
                        limits.node_of_key(key), bucket, why)
        else:
            noisy.warning(f"garbage:{bucket}:{key}", "node %s still set aside: %s entry: %s",
                          limits.node_of_key(key), bucket, why)

    def _restore(self, key: str) -> None:
        if self.garbage.pop(key, None) is not None:
            for name in self._nodes_of_key(key):
                self.cluster.set_health(name, self._healthy.get(name, True))
            log.info("node %s usable again: its entry is good", limits.node_of_key(key))
            self.capacity_changed.set()

    async def _on_node(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            for name in self._nodes_of_key(key):
                self.cluster.remove_node(name)
            self.garbage.pop(key, None)
            return
        inv, why = decode_entry(value, NodeInventory, key, limits.inventory_problems)
        if inv is None:
            self._set_aside(subjects.NODES_BUCKET, key, why)
            return
        self.cluster.upsert_node(inv)
        if key in self.garbage and self.garbage[key].startswith(subjects.LEDGER_BUCKET):
            self.cluster.set_health(inv.node, False)  # its ledger is still garbage
        else:
            self._restore(key)
        self.capacity_changed.set()

    async def _on_health(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            return
        try:
            h = decode(value, NodeHealth)
        except BadMessage as exc:
            # A verdict that cannot be read changes nothing: the last one stands.
            noisy.warning(f"garbage:health:{key}", "ignoring garbage health entry %s: %s", key, exc)
            return
        self._healthy[h.node] = h.healthy
        if subjects.kv_key(h.node) in self.garbage:
            return  # set aside until its entries are good, whatever the heartbeats say
        self.cluster.set_health(h.node, h.healthy)
        if h.healthy:
            self.capacity_changed.set()

    async def _on_quota(self, key: str, value: bytes | None, revision: int) -> None:
        # The key is the namespace (written by the Kubernetes binder from ResourceQuotas).
        self.cluster.set_quota(key, decode(value, Quota) if value else None)
        self.capacity_changed.set()

    async def _on_ledger(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            return
        node = self._key_node.get(key)
        if node is not None and revision <= self.revs.get(node, 0):
            # Our own write, already applied, or an older one arriving late; most of
            # the watch's traffic is our own writes, so skip them before decoding.
            return
        if node is not None and node in self._writing:
            # Our write to this node may be echoing back before its reply: decide
            # once the reply says which revision was ours.
            self._deferred[node] = (value, revision)
            return
        led, why = decode_entry(value, NodeLedger, key, limits.ledger_problems)
        if led is None:
            self._bad_ledger(key, revision, why)
            return
        self._key_node[key] = led.node
        if revision <= self.revs.get(led.node, 0):
            return
        self._adopt(led, revision)
        if key in self.garbage:
            self._restore(key)

    def _bad_ledger(self, key: str, revision: int, why: str) -> None:
        # The revision stays the last good one: a write there conflicts with the
        # garbage and fails (it is never overwritten blindly by a view that may be old).
        self._set_aside(subjects.LEDGER_BUCKET, key, f"{subjects.LEDGER_BUCKET}: {why}")

    def _adopt(self, led: NodeLedger, revision: int) -> None:
        before = set(self.cluster.ledger(led.node).allocs) if led.node in self.revs else set()
        self.cluster.set_ledger(led.node, led)
        self.revs[led.node] = revision
        for uid in before - set(led.allocs):
            if self.owner.get(uid) == led.node:
                del self.owner[uid]
        if any(a.gang for a in led.allocs.values()):
            self._gang_nodes.add(led.node)
        else:
            self._gang_nodes.discard(led.node)
        for uid in led.allocs:
            self.owner[uid] = led.node
        if before - set(led.allocs):
            self.capacity_changed.set()

    async def _write_ledger(self, led: NodeLedger) -> int | None:
        """Compare-and-set ``led`` over the revision this replica last saw of its node,
        and adopt it: its new revision, or None after a conflict (the node read again,
        for the caller to decide again)."""
        try:
            rev = await self.bus.kv_cas(subjects.LEDGER_BUCKET, led.node, led, self.revs.get(led.node, 0))
        except Conflict:
            self.conflicts += 1
            await self._refresh(led.node)
            return None
        self._adopt(led, rev)
        return rev

    async def _refresh(self, node: str) -> None:
        led, rev = await self.bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
        self._adopt(led or NodeLedger(node=node), rev)

    # ------------------------------------------------------- withdrawn and expired

    async def _on_outcome(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            return
        o = decode(value, RequestOutcome)
        if o.state in CLOSED:
            self._note_withdrawn(o.uid, o.deadline)

    def _note_withdrawn(self, uid: str, deadline: float = 0.0) -> None:
        """Remember that nobody waits for ``uid``: until its deadline (after which the
        deadline alone refuses it), or the longest wait when it has none."""
        now = time.time()
        until = deadline if deadline > 0 else now + self.cfg.bus.max_wait
        self.withdrawn[uid] = max(until, self.withdrawn.get(uid, 0.0))
        self.withdrawn.move_to_end(uid)
        self.pending.pop(uid, None)
        while self.withdrawn and (
            len(self.withdrawn) > WITHDRAWN_CAP or next(iter(self.withdrawn.values())) < now
        ):
            self.withdrawn.popitem(last=False)

    def is_withdrawn(self, uid: str) -> bool:
        until = self.withdrawn.get(uid)
        if until is None:
            return False
        if until < time.time():
            del self.withdrawn[uid]
            return False
        return True

    async def _refused(self, req: AllocRequested, acks: list[asyncio.Future[int]]) -> bool:
        """True when ``req`` must not be placed: withdrawn, or past its deadline (then
        answered ``failed``/"expired", pending False, once: one message id)."""
        if self.is_withdrawn(req.uid):
            self.pending.pop(req.uid, None)
            log.debug("%s: withdrawn; not placed", req.uid)
            return True
        if 0 < req.deadline <= time.time():
            self.pending.pop(req.uid, None)
            self.expired += 1
            ev = AllocFailed(
                uid=req.uid, name=req.name, namespace=req.namespace, pending=False,
                message=f"{req.name}: its deadline passed before it could be placed",
                source=req.source, requested_at=req.requested_at, failed_at=time.time(),
                reason="expired",
            )
            acks.append(await self.bus.publish_event_nowait(
                subjects.alloc("failed"), ev, msg_id=f"failed:{req.uid}:expired"))
            return True
        return False

    # -------------------------------------------------------------- the decisions

    def _trace_decision(
        self, span: trace.Span, req: AllocRequested, result: Placement | Failure, took: float
    ) -> None:
        """The decision's attributes, on a span that is recorded (else nothing is done)."""
        if not span.is_recording():
            return
        span.set_attributes(request_attributes(req, self.cfg.scheduler))
        span.set_attribute("hami.decide_ms", took * 1000.0)
        if isinstance(result, Failure):
            span.set_attributes(failed_attributes(result))
            return
        span.set_attributes(placed_attributes(result))
        rec = self.cluster.nodes.get(result.node)
        if rec is not None:  # HAMi's node score before this pod (binpack/spread order by it)
            span.set_attribute(
                "hami.node.score", float(self.placer.node_scores(np.array([rec.row]))[0])
            )
        span.set_attribute("hami.nodes.total", self.cluster.nodes_total())
        # Why not the other nodes: the engine stops at the first node that fits, so the
        # reasons of the others are asked for here. That is the engine's explanation
        # over every node (40 ms at 5,000 nodes), so it gets at most EXPLAIN_BUDGET of
        # the time, whatever the sampling; a span past the budget says so.
        now = time.monotonic()
        self._explain_credit = min(
            EXPLAIN_BURST_S, self._explain_credit + (now - self._explain_at) * EXPLAIN_BUDGET
        )
        self._explain_at = now
        if self._explain_credit <= 0:
            span.set_attribute("hami.rejected.omitted", True)
            return
        cons = req.constraints
        probe = req if cons.nodes else msgspec.structs.replace(
            req, constraints=msgspec.structs.replace(cons, nodes=list(self.cluster.nodes))
        )
        t0 = time.perf_counter()
        try:
            counts = Counter(self.placer.node_reasons(probe, Failure()).values())
        except Exception as exc:  # a trace must never cost a decision
            noisy.warning("trace-reasons", "cannot explain decision %s for its trace: %s: %s",
                          req.uid, type(exc).__name__, exc)
            return
        finally:
            self._explain_credit -= time.perf_counter() - t0
        # every filter passed (the chosen node among them)
        span.set_attribute("hami.nodes.candidates", counts.pop(NODE_UNFIT_POD, 0))
        span.set_attributes(rejected_attributes(dict(counts)))

    def _decide(self, req: AllocRequested, span: trace.Span) -> Placement | Failure:
        t0 = time.perf_counter()
        result = self.placer.decide(req)
        if self.queues is not None or req.queue:
            result = self._within_limits(req, result)
        if isinstance(result, Placement) and result.fits is not None:
            if len(self._filtered) >= 10_000:  # decided but never announced (a failed write)
                self._filtered.clear()
            offered = len(req.constraints.nodes) or self.cluster.nodes_total()
            nodes = [FitNode(node=n, score=s) for n, s in result.fits]
            self._filtered[req.uid] = FilterSummary(offered=offered, fits=result.fit_count, nodes=nodes)
        self._trace_decision(span, req, result, time.perf_counter() - t0)
        return result

    async def _reserve(
        self, req: AllocRequested, first: Placement | Failure, gang_expires: float = 0.0
    ) -> tuple[Placement, LedgerAlloc, int] | Failure:
        result = first
        for _ in range(CAS_ATTEMPTS):
            if isinstance(result, Failure):
                return result
            node = result.node
            alloc = _alloc_of(result, req)
            current = self.cluster.ledger(node)
            if gang_expires:  # a gang member: a reservation until its gang is complete
                alloc = gangs.reservation(alloc, req, gang_expires)
            new = NodeLedger(node=node, allocs={**current.allocs, req.uid: alloc})
            try:
                rev = await self.bus.kv_cas(
                    subjects.LEDGER_BUCKET, node, new, self.revs.get(node, 0)
                )
            except Conflict:
                self.conflicts += 1
                span = trace.get_current_span()
                if span.is_recording():
                    span.add_event("conflict", {"hami.node": node})
                    conflicts = int(span.attributes.get("hami.conflicts", 0)) + 1  # type: ignore[attr-defined]
                    span.set_attribute("hami.conflicts", conflicts)
                await self._refresh(node)
                result = self._decide(req, span)
                continue
            self.revs[node] = rev
            self.cluster.reserve(node, alloc)
            self.owner[req.uid] = node
            return result, alloc, rev
        where = result.node if isinstance(result, Placement) else "its node"
        raise RuntimeError(f"{req.uid}: ledger of {where} kept changing; will retry")

    def _decided_event(self, req: AllocRequested, node: str, alloc: LedgerAlloc, rev: int) -> AllocDecided:
        return AllocDecided(
            uid=req.uid,
            name=req.name,
            namespace=req.namespace,
            node=node,
            containers=alloc.containers,
            source=req.source,
            requested_at=req.requested_at,
            decided_at=alloc.decided_at,
            ledger_revision=rev,
            replica=self.replica,
            deadline=req.deadline,
            conflicts=self.conflicts,
            filtered=self._filtered.pop(req.uid, None),
        )

    async def _publish_decided(
        self,
        req: AllocRequested,
        node: str,
        alloc: LedgerAlloc,
        rev: int,
        ctx: context.Context | None = None,
    ) -> asyncio.Future[int]:
        # The event carries the trace of the decision that made it, also when it is
        # published after the batch it was decided in.
        token = context.attach(ctx) if ctx is not None else None
        try:
            return await self.bus.publish_event_nowait(
                subjects.alloc("decided", node),
                self._decided_event(req, node, alloc, rev),
                msg_id=f"decided:{req.uid}:{alloc.decided_at}",
            )
        finally:
            if token is not None:
                context.detach(token)

    async def _publish_failed(self, req: AllocRequested, result: Failure) -> asyncio.Future[int]:
        ev = AllocFailed(
            uid=req.uid,
            name=req.name,
            namespace=req.namespace,
            reasons=result.reasons,
            nodes_total=result.nodes_total,
            message=result.message,
            pending=req.pending,
            source=req.source,
            requested_at=req.requested_at,
            failed_at=time.time(),
            node_reasons=self.placer.node_reasons(req, result) if req.constraints.nodes else {},
            # the binder's FilteringFailed events name them (only Kubernetes pods get events)
            reason_nodes=self.placer.reason_nodes(req, result) if req.source == "kube" else {},
        )
        return await self.bus.publish_event_nowait(
            subjects.alloc("failed"), ev, msg_id=f"failed:{req.uid}:{req.requested_at}"
        )

    # ---------------------------------------------------------------------- gangs

    def _gang_views(self) -> dict[str, gangs.GangView]:
        return gangs.gangs_in(self.cluster.ledger(n) for n in sorted(self._gang_nodes))

    async def _gang_member(
        self, req: AllocRequested, acks: list[asyncio.Future[int]], retry: bool
    ) -> bool:
        """Reserve one member of a gang (never announced before the gang commits); commit
        the gang when this completes it. Where it does not fit, younger gangs holding
        what it needs are rolled back (wound-wait, engine/gang.py); else it waits."""
        key = gangs.request_key(req)
        self.gang_reqs[req.uid] = req
        views = self._gang_views()
        view = views.get(key)
        expires = gangs.expiry_for(view, time.time(), req.gang_timeout)
        with tracing.span(tracer, "placement.decide") as span:
            span.set_attribute("hami.gang", key)
            if not retry:
                self.placer.observe(req)
            decided = self._decide(req, span)
            if isinstance(decided, Failure):
                wound = gangs.wound_priority(views, gangs.rank_for(view, key, expires))
                choice = preempt.choose(self.placer, req, 1, priority_of=wound)
                if choice is not None:
                    held = self.cluster.ledger(choice.node).allocs
                    for loser in sorted({held[u].gang for u in choice.uids}):
                        log.info("gang %s rolled back: older gang %s needs its cards", loser, key)
                        await self._gang_rollback(loser, acks, "wounded")
                    decided = self._decide(req, span)
            result = await self._reserve(req, decided, expires)
            if isinstance(result, Failure):
                self.pending[req.uid] = req
                if not retry:
                    acks.append(await self._publish_failed(req, result))
                return False
            self.pending.pop(req.uid, None)
            self._gang_nodes.add(result[0].node)
        view = self._gang_views().get(key)
        if view is not None and view.complete:
            await self._gang_commit(key, acks)
        return True

    async def _gang_commit(self, key: str, acks: list[asyncio.Future[int]]) -> None:
        """Commit a complete gang: every reservation rewritten without its deadline, node
        by node, then every member announced. Idempotent: run again (after a conflict,
        or by a replica that found the commit half done) it finishes the rest."""
        for _ in range(CAS_ATTEMPTS):
            view = self._gang_views().get(key)
            if view is None or not view.complete or not view.reserved:
                return
            conflict = False
            for node in sorted({m.node for m in view.reserved}):
                led = gangs.committed_ledger(self.cluster.ledger(node), key)
                if led is None:
                    continue
                if await self._write_ledger(led) is None:
                    conflict = True
                    break
            if conflict:
                continue
            log.info("gang %s committed: %d members", key, len(view.members))
            for uid, m in sorted(view.members.items()):
                alloc = self.cluster.ledger(m.node).allocs.get(uid)
                if alloc is None:
                    continue
                req = self.gang_reqs.pop(uid, None) or AllocRequested(
                    uid=uid, name=alloc.name, namespace=alloc.namespace, source=alloc.source,
                    requested_at=alloc.decided_at,
                )
                self.pending.pop(uid, None)
                self.decisions += 1
                # one message id per decision: a member announced twice is stored once
                acks.append(await self._publish_decided(req, m.node, alloc, self.revs.get(m.node, 0)))
            return
        raise RuntimeError(f"gang {key}: ledgers kept changing during its commit; will retry")

    async def _gang_rollback(self, key: str, acks: list[asyncio.Future[int]], why: str) -> None:
        """Remove a partial gang's reservations from every ledger. ``why`` "wounded": an
        older gang needs the room, and the members this replica knows wait again;
        "expired": its deadline passed, and its members are answered ``failed``."""
        gone: list[LedgerAlloc] = []
        for node in sorted(self._gang_nodes):
            for _ in range(CAS_ATTEMPTS):
                got = gangs.rolled_back_ledger(self.cluster.ledger(node), key)
                if got is None:
                    break
                led, removed = got
                if await self._write_ledger(led) is None:
                    continue
                gone.extend(removed)
                break
        self.capacity_changed.set()
        members = {a.uid: a for a in gone}
        for uid, known in self.gang_reqs.items():
            if gangs.request_key(known) == key and uid not in members and uid in self.pending:
                members[uid] = _alloc_of_request(known)
        for uid, a in sorted(members.items()):
            req = self.gang_reqs.get(uid)
            if why == "wounded" and req is not None:
                self.pending[uid] = req  # placed again when there is room
                continue
            self.gang_reqs.pop(uid, None)
            self.pending.pop(uid, None)
            self._note_withdrawn(uid, req.deadline if req is not None else 0.0)
            reason = "gang-expired" if why == "expired" else "gang-rolled-back"
            ev = AllocFailed(
                uid=uid, name=a.name, namespace=a.namespace, pending=False, reasons={reason: 1},
                message=f"gang {key}: not all of its members could be placed by its deadline; "
                        "its reservations were rolled back" if why == "expired" else
                        f"gang {key}: rolled back for an older gang, and its request is unknown here",
                source=a.source, requested_at=req.requested_at if req is not None else a.decided_at,
                failed_at=time.time(), reason=reason,
            )
            acks.append(await self.bus.publish_event_nowait(
                subjects.alloc("failed"), ev, msg_id=f"failed:{uid}:{reason}"))

    async def gang_sweep(self) -> None:
        """Carry on what the ledger's gangs need now (engine/gang.py ``sweep``): commit the
        complete ones, roll back the partial ones past their deadline. Also at start, so
        a gang left half done by a placement that stopped is finished or undone."""
        acts = gangs.sweep(self._gang_views().values(), time.time())
        if not acts:
            return
        acks: list[asyncio.Future[int]] = []
        try:
            async with self.lock:
                for act in gangs.sweep(self._gang_views().values(), time.time()):
                    if act.verb == "commit":
                        await self._gang_commit(act.key, acks)
                    else:
                        log.info("gang %s rolled back: its deadline passed", act.key)
                        await self._gang_rollback(act.key, acks, "expired")
        finally:
            if acks:
                await asyncio.gather(*acks)

    async def _gang_sweeper(self) -> None:
        while True:
            try:
                await self.gang_sweep()
            except Exception:
                log.exception("gang sweep failed; trying again")
            await asyncio.sleep(GANG_SWEEP_S)

    # --------------------------------------------------------------- consolidation

    def _planner_view(self) -> tuple[list[defrag.Card], list[defrag.Holding]]:
        st = self.cluster.status()
        for n in st.nodes:
            n.held = list(self.cluster.ledger(n.node).allocs.values())
        return defrag.from_status(st)

    async def move_endpoint(self, data: bytes) -> MoveReply:
        """``hami.placement.move``: re-place one movable allocation on the cards named
        (``hami defrag --apply``), if they have room now; refused otherwise."""
        ask = decode(data, MoveRequest)
        acks: list[asyncio.Future[int]] = []
        try:
            async with self.lock:
                return await self._move(ask, acks)
        finally:
            if acks:
                await asyncio.gather(*acks)

    async def _move(self, ask: MoveRequest, acks: list[asyncio.Future[int]]) -> MoveReply:
        def no(why: str) -> MoveReply:
            return MoveReply(ok=False, uid=ask.uid, error=why)

        for _ in range(CAS_ATTEMPTS):
            node = self.owner.get(ask.uid, "")
            alloc = self.cluster.ledger(node).allocs.get(ask.uid) if node else None
            if alloc is None:
                return no(f"{ask.uid}: no such allocation")
            if not alloc.movable:
                return no(f"{alloc.name}: not movable (submit it with --movable)")
            if alloc.source == "kube":
                return no(f"{alloc.name}: a pod moves by eviction, not through placement")
            if alloc.gang_expires > 0:
                return no(f"{alloc.name}: reserved for its gang, not yet placed")
            rec = self.cluster.nodes.get(ask.to_node)
            if rec is None:
                return no(f"{ask.to_node}: no such node")
            cards, holdings = self._planner_view()
            h = next(x for x in holdings if x.uid == ask.uid)
            mv = defrag.Move(uid=h.uid, name=h.name, namespace=h.namespace, from_node=node,
                             to_node=ask.to_node, from_cards=tuple(g.uuid for g in h.grants),
                             to_cards=tuple(ask.to_cards))
            try:
                defrag.check(cards, holdings, [mv])
            except (defrag.PlanError, ValueError) as exc:
                return no(str(exc))
            devs = {d.uuid: d for d in rec.inv.devices}
            to = dict(zip(mv.from_cards, mv.to_cards, strict=True))
            moved = msgspec.structs.replace(alloc, decided_at=time.time(), containers=[
                msgspec.structs.replace(c, devices=[
                    msgspec.structs.replace(g, uuid=to[g.uuid], index=devs[to[g.uuid]].index,
                                            type=devs[to[g.uuid]].type)
                    for g in c.devices])
                for c in alloc.containers])
            dst = self.cluster.ledger(ask.to_node)
            led = NodeLedger(node=ask.to_node, allocs={**dst.allocs, ask.uid: moved})
            # Onto the new cards first: until the old ones are released it holds both
            # (never neither), so nobody else can take the room it is moving into.
            rev = await self._write_ledger(led)
            if rev is None:
                continue
            if node != ask.to_node:
                await self._drop(node, ask.uid)
            self.owner[ask.uid] = ask.to_node
            log.info("moved %s from %s %s to %s %s", alloc.name, node, list(mv.from_cards),
                     ask.to_node, list(mv.to_cards))
            now = time.time()
            acks.append(await self.bus.publish_event_nowait(
                subjects.alloc("released", node),
                AllocReleased(uid=ask.uid, name=alloc.name, namespace=alloc.namespace, node=node,
                              reason=REASON_MOVED, at=now),
                msg_id=f"released:{ask.uid}:{REASON_MOVED}:{moved.decided_at}"))
            req = AllocRequested(uid=ask.uid, name=alloc.name, namespace=alloc.namespace,
                                 source=alloc.source, requested_at=now)
            acks.append(await self._publish_decided(req, ask.to_node, moved, rev))
            self.capacity_changed.set()
            return MoveReply(ok=True, uid=ask.uid, node=ask.to_node, cards=list(mv.to_cards))
        return no(f"{ask.uid}: the ledgers kept changing; try again")

    async def _drop(self, node: str, uid: str) -> None:
        for _ in range(CAS_ATTEMPTS):
            cur = self.cluster.ledger(node)
            if uid not in cur.allocs:
                return
            led = NodeLedger(node=node, allocs={k: v for k, v in cur.allocs.items() if k != uid})
            if await self._write_ledger(led) is not None:
                return
        raise RuntimeError(f"{uid}: ledger of {node} kept changing while it moved")

    # ----------------------------------------------------------------- preemption

    def _may_preempt(self, req: AllocRequested) -> bool:
        # Kubernetes pods preempt through kube-scheduler (the extender's preempt verb),
        # which evicts the victims; placement releasing a running pod's slice would not.
        return self.cfg.scheduler.preemption and req.source != "kube"

    async def _preempt(
        self, req: AllocRequested, acks: list[asyncio.Future[int]], span: trace.Span
    ) -> tuple[Placement, LedgerAlloc, int] | None:
        """Release the best victims on one node and reserve ``req`` there, in one
        compare-and-set of that node's ledger; None when no victim set makes room."""
        for _ in range(CAS_ATTEMPTS):
            choice = self._choose_victims(req)
            if choice is None:
                return None
            node = choice.node
            current = self.cluster.ledger(node)
            victims = [current.allocs[u] for u in choice.uids]
            alloc = _alloc_of(choice.placement, req)
            allocs = {k: v for k, v in current.allocs.items() if k not in set(choice.uids)}
            allocs[req.uid] = alloc
            led = NodeLedger(node=node, allocs=allocs)
            rev = await self._write_ledger(led)
            if rev is None:
                continue
            self.preemptions += len(victims)
            if span.is_recording():
                span.set_attribute("hami.preempted", [v.uid for v in victims])
            now = time.time()
            for v in victims:
                log.info("preempted %s (priority %d) on %s for %s (priority %d)",
                         v.uid, v.pod_priority, node, req.uid, req.pod_priority)
                acks.append(await self.bus.publish_event_nowait(
                    subjects.alloc("released", node),
                    AllocReleased(uid=v.uid, name=v.name, namespace=v.namespace, node=node,
                                  reason=REASON_PREEMPTED, at=now),
                    msg_id=f"released:{v.uid}:{REASON_PREEMPTED}"))
                acks.append(await self.bus.publish_event_nowait(
                    subjects.alloc("preempted", node),
                    AllocPreempted(uid=v.uid, name=v.name, namespace=v.namespace, node=node,
                                   priority=v.pod_priority, by_uid=req.uid, by_name=req.name,
                                   by_namespace=req.namespace, by_priority=req.pod_priority, at=now),
                    msg_id=f"preempted:{v.uid}"))
            return choice.placement, alloc, rev
        raise RuntimeError(f"{req.uid}: ledger of the preemption's node kept changing; will retry")

    # ------------------------------------------------------------------- queues

    def _set_queues(self) -> None:
        """The queue tree of the configured queues and the Kubernetes ones (these win
        by name); raises QueueError when the definitions do not make a tree."""
        defs = {q.name: q for q in self.cfg.queues}
        defs.update(self.kube_queues)
        tree = fair.tree_of(defs.values())
        self.queues = tree
        self._queue_use = fair.UseCache(tree) if tree is not None else None

    def _qstate(self) -> tuple[fair.QueueTree, fair.Usage]:
        assert self.queues is not None and self._queue_use is not None
        return self.queues, self._queue_use.get(self.cluster)

    def _within_limits(self, req: AllocRequested, p: Placement | Failure) -> Placement | Failure:
        """``p``, or a failure naming the queue limit it would break or the unknown queue."""
        if self.queues is None:
            why: str | None = f"queue {req.queue!r} is not defined: no queues are configured"
        else:
            tree, use = self._qstate()
            try:
                tree.leaf_of(req.queue, req.namespace)
                why = None
            except fair.QueueError as exc:
                why = str(exc)
            if why is None and isinstance(p, Placement):
                why = fair.limit_problem(tree, use, req, p.containers)
        if why is None:
            return p
        return Failure(reasons={fair.REASON_LIMIT: 1}, nodes_total=self.cluster.nodes_total(),
                       message=f"{req.name}: {why}")

    def _choose_victims(self, req: AllocRequested) -> preempt.Choice | None:
        if self.queues is None:
            return preempt.choose(self.placer, req, req.pod_priority, priority_of=_standalone_priority)
        tree, use = self._qstate()
        return fair.choose_victims(self.placer, tree, req, _standalone_priority, use=use,
                                   rebalance=self._rebalance())

    def _rebalance(self) -> bool:
        """Whether preemption may rebalance queues over their guarantees (docs/queues.md)."""
        return self.queue_rebalance and self.cfg.scheduler.preemption

    def _pending_order(self) -> Iterator[AllocRequested]:
        """Pending requests in arrival order, or with queues, fairest queue first, then
        priority, then age (the use read again after each one tried)."""
        if self.queues is None:
            yield from list(self.pending.values())
            return
        tree, use = self._qstate()
        rounds = fair.Rounds(tree, use, fair.capacity(self.cluster), list(self.pending.values()))
        while (req := rounds.next()) is not None:
            yield req
            rounds.use = self._qstate()[1]

    async def _on_queue_def(self, key: str, value: bytes | None, revision: int) -> None:
        """A Kubernetes Queue resource (written by the binder): the tree is rebuilt; a
        definition that breaks it is left out, with a warning, until it is fixed."""
        name = subjects.unescape(key)
        if value is None:
            self.kube_queues.pop(name, None)
        else:
            try:
                q = decode(value, QueueSettings)
            except BadMessage as exc:
                noisy.warning(f"garbage:queues:{key}", "ignoring garbage queue entry %s: %s", key, exc)
                return
            self.kube_queues[name] = msgspec.structs.replace(q, name=name)
        try:
            self._set_queues()
        except fair.QueueError as exc:
            noisy.warning(f"queues:{key}", "queue %s left out: %s", name, exc)
            self.kube_queues.pop(name, None)
            self._set_queues()
        self.capacity_changed.set()

    async def queues_endpoint(self, data: bytes) -> QueuesReply:
        """``hami.placement.queues``: each queue's guarantee, use, borrowed and pending."""
        decode(data or b"{}", QueuesRequest)
        cap = fair.capacity(self.cluster)
        if self.queues is None:
            return QueuesReply(capacity_mem=cap.mem, capacity_cores=cap.cores)
        tree, use = self._qstate()
        out = [
            QueueStatus(
                name=r.name, parent=r.parent, weight=r.weight,
                guarantee_mem=r.guarantee.mem, guarantee_cores=r.guarantee.cores,
                limit_mem=-1 if r.limit.mem is None else r.limit.mem,
                limit_cores=-1 if r.limit.cores is None else r.limit.cores,
                used_mem=r.used.mem, used_cores=r.used.cores,
                borrowed_mem=r.borrowed.mem, borrowed_cores=r.borrowed.cores, pending=r.pending,
            )
            for r in fair.report(tree, use, self.pending.values())
        ]
        return QueuesReply(queues=out, capacity_mem=cap.mem, capacity_cores=cap.cores)

    async def preempt_endpoint(self, data: bytes) -> PreemptReply:
        """``hami.placement.preempt``: per offered node, the pods whose eviction makes
        the pod's slice fit there (the extender's preempt verb; kube-scheduler evicts)."""
        ask = decode(data, PreemptRequest)
        out: dict[str, list[str]] = {}
        for node, named in ask.nodes.items():

            def priority_of(a: LedgerAlloc, named: dict[str, int | None] = named) -> int | None:
                given = named.get(a.uid)
                return given if given is not None else a.pod_priority

            if self.queues is None:
                got = preempt.victims_on_node(self.placer, ask.request, node, ask.priority,
                                              priority_of=priority_of)
            else:
                tree, use = self._qstate()
                req = msgspec.structs.replace(ask.request, pod_priority=ask.priority)
                got = fair.victims_on_node(self.placer, tree, req, node, priority_of, use=use,
                                           rebalance=self._rebalance())
            if got is not None:
                out[node] = got.uids
        return PreemptReply(victims=out)

    async def _already_placed(self, req: AllocRequested, acks: list[asyncio.Future[int]]) -> bool:
        """A redelivered or repeated request: the ledger holds it; say so again."""
        node = self.owner.get(req.uid)
        if node is None:
            return False
        alloc = self.cluster.ledger(node).allocs.get(req.uid)
        if alloc is None:
            return False
        if alloc.gang_expires > 0:  # reserved for its gang, announced when the gang commits
            self.pending.pop(req.uid, None)
            self.gang_reqs[req.uid] = req
            return True
        self.pending.pop(req.uid, None)
        acks.append(await self._publish_decided(req, node, alloc, self.revs.get(node, 0)))
        return True

    async def handle_request(
        self, req: AllocRequested, retry: bool = False, observed: bool = False
    ) -> bool:
        """Decide and commit one request on its own; True when it was placed."""
        acks: list[asyncio.Future[int]] = []
        try:
            if await self._already_placed(req, acks):
                return True
            if await self._refused(req, acks):  # also each retry of a pending one
                return False
            if req.gang:
                return await self._gang_member(req, acks, retry)
            with tracing.span(tracer, "placement.decide") as span:
                span.set_attribute("hami.retry", retry)
                if not retry and not observed:
                    self.placer.observe(req)
                decided = self._decide(req, span)
                t0 = time.perf_counter()
                result = await self._reserve(req, decided)
                if isinstance(result, Failure) and self._may_preempt(req):
                    result = await self._preempt(req, acks, span) or result
                span.set_attribute("hami.commit_ms", (time.perf_counter() - t0) * 1000.0)
                if isinstance(result, Failure):
                    if req.pending:
                        self.pending[req.uid] = req
                    if not retry:  # announce the first failure only
                        acks.append(await self._publish_failed(req, result))
                    return False
                placement, alloc, rev = result
                if span.is_recording():
                    span.set_attributes(placed_attributes(placement))
                    span.set_attribute("hami.ledger.revision", rev)
                self.pending.pop(req.uid, None)
                self.decisions += 1
                acks.append(await self._publish_decided(req, placement.node, alloc, rev))
                return True
        finally:
            if acks:
                await asyncio.gather(*acks)

    async def _handle_batch(
        self,
        batch: list[tuple[Msg, AllocRequested | AllocReleased]],
        acks: list[asyncio.Future[int]],
    ) -> None:
        """Decide a batch in memory, then commit one compare-and-set per node.

        Reservations are applied to the local view as they are decided, so later
        requests of the batch see them; a node whose write conflicts is re-read and
        its requests decided again one by one. The stream's acknowledgements of the
        events published are appended to ``acks``, for the caller to wait on.
        """
        tentative: dict[str, list[tuple[AllocRequested, LedgerAlloc, context.Context]]] = {}
        # The batch's span, when one of its requests is traced: each decision links to
        # it, and it links to each traced request (so one pod's trace stays its own).
        batch_span = self._batch_span(batch)
        batch_link = [trace.Link(batch_span.get_span_context())] if batch_span.is_recording() else []
        for msg, ev in batch:
            with tracing.receive(self.bus.tracer, msg.subject, msg.headers):
                if isinstance(ev, AllocReleased):
                    # Releases free capacity for what follows: commit what is decided first.
                    await self._commit(tentative, acks)
                    tentative = {}
                    await self.handle_release(ev)
                    continue
                if ev.uid in self.owner:
                    # Placed before (a redelivery or a repeat), or earlier in this batch,
                    # in which case its commit below announces it.
                    if not any(r.uid == ev.uid for lst in tentative.values() for r, _, _ in lst):
                        await self._already_placed(ev, acks)
                    continue
                if await self._refused(ev, acks):
                    continue
                if ev.gang:  # reserved and committed on its own (its gang's ledger writes)
                    await self._commit(tentative, acks)
                    tentative = {}
                    await self.handle_request(ev)
                    continue
                # Open until its ledger write is answered (_commit), so the span holds
                # both the deciding and the committing.
                span = tracing.start(tracer, "placement.decide", links=batch_link)
                with trace.use_span(span, end_on_exit=False):
                    self.placer.observe(ev)
                    result = self._decide(ev, span)
                    if isinstance(result, Failure) and self._may_preempt(ev):
                        # Preempting writes a ledger of its own: what is decided goes
                        # first, then this request is decided again on its own.
                        span.end()
                        await self._commit(tentative, acks)
                        tentative = {}
                        await self.handle_request(ev, observed=True)
                        continue
                    if isinstance(result, Failure):
                        if ev.pending:
                            self.pending[ev.uid] = ev
                        try:
                            acks.append(await self._publish_failed(ev, result))
                        finally:
                            span.end()
                        continue
                    alloc = _alloc_of(result, ev)
                    self.cluster.reserve(result.node, alloc)
                    self.owner[ev.uid] = result.node
                    tentative.setdefault(result.node, []).append((ev, alloc, context.get_current()))
                    if span.is_recording():
                        self._open[ev.uid] = _Decision(span, time.perf_counter())
        try:
            await self._commit(tentative, acks)
        finally:
            self._close_decisions("not committed")
            batch_span.end()

    def _batch_span(self, batch: list[tuple[Msg, AllocRequested | AllocReleased]]) -> trace.Span:
        """A span of its own for a batch of which a request is traced, linked to each
        traced request; an invalid span otherwise (no cost when not recording)."""
        if not tracing.recording() or len(batch) < 2:
            return trace.INVALID_SPAN
        links = tracing.links(msg.headers for msg, ev in batch if isinstance(ev, AllocRequested))
        if not links:
            return trace.INVALID_SPAN
        sp = tracer.start_span("placement.batch", context=context.Context(), links=links)
        sp.set_attribute("hami.batch.size", len(batch))
        sp.set_attribute("hami.batch.traced", len(links))
        return sp

    def _commit_traced(self, uid: str, rev: int = 0, outcome: str = "") -> None:
        """End a batch decision's span with what its commit did."""
        d = self._open.pop(uid, None)
        if d is None:
            return
        d.span.set_attribute("hami.commit_ms", (time.perf_counter() - d.decided) * 1000.0)
        if rev:
            d.span.set_attribute("hami.ledger.revision", rev)
        if outcome:
            d.span.set_attribute("hami.outcome", outcome)
        d.span.end()

    def _close_decisions(self, outcome: str) -> None:
        for uid in list(self._open):
            self._commit_traced(uid, outcome=outcome)

    async def _commit(
        self,
        tentative: dict[str, list[tuple[AllocRequested, LedgerAlloc, context.Context]]],
        acks: list[asyncio.Future[int]],
    ) -> None:
        redo: list[AllocRequested] = []
        writes: dict[str, tuple[NodeLedger, int]] = {}
        for node, entries in tentative.items():
            view = self.cluster.ledger(node)
            if all(req.uid in view.allocs for req, _, _ in entries):
                # Taken together, before any await: the view and the revision it is of.
                writes[node] = (view, self.revs.get(node, 0))
            else:
                # A watch update replaced this node's view after the decision (another
                # replica wrote it); the decision may no longer hold: decide again.
                redo.extend(req for req, _, _ in entries)

        failed: dict[str, Exception] = {}

        async def one(node: str, view: NodeLedger, last: int) -> None:
            entries = tentative[node]
            self._writing.add(node)
            try:
                sent = await self.bus.kv_cas_nowait(subjects.LEDGER_BUCKET, node, view, last)
                rev = await sent
            except Conflict:
                self.conflicts += 1
                redo.extend(req for req, _, _ in entries)
                for req, _, _ in entries:  # decided again below, in a span of its own
                    self._commit_traced(req.uid, outcome="conflict")
                return
            except Exception as exc:
                # No answer (a lost connection, a timeout): the write may or may not
                # have landed. The node is read again below, after it on the same
                # connection, so the view holds exactly what the ledger does.
                failed[node] = exc
                return
            finally:
                self._writing.discard(node)
                echo = self._deferred.pop(node, None)
            if rev > self.revs.get(node, 0):
                self.revs[node] = rev
            if echo is not None and echo[1] > rev:  # someone else's, newer than ours
                self._adopt(decode(echo[0], NodeLedger), echo[1])
            for req, alloc, ctx in entries:
                self.pending.pop(req.uid, None)
                self.decisions += 1
                self._commit_traced(req.uid, rev)
                acks.append(await self._publish_decided(req, node, alloc, rev, ctx))

        # Every task publishes before the first await, so the writes and the due
        # acknowledgements leave together, in one socket write.
        await asyncio.gather(*(one(n, v, r) for n, (v, r) in writes.items()), self._send_acks())
        redo_uids = {r.uid for r in redo}
        for node, entries in tentative.items():
            if node in failed or any(req.uid in redo_uids for req, _, _ in entries):
                for req, _, _ in entries:
                    self.owner.pop(req.uid, None)
                await self._refresh(node)  # drops this replica's tentative reservations there
        if failed:
            # The batch is redelivered: what landed is announced again (_already_placed),
            # the rest decided again.
            raise next(iter(failed.values()))
        ctxs = {req.uid: ctx for entries in tentative.values() for req, _, ctx in entries}
        for req in redo:
            # Decided again in the request's own trace, under the decision that conflicted.
            token = context.attach(ctxs[req.uid]) if req.uid in ctxs else None
            try:
                await self.handle_request(req, retry=False)
            finally:
                if token is not None:
                    context.detach(token)

    async def handle_release(self, ev: AllocReleased) -> None:
        if ev.reason == REASON_MOVED:
            return  # placement's own note that it moved: the allocation lives on elsewhere
        self.pending.pop(ev.uid, None)
        node = self.owner.get(ev.uid) or ev.node
        if not node or ev.reason in WITHDRAWING:
            # Not placed as far as anyone knows, or given up on: a request of this uid
            # that comes later (redelivered, reordered) is not placed.
            self._note_withdrawn(ev.uid)
        if not node:
            return
        for _ in range(CAS_ATTEMPTS):
            current = self.cluster.ledger(node)
            if ev.uid not in current.allocs:
                return  # already released: releases are idempotent
            allocs = {k: v for k, v in current.allocs.items() if k != ev.uid}
            try:
                rev = await self.bus.kv_cas(
                    subjects.LEDGER_BUCKET, node, NodeLedger(node=node, allocs=allocs),
                    self.revs.get(node, 0),
                )
            except Conflict:
                self.conflicts += 1
                await self._refresh(node)
                continue
            self._adopt(NodeLedger(node=node, allocs=allocs), rev)
            self.capacity_changed.set()
            return
        raise RuntimeError(f"release of {ev.uid}: ledger of {node} kept changing; will retry")

    async def _handle_msgs(self, msgs: list[Msg]) -> None:
        batch: list[tuple[Msg, AllocRequested | AllocReleased]] = []
        for msg in msgs:
            try:
                ev = decode_event(msg.data)
            except BadMessage as exc:
                noisy.error(f"malformed:{msg.subject}", "dropping malformed message on %s: %s",
                            msg.subject, exc)
                with contextlib.suppress(Exception):
                    await msg.term()
                continue
            if isinstance(ev, AllocRequested):
                # Checked again here, whoever published it: out-of-bounds numbers never
                # reach the engine's 64-bit arithmetic. Answered once, never retried.
                problems = limits.request_problems(
                    name=ev.name, namespace=ev.namespace, containers=ev.containers,
                    constraints=ev.constraints, priority=ev.priority, uid=ev.uid,
                ) + gangs.problems(ev)
                if problems:
                    await self._refuse(msg, ev, "; ".join(problems))
                    continue
            if isinstance(ev, AllocRequested | AllocReleased):
                batch.append((msg, ev))
            else:
                with contextlib.suppress(Exception):  # redelivered, and acknowledged then
                    await msg.ack()
        if not batch:
            return
        acks: list[asyncio.Future[int]] = []
        try:
            async with self.lock:
                await self._handle_batch(batch, acks)
        except Exception as exc:
            await self._batch_failed(batch, acks)
            if len(batch) == 1:
                await self._failed_alone(batch[0], exc)
                return
            # One message may be the cause: each alone, so only the culprit counts
            # deliveries towards the dead-letter subject and its neighbours are placed.
            noisy.warning("batch-failed", "a batch of %d failed (%s: %s); handling them one by one",
                          len(batch), type(exc).__name__, exc)
            for item in batch:
                await self._handle_alone(item)
            return
        # The decisions are committed and the local view holds them: the next batch
        # may be decided while the stream acknowledges this one's events. A message is
        # acknowledged only once the events it caused are stored (else redelivered,
        # and _already_placed announces the decision again).
        self._settle(batch, acks)

    async def _handle_alone(self, item: tuple[Msg, AllocRequested | AllocReleased]) -> None:
        acks: list[asyncio.Future[int]] = []
        try:
            async with self.lock:
                await self._handle_batch([item], acks)
        except Exception as exc:
            await self._batch_failed([item], acks)
            await self._failed_alone(item, exc)
            return
        self._settle([item], acks)

    async def _batch_failed(
        self,
        batch: list[tuple[Msg, AllocRequested | AllocReleased]],
        acks: list[asyncio.Future[int]],
    ) -> None:
        """Undo what a failed batch left in the local view only: the reservations it
        decided but did not commit. Their nodes are read again from the ledger."""
        for fut in acks:  # events already sent: their outcome no longer matters
            fut.add_done_callback(_retrieve)
        nodes = {self.owner.get(ev.uid) for _, ev in batch if isinstance(ev, AllocRequested)}
        async with self.lock:
            for node in sorted(n for n in nodes if n):
                try:
                    await self._refresh(node)
                except Exception as exc:
                    noisy.warning(f"refresh:{node}", "cannot read the ledger of %s again: %s", node, exc)
            # A node never written before has no revision, and the refresh cannot tell
            # which of its holders were tentative: what the ledger lacks is not owned.
            for _, ev in batch:
                held = self.owner.get(ev.uid) if isinstance(ev, AllocRequested) else None
                if held is not None and ev.uid not in self.cluster.ledger(held).allocs:
                    del self.owner[ev.uid]

    async def _failed_alone(
        self, item: tuple[Msg, AllocRequested | AllocReleased], exc: Exception
    ) -> None:
        """A message whose handling raised: redelivered with a growing delay, until it
        has been delivered ``bus.maxDeliveries`` times; then dead-lettered."""
        msg, ev = item
        n = _deliveries(msg)
        limit = self.cfg.bus.max_deliveries
        if n < limit:
            noisy.warning(
                f"retry:{type(exc).__name__}", "cannot handle %s %s (delivery %d of %d): %s: %s; "
                "it will be redelivered", type(ev).__name__, ev.uid, n, limit, type(exc).__name__, exc,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(0.5 * 2 ** (n - 1), 8.0))
            return
        log.error("giving up on %s %s after %d deliveries; dead-lettered to %s",
                  type(ev).__name__, ev.uid, n, subjects.dlq("placement"), exc_info=exc)
        await self._dead_letter(msg, ev, f"{type(exc).__name__}: {exc}", n)

    async def _dead_letter(
        self, msg: Msg, ev: AllocRequested | AllocReleased, error: str, n: int
    ) -> None:
        """Store the message on the dead-letter subject and tell a waiting client; only
        then stop its redelivery (if either fails, it is redelivered instead)."""
        try:
            await self.bus.dead_letter("placement", msg, error)
            if isinstance(ev, AllocRequested):
                self.pending.pop(ev.uid, None)
                await (await self._publish_error(
                    ev, REASON_INTERNAL, f"internal error after {n} attempts: {error}"
                ))
        except Exception as exc:
            noisy.error("dlq-failed", "cannot dead-letter %s (%s); it will be redelivered", ev.uid, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
            return
        self.dead_letters += 1
        with contextlib.suppress(Exception):
            await msg.term()

    async def _refuse(self, msg: Msg, ev: AllocRequested, problems: str) -> None:
        """Answer an out-of-bounds request ``invalid`` (not pending) and acknowledge it."""
        noisy.warning(f"invalid:{ev.source}", "refusing request %.64s from %s: %s", ev.uid, ev.source, problems)
        try:
            fut = await self._publish_error(ev, REASON_INVALID, f"invalid request: {problems}")
        except Exception as exc:
            noisy.warning("refuse-failed", "cannot answer invalid request %.64s: %s", ev.uid, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
            return
        self._settle([(msg, ev)], [fut])

    async def _publish_error(self, req: AllocRequested, reason: str, message: str) -> asyncio.Future[int]:
        ev = AllocFailed(
            uid=req.uid, name=req.name, namespace=req.namespace, reasons={reason: 1},
            nodes_total=0, message=message[:4096], pending=False, source=req.source,
            requested_at=req.requested_at, failed_at=time.time(),
        )
        return await self.bus.publish_event_nowait(
            subjects.alloc("failed"), ev, msg_id=f"{reason}:{req.uid}:{req.requested_at}"
        )

    def _settle(
        self,
        batch: list[tuple[Msg, AllocRequested | AllocReleased]],
        acks: list[asyncio.Future[int]],
    ) -> None:
        """Acknowledge the batch once every event it caused is stored (callbacks on the
        futures, not a task per batch). Bounded: an acknowledgement lost with the
        connection fails its future after the bus's write timeout (10 s)."""
        msgs = [msg for msg, _ in batch]
        left = len(acks)
        failed: list[BaseException] = []

        def one_done(fut: asyncio.Future[int]) -> None:
            nonlocal left
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is not None:
                failed.append(exc)
            left -= 1
            if left == 0:
                self._unsettled -= 1
                if failed and not self._stopping:
                    log.warning("events of a batch of %d not stored (%s); redelivering", len(msgs), failed[0])
                    self._bg.spawn_short(self._redeliver(msgs), "placement-nak")
                elif not failed:
                    self._ack_later(msgs)

        if not acks:
            self._ack_later(msgs)
            return
        self._unsettled += 1
        for fut in acks:
            fut.add_done_callback(one_done)

    async def _redeliver(self, msgs: list[Msg]) -> None:
        """Hand the messages back to the stream, for whichever replica takes them next."""
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak(delay=0.5)

    def _ack_later(self, msgs: list[Msg]) -> None:
        self._acks_due.extend(msgs)
        if self._ack_timer is None and not self._stopping:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._ack_soon)

    def _ack_soon(self) -> None:
        self._ack_timer = None
        if self._acks_due:
            self._bg.spawn_short(self._send_acks(), "placement-ack")

    async def _send_acks(self) -> None:
        """Acknowledge the messages whose decisions are committed and announced."""
        due, self._acks_due = self._acks_due, []
        lost = 0
        for msg in due:
            try:
                await msg.ack()
            except Exception as exc:  # redelivered after ack_wait, and handled idempotently
                lost += 1
                error = exc
        if lost:
            log.warning("cannot acknowledge %d handled messages (%s); they will be redelivered", lost, error)

    async def _consume(self) -> None:
        wq = self._sub
        assert wq is not None
        while True:
            msgs = await wq.batch(self.fetch_batch)
            await self._handle_msgs(msgs)

    async def _retry_pending(self) -> None:
        while True:
            await self.capacity_changed.wait()
            self.capacity_changed.clear()
            if not self.pending:
                continue
            async with self.lock:
                for req in self._pending_order():
                    uid = req.uid
                    if uid not in self.pending:
                        continue
                    try:
                        await self.handle_request(req, retry=True)
                    except Exception:
                        log.exception("retry of %s failed", uid)

    # --------------------------------------------------------------------- life

    async def start(self) -> None:
        ready = [asyncio.Event() for _ in range(6)]
        await self.outcomes.ensure()
        self._bg.add(await self.bus.watch_kv(subjects.OUTCOMES_BUCKET, self._on_outcome, ready[4]))
        self._bg.add(await self.bus.watch_kv(subjects.QUOTA_BUCKET, self._on_quota, ready[3]))
        self._bg.add(await self.bus.watch_kv(subjects.QUEUES_BUCKET, self._on_queue_def, ready[5]))
        self._bg.add(await self.bus.watch_kv(subjects.NODES_BUCKET, self._on_node, ready[0]))
        self._bg.add(await self.bus.watch_kv(subjects.HEALTH_BUCKET, self._on_health, ready[1]))
        self._bg.add(await self.bus.watch_kv(subjects.LEDGER_BUCKET, self._on_ledger, ready[2]))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 15)
        self._sub = await self.bus.work_queue(subjects.PLACEMENT_CONSUMER, DECISION_FILTERS)
        self._bg.spawn(self._consume(), "placement-consume")
        self._bg.spawn(self._retry_pending(), "placement-retry")
        self._bg.spawn(self._gang_sweeper(), "placement-gangs")
        self._api = await add_service(
            self.bus, "hami-placement",
            {subjects.PLACEMENT_PREEMPT: self.preempt_endpoint,
             subjects.PLACEMENT_QUEUES: self.queues_endpoint,
             subjects.PLACEMENT_MOVE: self.move_endpoint},
        )
        log.info("%s ready: %d nodes", self.replica, len(list(self.cluster.nodes)))

    async def stop(self) -> None:
        self._stopping = True
        if self._api is not None:
            await self._api.stop()
            self._api = None
        await self._bg.stop()
        # Batches whose events are on their way to the stream: acknowledged if they
        # are stored soon, else redelivered to whichever replica runs next.
        deadline = time.monotonic() + STOP_SETTLE_S
        while self._unsettled and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        await self._send_acks()
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

