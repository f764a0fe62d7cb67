/* Fake libcuda.so.1 for the limiter tests: a device memory pool per card and a device
 * timeline on which launched work occupies the card, so that the fake NVML can report a
 * utilisation that follows what was launched.
 *
 * Env: FAKE_GPU_STATE (shared state file; unset = this process only), FAKE_CUDA_DEVICES
 * (cards, default 2), FAKE_CUDA_MEM_MB (per card, default 16384), FAKE_CUDA_UUIDS (comma
 * list), FAKE_CUDA_CTX_MB (device memory a context takes, default 0), FAKE_CUDA_NS_PER_BLOCK
 * (kernel time per block, default 0 = launches take no device time), FAKE_CUDA_GRAPH_NS
 * (device time of a graph launch), FAKE_CUDA_QUEUE_US (launch blocks when this much work
 * is queued, default 2000), FAKE_CUDA_INIT_MS (cuInit latency). CUDA_VISIBLE_DEVICES is
 * honoured like the real driver does (indices or UUIDs, stops at the first bad entry). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cudadefs.h"
#include "fake_state.h"

#define API __attribute__((visibility("default")))

static fk_state_t *S;
static pthread_once_t s_once = PTHREAD_ONCE_INIT;
static int64_t ns_per_block, graph_ns, queue_ns;
static int initialised;
static int nvis, vis[FK_MAXDEV]; /* CUDA ordinal -> card */

static long envl(const char *n, long d) {
    const char *v = getenv(n);
    return v && *v ? strtol(v, NULL, 10) : d;
}

API int64_t fakegpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void lock(void) {
    int r = pthread_mutex_lock(&S->mu);
    if (r == EOWNERDEAD) pthread_mutex_consistent(&S->mu);
}
static void unlock(void) { pthread_mutex_unlock(&S->mu); }

