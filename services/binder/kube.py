"""The binder's Kubernetes mode: pending pods in, HAMi annotations and Bindings out.

Pieces:

- :class:`ListWatch`: list, then watch from the list's resourceVersion; a watch that
  ends (server timeout, dropped connection) resumes from the last resourceVersion seen
  (bookmarks keep it fresh); a 410 Gone relists.
- :class:`KubeBackend` (the binder's ``Backend``): on ``decided``, creates the Binding
  (with the pod's UID as precondition) carrying exactly the pod annotations of
  REFERENCE §4 (the API server writes them with the node name, in one write), then the
  ``hami.io/vgpu-node`` label behind the binds. A failure raises
  :class:`BindError`, and the binder publishes ``released``. Emits HAMi's Events
  (FilteringSucceed, BindingSucceed, BindingFailed; FilteringFailed from ``failed``),
  queued behind the binds (:mod:`services.binder.events`).
- :class:`KubeBinder`: the binder service plus one pod watch and one ResourceQuota watch.

One watch, not two. The pods watched are ``spec.schedulerName=<ours>`` (field selector);
"has no node" is decided per event. A second watch restricted to ``spec.nodeName=``
would lose a bound pod's deletion (it leaves that selection at binding), and two
streams could deliver a pod's deletion before its creation, publishing ``released``
before ``requested``. One stream keeps every pod's events in order.

What is published:

- a pending pod not requested yet -> ``requested`` (uid = pod UID, pending, source
  ``kube``; ``Nats-Msg-Id`` ``requested:<uid>`` so a re-publish after a restart or a
  relist is stored once);
- pod deleted, Succeeded or Failed -> ``released`` (msg id per reason: repeats are
  idempotent in placement anyway);
- a bind failure -> ``released`` (by the base service), then, while the pod is still
  pending, ``requested`` again after a back-off (a new msg id per attempt), because
  Kubernetes would keep such a pod pending and retry it too.

Restart: no double-booking, no leaked reservation, at any moment
------------------------------------------------------------------
Placement owns the ledger (KV, one entry per node, each allocation carries the full
decision: node and per-container cards); the API server owns pods. The binder keeps no
state of its own that matters: after a restart (and after every relist) it takes a
snapshot of the ledger *first*, then lists the pods, and reconciles. Any ledger entry
was written for a pod that existed before the snapshot, so a pod absent from the later
list really is gone. For each kube-sourced allocation and pod:

1. in the ledger, pod gone or terminal -> ``released`` (the reservation would leak);
2. in the ledger, pod pending -> bind it now from the ledger entry (the crash came
   between the decision and the Binding). The durable ``decided`` may be redelivered later;
   binding is idempotent (a pod already bound to the decided node is success) and
   serialised per pod;
3. in the ledger on node A, pod bound to node B -> release A, then as 4;
4. pod bound with HAMi's annotations but not in the ledger (reservation lost: the KV
   was wiped, or released by mistake) -> the binder cannot reserve (only placement
   writes the ledger), so it re-publishes ``requested`` pinned to exactly what the pod
   holds: ``node_name`` = its node, ``use_uuids`` = its cards, each container's ask =
   its granted memory and cores. Placement reserves the same cards (or, if they were
   given away meanwhile, reports ``failed``: a real double-booking, surfaced as a
   Warning Event), and the resulting ``decided`` is bound idempotently;
5. pod pending, not in the ledger -> ``requested``.

Allocations from direct clients (source ``cli``) are never touched. At any instant a
reservation is either in the ledger for a live pod, or released by one of the rules
above at the next start; a card used by a running pod is either in the ledger or
re-adopted: nothing is double-booked by placement knowingly.

Extender mode (``scheduler.mode: extender``): the upstream kube-scheduler drives pending
pods through the HTTP extender (:mod:`services.binder.extender`), so the watch publishes
no ``requested``; it still releases deleted and ended pods (and drops their extender
reservation), and the reconcile's rule 2 hands a pending pod's ledger reservation to the
extender's table (released on time unless the scheduler binds it) instead of binding it;
rule 5 does nothing. Decisions of kube pods are bound only by the extender's ``bind``;
the extender sees them on a plain subscription (every replica), not the work queue.

Gangs: a pod labelled with a coscheduling PodGroup (services/binder/podgroups.py) is
requested with ``gang``/``gang_size``/``gang_timeout`` (docs/gangs.md); one whose
PodGroup is missing or not a gang gets a Warning Event and is held back until the
PodGroup changes. The reconcile never binds a gang member's reservation whose gang has
not committed (placement announces it when it does), and a member whose gang was rolled
back is asked for again while pending (direct mode).

Quota: every namespace's ResourceQuotas (``limits.nvidia.com/gpumem``,
``limits.nvidia.com/gpucores``) are folded into one :class:`~shared.schemas.Quota`
and written to the ``hami-quotas`` KV bucket (key = namespace; deleted when none is
left) for placement to apply.

Single active binder per cluster for the pod watch (replicas would each publish the
same ``requested``; msg-id dedup makes that harmless, but bind retries would race): with
a :class:`~shared.leader.LeaderElector` the watches and their reconcile run only on the
replica holding the Lease; every replica binds the decisions it is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import msgspec

from services.binder.defrag import DefragApplier
from services.binder.events import EventSender, filtering_failed_messages, filtering_succeed_message
from services.binder.extender import Extender, ExtenderServer
from services.binder.service import Backend, BindError, BinderService
from services.binder.webhook import TRACE_ANNOTATION
from shared import subjects, tracing
from shared.bus import BadMessage, Bus, decode, decode_event
from shared.config import Config
from shared.devices.registry import decision_annotations
from shared.hami import annotations as ann
from shared.hami.codec import PodSpecError, pod_request, quota_from_resource_quotas
from shared.hami.mig import MIG_ALLOCATIONS, encode_mig_allocations
from shared.hami.podgroup import Gang, PodGroupError, pod_group_name
from shared.kube import Gone, Kube, KubeError, NotFound, path
from shared.leader import LeaderElector
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocReleased,
    AllocRequested,
    CardGrant,
    DeviceAsk,
    LedgerAlloc,
    NodeLedger,
)

log = logging.getLogger("hami.binder.kube")
tracer = tracing.tracer("hami.binder")

COMPONENT = "hami-scheduler"
TERMINAL = ("Succeeded", "Failed")
# placement's failure reasons for a member whose gang was rolled back (docs/gangs.md)
GANG_UNDONE = ("gang-expired", "gang-rolled-back")

# Event reasons (REFERENCE §4).
FILTERING_FAILED = "FilteringFailed"
FILTERING_SUCCEED = "FilteringSucceed"
# A pod's coscheduling PodGroup is missing or not a gang (docs/gangs.md); ours, not HAMi's.
POD_GROUP_INVALID = "PodGroupInvalid"
BINDING_FAILED = "BindingFailed"
BINDING_SUCCEED = "BindingSucceed"

Obj = dict[str, Any]


def _meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def _now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_annotations(d: AllocDecided, bind_time: float) -> dict[str, str]:
    """Exactly the annotations HAMi writes on a pod it binds (REFERENCE §4)."""
    devices = ann.encode_pod_devices(d.containers)
    out = {
        ann.VGPU_NODE: d.node,
        ann.VGPU_TIME: str(int(d.decided_at or bind_time)),
        ann.DEVICES_TO_ALLOCATE: devices,
        ann.DEVICES_ALLOCATED: devices,
        ann.BIND_PHASE: ann.BIND_ALLOCATING,
        ann.BIND_TIME: str(int(bind_time)),
    }
    mig = encode_mig_allocations(d.containers)  # HAMi's MIG reservations, when any
    if mig is not None:
        out[MIG_ALLOCATIONS] = mig
    # Other vendors' cards: each family's own annotations, which its plugin reads
    out.update(decision_annotations(d.containers, d.node))
    return out


def pod_is_pending(pod: Obj) -> bool:
    spec = pod.get("spec") or {}
    phase = (pod.get("status") or {}).get("phase")
    return not spec.get("nodeName") and phase not in TERMINAL and not _meta(pod).get("deletionTimestamp")


# ------------------------------------------------------------------------- list+watch


class ListWatch:
    """List, then watch from the list's resourceVersion; resume and relist as needed.

    ``relist()`` lists (the caller decides how, so it can snapshot other state first)
    and returns the list's resourceVersion; ``on_event(type, obj)`` gets each change.
    """

    def __init__(
        self,
        kube: Kube,
        resource_path: str,
        relist: Callable[[], Awaitable[str]],
        on_event: Callable[[str, Obj], Awaitable[None]],
        *,
        field_selector: str | None = None,
        timeout_s: int = 300,
        name: str = "watch",
    ) -> None:
        self.kube = kube
        self.path = resource_path
        self.relist = relist
        self.on_event = on_event
        self.field_selector = field_selector
        self.timeout_s = timeout_s
        self.name = name
        self.synced = asyncio.Event()
        self.rv: str | None = None
        self.relists = 0
        self.resumes = 0

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self.rv is None:
                    self.rv = await self.relist()
                    self.relists += 1
                    self.synced.set()
                async for ev in self.kube.watch(
                    self.path,
                    timeout=self.timeout_s + 30,
                    fieldSelector=self.field_selector,
                    resourceVersion=self.rv,
                    allowWatchBookmarks="true",
                    timeoutSeconds=self.timeout_s,
                ):
                    obj = ev.get("object") or {}
                    rv = _meta(obj).get("resourceVersion")
                    if ev.get("type") != "BOOKMARK":
                        await self.on_event(str(ev.get("type")), obj)
                    if rv:
                        self.rv = str(rv)
                    backoff = 0.1
                self.resumes += 1  # the server ended the watch: resume from self.rv
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("%s: resourceVersion %s expired; relisting", self.name, self.rv)
                self.rv = None
            except (KubeError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.warning("%s: %s; retrying in %.1fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self.resumes += 1
            except Exception:
                log.exception("%s: handler failed; relisting", self.name)
                self.rv = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


async def list_all(kube: Kube, resource_path: str, **query: Any) -> tuple[list[Obj], str]:
    """Every item (paged by 500) and the list's resourceVersion."""
    items: list[Obj] = []
    cont: str | None = None
    while True:
        out = await kube.get(resource_path, limit=500, **{"continue": cont}, **query)
        items.extend(out.get("items") or [])
        meta = out.get("metadata") or {}
        cont = meta.get("continue")
        if not cont:
            return items, str(meta.get("resourceVersion") or "")


