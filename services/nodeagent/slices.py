"""Per-container slice files: how each container learns its exact slice by its own pod UID.

The kubelet's Allocate call names device IDs, never the pod, so the device plugin cannot
always tell which pod it is serving (docs/exact-matching.md). The container can: the
webhook gives every HAMi container ``HAMI_POD_UID`` (downward API), ``HAMI_CONTAINER_NAME``
and a CSI volume that the agent's CSI node plugin (services/nodeagent/csi/) serves by
bind-mounting the host directory ``/usr/local/vgpu/containers/<podUID>_<container>`` at
``/usr/local/vgpu/slice``.
This module writes that directory's ``env`` file from the node's ledger entry, so the
preloaded limiter (which ``setenv``s each ``KEY=VALUE`` line before CUDA initialises)
applies the slice the scheduler decided for exactly this pod and container. It also
pre-creates the container's shared usage region (``region.cache``, mode 0666, in a
root-owned 0755 directory), so a workload running as any user can map and update it
without being able to create anything else there.

Pure parts: :func:`slice_env` (one container's file contents), :func:`container_dirs`
(the directories a ledger implies). :class:`SliceWriter` does the small file I/O (atomic
write: temp file + rename; removal on release; reconcile on start) and publishes
``prepared`` once a pod's slices are on disk.

Grants on cards in MIG mode name a profile and a placement (``CardGrant.mig``). With a
backend that manages MIG (:class:`~services.nodeagent.backends.MigBackend`), the writer
creates exactly that instance before the container's file is written -- the file then
points the container at the instance's ``MIG-`` UUID -- and destroys it once the pod is
released, as HAMi's device plugin does. A pod whose instance cannot be created is not
prepared (no file, no ``prepared`` event) and is retried at the next ledger change. On
the first sync after a start, live instances that match a reservation are adopted and
the others on the node's MIG cards destroyed: the agent is the only owner of MIG state
on its cards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from services.nodeagent.backends import MigBackend, MigError, MigInstance, PhysicalCard
from shared import subjects, tracing
from shared.bus import Bus
from shared.config import NodeSettings
from shared.files import replace_file
from shared.hami.mig import MIG_MODE
from shared.schemas import AllocPrepared, CardGrant, ContainerGrant, LedgerAlloc

log = logging.getLogger("hami.nodeagent.slices")
tracer = tracing.tracer("hami.nodeagent.slices")

# Host directory holding one sub-directory per container (relative to the host root).
CONTAINERS_DIR = "usr/local/vgpu/containers"
# Where the webhook mounts the container's own directory, inside the container.
SLICE_MOUNT = "/usr/local/vgpu/slice"
ENV_FILE = "env"
REGION_FILE = "region.cache"
REGION_PATH = f"{SLICE_MOUNT}/{REGION_FILE}"
# The limiter's region file (isolation/native/README.md, "Region file layout"): a 4096-byte
# header, then 1024 process slots of 384 bytes. Pre-created at this size, zero-filled
# (sparse): the limiter initialises a file whose magic is not yet set.
REGION_SIZE = 4096 + 1024 * 384
# The workload may run as any user: it must map and update its region, but must not
# create, replace or remove anything in its directory (the agent owns the env file).
REGION_MODE = 0o666
DIR_MODE = 0o755


def container_name(grant: ContainerGrant, position: int) -> str:
    """The name a container's directory is keyed by; position when the grant has none
    (direct clients outside Kubernetes may leave container names empty)."""
    return grant.name or str(position)


def dir_name(pod_uid: str, container: str) -> str:
    """``<podUID>_<container>``: the directory a container's slice volume mounts."""
    return f"{pod_uid}_{container}"


def core_policy(settings: NodeSettings) -> str:
    """GPU_CORE_UTILIZATION_POLICY as HAMi sets it: ``disableCoreLimit`` wins."""
    return "disable" if settings.disable_core_limit else settings.gpu_core_policy


