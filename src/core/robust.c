/* Process-shared robust mutexes (init and lock with take-over), for the pool's channel and its
   buffer heap. */
#include "robust.h"

#include <errno.h>

int cp_robust_init(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    int r = pthread_mutexattr_init(&a);
    if (r)
        return -r;
    if ((r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0 &&
        (r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0)
        r = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return -r;
}

int cp_robust_lock(pthread_mutex_t *m)
{
    int e = pthread_mutex_lock(m);
    if (e == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        return 1;
    }
    return -e;
}
