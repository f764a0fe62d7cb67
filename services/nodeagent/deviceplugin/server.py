"""The node agent's kubelet device plugin: one gRPC server per extended resource.

A `DevicePlugin` advertises the devices of one resource name (e.g. ``nvidia.com/gpu``)
to the kubelet through the device plugin API v1beta1, over a unix socket
``<plugin_dir>/<name>.sock``:

- it registers with the kubelet on ``<plugin_dir>/kubelet.sock`` and registers again
  whenever the kubelet restarts (kubelet.sock replaced) or its own socket has been
  deleted (the kubelet removes plugin sockets when it restarts) -- both are detected by
  cheaply polling the files' identity;
- ``ListAndWatch`` streams the current device list; `update_devices` pushes a fresh list
  to every open stream (latest state wins, slow readers never queue stale lists);
- ``GetPreferredAllocation`` and ``Allocate`` delegate to callbacks (plain or async), so
  the policy -- which slice a container gets, which limiter environment and mounts it
  receives -- lives in the node agent's pure modules, not here. A callback that raises
  is answered with a gRPC error (FAILED_PRECONDITION for `AllocationError`, UNKNOWN for
  anything else) and the server keeps serving.

Everything runs on one asyncio event loop (grpc.aio); call `update_devices` from it, or
`update_devices_threadsafe` from other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio

from .v1beta1 import (
    DEVICE_PLUGIN_PATH,
    HEALTHY,
    KUBELET_SOCKET,
    UNHEALTHY,
    VERSION,
    api_pb2,
    api_pb2_grpc,
)

__all__ = [
    "AllocateCallback",
    "AllocationError",
    "ContainerAllocation",
    "DeviceState",
    "DevicePlugin",
    "PreferredCallback",
    "socket_name_for",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# The generated gRPC module carries no type annotations.
_grpc_api: Any = api_pb2_grpc

# Unix socket paths are limited to 108 bytes including the NUL (sun_path).
_MAX_UNIX_PATH = 107


class DeviceState(NamedTuple):
    """One advertised device; plain ``(id, healthy, numa_node)`` tuples work too."""

    id: str
    healthy: bool = True
    numa_node: int | None = None


@dataclass
class ContainerAllocation:
    """What the kubelet must inject into one container (converted to protobuf)."""

    envs: dict[str, str] = field(default_factory=dict)
    # (container_path, host_path, read_only)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    # (container_path, host_path, cgroup permissions such as "rw")
    devices: list[tuple[str, str, str]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    # fully qualified CDI device names, e.g. "nvidia.com/gpu=0"
    cdi_devices: list[str] = field(default_factory=list)


class AllocationError(Exception):
    """Raised by a callback to refuse a request; answered with FAILED_PRECONDITION."""


DeviceLike = DeviceState | tuple[str, bool, int | None]
DeviceProvider = Callable[[], Iterable[DeviceLike]]
PreferredCallback = Callable[[list[str], list[str], int], "list[str] | Awaitable[list[str]]"]
AllocateCallback = Callable[
    [list[list[str]]], "list[ContainerAllocation] | Awaitable[list[ContainerAllocation]]"
]


def socket_name_for(resource_name: str) -> str:
    """Default socket file name for a resource: ``nvidia.com/gpu`` -> ``nvidia.com-gpu``."""
    return resource_name.replace("/", "-")


def _identity(path: Path) -> tuple[int, int, int] | None:
    """A cheap identity of a file: changes when it is removed and created again.

    The inode alone is not enough: a file system may hand the freed inode number to the
    new socket at once, so the change time (nanoseconds) is part of it.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


async def _maybe_await(value: _T | Awaitable[_T]) -> _T:
    if inspect.isawaitable(value):
        return await value
    return value


def _device_pb(dev: DeviceLike) -> api_pb2.Device:
    dev_id, healthy, numa = dev
    topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=numa)]) if numa is not None else None
    return api_pb2.Device(ID=dev_id, health=HEALTHY if healthy else UNHEALTHY, topology=topology)


def _allocation_pb(alloc: ContainerAllocation) -> api_pb2.ContainerAllocateResponse:
    return api_pb2.ContainerAllocateResponse(
        envs=alloc.envs,
        mounts=[
            api_pb2.Mount(container_path=c, host_path=h, read_only=ro) for c, h, ro in alloc.mounts
        ],
        devices=[
            api_pb2.DeviceSpec(container_path=c, host_path=h, permissions=p)
            for c, h, p in alloc.devices
        ],
        annotations=alloc.annotations,
        cdi_devices=[api_pb2.CDIDevice(name=n) for n in alloc.cdi_devices],
    )


