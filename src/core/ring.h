/* A multi-producer multi-consumer queue of byte records in one shared memfd segment, with a
   robust process-shared lock, futex waits and crash recovery. Plain C: no Python.h.

   Layout. One memfd: a header page, then two circular data areas addressed by 64-bit positions
   that only grow (offset = position % size, sizes are powers of two). A record is an 8-byte
   header (length << 8 | kind) then the payload padded to 8 bytes; a record that reaches the end
   of its area wraps to the start and is copied in two pieces.

   Hot and cold. The hot ring (4 MiB by default) is where records go while readers keep up: its
   pages stay resident, so a busy queue never takes a page fault. When it is full, or for a
   record bigger than it, records go to the cold ring instead: a sparse area (memory only where
   written) whose consumed pages are given back to the kernel (fallocate PUNCH_HOLE), so memory
   follows the backlog, not its high-water mark. The cold ring starts small (8 MiB of address
   space) and grows on demand, up to the address space the processes have (ulimit -v) or the
   cap given at creation: a writer that finds it too small extends the memfd, remaps, and
   re-bases the cold positions so the live records keep their place (a wrapped tail is copied
   once, past the old end). Other processes remap under the lock when they see the new size.
   Once empty, a grown cold ring shrinks back to its start size (ftruncate frees its pages).
   Its size need not be a power of two, so a message can take all the address space there is.
   An unbounded queue's put() therefore returns at once even when nobody reads, and a message
   of hundreds of MB needs no reader to be there. Order stays FIFO: writers use the hot ring only
   while the cold one is empty, and readers empty the hot ring before the cold one, so every
   cold record is younger than every hot one. A writer blocks (or gets -EAGAIN) only when the
   cold ring too is full and cannot grow, or at maxsize records.

   Giving pages back. A get never gives back the pages of the records it took: it would run
   after its commit, when the record counts as delivered but the caller does not have it yet,
   and a consumer killed then would lose the message. The next operation under the lock (any
   put or get, in any process) gives them back before it commits, which is safe since they were
   consumed by an earlier commit.

   Large copies. A record is copied in slices (CP_RING_SLICE); between slices, and once more
   before the commit, the caller's cancel check runs (Ctrl-C). When it says stop, nothing of
   the interrupted record is committed: a get leaves it in the queue, a put enqueues nothing.

   Locking. One pthread mutex, PTHREAD_PROCESS_SHARED and PTHREAD_MUTEX_ROBUST: when its owner
   dies the kernel hands it to the next locker with EOWNERDEAD. Every operation copies under
   the lock and publishes all its counter changes at its end with one store: the counters live
   in two slots, an operation fills the slot not in use and then flips `cur` to it. A holder
   killed before the flip changed nothing (its half-written bytes lie beyond the head and are
   overwritten later); after it, everything. So a SIGKILL mid-put or mid-get leaves the queue
   consistent: the message was put (got) entirely or not at all. A resize of the cold ring
   journals its new size and the `cur` it started from, so the next holder after a dead one
   knows whether the re-based counters were committed (cur moved) and which size goes with
   them. The lock is ERRORCHECK: a thread that locks it again (a signal handler using the queue
   while the cancel check runs under the lock) gets -EDEADLK, not a hang. The lock, `cur` and the
   waiter counts share one cache line, so an operation touches few lines: that line, the
   counter slots and the data.

   Waiting. A sleeper sets bit 0 of a sequence word and futex-waits on it; a writer (reader)
   that finds the bit set clears it and moves the word in one compare-and-swap, then wakes
   everyone on it. So a busy queue makes no system call per message, a wake costs one system
   call however many messages follow before the sleeper runs again, and a sleeper killed in
   its sleep costs one wasted wake, not one per message for ever. Waits poll briefly first (a peer on another core usually answers
   within microseconds); how long adapts per handle, since on a machine with more runnable
   processes than cores polling only steals the peer's time. Waits return -EINTR on a signal
   so callers can check for Ctrl-C.

   Readiness as an fd. Code written for the standard library waits on a queue's pipe with
   select/poll (concurrent.futures waits on its result queue together with the workers'
   sentinels), so a ring also has an eventfd that is readable exactly while the ring holds a
   record. Keeping it so costs a system call whenever the count goes from 0 to 1 or back, so it
   is only kept once some process asked for it (cp_ring_notify_arm: `notify` in the header);
   until then no operation touches it. It is updated under the lock with the commit, and resynced
   by whoever takes the lock over from a holder that died between the two.

   All functions return 0 (or a count) or a negative errno. */
#ifndef CPOOL_RING_H
#define CPOOL_RING_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "shm.h"
#include "spin.h"

