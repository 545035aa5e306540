/* The shared-memory MPMC queue of byte records: hot and cold rings under one robust lock
   (see ring.h for the layout and the protocol). */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"
#include "relax.h"
#include "spin.h"

#define PAGE 4096ULL
#define HEADER_BYTES PAGE
#define PUNCH_BATCH (1ULL << 20)   /* cold bytes consumed before they are given back */
#define POPULATE_MIN (64ULL << 10) /* cold records from this size have their pages faulted in bulk */
/* Polling before a futex sleep adapts as spin.h describes (the CP_SPIN_* budgets); the budget
   lives in the handle as an atomic, since threads of one process may share a queue handle. */
#define MAX_SLEEP_NS 500000000LL   /* re-check at least this often: a woken peer may have died */
#define LOCK_SLICE_NS 100000000LL  /* longest wait for the lock before checking for signals */

static inline uint64_t align8(uint64_t n)
{
    return (n + 7) & ~7ULL;
}

static inline uint64_t page_down(uint64_t n)
{
    return n & ~(PAGE - 1);
}

static inline uint64_t page_up(uint64_t n)
{
    return (n + PAGE - 1) & ~(PAGE - 1);
}

static inline uint64_t record_bytes(uint64_t len)
{
    return 8 + align8(len);
}

/* ---- the lock and the counter slots ---- */

static inline cp_ring_counters *live(cp_ring_header *h)
{
    return &h->slot[atomic_load_explicit(&h->cur, memory_order_relaxed) & 1];
}

/* Under the lock: make the eventfd say whether the ring holds a record (see ring.h). An eventfd
   counter above 0 is readable; reading it resets it to 0. EAGAIN on either side means it
   already was what we want. */
static void notify_set(cp_ring_t *r, int nonempty)
{
    uint64_t v = 1;
    ssize_t n;
    if (nonempty)
        n = write(r->notify_fd, &v, 8);
    else
        n = read(r->notify_fd, &v, 8);
    (void)n;
}

/* Publish c: fill the other slot, then one seq_cst store flips to it. The store is also what a
   sleeper's "still nothing?" check pairs with (see wake()). */
static void commit(cp_ring_t *r, const cp_ring_counters *c)
{
    cp_ring_header *h = r->h;
    uint32_t cur = atomic_load_explicit(&h->cur, memory_order_relaxed);
    uint64_t before = h->slot[cur & 1].count;
    h->slot[(cur + 1) & 1] = *c;
    atomic_store(&h->cur, cur + 1);
    if (atomic_load_explicit(&h->notify, memory_order_relaxed) && (before == 0) != (c->count == 0))
        notify_set(r, c->count != 0);
}

static int ring_lock(cp_ring_t *r, int flags)
{
    cp_ring_header *h = r->h;
    int e;
    if (flags & CP_RING_TRYLOCK) {
        e = pthread_mutex_trylock(&h->lock);
    }
    else {
        /* In slices, so that a holder that is stopped (SIGSTOP, a debugger) cannot keep the
           caller from seeing Ctrl-C: -ETIMEDOUT sends it back to check signals and retry. */
        struct timespec ts = cp_ns_to_timespec(cp_now_ns() + LOCK_SLICE_NS);
        e = pthread_mutex_clocklock(&h->lock, CLOCK_MONOTONIC, &ts);
    }
    if (e == 0)
        return 0;
    if (e == EOWNERDEAD) {
        /* The previous holder died inside put/get/task_done: it flipped cur or it did not, so
           the committed slot is whole either way. Nothing to repair. */
        atomic_fetch_add(&h->recoveries, 1);
        pthread_mutex_consistent(&h->lock);
        /* ... but it may have died between the commit and the eventfd's update. */
        if (atomic_load_explicit(&h->notify, memory_order_relaxed)) {
            notify_set(r, 0);
            if (live(h)->count)
                notify_set(r, 1);
        }
        return 0;
    }
    return -e; /* EBUSY for a trylock, ETIMEDOUT for a slice */
}

static inline void ring_unlock(cp_ring_header *h)
{
    pthread_mutex_unlock(&h->lock);
}

