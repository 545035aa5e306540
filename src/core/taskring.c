/* Pool channels over shared memory: layout, byte rings of tagged pieces, robust locks, waits. */
#define _GNU_SOURCE
#include "taskring.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"
#include "relax.h"
#include "robust.h"

static uint64_t pow2_at_least(uint64_t n)
{
    uint64_t c = 4096;
    while (c < n)
        c <<= 1;
    return c;
}

static size_t align_up(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

size_t cp_pool_shm_size(uint32_t nslots, uint64_t task_cap, uint64_t res_cap)
{
    size_t n = align_up(sizeof(cp_pool_shm_t), 64);
    n += align_up((size_t)nslots * sizeof(cp_tr_slot_t), 4096);
    n += pow2_at_least(task_cap) + pow2_at_least(res_cap);
    return n;
}

int cp_pool_shm_init(void *mem, size_t size, uint32_t nslots, uint64_t task_cap, uint64_t res_cap)
{
    if (size < cp_pool_shm_size(nslots, task_cap, res_cap))
        return -EINVAL;
    cp_pool_shm_t *p = mem;
    p->magic = CP_TR_MAGIC;
    p->version = CP_TR_VERSION;
    p->nslots = nslots;
    p->size = size;
    size_t off = align_up(sizeof(cp_pool_shm_t), 64);
    p->slots_off = off;
    off += align_up((size_t)nslots * sizeof(cp_tr_slot_t), 4096);
    p->tasks.cap = pow2_at_least(task_cap);
    p->tasks.wake_one = 1;
    p->tasks.data_off = off;
    off += p->tasks.cap;
    p->results.cap = pow2_at_least(res_cap);
    p->results.data_off = off;
    int r = cp_robust_init(&p->tasks.lock);
    if (r == 0)
        r = cp_robust_init(&p->results.lock);
    return r;
}

int cp_pool_shm_check(const void *mem, size_t size)
{
    const cp_pool_shm_t *p = mem;
    if (size < sizeof(*p) || p->magic != CP_TR_MAGIC || p->version != CP_TR_VERSION ||
        p->size > size)
        return -EINVAL;
    return 0;
}

int cp_tr_lock(cp_tr_t *r)
{
    /* A holder killed mid-operation changed nothing visible: everything it did is either
       published (head/tail moved) or invisible, so the ring is consistent as it stands. */
    return cp_robust_lock(&r->lock);
}

void cp_tr_unlock(cp_tr_t *r)
{
    pthread_mutex_unlock(&r->lock);
}

static void copy_in(uint8_t *data, uint64_t cap, uint64_t pos, const void *src, uint64_t n)
{
    uint64_t at = pos & (cap - 1);
    uint64_t first = cap - at < n ? cap - at : n;
    memcpy(data + at, src, first);
    if (n > first)
        memcpy(data, (const uint8_t *)src + first, n - first);
}

static void copy_from(const uint8_t *data, uint64_t cap, uint64_t pos, void *dst, uint64_t n)
{
    uint64_t at = pos & (cap - 1);
    uint64_t first = cap - at < n ? cap - at : n;
    memcpy(dst, data + at, first);
    if (n > first)
        memcpy((uint8_t *)dst + first, data, n - first);
}

static inline uint64_t rec_size(uint64_t len)
{
    return (CP_PIECE_HDR + len + 7) & ~(uint64_t)7;
}

void cp_tr_ring_bell(cp_tr_t *r)
{
    atomic_fetch_add(&r->bell, 1);
    cp_futex_wake(&r->bell, INT32_MAX);
}

int cp_tr_put(cp_pool_shm_t *p, cp_tr_t *r, const uint8_t *msg, uint64_t len, uint32_t tag,
                uint64_t *off)
{
    uint8_t *data = cp_tr_data(p, r);
    uint64_t maxp = cp_tr_max_piece(r);
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    int done = 0, wrote = 0;
    while (!done) {
        uint64_t n = len - *off < maxp ? len - *off : maxp;
        uint64_t need = rec_size(n);
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
        if (r->cap - (head - tail) < need)
            break;
        uint32_t flags = (*off == 0 ? CP_PIECE_FIRST : 0) | (*off + n == len ? CP_PIECE_LAST : 0);
        uint32_t hdr[2] = {(uint32_t)n, (tag << 8) | flags};
        memcpy(data + (head & (r->cap - 1)), hdr, sizeof hdr);
        copy_in(data, r->cap, head + CP_PIECE_HDR, msg + *off, n);
        head += need;
        *off += n;
        done = *off == len;
        /* Publish piece by piece: a long message streams while the reader drains. */
        atomic_store_explicit(&r->head, head, memory_order_seq_cst);
        wrote = 1;
    }
    if (wrote) {
        atomic_fetch_add_explicit(&r->bell, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&r->sleepers, memory_order_seq_cst) > 0)
            cp_futex_wake(&r->bell, r->wake_one ? 1 : INT32_MAX);
    }
    return done;
}

