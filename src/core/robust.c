/* Process-shared robust mutexes (init and lock with take-over, see robust.h). */
#define _GNU_SOURCE
#include "robust.h"

#include <errno.h>

#include "deadline.h"

int cp_robust_init_type(pthread_mutex_t *m, int type)
{
    pthread_mutexattr_t a;
    int r = pthread_mutexattr_init(&a);
    if (r)
        return -r;
    if ((r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0 &&
        (r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0 &&
        (r = pthread_mutexattr_settype(&a, type)) == 0)
        r = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return -r;
}

int cp_robust_init(pthread_mutex_t *m)
{
    return cp_robust_init_type(m, PTHREAD_MUTEX_DEFAULT);
}

/* e from a lock call: an abandoned lock is repaired and made consistent. */
static int taken(pthread_mutex_t *m, int e, cp_robust_repair_fn repair, void *arg)
{
    if (e != EOWNERDEAD)
        return -e;
    if (repair)
        repair(arg);
    pthread_mutex_consistent(m);
    return 1;
}

int cp_robust_lock(pthread_mutex_t *m)
{
    return taken(m, pthread_mutex_lock(m), NULL, NULL);
}

int cp_robust_lock_until(pthread_mutex_t *m, int64_t deadline, cp_robust_repair_fn repair, void *arg)
{
    int e;
    if (deadline == CP_NO_DEADLINE) {
        e = pthread_mutex_lock(m);
    }
    else if (deadline <= cp_now_ns()) {
        e = pthread_mutex_trylock(m);
    }
    else {
        struct timespec ts = cp_ns_to_timespec(deadline);
        e = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
    }
    return taken(m, e, repair, arg);
}