#define CP_RING_MAGIC 0x676e6972706375ULL /* "ucpring" */
#define CP_RING_VERSION 2

/* Defaults: the hot ring stays resident; the cold ring starts small and grows up to the cap
   (address space runs out long before it). */
#define CP_RING_DEFAULT_HOT (4ULL << 20)
#define CP_RING_COLD_START (8ULL << 20)
#define CP_RING_MAX_COLD (1ULL << 46)
/* Records are copied in slices of this size, with a cancel check between them: about 2-8 ms
   of copying each, so Ctrl-C waits far less than 100 ms. */
#define CP_RING_SLICE (8ULL << 20)

/* Record kinds (0..255) are the caller's: the ring never looks inside a payload. */

/* Counters changed together by one operation (one cache line); see the slots above. */
typedef struct {
    uint64_t hhead, htail; /* hot ring: after the last committed record / first unconsumed */
    uint64_t chead, ctail; /* cold ring: the same */
    uint64_t creleased;    /* cold pages below this position were given back to the kernel */
    uint64_t count;        /* records in both rings */
    uint64_t consumed;     /* records ever taken (sleeping writers watch it) */
    uint64_t unfinished;   /* put() minus task_done() (JoinableQueue) */
} __attribute__((aligned(64))) cp_ring_counters;

#define CP_CACHELINE 64

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t hot;      /* bytes of the hot ring (a power of two) */
    uint64_t cold;     /* bytes of the cold ring now (pages; changed under the lock) */
    uint64_t maxsize;  /* most records at once, 0 = unbounded */
    _Atomic uint64_t recoveries; /* times a dead holder's lock was taken over (for tests) */
    uint64_t cold_start; /* the cold ring's size at creation, and after it empties */
    uint64_t cold_max;   /* the most it may grow to */
    uint64_t resize_to;  /* a resize in progress: the new size (0: none), see Locking */
    uint32_t resize_cur; /* cur when it began */

    /* The line every operation takes: the lock, the committed slot, who sleeps. */
    _Alignas(CP_CACHELINE) pthread_mutex_t lock;
    _Atomic uint32_t cur;         /* slot[cur & 1] holds the committed counters */
    _Atomic uint32_t get_waiters; /* how many sleep in get / put (for introspection only) */
    _Atomic uint32_t put_waiters;
    _Atomic uint32_t get_seq;     /* futex words: bit 0 = "someone sleeps, wake me"; a waker */
    _Atomic uint32_t put_seq;     /* clears it and moves the word in one step */
    _Atomic uint32_t notify;      /* 1: keep every handle's notify_fd readable iff count > 0 */

    cp_ring_counters slot[2];     /* written under the lock; read lock-free through cur */

    _Alignas(CP_CACHELINE) _Atomic uint32_t join_seq; /* the same, for unfinished reaching 0 */
    _Atomic uint32_t join_waiters;
} cp_ring_header;

/* A process's handle on a ring (not shared: each process maps the segment itself). */
typedef struct {
    cp_shm_t shm;
    cp_ring_header *h;
    unsigned char *hot;  /* the hot ring's bytes */
    unsigned char *cold; /* the cold ring's bytes (its own mapping: it moves when it grows) */
    uint64_t cold_mapped; /* bytes of it this handle maps; follows h->cold under the lock */
    int notify_fd;       /* this process's eventfd of the ring (see "Readiness as an fd") */
    cp_spin_t spin;      /* how long a wait polls before it sleeps (adapts, see spin.h) */
} cp_ring_t;

/* One message to put: its kind and the pieces its payload is gathered from. */
typedef struct {
    const void *base;
    size_t len;
} cp_ring_piece;

typedef struct {
    uint32_t kind;
    uint32_t npieces;
    const cp_ring_piece *pieces;
    uint64_t len; /* sum of the pieces' lengths */
} cp_ring_msg;

/* One message got: where its payload was copied in the caller's buffer. */
typedef struct {
    uint32_t kind;
    uint64_t len;
    size_t offset; /* in dst */
} cp_ring_got;

/* A check run between slices of a large copy, with the lock held: nonzero means stop (the
   operation returns -ECANCELED and commits nothing of the record it was copying). */
typedef struct {
    int (*check)(void *arg);
    void *arg;
} cp_ring_cancel;

/* Flags for put/get/task_done. */
#define CP_RING_TRYLOCK 1 /* return -EBUSY instead of sleeping on a held lock (without it,
                             put/get return -ETIMEDOUT after CP_WAIT_SLICE_NS without the lock: a
                             holder is stopped; check for signals and call again) */
