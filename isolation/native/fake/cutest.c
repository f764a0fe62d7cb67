/* Test driver for the limiter: runs a sequence of CUDA operations given on the command line
 * and prints one result line per operation, for tests/native to assert on.
 *
 *   via link|dlsym|getproc|getproc2|ptsz   how entry points are found (first argument)
 *   init | ctx D | ctxnew D | ctxnew3 D | ctxnew4 D | ctxdestroy | reset D
 *   alloc API SIZE      API: v2 pitch managed async pool create array array3d mipmap
 *   fill API CHUNK      allocate until refused: "fill API <n ok> <rc of refusal>"
 *   freeall | info | total D | nvml I | sleep MS | hold | exit CODE
 *   launch KIND MS GRID WARM_MS   KIND: kernel ex coop graph; prints own utilisation
 *   lockregion PATH     take the region's lock and hold it (to be SIGKILLed by a test)
 *   fork OPS... endfork the child runs OPS and exits; the parent waits, prints
 *                       "child <exit status>" and goes on after endfork
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cudadefs.h"
#include "fake_state.h"
#include "region.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>

CUresult cuInit(unsigned);
CUresult cuGetProcAddress(const char *, void **, int, cuuint64_t);
CUresult cuGetProcAddress_v2(const char *, void **, int, cuuint64_t, int *);

typedef struct {
    CUresult (*Init)(unsigned);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*PrimaryRetain)(CUcontext *, CUdevice);
    CUresult (*PrimaryRelease)(CUdevice);
    CUresult (*PrimaryReset)(CUdevice);
    CUresult (*CtxCreate)(CUcontext *, unsigned, CUdevice);
    CUresult (*CtxCreate3)(CUcontext *, void *, int, unsigned, CUdevice);
    CUresult (*CtxCreate4)(CUcontext *, void *, unsigned, CUdevice);
    CUresult (*CtxDestroy)(CUcontext);
    CUresult (*CtxSetCurrent)(CUcontext);
    CUresult (*MemAlloc)(CUdeviceptr *, size_t);
    CUresult (*MemFree)(CUdeviceptr);
    CUresult (*MemAllocPitch)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
    CUresult (*MemAllocManaged)(CUdeviceptr *, size_t, unsigned);
    CUresult (*MemAllocAsync)(CUdeviceptr *, size_t, CUstream);
    CUresult (*MemAllocFromPoolAsync)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    CUresult (*MemFreeAsync)(CUdeviceptr, CUstream);
    CUresult (*MemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
    CUresult (*MemRelease)(CUmemGenericAllocationHandle);
    CUresult (*ArrayCreate)(CUarray *, const CUDA_ARRAY_DESCRIPTOR *);
    CUresult (*Array3DCreate)(CUarray *, const CUDA_ARRAY3D_DESCRIPTOR *);
    CUresult (*ArrayDestroy)(CUarray);
    CUresult (*MipmapCreate)(CUmipmappedArray *, const CUDA_ARRAY3D_DESCRIPTOR *, unsigned);
    CUresult (*MipmapDestroy)(CUmipmappedArray);
    CUresult (*MemGetInfo)(size_t *, size_t *);
    CUresult (*DeviceTotalMem)(size_t *, CUdevice);
    CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void **, void **);
    CUresult (*LaunchKernelEx)(const CUlaunchConfig *, CUfunction, void **, void **);
    CUresult (*LaunchCoop)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           CUstream, void **);
    CUresult (*GraphLaunch)(CUgraphExec, CUstream);
    CUresult (*CtxSynchronize)(void);
    CUresult (*MemAllocV1)(unsigned int *, unsigned int);
    CUresult (*MemFreeV1)(unsigned int);
    CUresult (*MemAllocPitchV1)(unsigned int *, unsigned int *, unsigned int, unsigned int, unsigned int);
    CUresult (*MemGetInfoV1)(unsigned int *, unsigned int *);
    CUresult (*CtxCreateV1)(CUcontext *, unsigned, CUdevice);
    nvmlReturn_t (*NvmlInit)(void);
    nvmlReturn_t (*NvmlHandle)(unsigned, nvmlDevice_t *);
    nvmlReturn_t (*NvmlMem)(nvmlDevice_t, nvmlMemory_t *);
    nvmlReturn_t (*NvmlMem2)(nvmlDevice_t, nvmlMemory_v2_t *);
} api_t;

static api_t A;

/* base name for cuGetProcAddress, versioned name for dlsym */
static const struct {
    const char *base, *sym;
    size_t off;
} names[] = {
#define N(f, b, s) {b, s, offsetof(api_t, f)}
    N(Init, "cuInit", "cuInit"), N(DeviceGet, "cuDeviceGet", "cuDeviceGet"),
    N(PrimaryRetain, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain"),
    N(PrimaryRelease, "cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2"),
    N(PrimaryReset, "cuDevicePrimaryCtxReset", "cuDevicePrimaryCtxReset_v2"),
    N(CtxCreate, "cuCtxCreate", "cuCtxCreate_v2"), N(CtxCreate3, "cuCtxCreate_v3", "cuCtxCreate_v3"),
    N(CtxCreate4, "cuCtxCreate_v4", "cuCtxCreate_v4"), N(CtxDestroy, "cuCtxDestroy", "cuCtxDestroy_v2"),
    N(CtxSetCurrent, "cuCtxSetCurrent", "cuCtxSetCurrent"), N(MemAlloc, "cuMemAlloc", "cuMemAlloc_v2"),
    N(MemFree, "cuMemFree", "cuMemFree_v2"), N(MemAllocPitch, "cuMemAllocPitch", "cuMemAllocPitch_v2"),
    N(MemAllocManaged, "cuMemAllocManaged", "cuMemAllocManaged"),
    N(MemAllocAsync, "cuMemAllocAsync", "cuMemAllocAsync"),
    N(MemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync"),
    N(MemFreeAsync, "cuMemFreeAsync", "cuMemFreeAsync"), N(MemCreate, "cuMemCreate", "cuMemCreate"),
    N(MemRelease, "cuMemRelease", "cuMemRelease"), N(ArrayCreate, "cuArrayCreate", "cuArrayCreate_v2"),
    N(Array3DCreate, "cuArray3DCreate", "cuArray3DCreate_v2"), N(ArrayDestroy, "cuArrayDestroy", "cuArrayDestroy"),
    N(MipmapCreate, "cuMipmappedArrayCreate", "cuMipmappedArrayCreate"),
    N(MipmapDestroy, "cuMipmappedArrayDestroy", "cuMipmappedArrayDestroy"),
    N(MemGetInfo, "cuMemGetInfo", "cuMemGetInfo_v2"), N(DeviceTotalMem, "cuDeviceTotalMem", "cuDeviceTotalMem_v2"),
    N(LaunchKernel, "cuLaunchKernel", "cuLaunchKernel"), N(LaunchKernelEx, "cuLaunchKernelEx", "cuLaunchKernelEx"),
    N(LaunchCoop, "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel"),
    N(GraphLaunch, "cuGraphLaunch", "cuGraphLaunch"), N(CtxSynchronize, "cuCtxSynchronize", "cuCtxSynchronize"),
#undef N
};

/* the legacy 32-bit ABI: exact names, or cuGetProcAddress with a pre-3.2 version */
static const struct {
    const char *sym;
    size_t off;
} names_v1[] = {
    {"cuMemAlloc", offsetof(api_t, MemAllocV1)}, {"cuMemFree", offsetof(api_t, MemFreeV1)},
    {"cuMemAllocPitch", offsetof(api_t, MemAllocPitchV1)}, {"cuMemGetInfo", offsetof(api_t, MemGetInfoV1)},
    {"cuCtxCreate", offsetof(api_t, CtxCreateV1)},
};

static void resolve(const char *mode) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    void *hn = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!h || !hn) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        exit(3);
    }
    CUresult (*gpa)(const char *, void **, int, cuuint64_t) = NULL;
    CUresult (*gpa2)(const char *, void **, int, cuuint64_t, int *) = NULL;
    int link = !strcmp(mode, "link");
    if (link) {
        gpa = cuGetProcAddress;
        gpa2 = cuGetProcAddress_v2;
    } else {
        gpa = (CUresult(*)(const char *, void **, int, cuuint64_t))dlsym(h, "cuGetProcAddress");
        gpa2 = (CUresult(*)(const char *, void **, int, cuuint64_t, int *))dlsym(h, "cuGetProcAddress_v2");
    }
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *f = NULL;
        if (link || !strcmp(mode, "dlsym")) {
            /* "link": the executable's own references, bound by the dynamic linker (the
             * test binary links the fake libcuda, so preloading decides who answers). */
            f = dlsym(link ? RTLD_DEFAULT : h, names[i].sym);
        } else if (!strcmp(mode, "getproc")) {
            gpa(names[i].base, &f, 12040, 0);
        } else if (!strcmp(mode, "getproc2")) {
            int st;
            gpa2(names[i].base, &f, 12040, 0, &st);
        } else if (!strcmp(mode, "ptsz")) {
            int st;
            gpa2(names[i].base, &f, 12040, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM, &st);
        }
        *(void **)((char *)&A + names[i].off) = f;
    }
    for (size_t i = 0; i < sizeof names_v1 / sizeof names_v1[0]; i++) {
        void *f = NULL;
        if (link || !strcmp(mode, "dlsym")) f = dlsym(link ? RTLD_DEFAULT : h, names_v1[i].sym);
        else if (!strcmp(mode, "getproc")) gpa(names_v1[i].sym, &f, 3010, 0);
        else {
            int st;
            gpa2(names_v1[i].sym, &f, 3010, 0, &st);
        }
        *(void **)((char *)&A + names_v1[i].off) = f;
    }
    A.NvmlInit = (nvmlReturn_t(*)(void))dlsym(hn, "nvmlInit_v2");
    A.NvmlHandle = (nvmlReturn_t(*)(unsigned, nvmlDevice_t *))dlsym(hn, "nvmlDeviceGetHandleByIndex_v2");
    A.NvmlMem = (nvmlReturn_t(*)(nvmlDevice_t, nvmlMemory_t *))dlsym(hn, "nvmlDeviceGetMemoryInfo");
    A.NvmlMem2 = (nvmlReturn_t(*)(nvmlDevice_t, nvmlMemory_v2_t *))dlsym(hn, "nvmlDeviceGetMemoryInfo_v2");
}