# -------------------------------------------------------------------------- backend


class KubeBackend(Backend):
    """Writes HAMi's annotations and creates the Binding; emits HAMi's Events."""

    def __init__(
        self, kube: Kube, *, instance: str = "", pods: Mapping[str, Obj] | None = None
    ) -> None:
        self.kube = kube
        # The binder's watch cache (uid -> pod): saves a GET per bind. A stale entry is
        # harmless: the patch of a deleted pod fails, the Binding of a bound one is 409.
        self.pods: Mapping[str, Obj] = pods if pods is not None else {}
        self.instance = instance or COMPONENT
        self._locks: dict[str, asyncio.Lock] = {}
        self.events = EventSender(self.kube.post)
        self.failed: set[str] = set()  # uids whose last bind failed (the binder retries)
        self.errors: dict[str, str] = {}  # uid -> why its last bind failed (the extender says it)

    def lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str) -> None:
        lk = self._locks.get(uid)
        if lk is not None and not lk.locked():
            del self._locks[uid]
        self.failed.discard(uid)
        self.errors.pop(uid, None)

    # ------------------------------------------------------------------- events

    def event(self, pod: Obj, reason: str, message: str, warning: bool = False) -> None:
        """Queue a core/v1 Event about ``pod`` (sent behind the binds; never fails one)."""
        meta = _meta(pod)
        ns = str(meta.get("namespace") or "default")
        now = _now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": ns},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns,
                               "name": meta.get("name"), "uid": meta.get("uid")},
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.events.emit(path("events", ns), body)

    async def flush_events(self) -> None:
        await self.events.stop()

    # --------------------------------------------------------------------- bind

    async def create_binding(
        self, namespace: str, name: str, uid: str, node: str,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """POST pods/<name>/binding. The API answers a *Status* on success, which the
        37.x client's ``create_namespaced_pod_binding`` cannot deserialise into
        V1Binding (it raises; tests/test_fakekube.py shows it). The generic request
        takes the raw answer and checks its status, and skips the generated method's
        pydantic validation, a tenth of the binder's CPU in a burst."""
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid}
        if annotations:
            meta["annotations"] = annotations
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": meta,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        await self.kube.post(path("pods", namespace, name, "binding"), body)

    def label_later(self, namespace: str, name: str, node: str) -> None:
        """The ``hami.io/vgpu-node`` label, written behind the binds like the Events.

        A Binding carries annotations (the API server copies them onto the pod with
        the node name, in one write) but not labels; nothing of ours reads the label,
        so it does not hold up the next pod.
        """
        patch = {"metadata": {"labels": {ann.VGPU_NODE: node}}}
        self.events.emit(path("pods", namespace, name), patch, send=self.kube.patch)

    async def bind(self, decision: AllocDecided) -> None:
        d = decision
        async with self.lock(d.uid):
            try:
                with self.events.busy():
                    await self._bind(d)
            except BindError as exc:
                self.failed.add(d.uid)
                self.errors[d.uid] = str(exc)
                raise
            self.failed.discard(d.uid)
            self.errors.pop(d.uid, None)

    async def _bind(self, d: AllocDecided) -> None:
        ns = d.namespace or "default"
        try:
            cached = self.pods.get(d.uid)
            pod = cached if cached is not None else await self.kube.get(path("pods", ns, d.name))
        except NotFound:
            raise BindError(f"pod {ns}/{d.name} no longer exists") from None
        except (KubeError, aiohttp.ClientError, OSError) as exc:
            raise BindError(f"cannot read pod {ns}/{d.name}: {exc}") from exc
        meta = _meta(pod)
        if meta.get("uid") != d.uid:
            raise BindError(f"pod {ns}/{d.name} was recreated (uid {meta.get('uid')}, decided for {d.uid})")
        current = (pod.get("spec") or {}).get("nodeName")
        if current == d.node:
            # Bound already (a redelivered decision, or bound before a restart); the
            # label may not have followed yet.
            if (meta.get("labels") or {}).get(ann.VGPU_NODE) != d.node:
                self.label_later(ns, d.name, d.node)
            return
        if current:
            raise BindError(f"pod {ns}/{d.name} is already assigned to node {current}")
        if meta.get("deletionTimestamp"):
            raise BindError(f"pod {ns}/{d.name} is being deleted")
        self.event(pod, FILTERING_SUCCEED, filtering_succeed_message(d.node, d.filtered))
        try:
            # REFERENCE §4's annotations travel in the Binding: the pod is never seen
            # bound without them, nor annotated for a bind that did not happen.
            await self.create_binding(ns, d.name, d.uid, d.node, pod_annotations(d, time.time()))
        except (KubeError, aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, KubeError) and f'assigned to node "{d.node}"' in exc.message:
                self.event(pod, BINDING_SUCCEED, f"Successfully binding node [{d.node}] to {ns}/{d.name}")
                return  # a concurrent bind of the same decision got there first
            msg = f"binding {ns}/{d.name} to {d.node}: {exc}"
            self.event(pod, BINDING_FAILED, msg, warning=True)
            with contextlib.suppress(KubeError, aiohttp.ClientError, OSError):
                await self.kube.patch(path("pods", ns, d.name),
                                      {"metadata": {"annotations": {ann.BIND_PHASE: ann.BIND_FAILED}}})
            raise BindError(msg) from exc
        self.label_later(ns, d.name, d.node)
        self.event(pod, BINDING_SUCCEED, f"Successfully binding node [{d.node}] to {ns}/{d.name}")


