"""The binder as a kube-scheduler HTTP extender: ``filter``, ``bind`` and ``preempt``.

In extender mode (``scheduler.mode: extender``) the upstream kube-scheduler schedules
our pods with every plugin it has (volume binding, inter-pod affinity, topology spread,
preemption) and asks this extender for what it cannot judge: HAMi's devices. The wire
types are kube-scheduler's own (``k8s.io/kube-scheduler/extender/v1``), with their json
tags: ``ExtenderArgs{pod, nodes, nodenames}``, ``ExtenderFilterResult{nodes, nodenames,
failedNodes, failedAndUnresolvableNodes, error}``, ``ExtenderBindingArgs{podName,
podNamespace, podUID, node}``, ``ExtenderBindingResult{error}``. Go's decoder matches
keys case-insensitively, so ours does too (a hand-written client sending ``NodeNames``
is understood, as the scheduler would understand it).

``filter``: the pod becomes a one-shot ``requested`` (``pending=False``) whose
``Constraints.nodes`` are the offered nodes; placement decides among those only and
reserves by compare-and-set on the node's ledger entry, as in direct mode. The answer
is the chosen node alone, every other offered node in ``failedNodes``; when nothing
fits, every offered node is in ``failedNodes`` with HAMi's reason for it
(``CardInsufficientMemory``...), and nodes placement has no cards for in
``failedAndUnresolvableNodes`` (preemption cannot give them cards). ``error`` is kept
for real errors (placement did not answer in time): it makes the scheduler abort the
cycle and retry. A body that is not an ``ExtenderArgs`` gets HTTP 400 with ``error``.

Filter is idempotent per pod UID: kube-scheduler calls it again on each attempt. A pod
holding a reservation on one of the offered nodes gets that node again (its timeout
restarts); one whose reserved node is not offered now is released and decided again.

``bind``: the pod's reservation must be on ``node``, in the table and in the ledger
(else ``error``: nothing is bound,
the scheduler retries the pod, which refilters); then exactly what direct mode does
(HAMi's annotations in the Binding, ``bound``). A bind of a pod already bound to that
node succeeds.

A reservation whose bind never comes (the scheduler failed the pod after filter:
volume binding, a Permit plugin) is released ``extender_reservation_timeout`` seconds
after its last filter by a sweep, or at once when the pod is deleted or ends (the pod
watch calls :meth:`Extender.forget`); a bind after that finds no reservation and fails.

``preempt``: kube-scheduler's own preemption counts pods, not slices of cards, so it
asks (``ExtenderPreemptionArgs{pod, nodeToVictims, nodeNameToMetaVictims}``) and takes
our ``ExtenderPreemptionResult{nodeNameToMetaVictims}`` instead of its own choice. The
binder asks placement (``hami.placement.preempt``) for each offered node's smallest set
of lower-priority pods whose release makes the pod's slice fit there (the engine's own
fit; docs/preemption.md; with queues, the pods docs/queues.md's reclaim rules allow); the pods kube-scheduler named carry their priority, the others
the priority their ledger entry recorded. A node where no such set exists is left out,
so the scheduler never evicts for nothing; ``numPDBViolations`` is the scheduler's own
count for the node (placement does not read PodDisruptionBudgets). Any replica answers
it: nothing is reserved, placement's view decides. A pod that asks for no HAMi device
gets the scheduler's victims back as they came.

Gangs (docs/gangs.md): a pod of a coscheduling PodGroup (``PodSource.pod_gang``) is
requested with its gang fields. Placement reserves a member without announcing it
until the whole gang is reserved, so the filter learns of the reservation from the
ledger (a watch of the bucket that keeps only gang members' entries) and answers at
once with no node: every offered node unresolvable, "waiting for gang <ns>/<name>: k
of N reserved" (the scheduler's cycle is serial; a filter that waited for the rest of
the gang would stall every other pod). The scheduler tries the pod again later; when
the gang commits, each member's decision is held like any filter's, so the next filter
answers the reserved node and ``bind`` binds there. ``bind`` refuses a reservation
whose gang has not committed. A PodGroup that is missing or not a gang: every node
unresolvable with the reason, nothing reserved.

Only the Lease holder decides: a standby holds and sweeps nothing, and hands each call
it gets over NATS (``hami.binder.extender.filter|bind``) to the Lease holder, which
subscribes while it holds the Lease, and answers with the holder's answer. So the
kube-scheduler beside any binder replica works, whichever replica's Lease it is (the
scheduler's own leader election is independent of the binder's). With no holder (a
handover), a standby answers HTTP 503 with ``error`` set: the scheduler counts the call
as failed and retries the pod after its back-off. On taking the Lease, the table is rebuilt from
the ledger (kube allocations of pods not bound yet, reserved at their ``decided_at``),
so the sweep covers reservations made before a restart or by the previous leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from aiohttp import web
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from services.binder.defrag import Steer
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.hami.codec import PodSpecError, pod_request
from shared.hami.podgroup import Gang, PodGroupError
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocReleased,
    AllocRequested,
    LedgerAlloc,
    NodeLedger,
    PreemptReply,
    PreemptRequest,
)

log = logging.getLogger("hami.binder.extender")

Obj = dict[str, Any]

# What a node placement reports no reason for is: it has no live inventory (no node
# agent, or unhealthy), so no HAMi card there can be freed by preempting pods.
UNKNOWN_NODE = "NodeUnregistered"
# How long a filter waits for placement: below the scheduler's httpTimeout (the chart
# sets 30 s), so the scheduler reads our error rather than its own timeout.
ANSWER_TIMEOUT_S = 25.0
NOT_LEADER = "no binder replica holds the Lease; retry"
STATUS_HEADER = "Hami-Http-Status"
POD_GONE = "the pod was deleted"
# How long a gang member's filter waits for the ledger watch to have caught up.
LEDGER_READY_S = 10.0


class WireError(ValueError):
    """A request body that is not the extender type it should be."""


# ------------------------------------------------------------------ the wire types


@dataclass(slots=True)
class FilterArgs:
    """``ExtenderArgs``: the pod and its candidate nodes, names or a ``v1.NodeList``."""

    pod: Obj
    nodes: Obj | None  # a v1.NodeList, when the extender is not nodeCacheCapable
    nodenames: list[str] | None  # when nodeCacheCapable

    @property
    def names(self) -> list[str]:
        if self.nodenames is not None:
            return list(self.nodenames)
        return [str((n.get("metadata") or {}).get("name") or "")
                for n in (self.nodes or {}).get("items") or [] if isinstance(n, dict)]


@dataclass(slots=True)
class BindArgs:
    """``ExtenderBindingArgs``."""

    pod_name: str
    pod_namespace: str
    pod_uid: str
    node: str


def _object(body: bytes, what: str) -> dict[str, Any]:
    """The JSON object of ``body``, keys lowered (Go's json matches them so)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise WireError(f"{what}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return {str(k).lower(): v for k, v in obj.items()}


def parse_filter_args(body: bytes) -> FilterArgs:
    o = _object(body, "ExtenderArgs")
    pod = o.get("pod")
    if not isinstance(pod, dict):
        raise WireError("ExtenderArgs: pod must be a v1.Pod object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict) or not meta.get("uid") or not meta.get("name"):
        raise WireError("ExtenderArgs: pod.metadata needs name and uid")
    nodes, names = o.get("nodes"), o.get("nodenames")
    if nodes is not None and (not isinstance(nodes, dict)
                              or not isinstance(nodes.get("items") or [], list)):
        raise WireError("ExtenderArgs: nodes must be a v1.NodeList or null")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) for n in names)):
        raise WireError("ExtenderArgs: nodenames must be a list of strings or null")
    return FilterArgs(pod=pod, nodes=nodes, nodenames=names)


