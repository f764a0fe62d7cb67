/* libvgpu.so: HAMi-compatible memory and compute limiter, preloaded into container
 * processes. See ../README.md for the environment contract and the region layout. */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cudadefs.h"
#include "region.h"

#define EXPORT __attribute__((visibility("default")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ------------------------------------------------------------------ logging */

static int g_log_level = 2; /* 0 off, 1 error, 2 warn, 3 info, 4 debug */

__attribute__((format(printf, 2, 3))) static void hlog(int level, const char *fmt, ...) {
    if (level > g_log_level) return;
    static const char *names[] = {"", "ERROR", "WARN", "INFO", "DEBUG"};
    char buf[512];
    int n = snprintf(buf, sizeof buf, "[HAMI-vgpu pid=%d %s] ", (int)getpid(), names[level]);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    /* One write() so that lines of concurrent processes never interleave. */
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
}

static uint64_t now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_real_coarse(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* ------------------------------------------------------- environment parsing */

/* Sizes: digits with an optional k/m/g suffix (powers of 1024), none = bytes. */
enum { PARSE_OK, PARSE_BAD, PARSE_OVERFLOW };

static int parse_size(const char *s, uint64_t *out) {
    while (isspace((unsigned char)*s)) s++;
    if (!isdigit((unsigned char)*s)) return PARSE_BAD;
    uint64_t v = 0;
    int overflow = 0;
    while (isdigit((unsigned char)*s)) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10) overflow = 1;
        else v = v * 10 + d;
        s++;
    }
    unsigned shift = 0;
    switch (tolower((unsigned char)*s)) {
    case 'k': shift = 10; s++; break;
    case 'm': shift = 20; s++; break;
    case 'g': shift = 30; s++; break;
    default: break;
    }
    if (shift && (*s == 'i' || *s == 'I')) s++;
    if (shift && (*s == 'b' || *s == 'B')) s++;
    while (isspace((unsigned char)*s)) s++;
    if (*s) return PARSE_BAD;
    if (overflow || (shift && v > (UINT64_MAX >> shift))) return PARSE_OVERFLOW;
    *out = v << shift;
    return PARSE_OK;
}

static int parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    while (end && isspace((unsigned char)*end)) end++;
    if (end == s || *end) return PARSE_BAD;
    if (errno == ERANGE || v < lo || v > hi) return PARSE_OVERFLOW;
    *out = v;
    return PARSE_OK;
}

/* ------------------------------------------------------------- configuration */

enum { POLICY_DEFAULT = 0, POLICY_FORCE = 1, POLICY_DISABLE = 2 };

static uint64_t g_limit[HAMI_MAX_DEVICES];
static uint32_t g_sm[HAMI_MAX_DEVICES];
static int g_policy = POLICY_DEFAULT;
static int g_priority = 1;
static int g_any_cap;
static int64_t g_ctx_size = -1; /* -1: measure through NVML */
static uint64_t g_util_period_ns = 100000000ull;

static uint64_t env_limit(const char *name, uint64_t dflt, int *found) {
    const char *v = getenv(name);
    *found = 0;
    if (!v) return dflt;
    uint64_t x;
    switch (parse_size(v, &x)) {
    case PARSE_OK: *found = 1; return x;
    case PARSE_OVERFLOW:
        hlog(2, "%s='%s' overflows 64 bits; treating it as no memory limit", name, v);
        *found = 1;
        return 0;
    default:
        hlog(2, "%s='%s' is not a size (<n>[k|m|g]); ignoring it", name, v);
        return dflt;
    }
}

static uint32_t env_sm(const char *name, uint32_t dflt, int *found) {
    const char *v = getenv(name);
    *found = 0;
    if (!v) return dflt;
    long x;
    int r = parse_int(v, 0, 100, &x);
    if (r == PARSE_OK) {
        *found = 1;
        return x == 100 ? 0 : (uint32_t)x;
    }
    if (r == PARSE_OVERFLOW && v[0] != '-') {
        hlog(2, "%s='%s' is above 100; treating it as no SM cap", name, v);
        *found = 1;
        return 0;
    }
    hlog(2, "%s='%s' is not a percentage 0-100; ignoring it", name, v);
    return dflt;
}

static void load_config(void) {
    const char *ll = getenv("LIBCUDA_LOG_LEVEL");
    if (ll) {
        long x;
        if (parse_int(ll, 0, 4, &x) == PARSE_OK) g_log_level = (int)x;
        else hlog(2, "LIBCUDA_LOG_LEVEL='%s' is not 0-4; using 2 (warnings)", ll);
    }
    int found;
    uint64_t dflt = env_limit("CUDA_DEVICE_MEMORY_LIMIT", 0, &found);
    uint32_t sm_dflt = env_sm("CUDA_DEVICE_SM_LIMIT", 0, &found);
    for (int i = 0; i < HAMI_MAX_DEVICES; i++) {
        char name[64];
        snprintf(name, sizeof name, "CUDA_DEVICE_MEMORY_LIMIT_%d", i);
        g_limit[i] = env_limit(name, dflt, &found);
        snprintf(name, sizeof name, "CUDA_DEVICE_SM_LIMIT_%d", i);
        g_sm[i] = env_sm(name, sm_dflt, &found);
    }
    const char *p = getenv("GPU_CORE_UTILIZATION_POLICY");
    if (p && *p) {
        if (!strcasecmp(p, "default")) g_policy = POLICY_DEFAULT;
        else if (!strcasecmp(p, "force")) g_policy = POLICY_FORCE;
        else if (!strcasecmp(p, "disable")) g_policy = POLICY_DISABLE;
        else hlog(2, "GPU_CORE_UTILIZATION_POLICY='%s' is not default|force|disable; using default", p);
    }
    const char *pr = getenv("CUDA_TASK_PRIORITY");
    if (pr && *pr) {
        long x;
        if (parse_int(pr, 0, 1000, &x) == PARSE_OK) g_priority = (int)x;
        else hlog(2, "CUDA_TASK_PRIORITY='%s' is not an integer >= 0; using 1 (normal)", pr);
    }
    const char *cs = getenv("HAMI_CONTEXT_SIZE");
    if (cs && *cs) {
        uint64_t x;
        if (parse_size(cs, &x) == PARSE_OK && x < (1ull << 40)) g_ctx_size = (int64_t)x;
        else hlog(2, "HAMI_CONTEXT_SIZE='%s' is not a size; measuring contexts instead", cs);
    }
    const char *up = getenv("HAMI_UTIL_PERIOD_MS");
    if (up && *up) {
        long x;
        if (parse_int(up, 10, 10000, &x) == PARSE_OK) g_util_period_ns = (uint64_t)x * 1000000ull;
        else hlog(2, "HAMI_UTIL_PERIOD_MS='%s' is not 10-10000; using 100", up);
    }
    g_any_cap = 0;
    if (g_policy != POLICY_DISABLE)
        for (int i = 0; i < HAMI_MAX_DEVICES; i++)
            if (g_sm[i]) g_any_cap = 1;
}

/* Slice file: applied from the constructor, before anything reads the environment. */
static void apply_slice_file(void) {
    const char *path = getenv("HAMI_SLICE_FILE");
    int explicit_path = path && *path;
    if (!explicit_path) path = "/usr/local/vgpu/slice/env";
    FILE *f = fopen(path, "re");
    if (!f) {
        if (explicit_path) hlog(2, "HAMI_SLICE_FILE='%s' cannot be read (%s); using the environment", path, strerror(errno));
        return;
    }
    char line[4096];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *s = line;
        while (isspace((unsigned char)*s)) s++;
        size_t n = strlen(s);
        while (n && isspace((unsigned char)s[n - 1])) s[--n] = 0;
        if (!*s || *s == '#') continue;
        char *eq = strchr(s, '=');
        if (!eq || eq == s) {
            hlog(2, "slice file %s:%d: not KEY=VALUE; line skipped", path, lineno);
            continue;
        }
        *eq = 0;
        char *k = s;
        size_t kl = strlen(k);
        while (kl && isspace((unsigned char)k[kl - 1])) k[--kl] = 0;
        char *v = eq + 1;
        while (isspace((unsigned char)*v)) v++;
        setenv(k, v, 1);
    }
    fclose(f);
}

/* --------------------------------------------------------------- real symbols */

typedef void *(*dlsym_fn)(void *, const char *);
static _Atomic(dlsym_fn) g_real_dlsym;

