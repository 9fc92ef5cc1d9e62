/* Slows fsync() and fdatasync() by SLOW_FSYNC_US microseconds: a stand-in for a disk whose
 * flush takes milliseconds (a cloud volume), for measuring what overlapping fsyncs buys.
 * Benchmarks only (docs/performance.md, "The leader's fsync overlaps replication"):
 *   gcc -shared -fPIC -O2 -o /tmp/slow_fsync.so scripts/slow_fsync.c -ldl
 *   LD_PRELOAD=/tmp/slow_fsync.so SLOW_FSYNC_US=2000 target/release/raftpg bench ...
 * (the bench's nodes inherit the environment). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static void delay(void) {
    const char *s = getenv("SLOW_FSYNC_US");
    long us = s ? atol(s) : 0;
    if (us > 0) { struct timespec t = { us / 1000000, (us % 1000000) * 1000 }; nanosleep(&t, 0); }
}
int fdatasync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fdatasync"); delay(); return real(fd); }
int fsync(int fd) { static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fsync"); delay(); return real(fd); }
