/* Shared per-container region: the byte layout is documented in ../README.md and read
 * by shared/region.py; any change here must bump HAMI_REGION_VERSION. */
#ifndef HAMI_REGION_H
#define HAMI_REGION_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#define HAMI_REGION_MAGIC 0x52475648u /* "HVGR" little-endian */
#define HAMI_REGION_VERSION 1u
#define HAMI_MAX_DEVICES 16
#define HAMI_MAX_SLOTS 1024
#define HAMI_HEADER_SIZE 4096u

typedef struct {
    uint64_t limit;          /* bytes, 0 = unlimited */
    uint64_t used;           /* bytes charged by all live slots (cache of the slot sums) */
    uint64_t last_kernel_ns; /* CLOCK_REALTIME of the container's latest launch */
    int64_t tokens;          /* compute budget left (launch cost units) */
    double rate;             /* compute budget refill, units per second */
    uint64_t last_refill_ns; /* CLOCK_MONOTONIC of the latest refill */
    uint64_t prio_hint_until_ns; /* written by the node agent, CLOCK_REALTIME */
    uint32_t sm_limit;       /* percent, 0 = none */
    uint32_t util_own;       /* container SM utilisation, percent (latest sample) */
    uint32_t util_device;    /* whole-card utilisation, percent (latest sample) */
    uint32_t throttling;     /* 1 while the cap is applied */
    uint64_t total;          /* real card memory, bytes (0 until known) */
    uint64_t last_ctl_ns;    /* CLOCK_MONOTONIC of the latest controller step */
    uint64_t launched_at_ctl;/* container launch cost total at that step */
    uint64_t nvml_seen_us;   /* NVML sample timestamp consumed by that step */
    uint32_t contended;      /* another tenant was active at that step */
    uint32_t reserved0;
    uint64_t reserved[4];
    char uuid[48];
} hami_dev_t; /* 192 bytes */

typedef struct {
    int32_t pid;
    uint32_t state; /* 0 free, 1 live */
    int32_t hostpid;
    int32_t priority;
    uint64_t start_time; /* /proc/<pid>/stat starttime, detects pid reuse */
    uint64_t last_kernel_ns;
    uint64_t pad[4];
    uint64_t used[HAMI_MAX_DEVICES];
    uint64_t launched[HAMI_MAX_DEVICES]; /* cumulative launch cost units */
    uint32_t util[HAMI_MAX_DEVICES];     /* this process's SM utilisation, percent */
} hami_slot_t; /* 384 bytes */

typedef struct {
    uint32_t magic;
    uint32_t version;
    uint32_t header_size;
    uint32_t slot_size;
    uint32_t max_slots;
    uint32_t max_devices;
    uint32_t num_devices;
    int32_t priority;
    uint32_t policy; /* 0 default, 1 force, 2 disable */
    uint32_t hints; /* node agent: nonzero while any prio_hint_until_ns is set */
    uint64_t created_ns;
    uint8_t pad1[64 - 48];
    union {
        pthread_mutex_t mu;
        uint8_t raw[64];
    } lock;
    hami_dev_t dev[HAMI_MAX_DEVICES];
} hami_header_t;

typedef struct {
    hami_header_t h;
    uint8_t pad[HAMI_HEADER_SIZE - sizeof(hami_header_t)];
    hami_slot_t slots[HAMI_MAX_SLOTS];
} hami_region_t;

_Static_assert(sizeof(hami_dev_t) == 192, "device record size");
_Static_assert(sizeof(hami_slot_t) == 384, "slot size");
_Static_assert(sizeof(pthread_mutex_t) <= 64, "mutex fits");
_Static_assert(sizeof(hami_header_t) <= HAMI_HEADER_SIZE, "header fits");

#endif
