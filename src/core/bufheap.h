/* A heap of large buffers in one shared segment: a pool's task arguments and results that
   export a buffer (numpy arrays...) are copied into it once and read in place by the other side.

   The segment is cut into units of CP_HEAP_UNIT bytes; a block is a run of units. The only
   allocation record is run[u]: the length of the block that starts at unit u, 0 elsewhere.
   Every change is one store into run[] under a robust mutex, so a process killed inside
   alloc or free leaves the heap consistent (at worst its block is lost or freed).

   Each block names its holder: the process slot (a worker's index, or CP_HEAP_PARENT) that
   frees it when done. A block handed to another process changes holder when it is read, so
   the blocks of a dead worker can be reclaimed without touching those in flight.
   Allocation is first fit from the bottom, so the low units are the ones reused. Freed units
   keep their pages (touching fresh shared memory costs about four times the copy into it) until
   cp_heap_trim finds them unused for a while and gives the pages back to the kernel: the
   decay of jemalloc's dirty pages, for the same reason. */
#ifndef CPOOL_BUFHEAP_H
#define CPOOL_BUFHEAP_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define CP_HEAP_MAGIC 0x3170616568706300ULL /* "\0cpheap1" */
#define CP_HEAP_UNIT (64u << 10)            /* smaller buffers stay in the pickle */
#define CP_HEAP_PARENT (-1)

typedef struct {
    uint64_t magic;
    uint64_t size;          /* bytes of the whole segment */
    uint64_t nunits;
    uint64_t data_off;      /* from the start of the segment, page aligned */
    _Alignas(64) pthread_mutex_t lock;
    _Atomic uint64_t used;  /* units in blocks (statistics) */
    _Atomic uint32_t run[]; /* nunits entries, then int32 holder[nunits], then uint32
                               freed[nunits]: when a free unit's pages were last used (in
                               100 ms ticks of CLOCK_MONOTONIC), 0 when they are not resident
                               or the unit is in a block */
} cp_heap_t;

/* Bytes of a segment with room for data bytes of blocks. */
size_t cp_heap_size(uint64_t data);

/* Lay out a zero-filled segment of size bytes. 0 or -errno. */
int cp_heap_init(void *mem, size_t size);

/* Check a segment mapped in another process. 0 or -EINVAL. */
int cp_heap_check(const void *mem, size_t size);

/* A block of at least len bytes (len > 0) held by holder: its offset from the segment's start,
   or -ENOMEM when no run of units is free, or another -errno. */
int64_t cp_heap_alloc(cp_heap_t *h, uint64_t len, int32_t holder);

/* Free the block at off (from cp_heap_alloc). Freeing an offset that is not a block's does
   nothing. */
void cp_heap_free(cp_heap_t *h, uint64_t off);

/* Whether [off, off+len) lies inside the block that starts at off. */
int cp_heap_is_block(cp_heap_t *h, uint64_t off, uint64_t len);

/* The block at off is now held by holder. */
void cp_heap_set_holder(cp_heap_t *h, uint64_t off, int32_t holder);

/* Give back the pages of free units unused for at least idle_ms. Returns the bytes still
   resident in free units. */
uint64_t cp_heap_trim(cp_heap_t *h, uint32_t idle_ms);

/* Free every block held by holder (a dead worker's). Returns how many. */
uint64_t cp_heap_free_held_by(cp_heap_t *h, int32_t holder);

/* Bytes in blocks. */
static inline uint64_t cp_heap_used(cp_heap_t *h)
{
    return atomic_load_explicit(&h->used, memory_order_relaxed) * CP_HEAP_UNIT;
}

static inline uint8_t *cp_heap_ptr(cp_heap_t *h, uint64_t off)
{
    return (uint8_t *)h + off;
}

#endif