int cp_tr_peek(cp_pool_shm_t *p, cp_tr_t *r, uint64_t *len, uint32_t *tag)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    if (atomic_load_explicit(&r->head, memory_order_acquire) == tail)
        return 0;
    uint32_t hdr[2];
    memcpy(hdr, cp_tr_data(p, r) + (tail & (r->cap - 1)), sizeof hdr);
    *len = hdr[0];
    *tag = hdr[1];
    return 1;
}

void cp_tr_copy_out(cp_pool_shm_t *p, cp_tr_t *r, uint64_t skip, void *dst, uint64_t n)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    copy_from(cp_tr_data(p, r), r->cap, tail + CP_PIECE_HDR + skip, dst, n);
}

const uint8_t *cp_tr_piece_ptr(cp_pool_shm_t *p, cp_tr_t *r, uint64_t len)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t at = (tail + CP_PIECE_HDR) & (r->cap - 1);
    if (at + len > r->cap)
        return NULL;
    return cp_tr_data(p, r) + at;
}

void cp_tr_pop(cp_tr_t *r, uint64_t len)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    atomic_store_explicit(&r->tail, tail + rec_size(len), memory_order_seq_cst);
    if (atomic_load_explicit(&r->space_waiters, memory_order_seq_cst) > 0) {
        atomic_fetch_add(&r->space_bell, 1);
        cp_futex_wake(&r->space_bell, INT32_MAX);
    }
}


int cp_tr_wait_data(cp_tr_t *r, uint32_t seen, int64_t spin_ns, int64_t deadline)
{
    if (!cp_tr_empty(r))
        return 0;
    if (spin_ns > 0) {
        int64_t until = cp_now_ns() + spin_ns;
        for (;;) {
            for (int k = 0; k < 64; k++) {
                cp_cpu_relax();
                if (!cp_tr_empty(r))
                    return 0;
            }
            if (atomic_load_explicit(&r->bell, memory_order_acquire) != seen)
                return -EAGAIN;
            if (cp_now_ns() >= until)
                break;
            /* Two cores, several processes: if the peer we wait for shares our CPU, spinning
               would only keep it from running. */
            sched_yield();
        }
    }
    for (;;) {
        atomic_fetch_add_explicit(&r->sleepers, 1, memory_order_seq_cst);
        int rc = 0;
        if (cp_tr_empty(r))
            rc = cp_futex_wait(&r->bell, seen, deadline);
        atomic_fetch_sub_explicit(&r->sleepers, 1, memory_order_seq_cst);
        if (!cp_tr_empty(r))
            return 0;
        if (rc == -ETIMEDOUT || rc == -EINTR)
            return rc;
        /* Rung without data (the pool closes or stops): the caller looks at why at once,
           rather than at the end of its slice. */
        if (atomic_load_explicit(&r->bell, memory_order_seq_cst) != seen)
            return -EAGAIN;
        if (cp_deadline_left_ns(deadline) == 0)
            return -ETIMEDOUT;
    }
}

