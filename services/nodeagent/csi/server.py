"""The node agent's CSI node plugin: each GPU container's slice directory as a volume.

Pod Security ``baseline``/``restricted`` namespaces refuse hostPath volumes, so the
webhook gives each GPU container an ephemeral inline CSI volume of driver
:data:`~services.nodeagent.csi.volume.DRIVER` with ``volumeAttributes: {container:
<name>}`` instead. When the kubelet sets the pod up it calls ``NodePublishVolume`` with
the pod's UID (``podInfoOnMount``); :class:`SlicePlugin` bind-mounts exactly
``<host_root>/usr/local/vgpu/containers/<podUID>_<container>`` at the kubelet's target
path, so each container sees its own slice directory and nothing else.

Two gRPC servers on unix sockets, both on the agent's event loop (grpc.aio):

- CSI Identity + Node on ``<plugins_dir>/<driver>/csi.sock`` (node-only plugin: no
  controller, no staging);
- the kubelet's plugin registration API on ``<registry_dir>/<driver>-reg.sock``: the
  kubelet's plugin watcher finds the socket, calls ``GetInfo`` (type ``CSIPlugin``, our
  endpoint), registers the driver, then ``NotifyRegistrationStatus``. So no
  node-driver-registrar sidecar is needed.

Publish is idempotent (an already mounted target is left as it is); unpublish unmounts
and removes the target, and answers OK for a target that is not there. Mounting goes
through :class:`~services.nodeagent.csi.mount.Mounter`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from services.nodeagent.csi.mount import BindMounter, Mounter
from services.nodeagent.csi.v1 import PLUGINS_DIR, csi_pb2, csi_pb2_grpc
from services.nodeagent.csi.volume import DRIVER, PublishError, check_target, parse_publish
from services.nodeagent.pluginregistration.v1 import (
    CSI_PLUGIN,
    REGISTRY_DIR,
    api_pb2,
    api_pb2_grpc,
)
from services.nodeagent.slices import CONTAINERS_DIR, DIR_MODE, ensure_region

log = logging.getLogger("hami.nodeagent.csi")

# The generated gRPC modules carry no type annotations.
_csi: Any = csi_pb2_grpc
_reg: Any = api_pb2_grpc

CSI_VERSIONS = ["1.0.0"]  # the kubelet accepts a 1.x CSI plugin
VENDOR_VERSION = "1"


class SlicePlugin:
    """CSI node plugin + kubelet registration for the slice volumes (see module doc).

    ``plugins_dir`` and ``registry_dir`` are paths as this process sees them and as the
    kubelet does (the DaemonSet mounts them at the same paths): the endpoint handed to
    the kubelet is the socket path itself.
    """

    def __init__(
        self,
        node_id: str,
        host_root: str | os.PathLike[str],
        *,
        plugins_dir: str | os.PathLike[str] = PLUGINS_DIR,
        registry_dir: str | os.PathLike[str] = REGISTRY_DIR,
        mounter: Mounter | None = None,
        driver: str = DRIVER,
    ) -> None:
        self.node_id = node_id
        self.containers = Path(host_root) / CONTAINERS_DIR
        self.driver = driver
        self.socket_path = Path(plugins_dir) / driver / "csi.sock"
        self.registry_socket = Path(registry_dir) / f"{driver}-reg.sock"
        self.mounter: Mounter = mounter or BindMounter()
        self.registered: bool | None = None  # the kubelet's last NotifyRegistrationStatus
        self.registration_error = ""
        self.published = 0
        self._lock = asyncio.Lock()  # publish/unpublish one at a time: they are quick
        self._servers: list[grpc.aio.Server] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # The CSI socket first: the kubelet dials the endpoint as soon as it sees the
        # registration socket.
        self._servers.append(await self._serve(self.socket_path, self._add_csi))
        self._servers.append(await self._serve(self.registry_socket, self._add_registration))
        log.info(
            "CSI driver %s on %s (registration %s)",
            self.driver,
            self.socket_path,
            self.registry_socket,
        )

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for s in reversed(servers):
            await s.stop(grace=0.5)
        # The registration socket goes, so the kubelet deregisters the driver; a new agent
        # registers again when it starts.
        for p in (self.registry_socket, self.socket_path):
            p.unlink(missing_ok=True)

    async def _serve(self, path: Path, add: Any) -> grpc.aio.Server:
        _clear_socket(path)
        server = grpc.aio.server()
        add(server)
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on {path}")
        await server.start()
        return server

    def _add_csi(self, server: grpc.aio.Server) -> None:
        _csi.add_IdentityServicer_to_server(_Identity(self), server)
        _csi.add_NodeServicer_to_server(_Node(self), server)

    def _add_registration(self, server: grpc.aio.Server) -> None:
        _reg.add_RegistrationServicer_to_server(_Registration(self), server)

    # ------------------------------------------------------------------ operations

    def plugin_info(self) -> api_pb2.PluginInfo:
        return api_pb2.PluginInfo(
            type=CSI_PLUGIN,
            name=self.driver,
            endpoint=str(self.socket_path),
            supported_versions=CSI_VERSIONS,
        )

    async def publish(self, req: csi_pb2.NodePublishVolumeRequest) -> None:
        """Raises :class:`PublishError` for a request that is not for one of our slices."""
        if req.HasField("volume_capability") and req.volume_capability.HasField("block"):
            raise PublishError(f"{self.driver} volumes are directories, not block devices")
        vol = parse_publish(dict(req.volume_context), req.target_path)
        async with self._lock:
            await asyncio.to_thread(self._publish, vol.dir_name, vol.target, req.readonly)
        self.published += 1

    def _publish(self, name: str, target: str, readonly: bool) -> None:
        source = self.containers / name
        # The slice writer makes it when the decision reaches the node (before Allocate
        # answers); make it here too, so a volume is never a bind of nothing.
        self.containers.mkdir(parents=True, exist_ok=True)
        source.mkdir(mode=DIR_MODE, exist_ok=True)
        ensure_region(source)
        os.makedirs(target, exist_ok=True)
        if self.mounter.is_mount_point(target):
            return  # published before (the kubelet retries after a lost answer)
        self.mounter.bind(str(source), target, readonly=readonly)

    async def unpublish(self, target_path: str) -> None:
        target = check_target(target_path)
        async with self._lock:
            await asyncio.to_thread(self._unpublish, target)

    def _unpublish(self, target: str) -> None:
        if not os.path.exists(target):
            return
        if self.mounter.is_mount_point(target):
            self.mounter.unmount(target)
        try:
            os.rmdir(target)
        except OSError as exc:
            # Never remove what is inside: after a failed unmount it is the slice itself.
            raise OSError(exc.errno, f"cannot remove {target}: {exc.strerror}") from None


def _clear_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a previous agent's
    except FileNotFoundError:
        pass


async def _answer(context: grpc.aio.ServicerContext[Any, Any], coro: Any) -> None:
    try:
        await coro
    except PublishError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except OSError as exc:
        log.warning("CSI: %s", exc)
        await context.abort(grpc.StatusCode.INTERNAL, str(exc))


class _Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, p: SlicePlugin) -> None:
        self.p = p

    async def GetPluginInfo(self, request: Any, context: Any) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.p.driver, vendor_version=VENDOR_VERSION)

    async def GetPluginCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse()  # node only: no controller service

    async def Probe(self, request: Any, context: Any) -> csi_pb2.ProbeResponse:
        r = csi_pb2.ProbeResponse()
        r.ready.value = True
        return r


class _Node(csi_pb2_grpc.NodeServicer):
    def __init__(self, p: SlicePlugin) -> None:
        self.p = p

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Any
    ) -> csi_pb2.NodePublishVolumeResponse:
        await _answer(context, self.p.publish(request))
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Any
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        await _answer(context, self.p.unpublish(request.target_path))
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def NodeGetCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse()  # no staging, no volume stats

    async def NodeGetInfo(self, request: Any, context: Any) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.p.node_id)


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, p: SlicePlugin) -> None:
        self.p = p

    async def GetInfo(self, request: Any, context: Any) -> api_pb2.PluginInfo:
        return self.p.plugin_info()

    async def NotifyRegistrationStatus(
        self, request: api_pb2.RegistrationStatus, context: Any
    ) -> api_pb2.RegistrationStatusResponse:
        self.p.registered = request.plugin_registered
        self.p.registration_error = request.error
        if request.plugin_registered:
            log.info("kubelet registered CSI driver %s", self.p.driver)
        else:
            log.error("kubelet refused CSI driver %s: %s", self.p.driver, request.error)
        return api_pb2.RegistrationStatusResponse()
