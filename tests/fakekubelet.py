"""A fake kubelet device manager for tests and benchmarks (no pytest needed).

`FakeKubelet` plays the kubelet's side of the device plugin API v1beta1 in a plain
directory (one per simulated node):

- serves ``Registration`` on ``<dir>/kubelet.sock`` (grpc.aio, unix socket), checks the
  API version and resource name like the kubelet, records every registration;
- for each registered plugin, connects to ``<dir>/<endpoint>``, follows its
  ``ListAndWatch`` stream and keeps the current devices per resource (a re-registration
  of a resource replaces its endpoint, as in the kubelet);
- admits pods container by container, in order, calling ``GetPreferredAllocation`` (when
  the plugin offers it) and ``Allocate`` per container and resource, and remembers which
  pod holds which device (kept across `restart`, like the kubelet's checkpoint);
- `restart` stops the registration server, removes kubelet.sock and the plugins' sockets
  as the kubelet does when it starts, starts again and waits for the plugins to
  register and stream their devices again.

`FakeCsiKubelet` plays the kubelet's plugin watcher and CSI volume manager (the
registration socket of a CSI plugin, NodePublishVolume of a pod's inline volumes).

All waiting is bounded by ``timeout`` (seconds, constructor) and raises TimeoutError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio

from services.nodeagent.csi.v1 import (
    EPHEMERAL,
    POD_NAME,
    POD_NAMESPACE,
    POD_UID,
    SERVICE_ACCOUNT,
    csi_pb2,
    csi_pb2_grpc,
)
from services.nodeagent.deviceplugin.v1beta1 import (
    HEALTHY,
    KUBELET_SOCKET,
    VERSION,
    api_pb2,
    api_pb2_grpc,
)
from services.nodeagent.pluginregistration.v1 import CSI_PLUGIN
from services.nodeagent.pluginregistration.v1 import api_pb2 as reg_pb2
from services.nodeagent.pluginregistration.v1 import api_pb2_grpc as reg_grpc

__all__ = [
    "AllocationFailed",
    "AllocationRecord",
    "CsiDriver",
    "CsiRegistrationFailed",
    "FakeCsiKubelet",
    "FakeKubelet",
    "PluginEndpoint",
    "Strategy",
]

log = logging.getLogger(__name__)

_grpc_api: Any = api_pb2_grpc  # the generated gRPC module has no type annotations

Strategy = Literal["preferred", "first", "random"]
"""How the fake picks devices for a container:
``preferred`` -- the plugin's GetPreferredAllocation when it offers it (falling back to
``first`` when it does not, or when its answer is unusable, as the kubelet does);
``first`` -- the first n available IDs in sorted order;
``random`` -- n available IDs at random (adversarial: ignores the plugin's preference).
"""

_MAX_UNIX_PATH = 107


class AllocationFailed(Exception):
    """The fake kubelet could not admit a container (pod admission would fail)."""


@dataclass
class PluginEndpoint:
    """A registered plugin, as the kubelet's device manager sees it."""

    resource: str
    endpoint: str
    options: api_pb2.DevicePluginOptions
    channel: grpc.aio.Channel
    stub: Any
    devices: dict[str, api_pb2.Device] = field(default_factory=dict)
    connected: bool = False
    """True while its ListAndWatch stream is open."""
    updates: int = 0
    """ListAndWatch responses received."""
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class AllocationRecord:
    pod_uid: str
    container: int
    resource: str
    device_ids: tuple[str, ...]
    response: api_pb2.ContainerAllocateResponse


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._k = kubelet

    async def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.Empty:
        error = self._k._register(request)
        if error:
            await context.abort(grpc.StatusCode.UNKNOWN, error)
        return api_pb2.Empty()


def _is_extended_resource(name: str) -> bool:
    domain, sep, rest = name.partition("/")
    return bool(sep and domain and rest) and not domain.endswith("kubernetes.io")


class FakeKubelet:
    """The kubelet's device manager, faked in ``plugin_dir``; see the module docstring."""

    def __init__(
        self,
        plugin_dir: str | os.PathLike[str],
        *,
        strategy: Strategy = "preferred",
        seed: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.socket_path = self.plugin_dir / KUBELET_SOCKET
        self.strategy: Strategy = strategy
        self.timeout = timeout
        self.registrations: list[api_pb2.RegisterRequest] = []
        """Every accepted RegisterRequest, in order (kept across restarts)."""
        self.rejected_registrations: list[tuple[api_pb2.RegisterRequest, str]] = []
        self.allocations: list[AllocationRecord] = []
        """Every successful container allocation, in order."""
        self.preferred_calls = 0
        self.preferred_rejected = 0
        """GetPreferredAllocation answers not usable as they were (wrong size or IDs)."""
        self._rng = random.Random(seed)
        self._endpoints: dict[str, PluginEndpoint] = {}
        # resource -> device id -> pod uid holding it
        self._in_use: dict[str, dict[str, str]] = {}
        self._server: grpc.aio.Server | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._anon = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Serve Registration on ``<dir>/kubelet.sock``."""
        if self._server is not None:
            raise RuntimeError("FakeKubelet already started")
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            raise ValueError(f"unix socket path too long: {self.socket_path}")
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        _grpc_api.add_RegistrationServicer_to_server(_Registration(self), server)
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Stop serving, drop every plugin connection and remove kubelet.sock."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0)
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        await asyncio.gather(*(self._close_endpoint(ep) for ep in endpoints))
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._notify()

    async def restart(self, *, wait: bool = True) -> None:
        """Restart like the kubelet: all sockets in the directory are removed.

        With ``wait``, return once every resource registered before has registered
        again and streamed its devices.
        """
        before = {r: self._registration_count(r) for r in self._endpoints}
        await self.stop()
        self._remove_sockets()
        await self.start()
        if wait and before:
            await self.wait_for(
                lambda: all(
                    self._registration_count(r) > n
                    and r in self._endpoints
                    and self._endpoints[r].updates > 0
                    for r, n in before.items()
                ),
                f"re-registration of {sorted(before)}",
            )

    async def __aenter__(self) -> FakeKubelet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- state -------------------------------------------------------------------------

    @property
    def resources(self) -> list[str]:
        return sorted(self._endpoints)

    def endpoint(self, resource: str) -> PluginEndpoint | None:
        return self._endpoints.get(resource)

    def devices(self, resource: str) -> dict[str, api_pb2.Device]:
        """The resource's devices as last streamed by its plugin (empty if unknown)."""
        ep = self._endpoints.get(resource)
        return dict(ep.devices) if ep else {}

    def healthy(self, resource: str) -> list[str]:
        """Sorted IDs of the resource's healthy devices."""
        return sorted(i for i, d in self.devices(resource).items() if d.health == HEALTHY)

    def available(self, resource: str) -> list[str]:
        """Sorted IDs of healthy devices no pod holds."""
        in_use = self._in_use.get(resource, {})
        return [i for i in self.healthy(resource) if i not in in_use]

    def allocated(self, resource: str) -> dict[str, str]:
        """Device ID -> pod UID, for the resource's devices held by pods."""
        return dict(self._in_use.get(resource, {}))

    def pod_devices(self, pod_uid: str) -> dict[str, list[str]]:
        """Resource -> sorted device IDs the pod holds."""
        out: dict[str, list[str]] = {}
        for resource, held in self._in_use.items():
            ids = sorted(i for i, p in held.items() if p == pod_uid)
            if ids:
                out[resource] = ids
        return out

    # -- waiting -----------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], what: str = "condition") -> None:
        """Wait until ``predicate()`` holds; it is re-checked on every state change."""
        try:
            async with asyncio.timeout(self.timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"fake kubelet {self.plugin_dir}: no {what} within {self.timeout}s"
            ) from None

    async def wait_registered(self, resource: str, count: int = 1) -> None:
        """Wait until the resource has registered ``count`` times in all."""
        await self.wait_for(
            lambda: self._registration_count(resource) >= count, f"registration of {resource}"
        )

    async def wait_devices(
        self,
        resource: str,
        predicate: Callable[[Mapping[str, api_pb2.Device]], bool] | None = None,
    ) -> dict[str, api_pb2.Device]:
        """Wait until the resource's streamed devices satisfy ``predicate`` (default:
        at least one device) and return them."""
        check = predicate or (lambda devs: bool(devs))

        def ready() -> bool:
            ep = self._endpoints.get(resource)
            return ep is not None and ep.updates > 0 and check(ep.devices)

        await self.wait_for(ready, f"devices of {resource}")
        return self.devices(resource)

    # -- allocation --------------------------------------------------------------------

    async def allocate(
        self,
        resource: str,
        n: int,
        strategy: Strategy | None = None,
        *,
        pod_uid: str | None = None,
        container: int = 0,
    ) -> api_pb2.ContainerAllocateResponse:
        """Allocate ``n`` devices of ``resource`` to one container, as the kubelet does.

        Picks n healthy devices no pod holds (see `Strategy`), calls Allocate, and marks
        them held by ``pod_uid`` (a fresh anonymous UID when None). Raises
        AllocationFailed when it cannot pick, grpc.aio.AioRpcError when a call fails.
        """
        if pod_uid is None:
            self._anon += 1
            pod_uid = f"anonymous-{self._anon}"
        async with self._lock:
            return await self._allocate_locked(
                resource, n, strategy or self.strategy, pod_uid, container
            )

    async def admit_pod(
        self,
        pod_uid: str,
        containers: Iterable[Mapping[str, int]],
        strategy: Strategy | None = None,
    ) -> list[dict[str, api_pb2.ContainerAllocateResponse]]:
        """Admit a pod: allocate each container's resources, container by container.

        ``containers`` gives, per container, resource -> device count. Returns, per
        container, resource -> ContainerAllocateResponse. If any allocation fails, the
        pod's devices are released and the error is raised (admission failed).
        """
        out: list[dict[str, api_pb2.ContainerAllocateResponse]] = []
        try:
            async with self._lock:
                for index, requests in enumerate(containers):
                    responses: dict[str, api_pb2.ContainerAllocateResponse] = {}
                    for resource, n in requests.items():
                        if n <= 0:
                            continue
                        responses[resource] = await self._allocate_locked(
                            resource, n, strategy or self.strategy, pod_uid, index
                        )
                    out.append(responses)
        except BaseException:
            self.release(pod_uid)
            raise
        return out

    def release(
        self,
        pod_uid: str | None = None,
        *,
        resource: str | None = None,
        device_ids: Iterable[str] | None = None,
    ) -> int:
        """Free devices: all of a pod's, and/or the given IDs. Returns how many were freed."""
        ids = set(device_ids) if device_ids is not None else None
        if pod_uid is None and ids is None:
            return 0  # no selector: free nothing rather than everything
        freed = 0
        for res, held in self._in_use.items():
            if resource is not None and res != resource:
                continue
            for dev_id, holder in list(held.items()):
                if (pod_uid is None or holder == pod_uid) and (ids is None or dev_id in ids):
                    del held[dev_id]
                    freed += 1
        if freed:
            self._notify()
        return freed

    # -- internals ---------------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _registration_count(self, resource: str) -> int:
        return sum(1 for r in self.registrations if r.resource_name == resource)

    def _remove_sockets(self) -> None:
        with os.scandir(self.plugin_dir) as entries:
            for entry in entries:
                try:
                    if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def _register(self, request: api_pb2.RegisterRequest) -> str | None:
        """Validate and accept a registration; returns an error message or None."""
        error = None
        if request.version != VERSION:
            error = (
                f"Requested device plugin version {request.version!r} is not supported; "
                f"supported versions: [{VERSION}]"
            )
        elif not _is_extended_resource(request.resource_name):
            error = f"invalid extended resource name {request.resource_name!r}"
        elif not request.endpoint or "/" in request.endpoint:
            error = f"invalid endpoint {request.endpoint!r}"
        if error:
            self.rejected_registrations.append((request, error))
            return error
        self.registrations.append(request)
        old = self._endpoints.pop(request.resource_name, None)
        if old is not None:
            asyncio.get_running_loop().create_task(self._close_endpoint(old))
        channel = grpc.aio.insecure_channel(f"unix:{self.plugin_dir / request.endpoint}")
        ep = PluginEndpoint(
            resource=request.resource_name,
            endpoint=request.endpoint,
            options=request.options,
            channel=channel,
            stub=_grpc_api.DevicePluginStub(channel),
        )
        ep.task = asyncio.get_running_loop().create_task(
            self._follow(ep), name=f"fakekubelet-listandwatch:{ep.resource}"
        )
        self._endpoints[ep.resource] = ep
        self._notify()
        return None

    async def _follow(self, ep: PluginEndpoint) -> None:
        call = ep.stub.ListAndWatch(api_pb2.Empty())
        try:
            async for response in call:
                ep.devices = {d.ID: d for d in response.devices}
                ep.updates += 1
                ep.connected = True
                self._notify()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                log.info("ListAndWatch of %s ended: %s", ep.resource, e.code().name)
        finally:
            call.cancel()
            ep.connected = False
            self._notify()

    async def _close_endpoint(self, ep: PluginEndpoint) -> None:
        if ep.task is not None:
            ep.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ep.task
        await ep.channel.close()

    async def _allocate_locked(
        self, resource: str, n: int, strategy: Strategy, pod_uid: str, container: int
    ) -> api_pb2.ContainerAllocateResponse:
        ep = self._endpoints.get(resource)
        if ep is None:
            raise AllocationFailed(f"unknown resource {resource!r}: no device plugin registered")
        if not ep.connected:
            # Like the real kubelet's grace period: a plugin reconnecting (its stream
            # restarting after a re-registration) is waited for, briefly.
            try:
                await self.wait_for(
                    lambda: (cur := self._endpoints.get(resource)) is not None and cur.connected,
                    f"connection of the {resource} plugin",
                )
            except TimeoutError:
                raise AllocationFailed(f"device plugin of {resource!r} is not connected") from None
            ep = self._endpoints[resource]
        available = self.available(resource)
        if n > len(available):
            raise AllocationFailed(
                f"{resource}: requested {n}, available {len(available)} "
                f"(healthy {len(self.healthy(resource))})"
            )
        chosen: list[str] | None = None
        if strategy == "preferred" and ep.options.get_preferred_allocation_available:
            self.preferred_calls += 1
            request = api_pb2.PreferredAllocationRequest(
                container_requests=[
                    api_pb2.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available,
                        must_include_deviceIDs=[],
                        allocation_size=n,
                    )
                ]
            )
            response = await ep.stub.GetPreferredAllocation(request, timeout=self.timeout)
            preferred = (
                list(response.container_responses[0].deviceIDs)
                if response.container_responses
                else []
            )
            if len(set(preferred)) == n and set(preferred) <= set(available):
                chosen = preferred
            else:
                self.preferred_rejected += 1
                log.info("%s: unusable preferred allocation %s", resource, preferred)
        if chosen is None:
            chosen = self._rng.sample(available, n) if strategy == "random" else available[:n]
        held = self._in_use.setdefault(resource, {})
        for dev_id in chosen:  # reserve before the call, as the kubelet does
            held[dev_id] = pod_uid
        try:
            allocate = api_pb2.AllocateRequest(
                container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)]
            )
            reply = await ep.stub.Allocate(allocate, timeout=self.timeout)
            if len(reply.container_responses) != 1:
                raise AllocationFailed(
                    f"{resource}: Allocate answered {len(reply.container_responses)} "
                    "container responses for 1 container"
                )
        except BaseException:
            for dev_id in chosen:
                held.pop(dev_id, None)
            raise
        result: api_pb2.ContainerAllocateResponse = reply.container_responses[0]
        self.allocations.append(
            AllocationRecord(pod_uid, container, resource, tuple(chosen), result)
        )
        self._notify()
        return result


