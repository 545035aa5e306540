/* Spin-then-sleep: a waiter's adaptive spin budget, shared by locks, events, queues and pipes. */
#ifndef CPOOL_SPIN_H
#define CPOOL_SPIN_H

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

/* A waiter's budget (process-private: one per handle). */
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

/* Spin until test(arg) holds, for up to spin's budget, then yield once; 1 if it held (the
   caller then need not sleep). spin NULL: test once. A test that is a system call (costly
   next to the clock) sets slow_test, so the deadline is checked after every call. */
int cp_spin_until(int (*test)(void *), void *arg, cp_spin_t *spin, int slow_test);

#endif
