"""Real NVIDIA cards through NVML (pynvml, from the nvidia-ml-py package).

:func:`available` is how ``hami up`` chooses between this and the simulator: NVML must
load and report at least one card.

Cards in MIG mode register ``mode: mig`` with the profiles NVML reports for them (memory,
slice count, compute share, possible placements); registration keeps those
``node.migProfileAllowlist`` allows for the model. :meth:`NvmlBackend.create_mig`
creates the GPU instance at exactly the placement placement chose (never another) and
its compute instance, :meth:`NvmlBackend.destroy_mig` destroys both, as HAMi's device
plugin does. ``NvmlBackend(nv=...)`` takes any object with pynvml's functions and
constants (the tests pass a fake card set).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

from services.nodeagent.backends import Discovery, MigError, MigInstance, PhysicalCard
from services.nodeagent.backends.sim import (
    CROSS_CPU,
    HOST_BRIDGE,
    MULTI_SWITCH,
    NVLINK_LANE,
    SAME_BOARD,
    SAME_CPU,
    SINGLE_SWITCH,
)
from shared.hami.mig import MIG_MODE
from shared.schemas import ContainerUsage, DeviceUsage, MigPlacement, MigProfile

log = logging.getLogger("hami.nodeagent.nvml")

# The whole-slice GPU-instance profiles HAMi creates, by the "<n>g" of a profile name,
# with the compute-instance profile filling the GPU instance.
_SLICES = ("1", "2", "3", "4", "6", "7", "8")
_MAX_PLACEMENTS = 16


def _nvml() -> Any:
    import pynvml

    return pynvml


def available() -> bool:
    try:
        nv = _nvml()
        nv.nvmlInit()
        try:
            return int(nv.nvmlDeviceGetCount()) > 0
        finally:
            nv.nvmlShutdown()
    except Exception:
        return False


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _not_found(nv: Any, exc: Exception) -> bool:
    return getattr(exc, "value", None) == getattr(nv, "NVML_ERROR_NOT_FOUND", object())


class NvmlBackend:
    name = "nvml"

    def __init__(self, nv: Any = None) -> None:
        self.nv = nv if nv is not None else _nvml()
        self.nv.nvmlInit()
        self._profile_names: dict[tuple[str, int], str] = {}  # (GPU UUID, GI profile id) -> name

    def _level_score(self, h1: Any, h2: Any) -> int:
        nv = self.nv
        try:
            level = nv.nvmlDeviceGetTopologyCommonAncestor(h1, h2)
        except Exception:
            return CROSS_CPU
        return {
            nv.NVML_TOPOLOGY_INTERNAL: SAME_BOARD,
            nv.NVML_TOPOLOGY_SINGLE: SINGLE_SWITCH,
            nv.NVML_TOPOLOGY_MULTIPLE: MULTI_SWITCH,
            nv.NVML_TOPOLOGY_HOSTBRIDGE: HOST_BRIDGE,
            nv.NVML_TOPOLOGY_NODE: SAME_CPU,
            nv.NVML_TOPOLOGY_SYSTEM: CROSS_CPU,
        }.get(level, CROSS_CPU)

    def _nvlink_lanes(self, h: Any, peer_bus: str) -> int:
        nv = self.nv
        lanes = 0
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                    continue
                pci = nv.nvmlDeviceGetNvLinkRemotePciInfo_v2(h, link)
                if _text(pci.busId).lower() == peer_bus:
                    lanes += 1
            except Exception:
                break
        return lanes

    def discover(self) -> Discovery:
        nv = self.nv
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
        cards: list[PhysicalCard] = []
        buses: list[str] = []
        for i, h in enumerate(handles):
            try:
                numa = int(nv.nvmlDeviceGetNumaNodeId(h))
            except Exception:
                numa = 0
            mode = "hami-core"
            try:
                current, _pending = nv.nvmlDeviceGetMigMode(h)
                if current == nv.NVML_DEVICE_MIG_ENABLE:
                    mode = "mig"
            except Exception:
                pass
            healthy = True
            try:
                nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            except Exception:
                healthy = False
            name = _text(nv.nvmlDeviceGetName(h)).replace("NVIDIA ", "").replace(" ", "-")
            uuid = _text(nv.nvmlDeviceGetUUID(h))
            cards.append(
                PhysicalCard(
                    uuid=uuid,
                    index=i,
                    model=name,
                    memory_mib=int(nv.nvmlDeviceGetMemoryInfo(h).total // (1024 * 1024)),
                    numa=max(numa, 0),
                    mode=mode,
                    healthy=healthy,
                    mig_profiles=tuple(self.mig_profiles(h, uuid, name)) if mode == MIG_MODE else (),
                )
            )
            buses.append(_text(nv.nvmlDeviceGetPciInfo(h).busId).lower())
        n = len(handles)
        links = [[0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j:
                    lanes = self._nvlink_lanes(handles[i], buses[j])
                    score = self._level_score(handles[i], handles[j])
                    links[i][j] = score + NVLINK_LANE * lanes
        return Discovery(cards=cards, links=links)

    def usage(self, containers: Sequence[ContainerUsage]) -> list[DeviceUsage]:
        """The cards' own figures (memory used, GPU utilisation over NVML's last sample
        period); the slices' reports are not needed here. A card NVML cannot read is left
        out of this sample."""
        nv = self.nv
        out: list[DeviceUsage] = []
        for i in range(nv.nvmlDeviceGetCount()):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                used = int(nv.nvmlDeviceGetMemoryInfo(h).used) // (1024 * 1024)
                try:
                    util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu) / 100.0
                except Exception:  # not supported on this card (some MIG modes)
                    util = 0.0
                out.append(DeviceUsage(uuid=_text(nv.nvmlDeviceGetUUID(h)), memory_used_mib=used,
                                       utilization=util))
            except Exception as exc:
                log.debug("nvml usage of card %d: %s", i, exc)
        return out

    # ------------------------------------------------------------------------- MIG

    def _gi_profiles(self, h: Any) -> list[tuple[str, Any]]:
        """(slice key, NVML profile info) of every whole-slice GPU-instance profile the
        card supports."""
        nv = self.nv
        out: list[tuple[str, Any]] = []
        for n in _SLICES:
            enum = getattr(nv, f"NVML_GPU_INSTANCE_PROFILE_{n}_SLICE", None)
            if enum is None:
                continue
            try:
                info = nv.nvmlDeviceGetGpuInstanceProfileInfo(h, enum)
            except Exception:
                continue  # not supported on this card
            if int(info.instanceCount) > 0:
                out.append((n, info))
        return out

    def _placements(self, h: Any, profile_id: int) -> list[MigPlacement]:
        nv = self.nv
        arr = (nv.c_nvmlGpuInstancePlacement_t * _MAX_PLACEMENTS)()
        count = ctypes.c_uint(_MAX_PLACEMENTS)
        nv.nvmlDeviceGetGpuInstancePossiblePlacements(h, profile_id, arr, ctypes.byref(count))
        return [MigPlacement(start=int(arr[k].start), size=int(arr[k].size)) for k in range(int(count.value))]

    def mig_profiles(self, h: Any, uuid: str, model: str) -> list[MigProfile]:
        """The MIG profiles of one card: each whole-slice profile with its memory, slice
        count, compute share (its SMs over the largest profile's, in percent) and NVML's
        possible placements (registration keeps those the allowlist allows)."""
        found = self._gi_profiles(h)
        if not found:
            return []
        full_sm = max(int(info.multiprocessorCount) for _, info in found) or 1
        out: list[MigProfile] = []
        for n, info in found:
            raw = _text(getattr(info, "name", b"") or b"").removeprefix("MIG ").strip()
            name = raw or f"{n}g.{round(int(info.memorySizeMB) / 1024)}gb"
            try:
                placements = self._placements(h, int(info.id))
            except Exception as exc:
                log.warning("%s: placements of MIG profile %s: %s", uuid, name, exc)
                continue
            self._profile_names[(uuid, int(info.id))] = name
            out.append(
                MigProfile(
                    name=name,
                    memory_mb=int(info.memorySizeMB),
                    core=round(100 * int(info.multiprocessorCount) / full_sm),
                    slice_count=int(info.sliceCount),
                    placements=placements,
                )
            )
        return out

    def _handle(self, gpu_uuid: str) -> Any:
        try:
            return self.nv.nvmlDeviceGetHandleByUUID(gpu_uuid)
        except Exception as exc:
            raise MigError(f"no GPU {gpu_uuid}: {exc}") from exc

    def _mig_uuid(self, h: Any, gi_id: int) -> str:
        nv = self.nv
        for k in range(int(nv.nvmlDeviceGetMaxMigDeviceCount(h))):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
            except Exception:
                continue  # no MIG device at this index
            if int(nv.nvmlDeviceGetGpuInstanceId(mh)) == gi_id:
                return _text(nv.nvmlDeviceGetUUID(mh))
        raise MigError(f"no MIG device for GPU instance {gi_id}")

    def create_mig(self, gpu_uuid: str, profile: str, start: int, size: int) -> MigInstance:
        """Create the GPU instance of ``profile`` at exactly ``start``/``size`` and a
        compute instance spanning it; on any failure, destroy what this call created."""
        nv = self.nv
        h = self._handle(gpu_uuid)
        key = profile.split(".", 1)[0].removesuffix("g")
        gi_enum = getattr(nv, f"NVML_GPU_INSTANCE_PROFILE_{key}_SLICE", None)
        ci_enum = getattr(nv, f"NVML_COMPUTE_INSTANCE_PROFILE_{key}_SLICE", None)
        if gi_enum is None or ci_enum is None:
            raise MigError(f"unsupported MIG profile {profile!r}")
        try:
            info = nv.nvmlDeviceGetGpuInstanceProfileInfo(h, gi_enum)
            possible = self._placements(h, int(info.id))
        except Exception as exc:
            raise MigError(f"{gpu_uuid}: MIG profile {profile}: {exc}") from exc
        if MigPlacement(start=start, size=size) not in possible:
            # Another placement would break placement's accounting: never improvise one.
            raise MigError(f"{gpu_uuid}: placement {start}/{size} is not valid for {profile}")
        want = nv.c_nvmlGpuInstancePlacement_t()
        want.start, want.size = start, size
        try:
            gi = nv.nvmlDeviceCreateGpuInstanceWithPlacement(h, int(info.id), ctypes.byref(want))
        except Exception as exc:
            raise MigError(f"{gpu_uuid}: create GPU instance {profile} at {start}/{size}: {exc}") from exc
        ci = None
        try:
            gi_id = int(nv.nvmlGpuInstanceGetInfo(gi).id)
            ci_info = nv.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, ci_enum, nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
            )
            ci = nv.nvmlGpuInstanceCreateComputeInstance(gi, int(ci_info.id))
            ci_id = int(nv.nvmlComputeInstanceGetInfo(ci).id)
            mig_uuid = self._mig_uuid(h, gi_id)
        except Exception as exc:
            for undo, obj in ((nv.nvmlComputeInstanceDestroy, ci), (nv.nvmlGpuInstanceDestroy, gi)):
                if obj is not None:
                    try:
                        undo(obj)
                    except Exception as again:
                        log.error("%s: rollback of MIG %s failed: %s", gpu_uuid, profile, again)
            raise MigError(f"{gpu_uuid}: create compute instance of {profile}: {exc}") from exc
        self._profile_names[(gpu_uuid, int(info.id))] = profile
        return MigInstance(gpu_uuid=gpu_uuid, profile=profile, start=start, size=size, uuid=mig_uuid,
                           gpu_instance=gi_id, compute_instance=ci_id)  # fmt: skip

    def destroy_mig(self, inst: MigInstance) -> None:
        """Destroy the compute and GPU instance of ``inst``; gone already is fine."""
        nv = self.nv
        h = self._handle(inst.gpu_uuid)
        try:
            gi = nv.nvmlDeviceGetGpuInstanceById(h, inst.gpu_instance)
        except Exception as exc:
            if _not_found(nv, exc):
                return
            raise MigError(f"{inst.gpu_uuid}: GPU instance {inst.gpu_instance}: {exc}") from exc
        try:
            ci = nv.nvmlGpuInstanceGetComputeInstanceById(gi, inst.compute_instance)
            nv.nvmlComputeInstanceDestroy(ci)
        except Exception as exc:
            if not _not_found(nv, exc):
                raise MigError(f"{inst.gpu_uuid}: destroy compute instance {inst.compute_instance}: {exc}") from exc
        try:
            nv.nvmlGpuInstanceDestroy(gi)
        except Exception as exc:
            if not _not_found(nv, exc):
                raise MigError(f"{inst.gpu_uuid}: destroy GPU instance {inst.gpu_instance}: {exc}") from exc

    def mig_instances(self, gpu_uuid: str) -> list[MigInstance]:
        """The live MIG instances of a card (for adoption after an agent restart)."""
        nv = self.nv
        h = self._handle(gpu_uuid)
        out: list[MigInstance] = []
        try:
            n = int(nv.nvmlDeviceGetMaxMigDeviceCount(h))
        except Exception:
            return out  # not a MIG card
        for k in range(n):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
                gi_id = int(nv.nvmlDeviceGetGpuInstanceId(mh))
                ci_id = int(nv.nvmlDeviceGetComputeInstanceId(mh))
                info = nv.nvmlGpuInstanceGetInfo(nv.nvmlDeviceGetGpuInstanceById(h, gi_id))
            except Exception:
                continue
            name = self._profile_names.get((gpu_uuid, int(info.profileId)), "")
            out.append(MigInstance(gpu_uuid=gpu_uuid, profile=name, start=int(info.placement.start),
                                   size=int(info.placement.size), uuid=_text(nv.nvmlDeviceGetUUID(mh)),
                                   gpu_instance=gi_id, compute_instance=ci_id))  # fmt: skip
        return out
