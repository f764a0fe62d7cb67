"""HAMi's mutating admission webhook: HTTPS, AdmissionReview v1, certificate from files.

It answers as HAMi v2.10's webhook does (``pkg/scheduler/webhook.go`` and the NVIDIA
device's ``MutateAdmission``), in HAMi's order and with HAMi's messages:

1. a pod with no ``spec.containers`` is refused: ``pod has no containers``;
2. a pod naming another scheduler is left alone. ``default-scheduler`` counts as
   "another" only with ``webhook.forceOverwriteDefaultScheduler: false`` (HAMi's
   ``--force-overwrite-default-scheduler``, true by default);
3. every container, init containers first, is mutated:
   - a ``gpumem-percentage`` outside 0..100 (limits, then requests) fails admission
     with ``invalid nvidia.com/gpumem-percentage value 150 in container c: must be an
     integer between 0 and 100`` (code 500, as HAMi's ``admission.Errored``);
   - ``nvidia.com/priority`` in its limits becomes env ``CUDA_TASK_PRIORITY``;
   - with ``node.gpuCorePolicy`` ``force`` or ``disable``, env
     ``GPU_CORE_UTILIZATION_POLICY`` is set on every container;
   - HAMi resources are looked for in ``limits`` only; memory or cores without a count
     get ``nvidia.com/gpu: defaultGPUNum``;
   - a whole-card ask (a count, no ``gpucores``, and no ``gpumem`` or a
     ``gpumem-percentage`` of exactly 100; limits or requests) gets
     ``nvidia.com/gpucores: 100`` written into its limits: the exclusive card is then in
     the spec, where placement reads it (``defaultCores`` does not apply to such an ask);
   - with ``webhook.runtimeClassName``, a pod without ``spec.runtimeClassName`` gets it
     when one of its containers asks for our resources;
   - with ``overwrite_env``, a container without our resources gets
     ``NVIDIA_VISIBLE_DEVICES=none`` (HAMi's ``overwriteEnv``);
4. a pod asking for our resources with a privileged container anywhere in it (init
   containers included; the first one is named) is refused: ``container c is
   privileged`` (a privileged container sees every card, so no slice holds it);
5. such a pod gets our ``spec.schedulerName``; one that sets ``spec.nodeName`` is
   refused: ``pod has node assigned``;
6. the namespace's ResourceQuotas (``limits.nvidia.com/gpumem``,
   ``limits.nvidia.com/gpucores``, a limit of 0 meaning none) are checked against what
   the pods of the namespace already hold (their ``hami.io/vgpu-devices-allocated``)
   plus this pod's memory and cores times its card count (a percentage ask counts 0
   MiB, as in HAMi): ``exceeding resource quota``.

What we add (docs/hami-compat.md): a pod the codec cannot read is refused at admission
with the codec's words (HAMi would admit it and fail it later), and each container that
gets devices is given its own slice: env ``HAMI_POD_UID`` (from ``metadata.uid``),
``HAMI_CONTAINER_NAME``, ``HAMI_SLICE_FILE=/usr/local/vgpu/slice/env``, and a CSI
ephemeral inline volume ``hami-slice-<i>`` (driver ``slices.hami.io``,
``volumeAttributes: {container: <name>}``) mounted at ``/usr/local/vgpu/slice``. The
node agent's CSI node plugin bind-mounts the host directory
``/usr/local/vgpu/containers/<podUID>_<container>`` there (the kubelet hands it the pod
UID), where it writes the ``env`` file when the decision reaches its node; the preloaded
limiter reads it at process start. No hostPath: Pod Security ``baseline`` and
``restricted`` allow CSI volumes. Volumes of our driver that the pod declares itself
(and their mounts) are replaced, so no container can mount another's slice. Pods
labelled ``hami.io/webhook: ignore`` are admitted untouched (HAMi's chart does it with
the webhook's objectSelector). The other request defaults (defaultMemory, defaultCores)
are resolved when the pod is scheduled, by the same codec, as in HAMi.

:func:`review` is pure (AdmissionReview dict and the namespace's quota in, dict out);
:class:`WebhookServer` is the aiohttp + ssl wiring, and reads the quota from the API
server when given a :class:`~shared.kube.Kube`.

Tracing: each review is a ``webhook.admit`` span, the root of its pod's trace (the pod,
the answer, the HAMi resources asked). While tracing is on, a pod given cards also gets
the annotation ``hami.io/trace-context`` (the span's traceparent), which the binder
continues when it asks for the pod's placement, so the pod's trace runs from admission
through the decision and the bind to the node. With tracing off nothing is added.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from shared import tracing
from shared.config import Config, NodeSettings, ResourceNames
from shared.devices.base import RequestError
from shared.devices.registry import REGISTRY
from shared.hami import annotations as ann
from shared.hami.codec import PodSpecError, pod_request, quota_from_resource_quotas
from shared.hami.quantity import QuantityError, parse_quantity
from shared.kube import Kube, path
from shared.schemas import AllocRequested, Quota

log = logging.getLogger("hami.binder.webhook")
tracer = tracing.tracer("hami.binder.webhook")

# The W3C traceparent of the webhook's span, on a pod we mutate while tracing is on: the
# binder continues that trace when it asks for the pod's placement (our extension; with
# tracing off the patch is exactly HAMi's).
TRACE_ANNOTATION = "hami.io/trace-context"

DEFAULT_SCHEDULER = "default-scheduler"
SLICE_VOLUME_PREFIX = "hami-slice-"  # + the container's position among the wired ones
LEGACY_SLICE_VOLUME = "hami-slices"  # the hostPath volume of earlier versions
# The node agent's CSI driver (services/nodeagent/csi/volume.py DRIVER; services do not
# import each other, tests check the two agree) and the attribute naming the container.
SLICE_DRIVER = "slices.hami.io"
SLICE_CONTAINER_ATTR = "container"
SLICE_MOUNT = "/usr/local/vgpu/slice"
SLICE_FILE = f"{SLICE_MOUNT}/env"
ENV_POD_UID = "HAMI_POD_UID"
ENV_CONTAINER = "HAMI_CONTAINER_NAME"
ENV_SLICE_FILE = "HAMI_SLICE_FILE"
ENV_PRIORITY = "CUDA_TASK_PRIORITY"
ENV_CORE_POLICY = "GPU_CORE_UTILIZATION_POLICY"
ENV_VISIBLE = "NVIDIA_VISIBLE_DEVICES"

# HAMi's own words (pkg/scheduler/webhook.go, pkg/device/nvidia/device.go).
NO_CONTAINERS = "pod has no containers"
NODE_ASSIGNED = "pod has node assigned"
QUOTA_EXCEEDED = "exceeding resource quota"
OTHER_SCHEDULER = "pod already has different scheduler assigned"

Obj = dict[str, Any]


@dataclass
class WebhookSettings:
    scheduler_name: str = "hami-scheduler"
    names: ResourceNames = field(default_factory=ResourceNames)
    node: NodeSettings = field(default_factory=NodeSettings)
    overwrite_env: bool = False  # NVIDIA_VISIBLE_DEVICES=none for containers without ours
    force_overwrite_default_scheduler: bool = True
    runtime_class_name: str = ""

    @classmethod
    def from_config(cls, cfg: Config, overwrite_env: bool = False) -> WebhookSettings:
        return cls(cfg.scheduler.scheduler_name, cfg.resources, cfg.node, overwrite_env,
                   cfg.webhook.force_overwrite_default_scheduler, cfg.webhook.runtime_class_name)


@dataclass(frozen=True)
class NamespaceQuota:
    """A namespace's HAMi quota and what its pods hold now (MiB after memoryFactor, cores)."""

    limit: Quota
    used_mem: int = 0
    used_cores: int = 0

    def fits(self, mem: int, cores: int) -> bool:
        """HAMi's ``FitQuota``: a limit of 0 (or none) does not limit."""
        lm, lc = self.limit.memory_mib, self.limit.cores
        if lm and self.used_mem + mem > lm:
            return False
        return not (lc and self.used_cores + cores > lc)


