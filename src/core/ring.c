/* The shared-memory MPMC ring of byte records (see ring.h for the layout and the protocol). */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"

#define PAGE 4096ULL
#define HEADER_BYTES PAGE
#define KIND_SKIP 255U             /* "the rest of this lap is unused": readers jump over it */
#define PUNCH_BATCH (1ULL << 20)   /* cold bytes consumed before they are given back */
#define SPIN_ROUNDS 2000           /* ~10-40 us of polling before a futex sleep */
#define MAX_SLEEP_NS 500000000LL   /* re-check at least this often: a woken peer may have died */

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

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- the lock and the redo record ---- */

static void apply_counters(cp_ring_header *h, const cp_ring_counters *c)
{
    /* seq_cst stores: a sleeper's "count still 0?" check must not miss them (see wake_*). */
    atomic_store(&h->tail, c->tail);
    atomic_store(&h->released, c->released);
    atomic_store(&h->unfinished, c->unfinished);
    atomic_store(&h->head, c->head);
    atomic_store(&h->count, c->count);
}

static void commit(cp_ring_header *h, const cp_ring_counters *c)
{
    h->redo = *c;
    atomic_store_explicit(&h->redo_valid, 1, memory_order_release);
    apply_counters(h, c);
    atomic_store_explicit(&h->redo_valid, 0, memory_order_release);
}

static void snapshot(cp_ring_header *h, cp_ring_counters *c)
{
    c->head = atomic_load_explicit(&h->head, memory_order_relaxed);
    c->tail = atomic_load_explicit(&h->tail, memory_order_relaxed);
    c->count = atomic_load_explicit(&h->count, memory_order_relaxed);
    c->unfinished = atomic_load_explicit(&h->unfinished, memory_order_relaxed);
    c->released = atomic_load_explicit(&h->released, memory_order_relaxed);
}

static int ring_lock(cp_ring_header *h, int flags)
{
    int e = (flags & CP_RING_TRYLOCK) ? pthread_mutex_trylock(&h->lock)
                                      : pthread_mutex_lock(&h->lock);
    if (e == 0)
        return 0;
    if (e == EOWNERDEAD) {
        /* The previous holder died inside put/get/task_done. Either it never marked its redo
           record (nothing it did is visible) or it did (finish its commit for it). */
        if (atomic_load_explicit(&h->redo_valid, memory_order_acquire)) {
            cp_ring_counters c = h->redo;
            apply_counters(h, &c);
            atomic_store_explicit(&h->redo_valid, 0, memory_order_release);
        }
        pthread_mutex_consistent(&h->lock);
        return 0;
    }
    return -e; /* EBUSY for a trylock */
}

static inline void ring_unlock(cp_ring_header *h)
{
    pthread_mutex_unlock(&h->lock);
}

/* ---- copying at a position, in two pieces where the data area wraps ---- */

static void copy_in(cp_ring_t *r, uint64_t pos, const void *src, uint64_t len)
{
    uint64_t cap = r->h->capacity, off = pos & (cap - 1);
    uint64_t first = len < cap - off ? len : cap - off;
    memcpy(r->data + off, src, first);
    if (len > first)
        memcpy(r->data, (const unsigned char *)src + first, len - first);
}

static void copy_out(cp_ring_t *r, uint64_t pos, void *dst, uint64_t len)
{
    uint64_t cap = r->h->capacity, off = pos & (cap - 1);
    uint64_t first = len < cap - off ? len : cap - off;
    memcpy(dst, r->data + off, first);
    if (len > first)
        memcpy((unsigned char *)dst + first, r->data, len - first);
}

/* Headers are 8-aligned and capacity is a multiple of 8, so a header never wraps. */
static inline void put_header(cp_ring_t *r, uint64_t pos, uint64_t len, uint32_t kind)
{
    uint64_t word = (len << 8) | kind;
    memcpy(r->data + (pos & (r->h->capacity - 1)), &word, 8);
}

static inline uint64_t get_header(cp_ring_t *r, uint64_t pos)
{
    uint64_t word;
    memcpy(&word, r->data + (pos & (r->h->capacity - 1)), 8);
    return word;
}

/* ---- giving consumed cold pages back ---- */

/* Punch out the cold pages wholly inside positions [a, b). Called under the lock with b at
   most the tail, so no writer can be using them (writers stay below released + capacity). */
static int punch_cold(cp_ring_t *r, uint64_t a, uint64_t b, int dry_run)
{
    uint64_t cap = r->h->capacity, hot = r->h->hot;
    int touched = 0;
    while (a < b) {
        uint64_t off = a & (cap - 1);
        uint64_t n = b - a < cap - off ? b - a : cap - off;
        uint64_t s = off > hot ? off : hot, e = off + n;
        if (s < e) {
            touched = 1;
            s = page_up(s);
            e = page_down(e);
            if (!dry_run && s < e)
                fallocate(r->shm.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          (off_t)(HEADER_BYTES + s), (off_t)(e - s));
        }
        a += n;
    }
    return touched;
}

