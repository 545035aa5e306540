/* Pool channels in one shared-memory segment: a task ring (parent -> workers), a result ring
   (workers -> parent) and one "current job" slot per worker, so a dead worker's task is known. */
#ifndef CPOOL_TASKRING_H
#define CPOOL_TASKRING_H

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "channel.h"

#define CP_TR_MAGIC 0x31726b7374706300ULL /* "\0cptskr1" */
#define CP_TR_VERSION 3

/* Piece flags. A message is one or more pieces; pieces carry the writer's index so the
   parent can reassemble results of several workers and a consumer can skip the rest of a
   message whose reader died. */
#define CP_PIECE_FIRST 1u
#define CP_PIECE_LAST 2u
#define CP_PIECE_HDR 8u

/* One byte ring. head and tail only grow (64-bit, never wrap in practice); the data area is
   cap bytes, cap a power of two; records are 8-byte aligned so a piece header never straddles
   the wrap point. The "many" side (task consumers, result producers) serialises on lock, a
   robust mutex: if its holder is killed the next locker gets it back. */
typedef struct {
    _Alignas(64) _Atomic uint64_t head;
    _Atomic uint32_t bell;       /* bumped after every publish: consumers futex-wait on it */
    _Atomic uint32_t sleepers;   /* consumers asleep (or about to be) on bell */
    _Atomic uint32_t bg_sleepers;/* the parent's background thread is asleep (in poll() on its
                                    wake-up eventfd and the workers' pidfds, so a worker's
                                    exit wakes it too) */
    _Atomic uint32_t bg_idle;    /* background thread wants a wake when a worker runs dry */
    _Atomic uint32_t bg_eager;   /* ... and one for every result (callbacks are due) */
    _Alignas(64) _Atomic uint64_t tail;
    _Atomic uint32_t space_bell; /* bumped by a consumer when a producer waits for space */
    _Atomic uint32_t space_waiters;
    _Alignas(64) pthread_mutex_t lock;
    uint64_t cap;
    uint64_t data_off;           /* from the start of the segment */
    uint32_t wake_one;           /* a message is for one consumer: wake one sleeper, not all */
} cp_tr_t;

/* What a worker is running; the parent reads it when the worker dies or overruns. */
typedef struct {
    _Alignas(64) _Atomic uint64_t task_seq; /* 0 while idle */
    _Atomic uint64_t job_id;
    _Atomic uint64_t taken_pos;   /* ring position of the task's first piece */
    _Atomic int64_t item_start_ns;
    _Atomic int64_t timeout_ns;   /* 0 = none */
    _Atomic uint32_t first_chunk; /* chunks of the task message (results go back one by one) */
    _Atomic uint32_t nchunks;
    _Atomic int32_t pid;
    _Atomic uint32_t busy;        /* 1 between taking a task and handing its result back */
    _Atomic uint32_t leaving;     /* the worker is exiting on its own (maxtasksperchild, close) */
    /* Where the slot's workers spent their time (Pool(stats=True); summed over the workers
       that ran in the slot): chunks run, ns in the task functions, unpickling tasks, encoding
       and handing back results, waiting for and taking tasks. */
    _Atomic uint64_t st_chunks, st_run_ns, st_decode_ns, st_encode_ns, st_wait_ns;
} cp_tr_slot_t;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t nslots;
    uint64_t size;
    _Atomic uint32_t closing;  /* no more tasks: workers leave once the task ring is empty */
    _Atomic uint32_t stop;     /* leave now */
    uint32_t stats;            /* workers keep the st_* counters of their slots */
    cp_tr_t tasks;
    cp_tr_t results;
    uint64_t slots_off;
} cp_pool_shm_t;

/* Bytes of shared memory for nslots workers and the two rings (capacities rounded up to
   powers of two). */
size_t cp_pool_shm_size(uint32_t nslots, uint64_t task_cap, uint64_t res_cap);

/* Lay out a zero-filled segment. Returns 0 or -errno. */
int cp_pool_shm_init(void *mem, size_t size, uint32_t nslots, uint64_t task_cap, uint64_t res_cap);

/* Check the header of a segment mapped in a child. */
int cp_pool_shm_check(const void *mem, size_t size);

static inline cp_tr_slot_t *cp_pool_slot(cp_pool_shm_t *p, uint32_t i)
{
    return (cp_tr_slot_t *)((char *)p + p->slots_off) + i;
}

static inline uint8_t *cp_tr_data(cp_pool_shm_t *p, cp_tr_t *r)
{
    return (uint8_t *)p + r->data_off;
}

/* Lock the many side of a ring; an abandoned lock (holder killed) is taken over.
   Returns 0, 1 if it was abandoned, or -errno. */
