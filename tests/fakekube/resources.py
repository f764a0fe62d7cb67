"""The kinds the fake serves and the per-kind rules of the real registry.

Each ``Resource`` is one REST view (group/version/plural).  ``events.k8s.io/v1`` events
are a second view of the core ``events`` storage, converted field by field as the real
server does.  The functions below mirror the registry strategies in
kubernetes/pkg/registry/core/*/strategy.go closely enough for our services: defaulting on
create (pod status ``Pending``, scheduler name, default tolerations, requests from
limits), status/spec separation between the main resource and ``/status``, the pod-spec
update rules, and the fields each kind can be selected on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError, bad_request, invalid, status_body
from .jcopy import jcopy

Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _identity(obj: Obj) -> Obj:
    return obj


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    namespaced: bool
    group: str = ""
    version: str = "v1"
    storage: str = ""  # storage shared by several views; defaults to plural
    subresources: frozenset[str] = frozenset()
    fields: frozenset[str] = frozenset()  # field-selector labels besides metadata.name/namespace
    generation: bool = False  # metadata.generation tracks spec changes
    return_deleted: bool = False  # DELETE answers with the object instead of a Status
    create_on_update: bool = False  # PUT of a missing name creates it
    to_view: Callable[[Obj], Obj] = field(default=_identity, compare=False)
    from_view: Callable[[Obj], Obj] = field(default=_identity, compare=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store_key(self) -> str:
        return self.storage or self.plural

    @property
    def qualified(self) -> str:
        """``pods`` or ``events.events.k8s.io``: the name used in messages and lookups."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def supports_field(self, name: str) -> bool:
        return name in ("metadata.name", "metadata.namespace") or name in self.fields


# --------------------------------------------------------------------------- events views