/* Move `released` up to the consumed pages: at once when they are hot (nothing to give back),
   in batches of PUNCH_BATCH when cold, and always when the reader is done with the cold run. */
static void release_consumed(cp_ring_t *r, cp_ring_counters *c)
{
    uint64_t target = page_down(c->tail);
    if (target <= c->released)
        return;
    if (punch_cold(r, c->released, target, 1)) {
        int cold_run_over = c->count == 0 || (c->tail & (r->h->capacity - 1)) < r->h->hot;
        if (!cold_run_over && target - c->released < PUNCH_BATCH)
            return;
        punch_cold(r, c->released, target, 0);
    }
    c->released = target;
}

/* ---- create / attach ---- */

int cp_ring_create(cp_ring_t *r, uint64_t capacity, uint64_t hot, uint64_t maxsize)
{
    memset(r, 0, sizeof *r);
    r->shm.fd = -1;
    if (capacity == 0)
        capacity = CP_RING_DEFAULT_CAPACITY;
    if (hot == 0)
        hot = CP_RING_DEFAULT_HOT;
    if (capacity > (1ULL << 46))
        return -EINVAL;
    /* A power of two, so position -> offset is a mask. */
    uint64_t cap = PAGE;
    while (cap < capacity)
        cap <<= 1;
    hot = page_up(hot);
    if (hot > cap)
        hot = cap;

    int rc = cp_shm_create(&r->shm, HEADER_BYTES + cap, "cpool-queue");
    if (rc < 0)
        return rc;
    cp_ring_header *h = r->shm.addr;
    h->version = CP_RING_VERSION;
    h->header_size = HEADER_BYTES;
    h->capacity = cap;
    h->hot = hot;
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
        cp_shm_close(&r->shm);
        return -e;
    }
    /* The rest of the header is zero (a fresh memfd). The magic goes last. */
    atomic_thread_fence(memory_order_release);
    h->magic = CP_RING_MAGIC;
    r->h = h;
    r->data = (unsigned char *)r->shm.addr + HEADER_BYTES;
    return 0;
}

int cp_ring_attach(cp_ring_t *r, int fd)
{
    memset(r, 0, sizeof *r);
    r->shm.fd = -1;
    int rc = cp_shm_attach(&r->shm, fd, 0);
    if (rc < 0)
        return rc;
    cp_ring_header *h = r->shm.addr;
    if (r->shm.size < HEADER_BYTES || h->magic != CP_RING_MAGIC || h->version != CP_RING_VERSION ||
        h->header_size != HEADER_BYTES || h->capacity + HEADER_BYTES != r->shm.size) {
        cp_shm_close(&r->shm);
        return -EINVAL;
    }
    r->h = h;
    r->data = (unsigned char *)r->shm.addr + HEADER_BYTES;
    return 0;
}

void cp_ring_close(cp_ring_t *r)
{
    cp_shm_close(&r->shm);
    r->h = NULL;
    r->data = NULL;
}

/* ---- put / get ---- */

/* Where a record of `need` bytes goes, or UINT64_MAX when there is no room. May lay down a
   skip record to go back to the start of the data area (the hot zone) when that is free. */
static uint64_t place(cp_ring_t *r, cp_ring_counters *c, uint64_t need)
{
    uint64_t cap = r->h->capacity, off = c->head & (cap - 1);
    if (off != 0 && off + need > r->h->hot) {
        uint64_t skip = cap - off;
        if (c->head + skip + need - c->released <= cap) {
            put_header(r, c->head, 0, KIND_SKIP);
            c->head += skip;
            return c->head;
        }
    }
    if (c->head + need - c->released <= cap)
        return c->head;
    return UINT64_MAX;
}

static void wake(_Atomic uint32_t *waiters, _Atomic uint32_t *seq, int n)
{
    if (atomic_load(waiters)) {
        atomic_fetch_add(seq, 1);
        cp_futex_wake(seq, n);
    }
}

int cp_ring_put(cp_ring_t *r, const cp_ring_msg *msgs, size_t n, int flags, size_t *done)
{
    cp_ring_header *h = r->h;
    *done = 0;
    int rc = ring_lock(h, flags);
    if (rc < 0)
        return rc;
    cp_ring_counters c;
    snapshot(h, &c);
    size_t i = 0;
    for (; i < n; i++) {
        const cp_ring_msg *m = &msgs[i];
        if (h->maxsize && c.count >= h->maxsize) {
            rc = -EAGAIN;
            break;
        }
        uint64_t need = record_bytes(m->len);
        if (m->len >= (1ULL << 56) || need > h->capacity - PAGE) {
            rc = -EMSGSIZE;
            break;
        }
        uint64_t pos = place(r, &c, need);
        if (pos == UINT64_MAX) {
            rc = -EAGAIN;
            break;
        }
        put_header(r, pos, m->len, m->kind);
        uint64_t at = pos + 8;
        for (uint32_t k = 0; k < m->npieces; k++) {
            copy_in(r, at, m->pieces[k].base, m->pieces[k].len);
            at += m->pieces[k].len;
        }
        c.head = pos + need;
        c.count++;
        if (flags & CP_RING_TASK)
            c.unfinished++;
    }
    if (i > 0)
        commit(h, &c);
    ring_unlock(h);
    *done = i;
    if (i > 0)
        wake(&h->get_waiters, &h->get_seq, i > INT_MAX ? INT_MAX : (int)i);
    return rc;
}

