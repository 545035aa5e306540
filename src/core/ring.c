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

#include "channel.h"
#include "deadline.h"
#include "futex.h"
#include "robust.h"
#include "spin.h"

#define PAGE CP_CHAN_PAGE
#define HEADER_BYTES PAGE
#define PUNCH_BATCH (1ULL << 20)   /* cold bytes consumed before they are given back */
#define POPULATE_MIN (64ULL << 10) /* cold records from this size have their pages faulted in bulk */
/* Polling before a futex sleep adapts as spin.h describes (the CP_SPIN_* budgets); the budget
   lives in the handle (threads of one process may share a queue handle). */
#define MAX_SLEEP_NS 500000000LL   /* re-check at least this often: a woken peer may have died */
/* The hot ring is a power of two, the cold one any number of pages (so a message can use all
   the address space there is): cp_chan_wrap handles both. */

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

/* Under the lock: the eventfd set from the committed count (arming, or a holder that died
   between a commit and its notify_set). */
static void notify_resync(cp_ring_t *r)
{
    notify_set(r, 0);
    if (live(r->h)->count)
        notify_set(r, 1);
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

/* Under a lock whose holder died inside put/get/task_done: it flipped cur or it did not, so
   the committed slot is whole either way. Only a resize it began needs finishing: its size
   goes with the counters it committed, or is dropped when it committed none. */
static void repair(void *arg)
{
    cp_ring_t *r = arg;
    cp_ring_header *h = r->h;
    atomic_fetch_add(&h->recoveries, 1);
    if (h->resize_to) {
        if (atomic_load(&h->cur) != h->resize_cur)
            h->cold = h->resize_to;
        h->resize_to = 0;
    }
    /* ... and it may have died between the commit and the eventfd's update. */
    if (atomic_load_explicit(&h->notify, memory_order_relaxed))
        notify_resync(r);
}

static int ring_lock(cp_ring_t *r, int flags)
{
    /* In slices, so that a holder that is stopped (SIGSTOP, a debugger) cannot keep the
       caller from seeing Ctrl-C: -ETIMEDOUT sends it back to check signals and retry. */
    int64_t until = (flags & CP_RING_TRYLOCK) ? 0 : cp_now_ns() + CP_WAIT_SLICE_NS;
    int rc = cp_robust_lock_until(&r->h->lock, until, repair, r);
    return rc > 0 ? 0 : rc; /* -EBUSY for a trylock, -ETIMEDOUT for a slice */
}

static inline void ring_unlock(cp_ring_header *h)
{
    pthread_mutex_unlock(&h->lock);
}

/* ---- copying at a position of one circular area, in slices, in two pieces where it wraps ---- */

/* One operation's copying: bytes since the last cancel check, whether it checked at all, and
   whether the destination's pages are faulted in first. */
typedef struct {
    const cp_ring_cancel *cancel;
    uint64_t since;
    int sliced;
    int fault;
} copier;

/* Fault in the pages of [p, p + n) with one system call rather than one trap per page
   (MADV_POPULATE_WRITE, Linux 5.14; older kernels just fault as they go). */
static void populate(unsigned char *p, uint64_t n)
{
#ifdef MADV_POPULATE_WRITE
    uintptr_t s = (uintptr_t)p & ~(uintptr_t)(PAGE - 1);
    uintptr_t e = ((uintptr_t)p + n + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    madvise((void *)s, e - s, MADV_POPULATE_WRITE);
#endif
}

/* memcpy in slices of CP_RING_SLICE with the cancel check between them; with k->fault, the
   destination pages of each slice are populated first (so that too is sliced). 0 or
   -ECANCELED. A cp_chan_copy_fn. */
static int slice_copy(void *ctx, void *to, const void *from, uint64_t n)
{
    copier *k = ctx;
    unsigned char *dst = to;
    const unsigned char *src = from;
    while (n > 0) {
        uint64_t room = CP_RING_SLICE - k->since;
        uint64_t m = n < room ? n : room;
        if (k->fault)
            populate(dst, m);
        memcpy(dst, src, m);
        dst += m;
        src += m;
        n -= m;
        k->since += m;
        if (k->since >= CP_RING_SLICE) {
            k->since = 0;
            k->sliced = 1;
            if (k->cancel && k->cancel->check(k->cancel->arg))
                return -ECANCELED;
        }
    }
    return 0;
}

/* The last check of a sliced copy, right before its commit: a signal that came during the
   last slice still stops it, so the window where Ctrl-C lands after the commit is tiny. */
static int copy_finished(copier *k)
{
    if (k->sliced && k->since > 0 && k->cancel && k->cancel->check(k->cancel->arg))
        return -ECANCELED;
    k->since = 0;
    k->sliced = 0;
    return 0;
}

/* Headers are 8-aligned and sizes multiples of 8, so a header never wraps. */
static int write_record(copier *k, unsigned char *area, uint64_t size, uint64_t pos,
                        const cp_ring_msg *m, int fault)
{
    uint64_t word = (m->len << 8) | m->kind;
    cp_chan_put_hdr(area, size, pos, &word);
    uint64_t at = pos + CP_CHAN_REC_HDR;
    k->fault = fault;
    for (uint32_t i = 0; i < m->npieces; i++) {
        int rc = cp_chan_copy_in(area, size, at, m->pieces[i].base, m->pieces[i].len, slice_copy, k);
        if (rc < 0)
            return rc;
        at += m->pieces[i].len;
    }
    return copy_finished(k);
}

/* ---- giving cold pages back, and resizing the cold ring ---- */

/* Punch out the cold pages wholly inside positions [a, b) of a ring of size bytes. Only for
   consumed positions (below the committed tail) that writers do not use yet. */
static void punch_cold(cp_ring_t *r, uint64_t size, uint64_t a, uint64_t b)
{
    off_t base = (off_t)(HEADER_BYTES + r->h->hot);
    a = cp_chan_page_up(a);
    b = cp_chan_page_down(b);
    while (a < b) {
        uint64_t off = cp_chan_wrap(a, size);
        uint64_t n = b - a < size - off ? b - a : size - off;
        fallocate(r->shm.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, base + (off_t)off, (off_t)n);
        a += n;
    }
}

/* Map this handle's view of the cold ring at size bytes (mremap keeps the pages and may move
   them; the memfd must be that long). 0 or -errno; the old mapping stays on failure. */
static int map_cold(cp_ring_t *r, uint64_t size)
{
    void *p;
    if (r->cold)
        p = mremap(r->cold, r->cold_mapped, size, MREMAP_MAYMOVE);
    else
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r->shm.fd,
                 (off_t)(HEADER_BYTES + r->h->hot));
    if (p == MAP_FAILED)
        return -errno;
    r->cold = p;
    r->cold_mapped = size;
    return 0;
}

/* Under the lock: follow a resize another process made. */
static inline int sync_cold(cp_ring_t *r)
{
    return r->cold_mapped == r->h->cold ? 0 : map_cold(r, r->h->cold);
}

static int set_file_size(cp_ring_t *r, uint64_t cold)
{
    return ftruncate(r->shm.fd, (off_t)(HEADER_BYTES + r->h->hot + cold)) < 0 ? -errno : 0;
}

/* Give the cold ring new_size bytes, re-basing *c so its live records keep their bytes, and
   commit (see ring.h). The live records [ctail, chead) sit at offsets a.. of the old ring, the
   part past its end wrapped to 0..; that part is copied to just past the old end, so in the
   new ring they are one run from a (a growth always leaves room for it). 0 or -errno with
   nothing changed. */
static int resize_cold(cp_ring_t *r, cp_ring_counters *c, uint64_t new_size)
{
    cp_ring_header *h = r->h;
    uint64_t old = h->cold, live = c->chead - c->ctail;
    uint64_t a = live ? cp_chan_wrap(c->ctail, old) : 0;
    uint64_t wrapped = live && a + live > old ? a + live - old : 0;
    /* The file only grows before the commit, and shrinks after it: a peer that still maps the
       old size never touches a page past the end of the file (SIGBUS), whenever we die. */
    if (new_size > old) {
        int rc = set_file_size(r, new_size);
        if (rc == 0)
            rc = map_cold(r, new_size);
        if (rc < 0) {
            (void)set_file_size(r, old);
            return rc;
        }
    }
    if (live == 0) /* every cold byte is consumed: free all the pages in one call */
        fallocate(r->shm.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(HEADER_BYTES + h->hot), (off_t)old);
    else /* consumed pages of the old layout: their offsets mean other positions from now on */
        punch_cold(r, old, c->creleased, c->ctail);
    h->resize_cur = atomic_load(&h->cur);
    h->resize_to = new_size;
    if (wrapped)
        memcpy(r->cold + old, r->cold, wrapped); /* the old copy stays until the commit */
    c->ctail = a;
    c->chead = a + live;
    c->creleased = cp_chan_page_down(a);
    commit(r, c);
    h->cold = new_size;
    h->resize_to = 0;
    if (wrapped)
        punch_cold(r, new_size, 0, wrapped); /* below a: free in the new layout */
    if (new_size < old) { /* a shrink, of an empty ring */
        (void)map_cold(r, new_size);
        (void)set_file_size(r, new_size);
    }
    return 0;
}

/* Room for a cold record of need bytes that does not fit: twice the size when records are
   live (so a backlog grows in few steps), else just enough; and when the address space does
   not have twice, just enough. 0, -EMSGSIZE (beyond cold_max) or -ENOMEM. */
static int grow_cold(cp_ring_t *r, cp_ring_counters *c, uint64_t need)
{
    cp_ring_header *h = r->h;
    uint64_t live = c->chead - c->ctail;
    uint64_t a = live ? cp_chan_wrap(c->ctail, h->cold) : 0;
    uint64_t least = cp_chan_page_up(a + live + need + PAGE);
    if (least > h->cold_max)
        return live ? -EAGAIN : -EMSGSIZE;
    uint64_t want = live && least < 2 * h->cold ? 2 * h->cold : least;
    if (want > h->cold_max)
        want = h->cold_max;
    int rc = resize_cold(r, c, want);
    if (rc == -ENOMEM && want > least)
        rc = resize_cold(r, c, least);
    /* With records live, readers may yet make room: wait as on a full ring. */
    return rc == -ENOMEM && live ? -EAGAIN : rc;
}

/* At the start of an operation, under the lock: give back the cold pages earlier gets
   consumed (in batches, and all of them once the cold ring is empty), or shrink an empty
   grown cold ring. They were consumed by a committed get, so punching before this
   operation's commit is safe; a holder killed in between leaves them to the next one.
   1 when *c changed (commit it). */
static int tidy_cold(cp_ring_t *r, cp_ring_counters *c)
{
    cp_ring_header *h = r->h;
    if (c->ctail == c->chead && h->cold > h->cold_start && resize_cold(r, c, h->cold_start) == 0)
        return 1;
    uint64_t target = cp_chan_page_down(c->ctail);
    if (target <= c->creleased)
        return 0;
    if (target - c->creleased < PUNCH_BATCH && c->ctail != c->chead)
        return 0;
    punch_cold(r, h->cold, c->creleased, target);
    c->creleased = target;
    return 1;
}

/* ---- create / attach ---- */

int cp_ring_create(cp_ring_t *r, uint64_t hot, uint64_t cold_start, uint64_t cold_max,
                   uint64_t maxsize)
{
    memset(r, 0, sizeof *r);
    r->shm.fd = -1;
    r->notify_fd = -1;
    if (hot == 0)
        hot = CP_RING_DEFAULT_HOT;
    if (cold_max == 0)
        cold_max = CP_RING_MAX_COLD;
    if (cold_start == 0)
        cold_start = CP_RING_COLD_START;
    if (hot > (1ULL << 40) || cold_max > CP_RING_MAX_COLD)
        return -EINVAL;
    hot = cp_chan_pow2_pages(hot);
    cold_max = cp_chan_pow2_pages(cold_max);
    cold_start = cp_chan_page_up(cold_start < cold_max ? cold_start : cold_max);

    /* The header and the hot ring are one mapping that never moves (peers read the counters
       without the lock); the cold ring has its own, which grows. */
    int rc = cp_shm_create(&r->shm, HEADER_BYTES + hot, "cpool-queue");
    if (rc < 0)
        return rc;
    if ((r->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
        rc = -errno;
        cp_shm_close(&r->shm);
        return rc;
    }
    cp_ring_header *h = r->h = r->shm.addr;
    h->version = CP_RING_VERSION;
    h->header_size = HEADER_BYTES;
    h->hot = hot;
    h->cold = cold_start;
    h->cold_start = cold_start;
    h->cold_max = cold_max;
    h->maxsize = maxsize;
    if ((rc = set_file_size(r, cold_start)) < 0 || (rc = map_cold(r, cold_start)) < 0) {
        cp_ring_close(r);
        return rc;
    }

    if ((rc = cp_robust_init_type(&h->lock, PTHREAD_MUTEX_ERRORCHECK)) < 0) {
        cp_ring_close(r);
        return rc;
    }
    /* The rest of the header is zero (a fresh memfd). The magic goes last. */
    atomic_thread_fence(memory_order_release);
    h->magic = CP_RING_MAGIC;
    r->hot = (unsigned char *)r->shm.addr + HEADER_BYTES;
    r->spin.ns = CP_SPIN_INIT;
    return 0;
}

int cp_ring_attach(cp_ring_t *r, int fd, int notify_fd)
{
    memset(r, 0, sizeof *r);
    r->shm.fd = -1;
    r->notify_fd = -1;
    /* The header first, to learn the hot ring's size; the cold ring is mapped under the lock
       at the first operation (its size may change until then). */
    cp_ring_header head;
    if (pread(fd, &head, sizeof head, 0) != (ssize_t)sizeof head || head.magic != CP_RING_MAGIC ||
        head.version != CP_RING_VERSION || head.header_size != HEADER_BYTES ||
        head.hot == 0 || head.hot > (1ULL << 40))
        return -EINVAL;
    int rc = cp_shm_attach(&r->shm, fd, HEADER_BYTES + head.hot);
    if (rc < 0)
        return rc;
    r->h = r->shm.addr;
    if ((r->notify_fd = fcntl(notify_fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        rc = -errno;
        cp_shm_close(&r->shm);
        r->h = NULL;
        return rc;
    }
    r->hot = (unsigned char *)r->shm.addr + HEADER_BYTES;
    r->spin.ns = CP_SPIN_INIT;
    return 0;
}

void cp_ring_close(cp_ring_t *r)
{
    if (r->notify_fd >= 0)
        close(r->notify_fd);
    r->notify_fd = -1;
    if (r->cold)
        munmap(r->cold, r->cold_mapped);
    cp_shm_close(&r->shm);
    r->h = NULL;
    r->hot = r->cold = NULL;
    r->cold_mapped = 0;
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

/* The lock, then this handle's view of the cold ring brought up to date. */
static int lock_and_sync(cp_ring_t *r, int flags)
{
    int rc = ring_lock(r, flags);
    if (rc == 0 && (rc = sync_cold(r)) < 0)
        ring_unlock(r->h);
    return rc;
}

int cp_ring_put(cp_ring_t *r, const cp_ring_msg *msgs, size_t n, int flags, size_t *done,
                uint64_t *seen, const cp_ring_cancel *cancel)
{
    cp_ring_header *h = r->h;
    *done = 0;
    int rc = lock_and_sync(r, flags);
    if (rc < 0)
        return rc;
    cp_ring_counters c = *live(h);
    int dirty = tidy_cold(r, &c);
    uint64_t hot = h->hot;
    copier k = {cancel, 0, 0, 0};
    size_t i = 0;
    for (; i < n; i++) {
        const cp_ring_msg *m = &msgs[i];
        if (h->maxsize && c.count >= h->maxsize) {
            rc = -EAGAIN;
            break;
        }
        uint64_t need = cp_chan_record_size(m->len);
        if (m->len >= (1ULL << 56) || (need > hot && need + PAGE > h->cold_max)) {
            rc = -EMSGSIZE;
            break;
        }
        int cold_empty = c.chead == c.ctail;
        if (cold_empty && c.hhead + need - c.htail <= hot) {
            if ((rc = write_record(&k, r->hot, hot, c.hhead, m, 0)) < 0)
                break;
            c.hhead += need;
        }
        else if (cold_empty && need <= hot && (flags & CP_RING_HOT_ONLY)) {
            rc = -ENOSPC;
            break;
        }
        else {
            if (c.chead + need - c.creleased > h->cold) {
                /* A resize commits: what this call put so far goes in with it. */
                if ((rc = grow_cold(r, &c, need)) < 0)
                    break;
                *done = i;
                dirty = 0;
            }
            if ((rc = write_record(&k, r->cold, h->cold, c.chead, m, need >= POPULATE_MIN)) < 0)
                break;
            c.chead += need;
        }
        c.count++;
        if (flags & CP_RING_TASK)
            c.unfinished++;
    }
    if (i > *done || dirty)
        commit(r, &c);
    if (seen)
        *seen = c.consumed;
    ring_unlock(h);
    *done = i;
    if (i > 0)
        wake(h, SLEEP_GET);
    return rc;
}

long cp_ring_get(cp_ring_t *r, void *dst, size_t cap, size_t maxn, cp_ring_got *got, int flags,
                 const cp_ring_cancel *cancel)
{
    cp_ring_header *h = r->h;
    int rc = lock_and_sync(r, flags);
    if (rc < 0)
        return rc;
    cp_ring_counters c = *live(h);
    int dirty = tidy_cold(r, &c);
    copier k = {cancel, 0, 0, 0};
    long n = 0;
    size_t used = 0;
    while ((size_t)n < maxn && c.count > 0) {
        /* Hot first: while the cold ring holds records, every hot one is older. */
        int from_hot = c.hhead != c.htail;
        unsigned char *area = from_hot ? r->hot : r->cold;
        uint64_t size = from_hot ? h->hot : h->cold;
        uint64_t *tail = from_hot ? &c.htail : &c.ctail;
        uint64_t avail = from_hot ? c.hhead - c.htail : c.chead - c.ctail;
        uint64_t word;
        cp_chan_get_hdr(area, size, *tail, &word);
        uint32_t kind = (uint32_t)(word & 0xff);
        uint64_t len = word >> 8;
        if (avail < CP_CHAN_REC_HDR || cp_chan_record_size(len) > avail) {
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
        k.fault = 0;
        if ((rc = cp_chan_copy_out(area, size, *tail + CP_CHAN_REC_HDR, (unsigned char *)dst + used, len,
                                   slice_copy, &k)) < 0 ||
            (rc = copy_finished(&k)) < 0) {
            n = 0; /* stopped: nothing of this call is taken (a get_many retries whole) */
            c = *live(h);
            break;
        }
        got[n].kind = kind;
        got[n].len = len;
        got[n].offset = used;
        used += cp_chan_align8(len);
        n++;
        *tail += cp_chan_record_size(len);
        c.count--;
        c.consumed++;
    }
    /* The pages of what was taken are given back by the next operation, not here: see ring.h. */
    if (n > 0 || dirty)
        commit(r, &c);
    ring_unlock(h);
    if (n > 0) {
        wake(h, SLEEP_PUT);
        return n;
    }
    return rc < 0 ? rc : -EAGAIN;
}

/* ---- waiting ---- */

/* A wait's condition: ready(r, arg), as a spin.h test. */
typedef struct {
    cp_ring_t *r;
    int (*ready)(cp_ring_t *, uint64_t);
    uint64_t arg;
} wait_cond;

static int cond_holds(void *p)
{
    wait_cond *w = p;
    return w->ready(w->r, w->arg);
}

/* Spin on ready() for the handle's budget (spin.h), then sleep on seq unless ready() holds
   once armed; the waiter count tells peers to wake us. Sleeps are capped so that a wake-up
   given to a peer that then died is not lost for good. */
static int wait_on(cp_ring_t *r, int kind, int64_t deadline, int (*ready)(cp_ring_t *, uint64_t),
                   uint64_t arg)
{
    wait_cond w = {r, ready, arg};
    if (cp_spin_until(cond_holds, &w, &r->spin, 0))
        return 0;
    _Atomic uint32_t *waiters, *seq;
    wait_words(r->h, kind, &waiters, &seq);
    int64_t cap = cp_now_ns() + MAX_SLEEP_NS;
    int64_t d = deadline < cap ? deadline : cap;
    /* Armed (bit 0 set) before the last test: a waker sees the bit or we see its commit. */
    uint32_t armed = atomic_fetch_or(seq, 1) | 1;
    int rc = cp_sleep_counted(seq, armed, waiters, cond_holds, &w, d);
    return rc == -ETIMEDOUT && d != deadline ? 0 : rc;
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

int cp_ring_task_done(cp_ring_t *r, int flags)
{
    cp_ring_header *h = r->h;
    int rc;
    while ((rc = ring_lock(r, flags & CP_RING_TRYLOCK)) == -ETIMEDOUT)
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
        notify_resync(r);
        atomic_store(&h->notify, 1);
    }
    ring_unlock(h);
    return r->notify_fd;
}