/* ---- copying at a position of one circular area, in two pieces where it wraps ---- */

static void copy_in(unsigned char *area, uint64_t size, uint64_t pos, const void *src, uint64_t len)
{
    uint64_t off = pos & (size - 1);
    uint64_t first = len < size - off ? len : size - off;
    memcpy(area + off, src, first);
    if (len > first)
        memcpy(area, (const unsigned char *)src + first, len - first);
}

static void copy_out(const unsigned char *area, uint64_t size, uint64_t pos, void *dst, uint64_t len)
{
    uint64_t off = pos & (size - 1);
    uint64_t first = len < size - off ? len : size - off;
    memcpy(dst, area + off, first);
    if (len > first)
        memcpy((unsigned char *)dst + first, area, len - first);
}

/* Headers are 8-aligned and sizes multiples of 8, so a header never wraps. */
static void write_record(unsigned char *area, uint64_t size, uint64_t pos, const cp_ring_msg *m)
{
    uint64_t word = (m->len << 8) | m->kind;
    memcpy(area + (pos & (size - 1)), &word, 8);
    uint64_t at = pos + 8;
    for (uint32_t k = 0; k < m->npieces; k++) {
        copy_in(area, size, at, m->pieces[k].base, m->pieces[k].len);
        at += m->pieces[k].len;
    }
}

/* ---- taking cold pages, and giving them back ---- */

/* Fault in the cold pages a big record is about to fill with one system call rather than one
   trap per page (MADV_POPULATE_WRITE, Linux 5.14; older kernels just fault as they go). */
static void populate(unsigned char *area, uint64_t size, uint64_t pos, uint64_t len)
{
#ifdef MADV_POPULATE_WRITE
    while (len > 0) {
        uint64_t off = pos & (size - 1);
        uint64_t n = len < size - off ? len : size - off;
        uint64_t s = page_down(off), e = page_up(off + n);
        madvise(area + s, e - s, MADV_POPULATE_WRITE);
        pos += n;
        len -= n;
    }
#endif
}

/* Punch out the cold pages wholly inside positions [a, b). Called under the lock with b at
   most the cold tail, and writers stay below creleased + cold size: nobody uses them. */
static void punch_cold(cp_ring_t *r, uint64_t a, uint64_t b)
{
    uint64_t size = r->h->cold;
    off_t base = (off_t)(HEADER_BYTES + r->h->hot);
    a = page_up(a);
    b = page_down(b);
    while (a < b) {
        uint64_t off = a & (size - 1);
        uint64_t n = b - a < size - off ? b - a : size - off;
        fallocate(r->shm.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, base + (off_t)off, (off_t)n);
        a += n;
    }
}

/* Which consumed cold pages to give back now: in batches, and all of them once the cold ring
   is empty. Sets c->creleased; the caller punches [*from, c->creleased) after its commit (a
   punch before it would zero records that a holder killed in between never consumed). */
static int release_cold(cp_ring_counters *c, uint64_t *from)
{
    uint64_t target = page_down(c->ctail);
    if (target <= c->creleased)
        return 0;
    if (target - c->creleased < PUNCH_BATCH && c->ctail != c->chead)
        return 0;
    *from = c->creleased;
    c->creleased = target;
    return 1;
}

/* ---- create / attach ---- */

static uint64_t pow2_pages(uint64_t n)
{
    uint64_t p = PAGE;
    while (p < n)
        p <<= 1;
    return p;
}