static dlsym_fn real_dlsym(void) {
    dlsym_fn f = atomic_load_explicit(&g_real_dlsym, memory_order_acquire);
    if (LIKELY(f)) return f;
    f = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!f) f = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    if (!f) f = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.17");
    atomic_store_explicit(&g_real_dlsym, f, memory_order_release);
    return f;
}

/* Every hooked entry point: name, our function, the real one. X(ret, name, params, args) */
#define CU_HOOKS(X)                                                                              \
    X(cuInit, (unsigned int flags))                                                             \
    X(cuDeviceTotalMem_v2, (size_t * bytes, CUdevice dev))                                      \
    X(cuMemGetInfo_v2, (size_t * free, size_t *total))                                          \
    X(cuDevicePrimaryCtxRetain, (CUcontext * pctx, CUdevice dev))                               \
    X(cuDevicePrimaryCtxRelease, (CUdevice dev))                                                \
    X(cuDevicePrimaryCtxRelease_v2, (CUdevice dev))                                             \
    X(cuDevicePrimaryCtxReset, (CUdevice dev))                                                  \
    X(cuDevicePrimaryCtxReset_v2, (CUdevice dev))                                               \
    X(cuCtxCreate_v2, (CUcontext * pctx, unsigned int flags, CUdevice dev))                     \
    X(cuCtxCreate_v3, (CUcontext * pctx, void *params, int n, unsigned int flags, CUdevice dev)) \
    X(cuCtxCreate_v4, (CUcontext * pctx, void *params, unsigned int flags, CUdevice dev))       \
    X(cuCtxDestroy_v2, (CUcontext ctx))                                                         \
    X(cuMemAlloc_v2, (CUdeviceptr * dptr, size_t size))                                         \
    X(cuMemFree_v2, (CUdeviceptr dptr))                                                         \
    X(cuMemAllocPitch_v2, (CUdeviceptr * dptr, size_t *pitch, size_t w, size_t h, unsigned int e)) \
    X(cuMemAllocManaged, (CUdeviceptr * dptr, size_t size, unsigned int flags))                 \
    X(cuMemAllocAsync, (CUdeviceptr * dptr, size_t size, CUstream s))                           \
    X(cuMemAllocAsync_ptsz, (CUdeviceptr * dptr, size_t size, CUstream s))                      \
    X(cuMemAllocFromPoolAsync, (CUdeviceptr * dptr, size_t size, CUmemoryPool p, CUstream s))   \
    X(cuMemAllocFromPoolAsync_ptsz, (CUdeviceptr * dptr, size_t size, CUmemoryPool p, CUstream s)) \
    X(cuMemFreeAsync, (CUdeviceptr dptr, CUstream s))                                           \
    X(cuMemFreeAsync_ptsz, (CUdeviceptr dptr, CUstream s))                                      \
    X(cuMemCreate, (CUmemGenericAllocationHandle * h, size_t size, const CUmemAllocationProp *prop, unsigned long long flags)) \
    X(cuMemRelease, (CUmemGenericAllocationHandle h))                                           \
    X(cuArrayCreate_v2, (CUarray * a, const CUDA_ARRAY_DESCRIPTOR *d))                          \
    X(cuArray3DCreate_v2, (CUarray * a, const CUDA_ARRAY3D_DESCRIPTOR *d))                      \
    X(cuArrayDestroy, (CUarray a))                                                              \
    X(cuMipmappedArrayCreate, (CUmipmappedArray * a, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels)) \
    X(cuMipmappedArrayDestroy, (CUmipmappedArray a))                                            \
    X(cuLaunchKernel, (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shm, CUstream s, void **params, void **extra)) \
    X(cuLaunchKernel_ptsz, (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shm, CUstream s, void **params, void **extra)) \
    X(cuLaunchKernelEx, (const CUlaunchConfig *cfg, CUfunction f, void **params, void **extra)) \
    X(cuLaunchKernelEx_ptsz, (const CUlaunchConfig *cfg, CUfunction f, void **params, void **extra)) \
    X(cuLaunchCooperativeKernel, (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shm, CUstream s, void **params)) \
    X(cuLaunchCooperativeKernel_ptsz, (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shm, CUstream s, void **params)) \
    X(cuGraphLaunch, (CUgraphExec g, CUstream s))                                               \
    X(cuGraphLaunch_ptsz, (CUgraphExec g, CUstream s))                                          \
    X(cuMemAlloc, (unsigned int *dptr, unsigned int size))                                      \
    X(cuMemFree, (unsigned int dptr))                                                           \
    X(cuMemAllocPitch, (unsigned int *dptr, unsigned int *pitch, unsigned int w, unsigned int h, unsigned int e)) \
    X(cuMemGetInfo, (unsigned int *free, unsigned int *total))                                  \
    X(cuDeviceTotalMem, (unsigned int *bytes, CUdevice dev))                                    \
    X(cuCtxCreate, (CUcontext * pctx, unsigned int flags, CUdevice dev))                        \
    X(cuCtxDestroy, (CUcontext ctx))                                                            \
    X(cuGetProcAddress, (const char *sym, void **pfn, int ver, cuuint64_t flags))               \
    X(cuGetProcAddress_v2, (const char *sym, void **pfn, int ver, cuuint64_t flags, int *status))

#define NVML_HOOKS(X)                                                                            \
    X(nvmlDeviceGetMemoryInfo, (nvmlDevice_t d, nvmlMemory_t * m))                              \
    X(nvmlDeviceGetMemoryInfo_v2, (nvmlDevice_t d, nvmlMemory_v2_t * m))

/* Real entry points we call but do not hook. */
static CUresult (*r_cuCtxGetDevice)(CUdevice *);
static CUresult (*r_cuCtxGetCurrent)(CUcontext *);
static CUresult (*r_cuDeviceGetCount)(int *);
static CUresult (*r_cuDeviceGet)(CUdevice *, int);
static CUresult (*r_cuDeviceGetUuid)(CUuuid *, CUdevice);
static CUresult (*r_cuDevicePrimaryCtxGetState)(CUdevice, unsigned int *, int *);
static nvmlReturn_t (*r_nvmlInit_v2)(void);
static nvmlReturn_t (*r_nvmlDeviceGetCount_v2)(unsigned int *);
static nvmlReturn_t (*r_nvmlDeviceGetHandleByIndex_v2)(unsigned int, nvmlDevice_t *);
static nvmlReturn_t (*r_nvmlDeviceGetUUID)(nvmlDevice_t, char *, unsigned int);
static nvmlReturn_t (*r_nvmlDeviceGetIndex)(nvmlDevice_t, unsigned int *);
static nvmlReturn_t (*r_nvmlDeviceGetUtilizationRates)(nvmlDevice_t, nvmlUtilization_t *);
static nvmlReturn_t (*r_nvmlDeviceGetComputeRunningProcesses)(nvmlDevice_t, unsigned int *, nvmlProcessInfo_t *);
static nvmlReturn_t (*r_nvmlDeviceGetProcessUtilization)(nvmlDevice_t, nvmlProcessUtilizationSample_t *, unsigned int *, unsigned long long);

#define DECL_REAL(name, params) static CUresult(*r_##name) params;
CU_HOOKS(DECL_REAL)
#undef DECL_REAL
#define DECL_REAL(name, params) static nvmlReturn_t(*r_##name) params;
NVML_HOOKS(DECL_REAL)
#undef DECL_REAL

#define DECL_HOOK(name, params) EXPORT CUresult name params;
CU_HOOKS(DECL_HOOK)
#undef DECL_HOOK
#define DECL_HOOK(name, params) EXPORT nvmlReturn_t name params;
NVML_HOOKS(DECL_HOOK)
#undef DECL_HOOK

typedef struct {
    const char *name;
    void *hook;
    void **real;
} hook_entry_t;

#define ENTRY(name, params) {#name, (void *)name, (void **)&r_##name},
static hook_entry_t g_cu_hooks[] = {CU_HOOKS(ENTRY)};
static hook_entry_t g_nvml_hooks[] = {NVML_HOOKS(ENTRY)};
#undef ENTRY
#define NHOOKS(a) (sizeof(a) / sizeof((a)[0]))

static void *g_cuda_handle, *g_nvml_handle;
static pthread_once_t g_load_once = PTHREAD_ONCE_INIT;