class _Servicer(api_pb2_grpc.DevicePluginServicer):
    """gRPC face of a DevicePlugin; all state lives in the plugin."""

    def __init__(self, plugin: DevicePlugin) -> None:
        self._p = plugin

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.DevicePluginOptions:
        return self._p.options

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        p = self._p
        sent = -1
        p._streams += 1
        try:
            while not p._stopping:
                if sent != p._version:
                    sent = p._version
                    yield p._response
                    continue
                changed = p._changed
                await changed.wait()
        finally:
            p._streams -= 1

    async def GetPreferredAllocation(
        self,
        request: api_pb2.PreferredAllocationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> api_pb2.PreferredAllocationResponse:
        cb = self._p._preferred
        if cb is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{self._p.resource_name}: GetPreferredAllocation is not available",
            )
            return api_pb2.PreferredAllocationResponse()
        responses = []
        for req in request.container_requests:
            ids = await self._p._call(
                "GetPreferredAllocation",
                context,
                cb,
                list(req.available_deviceIDs),
                list(req.must_include_deviceIDs),
                req.allocation_size,
            )
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> api_pb2.AllocateResponse:
        p = self._p
        container_requests = [list(c.devices_ids) for c in request.container_requests]
        unknown = sorted({i for ids in container_requests for i in ids} - p._device_ids)
        if unknown:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{p.resource_name}: Allocate asked for unknown devices {unknown}",
            )
        allocs = await p._call("Allocate", context, p._allocate, container_requests)
        if len(allocs) != len(container_requests):
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"{p.resource_name}: allocate callback returned {len(allocs)} responses "
                f"for {len(container_requests)} containers",
            )
        return api_pb2.AllocateResponse(container_responses=[_allocation_pb(a) for a in allocs])

    async def PreStartContainer(
        self,
        request: api_pb2.PreStartContainerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


class DevicePlugin:
    """Kubelet device plugin for one resource name, served with grpc.aio on a unix socket.

    ``devices`` is either a callable returning the current devices or a fixed iterable;
    each device is a `DeviceState` or an ``(id, healthy, numa_node | None)`` tuple.
    ``preferred(available_ids, must_include_ids, size)`` answers GetPreferredAllocation
    (None: not offered to the kubelet); ``allocate(container_requests)`` answers Allocate
    with one `ContainerAllocation` per container. Both may be async.
    """

    def __init__(
        self,
        resource_name: str,
        devices: DeviceProvider | Iterable[DeviceLike],
        allocate: AllocateCallback,
        preferred: PreferredCallback | None = None,
        *,
        plugin_dir: str | os.PathLike[str] = DEVICE_PLUGIN_PATH,
        name: str | None = None,
        poll_interval: float = 0.5,
        register_timeout: float = 5.0,
    ) -> None:
        self.resource_name = resource_name
        self.plugin_dir = Path(plugin_dir)
        self.endpoint = f"{name or socket_name_for(resource_name)}.sock"
        self.socket_path = self.plugin_dir / self.endpoint
        self.kubelet_socket = self.plugin_dir / KUBELET_SOCKET
        self.poll_interval = poll_interval
        self.register_timeout = register_timeout
        self.options = api_pb2.DevicePluginOptions(
            pre_start_required=False,
            get_preferred_allocation_available=preferred is not None,
        )
        if callable(devices):
            self._provider: DeviceProvider = devices
        else:
            fixed = list(devices)
            self._provider = lambda: fixed
        self._allocate = allocate
        self._preferred = preferred

        self._response = api_pb2.ListAndWatchResponse()
        self._device_ids: set[str] = set()
        self._version = 0
        self._changed = asyncio.Event()
        self._streams = 0
        self._stopping = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._served_identity: tuple[int, int, int] | None = None
        self._registered_identity: tuple[int, int, int] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._register_failures = 0
        self.registrations = 0
        """How many times Register succeeded (1 + re-registrations)."""

    # -- devices -----------------------------------------------------------------------

    @property
    def devices(self) -> list[DeviceState]:
        """The device list currently advertised."""
        return [
            DeviceState(
                d.ID,
                d.health == HEALTHY,
                d.topology.nodes[0].ID if d.HasField("topology") and d.topology.nodes else None,
            )
            for d in self._response.devices
        ]

    @property
    def open_streams(self) -> int:
        """Number of ListAndWatch streams being served now."""
        return self._streams

    def update_devices(self, devices: Iterable[DeviceLike] | None = None) -> None:
        """Advertise a new device list (``None``: ask the provider again) to all streams."""
        items = list(self._provider() if devices is None else devices)
        self._response = api_pb2.ListAndWatchResponse(devices=[_device_pb(d) for d in items])
        self._device_ids = {d.ID for d in self._response.devices}
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def update_devices_threadsafe(self, devices: Iterable[DeviceLike] | None = None) -> None:
        """`update_devices` from another thread (e.g. a blocking NVML health watcher)."""
        if self._loop is None:
            raise RuntimeError("DevicePlugin not started")
        items = None if devices is None else list(devices)
        self._loop.call_soon_threadsafe(self.update_devices, items)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on the plugin socket, register if the kubelet is up, and keep watching."""
        if self._watch_task is not None:
            raise RuntimeError("DevicePlugin already started")
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            raise ValueError(f"unix socket path too long (> {_MAX_UNIX_PATH}): {self.socket_path}")
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self.update_devices()
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        await self._serve()
        await self._check()
        self._watch_task = asyncio.create_task(
            self._watch(), name=f"deviceplugin-watch:{self.resource_name}"
        )

    async def stop(self, grace: float | None = 0.5) -> None:
        """Stop watching, end the streams, stop the server and remove the socket."""
        self._stopping = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        await self._stop_server(grace)
        self._registered.clear()
        self._registered_identity = None

    async def __aenter__(self) -> DevicePlugin:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_registered(self) -> None:
        """Wait until the plugin is registered with the current kubelet.

        Bound the wait with ``asyncio.timeout``.
        """
        await self._registered.wait()

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    # -- internals ---------------------------------------------------------------------

    async def _serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        _grpc_api.add_DevicePluginServicer_to_server(_Servicer(self), server)
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        await server.start()
        self._server = server
        self._served_identity = _identity(self.socket_path)
        log.info("device plugin %s serving on %s", self.resource_name, self.socket_path)

    async def _stop_server(self, grace: float | None) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        # Remove our socket only if it is still the one we created.
        if self._served_identity is not None and _identity(self.socket_path) == (
            self._served_identity
        ):
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self._served_identity = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device plugin %s: watch step failed", self.resource_name)

    async def _check(self) -> None:
        """One poll: recreate our socket if it was removed, (re-)register if needed."""
        if _identity(self.socket_path) != self._served_identity:
            log.warning(
                "device plugin %s: socket %s was removed; serving again",
                self.resource_name,
                self.socket_path,
            )
            await self._stop_server(grace=0)
            await self._serve()
            self._registered_identity = None
            self._registered.clear()
        kubelet = _identity(self.kubelet_socket)
        if kubelet is None:
            if self._registered_identity is not None:
                log.info("device plugin %s: kubelet socket is gone", self.resource_name)
            self._registered_identity = None
            self._registered.clear()
            return
        if kubelet != self._registered_identity:
            self._registered.clear()
            if await self._register():
                self._registered_identity = kubelet
                self._registered.set()

    async def _register(self) -> bool:
        request = api_pb2.RegisterRequest(
            version=VERSION,
            endpoint=self.endpoint,
            resource_name=self.resource_name,
            options=self.options,
        )
        try:
            async with grpc.aio.insecure_channel(f"unix:{self.kubelet_socket}") as channel:
                await _grpc_api.RegistrationStub(channel).Register(
                    request, timeout=self.register_timeout
                )
        except grpc.aio.AioRpcError as e:
            self._register_failures += 1
            level = logging.WARNING if self._register_failures == 1 else logging.DEBUG
            log.log(
                level,
                "device plugin %s: register with %s failed (%s: %s); will retry",
                self.resource_name,
                self.kubelet_socket,
                e.code().name,
                e.details(),
            )
            return False
        self._register_failures = 0
        self.registrations += 1
        log.info(
            "device plugin %s registered with kubelet as %s", self.resource_name, self.endpoint
        )
        return True

    async def _call(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[Any, Any],
        cb: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """Run a (possibly async) callback; turn its exception into a gRPC error."""
        try:
            return await _maybe_await(cb(*args))
        except asyncio.CancelledError:
            raise
        except AllocationError as e:
            log.info("device plugin %s: %s refused: %s", self.resource_name, rpc, e)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{self.resource_name} {rpc}: {e}"
            )
        except Exception as e:
            log.exception("device plugin %s: %s callback failed", self.resource_name, rpc)
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"{self.resource_name} {rpc} failed: {type(e).__name__}: {e}",
            )
