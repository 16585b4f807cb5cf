/* LD_PRELOAD shim: every fsync/fdatasync waits FSYNC_DELAY_US microseconds more, as on a slower disk. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <errno.h>

static long delay_us(void) {
    static long us = -1;
    if (us < 0) { const char *v = getenv("FSYNC_DELAY_US"); us = v ? atol(v) : 0; }
    return us;
}
static void wait_more(void) {
    long us = delay_us();
    if (us <= 0) return;
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    int saved = errno;
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
    errno = saved;
}
static int delayed(int (**real)(int), const char *name, int fd) {
    if (!*real) *real = (int (*)(int))dlsym(RTLD_NEXT, name);
    int rc = (*real)(fd);
    wait_more();
    return rc;
}
int fsync(int fd) { static int (*real)(int); return delayed(&real, "fsync", fd); }
int fdatasync(int fd) { static int (*real)(int); return delayed(&real, "fdatasync", fd); }