_EVENT_RENAMES = (
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("count", "deprecatedCount"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("source", "deprecatedSource"),
    ("reportingComponent", "reportingController"),
)


def _event_to_v1(obj: Obj) -> Obj:
    out = {k: v for k, v in obj.items()}
    for core, new in _EVENT_RENAMES:
        if core in out:
            out[new] = out.pop(core)
    out["apiVersion"] = "events.k8s.io/v1"
    return out


def _event_from_v1(obj: Obj) -> Obj:
    out = {k: v for k, v in obj.items()}
    for core, new in _EVENT_RENAMES:
        if new in out:
            out[core] = out.pop(new)
    out["apiVersion"] = "v1"
    return out


_POD_FIELDS = frozenset(
    {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    }
)
_EVENT_FIELDS = frozenset(
    {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)
_EVENT_V1_FIELDS = frozenset(
    {f.replace("involvedObject.", "regarding.") for f in _EVENT_FIELDS if f.startswith("involved")}
    | {"reason", "reportingController", "type"}
)

STATUS = frozenset({"status"})

RESOURCES: tuple[Resource, ...] = (
    Resource(
        "pods",
        "Pod",
        namespaced=True,
        subresources=frozenset({"status", "binding", "eviction"}),
        fields=_POD_FIELDS,
        generation=True,
        return_deleted=True,
    ),
    Resource(
        "nodes",
        "Node",
        namespaced=False,
        subresources=STATUS,
        fields=frozenset({"spec.unschedulable"}),
    ),
    Resource(
        "namespaces",
        "Namespace",
        namespaced=False,
        subresources=STATUS,
        fields=frozenset({"status.phase"}),
    ),
    Resource("resourcequotas", "ResourceQuota", namespaced=True, subresources=STATUS),
    Resource("leases", "Lease", namespaced=True, group="coordination.k8s.io"),
    # the chart's CRD (helm/hami-bus/crds/queues.yaml), served as the API server serves it
    Resource("queues", "Queue", namespaced=True, group="hami.io", version="v1alpha1", generation=True),
    # scheduler-plugins' coscheduling CRD (docs/gangs.md), when a test installs it
    Resource("podgroups", "PodGroup", namespaced=True, group="scheduling.x-k8s.io",
             version="v1alpha1", subresources=STATUS, generation=True),
    Resource("secrets", "Secret", namespaced=True),
    # policy/v1 PodDisruptionBudgets, which the pods' eviction subresource honours
    Resource("poddisruptionbudgets", "PodDisruptionBudget", namespaced=True, group="policy",
             subresources=STATUS, generation=True),
    Resource(
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        namespaced=False,
        group="admissionregistration.k8s.io",
    ),
    Resource("events", "Event", namespaced=True, fields=_EVENT_FIELDS, create_on_update=True),
    Resource(
        "events",
        "Event",
        namespaced=True,
        group="events.k8s.io",
        storage="events",
        fields=_EVENT_V1_FIELDS,
        create_on_update=True,
        to_view=_event_to_v1,
        from_view=_event_from_v1,
    ),
)
BY_PATH: dict[tuple[str, str, str], Resource] = {
    (r.group, r.version, r.plural): r for r in RESOURCES
}
BY_NAME: dict[str, Resource] = {r.qualified: r for r in RESOURCES}
CORE_KINDS: dict[str, Resource] = {r.kind: r for r in RESOURCES if not r.group}


def lookup(name: str) -> Resource:
    """``"pods"``, ``"nodes"``, ``"events.events.k8s.io"`` ... -> Resource."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"fakekube does not serve {name!r}; known: {sorted(BY_NAME)}") from None


# --------------------------------------------------------------------------- fields


def _dig(obj: Obj, dotted: str) -> Any:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def field_values(res: Resource, view: Obj) -> dict[str, str]:
    """The selectable fields of ``view`` (an object in ``res``'s representation)."""
    out: dict[str, str] = {}
    for name in ("metadata.name", "metadata.namespace", *res.fields):
        value = _dig(view, name)
        if name == "source" and isinstance(value, dict):
            value = value.get("component")
        if value is None:
            out[name] = ""
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        else:
            out[name] = str(value)
    if not res.namespaced:
        out["metadata.namespace"] = ""
    return out


# --------------------------------------------------------------------------- validation

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_string_map(obj: Obj, key: str) -> None:
    value = obj.get("metadata", {}).get(key)
    if value is None:
        return
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise bad_request(
            f"json: cannot unmarshal metadata.{key} of {obj.get('kind')}: values must be strings"
        )


def validate_name(res: Resource, name: str) -> None:
    pattern, limit = (_LABEL, 63) if res.plural == "namespaces" else (_SUBDOMAIN, 253)
    if not pattern.match(name) or len(name) > limit:
        raise invalid(
            res.kind,
            name,
            "metadata.name",
            f'Invalid value: "{name}": a lowercase RFC 1123 name must consist of lower case '
            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )


_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _validate_metadata(res: Resource, obj: Obj) -> None:
    meta, name = obj["metadata"], obj["metadata"]["name"]
    for key, value in (meta.get("labels") or {}).items():
        if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
            raise invalid(
                res.kind, name, "metadata.labels", f'Invalid value: "{key}": invalid label key'
            )
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            raise invalid(
                res.kind,
                name,
                f"metadata.labels.{key}",
                f'Invalid value: "{value}": a valid label must be an empty string or consist of '
                "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                "alphanumeric character (at most 63 characters)",
            )
    size = sum(len(k) + len(v) for k, v in (meta.get("annotations") or {}).items())
    if size > MAX_ANNOTATIONS_BYTES:
        raise invalid(
            res.kind,
            name,
            "metadata.annotations",
            f"Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes",
        )


def validate(res: Resource, obj: Obj) -> None:
    """The validation our callers can trip over; far from the full registry validation."""
    check_string_map(obj, "labels")
    check_string_map(obj, "annotations")
    name = obj["metadata"]["name"]
    validate_name(res, name)
    _validate_metadata(res, obj)
    if res.kind == "Pod":
        containers = (obj.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            raise invalid("Pod", name, "spec.containers", "Required value")
        for i, c in enumerate(containers):
            for key in ("name", "image"):
                if not isinstance(c, dict) or not c.get(key):
                    raise invalid("Pod", name, f"spec.containers[{i}].{key}", "Required value")


# --------------------------------------------------------------------------- pods

DEFAULT_TOLERATIONS = (
    {
        "key": "node.kubernetes.io/not-ready",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
    {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
)


def _qos(spec: Obj) -> str:
    containers = list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
    any_set, guaranteed = False, True
    for c in containers:
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        if any(k in ("cpu", "memory") for k in (*requests, *limits)):
            any_set = True
        for k in ("cpu", "memory"):
            if k not in limits or requests.get(k, limits[k]) != limits[k]:
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _default_container(c: Obj) -> None:
    image = str(c.get("image", ""))
    tag = image.rsplit("/", 1)[-1]
    c.setdefault(
        "imagePullPolicy", "Always" if ":" not in tag or tag.endswith(":latest") else "IfNotPresent"
    )
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    resources = c.setdefault("resources", {})
    limits = resources.get("limits") or {}
    if limits:
        requests = resources.setdefault("requests", {})
        for k, v in limits.items():
            requests.setdefault(k, v)


def _default_pod(pod: Obj) -> None:
    spec = pod.setdefault("spec", {})
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict):
                _default_container(c)
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("priority", 0)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    tolerations = spec.setdefault("tolerations", [])
    for tol in DEFAULT_TOLERATIONS:
        if not any(
            t.get("key") == tol["key"] and t.get("effect") == "NoExecute" for t in tolerations
        ):
            tolerations.append(dict(tol))
    pod["status"] = {"phase": "Pending", "qosClass": _qos(spec)}


def prepare_create(res: Resource, obj: Obj) -> None:
    """Defaulting and the status reset each kind's strategy does on create."""
    meta = obj["metadata"]
    if res.kind == "Pod":
        _default_pod(obj)
    elif res.kind == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
    elif res.kind == "ResourceQuota":
        obj["status"] = {}


_POD_UPDATE_FORBIDDEN = (
    "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
    "(allow it to be set to 1 if it was previously negative)"
)


def _mutable_pod_fields_masked(spec: Obj, old: Obj) -> Obj:
    masked = jcopy(spec)
    for key in ("containers", "initContainers"):
        for c in masked.get(key) or []:
            if isinstance(c, dict):
                c.pop("image", None)
    for key in ("activeDeadlineSeconds", "terminationGracePeriodSeconds"):
        masked.pop(key, None)
    old_tols = old.get("tolerations") or []
    if all(t in (masked.get("tolerations") or []) for t in old_tols):
        masked["tolerations"] = old_tols
    old_gates = old.get("schedulingGates") or []
    if all(g in old_gates for g in masked.get("schedulingGates") or []):
        masked["schedulingGates"] = old_gates
    return masked


def check_pod_update(name: str, old_spec: Obj, new_spec: Obj) -> None:
    old_masked = _mutable_pod_fields_masked(old_spec, old_spec)
    if _mutable_pod_fields_masked(new_spec, old_spec) != old_masked:
        raise invalid("Pod", name, "spec", _POD_UPDATE_FORBIDDEN)


def prepare_update(res: Resource, old: Obj, new: Obj, subresource: str | None) -> None:
    """Keep the half of the object the endpoint may not change (spec vs status)."""
    if subresource == "status":
        if "spec" in old:
            new["spec"] = jcopy(old["spec"])
        else:
            new.pop("spec", None)
        if res.kind == "Pod":
            refs = old["metadata"].get("ownerReferences")
            if refs is None:
                new["metadata"].pop("ownerReferences", None)
            else:
                new["metadata"]["ownerReferences"] = jcopy(refs)
        return
    if "status" in res.subresources:
        if "status" in old:
            new["status"] = jcopy(old["status"])
        else:
            new.pop("status", None)
    if res.kind == "Pod":
        check_pod_update(new["metadata"]["name"], old.get("spec") or {}, new.get("spec") or {})


def kind_check(res: Resource, body: Obj) -> None:
    kind = body.get("kind")
    if kind not in (None, "", res.kind):
        raise ApiError(
            status_body(
                400,
                "BadRequest",
                f"the kind {kind!r} does not match the endpoint's kind {res.kind!r}",
            )
        )