class Refused(Exception):
    """The pod is refused; the message is shown to the user by kubectl.

    ``code`` 403 is HAMi's ``admission.Denied``, 500 its ``admission.Errored`` (a
    container's mutation failed).
    """

    def __init__(self, message: str, code: int = 403) -> None:
        super().__init__(message)
        self.code = code


def _set_env(c: Obj, name: str, value: str | None = None, value_from: Obj | None = None) -> None:
    env: list[Obj] = c.setdefault("env", None) or []
    c["env"] = env
    item: Obj = {"name": name, "value": value} if value_from is None else {"name": name, "valueFrom": value_from}
    for i, e in enumerate(env):
        if e.get("name") == name:
            env[i] = item  # re-invocation or a user value: ours is the one that counts
            return
    env.append(item)


def _lists(c: Obj) -> tuple[Obj, Obj]:
    res = c.get("resources") or {}
    return (res.get("limits") or {}), (res.get("requests") or {})


def _go_value(v: Any) -> int | None:
    """Go's ``Quantity.Value()``: the number rounded up, away from zero; None if unreadable."""
    try:
        q = parse_quantity(v)
    except QuantityError:
        return None
    return math.ceil(q) if q >= 0 else -math.ceil(-q)


def _value(c: Obj, name: str) -> tuple[bool, int | None]:
    """HAMi's ``resourceValue``: (present, value), limits first, then requests."""
    limits, requests = _lists(c)
    for lst in (limits, requests):
        if name and name in lst:
            return True, _go_value(lst[name])
    return False, None


