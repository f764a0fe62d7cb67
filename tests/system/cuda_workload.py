"""A tiny CUDA workload for ``hami run`` tests: python + ctypes on the driver API.

    python cuda_workload.py MIB [GATE [CODE]]

Creates the primary context of device 0, allocates MIB MiB and prints ``alloc <rc>``
(0 = CUDA_SUCCESS, 2 = CUDA_ERROR_OUT_OF_MEMORY), then ``info <free> <total>`` as
cuMemGetInfo reports them, so a test sees the limiter's view. It then waits until the
file GATE exists (none: forever, to be killed), writes one line to stdout and one to
stderr, and exits with CODE. The fake driver's tests load it the same way as a real
program would load libcuda.so.1; the preloaded limiter hooks its lookups.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time


def main() -> int:
    mib = int(sys.argv[1])
    gate = sys.argv[2] if len(sys.argv) > 2 else ""
    code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    cuda = ctypes.CDLL("libcuda.so.1")
    dev = ctypes.c_int()
    ctx = ctypes.c_void_p()
    ptr = ctypes.c_uint64()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert cuda.cuInit(0) == 0
    assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
    assert cuda.cuCtxSetCurrent(ctx) == 0
    rc = cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20))
    cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
    print(f"alloc {rc}", flush=True)
    print(f"info {free.value} {total.value}", flush=True)
    while not (gate and os.path.exists(gate)):
        time.sleep(0.05)
    print("workload done", flush=True)
    print("workload says bye", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