def parse_bind_args(body: bytes) -> BindArgs:
    o = _object(body, "ExtenderBindingArgs")
    vals = {k: o.get(k.lower()) for k in ("podName", "podNamespace", "podUID", "node")}
    for k, v in vals.items():
        if v is not None and not isinstance(v, str):
            raise WireError(f"ExtenderBindingArgs: {k} must be a string")
    if not vals["podName"] or not vals["podUID"] or not vals["node"]:
        raise WireError("ExtenderBindingArgs needs podName, podUID and node")
    return BindArgs(str(vals["podName"]), str(vals["podNamespace"] or "default"),
                    str(vals["podUID"]), str(vals["node"]))


@dataclass(slots=True)
class PreemptArgs:
    """``ExtenderPreemptionArgs``: the pod and, per node, the victims the scheduler chose
    (``nodeToVictims``: whole pods; ``nodeNameToMetaVictims``: uids only)."""

    pod: Obj
    # node -> victim uid -> its pod priority (None: only the uid was sent)
    victims: dict[str, dict[str, int | None]]
    pdb: dict[str, int]  # node -> numPDBViolations, as the scheduler counted them


def _priority(pod: Obj) -> int | None:
    p = (pod.get("spec") or {}).get("priority")
    return p if isinstance(p, int) and not isinstance(p, bool) else None