static void *open_real(const char *env, const char *dflt) {
    const char *path = getenv(env);
    if (!path || !*path) path = dflt;
    void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!h && path != dflt) {
        hlog(2, "%s='%s' cannot be loaded (%s); using %s", env, path, dlerror(), dflt);
        h = dlopen(dflt, RTLD_NOW | RTLD_GLOBAL);
    }
    if (!h) hlog(3, "cannot load %s: %s", dflt, dlerror());
    return h;
}

static void do_load(void) {
    load_config();
    dlsym_fn ds = real_dlsym();
    if (!ds) {
        hlog(1, "cannot find the real dlsym; hooks are inactive");
        return;
    }
    g_cuda_handle = open_real("HAMI_REAL_LIBCUDA", "libcuda.so.1");
    g_nvml_handle = open_real("HAMI_REAL_LIBNVML", "libnvidia-ml.so.1");
    if (g_cuda_handle) {
        for (size_t i = 0; i < NHOOKS(g_cu_hooks); i++)
            *g_cu_hooks[i].real = ds(g_cuda_handle, g_cu_hooks[i].name);
        r_cuCtxGetDevice = (CUresult(*)(CUdevice *))ds(g_cuda_handle, "cuCtxGetDevice");
        r_cuCtxGetCurrent = (CUresult(*)(CUcontext *))ds(g_cuda_handle, "cuCtxGetCurrent");
        r_cuDeviceGetCount = (CUresult(*)(int *))ds(g_cuda_handle, "cuDeviceGetCount");
        r_cuDeviceGet = (CUresult(*)(CUdevice *, int))ds(g_cuda_handle, "cuDeviceGet");
        r_cuDeviceGetUuid = (CUresult(*)(CUuuid *, CUdevice))ds(g_cuda_handle, "cuDeviceGetUuid");
        r_cuDevicePrimaryCtxGetState =
            (CUresult(*)(CUdevice, unsigned int *, int *))ds(g_cuda_handle, "cuDevicePrimaryCtxGetState");
    }
    if (g_nvml_handle) {
        for (size_t i = 0; i < NHOOKS(g_nvml_hooks); i++)
            *g_nvml_hooks[i].real = ds(g_nvml_handle, g_nvml_hooks[i].name);
        r_nvmlInit_v2 = (nvmlReturn_t(*)(void))ds(g_nvml_handle, "nvmlInit_v2");
        r_nvmlDeviceGetCount_v2 = (nvmlReturn_t(*)(unsigned int *))ds(g_nvml_handle, "nvmlDeviceGetCount_v2");
        r_nvmlDeviceGetHandleByIndex_v2 =
            (nvmlReturn_t(*)(unsigned int, nvmlDevice_t *))ds(g_nvml_handle, "nvmlDeviceGetHandleByIndex_v2");
        r_nvmlDeviceGetUUID = (nvmlReturn_t(*)(nvmlDevice_t, char *, unsigned int))ds(g_nvml_handle, "nvmlDeviceGetUUID");
        r_nvmlDeviceGetIndex = (nvmlReturn_t(*)(nvmlDevice_t, unsigned int *))ds(g_nvml_handle, "nvmlDeviceGetIndex");
        r_nvmlDeviceGetUtilizationRates =
            (nvmlReturn_t(*)(nvmlDevice_t, nvmlUtilization_t *))ds(g_nvml_handle, "nvmlDeviceGetUtilizationRates");
        r_nvmlDeviceGetComputeRunningProcesses = (nvmlReturn_t(*)(nvmlDevice_t, unsigned int *, nvmlProcessInfo_t *))ds(
            g_nvml_handle, "nvmlDeviceGetComputeRunningProcesses_v3");
        if (!r_nvmlDeviceGetComputeRunningProcesses)
            r_nvmlDeviceGetComputeRunningProcesses = (nvmlReturn_t(*)(nvmlDevice_t, unsigned int *,
                                                                      nvmlProcessInfo_t *))ds(
                g_nvml_handle, "nvmlDeviceGetComputeRunningProcesses_v2");
        r_nvmlDeviceGetProcessUtilization =
            (nvmlReturn_t(*)(nvmlDevice_t, nvmlProcessUtilizationSample_t *, unsigned int *, unsigned long long))ds(
                g_nvml_handle, "nvmlDeviceGetProcessUtilization");
    }
}

static inline void ensure_loaded(void) { pthread_once(&g_load_once, do_load); }

/* Pointer identity, not names: whatever versioned or per-thread-stream variant the driver
 * hands out through dlsym or cuGetProcAddress, we substitute exactly the matching hook. */
static void *map_to_hook(void *p) {
    if (!p) return p;
    for (size_t i = 0; i < NHOOKS(g_cu_hooks); i++)
        if (*g_cu_hooks[i].real == p) return g_cu_hooks[i].hook;
    for (size_t i = 0; i < NHOOKS(g_nvml_hooks); i++)
        if (*g_nvml_hooks[i].real == p) return g_nvml_hooks[i].hook;
    return p;
}

EXPORT void *dlsym(void *handle, const char *name) {
    dlsym_fn ds = real_dlsym();
    if (!ds) return NULL;
    void *p = ds(handle, name);
    /* Driver and NVML names only (cuXxx, nvmlXxx): other lookups (curl_*, ...) must not
     * make us load the driver. */
    if (p && ((name[0] == 'c' && name[1] == 'u' && isupper((unsigned char)name[2])) ||
              (!strncmp(name, "nvml", 4) && isupper((unsigned char)name[4])))) {
        ensure_loaded();
        p = map_to_hook(p);
    }
    return p;
}

/* --------------------------------------------------------------------- region */

static hami_region_t *R;
static hami_slot_t *g_slot;
static int g_region_shared;
static pthread_mutex_t g_slot_mu = PTHREAD_MUTEX_INITIALIZER;

static uint64_t proc_start_time(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may contain spaces */
    if (!p) return 0;
    int field = 2;
    for (; *p && field < 22; p++)
        if (*p == ' ') field++;
    return strtoull(p, NULL, 10);
}

static int slot_dead(const hami_slot_t *s) {
    if (s->state != 1) return 0;
    if (kill(s->pid, 0) == -1 && errno == ESRCH) return 1;
    /* A recycled pid is a different process: its start time differs. */
    if (s->start_time) {
        uint64_t st = proc_start_time(s->pid);
        if (st && st != s->start_time) return 1;
    }
    return 0;
}

/* Slots are the source of truth; the per-device totals are a cache rebuilt whenever a
 * holder may have died between updating the two. */
static void recompute_locked(void) {
    uint64_t sum[HAMI_MAX_DEVICES] = {0};
    for (int i = 0; i < HAMI_MAX_SLOTS; i++) {
        hami_slot_t *s = &R->slots[i];
        if (s->state != 1) continue;
        for (int d = 0; d < HAMI_MAX_DEVICES; d++) sum[d] += s->used[d];
    }
    for (int d = 0; d < HAMI_MAX_DEVICES; d++) R->h.dev[d].used = sum[d];
}

static int reclaim_dead_locked(void) {
    int n = 0;
    for (int i = 0; i < HAMI_MAX_SLOTS; i++) {
        hami_slot_t *s = &R->slots[i];
        if (s->state == 1 && s != g_slot && slot_dead(s)) {
            hlog(3, "reclaiming slot %d of dead pid %d", i, s->pid);
            for (int d = 0; d < HAMI_MAX_DEVICES; d++) {
                uint64_t u = s->used[d];
                R->h.dev[d].used = R->h.dev[d].used >= u ? R->h.dev[d].used - u : 0;
            }
            memset(s, 0, sizeof *s);
            n++;
        }
    }
    return n;
}

static void rlock(void) {
    int r = pthread_mutex_lock(&R->h.lock.mu);
    if (UNLIKELY(r == EOWNERDEAD)) {
        hlog(3, "region lock holder died; repairing");
        reclaim_dead_locked();
        recompute_locked();
        pthread_mutex_consistent(&R->h.lock.mu);
    } else if (UNLIKELY(r != 0)) {
        hlog(1, "region lock failed (%s)", strerror(r));
    }
}

static void runlock(void) { pthread_mutex_unlock(&R->h.lock.mu); }

