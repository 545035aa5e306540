/* Process-shared futex wait/wake: FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline,
   so a wait that is interrupted and resumed never drifts. */
#define _GNU_SOURCE
#include "futex.h"

#include <errno.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "deadline.h"

int cp_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t deadline)
{
    struct timespec ts, *tsp = NULL;
    if (deadline != CP_NO_DEADLINE) {
        ts = cp_ns_to_timespec(deadline);
        tsp = &ts;
    }
    /* Not FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes. */
    long r = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_BITSET, expected, tsp, NULL,
                     FUTEX_BITSET_MATCH_ANY);
    if (r == 0)
        return 0;
    int err = errno;
    if (err == EAGAIN)
        return 0; /* the word changed before we slept */
    if (err == ETIMEDOUT || err == EINTR)
        return -err;
    return -err;
}

int cp_futex_wake(_Atomic uint32_t *word, int n)
{
    long r = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? -errno : (int)r;
}