# ------------------------------------------------------------------ CSI side of the kubelet


class CsiRegistrationFailed(Exception):
    """The fake kubelet's plugin watcher refused a plugin (the kubelet would too)."""


@dataclass
class CsiDriver:
    """A CSI plugin registered through the plugin watcher."""

    name: str
    endpoint: str
    versions: list[str]
    node_id: str
    channel: grpc.aio.Channel
    node: Any
    identity: Any


class FakeCsiKubelet:
    """The kubelet's plugin watcher and CSI volume manager, for ephemeral inline volumes.

    ``register(socket)`` does what the plugin watcher does with a socket that appears in
    ``plugins_registry``: ``GetInfo``; for a ``CSIPlugin`` with a 1.x version, dial its
    endpoint, ``GetPluginInfo`` (the name must match) and ``NodeGetInfo``; then
    ``NotifyRegistrationStatus``. ``publish``/``unpublish`` call the driver as the
    kubelet's CSI mounter does for a pod's inline volume: target
    ``<kubelet_root>/pods/<podUID>/volumes/kubernetes.io~csi/<volume>/mount`` (parent
    made by the kubelet), the volume's attributes plus the pod's information when
    ``pod_info_on_mount`` (the kubelet's values win).
    """

    def __init__(self, kubelet_root: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.root = Path(kubelet_root)
        self.timeout = timeout
        self.drivers: dict[str, CsiDriver] = {}

    async def register(self, registration_socket: str | os.PathLike[str]) -> CsiDriver:
        reg_api: Any = reg_grpc
        csi_api: Any = csi_pb2_grpc
        async with grpc.aio.insecure_channel(f"unix:{registration_socket}") as ch:
            reg = reg_api.RegistrationStub(ch)
            info = await reg.GetInfo(reg_pb2.InfoRequest(), timeout=self.timeout)
            error = ""
            driver: CsiDriver | None = None
            if info.type != CSI_PLUGIN:
                error = f"plugin type {info.type!r} is not {CSI_PLUGIN}"
            elif not any(v.split(".")[0] == "1" for v in info.supported_versions):
                error = f"no supported CSI version in {list(info.supported_versions)}"
            else:
                channel = grpc.aio.insecure_channel(f"unix:{info.endpoint}")
                identity = csi_api.IdentityStub(channel)
                node = csi_api.NodeStub(channel)
                try:
                    pinfo = await identity.GetPluginInfo(
                        csi_pb2.GetPluginInfoRequest(), timeout=self.timeout
                    )
                    ninfo = await node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=self.timeout)
                except grpc.aio.AioRpcError as exc:
                    error = f"endpoint {info.endpoint}: {exc.details()}"
                    await channel.close()
                else:
                    if pinfo.name != info.name:
                        error = f"endpoint says it is {pinfo.name!r}, registration {info.name!r}"
                        await channel.close()
                    else:
                        driver = CsiDriver(
                            info.name, info.endpoint, list(info.supported_versions),
                            ninfo.node_id, channel, node, identity,
                        )
            await reg.NotifyRegistrationStatus(
                reg_pb2.RegistrationStatus(plugin_registered=driver is not None, error=error),
                timeout=self.timeout,
            )
        if driver is None:
            raise CsiRegistrationFailed(error)
        old = self.drivers.pop(driver.name, None)
        if old is not None:
            await old.channel.close()
        self.drivers[driver.name] = driver
        return driver

    def target(self, pod_uid: str, volume: str) -> Path:
        return self.root / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / volume / "mount"

    async def publish(
        self,
        driver: str,
        pod_uid: str,
        volume: str,
        attributes: Mapping[str, str],
        *,
        pod_name: str = "pod",
        namespace: str = "default",
        pod_info_on_mount: bool = True,
        readonly: bool = False,
        target: str | None = None,
    ) -> Path:
        """NodePublishVolume for a pod's inline volume; the target path it used."""
        d = self.drivers[driver]
        path = Path(target) if target is not None else self.target(pod_uid, volume)
        path.parent.mkdir(parents=True, exist_ok=True)
        ctx = dict(attributes)
        if pod_info_on_mount:
            ctx.update(
                {
                    POD_NAME: pod_name,
                    POD_NAMESPACE: namespace,
                    POD_UID: pod_uid,
                    SERVICE_ACCOUNT: "default",
                    EPHEMERAL: "true",
                }
            )
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        # The kubelet names an inline volume "csi-" + sha256(podUID + driver + volume).
        vid = "csi-" + hashlib.sha256(f"{pod_uid}{driver}{volume}".encode()).hexdigest()
        await d.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                target_path=str(path),
                volume_capability=cap,
                readonly=readonly,
                volume_context=ctx,
            ),
            timeout=self.timeout,
        )
        return path

    async def unpublish(self, driver: str, target: str | os.PathLike[str]) -> None:
        await self.drivers[driver].node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-x", target_path=str(target)),
            timeout=self.timeout,
        )

    async def close(self) -> None:
        for d in self.drivers.values():
            await d.channel.close()
        self.drivers.clear()
