/* Force-included (gcc -include) before vgpu.c when building libvgpu.so, so the library
 * needs nothing newer than glibc 2.17. The build links against stubs of glibc 2.17's
 * libraries (glibc/<arch>.syms); this header bridges the few calls whose 2.17 form differs
 * from what current headers emit. */
#ifndef HAMI_GLIBC_COMPAT_H
#define HAMI_GLIBC_COMPAT_H

/* Included ahead of vgpu.c's own first line, so it must select the same features. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sys/stat.h>

/* Before glibc 2.33 fstat was not exported: <sys/stat.h> inlined it into __fxstat with the
 * struct-layout version, which every glibc still provides (a compat symbol from 2.33). The
 * layout of struct stat itself never changed on these architectures. */
#if defined(__x86_64__)
#define HAMI_STAT_VER 1
#elif defined(__aarch64__)
#define HAMI_STAT_VER 0
#else
#error "glibc_compat.h: add this architecture's _STAT_VER and a glibc/<arch>.syms list"
#endif

extern int __fxstat(int ver, int fd, struct stat *buf);

static inline int hami_fstat(int fd, struct stat *buf) { return __fxstat(HAMI_STAT_VER, fd, buf); }

#define fstat(fd, buf) hami_fstat((fd), (buf))

#endif
