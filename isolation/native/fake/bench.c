/* Per-call cost of the hot entry points, run once against the fake driver directly and
 * once with libvgpu.so preloaded (see ../bench.sh). Prints "launch alloc_free meminfo" in
 * ns; each figure is the best of several rounds, since other work shares the CPUs. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "cudadefs.h"

CUresult cuInit(unsigned);
CUresult cuDeviceGet(CUdevice *, int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                        void **, void **);

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

#define ROUNDS 15
#define BEST(var, n, ...)                                                                      \
    do {                                                                                        \
        var = 1e30;                                                                             \
        for (int r_ = 0; r_ < ROUNDS; r_++) {                                                   \
            double t0_ = now();                                                                 \
            for (long i_ = 0; i_ < (n); i_++) { __VA_ARGS__; }                                         \
            double per_ = (now() - t0_) / (double)(n);                                          \
            if (per_ < var) var = per_;                                                         \
        }                                                                                       \
    } while (0)

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 200000;
    CUdevice d;
    CUcontext c;
    if (cuInit(0) || cuDeviceGet(&d, 0) || cuDevicePrimaryCtxRetain(&c, d) || cuCtxSetCurrent(c)) {
        fprintf(stderr, "bench: fake driver setup failed\n");
        return 1;
    }
    double launch, alloc, info;
    volatile CUresult sink = 0;
    BEST(launch, n, sink += cuLaunchKernel(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    BEST(alloc, n / 4, {
        CUdeviceptr p;
        sink += cuMemAlloc_v2(&p, 4096);
        sink += cuMemFree_v2(p);
    });
    BEST(info, n, {
        size_t f, t;
        sink += cuMemGetInfo_v2(&f, &t);
    });
    if (sink) {
        fprintf(stderr, "bench: a call failed\n");
        return 1;
    }
    printf("%.1f %.1f %.1f\n", launch, alloc, info);
    return 0;
}
