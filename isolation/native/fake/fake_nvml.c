/* Fake libnvidia-ml.so.1: enumerates every card of the fake GPU state (NVML ignores
 * CUDA_VISIBLE_DEVICES) and reports memory and the utilisation measured on the fake
 * device timeline. FAKE_NVML_WINDOW_MS (default 50) is the averaging window, like the
 * driver's sample period. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cudadefs.h"
#include "fake_state.h"

#define API __attribute__((visibility("default")))

struct nvmlDevice_st {
    int index;
};
static struct nvmlDevice_st devs[FK_MAXDEV];
static int inited;

static int64_t window_ns(void) {
    const char *v = getenv("FAKE_NVML_WINDOW_MS");
    long ms = v ? strtol(v, NULL, 10) : 50;
    return (ms > 0 ? ms : 50) * 1000000ll;
}

static unsigned long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000;
}

API nvmlReturn_t nvmlInit_v2(void) {
    fakegpu_state();
    for (int i = 0; i < FK_MAXDEV; i++) devs[i].index = i;
    inited = 1;
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }
API nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }
API const char *nvmlErrorString(nvmlReturn_t r) { return r ? "fake nvml error" : "success"; }

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) {
    if (!inited) return NVML_ERROR_UNINITIALIZED;
    *n = (unsigned)fakegpu_state()->ndev;
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    if (!inited) return NVML_ERROR_UNINITIALIZED;
    if (i >= (unsigned)fakegpu_state()->ndev) return NVML_ERROR_INVALID_ARGUMENT;
    *d = &devs[i];
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *i) {
    *i = (unsigned)d->index;
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned int len) {
    snprintf(buf, len, "%s", fakegpu_state()->uuid[d->index]);
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    fk_state_t *s = fakegpu_state();
    m->total = s->total[d->index];
    m->used = __atomic_load_n(&s->used[d->index], __ATOMIC_RELAXED);
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    nvmlMemory_t v1;
    nvmlDeviceGetMemoryInfo(d, &v1);
    m->total = v1.total;
    m->reserved = 64ull << 20 < v1.free ? 64ull << 20 : 0;
    m->used = v1.used;
    m->free = v1.free - m->reserved;
    return NVML_SUCCESS;
}

static unsigned pct(int64_t busy, int64_t span) {
    if (span <= 0) return 0;
    int64_t p = (busy * 100 + span / 2) / span;
    return p > 100 ? 100 : (unsigned)p;
}

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    int64_t now = fakegpu_now(), w = window_ns();
    /* Only completed buckets count: align the window to them. */
    int64_t to = now / FK_BUCKET_NS * FK_BUCKET_NS, from = to - w;
    u->gpu = pct(fakegpu_busy(d->index, -1, from, to), to - from);
    u->memory = 0;
    return NVML_SUCCESS;
}

/* One sample per process that ran in the window since lastSeen (at least one sample
 * period, at most the history). */
API nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, nvmlProcessUtilizationSample_t *out,
                                                 unsigned int *count, unsigned long long lastSeen) {
    fk_state_t *s = fakegpu_state();
    int64_t now = fakegpu_now(), w = window_ns();
    unsigned long long us = now_us();
    if (lastSeen && lastSeen < us) {
        int64_t since = (int64_t)(us - lastSeen) * 1000;
        if (since > w) w = since;
    }
    if (w > (FK_NBUCKETS - 8) * FK_BUCKET_NS) w = (FK_NBUCKETS - 8) * FK_BUCKET_NS;
    int64_t to = now / FK_BUCKET_NS * FK_BUCKET_NS, from = to - w;
    from = from / FK_BUCKET_NS * FK_BUCKET_NS;
    unsigned n = 0;
    for (int i = 0; i < FK_MAXPROC; i++) {
        fk_proc_t *p = &s->procs[i];
        if (!p->live) continue;
        int64_t b = fakegpu_busy(d->index, p->pid, from, to);
        if (b <= 0) continue;
        if (out && n < *count) {
            out[n].pid = (unsigned)p->pid;
            out[n].timeStamp = us;
            out[n].smUtil = pct(b, to - from);
            out[n].memUtil = out[n].encUtil = out[n].decUtil = 0;
        }
        n++;
    }
    if (!out || n > *count) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    *count = n;
    return n ? NVML_SUCCESS : NVML_ERROR_NOT_FOUND;
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *out) {
    fk_state_t *s = fakegpu_state();
    unsigned n = 0;
    for (int i = 0; i < FK_MAXPROC; i++) {
        fk_proc_t *p = &s->procs[i];
        uint64_t used = __atomic_load_n(&p->used[d->index], __ATOMIC_RELAXED);
        if (!p->live || !used) continue;
        if (out && n < *count) out[n] = (nvmlProcessInfo_t){(unsigned)p->pid, used, 0xFFFFFFFFu, 0xFFFFFFFFu};
        n++;
    }
    nvmlReturn_t r = n > *count ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    *count = n;
    return r;
}
