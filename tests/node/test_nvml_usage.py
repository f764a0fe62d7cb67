"""The NVML backend's host rows (HAMi's hami_host_* series) from pynvml's calls.

NvmlBackend takes any object with pynvml's functions; this one stands for three cards:
one busy, one whose utilisation NVML does not support (reported as 0), one whose memory
cannot be read (left out of the sample rather than reported as empty).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.nodeagent.backends.nvml import NvmlBackend

MIB = 1 << 20


class Nvml:
    def __init__(self) -> None:
        self.used = {0: 5000 * MIB, 1: 0}

    def nvmlInit(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 3

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-{h}".encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        if h not in self.used:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return SimpleNamespace(total=80 * 1024 * MIB, used=self.used[h], free=0)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        if h == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(gpu=63, memory=20)


def test_usage_rows() -> None:
    rows = NvmlBackend(nv=Nvml()).usage([])
    assert [(r.uuid, r.memory_used_mib, r.utilization) for r in rows] == [
        ("GPU-0", 5000, 0.63),
        ("GPU-1", 0, 0.0),
    ]