def _present(c: Obj, name: str) -> bool:
    limits, requests = _lists(c)
    return bool(name) and (name in limits or name in requests)


def _mutate_container(c: Obj, pod_spec: Obj, s: WebhookSettings) -> bool:
    """HAMi's NVIDIA ``MutateAdmission`` on one container; whether it asks for our resources."""
    n = s.names
    name = str(c.get("name") or "")
    present, pct = _value(c, n.memory_percentage)
    if present and pct is not None and not 0 <= pct <= 100:
        raise Refused(f"invalid {n.memory_percentage} value {pct} in container {name}: "
                      "must be an integer between 0 and 100", code=500)
    limits, _ = _lists(c)
    if n.priority in limits:
        prio = _go_value(limits[n.priority])
        _set_env(c, ENV_PRIORITY, str(prio if prio is not None else limits[n.priority]))
    if s.node.gpu_core_policy not in ("", "default"):
        _set_env(c, ENV_CORE_POLICY, s.node.gpu_core_policy)
    has = False
    if n.count in limits:
        has = True
    elif any(k in limits for k in (n.cores, n.memory, n.memory_percentage)) and s.node.default_gpu_num > 0:
        c["resources"]["limits"][n.count] = str(s.node.default_gpu_num)
        has = True
    if _present(c, n.count) and n.cores and not _present(c, n.cores):
        if present:
            exclusive = pct == 100
        else:
            exclusive = not n.memory or not _present(c, n.memory)
        if exclusive:
            res = c.setdefault("resources", None) or {}
            c["resources"] = res
            lim = res.setdefault("limits", None) or {}
            res["limits"] = lim
            lim[n.cores] = "100"  # a whole card: exclusive (HAMi's defaultExclusiveCoreIfNeeded)
            has = True
    if has and pod_spec.get("runtimeClassName") is None and s.runtime_class_name:
        pod_spec["runtimeClassName"] = s.runtime_class_name
    if not has and s.overwrite_env:
        _set_env(c, ENV_VISIBLE, "none")
    return has


def _foreign(vendor: str) -> bool:
    """A device family other than NVIDIA's (shared.devices): no HAMi-core slice for it."""
    fam = REGISTRY.get(vendor)
    return fam is not None and not fam.engine_native


def _mutate_family(c: Obj, pod: Obj) -> bool:
    """Another family's ``MutateAdmission`` (:mod:`shared.devices`) on one container: its
    rounding and defaults written into the container's resources, its pod annotations
    set (MetaX's QoS policy); whether the container asks for such a family."""
    res = c.get("resources") or {}
    fams = [f for f in REGISTRY.container_families(res) if not f.engine_native]
    if len(fams) != 1 or not fams[0].asks_for(res):
        return bool(fams)  # two families, or no count: pod_request names the problem
    meta = pod.setdefault("metadata", {})
    annos = meta.get("annotations") or {}
    try:
        adm = fams[0].admit(res, annos)
    except RequestError as exc:
        raise Refused(f'invalid HAMi request: container "{c.get("name") or ""}": {exc}') from None
    if adm.resources is not res:
        out: Obj = {}
        for key in ("limits", "requests"):
            was, now = res.get(key) or {}, adm.resources.get(key) or {}
            if now or key in res:
                out[key] = {k: (v if k in was and was[k] == v else str(v)) for k, v in now.items()}
        c["resources"] = {**res, **out}
    new = {k: v for k, v in adm.annotations.items() if k not in annos}
    if new:
        meta["annotations"] = {**annos, **new}
    return True


