"""The fake's storage: objects, the global resourceVersion, watch history and watchers.

Everything here is synchronous and runs on the event loop thread, so a write, its
history entry and its delivery to every open watch happen atomically, just as etcd plus
the watch cache make them appear to clients.  Objects are kept in their storage
representation (core/v1 for events) and converted to a ``Resource``'s view on the way
out.  Errors are raised as ``ApiError`` carrying the Status body the server answers with.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import errors
from .errors import ApiError
from .jcopy import jcopy
from .patch import PatchError, apply_patch
from .resources import (
    RESOURCES,
    Obj,
    Resource,
    field_values,
    kind_check,
    now,
    prepare_create,
    prepare_update,
    validate,
)
from .selectors import FieldRequirement, Requirement, fields_match, labels_match

Key = tuple[str, str]  # (namespace or "", name)

_enc = msgspec.json.Encoder()

# The watch stream's end-of-stream markers (queued instead of an event).
CLOSE = "close"  # end the response cleanly, like a server-side timeout
ABORT = "abort"  # cut the TCP connection mid-stream


@dataclass
class Change:
    """One committed write, as kept in the watch history."""

    rv: int
    storage: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj  # state after the write (for DELETED: the last state, at the deletion rv)
    prev: Obj | None  # state before the write
    lines: dict[str, bytes] = field(default_factory=dict)  # event type -> wire line

    def line(self, kind: str, res: Resource) -> bytes:
        """The watch event as sent, encoded once however many watchers receive it."""
        out = self.lines.get(kind)
        if out is None:
            out = self.lines[kind] = encode_event(kind, res, self.obj)
        return out


def encode_event(kind: str, res: Resource, obj: Obj) -> bytes:
    # No copy: views never modify what they are given, and encoding only reads.
    return _enc.encode({"type": kind, "object": res.to_view(obj)}) + b"\n"


@dataclass(eq=False)
class Watcher:
    resource: Resource
    namespace: str | None
    labels: list[Requirement]
    fields: list[FieldRequirement]
    # A wire line (bytes), an event still to encode (dict), or CLOSE / ABORT.
    queue: asyncio.Queue[bytes | dict[str, Any] | str] = field(default_factory=asyncio.Queue)

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if not labels_match(self.labels, meta.get("labels")):
            return False
        return not self.fields or fields_match(
            self.fields, field_values(self.resource, self.resource.to_view(obj))
        )

    def offer(self, change: Change) -> None:
        """Queue ``change`` as this watch sees it.

        As the real watch cache does for a filtered watch, an update that makes an
        object start matching is an ADDED and one that makes it stop matching a DELETED.
        """
        now_in = self.matches(change.obj) if change.type != "DELETED" else False
        was_in = self.matches(change.prev)
        if change.type == "DELETED":
            kind = "DELETED" if was_in else None
        elif now_in:
            kind = "MODIFIED" if was_in else "ADDED"
        else:
            kind = "DELETED" if was_in else None
        if kind is not None:
            self.queue.put_nowait(change.line(kind, self.resource))

    def send(self, kind: str, obj: Obj) -> None:
        self.queue.put_nowait(encode_event(kind, self.resource, obj))


@dataclass
class Fault:
    verb: str
    resource: str
    code: int
    times: int = 1
    name: str | None = None
    namespace: str | None = None
    message: str | None = None

    def matches(self, verb: str, resource: str, namespace: str | None, name: str | None) -> bool:
        return (
            self.verb in ("*", verb)
            and self.resource in ("*", resource)
            and self.name in (None, name)
            and self.namespace in (None, namespace)
        )


class Store:
    def __init__(self, history_size: int = 1000) -> None:
        self.rv = 0
        self.objects: dict[str, dict[Key, Obj]] = {r.store_key: {} for r in RESOURCES}
        self.history: deque[Change] = deque()
        self.history_size = history_size
        self.oldest = 0  # a watch may start from any rv >= oldest
        self.watchers: set[Watcher] = set()
        self.faults: list[Fault] = []
        # Successful Bindings per (namespace, pod name): a pod bound twice shows here.
        self.bindings: dict[tuple[str, str], int] = {}
        self.auto_namespaces = False

    # ------------------------------------------------------------------ plumbing

    def _key(self, res: Resource, namespace: str | None, name: str) -> Key:
        return (namespace or "" if res.namespaced else "", name)

    def _stored(self, res: Resource, namespace: str | None, name: str) -> Obj:
        obj = self.objects[res.store_key].get(self._key(res, namespace, name))
        if obj is None:
            raise errors.not_found(res.plural, name, res.group)
        return obj

    def _view(self, res: Resource, obj: Obj) -> Obj:
        return res.to_view(jcopy(obj))

    def _record(self, res: Resource, kind: str, obj: Obj, prev: Obj | None) -> None:
        change = Change(self.rv, res.store_key, kind, jcopy(obj), prev)
        self.history.append(change)
        while len(self.history) > self.history_size:
            self.oldest = self.history.popleft().rv
        for w in list(self.watchers):
            if w.resource.store_key == change.storage:
                w.offer(change)

    def _require_namespace(self, res: Resource, namespace: str | None) -> None:
        """Namespaced objects need their namespace (the NamespaceLifecycle admission)."""
        if not res.namespaced or ("", namespace or "") in self.objects["namespaces"]:
            return
        if not self.auto_namespaces:
            raise errors.not_found("namespaces", namespace or "")
        ns = next(r for r in RESOURCES if r.kind == "Namespace")
        self.create(ns, None, {"metadata": {"name": namespace}})

    def take_fault(
        self, verb: str, resource: str, namespace: str | None, name: str | None
    ) -> ApiError | None:
        """Consume the first injected fault matching this request, if any."""
        for fault in self.faults:
            if fault.matches(verb, resource, namespace, name):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return errors.injected(fault.code, resource, name or "", fault.message)
        return None

    # ------------------------------------------------------------------ reads

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        return self._view(res, self._stored(res, namespace, name))

    def select(
        self,
        res: Resource,
        namespace: str | None,
        labels: list[Requirement] | None = None,
        fields: list[FieldRequirement] | None = None,
    ) -> list[Obj]:
        """Stored objects (not copies) matching, in key order like etcd."""
        w = Watcher(res, namespace if res.namespaced else None, labels or [], fields or [])
        bucket = self.objects[res.store_key]
        return [bucket[k] for k in sorted(bucket) if w.matches(bucket[k])]

    def list_views(
        self,
        res: Resource,
        namespace: str | None,
        labels: list[Requirement] | None = None,
        fields: list[FieldRequirement] | None = None,
    ) -> list[Obj]:
        return [self._view(res, o) for o in self.select(res, namespace, labels, fields)]

    # ------------------------------------------------------------------ writes

    def create(
        self, res: Resource, namespace: str | None, body: Obj, *, dry_run: bool = False
    ) -> Obj:
        if not isinstance(body, dict):
            raise errors.bad_request(f"expected a {res.kind} object")
        kind_check(res, body)
        obj = res.from_view(jcopy(body))
        obj["kind"], obj["apiVersion"] = (
            res.kind,
            "v1" if res.store_key == "events" else res.api_version,
        )
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if res.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise errors.invalid(
                    res.kind,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        validate(res, obj)
        self._require_namespace(res, namespace)
        key = self._key(res, namespace, meta["name"])
        if key in self.objects[res.store_key]:
            raise errors.already_exists(res.plural, meta["name"], res.group)
        for system in (
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ):
            meta.pop(system, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if res.generation:
            meta["generation"] = 1
        prepare_create(res, obj)
        if dry_run:
            meta["resourceVersion"] = str(self.rv)
            return res.to_view(obj)
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self.objects[res.store_key][key] = obj
        self._record(res, "ADDED", obj, None)
        return self._view(res, obj)

    def update(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        body: Obj,
        subresource: str | None = None,
        *,
        dry_run: bool = False,
        allow_create: bool = True,
    ) -> tuple[Obj, bool]:
        """PUT semantics.  Returns (object, created)."""
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise errors.bad_request(f"expected a {res.kind} object")
        kind_check(res, body)
        body_name = body.get("metadata", {}).get("name")
        if body_name != name:
            raise errors.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        if res.namespaced and body["metadata"].get("namespace") not in (None, "", namespace):
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        key = self._key(res, namespace, name)
        old = self.objects[res.store_key].get(key)
        if old is None:
            if res.create_on_update and allow_create and subresource is None:
                return self.create(res, namespace, body, dry_run=dry_run), True
            raise errors.not_found(res.plural, name, res.group)
        new = res.from_view(jcopy(body))
        meta = new["metadata"]
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv not in (None, "") and wanted_rv != old["metadata"]["resourceVersion"]:
            raise errors.stale(res.plural, name, res.group)
        return self._commit_update(res, key, old, new, subresource, dry_run=dry_run), False

    def _commit_update(
        self, res: Resource, key: Key, old: Obj, new: Obj, subresource: str | None, *, dry_run: bool
    ) -> Obj:
        new["kind"], new["apiVersion"] = old["kind"], old["apiVersion"]
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        for system in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if system in old_meta:
                meta[system] = old_meta[system]
            else:
                meta.pop(system, None)
        meta["name"] = old_meta["name"]
        if res.namespaced:
            meta["namespace"] = old_meta["namespace"]
        meta["resourceVersion"] = old_meta["resourceVersion"]
        prepare_update(res, old, new, subresource)
        validate(res, new)
        if new == old:  # no-op writes do not bump the resourceVersion or notify watchers
            return self._view(res, old)
        if res.generation and new.get("spec") != old.get("spec"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if dry_run:
            return res.to_view(new)
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[res.store_key][key]
            self._record(res, "DELETED", new, old)
        else:
            self.objects[res.store_key][key] = new
            self._record(res, "MODIFIED", new, old)
        return self._view(res, new)

    def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        subresource: str | None = None,
        *,
        dry_run: bool = False,
    ) -> Obj:
        key = self._key(res, namespace, name)
        old = self._stored(res, namespace, name)
        try:
            patched = apply_patch(content_type, self._view(res, old), patch)
        except PatchError as exc:
            if exc.invalid:
                raise errors.patch_rejected(str(exc)) from None
            raise errors.bad_request(str(exc)) from None
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise errors.bad_request("patched object is not a valid object")
        if patched["metadata"].get("name") != name:
            raise errors.bad_request(
                f"the name of the object ({patched['metadata'].get('name')}) does not match the name on the URL ({name})"
            )
        wanted_rv = patched["metadata"].get("resourceVersion")
        if wanted_rv not in (None, "") and wanted_rv != old["metadata"]["resourceVersion"]:
            raise errors.stale(res.plural, name, res.group)
        new = res.from_view(patched)
        return self._commit_update(res, key, old, new, subresource, dry_run=dry_run)

    def delete(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        options: Obj | None = None,
        *,
        dry_run: bool = False,
    ) -> Obj:
        """DELETE: the object as the server answers (object for pods, else a Status)."""
        key = self._key(res, namespace, name)
        old = self._stored(res, namespace, name)
        pre = (options or {}).get("preconditions") or {}
        meta = old["metadata"]
        for field_name, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(field_name) not in (None, "") and pre[field_name] != meta[field_name]:
                raise errors.conflict(
                    res.plural,
                    name,
                    f"Precondition failed: {label} in precondition: {pre[field_name]}, "
                    f"{label} in object meta: {meta[field_name]}",
                    res.group,
                )
        if dry_run:
            return self._view(res, old)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = jcopy(old)
                new["metadata"]["deletionTimestamp"] = now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                self.rv += 1
                new["metadata"]["resourceVersion"] = str(self.rv)
                self.objects[res.store_key][key] = new
                self._record(res, "MODIFIED", new, old)
                old = new
            return self._view(res, old)
        if res.kind == "Namespace":
            for other in RESOURCES:
                if other.namespaced and not other.group:
                    for k in [k for k in self.objects[other.store_key] if k[0] == name]:
                        self._remove(other, k)
        gone = self._remove(res, key)
        if res.kind == "Namespace":  # the namespace controller finishes instantly here
            gone["metadata"]["deletionTimestamp"] = now()
            gone["status"] = {"phase": "Terminating"}
        if res.return_deleted or res.kind == "Namespace":
            return self._view(res, gone)
        details: dict[str, Any] = {"name": name}
        if res.group:
            details["group"] = res.group
        details.update({"kind": res.plural, "uid": meta["uid"]})
        return errors.success_body(details=details)

    def _remove(self, res: Resource, key: Key) -> Obj:
        old = self.objects[res.store_key].pop(key)
        gone = jcopy(old)
        self.rv += 1
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(res, "DELETED", gone, old)
        return gone

    def evict(self, namespace: str, name: str, eviction: Any, *, dry_run: bool = False) -> Obj:
        """POST pods/{name}/eviction (policy/v1), as pkg/registry/core/pod/storage
        EvictionREST: a pod no PodDisruptionBudget selects is deleted; one a budget
        selects only while the budget allows a disruption, else 429 TooManyRequests; a
        pod two budgets select is refused with 500.

        The real server reads ``status.disruptionsAllowed``, which the disruption
        controller keeps. No controller runs here, so it is worked out on the spot
        from the budget's spec: the pods it selects that are bound and not being
        deleted count as healthy (no kubelet makes them Ready here)."""
        if not isinstance(eviction, dict):
            raise errors.bad_request("expected an Eviction object")
        emeta = eviction.get("metadata") or {}
        if emeta.get("name") not in (None, "", name):
            raise errors.bad_request("name in URL does not match name in Eviction object")
        pods = next(r for r in RESOURCES if r.kind == "Pod")
        pod = self._stored(pods, namespace, name)
        phase = (pod.get("status") or {}).get("phase")
        if phase not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
            budgets = [b for b in self.select(self._pdbs(), namespace)
                       if _selects(b, pod["metadata"].get("labels") or {})]
            if len(budgets) > 1:
                raise ApiError(errors.status_body(
                    500, "InternalError", "This pod has more than one PodDisruptionBudget, which "
                    "the eviction subresource does not support."))
            if budgets:
                self._check_budget(budgets[0], pods, namespace)
        self.delete(pods, namespace, name, eviction.get("deleteOptions"), dry_run=dry_run)
        return errors.success_body(code=201)

    def _pdbs(self) -> Resource:
        return next(r for r in RESOURCES if r.kind == "PodDisruptionBudget")

    def _check_budget(self, pdb: Obj, pods: Resource, namespace: str) -> None:
        selected = [p for p in self.select(pods, namespace)
                    if _selects(pdb, p["metadata"].get("labels") or {})
                    and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        expected = len(selected)
        healthy = sum(1 for p in selected
                      if (p.get("spec") or {}).get("nodeName") and not p["metadata"].get("deletionTimestamp"))
        spec = pdb.get("spec") or {}
        if spec.get("maxUnavailable") is not None:
            allowed = _scaled(spec["maxUnavailable"], expected) - (expected - healthy)
            need = expected - _scaled(spec["maxUnavailable"], expected)
        else:
            need = _scaled(spec.get("minAvailable", 1), expected)
            allowed = healthy - need
        if allowed <= 0:
            pname = pdb["metadata"]["name"]
            raise ApiError(errors.status_body(
                429, "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
                {"causes": [{"reason": "DisruptionBudget",
                             "message": f"The disruption budget {pname} needs {need} healthy "
                                        f"pods and has {healthy} currently"}]}))

    def bind(self, namespace: str, name: str, binding: Any) -> Obj:
        """POST pods/{name}/binding, as pkg/registry/core/pod/storage BindingREST."""
        if not isinstance(binding, dict):
            raise errors.bad_request("expected a Binding object")
        bmeta = binding.get("metadata") or {}
        if bmeta.get("name") not in (None, "", name):
            raise errors.bad_request("name in URL does not match name in Binding object")
        target = binding.get("target") or {}
        node = target.get("name")
        if not node:
            raise errors.invalid("Binding", name, "target.name", "Required value")
        pods = next(r for r in RESOURCES if r.kind == "Pod")
        key = self._key(pods, namespace, name)
        old = self._stored(pods, namespace, name)
        if bmeta.get("uid") and bmeta["uid"] != old["metadata"]["uid"]:
            raise errors.conflict(
                "pods/binding",
                name,
                f"Precondition failed: UID in precondition: {bmeta['uid']}, UID in object meta: {old['metadata']['uid']}",
            )
        if (
            bmeta.get("resourceVersion")
            and bmeta["resourceVersion"] != old["metadata"]["resourceVersion"]
        ):
            raise errors.stale("pods/binding", name)
        if old["metadata"].get("deletionTimestamp"):
            raise errors.conflict(
                "pods/binding", name, f"pod {name} is being deleted, cannot be assigned to a host"
            )
        current = (old.get("spec") or {}).get("nodeName")
        if current:
            raise errors.conflict(
                "pods/binding", name, f'pod {name} is already assigned to node "{current}"'
            )
        new = jcopy(old)
        new["spec"]["nodeName"] = node
        if bmeta.get("annotations"):
            new["metadata"].setdefault("annotations", {}).update(bmeta["annotations"])
        conditions = new.setdefault("status", {}).setdefault("conditions", [])
        scheduled = {
            "type": "PodScheduled",
            "status": "True",
            "lastProbeTime": None,
            "lastTransitionTime": now(),
        }
        for i, cond in enumerate(conditions):
            if cond.get("type") == "PodScheduled":
                conditions[i] = scheduled
                break
        else:
            conditions.append(scheduled)
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[pods.store_key][key] = new
        self._record(pods, "MODIFIED", new, old)
        self.bindings[(namespace, name)] = self.bindings.get((namespace, name), 0) + 1
        return errors.success_body(code=201)

    # ------------------------------------------------------------------ watch

    def watch(
        self,
        res: Resource,
        namespace: str | None,
        resource_version: str | None,
        labels: list[Requirement],
        fields: list[FieldRequirement],
    ) -> Watcher:
        """Register a watch; its queue is pre-filled with the replay it is owed.

        No resourceVersion (or "0"): synthetic ADDED for every current object, then
        live changes.  resourceVersion=N: every change after N from the history, then
        live changes; N older than the retained history gives one ERROR 410 event.
        """
        w = Watcher(res, namespace if res.namespaced else None, labels, fields)
        if resource_version in (None, "", "0"):
            for obj in self.select(res, namespace, labels, fields):
                w.send("ADDED", obj)
        else:
            try:
                start = int(str(resource_version))
            except ValueError:
                raise errors.bad_request(f"invalid resource version {resource_version!r}") from None
            if start < self.oldest:
                w.queue.put_nowait(
                    {
                        "type": "ERROR",
                        "object": errors.expired(
                            f"too old resource version: {start} ({self.oldest + 1})"
                        ),
                    }
                )
                w.queue.put_nowait(CLOSE)
                return w
            for change in self.history:
                if change.rv > start and change.storage == res.store_key:
                    w.offer(change)
        self.watchers.add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def drop_watches(self, how: str = CLOSE) -> int:
        dropped = list(self.watchers)
        for w in dropped:
            w.queue.put_nowait(how)
            self.watchers.discard(w)
        return len(dropped)

    def compact(self, rv: int | None = None) -> None:
        """Forget history up to ``rv`` (default: everything so far)."""
        upto = self.rv if rv is None else rv
        while self.history and self.history[0].rv <= upto:
            self.history.popleft()
        self.oldest = max(self.oldest, upto)

    def objects_of(self, res: Resource) -> Iterable[Obj]:
        return self.objects[res.store_key].values()


_SELECTOR_OPS = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}


def _selects(pdb: Obj, labels: dict[str, str]) -> bool:
    """A policy/v1 budget's ``spec.selector`` (a LabelSelector; empty selects every pod
    of its namespace, none selects nothing) against a pod's labels."""
    sel = (pdb.get("spec") or {}).get("selector")
    if sel is None:
        return False
    reqs = [Requirement(k, "=", (str(v),)) for k, v in (sel.get("matchLabels") or {}).items()]
    for e in sel.get("matchExpressions") or []:
        op = _SELECTOR_OPS.get(str(e.get("operator")))
        if op is None:
            raise errors.bad_request(f"invalid label selector operator {e.get('operator')!r}")
        reqs.append(Requirement(str(e.get("key")), op, tuple(str(v) for v in e.get("values") or [])))
    return labels_match(reqs, labels)


def _scaled(value: Any, total: int) -> int:
    """An IntOrString of a budget: a count, or a percentage of ``total`` rounded up (as
    the disruption controller rounds both minAvailable and maxUnavailable)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-int(value[:-1]) * total // 100)
    return int(value)