static void state_init(fk_state_t *s) {
    memset(s, 0, sizeof *s);
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&s->mu, &a);
    s->ndev = (int)envl("FAKE_CUDA_DEVICES", 2);
    if (s->ndev < 1) s->ndev = 1;
    if (s->ndev > FK_MAXDEV) s->ndev = FK_MAXDEV;
    const char *uu = getenv("FAKE_CUDA_UUIDS");
    char *list = uu ? strdup(uu) : NULL, *save = NULL;
    char *tok = list ? strtok_r(list, ",", &save) : NULL;
    for (int i = 0; i < s->ndev; i++) {
        char name[32];
        snprintf(name, sizeof name, "FAKE_CUDA_MEM_MB_%d", i);
        s->total[i] = (uint64_t)envl(name, envl("FAKE_CUDA_MEM_MB", 16384)) << 20;
        unsigned char *b = s->uuid_bytes[i];
        if (tok) {
            /* Parse "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" into its 16 bytes. */
            const char *p = tok + (strncmp(tok, "GPU-", 4) ? 0 : 4);
            int k = 0;
            while (*p && k < 32) {
                if (*p == '-') { p++; continue; }
                unsigned v;
                sscanf(p, "%1x", &v);
                b[k / 2] = (unsigned char)(b[k / 2] << 4 | v);
                k++;
                p++;
            }
            tok = strtok_r(NULL, ",", &save);
        } else {
            for (int k = 0; k < 16; k++) b[k] = (unsigned char)(0x10 * (i + 1) + k);
        }
        sprintf(s->uuid[i], "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    }
    free(list);
    __atomic_store_n(&s->magic, 0xFA4E6u, __ATOMIC_RELEASE);
}

static void state_open(void) {
    ns_per_block = envl("FAKE_CUDA_NS_PER_BLOCK", 0);
    graph_ns = envl("FAKE_CUDA_GRAPH_NS", 0);
    queue_ns = envl("FAKE_CUDA_QUEUE_US", 2000) * 1000;
    const char *path = getenv("FAKE_GPU_STATE");
    if (path && *path) {
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (fd >= 0) {
            flock(fd, LOCK_EX);
            struct stat st;
            if (fstat(fd, &st) == 0 && (size_t)st.st_size < sizeof(fk_state_t)) {
                if (ftruncate(fd, sizeof(fk_state_t)) != 0) abort();
            }
            void *p = mmap(NULL, sizeof(fk_state_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED) {
                S = p;
                if (S->magic != 0xFA4E6u) state_init(S);
            }
            flock(fd, LOCK_UN);
            close(fd);
        }
    }
    if (!S) {
        S = mmap(NULL, sizeof(fk_state_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        state_init(S);
    }
}

API fk_state_t *fakegpu_state(void) {
    pthread_once(&s_once, state_open);
    return S;
}

static __thread fk_proc_t *t_proc;
static int t_proc_pid;

API void fakegpu_reclaim(void) {
    for (int i = 0; i < FK_MAXPROC; i++) {
        fk_proc_t *p = &S->procs[i];
        if (p->live && kill(p->pid, 0) == -1 && errno == ESRCH) {
            for (int d = 0; d < FK_MAXDEV; d++) __atomic_fetch_sub(&S->used[d], p->used[d], __ATOMIC_RELAXED);
            p->live = 0;
        }
    }
}

API fk_proc_t *fakegpu_proc_of(int pid) {
    fakegpu_state();
    for (int i = 0; i < FK_MAXPROC; i++)
        if (S->procs[i].live && S->procs[i].pid == pid) return &S->procs[i];
    return NULL;
}

static fk_proc_t *me(void) {
    int pid = getpid();
    if (t_proc && t_proc_pid == pid) return t_proc;
    fakegpu_state();
    lock();
    fakegpu_reclaim();
    fk_proc_t *p = NULL;
    for (int i = 0; i < FK_MAXPROC && !p; i++)
        if (S->procs[i].live && S->procs[i].pid == pid) p = &S->procs[i];
    for (int i = 0; i < FK_MAXPROC && !p; i++)
        if (!S->procs[i].live) {
            p = &S->procs[i];
            memset(p, 0, sizeof *p);
            p->pid = pid;
            p->live = 1;
        }
    unlock();
    if (!p) abort();
    t_proc = p;
    t_proc_pid = pid;
    return p;
}

/* ---- memory pool ---- */
typedef struct {
    uint64_t size;
    int card;
    int kind;
} fk_block_t;

static CUresult pool_take(int card, uint64_t size) {
    fk_proc_t *p = me();
    uint64_t cur = __atomic_load_n(&S->used[card], __ATOMIC_RELAXED);
    for (;;) {
        if (cur + size > S->total[card] || cur + size < cur) {
            lock();
            fakegpu_reclaim();
            unlock();
            cur = __atomic_load_n(&S->used[card], __ATOMIC_RELAXED);
            if (cur + size > S->total[card] || cur + size < cur) return CUDA_ERROR_OUT_OF_MEMORY;
        }
        if (__atomic_compare_exchange_n(&S->used[card], &cur, cur + size, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            break;
    }
    __atomic_fetch_add(&p->used[card], size, __ATOMIC_RELAXED);
    return CUDA_SUCCESS;
}

static void pool_give(int card, uint64_t size) {
    fk_proc_t *p = me();
    __atomic_fetch_sub(&S->used[card], size, __ATOMIC_RELAXED);
    __atomic_fetch_sub(&p->used[card], size, __ATOMIC_RELAXED);
}

static void *block_new(int card, uint64_t size, int kind) {
    fk_block_t *b = malloc(sizeof *b);
    b->size = size;
    b->card = card;
    b->kind = kind;
    return b;
}

/* ---- contexts ---- */
typedef struct {
    int ordinal;
    int card;
    uint64_t charge;
} fk_ctx_t;

static __thread fk_ctx_t *t_cur;
static fk_ctx_t prim[FK_MAXDEV];
static int prim_refs[FK_MAXDEV];
static pthread_mutex_t ctx_mu = PTHREAD_MUTEX_INITIALIZER;

#define NEED_INIT                                                                                \
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
#define NEED_CTX                                                                                 \
    NEED_INIT;                                                                                   \
    if (!t_cur) return CUDA_ERROR_INVALID_CONTEXT;

static uint64_t ctx_bytes(void) { return (uint64_t)envl("FAKE_CUDA_CTX_MB", 0) << 20; }

API CUresult cuInit(unsigned int flags) {
    fakegpu_state();
    long ms = envl("FAKE_CUDA_INIT_MS", 0);
    if (!initialised && ms > 0) {
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
    }
    if (initialised) return CUDA_SUCCESS;
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    nvis = 0;
    if (!v) {
        for (int i = 0; i < S->ndev; i++) vis[nvis++] = i;
    } else {
        char *list = strdup(v), *save = NULL;
        for (char *tok = strtok_r(list, ",", &save); tok && nvis < FK_MAXDEV; tok = strtok_r(NULL, ",", &save)) {
            int card = -1;
            if (!strncmp(tok, "GPU-", 4)) {
                for (int i = 0; i < S->ndev; i++)
                    if (!strncmp(S->uuid[i], tok, strlen(tok))) card = i;
            } else {
                char *end;
                long x = strtol(tok, &end, 10);
                if (end != tok && !*end && x >= 0 && x < S->ndev) card = (int)x;
            }
            if (card < 0) break; /* the real driver ignores everything from a bad entry on */
            vis[nvis++] = card;
        }
        free(list);
    }
    initialised = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int *v) { *v = 12040; return CUDA_SUCCESS; }
API CUresult cuDeviceGetCount(int *n) { NEED_INIT; *n = nvis; return CUDA_SUCCESS; }
API CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    NEED_INIT;
    if (ordinal < 0 || ordinal >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    memcpy(u->bytes, S->uuid_bytes[vis[d]], 16);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) { return cuDeviceGetUuid(u, d); }
API CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    NEED_INIT;
    snprintf(name, (size_t)len, "Fake GPU %d", d);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = S->total[vis[d]];
    return CUDA_SUCCESS;
}

static CUresult ctx_make(fk_ctx_t *c, CUdevice d) {
    c->ordinal = d;
    c->card = vis[d];
    c->charge = ctx_bytes();
    return pool_take(c->card, c->charge);
}

API CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned int *flags, int *active) {
    NEED_INIT;
    if (d < 0 || d >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    *flags = 0;
    *active = prim_refs[d] > 0;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&ctx_mu);
    CUresult r = CUDA_SUCCESS;
    if (prim_refs[d] == 0) r = ctx_make(&prim[d], d);
    if (r == CUDA_SUCCESS) {
        prim_refs[d]++;
        *pctx = (CUcontext)&prim[d];
    }
    pthread_mutex_unlock(&ctx_mu);
    return r;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&ctx_mu);
    if (prim_refs[d] > 0 && --prim_refs[d] == 0) pool_give(prim[d].card, prim[d].charge);
    pthread_mutex_unlock(&ctx_mu);
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease(CUdevice d) { return cuDevicePrimaryCtxRelease_v2(d); }
API CUresult cuDevicePrimaryCtxReset_v2(CUdevice d) { return CUDA_SUCCESS; }
API CUresult cuDevicePrimaryCtxReset(CUdevice d) { return CUDA_SUCCESS; }

API CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    fk_ctx_t *c = malloc(sizeof *c);
    CUresult r = ctx_make(c, d);
    if (r != CUDA_SUCCESS) {
        free(c);
        return r;
    }
    t_cur = c;
    *pctx = (CUcontext)c;
    return CUDA_SUCCESS;
}
API CUresult cuCtxCreate_v3(CUcontext *pctx, void *p, int n, unsigned int flags, CUdevice d) {
    return cuCtxCreate_v2(pctx, flags, d);
}
API CUresult cuCtxCreate_v4(CUcontext *pctx, void *p, unsigned int flags, CUdevice d) {
    return cuCtxCreate_v2(pctx, flags, d);
}
API CUresult cuCtxDestroy_v2(CUcontext ctx) {
    fk_ctx_t *c = (fk_ctx_t *)ctx;
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    pool_give(c->card, c->charge);
    if (t_cur == c) t_cur = NULL;
    free(c);
    return CUDA_SUCCESS;
}
API CUresult cuCtxSetCurrent(CUcontext ctx) { t_cur = (fk_ctx_t *)ctx; return CUDA_SUCCESS; }
API CUresult cuCtxGetCurrent(CUcontext *ctx) { *ctx = (CUcontext)t_cur; return CUDA_SUCCESS; }
API CUresult cuCtxGetDevice(CUdevice *d) {
    if (!t_cur) return CUDA_ERROR_INVALID_CONTEXT;
    *d = t_cur->ordinal;
    return CUDA_SUCCESS;
}

/* ---- allocations ---- */
static CUresult alloc_kind(unsigned long long *out, int card, uint64_t size, int kind) {
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult r = pool_take(card, size);
    if (r != CUDA_SUCCESS) return r;
    *out = (uint64_t)(uintptr_t)block_new(card, size, kind);
    return CUDA_SUCCESS;
}

static CUresult free_kind(uint64_t h, int kind) {
    fk_block_t *b = (fk_block_t *)(uintptr_t)h;
    if (!b || b->kind != kind) return CUDA_ERROR_INVALID_VALUE;
    pool_give(b->card, b->size);
    b->kind = -1;
    free(b);
    return CUDA_SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t size) { NEED_CTX; return alloc_kind(p, t_cur->card, size, 1); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return free_kind(p, 1); }
API CUresult cuMemAllocManaged(CUdeviceptr *p, size_t size, unsigned int f) { NEED_CTX; return alloc_kind(p, t_cur->card, size, 1); }
API CUresult cuMemAllocAsync(CUdeviceptr *p, size_t size, CUstream s) { NEED_CTX; return alloc_kind(p, t_cur->card, size, 1); }
API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *p, size_t size, CUstream s) { return cuMemAllocAsync(p, size, s); }
API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *p, size_t size, CUmemoryPool pool, CUstream s) {
    NEED_CTX;
    return alloc_kind(p, t_cur->card, size, 1);
}
API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *p, size_t size, CUmemoryPool pool, CUstream s) {
    return cuMemAllocFromPoolAsync(p, size, pool, s);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { return free_kind(p, 1); }
API CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s) { return free_kind(p, 1); }
API CUresult cuMemAllocPitch_v2(CUdeviceptr *p, size_t *pitch, size_t w, size_t h, unsigned int e) {
    NEED_CTX;
    size_t pt = (w + 511) & ~(size_t)511; /* 512-byte pitch alignment, like current GPUs */
    CUresult r = alloc_kind(p, t_cur->card, (uint64_t)pt * h, 1);
    if (r == CUDA_SUCCESS) *pitch = pt;
    return r;
}
API CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
                         unsigned long long flags) {
    NEED_INIT;
    if (!prop || prop->location.id < 0 || prop->location.id >= nvis) return CUDA_ERROR_INVALID_DEVICE;
    return alloc_kind(h, vis[prop->location.id], size, 2);
}
API CUresult cuMemRelease(CUmemGenericAllocationHandle h) { return free_kind(h, 2); }

