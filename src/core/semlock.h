/* Futex locks, semaphores and events in shared memory (one 64-byte arena slot each).

   Mutex (Lock, RLock): the word holds the owner's pid, 0 when free; sleepers are counted
   beside it. The pid, with the owner's start time beside it, is what lets a waiter notice
   that the owner died (cp_mutex_take_from_dead), even when its pid was given to a new
   process: a killed process never locks the others out for ever.
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
    uint32_t pad;
    /* A mutex owner's start time (field 22 of /proc/PID/stat), 0 while unknown: with the pid it
       tells a dead owner from a new process that was given the same pid. Written by the owner
       just after it took the word, cleared before the word is released. */
    _Atomic uint64_t owner_start;
} cp_sem_t;


/* The caller's pid as stored in mutex words: cached (getpid is a system call on current
   glibc), refreshed in forked children. cp_sem_self_init() once before any use. */
extern uint32_t cp_sem_self_pid;
void cp_sem_self_init(void);

static inline uint32_t cp_sem_self(void)
{
    return cp_sem_self_pid;
}

/* The caller's start time, read from /proc once per process (0 after a fork: read again). */
extern uint64_t cp_sem_self_start_cache;
uint64_t cp_sem_self_start_read(void);

static inline uint64_t cp_sem_self_start(void)
{
    uint64_t t = cp_sem_self_start_cache;
    return t ? t : cp_sem_self_start_read();
}

/* Start time of pid (in clock ticks since boot), 0 when it cannot be read; *zombie set when the
   process has exited and waits to be reaped. -ESRCH when there is no such process. */
int cp_proc_start(pid_t pid, uint64_t *start, int *zombie);

void cp_sem_init(cp_sem_t *s, int kind, uint32_t value, uint32_t maxvalue);

/* Take without blocking: 0, or -EAGAIN. Inline: it is the whole of an uncontended acquire. */
static inline int cp_sem_trywait(cp_sem_t *s)
{
    uint32_t v = atomic_load_explicit(&s->word, memory_order_relaxed);
    if (s->kind == CP_SEM_MUTEX || s->kind == CP_SEM_RECURSIVE) {
        if (v != 0 || !atomic_compare_exchange_strong_explicit(&s->word, &v, cp_sem_self_pid,
                                                               memory_order_acquire,
                                                               memory_order_relaxed))
            return -EAGAIN;
        atomic_store_explicit(&s->owner_start, cp_sem_self_start(), memory_order_release);
        return 0;
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

/* If the mutex's owner is dead, take the lock over: the dead owner's pid (its start time in
   *dead_start), or 0 (owner alive, or lock free). An owner is dead when its pid is gone or a
   zombie, or when the process with that pid started at another time than the owner did. */
uint32_t cp_mutex_take_from_dead(cp_sem_t *s, uint64_t *dead_start);

/* Undo a take-over: the lock, held by the caller, goes back to the dead owner. */
void cp_mutex_give_back(cp_sem_t *s, uint32_t pid, uint64_t start);

/* Whether the process (pid, start) is gone: no such pid, a zombie, or the pid now belongs to a
   process that started at another time (start 0: unknown, the pid alone decides). */
int cp_proc_dead(pid_t pid, uint64_t start);

/* Events. */
void cp_event_set(cp_sem_t *s);
void cp_event_clear(cp_sem_t *s);
int cp_event_is_set(cp_sem_t *s);
/* Wait for the flag, or for a set since start (the word read when the wait began):
   1 set, -ETIMEDOUT, -EINTR. */
int cp_event_wait(cp_sem_t *s, uint32_t start, int64_t deadline, cp_spin_t *spin);

#endif
