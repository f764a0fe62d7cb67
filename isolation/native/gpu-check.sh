#!/usr/bin/env bash
# Real-GPU check of libvgpu.so (issue 4, item 9). Needs an NVIDIA GPU, its driver and the
# CUDA toolkit (nvcc). Builds small CUDA programs and prints one JSON object:
#   memory:   each allocation API stops at the limit with CUDA_ERROR_OUT_OF_MEMORY,
#             cuMemGetInfo shows the slice, a PyTorch-style caching pattern (large pooled
#             cudaMalloc segments, cudaMallocAsync) is counted;
#   compute:  SM cap accuracy, one tenant at 50 % and two at 30 % / 70 % (share of the
#             throughput the same kernel gets alone and uncapped);
#   overhead: ns per launch on a launch-bound loop, with and without the preload.
# Usage: isolation/native/gpu-check.sh [seconds per compute run, default 8]
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-8}
command -v nvcc >/dev/null || { echo '{"error": "nvcc not found"}'; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || { echo '{"error": "no NVIDIA GPU"}'; exit 2; }
make -s all >&2
LIB=$PWD/build/libvgpu.so
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

cat >"$T/mem.cu" <<'EOF'
// Allocation APIs against a 2 GiB slice: each fills in 64 MiB pieces until refused.
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>
#include <vector>
#define CHUNK (64ull << 20)
static CUdevice dev;
static int fill(const char *api) {
    std::vector<unsigned long long> h;
    CUresult r = CUDA_SUCCESS;
    int n = 0;
    while (n < 4096) {
        unsigned long long x = 0;
        if (!strcmp(api, "v2")) { CUdeviceptr p; r = cuMemAlloc(&p, CHUNK); x = p; }
        else if (!strcmp(api, "pitch")) { CUdeviceptr p; size_t pitch; r = cuMemAllocPitch(&p, &pitch, 8192 + 1, CHUNK / 16384, 4); x = p; }
        else if (!strcmp(api, "managed")) { CUdeviceptr p; r = cuMemAllocManaged(&p, CHUNK, CU_MEM_ATTACH_GLOBAL); x = p; }
        else if (!strcmp(api, "async")) { CUdeviceptr p; r = cuMemAllocAsync(&p, CHUNK, 0); if (!r) r = cuStreamSynchronize(0); x = p; }
        else if (!strcmp(api, "pool")) {
            static CUmemoryPool pool; if (!pool) cuDeviceGetDefaultMemPool(&pool, dev);
            CUdeviceptr p; r = cuMemAllocFromPoolAsync(&p, CHUNK, pool, 0); if (!r) r = cuStreamSynchronize(0); x = p;
        } else if (!strcmp(api, "create")) {
            CUmemAllocationProp prop; memset(&prop, 0, sizeof prop);
            prop.type = CU_MEM_ALLOCATION_TYPE_PINNED; prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE; prop.location.id = dev;
            CUmemGenericAllocationHandle m; r = cuMemCreate(&m, CHUNK, &prop, 0); x = m;
        } else if (!strcmp(api, "array")) {
            CUDA_ARRAY_DESCRIPTOR d = {8192, CHUNK / 8192 / 4, CU_AD_FORMAT_FLOAT, 1}; CUarray a; r = cuArrayCreate(&a, &d); x = (unsigned long long)a;
        } else if (!strcmp(api, "array3d")) {
            CUDA_ARRAY3D_DESCRIPTOR d = {1024, 1024, CHUNK / (1 << 22), CU_AD_FORMAT_FLOAT, 1, 0}; CUarray a; r = cuArray3DCreate(&a, &d); x = (unsigned long long)a;
        } else if (!strcmp(api, "mipmap")) {
            CUDA_ARRAY3D_DESCRIPTOR d = {4096, CHUNK / 4096 / 4, 0, CU_AD_FORMAT_FLOAT, 1, 0}; CUmipmappedArray a; r = cuMipmappedArrayCreate(&a, &d, 1); x = (unsigned long long)a;
        } else if (!strcmp(api, "torch")) {
            // caching-allocator pattern: 512 MiB segments from cudaMalloc, kept pooled
            void *p; cudaError_t e = cudaMalloc(&p, 8 * CHUNK); r = e == cudaSuccess ? CUDA_SUCCESS : e == cudaErrorMemoryAllocation ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_ERROR_UNKNOWN; x = (unsigned long long)p;
        } else if (!strcmp(api, "torch_async")) {
            void *p; cudaError_t e = cudaMallocAsync(&p, 8 * CHUNK, 0); if (e == cudaSuccess) e = cudaStreamSynchronize(0);
            r = e == cudaSuccess ? CUDA_SUCCESS : e == cudaErrorMemoryAllocation ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_ERROR_UNKNOWN; x = (unsigned long long)p;
        }
        if (r != CUDA_SUCCESS) break;
        h.push_back(x);
        n++;
    }
    size_t fr = 0, tot = 0;
    cuMemGetInfo(&fr, &tot);
    printf("\"%s\": {\"ok\": %d, \"rc\": %d, \"free_at_stop\": %zu},", api, n, (int)r, fr);
    for (auto x : h) {
        if (!strcmp(api, "create")) cuMemRelease(x);
        else if (!strcmp(api, "array") || !strcmp(api, "array3d")) cuArrayDestroy((CUarray)x);
        else if (!strcmp(api, "mipmap")) cuMipmappedArrayDestroy((CUmipmappedArray)x);
        else if (!strcmp(api, "torch")) cudaFree((void *)x);
        else if (!strcmp(api, "torch_async")) cudaFreeAsync((void *)x, 0);
        else if (!strcmp(api, "async") || !strcmp(api, "pool")) cuMemFreeAsync(x, 0);
        else cuMemFree(x);
    }
    cuCtxSynchronize();
    cudaDeviceSynchronize();
    return n;
}
int main() {
    cudaFree(0); // runtime init: primary context through cuGetProcAddress
    CUcontext c; cuCtxGetCurrent(&c); cuCtxGetDevice(&dev);
    size_t fr, tot; cuMemGetInfo(&fr, &tot);
    size_t dtot; cuDeviceTotalMem(&dtot, dev);
    printf("{\"info_total\": %zu, \"info_free\": %zu, \"device_total\": %zu,", tot, fr, dtot);
    const char *apis[] = {"v2", "pitch", "managed", "async", "pool", "create", "array", "array3d", "mipmap", "torch", "torch_async"};
    for (auto a : apis) fill(a);
    printf("\"done\": true}\n");
    return 0;
}
EOF

cat >"$T/burn.cu" <<'EOF'
// Launches a fixed-cost kernel back to back for N seconds; prints kernels per second.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <chrono>
__global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
}
int main(int argc, char **argv) {
    double secs = atof(argv[1]);
    int blocks = 0, sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    blocks = sms * 4;
    auto t0 = std::chrono::steady_clock::now();
    long n = 0, counted = 0;
    double warm = secs * 0.25;
    std::chrono::steady_clock::time_point m0;
    for (;;) {
        spin<<<blocks, 128>>>(200000); // ~0.1 ms per kernel on current parts
        n++;
        if ((n & 63) == 0) {
            cudaStreamSynchronize(0);
            double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (el >= warm && counted == 0) { counted = n; m0 = std::chrono::steady_clock::now(); }
            if (el >= secs) break;
        }
    }
    double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - m0).count();
    printf("%.1f\n", (n - counted) / el);
    return 0;
}
EOF