long cp_ring_get(cp_ring_t *r, void *dst, size_t cap, size_t maxn, cp_ring_got *got, int flags)
{
    cp_ring_header *h = r->h;
    int rc = ring_lock(h, flags);
    if (rc < 0)
        return rc;
    cp_ring_counters c;
    snapshot(h, &c);
    uint64_t rcap = h->capacity;
    int changed = 0;
    long n = 0;
    size_t used = 0;
    while ((size_t)n < maxn && c.count > 0) {
        uint64_t word = get_header(r, c.tail);
        uint32_t kind = (uint32_t)(word & 0xff);
        uint64_t len = word >> 8;
        if (kind == KIND_SKIP) {
            uint64_t lap_end = (c.tail | (rcap - 1)) + 1;
            /* The page holding the skip marker is free too: writers are still below
               released + capacity, which is at most that page's start in the next lap. */
            if (page_up(c.tail) > c.released)
                punch_cold(r, c.released, page_up(c.tail), 0);
            c.tail = c.released = lap_end;
            changed = 1;
            continue;
        }
        uint64_t sz = align8(len);
        if (8 + sz > c.head - c.tail) {
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
        copy_out(r, c.tail + 8, (unsigned char *)dst + used, len);
        got[n].kind = kind;
        got[n].len = len;
        got[n].offset = used;
        used += sz;
        n++;
        c.tail += 8 + sz;
        c.count--;
        changed = 1;
    }
    if (changed) {
        release_consumed(r, &c);
        commit(h, &c);
    }
    ring_unlock(h);
    if (n > 0) {
        wake(&h->put_waiters, &h->put_seq, INT_MAX);
        return n;
    }
    return rc < 0 ? rc : -EAGAIN;
}

/* ---- waiting ---- */

/* Sleep on seq unless ready() already holds; the waiter count tells peers to wake us.
   Sleeps are capped so that a wake-up given to a peer that then died is not lost for good. */
static int wait_on(_Atomic uint32_t *waiters, _Atomic uint32_t *seq, int64_t deadline,
                   int (*ready)(cp_ring_t *, uint64_t), cp_ring_t *r, uint64_t arg)
{
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        if (ready(r, arg))
            return 0;
        cpu_relax();
    }
    atomic_fetch_add(waiters, 1);
    uint32_t s = atomic_load(seq);
    int rc = 0;
    if (!ready(r, arg)) {
        int64_t cap = cp_now_ns() + MAX_SLEEP_NS;
        int64_t d = deadline < cap ? deadline : cap;
        rc = cp_futex_wait(seq, s, d);
        if (rc == -ETIMEDOUT && d != deadline)
            rc = 0;
    }
    atomic_fetch_sub(waiters, 1);
    return rc;
}

static int readable(cp_ring_t *r, uint64_t unused)
{
    return atomic_load(&r->h->count) != 0;
}

static int writable(cp_ring_t *r, uint64_t seen_tail)
{
    return atomic_load(&r->h->tail) != seen_tail;
}

static int joined(cp_ring_t *r, uint64_t unused)
{
    return atomic_load(&r->h->unfinished) == 0;
}

int cp_ring_wait_readable(cp_ring_t *r, int64_t deadline)
{
    return wait_on(&r->h->get_waiters, &r->h->get_seq, deadline, readable, r, 0);
}

int cp_ring_wait_writable(cp_ring_t *r, uint64_t seen_tail, int64_t deadline)
{
    return wait_on(&r->h->put_waiters, &r->h->put_seq, deadline, writable, r, seen_tail);
}

int cp_ring_wait_joined(cp_ring_t *r, int64_t deadline)
{
    return wait_on(&r->h->join_waiters, &r->h->join_seq, deadline, joined, r, 0);
}

int cp_ring_task_done(cp_ring_t *r)
{
    cp_ring_header *h = r->h;
    int rc = ring_lock(h, 0);
    if (rc < 0)
        return rc;
    uint64_t u = atomic_load_explicit(&h->unfinished, memory_order_relaxed);
    if (u > 0)
        atomic_store(&h->unfinished, u - 1); /* one store: its own commit */
    ring_unlock(h);
    if (u == 0)
        return -ERANGE;
    if (u == 1)
        wake(&h->join_waiters, &h->join_seq, INT_MAX);
    return 0;
}
