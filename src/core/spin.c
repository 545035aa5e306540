/* Spin-then-sleep with an adaptive budget (see spin.h). */
#include "spin.h"

#include <sched.h>

#include "deadline.h"
#include "relax.h"

int cp_spin_until(int (*test)(void *), void *arg, cp_spin_t *spin, int slow_test)
{
    if (!spin)
        return test(arg);
    int32_t budget = spin->ns;
    if (budget == 0 && (++spin->waits % CP_SPIN_PROBE_EVERY) == 0) {
        /* spinning did not pay lately: see whether it does again */
        budget = spin->probe_ns ? spin->probe_ns : CP_SPIN_PROBE_NS;
    }
    if (budget > 0) {
        unsigned check_mask = slow_test ? 0 : 31;
        int64_t end = cp_now_ns() + budget;
        for (unsigned i = 1;; i++) {
            if (test(arg)) {
                int32_t grown = budget > CP_SPIN_MAX_NS / 2 ? CP_SPIN_MAX_NS : budget * 2;
                spin->ns = grown < CP_SPIN_START_NS ? CP_SPIN_START_NS : grown;
                return 1;
            }
            cp_cpu_relax();
            if ((i & check_mask) == 0 && cp_now_ns() >= end)
                break;
        }
        spin->ns = budget / 2 < CP_SPIN_MIN_NS ? 0 : budget / 2;
    }
    /* The peer may be waiting for our core: let it run once before sleeping. */
    sched_yield();
    return test(arg);
}