cat >"$T/launch.cu" <<'EOF'
// Launch-bound loop: empty kernels, ns per launch.
#include <cuda_runtime.h>
#include <stdio.h>
#include <chrono>
__global__ void empty() {}
int main() {
    for (int i = 0; i < 1000; i++) empty<<<1, 1>>>();
    cudaDeviceSynchronize();
    const int N = 200000;
    double best = 1e30;
    for (int r = 0; r < 5; r++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < N; i++) {
            empty<<<1, 1>>>();
            if ((i & 1023) == 0) cudaStreamSynchronize(0); // bound the queue, as a training loop does
        }
        cudaDeviceSynchronize();
        double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / N;
        if (ns < best) best = ns;
    }
    printf("%.1f\n", best);
    return 0;
}
EOF

# -lcuda: the toolkit's stub if present, else the installed driver itself
NVCC_DIR=$(dirname "$(readlink -f "$(command -v nvcc)")")
LDIRS=()
for d in "$NVCC_DIR/../lib64/stubs" "$NVCC_DIR/../targets/$(uname -m)-linux/lib/stubs"; do
    [ -d "$d" ] && LDIRS+=("-L$d")
done
real=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
if [ -n "$real" ]; then ln -s "$real" "$T/libcuda.so"; LDIRS+=("-L$T"); fi
nvcc -O2 -o "$T/mem" "$T/mem.cu" "${LDIRS[@]}" -lcuda >&2
nvcc -O2 -o "$T/burn" "$T/burn.cu" >&2
nvcc -O2 -o "$T/launch" "$T/launch.cu" >&2

limited() { # container-name, then env assignments, then the command
    local c=$1; shift
    env LD_PRELOAD="$LIB" HAMI_SLICE_FILE= CUDA_DEVICE_MEMORY_SHARED_CACHE="$T/$c.region" "$@"
}

MEM=$(limited m CUDA_DEVICE_MEMORY_LIMIT=2g "$T/mem")

ALONE=$("$T/burn" "$SECS")
CAP50=$(limited a CUDA_DEVICE_SM_LIMIT=50 GPU_CORE_UTILIZATION_POLICY=force "$T/burn" "$SECS")
limited b CUDA_DEVICE_SM_LIMIT=30 "$T/burn" "$SECS" >"$T/b30" &
limited c CUDA_DEVICE_SM_LIMIT=70 "$T/burn" "$SECS" >"$T/c70" &
wait
CAP30=$(cat "$T/b30")
CAP70=$(cat "$T/c70")

L_BASE=$("$T/launch")
L_HOOK=$(limited l CUDA_DEVICE_MEMORY_LIMIT=8g "$T/launch")

awk -v mem="$MEM" -v alone="$ALONE" -v c50="$CAP50" -v c30="$CAP30" -v c70="$CAP70" \
    -v lb="$L_BASE" -v lh="$L_HOOK" -v gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" 'BEGIN {
  p50 = 100 * c50 / alone; p30 = 100 * c30 / alone; p70 = 100 * c70 / alone;
  printf "{\"gpu\": \"%s\", \"memory\": %s, ", gpu, mem;
  printf "\"compute\": {\"alone_kernels_per_s\": %s, \"cap50_pct\": %.1f, \"cap30_pct\": %.1f, \"cap70_pct\": %.1f, ", alone, p50, p30, p70;
  ok = (p50 >= 45 && p50 <= 55 && p30 >= 25 && p30 <= 35 && p70 >= 65 && p70 <= 75) ? "true" : "false";
  printf "\"within_5_points\": %s}, ", ok;
  printf "\"overhead\": {\"launch_ns_no_preload\": %s, \"launch_ns_preload\": %s, \"added_ns\": %.1f}}\n", lb, lh, lh - lb }'