# --------------------------------------------------------------------------- binder


def _ledger_decision(node: str, alloc: LedgerAlloc) -> AllocDecided:
    return AllocDecided(uid=alloc.uid, name=alloc.name, namespace=alloc.namespace, node=node,
                        containers=alloc.containers, source=alloc.source,
                        decided_at=alloc.decided_at)


def adopt_request(base: AllocRequested, node: str, grants: list[list[CardGrant]]) -> AllocRequested:
    """A request that re-reserves exactly what a bound pod holds (restart rule 4)."""
    containers = []
    uuids: list[str] = []
    for i, c in enumerate(base.containers):
        g = grants[i] if i < len(grants) else []
        devices = []
        if g:
            devices = [DeviceAsk(vendor=g[0].vendor, nums=len(g), mem=max(x.mem for x in g),
                                 cores=max(x.cores for x in g))]
            uuids.extend(x.uuid for x in g if x.uuid not in uuids)
        containers.append(msgspec.structs.replace(c, devices=devices))
    cons = msgspec.structs.replace(base.constraints, node_name=node, use_uuids=uuids,
                                   nouse_uuids=[])
    return msgspec.structs.replace(base, containers=containers, constraints=cons)


class KubeBinder(BinderService):
    """The binder service with Kubernetes as its source of requests and its backend."""

    def __init__(
        self,
        bus: Bus,
        cfg: Config,
        kube: Kube,
        *,
        watch_timeout_s: int = 300,
        retry_backoff_s: float = 1.0,
        extender_host: str = "0.0.0.0",
        extender_port: int | None = None,
        extender_timeout_s: float | None = None,
    ) -> None:
        self.kube = kube
        self.pods: dict[str, Obj] = {}  # uid -> last seen pod (ours, not yet released)
        self.kbackend = KubeBackend(kube, pods=self.pods)
        super().__init__(bus, cfg, self.kbackend)
        self.scheduler_name = cfg.scheduler.scheduler_name
        self.watch_timeout_s = watch_timeout_s
        self.retry_backoff_s = retry_backoff_s
        self.requested: set[str] = set()  # uids with a requested published
        self.released: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.quotas: dict[str, dict[str, Obj]] = {}  # ns -> rq name -> ResourceQuota
        self.pod_watch = ListWatch(
            kube, path("pods"), self._relist_pods, self._on_pod,
            field_selector=f"spec.schedulerName={self.scheduler_name}",
            timeout_s=watch_timeout_s, name="pods",
        )
        self.quota_watch = ListWatch(
            kube, path("resourcequotas"), self._relist_quotas, self._on_quota,
            timeout_s=watch_timeout_s, name="resourcequotas",
        )
        from services.binder.queues import QueueSync  # it builds on this module's ListWatch

        self.queue_sync = QueueSync(kube, bus, timeout_s=watch_timeout_s)
        from services.binder.podgroups import PodGroups  # it builds on ListWatch too

        self.podgroups = PodGroups(kube, timeout_s=watch_timeout_s, on_change=self._on_pod_group)
        # Direct mode: pending pods held back for their PodGroup, "ns/name" -> uids, asked
        # for again when it changes. Both modes: the PodGroup problem last told per pod.
        self.gang_blocked: dict[str, set[str]] = {}
        self.gang_told: dict[str, str] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._kube_tasks: list[asyncio.Task[None]] = []
        self.leader: LeaderElector | None = None
        self.mode = cfg.scheduler.mode
        self.extender: Extender | None = None
        self.extender_server: ExtenderServer | None = None
        self._extender_subs: list[Any] = []
        if self.mode == "extender":
            self.extender = Extender(bus, cfg, self, timeout_s=extender_timeout_s)
            port = cfg.scheduler.extender_port if extender_port is None else extender_port
            self.extender_server = ExtenderServer(self.extender, host=extender_host, port=port)
        # hami defrag --apply (docs/defrag.md): evictions, and replacements steered to
        # the planned cards by either mode's placing of them.
        self.defrag = DefragApplier(self)
        if self.extender is not None:
            self.extender.steer = self.defrag.steer
            self.extender.unsteer = self.defrag.unsteer

    # ------------------------------------------------------------ publishing

    async def publish_requested(self, req: AllocRequested, msg_id: str) -> None:
        await self.bus.publish_event(subjects.alloc("requested"), req, msg_id=msg_id)
        self.requested.add(req.uid)

    async def publish_released(self, pod: Obj, node: str, reason: str) -> None:
        meta = _meta(pod)
        uid = str(meta.get("uid") or "")
        ev = AllocReleased(uid=uid, name=str(meta.get("name") or ""),
                           namespace=str(meta.get("namespace") or ""), node=node,
                           reason=reason, at=time.time())
        subject = subjects.alloc("released", node) if node else subjects.alloc("released")
        await self.bus.publish_event(subject, ev, msg_id=f"released:{uid}:{reason}")

    def _request(self, pod: Obj) -> AllocRequested | None:
        try:
            return pod_request(pod, self.cfg.node, self.cfg.resources, now=time.time())
        except PodSpecError as exc:
            # The webhook refuses these; a pod that got past it stays pending, with why.
            self.kbackend.event(pod, FILTERING_FAILED, f"invalid request: {exc}", warning=True)
            return None

    async def _request_pod(self, pod: Obj, msg_id: str | None = None) -> None:
        req = self._request(pod)
        if req is None:
            self.requested.add(str(_meta(pod).get("uid")))  # do not re-parse every MODIFIED
            return
        if pod_group_name(pod):
            try:
                gang = await self.pod_gang(pod)
            except PodGroupError:
                # Held back until its PodGroup changes (_on_pod_group asks again).
                key = f"{req.namespace or 'default'}/{pod_group_name(pod)}"
                self.gang_blocked.setdefault(key, set()).add(req.uid)
                self.requested.add(req.uid)
                return
            except (KubeError, aiohttp.ClientError, OSError) as exc:
                log.warning("pod %s/%s: cannot read its PodGroup (%s); trying again",
                            req.namespace, req.name, exc)
                self._spawn(self._request_later(req.namespace, req.name, req.uid, "podgroup"))
                self.requested.add(req.uid)
                return
            if gang is not None:
                req = msgspec.structs.replace(req, gang=gang.name, gang_size=gang.size,
                                              gang_timeout=gang.timeout)
        req = self.defrag.steered_request(req, pod)  # a replacement of an evicted pod
        # The webhook's trace of this pod (its annotation, while tracing is on) goes on
        # here: placement's decision, the bind and the node's work are all in it.
        meta = _meta(pod)
        tp = str((meta.get("annotations") or {}).get(TRACE_ANNOTATION) or "")
        with tracing.resume(tracer, "binder.pod", tp) as span:
            if span.is_recording():
                span.set_attributes({"hami.uid": req.uid,
                                     "k8s.namespace.name": str(meta.get("namespace") or ""),
                                     "k8s.pod.name": str(meta.get("name") or "")})
            await self.publish_requested(req, msg_id or f"requested:{req.uid}")

    async def request_pod(self, pod: Obj, msg_id: str) -> None:
        """Ask placement for a pending pod again (a replacement no longer steered)."""
        await self._request_pod(pod, msg_id=msg_id)

    # --------------------------------------------------------------- pod events

    async def _on_pod(self, kind: str, pod: Obj) -> None:
        meta = _meta(pod)
        uid = str(meta.get("uid") or "")
        if not uid:
            return
        self.defrag.on_pod(kind, pod)
        phase = (pod.get("status") or {}).get("phase")
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if kind == "DELETED":
            self.pods.pop(uid, None)
            await self._release_pod(pod, node, "deleted")
            return
        if phase in TERMINAL:
            self.pods.pop(uid, None)
            await self._release_pod(pod, node, str(phase).lower())
            return
        self.pods[uid] = pod
        if self.extender is not None:
            return  # kube-scheduler drives pending pods through the extender
        if pod_is_pending(pod) and uid not in self.requested:
            await self._request_pod(pod)

    async def _release_pod(self, pod: Obj, node: str, reason: str) -> None:
        uid = str(_meta(pod).get("uid"))
        if uid in self.released:
            return
        self.released.add(uid)
        if self.extender is not None:
            self.extender.forget(uid)
        # Whether or not it was placed: placement frees a reservation or drops a
        # pending request; both idempotent.
        await self.publish_released(pod, node or str(_meta(pod).get("annotations", {}).get(ann.VGPU_NODE) or ""), reason)
        self.requested.discard(uid)
        self.attempts.pop(uid, None)
        self.gang_told.pop(uid, None)
        self.kbackend.forget(uid)

    # ------------------------------------------------------------ reconcile

    async def ledger_snapshot(self) -> dict[str, tuple[str, LedgerAlloc]]:
        """uid -> (node, allocation) for every kube-sourced reservation, read now."""
        kv = await self.bus.kv(subjects.LEDGER_BUCKET)
        out: dict[str, tuple[str, LedgerAlloc]] = {}
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value is None or entry.operation in ("DEL", "PURGE"):
                    continue
                led = decode(entry.value, NodeLedger)
                for uid, a in led.allocs.items():
                    if a.source == "kube":
                        out[uid] = (led.node, a)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return out

    async def _relist_pods(self) -> str:
        ledger = await self.ledger_snapshot()  # first: see the module docstring
        items, rv = await list_all(self.kube, path("pods"),
                                   fieldSelector=f"spec.schedulerName={self.scheduler_name}")
        listed = {str(_meta(p).get("uid")): p for p in items}
        # Pods we knew that vanished while the watch was down.
        for uid, pod in list(self.pods.items()):
            if uid not in listed:
                self.pods.pop(uid, None)
                await self._release_pod(pod, str((pod.get("spec") or {}).get("nodeName") or ""), "deleted")
        for uid, (node, alloc) in ledger.items():
            lpod = listed.get(uid)
            if lpod is None or (lpod.get("status") or {}).get("phase") in TERMINAL:
                gone = lpod or {"metadata": {"uid": uid, "name": alloc.name, "namespace": alloc.namespace}}
                reason = "deleted" if lpod is None else str(lpod["status"]["phase"]).lower()
                log.info("reconcile: %s/%s holds a reservation on %s but is %s; releasing",
                         alloc.namespace, alloc.name, node, reason)
                await self._release_pod(gone, node, reason)
        for uid, pod in listed.items():
            phase = (pod.get("status") or {}).get("phase")
            if phase in TERMINAL:
                await self._release_pod(pod, str((pod.get("spec") or {}).get("nodeName") or ""), str(phase).lower())
                continue
            self.pods[uid] = pod
            held = ledger.get(uid)
            bound_to = str((pod.get("spec") or {}).get("nodeName") or "")
            if held is not None and held[1].gang_expires > 0 and pod_is_pending(pod):
                # A gang member's reservation, its gang not committed: never bound now.
                # Placement commits it (its decision is then bound) or rolls it back.
                if self.extender is None:
                    self.requested.add(uid)
                continue
            if pod_is_pending(pod) and self.extender is not None:
                if held is not None:
                    # Decided, not bound: the scheduler's bind may still come; the
                    # sweep releases it on time if not (extender mode's rule 2).
                    self.extender.adopt(_ledger_decision(*held), held[1].decided_at)
                continue  # not in the ledger: kube-scheduler filters it when it will
            if pod_is_pending(pod):
                if held is not None:
                    # Decided, not bound: bind now from the ledger (rule 2).
                    self.requested.add(uid)
                    self._spawn(self._bind_from_ledger(pod, *held))
                elif uid not in self.requested:
                    await self._request_pod(pod)
                continue
            if not bound_to:
                continue  # being deleted before binding: its DELETED event releases it
            if held is not None and held[0] == bound_to:
                self.requested.add(uid)
                continue
            if held is not None:  # rule 3
                await self.publish_released(pod, held[0], "moved")
            await self._adopt(pod, bound_to)
        return rv

    async def _bind_from_ledger(self, pod: Obj, node: str, alloc: LedgerAlloc) -> None:
        d = _ledger_decision(node, alloc)
        try:
            await self.handle_decided(d)
        except Exception:
            log.exception("binding %s/%s from the ledger", alloc.namespace, alloc.name)

    async def _adopt(self, pod: Obj, node: str) -> None:
        meta = _meta(pod)
        anns = meta.get("annotations") or {}
        text = anns.get(ann.DEVICES_ALLOCATED)
        req = self._request(pod)
        if req is None:
            return
        if text is None or anns.get(ann.VGPU_NODE) not in (None, node):
            if any(c.devices for c in req.containers):
                log.warning("pod %s/%s is on %s with HAMi resources but no HAMi annotations",
                            req.namespace, req.name, node)
            grants: list[list[CardGrant]] = [[] for _ in req.containers]
        else:
            try:
                grants = ann.decode_pod_devices(text)
            except ann.AnnotationError as exc:
                log.warning("pod %s/%s: %s", req.namespace, req.name, exc)
                return
        log.info("reconcile: %s/%s is bound to %s but not in the ledger; re-adopting",
                 req.namespace, req.name, node)
        await self.publish_requested(adopt_request(req, node, grants),
                                     f"requested:{req.uid}:adopt:{meta.get('resourceVersion')}")

    # ----------------------------------------------------- decisions / failures

    async def handle_decided(self, d: AllocDecided) -> None:
        if self.extender is not None and d.source == "kube":
            # The scheduler's bind call binds it (the extender saw the decision on its
            # own subscription, on the replica serving the filter).
            return
        await super().handle_decided(d)
        if d.source == "kube" and d.uid in self.kbackend.failed:
            self._spawn(self._retry(d))

    # ------------------------------------------------------------ extender mode

    async def bind_decision(self, d: AllocDecided) -> str | None:
        """Bind a filter's reservation exactly as direct mode binds a decision
        (annotations in the Binding, ``bound``; on failure ``bind_failed`` and
        ``released``); the failure's text, or None."""
        await BinderService.handle_decided(self, d)
        if d.uid in self.kbackend.failed:
            return self.kbackend.errors.get(d.uid) or "bind failed"
        return None

    async def read_pod(self, namespace: str, name: str) -> Obj | None:
        try:
            pod: Obj = await self.kube.get(path("pods", namespace, name))
        except NotFound:
            return None
        return pod

    async def pod_gang(self, pod: Obj) -> Gang | None:
        """The gang of the pod's PodGroup (None: it names none). A PodGroup missing or
        not a gang raises :class:`PodGroupError`, told once per pod and problem as a
        Warning Event (kube-scheduler's FailedScheduling repeats it in extender mode)."""
        uid = str(_meta(pod).get("uid") or "")
        try:
            gang = await self.podgroups.pod_gang(pod)
        except PodGroupError as exc:
            if self.gang_told.get(uid) != str(exc):
                self.gang_told[uid] = str(exc)
                log.warning("pod %s/%s: %s; not placed until it is fixed",
                            _meta(pod).get("namespace"), _meta(pod).get("name"), exc)
                self.kbackend.event(pod, POD_GROUP_INVALID,
                                    f"{exc}; the pod is not placed until it is", warning=True)
            raise
        self.gang_told.pop(uid, None)
        return gang

    async def _on_pod_group(self, key: str) -> None:
        """A PodGroup appeared, changed or went: direct mode asks again for the pods it
        held back for it (extender mode: kube-scheduler's next attempt reads it)."""
        for uid in sorted(self.gang_blocked.pop(key, set())):
            pod = self.pods.get(uid)
            if pod is not None and pod_is_pending(pod) and self.extender is None:
                self.requested.discard(uid)
                await self._request_pod(pod, msg_id=f"requested:{uid}:podgroup:{_meta(pod).get('resourceVersion')}")

    async def _request_later(self, namespace: str, name: str, uid: str, why: str) -> None:
        """Direct mode: ask again for a pod still pending, after a back-off."""
        await asyncio.sleep(self.retry_backoff_s)
        if uid in self.released:
            return
        try:  # read now: a standby replica keeps no pod cache
            fresh = await self.kube.get(path("pods", namespace or "default", name))
        except KubeError:
            return
        if _meta(fresh).get("uid") != uid or not pod_is_pending(fresh):
            return
        await self._request_pod(fresh, msg_id=f"requested:{uid}:{why}:{time.time_ns()}")

    async def _on_alloc_msg(self, msg: Any) -> None:
        """Every decision and failure, on every replica (a plain subscription, not the
        shared work queue: the filter waiting for it may be on any replica)."""
        ext = self.extender
        if ext is None:
            return
        try:
            ev = decode_event(msg.data)
        except BadMessage:
            return
        if isinstance(ev, AllocDecided) and ev.source == "kube":
            ext.on_decided(ev)
        elif isinstance(ev, AllocFailed) and ev.source == "kube":
            ext.on_failed(ev)

    async def _retry(self, d: AllocDecided) -> None:
        """After a failed bind (released already): ask again while the pod is pending."""
        n = self.attempts[d.uid] = self.attempts.get(d.uid, 0) + 1
        await asyncio.sleep(min(self.retry_backoff_s * n, 30.0))
        # Not ``self.pods``: only the Lease holder watches pods, and a standby replica
        # binds decisions too; the fresh read below says whether the pod still waits.
        if d.uid in self.released:
            return
        try:
            fresh = await self.kube.get(path("pods", d.namespace or "default", d.name))
        except KubeError:
            return
        if _meta(fresh).get("uid") != d.uid or not pod_is_pending(fresh):
            return
        await self._request_pod(fresh, msg_id=f"requested:{d.uid}:retry{n}")

    async def handle_failed(self, f: AllocFailed) -> None:
        if f.source == "kube":
            pod = self.pods.get(f.uid) or {"metadata": {"uid": f.uid, "name": f.name, "namespace": f.namespace}}
            if f.nodes_total and not f.reason:
                # HAMi's events: one per card reason naming its nodes, then the count
                offered = len(f.node_reasons) or f.nodes_total
                for msg in filtering_failed_messages(f.reason_nodes, offered):
                    self.kbackend.event(pod, FILTERING_FAILED, msg, warning=True)
            else:  # refused before any node was judged (invalid, expired): say why
                counts = ", ".join(f"{n} {r}" for r, n in sorted(f.reasons.items()))
                msg = f.message or f"0/{f.nodes_total} nodes are available: {counts}"
                self.kbackend.event(pod, FILTERING_FAILED, msg, warning=True)
            if f.reason in GANG_UNDONE and self.extender is None:
                # Its gang was rolled back and placement dropped the request; the pod is
                # still pending, so ask again, as kube-scheduler would try it again.
                self._spawn(self._request_later(f.namespace, f.name, f.uid, f.reason))
        await super().handle_failed(f)

    # ------------------------------------------------------------------ quotas

    async def _relist_quotas(self) -> str:
        items, rv = await list_all(self.kube, path("resourcequotas"))
        before = set(self.quotas)
        self.quotas = {}
        for rq in items:
            m = _meta(rq)
            self.quotas.setdefault(str(m.get("namespace")), {})[str(m.get("name"))] = rq
        for ns in before | set(self.quotas):
            await self._write_quota(ns)
        return rv

    async def _on_quota(self, kind: str, rq: Obj) -> None:
        m = _meta(rq)
        ns, name = str(m.get("namespace")), str(m.get("name"))
        if kind == "DELETED":
            self.quotas.get(ns, {}).pop(name, None)
        else:
            self.quotas.setdefault(ns, {})[name] = rq
        await self._write_quota(ns)

    async def _write_quota(self, ns: str) -> None:
        q = quota_from_resource_quotas(list(self.quotas.get(ns, {}).values()), self.cfg.node,
                                       self.cfg.resources)
        if q is None:
            self.quotas.pop(ns, None)
            with contextlib.suppress(Exception):
                await self.bus.kv_delete(subjects.QUOTA_BUCKET, ns)
            return
        await self.bus.kv_put(subjects.QUOTA_BUCKET, ns, q)

    # ---------------------------------------------------------------- lifecycle

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def start(self, serve_api: bool = True, leader: LeaderElector | None = None) -> None:
        """With ``leader`` (made with ``on_start=self.start_watches``,
        ``on_stop=self.stop_watches``), the watches and their reconcile run only while
        this replica holds the Lease; decisions are bound by every replica."""
        await super().start(serve_api=serve_api)
        if self.extender_server is not None:
            for subject in (subjects.alloc_any("decided"), subjects.alloc("failed")):
                self._extender_subs.append(await self.bus.subscribe(subject, self._on_alloc_msg))
            await self.extender_server.start()
        self.leader = leader
        if leader is None:
            await self.start_watches()
        else:
            leader.start()

    async def start_watches(self) -> None:
        """The pod and quota watches (each relists, so reconciles, first); until synced."""
        for w in (self.pod_watch, self.quota_watch):
            w.rv = None
            w.synced.clear()
        self._kube_tasks = [
            asyncio.create_task(self.pod_watch.run(), name="binder-pods"),
            asyncio.create_task(self.quota_watch.run(), name="binder-quotas"),
            # the Queue resources (docs/queues.md); not waited for: the CRD may be absent
            asyncio.create_task(self.queue_sync.watch.run(), name="binder-queues"),
            # coscheduling's PodGroups (docs/gangs.md); not waited for: often not installed
            asyncio.create_task(self.podgroups.watch.run(), name="binder-podgroups"),
        ]
        await asyncio.wait_for(
            asyncio.gather(self.pod_watch.synced.wait(), self.quota_watch.synced.wait()), 30
        )
        if self.extender is not None:
            # Serve once the reconcile rebuilt the reservation table from the ledger.
            self.extender.activate()
        await self.defrag.serve()

    async def stop_watches(self) -> None:
        if self.extender is not None:
            self.extender.deactivate()
        await self.defrag.unserve()
        tasks = list(self._kube_tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for t in stuck:
                log.warning("%s did not stop within 5s", t.get_name())
        self._kube_tasks.clear()

    def ready_checks(self) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        if self.extender_server is not None:
            # A standby listens too (it answers 503), so it stays ready for the webhook.
            out.append(("extender", None if self.extender_server.listening else "not listening"))
        if self.leader is not None:
            out.append(("leader", None))  # a standby is ready: it binds and serves the webhook
            if not self.leader.leading:
                return out
        out.append(("kube pods", None if self.pod_watch.synced.is_set() else "not synced"))
        return out

    async def stop(self) -> None:
        if self.leader is not None:
            await self.leader.stop()  # the watches stop before the Lease is released
        tasks = [*self._kube_tasks, *self._retries]
        for t in tasks:
            t.cancel()
        if tasks:
            # Bounded: a watch blocked in the HTTP client may take its cancellation only
            # when the connection closes (the caller closes the client after this).
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for t in stuck:
                log.warning("%s did not stop within 5s; its connection is closed next", t.get_name())
        self._kube_tasks.clear()
        await self.defrag.unserve()
        if self.extender_server is not None:
            await self.extender_server.stop()
        if self.extender is not None:
            await self.extender.stop()
        for sub in self._extender_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._extender_subs.clear()
        await super().stop()
        await self.kbackend.flush_events()