static uint64_t esz(int f) { return f == 1 || f == 8 ? 1 : f == 2 || f == 9 || f == 0x10 ? 2 : 4; }
API CUresult cuArrayCreate_v2(CUarray *a, const CUDA_ARRAY_DESCRIPTOR *d) {
    NEED_CTX;
    unsigned long long h;
    CUresult r = alloc_kind(&h, t_cur->card, d->Width * (d->Height ? d->Height : 1) * esz(d->Format) * d->NumChannels, 3);
    if (r == CUDA_SUCCESS) *a = (CUarray)(uintptr_t)h;
    return r;
}
API CUresult cuArray3DCreate_v2(CUarray *a, const CUDA_ARRAY3D_DESCRIPTOR *d) {
    NEED_CTX;
    unsigned long long h;
    CUresult r = alloc_kind(&h, t_cur->card,
                            d->Width * (d->Height ? d->Height : 1) * (d->Depth ? d->Depth : 1) * esz(d->Format) * d->NumChannels, 3);
    if (r == CUDA_SUCCESS) *a = (CUarray)(uintptr_t)h;
    return r;
}
API CUresult cuArrayDestroy(CUarray a) { return free_kind((uint64_t)(uintptr_t)a, 3); }
API CUresult cuMipmappedArrayCreate(CUmipmappedArray *a, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels) {
    NEED_CTX;
    uint64_t total = 0;
    for (unsigned l = 0; l < (levels ? levels : 1); l++) {
        uint64_t w = d->Width >> l, hh = d->Height >> l, z = d->Depth >> l;
        total += (w ? w : 1) * (hh ? hh : 1) * (z ? z : 1) * esz(d->Format) * d->NumChannels;
    }
    unsigned long long h;
    CUresult r = alloc_kind(&h, t_cur->card, total, 4);
    if (r == CUDA_SUCCESS) *a = (CUmipmappedArray)(uintptr_t)h;
    return r;
}
API CUresult cuMipmappedArrayDestroy(CUmipmappedArray a) { return free_kind((uint64_t)(uintptr_t)a, 4); }

