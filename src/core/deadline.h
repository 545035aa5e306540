/* Deadlines on CLOCK_MONOTONIC: computed once per blocking call, time left recomputed after each wake. */
#ifndef CPOOL_DEADLINE_H
#define CPOOL_DEADLINE_H

#include <stdint.h>
#include <time.h>

/* A deadline is absolute CLOCK_MONOTONIC nanoseconds; CP_NO_DEADLINE means wait for ever. */
#define CP_NO_DEADLINE INT64_MAX

/* The "Ctrl-C within 100 ms" promise: a blocking call of the core (a wait for a lock, a sleep
   whose wake-up may come from another thread's signal) returns to its binding at least this
   often, so the binding can run the signal handlers and call again. */
#define CP_WAIT_SLICE_NS 100000000LL

static inline int64_t cp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Seconds from now (negative means "already expired", as the standard library treats it). */
static inline int64_t cp_deadline_after(double seconds)
{
    if (!(seconds > 0))
        return cp_now_ns();
    if (seconds > 9.0e9) /* ~285 years: treat as for ever rather than overflow */
        return CP_NO_DEADLINE;
    return cp_now_ns() + (int64_t)(seconds * 1e9);
}

/* Nanoseconds left (0 when expired); CP_NO_DEADLINE stays CP_NO_DEADLINE. */
static inline int64_t cp_deadline_left_ns(int64_t deadline)
{
    if (deadline == CP_NO_DEADLINE)
        return CP_NO_DEADLINE;
    int64_t left = deadline - cp_now_ns();
    return left > 0 ? left : 0;
}

/* Milliseconds left for poll(2): -1 for ever, rounded up so we never wake early and spin. */
static inline int cp_deadline_left_ms(int64_t deadline)
{
    int64_t left = cp_deadline_left_ns(deadline);
    if (left == CP_NO_DEADLINE)
        return -1;
    int64_t ms = (left + 999999) / 1000000;
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

static inline struct timespec cp_ns_to_timespec(int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    return ts;
}

#endif
