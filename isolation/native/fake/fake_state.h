/* State of the fake GPU, shared by the fake libcuda.so.1 and libnvidia-ml.so.1 and, when
 * FAKE_GPU_STATE names a file, by every process on the "node" (so that tenants compete
 * for one device timeline and one memory pool, as on a real card). */
#ifndef FAKE_STATE_H
#define FAKE_STATE_H
#include <pthread.h>
#include <stdint.h>

#define FK_MAXDEV 8
#define FK_MAXPROC 64
#define FK_BUCKET_NS 5000000ll /* utilisation history granularity: 5 ms */
#define FK_NBUCKETS 512        /* 2.56 s of history */

typedef struct {
    int64_t epoch;
    int64_t busy;
} fk_bucket_t;

typedef struct {
    int32_t pid;
    int32_t live;
    uint64_t used[FK_MAXDEV];
    int64_t last_end[FK_MAXDEV];
    fk_bucket_t b[FK_MAXDEV][FK_NBUCKETS];
} fk_proc_t;

typedef struct {
    uint32_t magic;
    int32_t ndev;
    pthread_mutex_t mu;
    uint64_t total[FK_MAXDEV];
    uint64_t used[FK_MAXDEV];
    int64_t busy_until[FK_MAXDEV];
    char uuid[FK_MAXDEV][48];
    unsigned char uuid_bytes[FK_MAXDEV][16];
    fk_bucket_t b[FK_MAXDEV][FK_NBUCKETS];
    fk_proc_t procs[FK_MAXPROC];
} fk_state_t;

/* Exported by the fake libcuda for the fake NVML and the test programs. */
fk_state_t *fakegpu_state(void);
fk_proc_t *fakegpu_proc_of(int pid);
int64_t fakegpu_now(void);
int64_t fakegpu_busy(int card, int pid, int64_t from, int64_t to);
void fakegpu_reclaim(void);
#endif
