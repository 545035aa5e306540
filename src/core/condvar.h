/* A condition variable's waiters in shared memory: one slot per sleeping thread or process,
   naming it by pid and start time, so a notify wakes exactly the sleepers it chose (the oldest
   first), never waits for a sleeper to answer, and passes over one that was killed; and so the
   others can learn that a sleeper died (a Barrier breaks on it).

   Each slot's state word is also what its sleeper waits on with a futex: notify changes it to
   WOKEN and wakes that word alone. wait and notify run under the condition's lock (a Lock or
   RLock of the caller's), except a sleeper's own wake-up, timeout and departure, which change
   only its slot, with compare-and-swap. */
#ifndef CPOOL_CONDVAR_H
#define CPOOL_CONDVAR_H

#include <stdatomic.h>
#include <stdint.h>

#define CP_COND_MAGIC 0x434f4e31u /* "CON1" */
#define CP_COND_SLOTS 255

/* Slot states. DEAD: notify found the sleeper killed (kept, not freed, when it is asked to, so
   cp_cond_reap can count it). */
enum { CP_COND_FREE = 0, CP_COND_CLAIMED = 1, CP_COND_SLEEPING = 2, CP_COND_WOKEN = 3,
       CP_COND_DEAD = 4 };

typedef struct {
    _Atomic uint32_t state;
    uint32_t pid;
    uint32_t ticket;    /* order of arrival: notify wakes the lowest first */
    uint32_t start;     /* low 32 bits of the sleeper's start time (/proc/PID/stat field 22) */
} cp_cond_slot_t;

typedef struct {
    uint32_t magic;
    uint32_t nslots;
    _Atomic uint32_t next_ticket;
    uint32_t pad;
    _Atomic int64_t last_scan;  /* when a sleeper last looked for dead ones (rate limit) */
    char pad2[40];
    cp_cond_slot_t slot[CP_COND_SLOTS];
} cp_cond_t;

void cp_cond_init(cp_cond_t *c);

/* Under the lock: a slot for the caller, SLEEPING (index), or -EAGAIN when all are taken by
   live sleepers. */
int cp_cond_enlist(cp_cond_t *c);

/* Sleep in slot i until WOKEN (1: the slot is freed), the deadline (-ETIMEDOUT) or a signal
   (-EINTR): the slot stays SLEEPING, for cp_cond_sleep again or cp_cond_leave. */
int cp_cond_sleep(cp_cond_t *c, int i, int64_t deadline);

/* Give slot i up without a wake-up: 0, or 1 when a notify woke it after all (taken). */
int cp_cond_leave(cp_cond_t *c, int i);

/* Under the lock: wake up to n sleepers, the oldest first, passing over dead ones (freed when
   reclaim, otherwise marked DEAD). How many live sleepers were woken. */
int cp_cond_notify(cp_cond_t *c, uint32_t n, int reclaim);

/* From a sleeper, at most once per interval_ns among all sleepers: how many other sleepers
   are dead (slots unchanged). 0 when another sleeper looked recently. */
int cp_cond_dead_sleepers(cp_cond_t *c, int64_t interval_ns);

/* Under the lock: free the slots of dead sleepers; how many there were. */
int cp_cond_reap(cp_cond_t *c);

/* Sleepers (live or not yet found dead). */
int cp_cond_sleeping(cp_cond_t *c);

#endif