def _privileged(spec: Obj) -> str | None:
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            if (c.get("securityContext") or {}).get("privileged") is True:
                return str(c.get("name") or "")
    return None


def quota_request(req: AllocRequested) -> tuple[int, int]:
    """What HAMi's admission quota check counts for a pod: per container with cards,
    memory x cards and cores x cards (a percentage ask is 0 MiB), init containers too."""
    mem = cores = 0
    for c in req.containers:
        for d in c.devices:
            if _foreign(d.vendor):
                continue  # HAMi's quota names NVIDIA's resources
            mem += d.mem * d.nums
            cores += d.cores * d.nums
    return mem, cores


def other_scheduler(pod: Obj, s: WebhookSettings) -> bool:
    """Whether the pod names a scheduler that is not ours (HAMi then leaves it alone);
    ``default-scheduler`` is ours to take only with forceOverwriteDefaultScheduler."""
    sched = (pod.get("spec") or {}).get("schedulerName") or ""
    return bool(
        sched
        and (sched != DEFAULT_SCHEDULER or not s.force_overwrite_default_scheduler)
        and (not s.scheduler_name or sched != s.scheduler_name)
    )


def mutate_pod(pod: Obj, s: WebhookSettings, quota: NamespaceQuota | None = None) -> Obj | None:
    """The mutated pod, or None to leave it alone; raises :class:`Refused`.

    ``quota`` is the pod's namespace's (None: no HAMi quota there, or not known).
    """
    meta = pod.get("metadata") or {}
    if (meta.get("labels") or {}).get(ann.WEBHOOK_LABEL) == "ignore":
        return None
    spec = pod.get("spec") or {}
    if not spec.get("containers"):
        raise Refused(NO_CONTAINERS)
    if other_scheduler(pod, s):
        return None
    out = copy.deepcopy(pod)
    ospec = out.setdefault("spec", {})
    privileged = _privileged(ospec)
    ours: list[Obj] = []
    for group in ("initContainers", "containers"):
        for c in ospec.get(group) or []:
            if _mutate_container(c, ospec, s) or _mutate_family(c, out):
                ours.append(c)
    if ours and privileged is not None:
        raise Refused(f"container {privileged} is privileged")
    if ours and s.scheduler_name:
        ospec["schedulerName"] = s.scheduler_name
        if ospec.get("nodeName"):
            raise Refused(NODE_ASSIGNED)
    if ours:
        try:
            req = pod_request(out, s.node, s.names)
        except PodSpecError as exc:
            raise Refused(f"invalid HAMi request: {exc}") from None
        mem, cores = quota_request(req)
        if quota is not None and (mem or cores) and not quota.fits(mem, cores):
            raise Refused(QUOTA_EXCEEDED)
        _wire_slices(ospec, ours, {c.name for c in req.containers
                                   if any(not _foreign(d.vendor) for d in c.devices)})
    return None if out == pod else out