API CUresult cuMemGetInfo_v2(size_t *fr, size_t *total) {
    NEED_CTX;
    uint64_t u = __atomic_load_n(&S->used[t_cur->card], __ATOMIC_RELAXED);
    *total = S->total[t_cur->card];
    *fr = u > *total ? 0 : *total - u;
    return CUDA_SUCCESS;
}

/* ---- legacy 32-bit entry points: small handles instead of host pointers ---- */
static fk_block_t *v1_blocks[65536];
static pthread_mutex_t v1_mu = PTHREAD_MUTEX_INITIALIZER;

static CUresult v1_alloc(unsigned int *p, uint64_t size) {
    unsigned long long h;
    CUresult r = alloc_kind(&h, t_cur->card, size, 1);
    if (r != CUDA_SUCCESS) return r;
    pthread_mutex_lock(&v1_mu);
    for (unsigned i = 1; i < 65536; i++)
        if (!v1_blocks[i]) {
            v1_blocks[i] = (fk_block_t *)(uintptr_t)h;
            *p = i << 8;
            pthread_mutex_unlock(&v1_mu);
            return CUDA_SUCCESS;
        }
    pthread_mutex_unlock(&v1_mu);
    free_kind(h, 1);
    return CUDA_ERROR_OUT_OF_MEMORY;
}
API CUresult cuMemAlloc(unsigned int *p, unsigned int size) { NEED_CTX; return v1_alloc(p, size); }
API CUresult cuMemAllocPitch(unsigned int *p, unsigned int *pitch, unsigned int w, unsigned int h, unsigned int e) {
    NEED_CTX;
    unsigned pt = (w + 511) & ~511u;
    CUresult r = v1_alloc(p, (uint64_t)pt * h);
    if (r == CUDA_SUCCESS) *pitch = pt;
    return r;
}
API CUresult cuMemFree(unsigned int p) {
    unsigned i = p >> 8;
    pthread_mutex_lock(&v1_mu);
    fk_block_t *b = i < 65536 ? v1_blocks[i] : NULL;
    if (b) v1_blocks[i] = NULL;
    pthread_mutex_unlock(&v1_mu);
    return b ? free_kind((uint64_t)(uintptr_t)b, 1) : CUDA_ERROR_INVALID_VALUE;
}
API CUresult cuMemGetInfo(unsigned int *fr, unsigned int *total) {
    size_t f, t;
    CUresult r = cuMemGetInfo_v2(&f, &t);
    if (r == CUDA_SUCCESS) {
        *fr = f > 0xFFFFFFFFu ? 0xFFFFFFFFu : (unsigned)f;
        *total = t > 0xFFFFFFFFu ? 0xFFFFFFFFu : (unsigned)t;
    }
    return r;
}
API CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice d) {
    size_t b;
    CUresult r = cuDeviceTotalMem_v2(&b, d);
    if (r == CUDA_SUCCESS) *bytes = b > 0xFFFFFFFFu ? 0xFFFFFFFFu : (unsigned)b;
    return r;
}
API CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice d) { return cuCtxCreate_v2(pctx, flags, d); }
API CUresult cuCtxDestroy(CUcontext ctx) { return cuCtxDestroy_v2(ctx); }