static void init_header(hami_header_t *h) {
    memset(h, 0, sizeof *h);
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&h->lock.mu, &a);
    pthread_mutexattr_destroy(&a);
    h->version = HAMI_REGION_VERSION;
    h->header_size = HAMI_HEADER_SIZE;
    h->slot_size = sizeof(hami_slot_t);
    h->max_slots = HAMI_MAX_SLOTS;
    h->max_devices = HAMI_MAX_DEVICES;
    h->created_ns = now_real();
    __atomic_store_n(&h->magic, HAMI_REGION_MAGIC, __ATOMIC_RELEASE);
}

static hami_region_t *private_region(void) {
    void *p = mmap(NULL, sizeof(hami_region_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    init_header(&((hami_region_t *)p)->h);
    return p;
}

static hami_region_t *open_region(void) {
    const char *path = getenv("CUDA_DEVICE_MEMORY_SHARED_CACHE");
    if (!path || !*path) path = "/tmp/cudevshr.cache";
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        hlog(2, "cannot open region %s (%s); accounting this process alone", path, strerror(errno));
        return NULL;
    }
    /* flock only serialises first-time initialisation; the kernel drops it if we die. */
    flock(fd, LOCK_EX);
    struct stat st;
    hami_region_t *r = NULL;
    if (fstat(fd, &st) == 0 && (size_t)st.st_size < sizeof(hami_region_t) &&
        ftruncate(fd, sizeof(hami_region_t)) != 0) {
        hlog(2, "cannot size region %s (%s); accounting this process alone", path, strerror(errno));
        goto out;
    }
    void *p = mmap(NULL, sizeof(hami_region_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        hlog(2, "cannot map region %s (%s); accounting this process alone", path, strerror(errno));
        goto out;
    }
    r = p;
    if (r->h.magic != HAMI_REGION_MAGIC) {
        init_header(&r->h);
    } else if (r->h.version != HAMI_REGION_VERSION || r->h.slot_size != sizeof(hami_slot_t) ||
               r->h.max_slots != HAMI_MAX_SLOTS || r->h.max_devices != HAMI_MAX_DEVICES) {
        hlog(1, "region %s has version %u (we speak %u); accounting this process alone", path,
             r->h.version, HAMI_REGION_VERSION);
        munmap(p, sizeof(hami_region_t));
        r = NULL;
    }
out:
    flock(fd, LOCK_UN);
    close(fd);
    return r;
}

static int own_hostpid(void) {
    /* NSpid lists the pid from the outermost visible namespace inward; NVML reports pids
     * of the host namespace, which is the first entry when the host's /proc is visible. */
    FILE *f = fopen("/proc/self/status", "re");
    int hp = (int)getpid();
    if (!f) return hp;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "NSpid:", 6)) {
            hp = atoi(line + 6);
            break;
        }
    }
    fclose(f);
    return hp;
}

static void register_slot_locked(void) {
    pid_t pid = getpid();
    reclaim_dead_locked();
    hami_slot_t *free_s = NULL;
    for (int i = 0; i < HAMI_MAX_SLOTS; i++) {
        hami_slot_t *s = &R->slots[i];
        if (s->state == 1 && s->pid == pid) {
            /* A slot with our pid is our image before exec(): its memory went with it. */
            for (int d = 0; d < HAMI_MAX_DEVICES; d++) {
                uint64_t u = s->used[d];
                R->h.dev[d].used = R->h.dev[d].used >= u ? R->h.dev[d].used - u : 0;
            }
            memset(s, 0, sizeof *s);
            free_s = s;
            break;
        }
        if (!free_s && s->state != 1) free_s = s;
    }
    if (!free_s) {
        hlog(1, "region full (%d processes); this process is accounted privately", HAMI_MAX_SLOTS);
        return;
    }
    memset(free_s, 0, sizeof *free_s);
    free_s->pid = pid;
    free_s->hostpid = own_hostpid();
    free_s->priority = g_priority;
    free_s->start_time = proc_start_time(pid);
    free_s->state = 1;
    g_slot = free_s;
}

static hami_slot_t g_private_slot;

static void setup_region(void) {
    R = open_region();
    g_region_shared = R != NULL;
    if (!R) R = private_region();
    if (!R) {
        hlog(1, "out of memory for the accounting region");
        abort();
    }
    rlock();
    register_slot_locked();
    if (!g_slot) {
        g_private_slot.state = 1;
        g_private_slot.pid = getpid();
        g_slot = &g_private_slot;
    }
    R->h.priority = g_priority;
    R->h.policy = (uint32_t)g_policy;
    for (int d = 0; d < HAMI_MAX_DEVICES; d++) {
        R->h.dev[d].limit = g_limit[d];
        R->h.dev[d].sm_limit = g_policy == POLICY_DISABLE ? 0 : g_sm[d];
    }
    runlock();
}

/* ------------------------------------------------------------ device mapping */

#define MAX_CU_DEV 64
static int8_t g_card[MAX_CU_DEV]; /* CUdevice -> container card index, -1 = unaccounted */
static nvmlDevice_t g_nvml_dev[HAMI_MAX_DEVICES];
static int g_nvml_ok;
static int g_ncards;
static pthread_once_t g_nvml_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t g_dev_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int g_ready;

static void nvml_setup(void) {
    if (!r_nvmlInit_v2 || r_nvmlInit_v2() != NVML_SUCCESS) {
        hlog(3, "NVML unavailable; card identity falls back to CUDA_VISIBLE_DEVICES");
        return;
    }
    unsigned n = 0;
    if (r_nvmlDeviceGetCount_v2(&n) != NVML_SUCCESS) return;
    if (n > HAMI_MAX_DEVICES) n = HAMI_MAX_DEVICES;
    for (unsigned i = 0; i < n; i++)
        if (r_nvmlDeviceGetHandleByIndex_v2(i, &g_nvml_dev[i]) != NVML_SUCCESS) g_nvml_dev[i] = NULL;
    g_ncards = (int)n;
    g_nvml_ok = 1;
}