typedef struct {
    int api;
    uint64_t h;
} held_t;
static held_t held[65536];
static int nheld;
static CUcontext last_ctx;

enum { A_V2, A_PITCH, A_MANAGED, A_ASYNC, A_POOL, A_CREATE, A_ARRAY, A_ARRAY3D, A_MIPMAP, A_V1, A_PITCH_V1, A_N };
static const char *api_names[] = {"v2",     "pitch",   "managed", "async", "pool",    "create",
                                  "array",  "array3d", "mipmap",  "v1",    "pitch_v1"};

static int api_of(const char *s) {
    for (int i = 0; i < A_N; i++)
        if (!strcmp(s, api_names[i])) return i;
    fprintf(stderr, "unknown api %s\n", s);
    exit(2);
}

static CUdevice cur_dev;

/* SIZE bytes through the API; arrays use 1-byte single-channel elements of that many. */
static CUresult do_alloc(int api, uint64_t size) {
    CUdeviceptr p = 0;
    CUresult r;
    uint64_t h = 0;
    switch (api) {
    case A_V2: r = A.MemAlloc(&p, size); h = p; break;
    case A_PITCH: {
        size_t pitch;
        /* width just over a pitch boundary: the pitch (not the width) must be charged */
        r = A.MemAllocPitch(&p, &pitch, 513, size / 1024 ? size / 1024 : 1, 4);
        h = p;
        break;
    }
    case A_MANAGED: r = A.MemAllocManaged(&p, size, 1); h = p; break;
    case A_V1: {
        unsigned int p1 = 0;
        r = A.MemAllocV1(&p1, (unsigned int)size);
        h = p1;
        break;
    }
    case A_PITCH_V1: {
        unsigned int p1 = 0, pitch;
        r = A.MemAllocPitchV1(&p1, &pitch, 513, size / 1024 ? (unsigned)(size / 1024) : 1, 4);
        h = p1;
        break;
    }
    case A_ASYNC: r = A.MemAllocAsync(&p, size, NULL); h = p; break;
    case A_POOL: r = A.MemAllocFromPoolAsync(&p, size, (CUmemoryPool)0x1, NULL); h = p; break;
    case A_CREATE: {
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = 1;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = cur_dev;
        CUmemGenericAllocationHandle mh = 0;
        r = A.MemCreate(&mh, size, &prop, 0);
        h = mh;
        break;
    }
    case A_ARRAY: {
        CUDA_ARRAY_DESCRIPTOR d = {size / 1024 ? 1024 : size, size / 1024 ? size / 1024 : 1, CU_AD_FORMAT_UNSIGNED_INT8, 1};
        CUarray a = NULL;
        r = A.ArrayCreate(&a, &d);
        h = (uint64_t)(uintptr_t)a;
        break;
    }
    case A_ARRAY3D: {
        CUDA_ARRAY3D_DESCRIPTOR d = {256, 4, size / 1024 ? size / 1024 : 1, CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
        CUarray a = NULL;
        r = A.Array3DCreate(&a, &d);
        h = (uint64_t)(uintptr_t)a;
        break;
    }
    default: {
        /* one level of size bytes: levels=1 keeps the arithmetic obvious for the tests */
        CUDA_ARRAY3D_DESCRIPTOR d = {1024, size / 1024 ? size / 1024 : 1, 0, CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
        CUmipmappedArray a = NULL;
        r = A.MipmapCreate(&a, &d, 1);
        h = (uint64_t)(uintptr_t)a;
        break;
    }
    }
    if (r == CUDA_SUCCESS && nheld < 65536) held[nheld++] = (held_t){api, h};
    return r;
}

static CUresult do_free(held_t *x) {
    switch (x->api) {
    case A_CREATE: return A.MemRelease(x->h);
    case A_ARRAY:
    case A_ARRAY3D: return A.ArrayDestroy((CUarray)(uintptr_t)x->h);
    case A_MIPMAP: return A.MipmapDestroy((CUmipmappedArray)(uintptr_t)x->h);
    case A_ASYNC:
    case A_POOL: return A.MemFreeAsync(x->h, NULL);
    case A_V1:
    case A_PITCH_V1: return A.MemFreeV1((unsigned int)x->h);
    default: return A.MemFree(x->h);
    }
}

static uint64_t parse_sz(const char *s) {
    char *e;
    uint64_t v = strtoull(s, &e, 10);
    switch (*e) {
    case 'k': return v << 10;
    case 'm': return v << 20;
    case 'g': return v << 30;
    default: return v;
    }
}

static void launch_loop(const char *kind, long ms, unsigned grid, long warm) {
    int64_t t0 = fakegpu_now(), end = t0 + ms * 1000000ll, m0 = t0 + warm * 1000000ll;
    long n = 0;
    CUlaunchConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDimX = grid;
    cfg.gridDimY = cfg.gridDimZ = cfg.blockDimX = cfg.blockDimY = cfg.blockDimZ = 1;
    CUresult r = CUDA_SUCCESS;
    while (fakegpu_now() < end && r == CUDA_SUCCESS) {
        if (!strcmp(kind, "kernel")) r = A.LaunchKernel(NULL, grid, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
        else if (!strcmp(kind, "ex")) r = A.LaunchKernelEx(&cfg, NULL, NULL, NULL);
        else if (!strcmp(kind, "coop")) r = A.LaunchCoop(NULL, grid, 1, 1, 1, 1, 1, 0, NULL, NULL);
        else r = A.GraphLaunch((CUgraphExec)0x1, NULL);
        n++;
    }
    A.CtxSynchronize();
    /* own device time over the measured part of the run */
    int64_t t1 = fakegpu_now();
    int64_t a = m0 / FK_BUCKET_NS * FK_BUCKET_NS + FK_BUCKET_NS, b = t1 / FK_BUCKET_NS * FK_BUCKET_NS;
    int64_t busy = fakegpu_busy(0, getpid(), a, b);
    printf("launch %s rc=%d n=%ld util=%.1f\n", kind, r, n, b > a ? 100.0 * (double)busy / (double)(b - a) : -1.0);
}

int main(int argc, char **argv) {
    int i = 1;
    const char *mode = "link";
    if (argc > 2 && !strcmp(argv[1], "via")) {
        mode = argv[2];
        i = 3;
    }
    resolve(mode);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (; i < argc; i++) {
        const char *op = argv[i];
        if (!strcmp(op, "init")) {
            printf("init %d\n", A.Init(0));
        } else if (!strcmp(op, "ctx")) {
            CUdevice d;
            A.DeviceGet(&d, atoi(argv[++i]));
            CUcontext c = NULL;
            CUresult r = A.PrimaryRetain(&c, d);
            if (r == CUDA_SUCCESS) A.CtxSetCurrent(c);
            cur_dev = d;
            printf("ctx %d %d\n", d, r);
        } else if (!strncmp(op, "ctxnew", 6)) {
            CUdevice d;
            A.DeviceGet(&d, atoi(argv[++i]));
            CUresult r;
            if (!strcmp(op, "ctxnew3")) r = A.CtxCreate3(&last_ctx, NULL, 0, 0, d);
            else if (!strcmp(op, "ctxnew4")) r = A.CtxCreate4(&last_ctx, NULL, 0, d);
            else if (!strcmp(op, "ctxnew1")) r = A.CtxCreateV1(&last_ctx, 0, d);
            else r = A.CtxCreate(&last_ctx, 0, d);
            if (r == CUDA_SUCCESS) A.CtxSetCurrent(last_ctx);
            cur_dev = d;
            printf("%s %d %d\n", op, d, r);
        } else if (!strcmp(op, "ctxdestroy")) {
            printf("ctxdestroy %d\n", A.CtxDestroy(last_ctx));
            last_ctx = NULL;
        } else if (!strcmp(op, "release")) {
            printf("release %d\n", A.PrimaryRelease(atoi(argv[++i])));
        } else if (!strcmp(op, "alloc")) {
            int api = api_of(argv[++i]);
            uint64_t sz = parse_sz(argv[++i]);
            printf("alloc %s %llu %d\n", api_names[api], (unsigned long long)sz, do_alloc(api, sz));
        } else if (!strcmp(op, "fill")) {
            int api = api_of(argv[++i]);
            uint64_t sz = parse_sz(argv[++i]);
            int n = 0;
            CUresult r;
            while ((r = do_alloc(api, sz)) == CUDA_SUCCESS && n < 60000) n++;
            printf("fill %s %d %d\n", api_names[api], n, r);
        } else if (!strcmp(op, "freeall")) {
            int bad = 0;
            for (int k = 0; k < nheld; k++) bad += do_free(&held[k]) != CUDA_SUCCESS;
            nheld = 0;
            printf("freeall %d\n", bad);
        } else if (!strcmp(op, "info")) {
            size_t f = 0, t = 0;
            CUresult r = A.MemGetInfo(&f, &t);
            printf("info %d %zu %zu\n", r, f, t);
        } else if (!strcmp(op, "info1")) {
            unsigned int f = 0, t = 0;
            CUresult r = A.MemGetInfoV1(&f, &t);
            printf("info1 %d %u %u\n", r, f, t);
        } else if (!strcmp(op, "total")) {
            size_t b = 0;
            CUdevice d;
            A.DeviceGet(&d, atoi(argv[++i]));
            CUresult r = A.DeviceTotalMem(&b, d);
            printf("total %d %zu\n", r, b);
        } else if (!strcmp(op, "nvml")) {
            unsigned idx = (unsigned)atoi(argv[++i]);
            nvmlDevice_t h;
            A.NvmlInit();
            A.NvmlHandle(idx, &h);
            nvmlMemory_t m;
            nvmlMemory_v2_t m2;
            memset(&m2, 0, sizeof m2);
            m2.version = 2;
            int r1 = A.NvmlMem(h, &m), r2 = A.NvmlMem2(h, &m2);
            printf("nvml %d %llu %llu %llu\n", r1, m.total, m.free, m.used);
            printf("nvml2 %d %llu %llu %llu %llu\n", r2, m2.total, m2.free, m2.used, m2.reserved);
        } else if (!strcmp(op, "sleep")) {
            usleep((useconds_t)atoi(argv[++i]) * 1000);
        } else if (!strcmp(op, "hold")) {
            printf("ready\n");
            for (;;) pause();
        } else if (!strcmp(op, "exit")) {
            _exit(atoi(argv[++i]));
        } else if (!strcmp(op, "launch")) {
            const char *kind = argv[++i];
            long ms = atol(argv[++i]);
            unsigned grid = (unsigned)atol(argv[++i]);
            long warm = atol(argv[++i]);
            launch_loop(kind, ms, grid, warm);
        } else if (!strcmp(op, "lockregion")) {
            int fd = open(argv[++i], O_RDWR);
            hami_region_t *r = fd < 0 ? MAP_FAILED : mmap(NULL, sizeof *r, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (r == MAP_FAILED) return 4;
            int rc = pthread_mutex_lock(&r->h.lock.mu);
            printf("locked %d\n", rc);
            for (;;) pause();
        } else if (!strcmp(op, "fork")) {
            pid_t c = fork();
            if (c > 0) {
                int st = 0;
                waitpid(c, &st, 0);
                while (i < argc && strcmp(argv[i], "endfork")) i++;
                printf("child %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
            }
        } else if (!strcmp(op, "endfork")) {
            exit(0);
        } else if (!strcmp(op, "env")) {
            const char *k = argv[++i];
            const char *v = getenv(k);
            printf("env %s %s\n", k, v ? v : "(unset)");
        } else {
            fprintf(stderr, "unknown op %s\n", op);
            return 2;
        }
    }
    return 0;
}