/* ---- device timeline ---- */
static void add_busy(fk_bucket_t *b, int64_t start, int64_t end) {
    while (start < end) {
        int64_t ep = start / FK_BUCKET_NS;
        int64_t bend = (ep + 1) * FK_BUCKET_NS;
        int64_t part = (end < bend ? end : bend) - start;
        fk_bucket_t *k = &b[ep % FK_NBUCKETS];
        if (k->epoch != ep) {
            k->epoch = ep;
            k->busy = 0;
        }
        k->busy += part;
        start += part;
    }
}

/* Device time in [from, to) recorded in completed buckets; pid < 0 = whole card. */
API int64_t fakegpu_busy(int card, int pid, int64_t from, int64_t to) {
    fakegpu_state();
    fk_bucket_t *b = S->b[card];
    if (pid >= 0) {
        fk_proc_t *p = fakegpu_proc_of(pid);
        if (!p) return 0;
        b = p->b[card];
    }
    int64_t sum = 0;
    lock();
    for (int64_t ep = from / FK_BUCKET_NS; ep < to / FK_BUCKET_NS; ep++) {
        fk_bucket_t *k = &b[ep % FK_NBUCKETS];
        if (k->epoch == ep) sum += k->busy;
    }
    unlock();
    return sum;
}

static CUresult occupy(int64_t ns) {
    if (ns <= 0) return CUDA_SUCCESS;
    fk_proc_t *p = me();
    int card = t_cur->card;
    int64_t now = fakegpu_now();
    lock();
    int64_t start = S->busy_until[card] > now ? S->busy_until[card] : now;
    int64_t end = start + ns;
    S->busy_until[card] = end;
    add_busy(S->b[card], start, end);
    add_busy(p->b[card], start, end);
    p->last_end[card] = end;
    unlock();
    /* A real launch queue is finite: block while too much work is ahead of us. */
    if (start - now > queue_ns) {
        int64_t w = start - now - queue_ns;
        struct timespec ts = {w / 1000000000ll, w % 1000000000ll};
        nanosleep(&ts, NULL);
    }
    return CUDA_SUCCESS;
}

