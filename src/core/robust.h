/* Process-shared robust mutexes: a holder killed with the lock held does not wedge the others.
   The one implementation of init and of lock-with-take-over for every lock of the core that
   lives in shared memory (the queues' ring, the pool's channel, the buffer heap). */
#ifndef CPOOL_ROBUST_H
#define CPOOL_ROBUST_H

#include <pthread.h>
#include <stdint.h>

/* Initialise m in shared memory (type PTHREAD_MUTEX_DEFAULT). 0 or -errno. */
int cp_robust_init(pthread_mutex_t *m);

/* The same with a mutex type (PTHREAD_MUTEX_ERRORCHECK: a relock or a foreign unlock fails
   instead of hanging). 0 or -errno. */
int cp_robust_init_type(pthread_mutex_t *m, int type);

/* Lock m; a lock abandoned by a dead holder is taken over (made consistent). Returns 0, 1 when
   it was abandoned (the caller repairs what the holder may have left half done), or -errno. */
int cp_robust_lock(pthread_mutex_t *m);

/* Repairs what a dead holder left half done; called with the lock held, before the lock is
   made consistent, so a repairer that dies in turn leaves the repair to the next locker. */
typedef void (*cp_robust_repair_fn)(void *arg);

/* Lock m, waiting until the absolute CLOCK_MONOTONIC deadline (CP_NO_DEADLINE: for ever; a
   deadline in the past: try once). An abandoned lock is repaired (repair may be NULL) and
   taken over. Returns 0, 1 when it was abandoned, -EBUSY (deadline in the past and the lock
   held), -ETIMEDOUT, or -errno. */
int cp_robust_lock_until(pthread_mutex_t *m, int64_t deadline, cp_robust_repair_fn repair, void *arg);

#endif
