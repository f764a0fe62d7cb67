"""Consolidation in Kubernetes: ``hami defrag --apply`` carried out by eviction.

A pod cannot be moved in place: placement refuses to re-place one (its cards are in the
container's environment), so a planned move of a pod is an eviction, and the pod's
controller (a ReplicaSet, a StatefulSet, a Job) makes a replacement, which is then
steered to the planned node and cards. The binder holding the Lease answers
``hami.binder.defrag.apply`` (:class:`~shared.schemas.DefragApplyRequest`): it sees
every pod with our schedulerName (its pod watch), and it places them.

For each planned move, in order:

1. Checks, nothing evicted if one fails (the move is *refused*): the allocation is a
   pod's (source ``kube``) and marked movable in the ledger (``hami.io/movable:
   "true"``); the pod exists, is bound and is not being deleted; it has a controller
   owner reference (a bare pod would be gone for good) that is not a DaemonSet (its
   replacement comes back on the same node by design).
2. The move is recorded for the owner: the next new pod of that controller (not one
   that existed at the eviction) is its replacement, steered to the planned node and
   cards. Direct mode: its request names that node and those cards; if placement
   answers that they no longer fit, it is asked for again with no steering, and lands
   wherever placement puts it. Extender mode: the filter asks placement for the planned
   cards first, among the nodes kube-scheduler offers, then for any offered node.
3. An Eviction (policy/v1, ``POST pods/<name>/eviction`` with the pod's UID as
   precondition). The API server enforces PodDisruptionBudgets: 429 TooManyRequests
   means the budget does not allow it now; the move is refused with the server's
   reason. A Normal Event ``HamiDefrag`` on the pod says where it moves (a Warning
   one, why it was refused).
4. Done when the evicted pod is gone (its cards released) and its replacement is bound;
   the outcome says where the replacement landed and whether that is the plan.

At most ``maxDisruption`` pods are evicted and not yet placed again at a time
(``scheduler.defragMaxDisruption``, default 1: one at a time, each move checked against
the cluster its predecessors left, as planned). A refused move, or a replacement not
placed within the timeout, stops the moves: the moves after it were planned against a
cluster it was to change; they are answered ``not-tried``. Moves already under way are
waited for before the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from shared import subjects
from shared.bus import BadMessage, decode, decode_event
from shared.hami import annotations as ann
from shared.kube import KubeError, NotFound, path
from shared.schemas import (
    AllocFailed,
    AllocRequested,
    DefragApplyReply,
    DefragApplyRequest,
    DefragOutcome,
    ErrorReply,
    MoveRequest,
)

if TYPE_CHECKING:
    from services.binder.kube import KubeBinder

log = logging.getLogger("hami.binder.defrag")

Obj = dict[str, Any]

EVENT_REASON = "HamiDefrag"
MOVED = "moved"
REFUSED = "refused"
FAILED = "failed"
NOT_TRIED = "not-tried"
TERMINAL = ("Succeeded", "Failed")


@dataclass(slots=True, frozen=True)
class Steer:
    """Where a replacement pod is to be placed: the plan's node and cards."""

    node: str
    cards: list[str]


@dataclass
class _Move:
    """One eviction under way: the evicted pod, and its replacement once seen."""

    ask: MoveRequest
    out: DefragOutcome
    owner: str  # the controller's uid
    siblings: set[str]  # the controller's pods at the eviction: none is the replacement
    replacement: str = ""  # its uid, once claimed
    unsteered: bool = False  # the planned cards did not fit: placed anywhere
    gone: bool = False  # the evicted pod left the API (its cards released)
    placed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        if self.gone and self.placed:
            self.done.set()


def _meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def controller_of(pod: Obj) -> Obj | None:
    """The pod's controller owner reference (``controller: true``), if any."""
    for ref in _meta(pod).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") and ref.get("uid"):
            return ref
    return None


def pod_cards(pod: Obj) -> list[str]:
    """The card UUIDs the pod's HAMi annotation grants, in grant order, each once."""
    text = (_meta(pod).get("annotations") or {}).get(ann.DEVICES_ALLOCATED)
    if not text:
        return []
    try:
        grants = ann.decode_pod_devices(text)
    except ann.AnnotationError:
        return []
    return list(dict.fromkeys(g.uuid for c in grants for g in c))


