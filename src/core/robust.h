/* Process-shared robust mutexes: a holder killed with the lock held does not wedge the others. */
#ifndef CPOOL_ROBUST_H
#define CPOOL_ROBUST_H

#include <pthread.h>

/* Initialise m in shared memory. 0 or -errno. */
int cp_robust_init(pthread_mutex_t *m);

/* Lock m; a lock abandoned by a dead holder is taken over (made consistent). Returns 0, 1 when
   it was abandoned (the caller repairs what the holder may have left half done), or -errno. */
int cp_robust_lock(pthread_mutex_t *m);

#endif
