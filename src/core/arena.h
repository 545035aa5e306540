/* Per-process arena of shared-memory chunks cut into 64-byte slots: where locks, events and
   small shared values live, so thousands of them cost a handful of fds, not one fd each.

   A chunk is a memfd (inherited across fork, handed to spawned children by fd). Each slot has
   a shared reference count in the chunk (how many processes hold a handle to it); a slot is
   free when its count is 0, and any process that maps the chunk may claim a free slot with a
   compare-and-swap. Inside one process, handles are counted privately, so the shared count
   moves only when the first handle of a process appears or its last one goes.

   Forks: a pthread_atfork "prepare" handler adds one shared reference for the child to every
   slot this process holds, before the child exists (so the parent cannot free a slot the child
   is about to inherit). Spawned children: the parent adds the reference when it exports a
   handle (cp_arena_export) and the child adopts it (cp_arena_attach).
   A process that dies without releasing leaks its references until every process that maps
   the chunk has gone, when the kernel frees the memfd.

   Objects bigger than CP_ARENA_RUN_MAX get a chunk of their own (one slot as big as needed).
   Every function here must be called with the arena lock held (cp_arena_lock), except the
   fork handlers, which take it themselves. */
#ifndef CPOOL_ARENA_H
#define CPOOL_ARENA_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "shm.h"

#define CP_SLOT_SIZE 64
#define CP_CHUNK_SIZE (1u << 20)      /* a general chunk: ~15k slots, pages touched lazily */
#define CP_ARENA_RUN_MAX (16u << 10)  /* bigger objects get a dedicated chunk */

typedef struct cp_chunk cp_chunk;
struct cp_chunk {
    cp_chunk *next, *prev;
    cp_shm_t shm;
    uint64_t ino;                 /* identity of the memfd: dedupes chunks a spawned child gets twice */
    uint32_t nslots;
    size_t slot_size;
    _Atomic uint32_t *refs;       /* shared: per-slot process count, or a run-tail marker */
    unsigned char *base;          /* address of slot 0 */
    uint32_t *local;              /* this process's handle count per slot (heads of runs only) */
    uint64_t nlocal;              /* sum of local[]: the chunk is unmapped when it drops to 0 */
    uint32_t hint;                /* allocation scans from here */
    int dedicated;                /* one object only; never used for further allocations */
};

/* A handle's place: the chunk, the slot index, and the slot's address in this process. */
typedef struct {
    cp_chunk *chunk;
    uint32_t slot;
    void *addr;
} cp_ref_t;

void cp_arena_lock(void);
void cp_arena_unlock(void);

/* Install the fork handlers (once per process). 0 or -errno. */
int cp_arena_init(void);

/* A zero-filled region of size bytes (at least 1), 64-byte aligned, held by one handle. 0 or -errno. */
int cp_arena_alloc(size_t size, cp_ref_t *out);

/* Drop one handle; the slot is freed when no process holds it any more. */
void cp_arena_release(cp_ref_t *ref);

/* For handing ref to a spawned child: adds the child's shared reference now, returns the
   chunk's fd (owned by the arena: the caller duplicates it for the child). */
int cp_arena_export(const cp_ref_t *ref);

/* Give back a reference added by cp_arena_export that no child will adopt (failed pickling). */
void cp_arena_unexport(const cp_ref_t *ref);

/* In a spawned child: map the chunk behind fd (taking ownership of fd) and adopt the reference
   the parent added for slot. 0 or -errno (-EINVAL for a slot that is not an object's head). */
int cp_arena_attach(int fd, uint32_t slot, cp_ref_t *out);

/* Set by a thread around a fork whose child execs at once (cp_spawn): the fork handler then
   takes no references for a child that will never release them. */
extern __thread int cp_arena_fork_execs;

/* Drop every reference this process holds (at exit); later releases do nothing. Mappings
   stay, so a straggling handle still points at valid memory. */
void cp_arena_release_all(void);

/* Whether this process has any chunk mapped (read without the lock: for a single-threaded
   caller, such as a forked child deciding whether there is anything to release). */
int cp_arena_has_chunks(void);

/* Counters for tests: chunks mapped and handles held by this process; slots in use in those
   chunks and the sum of their shared reference counts (all processes). */
void cp_arena_stats(uint64_t *nchunks, uint64_t *nhandles, uint64_t *nslots_used,
                    uint64_t *nrefs);

#endif