def slice_env(
    grant: ContainerGrant, settings: NodeSettings, mig: Mapping[int, str] | None = None
) -> dict[str, str]:
    """The limiter environment of one container with devices, in REFERENCE §6 terms.

    Card ``i`` is the i-th granted card: ``CUDA_VISIBLE_DEVICES`` lists the UUIDs in the
    grant's order, so CUDA's device ``i`` inside the container is the card whose limits
    carry the suffix ``_i``. ``mig`` maps a grant position to the ``MIG-`` UUID of its
    instance: the container sees the instance, whose compute is its own (no SM limit).
    """
    mig = mig or {}
    env: dict[str, str] = {
        "CUDA_VISIBLE_DEVICES": ",".join(mig.get(i, d.uuid) for i, d in enumerate(grant.devices)),
    }
    for i, d in enumerate(grant.devices):
        env[f"CUDA_DEVICE_MEMORY_LIMIT_{i}"] = f"{int(d.mem)}m"
    for i, d in enumerate(grant.devices):
        env[f"CUDA_DEVICE_SM_LIMIT_{i}"] = "100" if i in mig else str(int(d.cores))
    env["CUDA_DEVICE_MEMORY_SHARED_CACHE"] = REGION_PATH
    env["GPU_CORE_UTILIZATION_POLICY"] = core_policy(settings)
    if settings.device_memory_scaling > 1:
        env["CUDA_OVERSUBSCRIBE"] = "true"
    return env


def render_env(env: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in env.items())