def parse_preempt_args(body: bytes) -> PreemptArgs:
    o = _object(body, "ExtenderPreemptionArgs")
    pod = o.get("pod")
    if not isinstance(pod, dict):
        raise WireError("ExtenderPreemptionArgs: pod must be a v1.Pod object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict) or not meta.get("uid") or not meta.get("name"):
        raise WireError("ExtenderPreemptionArgs: pod.metadata needs name and uid")
    victims: dict[str, dict[str, int | None]] = {}
    pdb: dict[str, int] = {}
    for key, whole in (("nodetovictims", True), ("nodenametometavictims", False)):
        by_node = o.get(key)
        if by_node is None:
            continue
        if not isinstance(by_node, dict):
            raise WireError(f"ExtenderPreemptionArgs: {key} must be an object of node names")
        for node, v in by_node.items():
            v = {str(k).lower(): x for k, x in (v or {}).items()} if isinstance(v, dict | None) else None
            if v is None or not isinstance(v.get("pods") or [], list):
                raise WireError(f"ExtenderPreemptionArgs: {key}[{node}] must be an object with pods")
            named = victims.setdefault(str(node), {})
            for p in v.get("pods") or []:
                if not isinstance(p, dict):
                    raise WireError(f"ExtenderPreemptionArgs: {key}[{node}].pods holds a non-object")
                if whole:
                    uid = (p.get("metadata") or {}).get("uid")
                    prio = _priority(p)
                else:
                    uid = {str(k).lower(): x for k, x in p.items()}.get("uid")
                    prio = None
                if not isinstance(uid, str) or not uid:
                    raise WireError(f"ExtenderPreemptionArgs: {key}[{node}] has a pod without uid")
                if prio is not None or uid not in named:
                    named[uid] = prio
            n = v.get("numpdbviolations")
            pdb[str(node)] = max(pdb.get(str(node), 0), n if isinstance(n, int) else 0)
    return PreemptArgs(pod=pod, victims=victims, pdb=pdb)


def preempt_result(victims: Mapping[str, list[str]], pdb: Mapping[str, int]) -> Obj:
    """An ``ExtenderPreemptionResult`` (``omitempty``: no nodes, no key)."""
    if not victims:
        return {}
    return {"nodeNameToMetaVictims": {
        node: {"pods": [{"uid": u} for u in uids], "numPDBViolations": pdb.get(node, 0)}
        for node, uids in victims.items()
    }}


def filter_result(
    args: FilterArgs, keep: list[str], failed: Mapping[str, str] | None = None,
    unresolvable: Mapping[str, str] | None = None, error: str = "",
) -> Obj:
    """An ``ExtenderFilterResult``, in the form asked (names, or the Node objects),
    with Go's ``omitempty``: nil pointers, empty maps and strings are left out."""
    out: Obj = {}
    if args.nodenames is not None or args.nodes is None:
        out["nodenames"] = list(keep)
    else:
        want = set(keep)
        items = [n for n in args.nodes.get("items") or []
                 if isinstance(n, dict) and (n.get("metadata") or {}).get("name") in want]
        out["nodes"] = {**args.nodes, "items": items}
    if failed:
        out["failedNodes"] = dict(failed)
    if unresolvable:
        out["failedAndUnresolvableNodes"] = dict(unresolvable)
    if error:
        out["error"] = error
    return out


def failed_result(args: FilterArgs, failure: AllocFailed) -> Obj:
    """Every offered node rejected, each with placement's reason for it."""
    failed: dict[str, str] = {}
    unresolvable: dict[str, str] = {}
    for n in args.names:
        why = failure.node_reasons.get(n)
        if why is None:
            unresolvable[n] = UNKNOWN_NODE
        else:
            failed[n] = why
    return filter_result(args, [], failed, unresolvable)


def asks_devices(req: AllocRequested) -> bool:
    return any(d.nums > 0 for c in req.containers for d in c.devices)


# ------------------------------------------------------------------- the extender


@dataclass(slots=True)
class Held:
    """A reservation made by a filter, not bound yet."""

    decision: AllocDecided
    since: float  # wall-clock time of its last filter, or its decided_at when adopted


class PodSource(Protocol):
    """What the extender needs of the Kubernetes binder."""

    @property
    def pods(self) -> Mapping[str, Obj]: ...  # the pod watch's cache, uid -> pod

    async def bind_decision(self, d: AllocDecided) -> str | None:
        """Bind as direct mode does (annotations, Binding, ``bound``): the error or None."""
        ...

    async def read_pod(self, namespace: str, name: str) -> Obj | None:
        """The pod now (None when it does not exist)."""
        ...

    async def pod_gang(self, pod: Obj) -> Gang | None:
        """The gang of the pod's PodGroup (None: it names none); :class:`PodGroupError`
        when the PodGroup is missing or not a gang."""
        ...


@dataclass(slots=True, frozen=True)
class GangEntry:
    """A gang member's ledger entry: a reservation until its gang commits."""

    node: str
    alloc: LedgerAlloc

    @property
    def committed(self) -> bool:
        return self.alloc.gang_expires <= 0


@dataclass(slots=True)
class _Waiter:
    requested_at: float
    fut: asyncio.Future[AllocDecided | AllocFailed | GangEntry] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Extender:
    """The filter and bind verbs, the reservations they hold, and their timeout."""

    def __init__(
        self, bus: Bus, cfg: Config, binder: PodSource, *,
        timeout_s: float | None = None, answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.bus = bus
        self.cfg = cfg
        self.binder = binder
        self.timeout_s = (cfg.scheduler.extender_reservation_timeout
                          if timeout_s is None else timeout_s)
        self.answer_timeout_s = answer_timeout_s
        self.active = False  # the Lease holder only (or no election at all)
        self.held: dict[str, Held] = {}
        self.waiters: dict[str, _Waiter] = {}
        self.gone: dict[str, float] = {}  # uid -> when its pod was deleted or ended
        self._locks: dict[str, asyncio.Lock] = {}
        self._seq = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fwd_subs: list[Any] = []  # the standbys' calls, while this replica leads
        # Gang members' ledger entries (docs/gangs.md), ledger key -> uid -> entry.
        # Placement announces a member only when its whole gang commits, so a member's
        # reservation is seen in the ledger, not on the bus.
        self.gang_entries: dict[str, dict[str, GangEntry]] = {}
        self._ledger_ready = asyncio.Event()
        self._ledger_watch: asyncio.Task[None] | None = None
        self._ledger_start: asyncio.Future[None] | None = None
        self.filters = 0
        self.binds = 0
        self.preempts = 0
        self.expired = 0
        # hami defrag --apply (services/binder/defrag.py): the planned node and cards of
        # a pod replacing an evicted one, and the note that they did not fit it.
        self.steer: Callable[[Obj], Steer | None] | None = None
        self.unsteer: Callable[[str], None] | None = None

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def _msg_id(self, what: str, uid: str) -> str:
        # Unique per attempt: a request after a release must not be deduplicated away.
        return f"{what}:{uid}:x{time.time_ns()}.{next(self._seq)}"

    async def _release(self, d: AllocDecided, reason: str) -> None:
        ev = AllocReleased(uid=d.uid, name=d.name, namespace=d.namespace, node=d.node,
                           reason=reason, at=time.time())
        await self.bus.publish_event(subjects.alloc("released", d.node), ev,
                                     msg_id=self._msg_id("released", d.uid))

    def _spawn(self, coro: Awaitable[None]) -> None:
        t: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _decide(self, req: AllocRequested) -> AllocDecided | AllocFailed | GangEntry | None:
        """Publish a one-shot request and wait for placement's answer (None: none): its
        decision or failure, or for a gang member its reservation (the gang not
        complete: no decision comes until it is)."""
        w = _Waiter(req.requested_at)
        self.waiters[req.uid] = w
        try:
            if req.gang:
                self._resolve_reserved(req.uid)
            # Not waiting for the stream's ack before the answer: the scheduler's cycle
            # is serial, and the ack costs a round trip placement does not need.
            stored = await self.bus.publish_event_nowait(
                subjects.alloc("requested"), req, msg_id=self._msg_id("requested", req.uid))
            stored.add_done_callback(_retrieve)
            either: set[asyncio.Future[Any]] = {w.fut, stored}
            async with asyncio.timeout(self.answer_timeout_s):
                done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if stored in done:
                    stored.result()  # a publish that failed raises here, not after 25 s
                return await asyncio.shield(w.fut)
        except TimeoutError:
            return None
        finally:
            if self.waiters.get(req.uid) is w:
                del self.waiters[req.uid]

    # ------------------------------------------------------------------- filter

    async def filter(self, body: bytes) -> tuple[int, Obj]:
        """HTTP status and ``ExtenderFilterResult`` for a filter call's body."""
        if not self.active:
            return await self._forward(subjects.EXTENDER_FILTER, body)
        try:
            args = parse_filter_args(body)
        except WireError as exc:
            return 400, {"error": str(exc)}
        names = args.names
        uid = str(args.pod["metadata"]["uid"])
        try:
            req = pod_request(args.pod, self.cfg.node, self.cfg.resources, now=time.time())
        except PodSpecError as exc:
            # The webhook refuses these; no node can fix it, preemption included.
            why = f"invalid HAMi request: {exc}"
            return 200, filter_result(args, [], None, dict.fromkeys(names, why))
        if not asks_devices(req) or not names:
            return 200, filter_result(args, names)  # nothing of HAMi's to decide
        try:
            gang = await self.binder.pod_gang(args.pod)
        except PodGroupError as exc:
            # Not placed, alone or otherwise, until its PodGroup is there and valid (the
            # scheduler retries it): coscheduling's Permit denies it too.
            return 200, filter_result(args, [], None, dict.fromkeys(names, str(exc)))
        except Exception as exc:  # the API server did not answer: a failed attempt
            return 200, filter_result(args, [], error=f"cannot read the pod's PodGroup: {exc}")
        if gang is not None:
            req = msgspec.structs.replace(req, gang=gang.name, gang_size=gang.size,
                                          gang_timeout=gang.timeout)
            if not await self._ledger_caught_up():
                return 200, filter_result(args, [], error="the ledger watch has not caught up; retry")
        self.filters += 1
        async with self._lock(uid):
            if uid in self.gone:  # a stale call racing the pod's deletion
                return 200, filter_result(args, [], None, dict.fromkeys(names, POD_GONE))
            held = self.held.get(uid)
            if held is not None:
                if held.decision.node in names:
                    held.since = time.time()
                    return 200, self._chosen(args, held.decision.node)
                del self.held[uid]  # reserved on a node no longer offered: decide again
                await self._release(held.decision, "refiltered")
            if gang is not None:
                mine = self._gang_entry(uid)
                if mine is not None and not mine.committed:
                    if mine.node in names:
                        return 200, self._waiting(args, gang)
                    # Reserved on a node the scheduler no longer offers: free it (the
                    # gang loses a member until this one is placed again).
                    await self._release(_entry_decision(uid, mine), "refiltered")
            cons = msgspec.structs.replace(req.constraints, nodes=names)
            if gang is None:
                steered = await self._steered(args, req, uid)
                if steered is not None:
                    return 200, steered
            for _ in range(3):
                ask = msgspec.structs.replace(req, constraints=cons, pending=False,
                                              source="kube", requested_at=time.time())
                got = await self._decide(ask)
                if got is None:
                    return 200, filter_result(
                        args, [], error=f"no placement decision within {self.answer_timeout_s:g}s")
                if isinstance(got, AllocFailed):
                    return 200, failed_result(args, got)
                if isinstance(got, GangEntry):
                    # Reserved; bound only once its whole gang is (the decision then
                    # comes, is held, and the scheduler's next attempt gets the node).
                    return 200, self._waiting(args, gang)
                if uid in self.gone:  # deleted while placement decided
                    await self._release(got, "deleted")
                    return 200, filter_result(args, [], None, dict.fromkeys(names, POD_GONE))
                if got.node in names:
                    self.held[uid] = Held(got, time.time())
                    return 200, self._chosen(args, got.node)
                # A reservation placement still held from before (it re-announced it):
                # free it and ask again.
                await self._release(got, "refiltered")
            return 200, filter_result(args, [], error="placement kept answering a node not offered")

    async def _steered(self, args: FilterArgs, req: AllocRequested, uid: str) -> Obj | None:
        """A replacement of a pod hami defrag evicted: the plan's node and cards, when
        kube-scheduler offers the node and they fit (the filter's answer); else None,
        and the pod is placed like any other (called with the pod's lock held)."""
        s = self.steer(args.pod) if self.steer is not None else None
        if s is None or s.node not in args.names:
            return None
        cons = msgspec.structs.replace(req.constraints, nodes=[s.node], use_uuids=list(s.cards))
        got = await self._decide(msgspec.structs.replace(
            req, constraints=cons, pending=False, source="kube", requested_at=time.time()))
        if isinstance(got, AllocDecided) and got.node == s.node and uid not in self.gone:
            self.held[uid] = Held(got, time.time())
            return self._chosen(args, got.node)
        if isinstance(got, AllocDecided):
            await self._release(got, "refiltered")
        log.info("defrag: the planned cards %s on %s do not fit %s/%s now; any node will do",
                 ",".join(s.cards), s.node, req.namespace, req.name)
        if self.unsteer is not None:
            self.unsteer(uid)
        return None

    # ------------------------------------------------------------------ preempt

    async def preempt(self, body: bytes) -> tuple[int, Obj]:
        """HTTP status and ``ExtenderPreemptionResult`` for a preempt call's body."""
        try:
            args = parse_preempt_args(body)
        except WireError as exc:
            return 400, {"error": str(exc)}
        try:
            req = pod_request(args.pod, self.cfg.node, self.cfg.resources, now=time.time())
        except PodSpecError:
            return 200, {}  # no node can fix the spec: evicting anyone would be for nothing
        if not asks_devices(req):  # nothing of HAMi's: the scheduler's choice stands
            return 200, preempt_result({n: list(v) for n, v in args.victims.items()}, args.pdb)
        nodes = list(args.victims)
        ask = PreemptRequest(
            request=msgspec.structs.replace(
                req, constraints=msgspec.structs.replace(req.constraints, nodes=nodes),
                pending=False, source="kube"),
            priority=_priority(args.pod) or 0,
            nodes=args.victims,
        )
        try:
            raw = await self.bus.nc.request(subjects.PLACEMENT_PREEMPT, msgspec.json.encode(ask),
                                            timeout=self.answer_timeout_s, headers=self.bus.headers())
        except (NatsTimeout, NoRespondersError, TimeoutError) as exc:
            return 503, {"error": f"no answer from placement: {type(exc).__name__}"}
        err = msgspec.json.decode(raw.data).get("error")
        if err:  # an ErrorReply: say so rather than evict nobody in silence
            return 500, {"error": f"placement: {err}"}
        got = msgspec.json.decode(raw.data, type=PreemptReply)
        self.preempts += 1
        return 200, preempt_result(got.victims, args.pdb)

    def _waiting(self, args: FilterArgs, gang: Gang | None) -> Obj:
        """A gang member reserved, its gang not complete: no node yet. Unresolvable, so
        the scheduler does not preempt for it; it tries the pod again later."""
        assert gang is not None
        why = f"waiting for gang {gang.key}: {self.gang_reserved(gang.key)} of {gang.size} reserved"
        return filter_result(args, [], None, dict.fromkeys(args.names, why))

    # ------------------------------------------------------------------ gangs

    def _gang_entry(self, uid: str) -> GangEntry | None:
        for entries in self.gang_entries.values():
            e = entries.get(uid)
            if e is not None:
                return e
        return None

    def gang_reserved(self, key: str) -> int:
        """How many members of gang ``key`` the ledger holds (reserved or committed)."""
        return sum(1 for entries in self.gang_entries.values() for e in entries.values()
                   if e.alloc.gang == key)

    def _resolve_reserved(self, uid: str) -> None:
        """Answer a gang member's filter with its reservation, unless its gang is
        complete: then the commit, and so the decision, follows at once."""
        w = self.waiters.get(uid)
        e = self._gang_entry(uid)
        if w is None or w.fut.done() or e is None or e.committed:
            return
        if self.gang_reserved(e.alloc.gang) >= e.alloc.gang_size:
            return
        w.fut.set_result(e)

    async def _on_ledger(self, key: str, value: bytes | None, _rev: int) -> None:
        # Most ledgers hold no gang member: not decoded (the field is left out when empty).
        if value is None or b'"gang":' not in value:
            self.gang_entries.pop(key, None)
            return
        led = msgspec.json.decode(value, type=NodeLedger)
        entries = {u: GangEntry(led.node, a) for u, a in led.allocs.items()
                   if a.gang and a.source == "kube"}
        if not entries:
            self.gang_entries.pop(key, None)
            return
        self.gang_entries[key] = entries
        for uid in entries:
            self._resolve_reserved(uid)

    async def _ledger_caught_up(self) -> bool:
        """Start the ledger watch on the first gang member (a cluster without gangs pays
        nothing) and wait until it has delivered every ledger once."""
        start = self._ledger_start
        if start is None or (start.done() and (start.cancelled() or start.exception() is not None)):
            # One start for concurrent filters; a failed one is tried again next time.
            start = self._ledger_start = asyncio.ensure_future(self._watch_ledger())
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LEDGER_READY_S):
                await asyncio.shield(start)
                await self._ledger_ready.wait()
        return self._ledger_ready.is_set()

    async def _watch_ledger(self) -> None:
        self._ledger_watch = await self.bus.watch_kv(subjects.LEDGER_BUCKET, self._on_ledger,
                                                     ready=self._ledger_ready)

    @staticmethod
    def _chosen(args: FilterArgs, node: str) -> Obj:
        others = {n: "hami: the pod's devices are reserved on another node" for n in args.names
                  if n != node}
        return filter_result(args, [node], others)

    # --------------------------------------------------------------------- bind

    async def bind(self, body: bytes) -> tuple[int, Obj]:
        """HTTP status and ``ExtenderBindingResult`` for a bind call's body."""
        if not self.active:
            return await self._forward(subjects.EXTENDER_BIND, body)
        try:
            args = parse_bind_args(body)
        except WireError as exc:
            return 400, {"error": str(exc)}
        who = f"{args.pod_namespace}/{args.pod_name}"
        async with self._lock(args.pod_uid):
            held = self.held.get(args.pod_uid)
            if held is None:
                pod = self.binder.pods.get(args.pod_uid)
                if not _bound_to(pod, args.pod_uid, args.node):
                    pod = await self.binder.read_pod(args.pod_namespace, args.pod_name)
                if _bound_to(pod, args.pod_uid, args.node):
                    return 200, {}  # bound already: a repeated bind
                return 200, {"error": f"pod {who} holds no reservation (expired, released or "
                                      f"never filtered); nothing bound"}
            d = held.decision
            if d.node != args.node:
                return 200, {"error": f"pod {who} is reserved on {d.node}, not {args.node}; "
                                      f"nothing bound"}
            # The ledger has the last word (placement writes it before deciding): a
            # reservation freed behind our back is not bound onto.
            led, _ = await self.bus.kv_get(subjects.LEDGER_BUCKET, d.node, NodeLedger)
            if led is None or args.pod_uid not in led.allocs:
                del self.held[args.pod_uid]
                return 200, {"error": f"pod {who}'s reservation on {d.node} is no longer in "
                                      f"the ledger; nothing bound"}
            if led.allocs[args.pod_uid].gang_expires > 0:  # never before its gang commits
                return 200, {"error": f"pod {who}'s gang {led.allocs[args.pod_uid].gang} is "
                                      f"not complete yet; nothing bound"}
            err = await self.binder.bind_decision(d)
            # Bound, or failed and released by the bind (bind_failed + released).
            self.held.pop(args.pod_uid, None)
            self.binds += 1
            return 200, ({"error": err} if err else {})

    # ----------------------------------------------------- decisions, pods, restart

    def on_decided(self, d: AllocDecided) -> None:
        """A kube decision seen on the bus: a filter's answer, or a late one to hold
        (reused by the next filter or released on time), or a re-adopted bound pod's."""
        if not self.active:
            return
        w = self.waiters.get(d.uid)
        if w is not None and not w.fut.done():
            w.fut.set_result(d)
            return
        if d.uid in self.gone:
            self._spawn(self._release(d, "deleted"))
            return
        if _bound_to(self.binder.pods.get(d.uid), d.uid, d.node):
            return  # restart rule 4 (re-adoption of a bound pod): nothing to hold
        cur = self.held.get(d.uid)
        if cur is None or cur.decision.node != d.node:
            self.held[d.uid] = Held(d, time.time())

    def on_failed(self, f: AllocFailed) -> None:
        w = self.waiters.get(f.uid)
        # A failure of an older attempt says nothing about this one.
        if w is not None and not w.fut.done() and f.requested_at == w.requested_at:
            w.fut.set_result(f)

    def adopt(self, d: AllocDecided, reserved_at: float) -> None:
        """A ledger reservation of a pending pod (found at a start or relist): held
        from its decision time, so it is bound if the bind comes, else released on time."""
        if d.uid not in self.held and d.uid not in self.waiters:
            self.held[d.uid] = Held(d, reserved_at)

    def forget(self, uid: str) -> None:
        """The pod was deleted or ended (the watch publishes its ``released``)."""
        self.held.pop(uid, None)
        self.gone[uid] = time.time()
        lk = self._locks.get(uid)
        if lk is not None and not lk.locked():
            del self._locks[uid]

    # ------------------------------------------------------------------ timeout

    async def sweep(self, now: float | None = None) -> int:
        """Release every reservation not filtered for longer than the timeout whose pod
        is not bound to it; returns how many were released."""
        now = time.time() if now is None else now
        for uid, t in list(self.gone.items()):
            if now - t > max(self.timeout_s, 60.0):
                del self.gone[uid]  # late decisions of a deleted pod have come by now
        released = 0
        for uid, h in list(self.held.items()):
            if now - h.since <= self.timeout_s or self._lock(uid).locked():
                continue
            async with self._lock(uid):
                if self.held.get(uid) is not h:
                    continue
                d = h.decision
                pod = self.binder.pods.get(uid)
                if not _bound_to(pod, uid, d.node):
                    with contextlib.suppress(Exception):
                        pod = await self.binder.read_pod(d.namespace or "default", d.name)
                del self.held[uid]
                if _bound_to(pod, uid, d.node):
                    continue  # bound after all (by a binder before a restart)
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
            if not self.active:
                continue
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reservation sweep failed; trying again")

    # ------------------------------------------------- standby -> Lease holder

    async def _forward(self, subject: str, body: bytes) -> tuple[int, Obj]:
        """A standby's answer: the Lease holder's, over NATS."""
        try:
            msg = await self.bus.nc.request(subject, body, timeout=self.answer_timeout_s + 2)
        except NoRespondersError:
            return 503, {"error": NOT_LEADER}
        except NatsTimeout:
            return 503, {"error": f"the Lease holder did not answer within {self.answer_timeout_s + 2:g}s; retry"}
        try:
            status = int((msg.headers or {}).get(STATUS_HEADER, "200"))
            out = msgspec.json.decode(msg.data)
        except (ValueError, msgspec.DecodeError) as exc:
            return 502, {"error": f"the Lease holder's answer is unreadable: {exc}"}
        return status, out if isinstance(out, dict) else {"error": "the Lease holder's answer is not an object"}

    async def _on_forwarded(self, msg: Any) -> None:
        # A task per call: binds run concurrently, as they do over HTTP.
        self._spawn(self._answer_forwarded(msg))

    async def _answer_forwarded(self, msg: Any) -> None:
        if not self.active or not msg.reply:
            return  # a handover: the caller times out or finds the new holder next time
        call = self.filter if msg.subject == subjects.EXTENDER_FILTER else self.bind
        try:
            status, out = await call(msg.data)
        except Exception as exc:
            log.exception("forwarded %s failed", msg.subject)
            status, out = 500, {"error": f"{msg.subject}: {exc}"}
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(msg.reply, msgspec.json.encode(out),
                                      headers={STATUS_HEADER: str(status)})

    async def _serve_forwarded(self) -> None:
        subs = [await self.bus.nc.subscribe(s, cb=self._on_forwarded)
                for s in (subjects.EXTENDER_FILTER, subjects.EXTENDER_BIND)]
        if not self.active:  # lost the Lease while subscribing
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            return
        self._fwd_subs.extend(subs)

    async def _unserve_forwarded(self) -> None:
        subs, self._fwd_subs = self._fwd_subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def activate(self) -> None:
        """Serve and sweep (this replica took the Lease; its table is rebuilt by the
        reconcile that follows), for the standbys' calls too."""
        self.active = True
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="extender-sweep")
        self._spawn(self._serve_forwarded())

    def deactivate(self) -> None:
        """Stop serving: the next leader rebuilds the table from the ledger."""
        self.active = False
        self.held.clear()
        if self._fwd_subs:
            self._spawn(self._unserve_forwarded())
        for w in self.waiters.values():
            if not w.fut.done():
                w.fut.cancel()

    async def stop(self) -> None:
        self.deactivate()
        await self._unserve_forwarded()
        tasks = [t for t in (self._sweeper, self._ledger_start, self._ledger_watch, *self._tasks)
                 if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._sweeper = None
        self._ledger_start = self._ledger_watch = None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # An ack failure after the answer came matters to nobody; do not log it as lost.
    if not fut.cancelled():
        fut.exception()


def _entry_decision(uid: str, e: GangEntry) -> AllocDecided:
    a = e.alloc
    return AllocDecided(uid=uid, name=a.name, namespace=a.namespace, node=e.node,
                        containers=a.containers, source=a.source, decided_at=a.decided_at)


def _bound_to(pod: Obj | None, uid: str, node: str) -> bool:
    if pod is None or (pod.get("metadata") or {}).get("uid") != uid:
        return False
    return bool((pod.get("spec") or {}).get("nodeName") == node)


# -------------------------------------------------------------------- HTTP server


class ExtenderServer:
    """``POST {prefix}filter``, ``{prefix}bind`` and ``{prefix}preempt`` over HTTP.

    kube-scheduler's ``urlPrefix`` is ``http://HOST:PORT`` plus ``prefix`` (default
    ``/``), its ``filterVerb`` ``filter`` and ``bindVerb`` ``bind``.
    """

    def __init__(
        self, extender: Extender, *, host: str = "127.0.0.1", port: int = 8888,
        prefix: str = "/",
    ) -> None:
        self.extender = extender
        self.host = host
        self.port = port
        self.prefix = "/" + prefix.strip("/") + ("/" if prefix.strip("/") else "")
        self._runner: web.AppRunner | None = None
        self.listening = False

    @staticmethod
    def _route(call: Callable[[bytes], Awaitable[tuple[int, Obj]]]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                status, out = await call(body)
            except Exception as exc:  # an answer, not a dropped connection
                log.exception("%s failed", request.path)
                status, out = 500, {"error": f"{request.path}: {exc}"}
            return web.Response(status=status, body=msgspec.json.encode(out),
                                content_type="application/json")

        return handle

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # a NodeList can be large
        app.router.add_post(self.prefix + "filter", self._route(self.extender.filter))
        app.router.add_post(self.prefix + "bind", self._route(self.extender.bind))
        app.router.add_post(self.prefix + "preempt", self._route(self.extender.preempt))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self.listening = True
        log.info("extender listening on http://%s:%d%s{filter,bind,preempt}", self.host, self.port, self.prefix)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}{self.prefix.rstrip('/')}"

    async def stop(self) -> None:
        self.listening = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
