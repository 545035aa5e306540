/* Condition variable waiters in shared memory: enlist, sleep on one's own slot, notify the
   oldest live sleepers, find and reap dead ones. */
#define _GNU_SOURCE
#include "condvar.h"

#include <errno.h>
#include <string.h>

#include "deadline.h"
#include "futex.h"
#include "semlock.h"

void cp_cond_init(cp_cond_t *c)
{
    memset(c, 0, sizeof *c);
    c->nslots = CP_COND_SLOTS;
    atomic_store(&c->magic, CP_COND_MAGIC);
}

static int is_me(const cp_cond_slot_t *w)
{
    return w->pid == cp_sem_self() && w->start == (uint32_t)cp_sem_self_start();
}

/* Whether the sleeper of w has died. A sleeper of this process is alive: we are asking. */
static int sleeper_dead(const cp_cond_slot_t *w)
{
    if (w->pid == cp_sem_self())
        return !is_me(w); /* our pid, another start time: a dead process had it */
    uint64_t start;
    int zombie;
    if (cp_proc_start((pid_t)w->pid, &start, &zombie) == -ESRCH)
        return 1;
    return zombie || (start && (uint32_t)start != w->start);
}

static int claim(cp_cond_t *c, cp_cond_slot_t *w, uint32_t from)
{
    if (!atomic_compare_exchange_strong(&w->state, &from, CP_COND_CLAIMED))
        return -1;
    w->pid = cp_sem_self();
    w->start = (uint32_t)cp_sem_self_start();
    w->ticket = atomic_fetch_add(&c->next_ticket, 1);
    atomic_store_explicit(&w->state, CP_COND_SLEEPING, memory_order_release);
    return (int)(w - c->slot);
}

int cp_cond_enlist(cp_cond_t *c)
{
    for (uint32_t i = 0; i < c->nslots; i++) {
        if (atomic_load(&c->slot[i].state) == CP_COND_FREE) {
            int r = claim(c, &c->slot[i], CP_COND_FREE);
            if (r >= 0)
                return r;
        }
    }
    /* Full: a killed sleeper's slot can be had. */
    for (uint32_t i = 0; i < c->nslots; i++) {
        cp_cond_slot_t *w = &c->slot[i];
        uint32_t st = atomic_load(&w->state);
        if ((st == CP_COND_DEAD || (st == CP_COND_SLEEPING && sleeper_dead(w)))) {
            int r = claim(c, w, st);
            if (r >= 0)
                return r;
        }
    }
    return -EAGAIN;
}

int cp_cond_sleep(cp_cond_t *c, int i, int64_t deadline)
{
    cp_cond_slot_t *w = &c->slot[i];
    for (;;) {
        if (atomic_load_explicit(&w->state, memory_order_acquire) == CP_COND_WOKEN) {
            atomic_store(&w->state, CP_COND_FREE);
            return 1;
        }
        int r = cp_futex_wait(&w->state, CP_COND_SLEEPING, deadline);
        if ((r == -ETIMEDOUT || r == -EINTR) && atomic_load(&w->state) != CP_COND_WOKEN)
            return r;
    }
}

int cp_cond_leave(cp_cond_t *c, int i)
{
    uint32_t st = CP_COND_SLEEPING;
    if (atomic_compare_exchange_strong(&c->slot[i].state, &st, CP_COND_FREE))
        return 0;
    atomic_store(&c->slot[i].state, CP_COND_FREE); /* WOKEN: the wake-up is ours */
    return 1;
}

/* The oldest SLEEPING slot, or NULL. Tickets wrap: compared by their distance from the next. */
static cp_cond_slot_t *oldest_sleeper(cp_cond_t *c)
{
    uint32_t next = atomic_load(&c->next_ticket), best_age = 0;
    cp_cond_slot_t *best = NULL;
    for (uint32_t i = 0; i < c->nslots; i++) {
        cp_cond_slot_t *w = &c->slot[i];
        if (atomic_load_explicit(&w->state, memory_order_acquire) != CP_COND_SLEEPING)
            continue;
        uint32_t age = next - w->ticket;
        if (!best || age > best_age) {
            best = w;
            best_age = age;
        }
    }
    return best;
}

int cp_cond_notify(cp_cond_t *c, uint32_t n, int reclaim)
{
    int woken = 0;
    while ((uint32_t)woken < n) {
        cp_cond_slot_t *w = oldest_sleeper(c);
        if (!w)
            break;
        uint32_t st = CP_COND_SLEEPING;
        if (!atomic_compare_exchange_strong(&w->state, &st, CP_COND_WOKEN))
            continue; /* it timed out and left just now */
        /* A sleeper the kernel had asleep is alive; otherwise it is between sleeps (a signal
           check) or dead, and only then is /proc asked. */
        if (cp_futex_wake(&w->state, 1) > 0 || !sleeper_dead(w)) {
            woken++;
            continue;
        }
        st = CP_COND_WOKEN;
        atomic_compare_exchange_strong(&w->state, &st, reclaim ? CP_COND_FREE : CP_COND_DEAD);
    }
    return woken;
}

int cp_cond_dead_sleepers(cp_cond_t *c, int64_t interval_ns)
{
    int64_t now = cp_now_ns(), last = atomic_load(&c->last_scan);
    if (now - last < interval_ns || !atomic_compare_exchange_strong(&c->last_scan, &last, now))
        return 0;
    int dead = 0;
    for (uint32_t i = 0; i < c->nslots; i++) {
        cp_cond_slot_t *w = &c->slot[i];
        uint32_t st = atomic_load(&w->state);
        dead += st == CP_COND_DEAD || (st == CP_COND_SLEEPING && !is_me(w) && sleeper_dead(w));
    }
    return dead;
}

int cp_cond_reap(cp_cond_t *c)
{
    int dead = 0;
    for (uint32_t i = 0; i < c->nslots; i++) {
        cp_cond_slot_t *w = &c->slot[i];
        uint32_t st = atomic_load(&w->state);
        if ((st == CP_COND_DEAD || (st == CP_COND_SLEEPING && sleeper_dead(w))) &&
            atomic_compare_exchange_strong(&w->state, &st, CP_COND_FREE))
            dead++;
    }
    return dead;
}

int cp_cond_sleeping(cp_cond_t *c)
{
    int n = 0;
    for (uint32_t i = 0; i < c->nslots; i++)
        n += atomic_load(&c->slot[i].state) == CP_COND_SLEEPING;
    return n;
}