static void format_uuid(const CUuuid *u, char *out) {
    const unsigned char *b = (const unsigned char *)u->bytes;
    sprintf(out, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
            b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* Card index of the k-th visible CUDA device from CUDA_VISIBLE_DEVICES alone (used when NVML
 * cannot tell us by UUID). */
static int card_from_visible(int k) {
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    if (!v || !*v) return k;
    int i = 0;
    const char *p = v;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (i == k) {
            char tok[64];
            if (len >= sizeof tok) return -1;
            memcpy(tok, p, len);
            tok[len] = 0;
            long x;
            if (parse_int(tok, 0, HAMI_MAX_DEVICES - 1, &x) == PARSE_OK) return (int)x;
            return -1;
        }
        i++;
        if (!e) break;
        p = e + 1;
    }
    return -1;
}

static void devices_setup(void) {
    int n = 0;
    if (r_cuDeviceGetCount) {
        if (r_cuDeviceGetCount(&n) != CUDA_SUCCESS) return; /* not initialised yet: retry later */
    } else {
        /* A driver without enumeration still gets limits, by CUDA_VISIBLE_DEVICES order. */
        n = HAMI_MAX_DEVICES;
    }
    memset(g_card, -1, sizeof g_card);
    pthread_once(&g_nvml_once, nvml_setup);
    char nv_uuid[HAMI_MAX_DEVICES][96];
    memset(nv_uuid, 0, sizeof nv_uuid);
    if (g_nvml_ok)
        for (int i = 0; i < g_ncards; i++)
            if (g_nvml_dev[i] && r_nvmlDeviceGetUUID) r_nvmlDeviceGetUUID(g_nvml_dev[i], nv_uuid[i], 96);
    for (int k = 0; k < n && k < MAX_CU_DEV; k++) {
        CUdevice dev = k;
        if (r_cuDeviceGet && r_cuDeviceGet(&dev, k) != CUDA_SUCCESS) continue;
        if (dev < 0 || dev >= MAX_CU_DEV) continue;
        int card = -1;
        char u[64] = "";
        CUuuid uu;
        if (r_cuDeviceGetUuid && r_cuDeviceGetUuid(&uu, dev) == CUDA_SUCCESS) format_uuid(&uu, u);
        if (g_nvml_ok && u[0])
            for (int i = 0; i < g_ncards; i++)
                if (!strcmp(nv_uuid[i], u)) card = i;
        if (card < 0) card = card_from_visible(k);
        if (card < 0 || card >= HAMI_MAX_DEVICES) {
            if (r_cuDeviceGetCount)
                hlog(2, "CUDA device %d has no card index below %d; its memory is not limited", k, HAMI_MAX_DEVICES);
            continue;
        }
        g_card[dev] = (int8_t)card;
        hlog(4, "CUDA device %d -> card %d (%s)", k, card, u);
        hami_dev_t *d = &R->h.dev[card];
        size_t total = 0;
        if (r_cuDeviceTotalMem_v2) r_cuDeviceTotalMem_v2(&total, dev);
        rlock();
        if (total) d->total = total;
        if (u[0] && strcmp(d->uuid, u)) snprintf(d->uuid, sizeof d->uuid, "%s", u);
        if (R->h.num_devices < (uint32_t)card + 1) R->h.num_devices = (uint32_t)card + 1;
        runlock();
    }
    atomic_store_explicit(&g_ready, 1, memory_order_release);
}

static pthread_once_t g_region_once = PTHREAD_ONCE_INIT;

/* Everything a hook needs before it can account: config, real symbols, region, cards. */
static int ensure_ready_slow(void) {
    ensure_loaded();
    if (!g_cuda_handle) return 0;
    pthread_once(&g_region_once, setup_region);
    if (!atomic_load_explicit(&g_ready, memory_order_acquire)) {
        /* Not a pthread_once: a call made before cuInit must not disable accounting for
         * good (that would be an escape); we retry until the driver answers. */
        pthread_mutex_lock(&g_dev_mu);
        if (!atomic_load_explicit(&g_ready, memory_order_acquire)) devices_setup();
        pthread_mutex_unlock(&g_dev_mu);
    }
    if (UNLIKELY(!g_slot)) {
        /* A forked child: the parent's slot is not ours. */
        pthread_mutex_lock(&g_slot_mu);
        if (!g_slot) {
            rlock();
            register_slot_locked();
            if (!g_slot) g_slot = &g_private_slot;
            runlock();
        }
        pthread_mutex_unlock(&g_slot_mu);
    }
    return atomic_load_explicit(&g_ready, memory_order_acquire);
}

static inline int ready(void) {
    if (LIKELY(atomic_load_explicit(&g_ready, memory_order_acquire) && g_slot)) return 1;
    return ensure_ready_slow();
}

static inline int card_of(CUdevice dev) {
    return (dev >= 0 && dev < MAX_CU_DEV) ? g_card[dev] : -1;
}

static inline int current_card(void) {
    CUdevice dev = 0;
    if (LIKELY(r_cuCtxGetDevice != NULL) && r_cuCtxGetDevice(&dev) != CUDA_SUCCESS) return -1;
    return card_of(dev);
}

/* ------------------------------------------------------------------ charging */

/* Check and charge in one critical section across all processes of the container. */
static CUresult charge(int card, uint64_t size) {
    if (card < 0 || size == 0) return CUDA_SUCCESS;
    rlock();
    hami_dev_t *d = &R->h.dev[card];
    uint64_t lim = g_limit[card];
    if (lim && (d->used + size < d->used || d->used + size > lim)) {
        /* Before refusing, give back what dead processes still hold. */
        if (reclaim_dead_locked() == 0 || d->used + size < d->used || d->used + size > lim) {
            uint64_t used = d->used;
            runlock();
            hlog(3, "card %d: %llu + %llu bytes exceeds the limit of %llu; out of memory", card,
                 (unsigned long long)used, (unsigned long long)size, (unsigned long long)lim);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    d->used += size;
    g_slot->used[card] += size;
    runlock();
    return CUDA_SUCCESS;
}

static void uncharge(int card, uint64_t size) {
    if (card < 0 || !size) return;
    rlock();
    hami_dev_t *d = &R->h.dev[card];
    d->used = d->used >= size ? d->used - size : 0;
    g_slot->used[card] = g_slot->used[card] >= size ? g_slot->used[card] - size : 0;
    runlock();
}

/* Per-process record of live allocations, so frees know what to give back.
 * Open addressing with backward-shift deletion; grows by doubling. */
enum { K_MEM = 1, K_HANDLE, K_ARRAY, K_MIPMAP, K_CTX };
typedef struct {
    uint64_t key; /* 0 = empty */
    uint64_t size;
    CUcontext ctx;
    int16_t card;
    uint8_t kind;
} arec_t;

static arec_t *g_tab;
static size_t g_tab_cap, g_tab_n;
static pthread_mutex_t g_tab_mu = PTHREAD_MUTEX_INITIALIZER;

static inline size_t hslot(uint64_t key, size_t cap) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    return (size_t)key & (cap - 1);
}

static inline uint64_t mkkey(uint8_t kind, uint64_t h) { return (h * 8u + kind) | 0; }

static void tab_insert_locked(const arec_t *r);

static int tab_grow_locked(void) {
    size_t ncap = g_tab_cap ? g_tab_cap * 2 : 4096;
    arec_t *old = g_tab;
    size_t ocap = g_tab_cap;
    arec_t *t = calloc(ncap, sizeof *t);
    if (!t) return -1;
    g_tab = t;
    g_tab_cap = ncap;
    g_tab_n = 0;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].key) tab_insert_locked(&old[i]);
    free(old);
    return 0;
}

static void tab_insert_locked(const arec_t *r) {
    size_t i = hslot(r->key, g_tab_cap);
    while (g_tab[i].key && g_tab[i].key != r->key) i = (i + 1) & (g_tab_cap - 1);
    if (!g_tab[i].key) g_tab_n++;
    g_tab[i] = *r;
}

static void tab_put(uint8_t kind, uint64_t h, uint64_t size, int card, CUcontext ctx) {
    arec_t r = {mkkey(kind, h), size, ctx, (int16_t)card, kind};
    pthread_mutex_lock(&g_tab_mu);
    if ((g_tab_n + 1) * 2 > g_tab_cap && tab_grow_locked() != 0) {
        pthread_mutex_unlock(&g_tab_mu);
        hlog(1, "out of host memory tracking an allocation; it will not be credited back on free");
        return;
    }
    tab_insert_locked(&r);
    pthread_mutex_unlock(&g_tab_mu);
}

static void tab_del_at_locked(size_t i) {
    size_t mask = g_tab_cap - 1;
    g_tab[i].key = 0;
    g_tab_n--;
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!g_tab[j].key) break;
        size_t h = hslot(g_tab[j].key, g_tab_cap);
        /* Move j back into the hole when its home does not lie in (i, j]. */
        if ((j > i && (h <= i || h > j)) || (j < i && (h <= i && h > j))) {
            g_tab[i] = g_tab[j];
            g_tab[j].key = 0;
            i = j;
        }
    }
}

static int tab_take(uint8_t kind, uint64_t h, arec_t *out) {
    uint64_t key = mkkey(kind, h);
    int found = 0;
    pthread_mutex_lock(&g_tab_mu);
    if (g_tab_cap) {
        size_t i = hslot(key, g_tab_cap);
        while (g_tab[i].key) {
            if (g_tab[i].key == key) {
                *out = g_tab[i];
                tab_del_at_locked(i);
                found = 1;
                break;
            }
            i = (i + 1) & (g_tab_cap - 1);
        }
    }
    pthread_mutex_unlock(&g_tab_mu);
    return found;
}

/* A destroyed context frees everything allocated in it. */
static void tab_drop_ctx(CUcontext ctx, int card_filter) {
    uint64_t freed[HAMI_MAX_DEVICES] = {0};
    pthread_mutex_lock(&g_tab_mu);
    for (size_t i = 0; i < g_tab_cap;) {
        arec_t *r = &g_tab[i];
        if (r->key && r->kind != K_CTX && r->ctx == ctx && (card_filter < 0 || r->card == card_filter)) {
            if (r->card >= 0) freed[r->card] += r->size;
            tab_del_at_locked(i); /* re-examine i: a later entry may have moved here */
            continue;
        }
        i++;
    }
    pthread_mutex_unlock(&g_tab_mu);
    for (int d = 0; d < HAMI_MAX_DEVICES; d++) uncharge(d, freed[d]);
}

static inline CUcontext cur_ctx(void) {
    CUcontext c = NULL;
    if (r_cuCtxGetCurrent) r_cuCtxGetCurrent(&c);
    return c;
}