#define CP_RING_TASK 2    /* put: count each record as an unfinished task (JoinableQueue) */
#define CP_RING_HOT_ONLY 4 /* put: -ENOSPC rather than spilling a record that fits the hot ring
                              into the cold one (the caller may wait a little for a reader) */

/* Create a ring and its eventfd; hot 0 means the default (rounded up to a power of two >= a page); the cold
   ring starts at cold_start bytes and grows up to cold_max (0: the defaults; both rounded up
   to pages, cold_max then to a power of two). maxsize 0 = unbounded. */
int cp_ring_create(cp_ring_t *r, uint64_t hot, uint64_t cold_start, uint64_t cold_max,
                   uint64_t maxsize);

/* Map the ring in memfd fd with its eventfd notify_fd (both dup'ed; the caller keeps its own).
   Checks magic/version. */
int cp_ring_attach(cp_ring_t *r, int fd, int notify_fd);

/* From now on, for every process, keep notify_fd readable exactly while the ring holds a
   record. Returns notify_fd or a negative errno (-ETIMEDOUT: the lock's holder is stopped). */
int cp_ring_notify_arm(cp_ring_t *r);

/* Unmap and close this process's handle; safe twice. */
void cp_ring_close(cp_ring_t *r);

/* Append msgs[0..n) in order, as many as fit, under one lock hold; *done says how many.
   Returns 0 when all went in, -EAGAIN when the ring was full (maxsize records, or both rings'
   bytes and the cold ring cannot grow now) before all did, -ENOSPC (HOT_ONLY), -EMSGSIZE when
   msgs[*done] can never fit (beyond cold_max), -ENOMEM when it would fit an empty cold ring
   but the address space does not allow one that big, -EBUSY (TRYLOCK), -ECANCELED when cancel
   stopped the copy of msgs[*done] (the ones before it went in). On -EAGAIN/-ENOSPC *seen (if
   not NULL) is cp_ring_consumed() as of that moment, for cp_ring_wait_writable(). cancel may
   be NULL. Wakes sleeping readers. */
int cp_ring_put(cp_ring_t *r, const cp_ring_msg *msgs, size_t n, int flags, size_t *done,
                uint64_t *seen, const cp_ring_cancel *cancel);

/* Take up to maxn records, copying their payloads into dst[0..cap) at 8-byte aligned offsets
   (described in got[]); stops at the first that does not fit. Returns how many (>= 1), -EAGAIN
   when empty, -EMSGSIZE when the first record alone does not fit: nothing is taken and
   got[0].kind/len describe it, so the caller can retry with a buffer of that size; -ECANCELED
   when cancel stopped the copy (nothing taken); -ENOMEM when this process cannot map the grown
   cold ring. Wakes sleeping writers. */
long cp_ring_get(cp_ring_t *r, void *dst, size_t cap, size_t maxn, cp_ring_got *got, int flags,
                 const cp_ring_cancel *cancel);

/* Sleep until a record may be available, the deadline (CLOCK_MONOTONIC ns, CP_NO_DEADLINE)
   passes or a signal arrives: 0, -ETIMEDOUT or -EINTR. Spurious returns happen: retry get. */
int cp_ring_wait_readable(cp_ring_t *r, int64_t deadline);

/* Sleep until a record has been taken since the caller saw cp_ring_consumed() == seen. */
int cp_ring_wait_writable(cp_ring_t *r, uint64_t seen, int64_t deadline);

/* JoinableQueue: one task done. -ERANGE when there was none unfinished, -EBUSY (TRYLOCK: call
   again without it, with the GIL released). Wakes joiners at 0. */
int cp_ring_task_done(cp_ring_t *r, int flags);

/* Sleep until no task is unfinished: 0, -ETIMEDOUT or -EINTR. */
int cp_ring_wait_joined(cp_ring_t *r, int64_t deadline);

/* The committed counters, read without the lock (each field is current or newer). */
static inline const cp_ring_counters *cp_ring_committed(const cp_ring_t *r)
{
    return &r->h->slot[atomic_load(&r->h->cur) & 1];
}

static inline uint64_t cp_ring_count(const cp_ring_t *r)
{
    return __atomic_load_n(&cp_ring_committed(r)->count, __ATOMIC_RELAXED);
}

static inline uint64_t cp_ring_consumed(const cp_ring_t *r)
{
    return __atomic_load_n(&cp_ring_committed(r)->consumed, __ATOMIC_RELAXED);
}

static inline uint64_t cp_ring_unfinished(const cp_ring_t *r)
{
    return __atomic_load_n(&cp_ring_committed(r)->unfinished, __ATOMIC_RELAXED);
}

#endif
