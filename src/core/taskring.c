/* Pool channels over shared memory: layout, byte rings of tagged pieces, robust locks, waits. */
#define _GNU_SOURCE
#include "taskring.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "channel.h"
#include "deadline.h"
#include "futex.h"
#include "robust.h"
#include "spin.h"

static size_t align_up(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

size_t cp_pool_shm_size(uint32_t nslots, uint64_t task_cap, uint64_t res_cap)
{
    size_t n = align_up(sizeof(cp_pool_shm_t), 64);
    n += align_up((size_t)nslots * sizeof(cp_tr_slot_t), 4096);
    n += cp_chan_pow2_pages(task_cap) + cp_chan_pow2_pages(res_cap);
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
    p->tasks.cap = cp_chan_pow2_pages(task_cap);
    p->tasks.wake_one = 1;
    p->tasks.data_off = off;
    off += p->tasks.cap;
    p->results.cap = cp_chan_pow2_pages(res_cap);
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
        uint64_t need = cp_tr_record_size(n);
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
        if (r->cap - (head - tail) < need)
            break;
        uint32_t flags = (*off == 0 ? CP_PIECE_FIRST : 0) | (*off + n == len ? CP_PIECE_LAST : 0);
        uint32_t hdr[2] = {(uint32_t)n, (tag << 8) | flags};
        cp_chan_put_hdr(data, r->cap, head, hdr);
        (void)cp_chan_copy_in(data, r->cap, head + CP_PIECE_HDR, msg + *off, n, NULL, NULL);
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
    cp_chan_get_hdr(cp_tr_data(p, r), r->cap, tail, hdr);
    *len = hdr[0];
    *tag = hdr[1];
    return 1;
}

void cp_tr_copy_out(cp_pool_shm_t *p, cp_tr_t *r, uint64_t skip, void *dst, uint64_t n)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    (void)cp_chan_copy_out(cp_tr_data(p, r), r->cap, tail + CP_PIECE_HDR + skip, dst, n, NULL, NULL);
}

const uint8_t *cp_tr_piece_ptr(cp_pool_shm_t *p, cp_tr_t *r, uint64_t len)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t at = cp_chan_wrap(tail + CP_PIECE_HDR, r->cap);
    if (at + len > r->cap)
        return NULL;
    return cp_tr_data(p, r) + at;
}

void cp_tr_pop(cp_tr_t *r, uint64_t len)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    atomic_store_explicit(&r->tail, tail + cp_tr_record_size(len), memory_order_seq_cst);
    if (atomic_load_explicit(&r->space_waiters, memory_order_seq_cst) > 0) {
        atomic_fetch_add(&r->space_bell, 1);
        cp_futex_wake(&r->space_bell, INT32_MAX);
    }
}

/* The conditions the waits spin and sleep on (spin.h tests). */
typedef struct {
    cp_tr_t *r;
    uint32_t seen;
    uint64_t need;
} tr_cond;

static int has_data(void *p)
{
    return !cp_tr_empty(((tr_cond *)p)->r);
}

static int data_or_bell(void *p)
{
    tr_cond *c = p;
    return !cp_tr_empty(c->r) || atomic_load_explicit(&c->r->bell, memory_order_acquire) != c->seen;
}

static int has_space(void *p)
{
    tr_cond *c = p;
    return cp_tr_free(c->r) >= c->need;
}

int cp_tr_wait_data(cp_tr_t *r, uint32_t seen, int64_t spin_ns, int64_t deadline)
{
    tr_cond c = {r, seen, 0};
    if (!cp_tr_empty(r))
        return 0;
    if (cp_spin_for(data_or_bell, &c, spin_ns, CP_NO_DEADLINE, CP_SPIN_YIELD))
        return cp_tr_empty(r) ? -EAGAIN : 0;
    for (;;) {
        int rc = cp_sleep_counted(&r->bell, seen, &r->sleepers, has_data, &c, deadline);
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
    tr_cond c = {r, 0, need};
    for (;;) {
        uint32_t seen = atomic_load_explicit(&r->space_bell, memory_order_seq_cst);
        int rc = cp_sleep_counted(&r->space_bell, seen, &r->space_waiters, has_space, &c, deadline);
        if (has_space(&c))
            return 0;
        if (rc == -ETIMEDOUT || rc == -EINTR)
            return rc;
        if (cp_deadline_left_ns(deadline) == 0)
            return -ETIMEDOUT;
    }
}

int cp_tr_wait_bell(cp_tr_t *r, uint32_t seen, int64_t spin_ns, int64_t deadline)
{
    tr_cond c = {r, seen, 0};
    if (cp_spin_for(data_or_bell, &c, spin_ns, deadline, CP_SPIN_YIELD))
        return 0;
    return cp_sleep_counted(&r->bell, seen, &r->sleepers, has_data, &c, deadline);
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