/* Charge first, then allocate, so that no other process can slip in between. */
#define ALLOC_PRE(size_expr)                                                                     \
    if (UNLIKELY(!ready())) return CUDA_ERROR_NOT_INITIALIZED;                                  \
    int card = current_card();                                                                  \
    uint64_t sz = (size_expr);                                                                  \
    CUresult cr = charge(card, sz);                                                             \
    if (cr != CUDA_SUCCESS) return cr;

static CUresult alloc_done(CUresult r, int card, uint64_t sz, uint8_t kind, uint64_t h) {
    if (r == CUDA_SUCCESS) tab_put(kind, h, sz, card, cur_ctx());
    else uncharge(card, sz);
    return r;
}

#define REAL_OR_MISSING(name)                                                                    \
    if (UNLIKELY(!r_##name)) {                                                                   \
        ensure_loaded();                                                                         \
        if (!r_##name) return CUDA_ERROR_NOT_FOUND;                                             \
    }

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) {
    REAL_OR_MISSING(cuMemAlloc_v2);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAlloc_v2(dptr, size);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned int flags) {
    REAL_OR_MISSING(cuMemAllocManaged);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAllocManaged(dptr, size, flags);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) {
    REAL_OR_MISSING(cuMemAllocAsync);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAllocAsync(dptr, size, s);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) {
    REAL_OR_MISSING(cuMemAllocAsync_ptsz);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAllocAsync_ptsz(dptr, size, s);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool p, CUstream s) {
    REAL_OR_MISSING(cuMemAllocFromPoolAsync);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAllocFromPoolAsync(dptr, size, p, s);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, CUmemoryPool p, CUstream s) {
    REAL_OR_MISSING(cuMemAllocFromPoolAsync_ptsz);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAllocFromPoolAsync_ptsz(dptr, size, p, s);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

/* The pitch is chosen by the driver, so the exact pitch x height is only known afterwards;
 * we then charge it atomically and undo the allocation if it does not fit. */
EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t w, size_t h, unsigned int e) {
    REAL_OR_MISSING(cuMemAllocPitch_v2);
    if (UNLIKELY(!ready())) return CUDA_ERROR_NOT_INITIALIZED;
    int card = current_card();
    CUresult r = r_cuMemAllocPitch_v2(dptr, pitch, w, h, e);
    if (r != CUDA_SUCCESS) return r;
    uint64_t sz = (uint64_t)*pitch * (uint64_t)h;
    if (charge(card, sz) != CUDA_SUCCESS) {
        r_cuMemFree_v2(*dptr);
        *dptr = 0;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    tab_put(K_MEM, *dptr, sz, card, cur_ctx());
    return CUDA_SUCCESS;
}

static CUresult free_mem(CUdeviceptr p) {
    arec_t rec;
    if (p && g_tab_cap && tab_take(K_MEM, p, &rec)) uncharge(rec.card, rec.size);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr) {
    REAL_OR_MISSING(cuMemFree_v2);
    CUresult r = r_cuMemFree_v2(dptr);
    if (r == CUDA_SUCCESS) free_mem(dptr);
    return r;
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) {
    REAL_OR_MISSING(cuMemFreeAsync);
    CUresult r = r_cuMemFreeAsync(dptr, s);
    if (r == CUDA_SUCCESS) free_mem(dptr);
    return r;
}

EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream s) {
    REAL_OR_MISSING(cuMemFreeAsync_ptsz);
    CUresult r = r_cuMemFreeAsync_ptsz(dptr, s);
    if (r == CUDA_SUCCESS) free_mem(dptr);
    return r;
}

EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
                            unsigned long long flags) {
    REAL_OR_MISSING(cuMemCreate);
    if (UNLIKELY(!ready())) return CUDA_ERROR_NOT_INITIALIZED;
    /* Only device-resident physical memory counts; host or NUMA locations do not. */
    if (!prop || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE) return r_cuMemCreate(h, size, prop, flags);
    int card = card_of(prop->location.id);
    CUresult cr = charge(card, size);
    if (cr != CUDA_SUCCESS) return cr;
    CUresult r = r_cuMemCreate(h, size, prop, flags);
    return alloc_done(r, card, size, K_HANDLE, r == CUDA_SUCCESS ? *h : 0);
}

EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
    REAL_OR_MISSING(cuMemRelease);
    CUresult r = r_cuMemRelease(h);
    arec_t rec;
    if (r == CUDA_SUCCESS && g_tab_cap && tab_take(K_HANDLE, h, &rec)) uncharge(rec.card, rec.size);
    return r;
}

static uint64_t elem_size(int fmt) {
    switch (fmt) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: return 2;
    default: return 4; /* 32-bit formats; the compressed/packed ones are no larger */
    }
}

static uint64_t sat_mul(uint64_t a, uint64_t b) {
    uint64_t r;
    return __builtin_mul_overflow(a, b, &r) ? UINT64_MAX : r;
}

static uint64_t array_bytes(size_t w, size_t h, size_t d, int fmt, unsigned ch) {
    uint64_t s = sat_mul(w ? w : 1, h ? h : 1);
    s = sat_mul(s, d ? d : 1);
    s = sat_mul(s, elem_size(fmt));
    return sat_mul(s, ch ? ch : 1);
}

EXPORT CUresult cuArrayCreate_v2(CUarray *a, const CUDA_ARRAY_DESCRIPTOR *d) {
    REAL_OR_MISSING(cuArrayCreate_v2);
    if (!d) return r_cuArrayCreate_v2(a, d);
    ALLOC_PRE(array_bytes(d->Width, d->Height, 1, d->Format, d->NumChannels));
    CUresult r = r_cuArrayCreate_v2(a, d);
    return alloc_done(r, card, sz, K_ARRAY, r == CUDA_SUCCESS ? (uint64_t)(uintptr_t)*a : 0);
}

EXPORT CUresult cuArray3DCreate_v2(CUarray *a, const CUDA_ARRAY3D_DESCRIPTOR *d) {
    REAL_OR_MISSING(cuArray3DCreate_v2);
    if (!d) return r_cuArray3DCreate_v2(a, d);
    ALLOC_PRE(array_bytes(d->Width, d->Height, d->Depth, d->Format, d->NumChannels));
    CUresult r = r_cuArray3DCreate_v2(a, d);
    return alloc_done(r, card, sz, K_ARRAY, r == CUDA_SUCCESS ? (uint64_t)(uintptr_t)*a : 0);
}

EXPORT CUresult cuArrayDestroy(CUarray a) {
    REAL_OR_MISSING(cuArrayDestroy);
    CUresult r = r_cuArrayDestroy(a);
    arec_t rec;
    if (r == CUDA_SUCCESS && g_tab_cap && tab_take(K_ARRAY, (uint64_t)(uintptr_t)a, &rec))
        uncharge(rec.card, rec.size);
    return r;
}

static uint64_t mipmap_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels) {
    uint64_t total = 0;
    if (levels == 0) levels = 1;
    if (levels > 64) levels = 64;
    for (unsigned l = 0; l < levels; l++) {
        size_t w = d->Width >> l, h = d->Height >> l, z = d->Depth >> l;
        uint64_t b = array_bytes(w ? w : 1, d->Height ? (h ? h : 1) : 0, d->Depth ? (z ? z : 1) : 0, d->Format,
                                 d->NumChannels);
        total = total + b < total ? UINT64_MAX : total + b;
    }
    return total;
}

EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *a, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels) {
    REAL_OR_MISSING(cuMipmappedArrayCreate);
    if (!d) return r_cuMipmappedArrayCreate(a, d, levels);
    ALLOC_PRE(mipmap_bytes(d, levels));
    CUresult r = r_cuMipmappedArrayCreate(a, d, levels);
    return alloc_done(r, card, sz, K_MIPMAP, r == CUDA_SUCCESS ? (uint64_t)(uintptr_t)*a : 0);
}

EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray a) {
    REAL_OR_MISSING(cuMipmappedArrayDestroy);
    CUresult r = r_cuMipmappedArrayDestroy(a);
    arec_t rec;
    if (r == CUDA_SUCCESS && g_tab_cap && tab_take(K_MIPMAP, (uint64_t)(uintptr_t)a, &rec))
        uncharge(rec.card, rec.size);
    return r;
}

/* ------------------------------------------------------------------ contexts */

static uint64_t nvml_used(int card) {
    nvmlMemory_t m;
    pthread_once(&g_nvml_once, nvml_setup);
    if (!g_nvml_ok || card < 0 || card >= g_ncards || !g_nvml_dev[card] || !r_nvmlDeviceGetMemoryInfo) return 0;
    if (r_nvmlDeviceGetMemoryInfo(g_nvml_dev[card], &m) != NVML_SUCCESS) return 0;
    return m.used;
}

