/* The core's one spin/wait policy: spin on a test for a budget, then sleep on a futex word until
   a deadline. Used by locks, events, the queues' ring, the pool's channel and pipes.

   Contract of every blocking wait of the core built on it:
   - first spin: test the condition, cp_cpu_relax() between tests, read the clock every
     CP_SPIN_ROUND tests; stop when the test holds (no sleep, no system call) or the budget is
     spent. A spin whose peer may share our core (CP_SPIN_YIELD) yields the CPU every round.
   - then sleep on a futex word, counted in a sleepers word (cp_sleep_counted) so that a waker
     makes the FUTEX_WAKE system call only while someone sleeps;
   - a sleep ends at the caller's deadline (absolute CLOCK_MONOTONIC), on a wake, or on a
     signal to the sleeping thread (-EINTR). Callers re-check their condition.
   - the "Ctrl-C within 100 ms" promise: CP_WAIT_SLICE_NS (deadline.h) is its one constant. A
     wait the caller cannot bound (for a lock held by a stopped process) returns -ETIMEDOUT
     after it; a binding that must run signal handlers while another thread gets the signal
     passes deadlines at most CP_WAIT_SLICE_NS ahead and calls again. */
#ifndef CPOOL_SPIN_H
#define CPOOL_SPIN_H

#include <stdatomic.h>
#include <stdint.h>

/* Spin before sleeping: when the peer runs on another core it answers within a microsecond or
   two, while a sleep + wake costs several on each side (tens in a VM whose idle cores halt).
   When the peer is not running (more runnable processes than cores) spinning only steals its
   time: so each waiter adapts its budget, doubling it after a spin that succeeded and halving
   it after one that failed; below CP_SPIN_MIN_NS it stops spinning, but probes every
   CP_SPIN_PROBE_EVERY waits. */
#define CP_SPIN_START_NS 4000
#define CP_SPIN_MIN_NS 1000
#define CP_SPIN_MAX_NS 50000
#define CP_SPIN_PROBE_NS 2000
#define CP_SPIN_PROBE_EVERY 16
#define CP_SPIN_ROUND 32 /* tests between two looks at the clock (and two yields) */

/* A waiter's budget (process-private: one per handle; threads sharing a handle may share it,
   its fields are read and written with relaxed atomics). */
typedef struct {
    int32_t ns;       /* 0: sleep at once (but probe now and then) */
    uint32_t waits;
    int32_t probe_ns; /* the probe's budget; 0 means CP_SPIN_PROBE_NS */
} cp_spin_t;
#define CP_SPIN_INIT CP_SPIN_START_NS

/* A waiter whose peer, once asleep, takes longer to wake than CP_SPIN_PROBE_NS (a process
   blocked in read() on a VM: tens of microseconds) never sees a short spin pay; it starts and
   probes with the full budget instead. */
#define CP_SPIN_LONG {CP_SPIN_MAX_NS, 0, CP_SPIN_MAX_NS}

/* Flags of a spin. */
#define CP_SPIN_SLOW_TEST 1 /* the test is a system call (costly next to the clock): the
                               clock is read after every test */
#define CP_SPIN_YIELD 2     /* yield the CPU every round: the peer may wait for our core */

/* Spin until test(arg) holds, for up to spin's budget, then yield once; 1 if it held (the
   caller then need not sleep). spin NULL: test once. A test that is a system call (costly
   next to the clock) sets slow_test, so the deadline is checked after every call. */
int cp_spin_until(int (*test)(void *), void *arg, cp_spin_t *spin, int slow_test);

/* Spin until test(arg) holds for a fixed budget of budget_ns (flags CP_SPIN_*), not past
   deadline. 1 if it held, 0 when the budget ran out. budget_ns <= 0: no test at all. */
int cp_spin_for(int (*test)(void *), void *arg, int64_t budget_ns, int64_t deadline, int flags);

/* Sleep on word while it holds seen, counted in *sleepers for the wakers, unless test(arg)
   (NULL: none) holds once counted (the count and the test are seq_cst, pairing with a waker
   that publishes, then reads the count). Returns 0 when woken or the word or test had
   already changed, -ETIMEDOUT at deadline, -EINTR on a signal. */
int cp_sleep_counted(_Atomic uint32_t *word, uint32_t seen, _Atomic uint32_t *sleepers,
                     int (*test)(void *), void *arg, int64_t deadline);

#endif