def refusal_text(exc: KubeError) -> str:
    """Why the API server refused an eviction, with a PodDisruptionBudget's own words."""
    causes = [
        str(c.get("message"))
        for c in exc.details.get("causes") or []
        if isinstance(c, dict) and c.get("message")
    ]
    why = exc.message or str(exc)
    if exc.status == 429:
        why = f"the PodDisruptionBudget does not allow it now: {why}"
    return "; ".join([why, *causes])


class DefragApplier:
    """The binder's ``hami.binder.defrag.apply`` endpoint and the steering it needs."""

    def __init__(self, binder: KubeBinder) -> None:
        self.binder = binder
        self.bus = binder.bus
        self.cfg = binder.cfg
        self.pending: dict[str, list[_Move]] = {}  # owner uid -> moves with no replacement yet
        self.by_replacement: dict[str, _Move] = {}  # replacement uid -> its move
        self.by_evicted: dict[str, _Move] = {}  # evicted pod's uid -> its move
        self.running = False
        self._sub: Any = None
        self._failed_sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- steering

    def steer(self, pod: Obj) -> Steer | None:
        """The plan's node and cards for ``pod`` if it replaces an evicted one (claiming
        it for that move); None for any other pod, or once the plan no longer fits."""
        uid = str(_meta(pod).get("uid") or "")
        mv = self.by_replacement.get(uid) or self._claim(pod)
        if mv is None or mv.unsteered:
            return None
        return Steer(mv.ask.to_node, list(mv.ask.to_cards))

    def steered_request(self, req: AllocRequested, pod: Obj) -> AllocRequested:
        """Direct mode: the pod's request, pinned to the planned node and cards when it
        is a replacement (still pending: placement keeps it until it fits there, unless
        its first failure makes :meth:`_on_failed` ask for it anywhere)."""
        s = self.steer(pod)
        if s is None:
            return req
        cons = msgspec.structs.replace(req.constraints, nodes=[s.node], use_uuids=list(s.cards))
        return msgspec.structs.replace(req, constraints=cons)

    def unsteer(self, uid: str) -> None:
        """Extender mode: the planned cards did not fit this replacement."""
        mv = self.by_replacement.get(uid)
        if mv is not None:
            mv.unsteered = True

    def _claim(self, pod: Obj) -> _Move | None:
        meta = _meta(pod)
        uid = str(meta.get("uid") or "")
        ref = controller_of(pod)
        if not uid or ref is None:
            return None
        for mv in self.pending.get(str(ref["uid"]), []):
            if uid not in mv.siblings and uid != mv.ask.uid:
                self.pending[mv.owner].remove(mv)
                if not self.pending[mv.owner]:
                    del self.pending[mv.owner]
                mv.replacement = uid
                mv.out.replacement = str(meta.get("name") or "")
                self.by_replacement[uid] = mv
                log.info(
                    "defrag: %s/%s replaces %s/%s",
                    meta.get("namespace"),
                    meta.get("name"),
                    mv.out.namespace,
                    mv.out.name,
                )
                return mv
        return None

    # ------------------------------------------------------- pods and failures

    def on_pod(self, kind: str, pod: Obj) -> None:
        """Every event of the binder's pod watch: an evicted pod gone, a replacement
        seen or bound."""
        if not self.by_evicted and not self.by_replacement and not self.pending:
            return
        meta = _meta(pod)
        uid = str(meta.get("uid") or "")
        phase = (pod.get("status") or {}).get("phase")
        old = self.by_evicted.get(uid)
        if old is not None and (kind == "DELETED" or phase in TERMINAL):
            old.gone = True
            old.settle()
        if kind == "DELETED":
            return
        mv = self.by_replacement.get(uid) or self._claim(pod)
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if mv is None or not node or mv.placed:
            return
        mv.placed = True
        mv.out.node = node
        mv.out.cards = pod_cards(pod)
        mv.out.on_plan = node == mv.ask.to_node and sorted(mv.out.cards) == sorted(mv.ask.to_cards)
        log.info(
            "defrag: %s/%s placed on %s %s (%s)",
            meta.get("namespace"),
            meta.get("name"),
            node,
            ",".join(mv.out.cards),
            "as planned"
            if mv.out.on_plan
            else f"planned {mv.ask.to_node} {','.join(mv.ask.to_cards)}",
        )
        mv.settle()

    async def _on_failed(self, msg: Any) -> None:
        """Direct mode: placement could not put a steered replacement on the planned
        cards (the cluster changed since the plan): ask for it again, anywhere."""
        try:
            ev = decode_event(msg.data)
        except BadMessage:
            return
        if not isinstance(ev, AllocFailed):
            return
        mv = self.by_replacement.get(ev.uid)
        if mv is None or mv.unsteered or mv.placed or self.binder.extender is not None:
            return
        mv.unsteered = True
        log.info(
            "defrag: the planned cards %s on %s do not fit %s/%s now; placing it anywhere",
            ",".join(mv.ask.to_cards),
            mv.ask.to_node,
            ev.namespace,
            ev.name,
        )
        pod = self.binder.pods.get(ev.uid)
        if pod is not None:
            await self.binder.request_pod(pod, f"requested:{ev.uid}:defrag-unsteered")

    # ------------------------------------------------------------------ moves

    async def apply(self, req: DefragApplyRequest) -> DefragApplyReply:
        limit = req.max_disruption or self.cfg.scheduler.defrag_max_disruption
        timeout = req.timeout or self.cfg.scheduler.defrag_replace_timeout
        if limit < 1 or timeout <= 0:
            raise ValueError("max_disruption must be at least 1 and timeout more than 0")
        outcomes = [DefragOutcome(uid=m.uid, state=NOT_TRIED) for m in req.moves]
        inflight: set[asyncio.Task[bool]] = set()
        stopped = False
        ledger = await self.binder.ledger_snapshot()
        try:
            for ask, out in zip(req.moves, outcomes, strict=True):
                while len(inflight) >= limit and not stopped:
                    done, inflight = await asyncio.wait(
                        inflight, return_when=asyncio.FIRST_COMPLETED
                    )
                    stopped = not all(t.result() for t in done)
                if stopped:
                    break
                mv = await self._start(ask, out, ledger)
                if mv is None:
                    stopped = True
                    break
                inflight.add(asyncio.create_task(self._finish(mv, timeout)))
            # Moves under way are seen through: their pods are evicted already.
            if inflight:
                await asyncio.wait(inflight)
        finally:
            for t in inflight:
                t.cancel()
        ok = all(o.state == MOVED for o in outcomes)
        first = next((o for o in outcomes if o.state != MOVED), None)
        return DefragApplyReply(
            ok=ok,
            outcomes=outcomes,
            error="" if first is None else f"{first.name or first.uid}: {first.error}",
        )

    async def _start(
        self, ask: MoveRequest, out: DefragOutcome, ledger: dict[str, tuple[str, Any]]
    ) -> _Move | None:
        """Check one move and evict its pod: the move under way, or None (refused)."""
        out.state = REFUSED
        held = ledger.get(ask.uid)
        if held is None:
            out.error = "no pod allocation with this uid (not a pod's, or released since the plan)"
            return None
        node, alloc = held
        out.name, out.namespace = alloc.name, alloc.namespace or "default"
        who = f"{out.namespace}/{out.name}"
        if not alloc.movable:
            out.error = 'not marked movable (annotation hami.io/movable: "true")'
            return None
        try:
            pod: Obj = await self.binder.kube.get(path("pods", out.namespace, out.name))
        except NotFound:
            out.error = "the pod no longer exists"
            return None
        except KubeError as exc:
            out.error = f"cannot read the pod: {exc}"
            return None
        meta = _meta(pod)
        if meta.get("uid") != ask.uid:
            out.error = "the pod was recreated since the plan"
            return None
        if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in TERMINAL:
            out.error = "the pod is ending already"
            return None
        if (pod.get("spec") or {}).get("nodeName") != node:
            out.error = f"the pod is not bound to {node}, where the ledger has it"
            return None
        ref = controller_of(pod)
        if ref is None:
            out.error = "the pod has no owner controller: evicted, it would be gone for good"
            self._event(pod, f"not moved by hami defrag: {out.error}", warning=True)
            return None
        if ref.get("kind") == "DaemonSet":
            out.error = "a DaemonSet's pod: its replacement comes back on the same node"
            return None
        owner = str(ref["uid"])
        siblings = {
            u for u, p in self.binder.pods.items() if (controller_of(p) or {}).get("uid") == owner
        }
        mv = _Move(ask, out, owner, siblings | {ask.uid})
        # Recorded before the eviction: the controller may make the replacement at once.
        self.pending.setdefault(owner, []).append(mv)
        self.by_evicted[ask.uid] = mv
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": out.name, "namespace": out.namespace},
            "deleteOptions": {"preconditions": {"uid": ask.uid}},
        }
        try:
            # The raw call, as for Bindings: the API server answers a Status, which
            # create_namespaced_pod_eviction would try to read as a V1Eviction.
            await self.binder.kube.post(path("pods", out.namespace, out.name, "eviction"), body)
        except KubeError as exc:
            self._forget(mv)
            out.error = f"eviction refused: {refusal_text(exc)}"
            log.warning("defrag: not evicting %s: %s", who, out.error)
            self._event(pod, f"not moved by hami defrag: {out.error}", warning=True)
            return None
        except Exception as exc:  # the API server did not answer: nothing known evicted
            self._forget(mv)
            out.error = f"eviction failed: {type(exc).__name__}: {exc}"
            return None
        out.state = ""
        text = (
            f"evicted by hami defrag to move it from {node} {','.join(pod_cards(pod))} "
            f"to {ask.to_node} {','.join(ask.to_cards)}"
        )
        log.info("defrag: %s %s", who, text)
        self._event(pod, text)
        return mv

    async def _finish(self, mv: _Move, timeout: float) -> bool:
        """Wait for the evicted pod to go and its replacement to be placed."""
        try:
            async with asyncio.timeout(timeout):
                await mv.done.wait()
        except TimeoutError:
            mv.out.state = FAILED
            if not mv.gone:
                mv.out.error = f"evicted, but the pod was still there after {timeout:g}s"
            elif not mv.replacement:
                mv.out.error = f"evicted; no replacement pod appeared within {timeout:g}s"
            else:
                mv.out.error = (
                    f"evicted; its replacement {mv.out.replacement} was not placed "
                    f"within {timeout:g}s"
                )
            log.warning("defrag: %s/%s: %s", mv.out.namespace, mv.out.name, mv.out.error)
            return False
        finally:
            self._forget(mv)
        mv.out.state = MOVED
        return True

    def _forget(self, mv: _Move) -> None:
        moves = self.pending.get(mv.owner, [])
        if mv in moves:
            moves.remove(mv)
        if not moves:
            self.pending.pop(mv.owner, None)
        self.by_evicted.pop(mv.ask.uid, None)
        if mv.replacement:
            self.by_replacement.pop(mv.replacement, None)

    def _event(self, pod: Obj, message: str, warning: bool = False) -> None:
        self.binder.kbackend.event(pod, EVENT_REASON, message, warning=warning)

    # ------------------------------------------------------------ the endpoint

    async def _on_request(self, msg: Any) -> None:
        # A task per request: the subscription's callback must not wait for the moves.
        t = asyncio.create_task(self._answer(msg))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        reply: msgspec.Struct
        try:
            req = decode(msg.data, DefragApplyRequest)
            if self.running:
                reply = ErrorReply(error="a defrag apply is already running; try again after it")
            else:
                self.running = True
                try:
                    reply = await self.apply(req)
                finally:
                    self.running = False
        except asyncio.CancelledError:
            # The Lease lost or the binder stopping: say so rather than leave the client
            # to its timeout (a pod evicted already is replaced by its controller).
            if msg.reply:
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        self.bus.nc.publish(
                            msg.reply,
                            msgspec.json.encode(
                                ErrorReply(
                                    error="the binder stopped serving defrag (Lease lost or "
                                    "stopping) while moving; evicted pods are replaced "
                                    "by their controllers, not steered"
                                )
                            ),
                        )
                    )
            raise
        except (BadMessage, ValueError) as exc:
            reply = ErrorReply(error=str(exc))
        except Exception as exc:
            log.exception("defrag apply failed")
            reply = ErrorReply(error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            with contextlib.suppress(Exception):
                await self.bus.nc.publish(msg.reply, msgspec.json.encode(reply))

    async def serve(self) -> None:
        """Answer ``hami.binder.defrag.apply`` (the Lease holder: it has the pod watch)."""
        if self._sub is None:
            self._sub = await self.bus.nc.subscribe(subjects.DEFRAG_APPLY, cb=self._on_request)
        if self._failed_sub is None and self.binder.extender is None:
            self._failed_sub = await self.bus.nc.subscribe(
                subjects.alloc("failed"), cb=self._on_failed
            )

    async def unserve(self) -> None:
        """Stop answering (the Lease is lost, or the binder stops); moves under way end."""
        for name in ("_sub", "_failed_sub"):
            sub = getattr(self, name)
            setattr(self, name, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