int cp_tr_lock(cp_tr_t *r);
void cp_tr_unlock(cp_tr_t *r);

/* Bytes a piece of a len-byte payload takes in the ring (header + payload, 8-aligned). */
static inline uint64_t cp_tr_record_size(uint64_t len)
{
    _Static_assert(CP_PIECE_HDR == CP_CHAN_REC_HDR, "a piece is a channel record");
    return cp_chan_record_size(len);
}

/* Largest payload of one piece: messages above it are split. */
static inline uint64_t cp_tr_max_piece(const cp_tr_t *r)
{
    return r->cap / 4 - CP_PIECE_HDR;
}

/* Write pieces of msg[*off..len) while they fit, publishing each (the caller is the only
   producer or holds the lock). tag goes into every piece header. Returns 1 when the whole
   message is in, 0 when space ran out (*off says how far it got). Wakes sleeping consumers. */
int cp_tr_put(cp_pool_shm_t *p, cp_tr_t *r, const uint8_t *msg, uint64_t len, uint32_t tag,
                uint64_t *off);

/* Piece at tail, if any: fills len and tag (flags in the low byte, writer index above).
   Returns 1 if a piece is there, 0 if the ring is empty. */
int cp_tr_peek(cp_pool_shm_t *p, cp_tr_t *r, uint64_t *len, uint32_t *tag);

/* Copy n payload bytes of the piece at tail, from offset skip, to dst (handles the wrap). */
void cp_tr_copy_out(cp_pool_shm_t *p, cp_tr_t *r, uint64_t skip, void *dst, uint64_t n);

/* Pointer to the payload of the piece at tail if it does not wrap, else NULL. */
const uint8_t *cp_tr_piece_ptr(cp_pool_shm_t *p, cp_tr_t *r, uint64_t len);

/* Drop the piece at tail (len from peek). Wakes a producer waiting for space. */
void cp_tr_pop(cp_tr_t *r, uint64_t len);

/* Free bytes. */
static inline uint64_t cp_tr_free(cp_tr_t *r)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
    return r->cap - (h - t);
}

static inline int cp_tr_empty(cp_tr_t *r)
{
    return atomic_load_explicit(&r->head, memory_order_acquire) ==
           atomic_load_explicit(&r->tail, memory_order_acquire);
}

/* The waits follow spin.h's policy: a fixed spin of spin_ns that yields every round (workers
   and the parent may share a core), then a counted futex sleep. */

/* Wait as a consumer until the ring is non-empty, spinning spin_ns first, sleeping at most
   until deadline. seen is the bell as read before the caller last looked at the pool's flags,
   so a ring in between is not slept through. Returns 0 when something is there, -EAGAIN when
   the bell rang without data (cp_tr_ring_bell: look at the flags again), -ETIMEDOUT or -EINTR. */
int cp_tr_wait_data(cp_tr_t *r, uint32_t seen, int64_t spin_ns, int64_t deadline);

/* Wait as a producer until at least need bytes are free, or deadline. 0, -ETIMEDOUT, -EINTR. */
int cp_tr_wait_space(cp_tr_t *r, uint64_t need, int64_t deadline);

/* Wait once on the bell for a change from seen (or data), spinning spin_ns first.
   Returns 0, -ETIMEDOUT or -EINTR; callers re-check their condition. */
int cp_tr_wait_bell(cp_tr_t *r, uint32_t seen, int64_t spin_ns, int64_t deadline);

/* The background collector of a result ring sleeps in poll() on an eventfd (wake_fd, a
   per-process fd number of one shared eventfd) together with other fds (the workers' pidfds);
   producers wake it by writing that eventfd, and only when it sleeps and wants the wake. */

/* A result was published: wake the collector if it wants every result or the ring fills. */
void cp_tr_notify_bg(cp_tr_t *r, int wake_fd);

/* A worker is about to idle: wake the background collector if it asked for that. */
void cp_tr_nudge_idle(cp_tr_t *r, int wake_fd);

/* The background collector's sleep: poll fds[0..n) (fds[0] is the wake eventfd, which is
   reset on return) until one is ready or deadline; it does not sleep when results it wants
   are there already. Returns what poll returns (0 on timeout), or -errno. */
int cp_tr_wait_bg(cp_tr_t *r, struct pollfd *fds, unsigned int n, int64_t deadline);

/* Wake the background collector (whether it sleeps or not). */
void cp_tr_ring_bg(int wake_fd);

/* Wake consumers sleeping on the ring's bell (all of them). */
void cp_tr_ring_bell(cp_tr_t *r);

#endif