def parse_env(text: str) -> dict[str, str]:
    """Read a slice file back the way the limiter does (``KEY=VALUE``, ``#`` comments)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        if k.strip():
            out[k.strip()] = v.strip()
    return out


@dataclass(frozen=True)
class ContainerSlice:
    pod_uid: str
    container: str
    grant: ContainerGrant

    @property
    def dir_name(self) -> str:
        return dir_name(self.pod_uid, self.container)


def pod_slices(alloc: LedgerAlloc) -> list[ContainerSlice]:
    """The containers of a pod that get a slice directory (those with devices)."""
    return [
        ContainerSlice(alloc.uid, container_name(g, i), g)
        for i, g in enumerate(alloc.containers)
        if g.devices
    ]


def container_dirs(allocs: Mapping[str, LedgerAlloc]) -> dict[str, ContainerSlice]:
    """Directory name -> slice, for every container with devices in the ledger."""
    return {s.dir_name: s for a in allocs.values() for s in pod_slices(a)}


MigKey = tuple[str, str, int, int]  # GPU UUID, profile, start, size


def mig_key(d: CardGrant) -> MigKey | None:
    """The instance a grant stands for, or None for a grant outside MIG."""
    if d.mig is None:
        return None
    return (d.uuid, d.mig.profile, d.mig.start, d.mig.size)


def mig_keys(allocs: Mapping[str, LedgerAlloc]) -> dict[MigKey, str]:
    """Every MIG instance the ledger reserves -> the pod holding it."""
    out: dict[MigKey, str] = {}
    for a in allocs.values():
        for c in a.containers:
            for d in c.devices:
                k = mig_key(d)
                if k is not None:
                    out[k] = a.uid
    return out


def ensure_region(d: Path) -> None:
    """Create ``d/region.cache`` (zero-filled, :data:`REGION_SIZE`, mode 0666) unless it
    exists. Never touches an existing one: a live container's accounting is in it.

    Built aside and hard-linked into place, so a limiter opening the path meanwhile sees
    no file (and creates its own, which the link then leaves alone) or the complete one.
    """
    region = d / REGION_FILE
    if region.exists():
        return
    tmp = d / f".{REGION_FILE}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, REGION_MODE)
        try:
            os.fchmod(fd, REGION_MODE)  # the umask narrowed the mode open() gave
            os.ftruncate(fd, REGION_SIZE)
        finally:
            os.close(fd)
        try:
            os.link(tmp, region)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    # A container starting while we write must see the old file or the new one, never
    # half of one: write a temp file in the same directory, then rename over. No fsync:
    # after a crash of the host the agent's start-up reconcile compares every file with
    # the ledger and rewrites what is missing or stale, before any Allocate is answered.
    replace_file(path, text.encode(), 0o644)  # any container user reads it


class SliceWriter:
    """Keeps ``<host_root>/usr/local/vgpu/containers`` equal to the node's ledger.

    :meth:`sync` is idempotent and cheap when nothing changed (it remembers what it
    wrote); call it with the ledger's allocations whenever they change, and once at
    start (reconcile: directories of pods not in the ledger are removed, missing ones
    written). ``bus`` None: no ``prepared`` events (unit tests).
    """

    def __init__(
        self,
        host_root: str | os.PathLike[str],
        node: str,
        settings: NodeSettings,
        bus: Bus | None = None,
        mig: object = None,
    ) -> None:
        self.root = Path(host_root) / CONTAINERS_DIR
        self.node = node
        self.settings = settings
        self.bus = bus
        # Any backend may be passed: MIG instances are managed only by one that can.
        self.mig: MigBackend | None = mig if isinstance(mig, MigBackend) else None
        self.instances: dict[MigKey, MigInstance] = {}  # live instances this agent owns
        self.mig_failed: dict[MigKey, str] = {}  # instances that could not be created: why
        self.written: dict[str, str] = {}  # dir name -> env file text on disk
        self.prepared: set[str] = set()  # pod UIDs whose slices are all on disk
        self.known: dict[str, LedgerAlloc] = {}  # the allocations of the last sync
        self.removed = 0
        self._lock = asyncio.Lock()
        self._reconciled = False
        self._texts: dict[str, tuple[ContainerGrant, str]] = {}  # dir -> (grant, env text)
        self._mig_cache: dict[str, dict[int, str]] = {}  # dir -> MIG UUIDs its text has

    def path(self, pod_uid: str, container: str) -> Path:
        """Host path of a container's directory (its ``env`` and ``region.cache``)."""
        return self.root / dir_name(pod_uid, container)

    def env_path(self, pod_uid: str, container: str) -> Path:
        return self.path(pod_uid, container) / ENV_FILE

    async def sync(self, allocs: Mapping[str, LedgerAlloc]) -> list[LedgerAlloc]:
        """Make the directory match ``allocs``; returns the pods newly prepared.

        Each pod prepared or released here is a span (``nodeagent.prepare``,
        ``nodeagent.release``) in the trace of the decision its ledger entry names.
        """
        async with self._lock:
            began = time.time_ns()
            allocs = dict(allocs)
            released = [a for uid, a in self.known.items() if uid not in allocs]
            self.known = allocs
            if self.mig is not None:
                await asyncio.to_thread(self._sync_mig, allocs)
            if not self._reconciled:
                new_pods = await asyncio.to_thread(self._sync_files, allocs)
            else:
                # Planned here (rendering is cached per grant), written in a thread
                # only when there is something to write: most ledger changes add one pod.
                writes, removes = self._plan(allocs)
                if writes or removes:
                    await asyncio.to_thread(self._apply, writes, removes)
                new_pods = self._newly_prepared(allocs)
        for alloc in new_pods:
            with tracing.resume(
                tracer, "nodeagent.prepare", alloc.traceparent, start_time=began
            ) as sp:
                if sp.is_recording():
                    sp.set_attributes(self._span_attributes(alloc))
                await self._publish_prepared(alloc)
        for alloc in released:
            if not pod_slices(alloc):
                continue  # nothing of it was on this node's disk
            with tracing.resume(
                tracer, "nodeagent.release", alloc.traceparent, start_time=began
            ) as sp:
                if sp.is_recording():
                    sp.set_attributes(self._span_attributes(alloc))
        return new_pods

    def _span_attributes(self, alloc: LedgerAlloc) -> dict[str, str | int | list[str]]:
        mine = pod_slices(alloc)
        return {
            "hami.uid": alloc.uid,
            "hami.name": alloc.name,
            "hami.namespace": alloc.namespace,
            "hami.node": self.node,
            "hami.slices": [s.container for s in mine],
            "hami.cards": sorted({d.uuid for s in mine for d in s.grant.devices}),
            "hami.mig.instances": sum(
                1 for s in mine for d in s.grant.devices if d.mig is not None
            ),
        }

    # ------------------------------------------------------------------------ MIG

    def mig_uuids(self, grant: ContainerGrant) -> dict[int, str] | None:
        """Grant position -> ``MIG-`` UUID of its instance; None while one of the grant's
        MIG instances does not exist (the container must not see the whole card)."""
        out: dict[int, str] = {}
        for i, d in enumerate(grant.devices):
            k = mig_key(d)
            if k is None:
                continue
            inst = self.instances.get(k)
            if inst is None:
                return None
            out[i] = inst.uuid
        return out

    def visible_devices(self, grants: list[ContainerGrant], default: str) -> str:
        """``NVIDIA_VISIBLE_DEVICES`` for a container that may be any of ``grants``: their
        cards, each MIG grant's card replaced by its instance (``default`` when none of
        them is on a MIG card)."""
        if not any(d.mig is not None for g in grants for d in g.devices):
            return default
        seen: dict[str, None] = {}
        for g in grants:
            uuids = self.mig_uuids(g) or {}
            for i, d in enumerate(g.devices):
                seen.setdefault(uuids.get(i, d.uuid), None)
        return ",".join(seen)

    def realised(self, d: CardGrant) -> CardGrant:
        """``d`` with its MIG instance's identity filled in (for ``prepared`` events)."""
        k = mig_key(d)
        inst = self.instances.get(k) if k is not None else None
        if inst is None or d.mig is None:
            return d
        mig = msgspec.structs.replace(
            d.mig,
            uuid=inst.uuid,
            gpu_instance=inst.gpu_instance,
            compute_instance=inst.compute_instance,
        )
        return msgspec.structs.replace(d, mig=mig)

    def _sync_mig(self, allocs: dict[str, LedgerAlloc]) -> None:
        """Create the reserved instances that do not exist, destroy the released ones."""
        assert self.mig is not None
        want = mig_keys(allocs)
        if not self._reconciled:
            self._adopt(want)
        for k, inst in list(self.instances.items()):
            if k in want:
                continue
            try:
                self.mig.destroy_mig(inst)
            except MigError as exc:
                log.error(
                    "%s: MIG %s at %d/%d on %s not destroyed: %s",
                    self.node,
                    k[1],
                    k[2],
                    k[3],
                    k[0],
                    exc,
                )
                continue  # retried at the next change
            del self.instances[k]
            log.info("%s: destroyed MIG %s at %d/%d on %s", self.node, k[1], k[2], k[3], k[0])
        for k in want:
            if k in self.instances:
                continue
            try:
                self.instances[k] = self.mig.create_mig(*k)
            except MigError as exc:
                if self.mig_failed.get(k) != str(exc):
                    log.error(
                        "%s: MIG %s at %d/%d on %s for %s: %s",
                        self.node,
                        k[1],
                        k[2],
                        k[3],
                        k[0],
                        want[k],
                        exc,
                    )
                self.mig_failed[k] = str(exc)
                continue
            self.mig_failed.pop(k, None)
            log.info(
                "%s: created MIG %s at %d/%d on %s: %s",
                self.node,
                k[1],
                k[2],
                k[3],
                k[0],
                self.instances[k].uuid,
            )
        for k in [k for k in self.mig_failed if k not in want]:
            del self.mig_failed[k]

    def _adopt(self, want: Mapping[MigKey, str]) -> None:
        """After a start: keep the live instances a reservation names, destroy the rest."""
        assert self.mig is not None
        cards = {c.uuid for c in self.mig_cards()}
        for gpu in sorted(cards | {k[0] for k in want}):
            try:
                live = self.mig.mig_instances(gpu)
            except MigError as exc:
                log.warning("%s: MIG instances of %s unknown: %s", self.node, gpu, exc)
                continue
            for inst in live:
                k = (inst.gpu_uuid, inst.profile, inst.start, inst.size)
                if k in want and k not in self.instances:
                    self.instances[k] = inst
                    continue
                try:
                    self.mig.destroy_mig(inst)
                    log.info("%s: destroyed stale MIG %s at %d/%d on %s", self.node, *k[1:], gpu)
                except MigError as exc:
                    log.error("%s: stale MIG on %s not destroyed: %s", self.node, gpu, exc)

    def mig_cards(self) -> list[PhysicalCard]:
        """The node's cards in MIG mode, as the backend discovers them."""
        discover = getattr(self.mig, "discover", None)
        if discover is None:
            return []
        cards: list[PhysicalCard] = discover().cards
        return [c for c in cards if c.mode == MIG_MODE]

    def _text(self, s: ContainerSlice) -> str | None:
        uuids = self.mig_uuids(s.grant)
        if uuids is None:
            return None  # its MIG instance is not there: no file yet
        cached = self._texts.get(s.dir_name)
        if cached is not None and cached[0] == s.grant and uuids == self._mig_cache.get(s.dir_name):
            return cached[1]
        text = render_env(slice_env(s.grant, self.settings, uuids))
        self._texts[s.dir_name] = (s.grant, text)
        self._mig_cache[s.dir_name] = uuids
        return text

    def _plan(self, allocs: dict[str, LedgerAlloc]) -> tuple[list[tuple[str, str]], list[str]]:
        want = container_dirs(allocs)
        removes = [name for name in self.written if name not in want]
        writes = []
        for name, s in want.items():
            text = self._text(s)
            if text is None:
                continue
            if self.written.get(name) != text:
                writes.append((name, text))
        return writes, removes

    def _apply(self, writes: list[tuple[str, str]], removes: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in removes:
            self._remove(name)
        for name, text in writes:
            d = self.root / name
            d.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(d, DIR_MODE)  # not the umask's: the env file must stay readable
            _write_atomic(d / ENV_FILE, text)
            ensure_region(d)
            self.written[name] = text

    def _newly_prepared(self, allocs: dict[str, LedgerAlloc]) -> list[LedgerAlloc]:
        self.prepared &= set(allocs)
        new = [
            a
            for uid, a in allocs.items()
            if uid not in self.prepared
            and all(self.mig_uuids(s.grant) is not None for s in pod_slices(a))
        ]
        self.prepared.update(a.uid for a in new)
        return new

    def _sync_files(self, allocs: dict[str, LedgerAlloc]) -> list[LedgerAlloc]:
        """The first sync after a (re)start: trust the disk, not memory. Pods whose
        slices are all on disk as they should be were announced before."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.written = self._scan()
        self._reconciled = True
        for uid, a in allocs.items():
            mine = pod_slices(a)
            if mine and all(self.written.get(s.dir_name) == (self._text(s) or False) for s in mine):
                self.prepared.add(uid)
        self._apply(*self._plan(allocs))
        for name in container_dirs(allocs):
            ensure_region(self.root / name)  # directories an older agent wrote have none
        return self._newly_prepared(allocs)

    def _scan(self) -> dict[str, str]:
        """What is on disk: directory name -> env text ("" when unreadable)."""
        out: dict[str, str] = {}
        with os.scandir(self.root) as entries:
            for e in entries:
                if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                    continue
                try:
                    out[e.name] = (Path(e.path) / ENV_FILE).read_text()
                except OSError:
                    out[e.name] = ""
        return out

    def _remove(self, name: str) -> None:
        # The containers are gone when their pod leaves the ledger (it was released),
        # so nothing maps the region file any more; remove the whole directory.
        shutil.rmtree(self.root / name, ignore_errors=True)
        self.written.pop(name, None)
        self._texts.pop(name, None)
        self._mig_cache.pop(name, None)
        self.removed += 1

    async def _publish_prepared(self, alloc: LedgerAlloc) -> None:
        if self.bus is None:
            return
        now = time.time()
        for s in pod_slices(alloc):
            msg = AllocPrepared(
                uid=alloc.uid,
                name=alloc.name,
                namespace=alloc.namespace,
                node=self.node,
                container=s.container,
                devices=[self.realised(d) for d in s.grant.devices],
                at=now,
            )
            try:
                # At-least-once: the msg id makes a republish (agent restart) a no-op.
                await self.bus.publish_event(
                    subjects.alloc("prepared", self.node),
                    msg,
                    msg_id=f"prepared:{alloc.uid}:{s.container}",
                )
            except Exception as exc:  # the slice is on disk; the event is informational
                log.warning("%s: prepared event for %s failed: %s", self.node, alloc.uid, exc)
