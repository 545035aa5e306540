/* Futex locks, semaphores and events in shared memory (one 64-byte arena slot each).

   Mutex (Lock, RLock): the word holds the owner's pid, 0 when free; sleepers are counted
   beside it. The pid is what lets a waiter notice that the owner died
   (cp_mutex_take_from_dead): a killed process never locks the others out for ever.
   Semaphore: the word is the value; sleepers are counted beside it so a post makes a
   futex_wake only when someone sleeps.
   Event: the word is (generation << 1) | flag; set bumps the generation, so a waiter that
   slept through a set followed at once by a clear still learns it was set.

   Every wait takes an absolute CLOCK_MONOTONIC deadline and returns -ETIMEDOUT when it passes,
   -EINTR on a signal; callers loop with a short deadline to check for signals and dead owners. */
#ifndef CPOOL_SEMLOCK_H
#define CPOOL_SEMLOCK_H

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include "spin.h"

/* Kinds: the first two are the standard library's numbers (RECURSIVE_MUTEX, SEMAPHORE). */
enum { CP_SEM_RECURSIVE = 0, CP_SEM_SEMAPHORE = 1, CP_SEM_MUTEX = 2, CP_SEM_EVENT = 3 };

#define CP_SEM_MAGIC 0x53454d31u /* "SEM1" */
#define CP_SEM_VALUE_MAX 0x7fffffffu

typedef struct {
    _Atomic uint32_t word;
    _Atomic uint32_t nwaiters;  /* sleepers: a release or set wakes only when there are some */
    uint32_t magic;
    uint32_t kind;
    uint32_t maxvalue;
} cp_sem_t;


/* The caller's pid as stored in mutex words: cached (getpid is a system call on current
   glibc), refreshed in forked children. cp_sem_self_init() once before any use. */
extern uint32_t cp_sem_self_pid;
void cp_sem_self_init(void);

static inline uint32_t cp_sem_self(void)
{
    return cp_sem_self_pid;
}

void cp_sem_init(cp_sem_t *s, int kind, uint32_t value, uint32_t maxvalue);

/* Take without blocking: 0, or -EAGAIN. Inline: it is the whole of an uncontended acquire. */
static inline int cp_sem_trywait(cp_sem_t *s)
{
    uint32_t v = atomic_load_explicit(&s->word, memory_order_relaxed);
    if (s->kind == CP_SEM_MUTEX || s->kind == CP_SEM_RECURSIVE) {
        return v == 0 && atomic_compare_exchange_strong_explicit(
                             &s->word, &v, cp_sem_self_pid, memory_order_acquire,
                             memory_order_relaxed) ? 0 : -EAGAIN;
    }
    while (v > 0) {
        if (atomic_compare_exchange_weak_explicit(&s->word, &v, v - 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return 0;
    }
    return -EAGAIN;
}

/* Spin (when spin is not NULL), then sleep until taken (0), the deadline (-ETIMEDOUT) or a
   signal (-EINTR). */
int cp_sem_wait(cp_sem_t *s, int64_t deadline, cp_spin_t *spin);

/* Release: 0, or -EOVERFLOW when the value is already at its maximum (or the lock is free). */
int cp_sem_post(cp_sem_t *s);

/* The value as the standard library reports it (a mutex: 1 free, 0 held). */
uint32_t cp_sem_value(cp_sem_t *s);

/* If the mutex's owner is dead, take the lock over: the dead owner's pid, or 0 (owner alive,
   or lock free). */
uint32_t cp_mutex_take_from_dead(cp_sem_t *s);

/* Whether pid is gone (no such process, or a zombie nobody reaped yet). */
int cp_pid_dead(pid_t pid);

/* Events. */
void cp_event_set(cp_sem_t *s);
void cp_event_clear(cp_sem_t *s);
int cp_event_is_set(cp_sem_t *s);
/* Wait for the flag, or for a set since start (the word read when the wait began):
   1 set, -ETIMEDOUT, -EINTR. */
int cp_event_wait(cp_sem_t *s, uint32_t start, int64_t deadline, cp_spin_t *spin);

#endif