/* This process's usage of the card as NVML sees it (matched by host pid). */
static int nvml_own_used(int card, uint64_t *out) {
    if (!g_nvml_ok || card < 0 || card >= g_ncards || !g_nvml_dev[card] || !r_nvmlDeviceGetComputeRunningProcesses ||
        !g_slot)
        return 0;
    nvmlProcessInfo_t buf[256];
    unsigned n = 256;
    if (r_nvmlDeviceGetComputeRunningProcesses(g_nvml_dev[card], &n, buf) != NVML_SUCCESS) return 0;
    *out = 0;
    for (unsigned i = 0; i < n && i < 256; i++)
        if (buf[i].pid == (unsigned)g_slot->hostpid) {
            *out = buf[i].usedGpuMemory;
            return 1;
        }
    return 2; /* listed nobody as us */
}

/* A context's device memory is charged as its creator's NVML usage growth across the
 * creation (or HAMI_CONTEXT_SIZE). The card-wide growth is the fallback when NVML cannot
 * see our pid; other tenants allocating at that instant can skew that one, hence the
 * 4 GiB sanity bound. */
typedef struct {
    uint64_t own, dev;
    int own_ok;
} ctxm_t;

static ctxm_t ctx_measure_before(int card) {
    ctxm_t m = {0, 0, 0};
    if (g_ctx_size >= 0) return m;
    pthread_once(&g_nvml_once, nvml_setup);
    m.own_ok = nvml_own_used(card, &m.own) != 0;
    m.dev = nvml_used(card);
    return m;
}

static uint64_t ctx_measure_after(int card, ctxm_t before) {
    if (g_ctx_size >= 0) return (uint64_t)g_ctx_size;
    uint64_t own = 0;
    if (before.own_ok) {
        int k = nvml_own_used(card, &own);
        if (k == 1) return own > before.own ? own - before.own : 0;
        /* NVML lists processes but still not us: the context holds no device memory.
         * Falling back to the card-wide growth here would charge other tenants'
         * allocations made at the same instant to this context. */
        if (k == 2) return 0;
    }
    uint64_t after = nvml_used(card);
    if (after <= before.dev || after - before.dev > (4ull << 30)) return 0;
    return after - before.dev;
}

static int g_prim_refs[MAX_CU_DEV];
static uint64_t g_prim_charge[MAX_CU_DEV];
static CUcontext g_prim_ctx[MAX_CU_DEV];
static pthread_mutex_t g_ctx_mu = PTHREAD_MUTEX_INITIALIZER;

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    REAL_OR_MISSING(cuDevicePrimaryCtxRetain);
    if (UNLIKELY(!ready()) || dev < 0 || dev >= MAX_CU_DEV) return r_cuDevicePrimaryCtxRetain(pctx, dev);
    int card = card_of(dev);
    pthread_mutex_lock(&g_ctx_mu);
    unsigned flags = 0;
    int active = 1;
    if (r_cuDevicePrimaryCtxGetState) r_cuDevicePrimaryCtxGetState(dev, &flags, &active);
    ctxm_t before = {0, 0, 0};
    if (!active) before = ctx_measure_before(card);
    CUresult r = r_cuDevicePrimaryCtxRetain(pctx, dev);
    if (r == CUDA_SUCCESS) {
        g_prim_refs[dev]++;
        g_prim_ctx[dev] = *pctx;
        if (!active) {
            uint64_t sz = ctx_measure_after(card, before);
            if (charge(card, sz) != CUDA_SUCCESS) {
                g_prim_refs[dev]--;
                pthread_mutex_unlock(&g_ctx_mu);
                if (r_cuDevicePrimaryCtxRelease_v2) r_cuDevicePrimaryCtxRelease_v2(dev);
                else if (r_cuDevicePrimaryCtxRelease) r_cuDevicePrimaryCtxRelease(dev);
                *pctx = NULL;
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            g_prim_charge[dev] = card >= 0 ? sz : 0;
        }
    }
    pthread_mutex_unlock(&g_ctx_mu);
    return r;
}

static void primary_gone(CUdevice dev) {
    if ((unsigned)dev >= MAX_CU_DEV) return;
    int card = card_of(dev);
    uint64_t c = g_prim_charge[dev];
    g_prim_charge[dev] = 0;
    g_prim_refs[dev] = 0;
    uncharge(card, c);
    if (g_prim_ctx[dev]) tab_drop_ctx(g_prim_ctx[dev], -1);
}

static CUresult prim_release(CUresult (*real)(CUdevice), CUdevice dev) {
    if (!real) return CUDA_ERROR_NOT_FOUND;
    CUresult r = real(dev);
    if (r == CUDA_SUCCESS && dev >= 0 && dev < MAX_CU_DEV && g_slot) {
        pthread_mutex_lock(&g_ctx_mu);
        if (g_prim_refs[dev] > 0 && --g_prim_refs[dev] == 0) primary_gone(dev);
        pthread_mutex_unlock(&g_ctx_mu);
    }
    return r;
}

EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice dev) {
    ensure_loaded();
    return prim_release(r_cuDevicePrimaryCtxRelease, dev);
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    ensure_loaded();
    return prim_release(r_cuDevicePrimaryCtxRelease_v2, dev);
}

static CUresult prim_reset(CUresult (*real)(CUdevice), CUdevice dev) {
    if (!real) return CUDA_ERROR_NOT_FOUND;
    CUresult r = real(dev);
    if (r == CUDA_SUCCESS && dev >= 0 && dev < MAX_CU_DEV && g_slot) {
        /* Reset destroys the primary context's allocations but keeps the retains. */
        pthread_mutex_lock(&g_ctx_mu);
        int refs = g_prim_refs[dev];
        primary_gone(dev);
        g_prim_refs[dev] = refs;
        pthread_mutex_unlock(&g_ctx_mu);
    }
    return r;
}

EXPORT CUresult cuDevicePrimaryCtxReset(CUdevice dev) {
    ensure_loaded();
    return prim_reset(r_cuDevicePrimaryCtxReset, dev);
}
EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev) {
    ensure_loaded();
    return prim_reset(r_cuDevicePrimaryCtxReset_v2, dev);
}

static CUresult ctx_created(CUresult r, CUcontext *pctx, int card, ctxm_t before,
                            CUresult (*destroy)(CUcontext)) {
    if (r != CUDA_SUCCESS) return r;
    uint64_t sz = ctx_measure_after(card, before);
    if (charge(card, sz) != CUDA_SUCCESS) {
        destroy(*pctx);
        *pctx = NULL;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    tab_put(K_CTX, (uint64_t)(uintptr_t)*pctx, sz, card, *pctx);
    return r;
}

#define CTX_CREATE(name, call)                                                                   \
    REAL_OR_MISSING(name);                                                                      \
    if (UNLIKELY(!ready())) return r_##name call;                                               \
    int card = card_of(dev);                                                                    \
    pthread_mutex_lock(&g_ctx_mu);                                                              \
    ctxm_t before = ctx_measure_before(card);                                                   \
    CUresult r = r_##name call;                                                                 \
    pthread_mutex_unlock(&g_ctx_mu);                                                            \
    return ctx_created(r, pctx, card, before, r_cuCtxDestroy_v2);

EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    CTX_CREATE(cuCtxCreate_v2, (pctx, flags, dev))
}
EXPORT CUresult cuCtxCreate_v3(CUcontext *pctx, void *params, int n, unsigned int flags, CUdevice dev) {
    CTX_CREATE(cuCtxCreate_v3, (pctx, params, n, flags, dev))
}
EXPORT CUresult cuCtxCreate_v4(CUcontext *pctx, void *params, unsigned int flags, CUdevice dev) {
    CTX_CREATE(cuCtxCreate_v4, (pctx, params, flags, dev))
}

EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx) {
    REAL_OR_MISSING(cuCtxDestroy_v2);
    CUresult r = r_cuCtxDestroy_v2(ctx);
    if (r == CUDA_SUCCESS && g_tab_cap) {
        arec_t rec;
        if (tab_take(K_CTX, (uint64_t)(uintptr_t)ctx, &rec)) uncharge(rec.card, rec.size);
        tab_drop_ctx(ctx, -1);
    }
    return r;
}

