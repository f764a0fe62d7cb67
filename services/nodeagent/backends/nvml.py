"""Real NVIDIA cards through NVML (pynvml, from the nvidia-ml-py package).

:func:`available` is how ``hami up`` chooses between this and the simulator: NVML must
load and report at least one card.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from services.nodeagent.backends import Discovery, PhysicalCard
from services.nodeagent.backends.sim import (
    CROSS_CPU,
    HOST_BRIDGE,
    MULTI_SWITCH,
    NVLINK_LANE,
    SAME_BOARD,
    SAME_CPU,
    SINGLE_SWITCH,
)
from shared.schemas import ContainerUsage, DeviceUsage

log = logging.getLogger("hami.nodeagent.nvml")


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


class NvmlBackend:
    name = "nvml"

    def __init__(self) -> None:
        self.nv = _nvml()
        self.nv.nvmlInit()

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
            cards.append(
                PhysicalCard(
                    uuid=_text(nv.nvmlDeviceGetUUID(h)),
                    index=i,
                    model=name,
                    memory_mib=int(nv.nvmlDeviceGetMemoryInfo(h).total // (1024 * 1024)),
                    numa=max(numa, 0),
                    mode=mode,
                    healthy=healthy,
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