int cp_ring_create(cp_ring_t *r, uint64_t hot, uint64_t cold, uint64_t maxsize)
{
    memset(r, 0, sizeof *r);
    r->shm.fd = -1;
    r->notify_fd = -1;
    if (hot == 0)
        hot = CP_RING_DEFAULT_HOT;
    if (cold == 0)
        cold = CP_RING_DEFAULT_COLD;
    if (hot > (1ULL << 40) || cold > (1ULL << 46))
        return -EINVAL;
    hot = pow2_pages(hot);
    cold = pow2_pages(cold);

    int rc;
    /* The cold ring is address space only; where that is limited (ulimit -v, sanitizers),
       settle for less of it. */
    while ((rc = cp_shm_create(&r->shm, HEADER_BYTES + hot + cold, "cpool-queue")) == -ENOMEM &&
           cold > (64ULL << 20))
        cold >>= 1;
    if (rc < 0)
        return rc;
    if ((r->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        rc = -errno;
        cp_shm_close(&r->shm);
        return rc;
    }
    cp_ring_header *h = r->shm.addr;
    h->version = CP_RING_VERSION;
    h->header_size = HEADER_BYTES;
    h->hot = hot;
    h->cold = cold;
    h->maxsize = maxsize;

    pthread_mutexattr_t a;
    int e = pthread_mutexattr_init(&a);
    if (!e)
        e = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    if (!e)
        e = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (!e)
        e = pthread_mutex_init(&h->lock, &a);
    pthread_mutexattr_destroy(&a);
    if (e) {
        cp_ring_close(r);
        return -e;
    }
    /* The rest of the header is zero (a fresh memfd). The magic goes last. */
    atomic_thread_fence(memory_order_release);
    h->magic = CP_RING_MAGIC;
    r->h = h;
    r->hot = (unsigned char *)r->shm.addr + HEADER_BYTES;
    r->cold = r->hot + hot;
    r->spin_ns = CP_SPIN_START_NS;
    return 0;
}

int cp_ring_attach(cp_ring_t *r, int fd, int notify_fd)
{
    memset(r, 0, sizeof *r);
    r->shm.fd = -1;
    r->notify_fd = -1;
    int rc = cp_shm_attach(&r->shm, fd, 0);
    if (rc < 0)
        return rc;
    cp_ring_header *h = r->shm.addr;
    if (r->shm.size < HEADER_BYTES || h->magic != CP_RING_MAGIC || h->version != CP_RING_VERSION ||
        h->header_size != HEADER_BYTES || HEADER_BYTES + h->hot + h->cold != r->shm.size) {
        cp_shm_close(&r->shm);
        return -EINVAL;
    }
    if ((r->notify_fd = fcntl(notify_fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        rc = -errno;
        cp_shm_close(&r->shm);
        return rc;
    }
    r->h = h;
    r->hot = (unsigned char *)r->shm.addr + HEADER_BYTES;
    r->cold = r->hot + h->hot;
    r->spin_ns = CP_SPIN_START_NS;
    return 0;
}

void cp_ring_close(cp_ring_t *r)
{
    if (r->notify_fd >= 0)
        close(r->notify_fd);
    r->notify_fd = -1;
    cp_shm_close(&r->shm);
    r->h = NULL;
    r->hot = r->cold = NULL;
}

/* ---- put / get ---- */

enum { SLEEP_GET, SLEEP_PUT, SLEEP_JOIN };

/* The sleeper count and the futex word of one kind of wait. */
static void wait_words(cp_ring_header *h, int kind, _Atomic uint32_t **waiters, _Atomic uint32_t **seq)
{
    *waiters = kind == SLEEP_GET ? &h->get_waiters : kind == SLEEP_PUT ? &h->put_waiters : &h->join_waiters;
    *seq = kind == SLEEP_GET ? &h->get_seq : kind == SLEEP_PUT ? &h->put_seq : &h->join_seq;
}

/* Wake the sleepers of one kind if any armed the word (see ring.h). The seq_cst load pairs
   with the sleeper's fetch_or: the waker sees the bit, or the sleeper sees the commit. */
static void wake(cp_ring_header *h, int kind)
{
    _Atomic uint32_t *waiters, *seq;
    wait_words(h, kind, &waiters, &seq);
    uint32_t v = atomic_load(seq);
    while (v & 1) {
        if (atomic_compare_exchange_weak(seq, &v, v + 1)) { /* odd + 1: disarmed and moved */
            cp_futex_wake(seq, INT_MAX);
            return;
        }
    }
}

int cp_ring_put(cp_ring_t *r, const cp_ring_msg *msgs, size_t n, int flags, size_t *done,
                uint64_t *seen)
{
    cp_ring_header *h = r->h;
    *done = 0;
    int rc = ring_lock(r, flags);
    if (rc < 0)
        return rc;
    cp_ring_counters c = *live(h);
    uint64_t hot = h->hot, cold = h->cold;
    size_t i = 0;
    for (; i < n; i++) {
        const cp_ring_msg *m = &msgs[i];
        if (h->maxsize && c.count >= h->maxsize) {
            rc = -EAGAIN;
            break;
        }
        uint64_t need = record_bytes(m->len);
        if (m->len >= (1ULL << 56) || (need > hot && need > cold - PAGE)) {
            rc = -EMSGSIZE;
            break;
        }
        int cold_empty = c.chead == c.ctail;
        if (cold_empty && c.hhead + need - c.htail <= hot) {
            write_record(r->hot, hot, c.hhead, m);
            c.hhead += need;
        }
        else if (cold_empty && need <= hot && (flags & CP_RING_HOT_ONLY)) {
            rc = -ENOSPC;
            break;
        }
        else if (c.chead + need - c.creleased <= cold) {
            if (need >= POPULATE_MIN)
                populate(r->cold, cold, c.chead, need);
            write_record(r->cold, cold, c.chead, m);
            c.chead += need;
        }
        else {
            rc = -EAGAIN;
            break;
        }
        c.count++;
        if (flags & CP_RING_TASK)
            c.unfinished++;
    }
    if (i > 0)
        commit(r, &c);
    if (seen)
        *seen = c.consumed;
    ring_unlock(h);
    *done = i;
    if (i > 0)
        wake(h, SLEEP_GET);
    return rc;
}

long cp_ring_get(cp_ring_t *r, void *dst, size_t cap, size_t maxn, cp_ring_got *got, int flags)
{
    cp_ring_header *h = r->h;
    int rc = ring_lock(r, flags);
    if (rc < 0)
        return rc;
    cp_ring_counters c = *live(h);
    long n = 0;
    size_t used = 0;
    int took_cold = 0;
    while ((size_t)n < maxn && c.count > 0) {
        /* Hot first: while the cold ring holds records, every hot one is older. */
        int from_hot = c.hhead != c.htail;
        unsigned char *area = from_hot ? r->hot : r->cold;
        uint64_t size = from_hot ? h->hot : h->cold;
        uint64_t *tail = from_hot ? &c.htail : &c.ctail;
        uint64_t avail = from_hot ? c.hhead - c.htail : c.chead - c.ctail;
        uint64_t word;
        memcpy(&word, area + (*tail & (size - 1)), 8);
        uint32_t kind = (uint32_t)(word & 0xff);
        uint64_t len = word >> 8;
        if (avail < 8 || record_bytes(len) > avail) {
            rc = -EIO; /* cannot happen unless someone scribbled on the segment */
            break;
        }
        if (used + len > cap) {
            if (n == 0) {
                got[0].kind = kind;
                got[0].len = len;
                got[0].offset = 0;
                rc = -EMSGSIZE;
            }
            break;
        }
        copy_out(area, size, *tail + 8, (unsigned char *)dst + used, len);
        got[n].kind = kind;
        got[n].len = len;
        got[n].offset = used;
        used += align8(len);
        n++;
        *tail += record_bytes(len);
        took_cold |= !from_hot;
        c.count--;
        c.consumed++;
    }
    if (n > 0) {
        uint64_t from = 0;
        int punch = took_cold && release_cold(&c, &from);
        commit(r, &c);
        /* Still under the lock: writers stay below creleased + cold, so none is there yet. A
           holder killed before this only leaves the pages allocated until they are reused. */
        if (punch)
            punch_cold(r, from, c.creleased);
    }
    ring_unlock(h);
    if (n > 0) {
        wake(h, SLEEP_PUT);
        return n;
    }
    return rc < 0 ? rc : -EAGAIN;
}

/* ---- waiting ---- */

/* Sleep on seq unless ready() already holds; the waiter count tells peers to wake us.
   Sleeps are capped so that a wake-up given to a peer that then died is not lost for good. */
/* Poll ready() for the handle's current budget, and adapt the budget. 1 when it came true. */
static int poll_until(cp_ring_t *r, int (*ready)(cp_ring_t *, uint64_t), uint64_t arg)
{
    int64_t budget = atomic_load_explicit(&r->spin_ns, memory_order_relaxed);
    if (budget < CP_SPIN_MIN_NS) {
        if (atomic_fetch_add_explicit(&r->spin_probe, 1, memory_order_relaxed) % CP_SPIN_PROBE_EVERY)
            return ready(r, arg);
        budget = CP_SPIN_PROBE_NS;
    }
    int64_t start = cp_now_ns();
    for (;;) {
        for (int i = 0; i < 32; i++) {
            if (ready(r, arg)) {
                int64_t b = budget * 2 > CP_SPIN_MAX_NS ? CP_SPIN_MAX_NS : budget * 2;
                atomic_store_explicit(&r->spin_ns, b, memory_order_relaxed);
                return 1;
            }
            cp_cpu_relax();
        }
        if (cp_now_ns() - start > budget)
            break;
    }
    atomic_store_explicit(&r->spin_ns, budget / 2, memory_order_relaxed);
    return 0;
}

static int wait_on(cp_ring_t *r, int kind, int64_t deadline, int (*ready)(cp_ring_t *, uint64_t),
                   uint64_t arg)
{
    if (poll_until(r, ready, arg))
        return 0;
    cp_ring_header *h = r->h;
    _Atomic uint32_t *waiters, *seq;
    wait_words(h, kind, &waiters, &seq);
    atomic_fetch_add(waiters, 1);
    uint32_t armed = atomic_fetch_or(seq, 1) | 1;
    int rc = 0;
    if (!ready(r, arg)) {
        int64_t cap = cp_now_ns() + MAX_SLEEP_NS;
        int64_t d = deadline < cap ? deadline : cap;
        rc = cp_futex_wait(seq, armed, d);
        if (rc == -ETIMEDOUT && d != deadline)
            rc = 0;
    }
    atomic_fetch_sub(waiters, 1);
    return rc;
}

static int readable(cp_ring_t *r, uint64_t unused)
{
    return cp_ring_count(r) != 0;
}

static int writable(cp_ring_t *r, uint64_t seen)
{
    return cp_ring_consumed(r) != seen;
}

static int joined(cp_ring_t *r, uint64_t unused)
{
    return cp_ring_unfinished(r) == 0;
}

int cp_ring_wait_readable(cp_ring_t *r, int64_t deadline)
{
    return wait_on(r, SLEEP_GET, deadline, readable, 0);
}

int cp_ring_wait_writable(cp_ring_t *r, uint64_t seen, int64_t deadline)
{
    return wait_on(r, SLEEP_PUT, deadline, writable, seen);
}

int cp_ring_wait_joined(cp_ring_t *r, int64_t deadline)
{
    return wait_on(r, SLEEP_JOIN, deadline, joined, 0);
}

int cp_ring_task_done(cp_ring_t *r)
{
    cp_ring_header *h = r->h;
    int rc;
    while ((rc = ring_lock(r, 0)) == -ETIMEDOUT)
        ; /* task_done is not interruptible: it must not be lost half-way */
    if (rc < 0)
        return rc;
    uint64_t u = live(h)->unfinished;
    if (u > 0) {
        cp_ring_counters c = *live(h);
        c.unfinished = u - 1;
        commit(r, &c);
    }
    ring_unlock(h);
    if (u == 0)
        return -ERANGE;
    if (u == 1)
        wake(h, SLEEP_JOIN);
    return 0;
}

int cp_ring_notify_arm(cp_ring_t *r)
{
    cp_ring_header *h = r->h;
    if (atomic_load(&h->notify))
        return r->notify_fd;
    int rc = ring_lock(r, 0);
    if (rc < 0)
        return rc;
    if (!atomic_load_explicit(&h->notify, memory_order_relaxed)) {
        notify_set(r, 0);
        if (live(h)->count)
            notify_set(r, 1);
        atomic_store(&h->notify, 1);
    }
    ring_unlock(h);
    return r->notify_fd;
}