int cp_tr_wait_space(cp_tr_t *r, uint64_t need, int64_t deadline)
{
    for (;;) {
        uint32_t seen = atomic_load_explicit(&r->space_bell, memory_order_seq_cst);
        atomic_fetch_add_explicit(&r->space_waiters, 1, memory_order_seq_cst);
        int rc = 0;
        if (cp_tr_free(r) < need)
            rc = cp_futex_wait(&r->space_bell, seen, deadline);
        atomic_fetch_sub_explicit(&r->space_waiters, 1, memory_order_seq_cst);
        if (cp_tr_free(r) >= need)
            return 0;
        if (rc == -ETIMEDOUT || rc == -EINTR)
            return rc;
        if (cp_deadline_left_ns(deadline) == 0)
            return -ETIMEDOUT;
    }
}

int cp_tr_wait_bell(cp_tr_t *r, uint32_t seen, int64_t spin_ns, int64_t deadline)
{
    if (spin_ns > 0) {
        int64_t until = cp_now_ns() + spin_ns;
        if (until > deadline)
            until = deadline;
        for (;;) {
            for (int k = 0; k < 64; k++) {
                cp_cpu_relax();
                if (!cp_tr_empty(r) || atomic_load_explicit(&r->bell, memory_order_acquire) != seen)
                    return 0;
            }
            if (cp_now_ns() >= until)
                break;
            /* Two cores, several processes: if the peer we wait for shares our CPU, spinning
               would only keep it from running. */
            sched_yield();
        }
    }
    atomic_fetch_add_explicit(&r->sleepers, 1, memory_order_seq_cst);
    int rc = 0;
    if (cp_tr_empty(r))
        rc = cp_futex_wait(&r->bell, seen, deadline);
    atomic_fetch_sub_explicit(&r->sleepers, 1, memory_order_seq_cst);
    return rc;
}

/* What the collector wants a wake for, seen from either side: the producer after publishing,
   the collector after announcing its sleep (seq_cst on both sides, so one of them sees the
   other and no wake is lost). */
static int bg_wanted(cp_tr_t *r)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_seq_cst);
    uint64_t t = atomic_load_explicit(&r->tail, memory_order_seq_cst);
    return h - t > r->cap / 4 || (h != t && atomic_load_explicit(&r->bg_eager, memory_order_seq_cst));
}

void cp_tr_ring_bg(int wake_fd)
{
    uint64_t one = 1;
    /* EAGAIN (the counter is full) means a wake is pending anyway. */
    ssize_t rc = write(wake_fd, &one, sizeof one);
    (void)rc;
}

void cp_tr_notify_bg(cp_tr_t *r, int wake_fd)
{
    if (atomic_load_explicit(&r->bg_sleepers, memory_order_seq_cst) > 0 && bg_wanted(r))
        cp_tr_ring_bg(wake_fd);
}

void cp_tr_nudge_idle(cp_tr_t *r, int wake_fd)
{
    if (atomic_load_explicit(&r->bg_sleepers, memory_order_seq_cst) > 0 &&
        atomic_load_explicit(&r->bg_idle, memory_order_seq_cst))
        cp_tr_ring_bg(wake_fd);
}

int cp_tr_wait_bg(cp_tr_t *r, struct pollfd *fds, unsigned int n, int64_t deadline)
{
    atomic_fetch_add_explicit(&r->bg_sleepers, 1, memory_order_seq_cst);
    int rc = 0;
    if (!bg_wanted(r)) {
        int64_t left = cp_deadline_left_ns(deadline);
        struct timespec ts = cp_ns_to_timespec(left);
        rc = ppoll(fds, n, left == CP_NO_DEADLINE ? NULL : &ts, NULL);
        if (rc < 0)
            rc = -errno;
    }
    atomic_fetch_sub_explicit(&r->bg_sleepers, 1, memory_order_seq_cst);
    uint64_t v;
    ssize_t k = read(fds[0].fd, &v, sizeof v); /* non-blocking: reset a wake, if any */
    (void)k;
    return rc;
}
