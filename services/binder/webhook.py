"""HAMi's mutating admission webhook: HTTPS, AdmissionReview v1, certificate from files.

For a pod that asks for HAMi NVIDIA resources (``nvidia.com/gpu``, ``gpumem``,
``gpumem-percentage``, ``gpucores``; names configurable):

- ``spec.schedulerName`` becomes ours, unless the pod names another non-default
  scheduler (then the pod is left to it, as HAMi leaves pods it does not schedule);
- a container with memory or cores but no card count gets ``nvidia.com/gpu:
  defaultGPUNum`` (HAMi's webhook default). The other REFERENCE §1 defaults
  (defaultMemory, defaultCores, percentages) are resolved when the pod is scheduled, by
  the same codec, so a configuration change applies to pods already admitted;
- ``nvidia.com/priority`` becomes env ``CUDA_TASK_PRIORITY``;
- each container that gets devices is given its own slice: env ``HAMI_POD_UID`` (from
  ``metadata.uid``), ``HAMI_CONTAINER_NAME``, ``HAMI_SLICE_FILE=/usr/local/vgpu/slice/env``,
  and a CSI ephemeral inline volume ``hami-slice-<i>`` (driver ``slices.hami.io``,
  ``volumeAttributes: {container: <name>}``) mounted at ``/usr/local/vgpu/slice``. The
  node agent's CSI node plugin bind-mounts the host directory
  ``/usr/local/vgpu/containers/<podUID>_<container>`` there (the kubelet hands it the
  pod UID), where it writes the ``env`` file when the decision reaches its node; the
  preloaded limiter reads it at process start. No hostPath: Pod Security ``baseline``
  and ``restricted`` allow CSI volumes. Volumes of our driver that the pod declares
  itself (and their mounts) are replaced, so no container can mount another's slice;
- with ``overwrite_env``, containers without our resources get
  ``NVIDIA_VISIBLE_DEVICES=none`` (HAMi's ``overwriteEnv``), so they cannot see cards.

Refused, with a message that says what to change: privileged containers asking for our
resources (a privileged container sees every card, so no slice can hold it), a preset
``spec.nodeName`` (HAMi must choose the node and the cards), and anything the codec
cannot parse (the same messages the binder would give later). Pods labelled
``hami.io/webhook: ignore`` are admitted untouched.

:func:`review` is pure (AdmissionReview dict in, dict out); :class:`WebhookServer` is the
aiohttp + ssl wiring.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from shared.config import Config, NodeSettings, ResourceNames
from shared.hami import annotations as ann
from shared.hami.codec import PodSpecError, has_device_resources, pod_request

log = logging.getLogger("hami.binder.webhook")

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
ENV_VISIBLE = "NVIDIA_VISIBLE_DEVICES"

Obj = dict[str, Any]


@dataclass
class WebhookSettings:
    scheduler_name: str = "hami-scheduler"
    names: ResourceNames = field(default_factory=ResourceNames)
    node: NodeSettings = field(default_factory=NodeSettings)
    overwrite_env: bool = False  # NVIDIA_VISIBLE_DEVICES=none for containers without ours

    @classmethod
    def from_config(cls, cfg: Config, overwrite_env: bool = False) -> WebhookSettings:
        return cls(cfg.scheduler.scheduler_name, cfg.resources, cfg.node, overwrite_env)


class Refused(Exception):
    """The pod is refused; the message is shown to the user by kubectl."""


def _set_env(c: Obj, name: str, value: str | None = None, value_from: Obj | None = None) -> None:
    env: list[Obj] = c.setdefault("env", [])
    item: Obj = {"name": name, "value": value} if value_from is None else {"name": name, "valueFrom": value_from}
    for i, e in enumerate(env):
        if e.get("name") == name:
            env[i] = item  # re-invocation or a user value: ours is the one that counts
            return
    env.append(item)


def _limit(c: Obj, name: str) -> Any:
    res = c.get("resources") or {}
    return (res.get("limits") or {}).get(name, (res.get("requests") or {}).get(name))


def mutate_pod(pod: Obj, s: WebhookSettings) -> Obj | None:
    """The mutated pod, or None to leave it alone; raises :class:`Refused`."""
    meta = pod.get("metadata") or {}
    if (meta.get("labels") or {}).get(ann.WEBHOOK_LABEL) == "ignore":
        return None
    spec = pod.get("spec") or {}
    sched = spec.get("schedulerName") or ""
    if sched not in ("", DEFAULT_SCHEDULER, s.scheduler_name):
        return None  # another scheduler's pod
    out = copy.deepcopy(pod)
    ospec = out.setdefault("spec", {})
    ours: list[Obj] = []
    changed = False
    for group in ("initContainers", "containers"):
        for c in ospec.get(group) or []:
            name = str(c.get("name") or "")
            if not has_device_resources(c, s.names):
                if s.overwrite_env:
                    _set_env(c, ENV_VISIBLE, "none")
                    changed = True
                continue
            if (c.get("securityContext") or {}).get("privileged"):
                raise Refused(
                    f'container "{name}" asks for HAMi GPU resources but is privileged: a '
                    "privileged container sees every GPU on the node, so it cannot be held to a "
                    "slice. Remove securityContext.privileged, or the nvidia.com/* resources."
                )
            if _limit(c, s.names.count) is None and s.node.default_gpu_num > 0:
                limits = c.setdefault("resources", {}).setdefault("limits", {})
                limits[s.names.count] = str(s.node.default_gpu_num)
            prio = _limit(c, s.names.priority)
            if prio is not None:
                _set_env(c, ENV_PRIORITY, str(prio))
            ours.append(c)
            changed = True
    if not ours:
        return out if changed else None
    if ospec.get("nodeName"):
        raise Refused(
            f"the pod asks for HAMi GPU resources but sets spec.nodeName "
            f"({ospec['nodeName']}): HAMi must choose the node and the cards. Remove "
            "spec.nodeName; to pin the pod, use a nodeSelector on kubernetes.io/hostname."
        )
    try:
        req = pod_request(out, s.node, s.names)
    except PodSpecError as exc:
        raise Refused(f"invalid HAMi request: {exc}") from None
    devices = {c.name for c in req.containers if c.devices}
    ospec["schedulerName"] = s.scheduler_name
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
    return out


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
    """JSON Patch ops that turn ``before`` into ``after`` (top-level spec fields replaced)."""
    ops: list[Obj] = []
    b, a = before.get("spec") or {}, after.get("spec") or {}
    if "spec" not in before:
        return [{"op": "add", "path": "/spec", "value": a}]
    for key in sorted(set(a) | set(b)):
        if key not in a:
            ops.append({"op": "remove", "path": f"/spec/{key}"})
        elif a[key] != b.get(key):
            # "add" on an existing member replaces it (RFC 6902), and creates it otherwise.
            ops.append({"op": "add", "path": f"/spec/{key}", "value": a[key]})
    return ops


def review(body: Obj, s: WebhookSettings) -> Obj:
    """Answer one AdmissionReview v1 request."""
    req = body.get("request") or {}
    resp: Obj = {"uid": req.get("uid", ""), "allowed": True}
    out = {"apiVersion": body.get("apiVersion") or "admission.k8s.io/v1",
           "kind": "AdmissionReview", "response": resp}
    kind = (req.get("kind") or {}).get("kind")
    pod = req.get("object")
    if kind != "Pod" or req.get("operation", "CREATE") != "CREATE" or not isinstance(pod, dict):
        return out
    try:
        mutated = mutate_pod(pod, s)
    except Refused as exc:
        meta = pod.get("metadata") or {}
        log.info("refused pod %s/%s: %s", req.get("namespace") or meta.get("namespace"),
                 meta.get("name") or meta.get("generateName"), exc)
        resp["allowed"] = False
        resp["status"] = {"code": 403, "reason": "Forbidden", "message": str(exc)}
        return out
    if mutated is not None:
        ops = json_patch(pod, mutated)
        if ops:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return out


class WebhookServer:
    """``POST /mutate`` over HTTPS (``/healthz`` for probes)."""

    def __init__(self, settings: WebhookSettings, *, certfile: str | None, keyfile: str | None,
                 host: str = "0.0.0.0", port: int = 9443, reload_interval: float = 10.0) -> None:
        self.settings = settings
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
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be an AdmissionReview JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be an AdmissionReview object"}, status=400)
        return web.json_response(review(body, self.settings))

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
