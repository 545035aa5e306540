/* The pool's shared heap of large buffers: first-fit runs of units, one store per change. */
#include "bufheap.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "robust.h"

static uint64_t align_up(uint64_t n, uint64_t a)
{
    return (n + a - 1) & ~(a - 1);
}

static uint64_t meta_bytes(uint64_t nunits)
{
    return sizeof(cp_heap_t) + nunits * (2 * sizeof(uint32_t) + sizeof(int32_t));
}

static _Atomic int32_t *holders(cp_heap_t *h)
{
    return (_Atomic int32_t *)(h->run + h->nunits);
}

static _Atomic uint32_t *freed_at(cp_heap_t *h)
{
    return (_Atomic uint32_t *)(h->run + 2 * h->nunits);
}

/* Now in 100 ms ticks (never 0); CLOCK_MONOTONIC is one clock for every process. */
static uint32_t tick(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint32_t)((uint64_t)t.tv_sec * 10 + (uint64_t)t.tv_nsec / 100000000) | 1u;
}

size_t cp_heap_size(uint64_t data)
{
    uint64_t nunits = (data + CP_HEAP_UNIT - 1) / CP_HEAP_UNIT;
    return (size_t)(align_up(meta_bytes(nunits), 4096) + nunits * CP_HEAP_UNIT);
}

int cp_heap_init(void *mem, size_t size)
{
    cp_heap_t *h = mem;
    uint64_t nunits = size / CP_HEAP_UNIT;
    while (nunits && align_up(meta_bytes(nunits), 4096) + nunits * CP_HEAP_UNIT > size)
        nunits--;
    if (!nunits || nunits > UINT32_MAX)
        return -EINVAL;
    h->magic = CP_HEAP_MAGIC;
    h->size = size;
    h->nunits = nunits;
    h->data_off = align_up(meta_bytes(nunits), 4096);
    return cp_robust_init(&h->lock);
}

int cp_heap_check(const void *mem, size_t size)
{
    const cp_heap_t *h = mem;
    if (size < sizeof *h || h->magic != CP_HEAP_MAGIC || h->size != size ||
        h->data_off + h->nunits * CP_HEAP_UNIT > size)
        return -EINVAL;
    return 0;
}

/* The lock; a dead holder's half-done change is a single store, done or not: nothing to
   repair. */
static int lock(cp_heap_t *h)
{
    int r = cp_robust_lock(&h->lock);
    return r < 0 ? r : 0;
}

static void unlock(cp_heap_t *h)
{
    pthread_mutex_unlock(&h->lock);
}

static uint64_t unit_off(cp_heap_t *h, uint64_t u)
{
    return h->data_off + u * CP_HEAP_UNIT;
}

int64_t cp_heap_alloc(cp_heap_t *h, uint64_t len, int32_t holder)
{
    if (len == 0 || len > h->nunits * CP_HEAP_UNIT)
        return -ENOMEM;
    uint64_t want = (len + CP_HEAP_UNIT - 1) / CP_HEAP_UNIT;
    int r = lock(h);
    if (r < 0)
        return r;
    uint64_t u = 0, start = 0, found = 0;
    while (u < h->nunits) {
        uint32_t n = atomic_load_explicit(&h->run[u], memory_order_relaxed);
        if (n) {
            u += n; /* skip the block */
            start = u;
            found = 0;
            continue;
        }
        if (++found == want)
            break;
        u++;
    }
    int64_t off = -ENOMEM;
    if (found == want) {
        for (uint64_t k = start; k < start + want; k++)
            atomic_store_explicit(&freed_at(h)[k], 0, memory_order_relaxed);
        atomic_store_explicit(&holders(h)[start], holder, memory_order_relaxed);
        atomic_store_explicit(&h->run[start], (uint32_t)want, memory_order_release);
        atomic_fetch_add_explicit(&h->used, want, memory_order_relaxed);
        off = (int64_t)unit_off(h, start);
    }
    unlock(h);
    return off;
}

/* Unit index of a block starting at off, or -1. */
static int64_t block_unit(cp_heap_t *h, uint64_t off)
{
    if (off < h->data_off || (off - h->data_off) % CP_HEAP_UNIT)
        return -1;
    uint64_t u = (off - h->data_off) / CP_HEAP_UNIT;
    if (u >= h->nunits || !atomic_load_explicit(&h->run[u], memory_order_acquire))
        return -1;
    return (int64_t)u;
}

int cp_heap_is_block(cp_heap_t *h, uint64_t off, uint64_t len)
{
    int64_t u = block_unit(h, off);
    return u >= 0 && len <= (uint64_t)atomic_load(&h->run[u]) * CP_HEAP_UNIT;
}

void cp_heap_set_holder(cp_heap_t *h, uint64_t off, int32_t holder)
{
    int64_t u = block_unit(h, off);
    if (u >= 0)
        atomic_store_explicit(&holders(h)[u], holder, memory_order_relaxed);
}

static void free_unit_locked(cp_heap_t *h, uint64_t u)
{
    uint32_t n = atomic_load_explicit(&h->run[u], memory_order_relaxed), now = tick();
    for (uint64_t k = u; k < u + n; k++)
        atomic_store_explicit(&freed_at(h)[k], now, memory_order_relaxed);
    atomic_store_explicit(&h->run[u], 0, memory_order_release);
    atomic_fetch_sub_explicit(&h->used, n, memory_order_relaxed);
}

void cp_heap_free(cp_heap_t *h, uint64_t off)
{
    int64_t u = block_unit(h, off);
    if (u < 0)
        return;
    if (lock(h) < 0)
        return;
    if (atomic_load_explicit(&h->run[u], memory_order_relaxed))
        free_unit_locked(h, (uint64_t)u);
    unlock(h);
}

uint64_t cp_heap_free_held_by(cp_heap_t *h, int32_t holder)
{
    uint64_t freed = 0;
    if (lock(h) < 0)
        return 0;
    for (uint64_t u = 0; u < h->nunits;) {
        uint32_t n = atomic_load_explicit(&h->run[u], memory_order_relaxed);
        if (!n) {
            u++;
            continue;
        }
        if (atomic_load_explicit(&holders(h)[u], memory_order_relaxed) == holder) {
            free_unit_locked(h, u);
            freed++;
        }
        u += n;
    }
    unlock(h);
    return freed;
}

uint64_t cp_heap_trim(cp_heap_t *h, uint32_t idle_ms)
{
    uint32_t now = tick(), idle = (idle_ms + 99) / 100;
    uint64_t resident = 0;
    if (lock(h) < 0)
        return 0;
    /* Runs of free units idle long enough are punched out together; the lock keeps a new
       block from being cut from them meanwhile. */
    uint64_t u = 0, from = 0, len = 0;
    while (u <= h->nunits) {
        uint32_t n = u < h->nunits ? atomic_load_explicit(&h->run[u], memory_order_relaxed) : 0;
        uint32_t f = u < h->nunits && !n ? atomic_load_explicit(&freed_at(h)[u], memory_order_relaxed)
                                         : 0;
        int stale = f && now - f >= idle;
        if (stale) {
            if (!len)
                from = u;
            len++;
            atomic_store_explicit(&freed_at(h)[u], 0, memory_order_relaxed);
        }
        if ((!stale || u == h->nunits) && len) {
            madvise(cp_heap_ptr(h, unit_off(h, from)), len * CP_HEAP_UNIT, MADV_REMOVE);
            len = 0;
        }
        if (f && !stale)
            resident += CP_HEAP_UNIT;
        if (u == h->nunits)
            break;
        u += n ? n : 1;
    }
    unlock(h);
    return resident;
}
