/* Process-shared futex wait/wake on a 32-bit word in shared memory (Linux). */
#ifndef CPOOL_FUTEX_H
#define CPOOL_FUTEX_H

#include <stdatomic.h>
#include <stdint.h>

/* Sleep while *word == expected, until woken, the absolute CLOCK_MONOTONIC deadline (ns,
   CP_NO_DEADLINE for none) passes, or a signal arrives.
   Returns 0 when woken (or the word already differed), -ETIMEDOUT, or -EINTR.
   Spurious wake-ups are possible: callers re-check their condition in a loop. */
int cp_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t deadline);

/* Wake up to n sleepers on word (INT32_MAX for all). Returns how many were woken. */
int cp_futex_wake(_Atomic uint32_t *word, int n);

#endif