static int64_t grid_ns(unsigned gx, unsigned gy, unsigned gz) {
    return ns_per_block * (int64_t)(gx ? gx : 1) * (gy ? gy : 1) * (gz ? gz : 1);
}

#define LAUNCH_ARGS CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shm, CUstream s
API CUresult cuLaunchKernel(LAUNCH_ARGS, void **params, void **extra) {
    NEED_CTX;
    if (!ns_per_block) return CUDA_SUCCESS;
    return occupy(grid_ns(gx, gy, gz));
}
API CUresult cuLaunchKernel_ptsz(LAUNCH_ARGS, void **params, void **extra) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shm, s, params, extra);
}
API CUresult cuLaunchCooperativeKernel(LAUNCH_ARGS, void **params) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shm, s, params, NULL);
}
API CUresult cuLaunchCooperativeKernel_ptsz(LAUNCH_ARGS, void **params) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shm, s, params, NULL);
}
API CUresult cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **params, void **extra) {
    NEED_CTX;
    if (!ns_per_block) return CUDA_SUCCESS;
    return occupy(grid_ns(c->gridDimX, c->gridDimY, c->gridDimZ));
}
API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *c, CUfunction f, void **params, void **extra) {
    return cuLaunchKernelEx(c, f, params, extra);
}
API CUresult cuGraphLaunch(CUgraphExec g, CUstream s) { NEED_CTX; return occupy(graph_ns); }
API CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream s) { return cuGraphLaunch(g, s); }