/* ------------------------------------------------------------ memory queries */

EXPORT CUresult cuInit(unsigned int flags) {
    REAL_OR_MISSING(cuInit);
    CUresult r = r_cuInit(flags);
    if (r == CUDA_SUCCESS) ready();
    return r;
}

static inline uint64_t slice_total(int card, uint64_t real_total) {
    uint64_t lim = g_limit[card];
    return lim && lim < real_total ? lim : real_total;
}

EXPORT CUresult cuMemGetInfo_v2(size_t *freep, size_t *totalp) {
    REAL_OR_MISSING(cuMemGetInfo_v2);
    size_t f = 0, t = 0;
    CUresult r = r_cuMemGetInfo_v2(&f, &t);
    if (r != CUDA_SUCCESS || !ready()) goto out;
    int card = current_card();
    if (card < 0) goto out;
    R->h.dev[card].total = t;
    if (g_limit[card]) {
        uint64_t tot = slice_total(card, t);
        uint64_t used = __atomic_load_n(&R->h.dev[card].used, __ATOMIC_RELAXED);
        uint64_t fr = used >= tot ? 0 : tot - used;
        if (fr > f) fr = f; /* the card may be fuller than our slice says */
        f = fr;
        t = tot;
    }
out:
    if (r == CUDA_SUCCESS) {
        if (freep) *freep = f;
        if (totalp) *totalp = t;
    }
    return r;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    REAL_OR_MISSING(cuDeviceTotalMem_v2);
    CUresult r = r_cuDeviceTotalMem_v2(bytes, dev);
    if (r == CUDA_SUCCESS && bytes && ready()) {
        int card = card_of(dev);
        if (card >= 0) {
            R->h.dev[card].total = *bytes;
            *bytes = slice_total(card, *bytes);
        }
    }
    return r;
}

static int nvml_card(nvmlDevice_t d) {
    unsigned idx;
    if (!r_nvmlDeviceGetIndex || r_nvmlDeviceGetIndex(d, &idx) != NVML_SUCCESS || idx >= HAMI_MAX_DEVICES)
        return -1;
    return (int)idx;
}

static void slice_nvml(int card, unsigned long long *total, unsigned long long *fr, unsigned long long *used) {
    if (card < 0 || !g_limit[card]) return;
    unsigned long long tot = slice_total(card, *total);
    unsigned long long u = __atomic_load_n(&R->h.dev[card].used, __ATOMIC_RELAXED);
    if (u > tot) u = tot;
    *total = tot;
    *used = u;
    *fr = tot - u;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    ensure_loaded();
    if (!r_nvmlDeviceGetMemoryInfo) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t r = r_nvmlDeviceGetMemoryInfo(d, m);
    if (r == NVML_SUCCESS && m && ready()) slice_nvml(nvml_card(d), &m->total, &m->free, &m->used);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    ensure_loaded();
    if (!r_nvmlDeviceGetMemoryInfo_v2) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t r = r_nvmlDeviceGetMemoryInfo_v2(d, m);
    if (r == NVML_SUCCESS && m && ready()) {
        int card = nvml_card(d);
        if (card >= 0 && g_limit[card]) {
            m->reserved = 0; /* the slice has no driver-reserved part of its own */
            slice_nvml(card, &m->total, &m->free, &m->used);
        }
    }
    return r;
}

/* ------------------------------------------------- legacy 32-bit entry points */
/* Still exported by the driver and handed out by cuGetProcAddress for old versions:
 * without these hooks they would be a way around the limit. */

EXPORT CUresult cuMemAlloc(unsigned int *dptr, unsigned int size) {
    REAL_OR_MISSING(cuMemAlloc);
    ALLOC_PRE(size);
    CUresult r = r_cuMemAlloc(dptr, size);
    return alloc_done(r, card, sz, K_MEM, r == CUDA_SUCCESS ? *dptr : 0);
}

EXPORT CUresult cuMemAllocPitch(unsigned int *dptr, unsigned int *pitch, unsigned int w, unsigned int h,
                                unsigned int e) {
    REAL_OR_MISSING(cuMemAllocPitch);
    if (UNLIKELY(!ready())) return CUDA_ERROR_NOT_INITIALIZED;
    int card = current_card();
    CUresult r = r_cuMemAllocPitch(dptr, pitch, w, h, e);
    if (r != CUDA_SUCCESS) return r;
    uint64_t sz = (uint64_t)*pitch * h;
    if (charge(card, sz) != CUDA_SUCCESS) {
        if (r_cuMemFree) r_cuMemFree(*dptr);
        *dptr = 0;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    tab_put(K_MEM, *dptr, sz, card, cur_ctx());
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemFree(unsigned int dptr) {
    REAL_OR_MISSING(cuMemFree);
    CUresult r = r_cuMemFree(dptr);
    if (r == CUDA_SUCCESS) free_mem(dptr);
    return r;
}

EXPORT CUresult cuMemGetInfo(unsigned int *freep, unsigned int *totalp) {
    size_t f, t;
    CUresult r = cuMemGetInfo_v2(&f, &t);
    if (r == CUDA_SUCCESS) {
        if (freep) *freep = f > UINT_MAX ? UINT_MAX : (unsigned int)f;
        if (totalp) *totalp = t > UINT_MAX ? UINT_MAX : (unsigned int)t;
    }
    return r;
}

EXPORT CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    size_t b;
    CUresult r = cuDeviceTotalMem_v2(&b, dev);
    if (r == CUDA_SUCCESS && bytes) *bytes = b > UINT_MAX ? UINT_MAX : (unsigned int)b;
    return r;
}

EXPORT CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    CTX_CREATE(cuCtxCreate, (pctx, flags, dev))
}

EXPORT CUresult cuCtxDestroy(CUcontext ctx) {
    REAL_OR_MISSING(cuCtxDestroy);
    CUresult r = r_cuCtxDestroy(ctx);
    if (r == CUDA_SUCCESS && g_tab_cap) {
        arec_t rec;
        if (tab_take(K_CTX, (uint64_t)(uintptr_t)ctx, &rec)) uncharge(rec.card, rec.size);
        tab_drop_ctx(ctx, -1);
    }
    return r;
}

/* ------------------------------------------------------------- proc address */

EXPORT CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, cuuint64_t flags) {
    ensure_loaded();
    if (!r_cuGetProcAddress) return CUDA_ERROR_NOT_FOUND;
    CUresult r = r_cuGetProcAddress(sym, pfn, ver, flags);
    if (r == CUDA_SUCCESS && pfn) *pfn = map_to_hook(*pfn);
    return r;
}

EXPORT CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, cuuint64_t flags, int *status) {
    ensure_loaded();
    if (!r_cuGetProcAddress_v2) return CUDA_ERROR_NOT_FOUND;
    CUresult r = r_cuGetProcAddress_v2(sym, pfn, ver, flags, status);
    if (r == CUDA_SUCCESS && pfn) *pfn = map_to_hook(*pfn);
    return r;
}

#include "compute.inc"

/* ------------------------------------------------------------ process life */

static void on_fork_child(void) {
    /* The child is a new process: its own slot, no CUDA allocations, no watcher. */
    g_slot = NULL;
    pthread_mutex_init(&g_tab_mu, NULL);
    pthread_mutex_init(&g_ctx_mu, NULL);
    pthread_mutex_init(&g_slot_mu, NULL);
    free(g_tab);
    g_tab = NULL;
    g_tab_cap = g_tab_n = 0;
    memset(g_prim_refs, 0, sizeof g_prim_refs);
    memset(g_prim_charge, 0, sizeof g_prim_charge);
    compute_fork_child();
}

__attribute__((constructor)) static void vgpu_init(void) {
    apply_slice_file();
    pthread_atfork(NULL, NULL, on_fork_child);
}

__attribute__((destructor)) static void vgpu_fini(void) {
    if (!R || !g_slot || g_slot == &g_private_slot || !g_region_shared) return;
    rlock();
    if (g_slot->pid == getpid()) {
        for (int d = 0; d < HAMI_MAX_DEVICES; d++) {
            uint64_t u = g_slot->used[d];
            R->h.dev[d].used = R->h.dev[d].used >= u ? R->h.dev[d].used - u : 0;
        }
        memset(g_slot, 0, sizeof *g_slot);
    }
    runlock();
    g_slot = NULL;
}