def _wire_slices(ospec: Obj, ours: list[Obj], devices: set[str]) -> None:
    """Give each container that gets devices its own slice volume and env (ours)."""
    _strip_slice_volumes(ospec)
    vols: list[Obj] = ospec.get("volumes") or []
    for c in ours:
        name = str(c.get("name") or "")
        if name not in devices:
            continue  # e.g. nvidia.com/gpu: 0
        _set_env(c, ENV_POD_UID, value_from={"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}})
        _set_env(c, ENV_CONTAINER, name)
        _set_env(c, ENV_SLICE_FILE, SLICE_FILE)
        vol = f"{SLICE_VOLUME_PREFIX}{len([v for v in vols if _is_slice_volume(v)])}"
        c.setdefault("volumeMounts", []).append({"name": vol, "mountPath": SLICE_MOUNT})
        vols.append({"name": vol, "csi": {"driver": SLICE_DRIVER,
                                          "volumeAttributes": {SLICE_CONTAINER_ATTR: name}}})
    if vols:
        ospec["volumes"] = vols


def held_by_pods(pods: list[Mapping[str, Any]]) -> tuple[int, int]:
    """Device memory (MiB) and cores the given pods hold, from HAMi's allocated annotation
    (what HAMi's quota manager counts); pods that have ended hold nothing."""
    mem = cores = 0
    for p in pods:
        if ((p.get("status") or {}).get("phase")) in ("Succeeded", "Failed"):
            continue
        value = ((p.get("metadata") or {}).get("annotations") or {}).get(ann.DEVICES_ALLOCATED)
        if not value:
            continue
        try:
            entries = ann.decode_pod_devices(value)
        except ValueError:
            continue  # not ours to judge here; the binder reports it
        for devs in entries:
            for g in devs:
                mem += g.mem
                cores += g.cores
    return mem, cores


def asks_our_resources(pod: Obj, names: ResourceNames) -> bool:
    """Whether any container's limits name one of our resources (the quota is read only then)."""
    spec = pod.get("spec") or {}
    keys = (names.count, names.memory, names.memory_percentage, names.cores)
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            limits, requests = _lists(c)
            if any(k in limits or k in requests for k in keys):
                return True
    return False


def _is_slice_volume(v: Obj) -> bool:
    return (v.get("name") == LEGACY_SLICE_VOLUME
            or (v.get("csi") or {}).get("driver") == SLICE_DRIVER)


def _strip_slice_volumes(spec: Obj) -> None:
    """Remove every slice volume (ours from an earlier pass, or one the pod declares) and
    every mount of one, and any mount at the slice path: the webhook alone decides which
    container sees which slice."""
    gone = {str(v.get("name")) for v in spec.get("volumes") or [] if _is_slice_volume(v)}
    if "volumes" in spec:
        spec["volumes"] = [v for v in spec["volumes"] or [] if not _is_slice_volume(v)]
        if not spec["volumes"]:
            del spec["volumes"]
    for group in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(group) or []:
            if "volumeMounts" not in c:
                continue
            c["volumeMounts"] = [m for m in c["volumeMounts"] or []
                                 if m.get("name") not in gone and m.get("mountPath") != SLICE_MOUNT]
            if not c["volumeMounts"]:
                del c["volumeMounts"]


def json_patch(before: Obj, after: Obj) -> list[Obj]:
    """JSON Patch ops that turn ``before`` into ``after``: top-level spec fields
    replaced, then the annotations the mutation set (another vendor's admission sets
    some, e.g. MetaX's default QoS policy; NVIDIA's sets none)."""
    ops: list[Obj] = []
    b, a = before.get("spec") or {}, after.get("spec") or {}
    if "spec" not in before:
        ops.append({"op": "add", "path": "/spec", "value": a})
    else:
        for key in sorted(set(a) | set(b)):
            if key not in a:
                ops.append({"op": "remove", "path": f"/spec/{key}"})
            elif a[key] != b.get(key):
                # "add" on an existing member replaces it (RFC 6902), and creates it otherwise.
                ops.append({"op": "add", "path": f"/spec/{key}", "value": a[key]})
    old = (before.get("metadata") or {}).get("annotations") or {}
    new = (after.get("metadata") or {}).get("annotations") or {}
    for key in sorted(k for k in new if old.get(k) != new[k]):
        ops.append(annotation_op(before, after, key, new[key]))
        if not isinstance(old, dict) or not isinstance((before.get("metadata") or {}).get("annotations"), dict):
            break  # that op wrote the whole map
    return ops


def _gets_devices(pod: Obj, s: WebhookSettings) -> bool:
    """Whether the (mutated) pod's request has cards for placement to find."""
    try:
        req = pod_request(pod, s.node, s.names)
    except PodSpecError:
        return False
    return any(c.devices for c in req.containers)


def annotation_op(before: Obj, after: Obj, key: str, value: str) -> Obj:
    """The JSON Patch op, applied after ``json_patch(before, after)``'s, that sets one
    annotation. A pod with no annotation map gets ``after``'s with it (so the op keeps
    whatever annotations the mutation added, whether or not an earlier op wrote them)."""
    annos = ((after.get("metadata") or {}).get("annotations") or {}) | {key: value}
    meta = before.get("metadata")
    if not isinstance(meta, dict):
        return {"op": "add", "path": "/metadata", "value": {"annotations": annos}}
    if not isinstance(meta.get("annotations"), dict):
        return {"op": "add", "path": "/metadata/annotations", "value": annos}
    token = key.replace("~", "~0").replace("/", "~1")  # RFC 6901
    return {"op": "add", "path": f"/metadata/annotations/{token}", "value": value}


def asked_resources(pod: Obj, names: ResourceNames) -> list[str]:
    """The HAMi resources the pod's containers name, as ``"<container> <name>=<value>"``
    (limits, else requests, as HAMi reads them): what a trace shows was asked."""
    keys = (names.count, names.memory, names.memory_percentage, names.cores, names.priority)
    out: list[str] = []
    spec = pod.get("spec") or {}
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            limits, requests = _lists(c)
            for k in keys:
                for lst in (limits, requests):
                    if k and k in lst:
                        out.append(f"{c.get('name') or ''} {k}={lst[k]}")
                        break
    return out


def review(
    body: Obj, s: WebhookSettings, quota: NamespaceQuota | None = None, *, trace_context: str = ""
) -> Obj:
    """Answer one AdmissionReview v1 request (``quota``: the pod's namespace's).

    ``trace_context`` (a W3C traceparent, "" when tracing is off): written to a pod we
    give cards as :data:`TRACE_ANNOTATION`, for the binder to continue the trace.
    """
    req = body.get("request") or {}
    resp: Obj = {"uid": req.get("uid", ""), "allowed": True}
    out = {"apiVersion": body.get("apiVersion") or "admission.k8s.io/v1",
           "kind": "AdmissionReview", "response": resp}
    kind = (req.get("kind") or {}).get("kind")
    pod = req.get("object")
    if kind != "Pod" or req.get("operation", "CREATE") != "CREATE" or not isinstance(pod, dict):
        return out
    try:
        mutated = mutate_pod(pod, s, quota)
    except Refused as exc:
        meta = pod.get("metadata") or {}
        log.info("refused pod %s/%s: %s", req.get("namespace") or meta.get("namespace"),
                 meta.get("name") or meta.get("generateName"), exc)
        resp["allowed"] = False
        status: Obj = {"code": exc.code, "message": str(exc)}
        if exc.code == 403:
            status["reason"] = "Forbidden"
        resp["status"] = status
        return out
    # As controller-runtime completes HAMi's answers: code 200, and HAMi's reason when the
    # pod is another scheduler's.
    resp["status"] = {"code": 200}
    if mutated is None and other_scheduler(pod, s):
        resp["status"]["message"] = OTHER_SCHEDULER
    if mutated is not None:
        ops = json_patch(pod, mutated)
        if trace_context and _gets_devices(mutated, s):
            ops.append(annotation_op(pod, mutated, TRACE_ANNOTATION, trace_context))
        if ops:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return out


async def namespace_quota(
    kube: Kube, namespace: str, node: NodeSettings, names: ResourceNames | None = None
) -> NamespaceQuota | None:
    """The namespace's HAMi quota from its ResourceQuotas and what its pods hold, or None
    when no ResourceQuota there names a HAMi resource."""
    rqs = await kube.get(path("resourcequotas", namespace))
    limit = quota_from_resource_quotas(list((rqs or {}).get("items") or []), node, names)
    if limit is None:
        return None
    pods = await kube.get(path("pods", namespace))
    mem, cores = held_by_pods(list((pods or {}).get("items") or []))
    return NamespaceQuota(limit=limit, used_mem=mem, used_cores=cores)


def _admit_attributes(span: trace.Span, body: Obj, out: Obj, names: ResourceNames) -> None:
    """What the ``webhook.admit`` span says: which pod, what it asked, the answer."""
    req = body.get("request") or {}
    resp = out.get("response") or {}
    obj = req.get("object")
    pod: Obj = obj if isinstance(obj, dict) else {}
    meta = pod.get("metadata") or {}
    status = resp.get("status") or {}
    span.set_attributes({
        "k8s.namespace.name": str(req.get("namespace") or meta.get("namespace") or ""),
        "k8s.pod.name": str(req.get("name") or meta.get("name") or meta.get("generateName") or ""),
        "hami.admission.uid": str(req.get("uid") or ""),
        "hami.admission.operation": str(req.get("operation") or ""),
        "hami.admission.allowed": bool(resp.get("allowed")),
        "hami.admission.patched": "patch" in resp,
        "hami.resources": asked_resources(pod, names),
    })
    if "code" in status:
        span.set_attribute("hami.admission.code", int(status["code"]))
    if not resp.get("allowed"):
        # A refused pod is never created: its trace ends here, in error.
        span.set_status(StatusCode.ERROR, str(status.get("message") or "refused"))


class WebhookServer:
    """``POST /mutate`` over HTTPS (``/healthz`` for probes)."""

    def __init__(self, settings: WebhookSettings, *, certfile: str | None, keyfile: str | None,
                 host: str = "0.0.0.0", port: int = 9443, reload_interval: float = 10.0,
                 kube: Kube | None = None, quota_timeout: float = 3.0) -> None:
        self.settings = settings
        # With the API server, the namespace's ResourceQuotas and pods are read for the
        # admission quota check; without one (or when it does not answer in
        # quota_timeout) the pod is admitted and placement still applies the quota.
        self.kube = kube
        self.quota_timeout = quota_timeout
        self.certfile, self.keyfile = certfile, keyfile
        self.host, self.port = host, port
        # The certificate files are looked at this often; a change (cert-manager renewed
        # the Secret, the kubelet swapped the mounted files) is loaded without a restart.
        self.reload_interval = reload_interval
        self.reloads = 0
        self._ctx: ssl.SSLContext | None = None
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._watcher: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for f in (self.certfile, self.keyfile or self.certfile):
            st = os.stat(f or "")  # follows the kubelet's ..data symlink
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(out)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.certfile:
            return None  # plain HTTP: only for tests behind something that terminates TLS
        if self._ctx is None:
            self._stamp = self._files_stamp()
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.certfile, self.keyfile)
            self._ctx = ctx
        return self._ctx

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; new handshakes use the new pair (each
        connection's SSL object copies the context's certificate when it is made).
        A pair caught half-written (key and cert do not match) keeps the old one, and
        the next look tries again."""
        if self._ctx is None or not self.certfile:
            return False
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            # A failed load_cert_chain leaves the context holding the new certificate
            # with the old key (every handshake then fails): try the pair on a scratch
            # context first.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.certfile, self.keyfile)
            self._ctx.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            log.warning("webhook certificate not reloaded (kept the previous one): %s", exc)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("webhook certificate reloaded from %s", self.certfile)
        return True

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.reload_if_changed()

    async def _mutate(self, request: web.Request) -> web.Response:
        # Each review is the root of its pod's trace (the AdmissionReview carries no trace
        # context); an API server that traces its own requests and sends a sampled
        # traceparent header makes it the child of that request's span instead. An
        # unsampled one is not followed: it would silence every pod's trace.
        token = None
        if tracing.recording() and "traceparent" in request.headers:
            ctx = tracing.extract({"traceparent": request.headers["traceparent"]})
            sc = trace.get_current_span(ctx).get_span_context()
            if sc.is_valid and sc.trace_flags.sampled:
                token = otel_context.attach(ctx)
        try:
            with tracing.span(tracer, "webhook.admit", kind=SpanKind.SERVER) as span:
                return await self._admit(request, span)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _admit(self, request: web.Request, span: trace.Span) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            span.set_status(StatusCode.ERROR, "the body is not JSON")
            return web.json_response({"error": "the body must be an AdmissionReview JSON"}, status=400)
        if not isinstance(body, dict):
            span.set_status(StatusCode.ERROR, "the body is not an object")
            return web.json_response({"error": "the body must be an AdmissionReview object"}, status=400)
        out = review(body, self.settings, await self._quota_for(body),
                     trace_context=tracing.traceparent())
        if span.is_recording():
            _admit_attributes(span, body, out, self.settings.names)
        return web.json_response(out)

    async def _quota_for(self, body: Obj) -> NamespaceQuota | None:
        req = body.get("request") or {}
        pod = req.get("object")
        if (self.kube is None or not isinstance(pod, dict)
                or (req.get("kind") or {}).get("kind") != "Pod"
                or req.get("operation", "CREATE") != "CREATE"
                or not asks_our_resources(pod, self.settings.names)):
            return None
        ns = str(req.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default")
        try:
            lookup = namespace_quota(self.kube, ns, self.settings.node, self.settings.names)
            return await asyncio.wait_for(lookup, self.quota_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure: admit, placement still checks
            log.warning("admission quota of namespace %s not read (admitting): %s", ns, exc)
            return None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/mutate", self._mutate)
        app.router.add_post("/webhook", self._mutate)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context())
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        if self.certfile and self.reload_interval > 0:
            self._watcher = asyncio.create_task(self._watch_files(), name="webhook-cert-reload")
        log.info("admission webhook on %s:%d (tls=%s)", self.host, self.port, bool(self.certfile))

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
