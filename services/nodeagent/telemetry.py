"""Per-container usage telemetry: the limiters' region files -> ``hami.tel.<node>``.

Each container with devices has a region file in its slice directory
(``<host_root>/usr/local/vgpu/containers/<podUID>_<container>/region.cache``) that its
preloaded limiter keeps up to date (shared/region.py reads it). Every ``interval``
seconds :class:`TelemetryPublisher` builds one :class:`~shared.schemas.Telemetry` for
the node from the ledger (who should be there, with which limits) and the regions (what
they use), and publishes it on core NATS (not stored: a lost sample is replaced by the
next one).

A container whose process has not touched CUDA yet has no region; it is reported
anyway, with its granted limit and zero use (HAMi shows such containers only after
their first CUDA call), so every allocation is in the series from the moment it is bound.

Device rows (HAMi's host series) come from the backend's :class:`UsageSource` when it has
one: NVML's own figures for real cards, the simulator's usage model (a baseline plus what
the slices report) for simulated ones; every card of the node then has a row, used or
not. Without one, the rows sum the containers per card.

Each sample also names the MIG instances the node's slices hold (``Telemetry.mig``:
profile, placement, MIG UUID, GPU- and compute-instance ids), so a reader that starts
after the ``prepared`` events (the metrics service) still learns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from services.nodeagent.slices import REGION_FILE, SliceWriter, pod_slices
from shared import subjects
from shared.bus import Bus
from shared.lifecycle import Background
from shared.region import DeviceState, RegionError, RegionSnapshot, read_region
from shared.schemas import ContainerUsage, DeviceUsage, LedgerAlloc, MigUsage, Telemetry

log = logging.getLogger("hami.nodeagent.telemetry")

MIB = 1 << 20


class RegionReader(Protocol):
    def __call__(self, path: Path) -> RegionSnapshot: ...


@runtime_checkable
class UsageSource(Protocol):
    """A backend that reports its cards' usage (host memory used, utilisation)."""

    def usage(self, containers: Sequence[ContainerUsage]) -> list[DeviceUsage]: ...


def _region_device(region: RegionSnapshot, i: int, uuid: str) -> DeviceState | None:
    """The region's record of a slice's ``i``-th card. The limiter numbers the cards as
    NVML lists them where it runs: in a container that is the container's own cards (the
    grant's order), on a bare host (``hami run``) every card of the host; the record's
    UUID, once a process has touched the card, says which it is either way."""
    for d in region.devices:
        if d.uuid == uuid:
            return d
    with contextlib.suppress(KeyError):
        d = region.device(i)
        if not d.uuid:
            return d  # not touched yet: its limit, no use
    return None


def sample(
    node: str,
    allocs: Mapping[str, LedgerAlloc],
    slices: SliceWriter,
    reader: RegionReader = read_region,
    now: float | None = None,
    host: UsageSource | None = None,
) -> Telemetry:
    """One telemetry sample of the node (blocking file reads: run it in a thread)."""
    containers: list[ContainerUsage] = []
    migs: list[MigUsage] = []
    per_card: dict[str, DeviceUsage] = {}
    for alloc in allocs.values():
        for s in pod_slices(alloc):
            for grant in s.grant.devices:
                got = slices.realised(grant).mig if grant.mig is not None else None
                if got is not None and got.uuid:  # created: its identity, every sample
                    migs.append(
                        MigUsage(uid=alloc.uid, container=s.container, uuid=grant.uuid, mig=got)
                    )
            region: RegionSnapshot | None = None
            path = slices.path(alloc.uid, s.container) / REGION_FILE
            try:
                region = reader(path)
            except FileNotFoundError:
                pass  # no CUDA call yet
            except (OSError, RegionError) as exc:
                log.debug("%s: region %s unreadable: %s", node, path, exc)
            for i, grant in enumerate(s.grant.devices):
                dev = _region_device(region, i, grant.uuid) if region is not None else None
                used = dev.used_bytes if dev else 0
                limit = dev.limit_bytes if dev and dev.limit_bytes else grant.mem * MIB
                util = (dev.utilization / 100.0) if dev else 0.0
                containers.append(
                    ContainerUsage(
                        uid=alloc.uid,
                        container=s.container,
                        uuid=grant.uuid,  # the slice's i-th card (CUDA_VISIBLE_DEVICES order)
                        memory_used_bytes=used,
                        memory_limit_bytes=limit,
                        utilization=util,
                        last_kernel_at=(dev.last_kernel_ns / 1e9) if dev else 0.0,
                    )
                )
                card = per_card.setdefault(
                    grant.uuid, DeviceUsage(uuid=grant.uuid, vendor=grant.vendor, type=grant.type)
                )
                card.memory_used_mib += used // MIB
                if dev is not None:
                    # The limiter samples the whole card too; any container's view will do.
                    card.utilization = max(card.utilization, dev.device_utilization / 100.0)
    devices = list(per_card.values())
    if host is not None:
        try:
            devices = host.usage(containers)
        except Exception as exc:  # a driver hiccup: the slices' sums this round
            log.warning("%s: card usage unavailable: %s", node, exc)
    return Telemetry(
        node=node,
        at=time.time() if now is None else now,
        devices=sorted(devices, key=lambda d: d.uuid),
        containers=containers,
        mig=migs,
    )


class TelemetryPublisher:
    """Publishes :func:`sample` every ``interval`` seconds on ``subjects.telemetry(node)``."""

    def __init__(
        self,
        bus: Bus,
        node: str,
        slices: SliceWriter,
        allocs: Callable[[], Mapping[str, LedgerAlloc]],
        *,
        interval: float = 5.0,
        reader: RegionReader = read_region,
        host: object = None,
    ) -> None:
        self.bus = bus
        self.node = node
        self.slices = slices
        self.allocs = allocs
        self.interval = interval
        self.reader = reader
        # Any backend may be passed: one without a usage() method gives no host rows.
        self.host = host if isinstance(host, UsageSource) else None
        self.published = 0
        self._bg = Background()

    async def publish_once(self) -> Telemetry:
        tel = await asyncio.to_thread(
            sample, self.node, dict(self.allocs()), self.slices, self.reader, None, self.host
        )
        await self.bus.publish(subjects.telemetry(self.node), tel)
        self.published += 1
        return tel

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except Exception as exc:  # a reconnecting client: try again next round
                log.warning("%s: telemetry failed: %s", self.node, exc)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._bg.spawn(self._run(), f"tel-{self.node}")

    async def stop(self) -> None:
        await self._bg.stop()