API CUresult cuCtxSynchronize(void) {
    NEED_CTX;
    fk_proc_t *p = me();
    int64_t w = p->last_end[t_cur->card] - fakegpu_now();
    if (w > 0) {
        struct timespec ts = {w / 1000000000ll, w % 1000000000ll};
        nanosleep(&ts, NULL);
    }
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream s) { return cuCtxSynchronize(); }

/* ---- cuGetProcAddress ---- */
API CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, cuuint64_t flags);
API CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, cuuint64_t flags, int *status);

#define E(n) {#n, (void *)n}
static const struct {
    const char *name;
    void *fn;
} table[] = {
    E(cuInit), E(cuDriverGetVersion), E(cuDeviceGetCount), E(cuDeviceGet), E(cuDeviceGetUuid),
    E(cuDeviceGetUuid_v2), E(cuDeviceGetName), E(cuDeviceTotalMem_v2), E(cuDevicePrimaryCtxGetState),
    E(cuDevicePrimaryCtxRetain), E(cuDevicePrimaryCtxRelease), E(cuDevicePrimaryCtxRelease_v2),
    E(cuDevicePrimaryCtxReset), E(cuDevicePrimaryCtxReset_v2), E(cuCtxCreate_v2), E(cuCtxCreate_v3),
    E(cuCtxCreate_v4), E(cuCtxDestroy_v2), E(cuCtxSetCurrent), E(cuCtxGetCurrent), E(cuCtxGetDevice),
    E(cuMemAlloc_v2), E(cuMemFree_v2), E(cuMemAllocManaged), E(cuMemAllocAsync), E(cuMemAllocAsync_ptsz),
    E(cuMemAllocFromPoolAsync), E(cuMemAllocFromPoolAsync_ptsz), E(cuMemFreeAsync), E(cuMemFreeAsync_ptsz),
    E(cuMemAllocPitch_v2), E(cuMemCreate), E(cuMemRelease), E(cuArrayCreate_v2), E(cuArray3DCreate_v2),
    E(cuArrayDestroy), E(cuMipmappedArrayCreate), E(cuMipmappedArrayDestroy), E(cuMemGetInfo_v2),
    E(cuLaunchKernel), E(cuLaunchKernel_ptsz), E(cuLaunchCooperativeKernel), E(cuLaunchCooperativeKernel_ptsz),
    E(cuLaunchKernelEx), E(cuLaunchKernelEx_ptsz), E(cuGraphLaunch), E(cuGraphLaunch_ptsz),
    E(cuCtxSynchronize), E(cuStreamSynchronize), E(cuGetProcAddress), E(cuGetProcAddress_v2),
    E(cuMemAlloc), E(cuMemAllocPitch), E(cuMemFree), E(cuMemGetInfo), E(cuDeviceTotalMem), E(cuCtxCreate),
    E(cuCtxDestroy),
};

static void *find(const char *n) {
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(table[i].name, n)) return table[i].fn;
    return NULL;
}

/* Like the driver: the newest ABI version of the name, the per-thread-stream variant when
 * asked for. */
API CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, cuuint64_t flags, int *status) {
    char buf[128];
    void *f = NULL;
    static const char *suffixes[] = {"_v4", "_v3", "_v2", ""};
    if (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) {
        snprintf(buf, sizeof buf, "%s_ptsz", sym);
        f = find(buf);
    }
    if (!f && ver < 3020) f = find(sym); /* pre-3.2 callers get the 32-bit ABI */
    for (int i = 0; !f && i < 4; i++) {
        if (i == 0 && !strcmp(sym, "cuCtxCreate")) continue; /* v4 needs a newer "driver" */
        snprintf(buf, sizeof buf, "%s%s", sym, suffixes[i]);
        f = find(buf);
    }
    if (status) *status = f ? 0 : 1;
    *pfn = f;
    return f ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

API CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, cuuint64_t flags) {
    return cuGetProcAddress_v2(sym, pfn, ver, flags, NULL);
}
