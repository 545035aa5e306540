/* The spin/wait policy (see spin.h): fixed and adaptive spins, and the counted futex sleep. */
#include "spin.h"

#include <sched.h>

#include "deadline.h"
#include "futex.h"
#include "relax.h"

int cp_spin_for(int (*test)(void *), void *arg, int64_t budget_ns, int64_t deadline, int flags)
{
    if (budget_ns <= 0)
        return 0;
    unsigned check_mask = (flags & CP_SPIN_SLOW_TEST) ? 0 : CP_SPIN_ROUND - 1;
    int64_t end = cp_now_ns() + budget_ns;
    if (end > deadline)
        end = deadline;
    for (unsigned i = 1;; i++) {
        if (test(arg))
            return 1;
        cp_cpu_relax();
        if ((i & check_mask) == 0) {
            if (cp_now_ns() >= end)
                return 0;
            /* Two cores, several processes: if the peer we wait for shares our CPU, spinning
               would only keep it from running. */
            if (flags & CP_SPIN_YIELD)
                sched_yield();
        }
    }
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

int cp_spin_until(int (*test)(void *), void *arg, cp_spin_t *spin, int slow_test)
{
    if (!spin)
        return test(arg);
    int32_t budget = LOAD(spin->ns);
    if (budget == 0 && (__atomic_add_fetch(&spin->waits, 1, __ATOMIC_RELAXED) % CP_SPIN_PROBE_EVERY) == 0) {
        /* spinning did not pay lately: see whether it does again */
        int32_t probe = LOAD(spin->probe_ns);
        budget = probe ? probe : CP_SPIN_PROBE_NS;
    }
    if (budget > 0) {
        if (cp_spin_for(test, arg, budget, CP_NO_DEADLINE, slow_test ? CP_SPIN_SLOW_TEST : 0)) {
            int32_t grown = budget > CP_SPIN_MAX_NS / 2 ? CP_SPIN_MAX_NS : budget * 2;
            STORE(spin->ns, grown < CP_SPIN_START_NS ? CP_SPIN_START_NS : grown);
            return 1;
        }
        STORE(spin->ns, budget / 2 < CP_SPIN_MIN_NS ? 0 : budget / 2);
    }
    /* The peer may be waiting for our core: let it run once before sleeping. */
    sched_yield();
    return test(arg);
}

int cp_sleep_counted(_Atomic uint32_t *word, uint32_t seen, _Atomic uint32_t *sleepers,
                     int (*test)(void *), void *arg, int64_t deadline)
{
    atomic_fetch_add_explicit(sleepers, 1, memory_order_seq_cst);
    int rc = 0;
    if (!test || !test(arg))
        rc = cp_futex_wait(word, seen, deadline);
    atomic_fetch_sub_explicit(sleepers, 1, memory_order_seq_cst);
    return rc;
}
