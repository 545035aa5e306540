/* The shared-memory arena: chunks, slot runs with shared reference counts, fork hand-over. */
#define _GNU_SOURCE
#include "arena.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK_MAGIC 0x4c4f4f50u /* "POOL" */
#define CHUNK_VERSION 1u
#define HEADER_SIZE 64

/* refs[] of the slots after the head of a run: a marker plus the distance to the head, so a
   release walks exactly its own run and never a neighbour being claimed at the same time. */
#define RUN_TAIL 0x80000000u
#define HEAD_FREEING (RUN_TAIL | 0x7fffffffu)

typedef struct {
    uint32_t magic;
    uint32_t version;
    uint32_t nslots;
    uint32_t base_off;
    uint64_t slot_size;
} chunk_header;

static pthread_mutex_t arena_mutex = PTHREAD_MUTEX_INITIALIZER;
static cp_chunk *chunks;        /* every chunk this process maps */
static cp_chunk *current;       /* where general allocations go first; kept mapped */
static int released_all;
__thread int cp_arena_fork_execs;

void cp_arena_lock(void) { pthread_mutex_lock(&arena_mutex); }
void cp_arena_unlock(void) { pthread_mutex_unlock(&arena_mutex); }

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

/* ---- chunk life ---- */

static int chunk_wrap(cp_chunk **out, cp_shm_t *shm)
{
    chunk_header *h = shm->addr;
    if (shm->size < HEADER_SIZE || h->magic != CHUNK_MAGIC || h->version != CHUNK_VERSION ||
        h->nslots == 0 || h->base_off < HEADER_SIZE + 4u * h->nslots ||
        h->base_off + (uint64_t)h->nslots * h->slot_size > shm->size)
        return -EINVAL;
    struct stat st;
    if (fstat(shm->fd, &st) < 0)
        return -errno;
    cp_chunk *c = calloc(1, sizeof *c);
    uint32_t *local = calloc(h->nslots, sizeof *local);
    if (!c || !local) {
        free(c);
        free(local);
        return -ENOMEM;
    }
    c->shm = *shm;
    c->ino = (uint64_t)st.st_ino;
    c->nslots = h->nslots;
    c->slot_size = h->slot_size;
    c->refs = (_Atomic uint32_t *)((unsigned char *)shm->addr + HEADER_SIZE);
    c->base = (unsigned char *)shm->addr + h->base_off;
    c->local = local;
    c->dedicated = h->nslots == 1;
    c->next = chunks;
    if (chunks)
        chunks->prev = c;
    chunks = c;
    *out = c;
    return 0;
}

static int chunk_create(cp_chunk **out, size_t dedicated_size)
{
    uint32_t nslots;
    size_t slot_size, base_off, total;
    if (dedicated_size) {
        nslots = 1;
        slot_size = round_up(dedicated_size, CP_SLOT_SIZE);
        base_off = 4096; /* big arrays start on a page */
        total = round_up(base_off + slot_size, 4096);
        if (total < dedicated_size)
            return -ENOMEM;
    } else {
        slot_size = CP_SLOT_SIZE;
        nslots = (CP_CHUNK_SIZE - HEADER_SIZE - CP_SLOT_SIZE) / (4 + CP_SLOT_SIZE);
        base_off = round_up(HEADER_SIZE + 4u * nslots, CP_SLOT_SIZE);
        total = CP_CHUNK_SIZE;
    }
    cp_shm_t shm;
    int r = cp_shm_create(&shm, total, "cpool-arena");
    if (r < 0)
        return r;
    chunk_header *h = shm.addr;
    h->nslots = nslots;
    h->base_off = (uint32_t)base_off;
    h->slot_size = slot_size;
    h->version = CHUNK_VERSION;
    h->magic = CHUNK_MAGIC;
    r = chunk_wrap(out, &shm);
    if (r < 0)
        cp_shm_close(&shm);
    return r;
}

static void chunk_destroy(cp_chunk *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        chunks = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (current == c)
        current = NULL;
    cp_shm_close(&c->shm);
    free(c->local);
    free(c);
}

/* ---- slots ---- */

/* Claim k free consecutive slots at or after c->hint; head index or -1. */
static int64_t chunk_claim(cp_chunk *c, uint32_t k)
{
    uint32_t i = c->hint;
    while ((uint64_t)i + k <= c->nslots) {
        uint32_t j;
        for (j = 0; j < k; j++)
            if (atomic_load_explicit(&c->refs[i + j], memory_order_relaxed) != 0)
                break;
        if (j < k) {
            i += j + 1;
            continue;
        }
        /* Another process may be claiming the same slots: each one is taken by CAS. */
        for (j = 0; j < k; j++) {
            uint32_t zero = 0;
            if (!atomic_compare_exchange_strong(&c->refs[i + j], &zero, RUN_TAIL | j))
                break;
        }
        if (j < k) {
            while (j-- > 0)
                atomic_store(&c->refs[i + j], 0);
            i += 1;
            continue;
        }
        memset(c->base + (size_t)i * c->slot_size, 0, (size_t)k * c->slot_size);
        atomic_store(&c->refs[i], 1);
        c->hint = i + k;
        return i;
    }
    c->hint = c->nslots;
    return -1;
}

/* Drop this process's shared reference to the run headed by slot i; free it if it was the last. */
static void slot_drop(cp_chunk *c, uint32_t i)
{
    uint32_t v = atomic_load(&c->refs[i]);
    for (;;) {
        if (v == 0 || (v & RUN_TAIL))
            return; /* corrupted count: leave it rather than free someone else's slot */
        uint32_t next = v == 1 ? HEAD_FREEING : v - 1;
        if (atomic_compare_exchange_weak(&c->refs[i], &v, next))
            break;
    }
    if (v != 1)
        return;
    for (uint32_t j = i + 1; j < c->nslots && atomic_load(&c->refs[j]) == (RUN_TAIL | (j - i)); j++)
        atomic_store(&c->refs[j], 0);
    atomic_store(&c->refs[i], 0); /* the head last: nobody claims the run before its tail is free */
    if (i < c->hint)
        c->hint = i;
}

static void ref_fill(cp_ref_t *out, cp_chunk *c, uint32_t slot)
{
    out->chunk = c;
    out->slot = slot;
    out->addr = c->base + (size_t)slot * c->slot_size;
}

static void local_add(cp_chunk *c, uint32_t slot)
{
    c->local[slot]++;
    c->nlocal++;
}

int cp_arena_alloc(size_t size, cp_ref_t *out)
{
    cp_chunk *c;
    int r;
    if (size == 0)
        size = 1;
    if (size > CP_ARENA_RUN_MAX) {
        r = chunk_create(&c, size);
        if (r < 0)
            return r;
        atomic_store(&c->refs[0], 1);
        local_add(c, 0);
        ref_fill(out, c, 0);
        return 0;
    }
    uint32_t k = (uint32_t)((size + CP_SLOT_SIZE - 1) / CP_SLOT_SIZE);
    /* current first, then every other general chunk from its hint, then once more from the
       start of each (slots freed by other processes are found there), then a new chunk. */
    for (int pass = 0; pass < 2; pass++) {
        if (current) {
            if (pass)
                current->hint = 0;
            int64_t s = chunk_claim(current, k);
            if (s >= 0) {
                local_add(current, (uint32_t)s);
                ref_fill(out, current, (uint32_t)s);
                return 0;
            }
        }
        for (c = chunks; c; c = c->next) {
            if (c->dedicated || c == current)
                continue;
            if (pass)
                c->hint = 0;
            int64_t s = chunk_claim(c, k);
            if (s >= 0) {
                current = c;
                local_add(c, (uint32_t)s);
                ref_fill(out, c, (uint32_t)s);
                return 0;
            }
        }
    }
    r = chunk_create(&c, 0);
    if (r < 0)
        return r;
    cp_chunk *old = current;
    current = c;
    if (old && old->nlocal == 0)
        chunk_destroy(old);
    int64_t s = chunk_claim(c, k);
    if (s < 0)
        return -ENOMEM;
    local_add(c, (uint32_t)s);
    ref_fill(out, c, (uint32_t)s);
    return 0;
}

void cp_arena_release(cp_ref_t *ref)
{
    cp_chunk *c = ref->chunk;
    if (!c)
        return;
    ref->chunk = NULL;
    if (released_all)
        return;
    if (c->local[ref->slot] == 0)
        return;
    c->local[ref->slot]--;
    c->nlocal--;
    if (c->local[ref->slot] == 0)
        slot_drop(c, ref->slot);
    if (c->nlocal == 0 && c != current)
        chunk_destroy(c);
}

int cp_arena_export(const cp_ref_t *ref)
{
    atomic_fetch_add(&ref->chunk->refs[ref->slot], 1);
    return ref->chunk->shm.fd;
}

void cp_arena_unexport(const cp_ref_t *ref)
{
    slot_drop(ref->chunk, ref->slot);
}

int cp_arena_attach(int fd, uint32_t slot, cp_ref_t *out)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    cp_chunk *c;
    for (c = chunks; c; c = c->next)
        if (c->ino == (uint64_t)st.st_ino)
            break;
    if (c) {
        /* A spawned child gets the same fd number once per object pickled with it: keep it. */
        if (fd != c->shm.fd)
            close(fd);
    } else {
        /* Adopt fd itself rather than a duplicate, for the same reason. */
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 || st.st_size < HEADER_SIZE) {
            int err = st.st_size < HEADER_SIZE ? EINVAL : errno;
            close(fd);
            return -err;
        }
        cp_shm_t shm = {fd, NULL, (size_t)st.st_size};
        shm.addr = mmap(NULL, shm.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (shm.addr == MAP_FAILED) {
            int err = errno;
            close(fd);
            return -err;
        }
        int r = chunk_wrap(&c, &shm);
        if (r < 0) {
            cp_shm_close(&shm);
            return r;
        }
    }
    uint32_t v = slot < c->nslots ? atomic_load(&c->refs[slot]) : 0;
    if (v == 0 || (v & RUN_TAIL)) {
        if (c->nlocal == 0 && c != current)
            chunk_destroy(c);
        return -EINVAL;
    }
    /* The parent added a reference for us: adopt it, or give it back if we already count. */
    if (c->local[slot] > 0)
        slot_drop(c, slot);
    local_add(c, slot);
    ref_fill(out, c, slot);
    return 0;
}

void cp_arena_release_all(void)
{
    cp_arena_lock();
    if (!released_all) {
        for (cp_chunk *c = chunks; c; c = c->next) {
            for (uint32_t i = 0; c->nlocal && i < c->nslots; i++) {
                if (c->local[i]) {
                    c->nlocal -= c->local[i];
                    c->local[i] = 0;
                    slot_drop(c, i);
                }
            }
        }
        released_all = 1;
    }
    cp_arena_unlock();
}

int cp_arena_has_chunks(void)
{
    return chunks != NULL;
}

void cp_arena_stats(uint64_t *nchunks, uint64_t *nhandles, uint64_t *nslots_used,
                    uint64_t *nrefs)
{
    *nchunks = *nhandles = *nslots_used = *nrefs = 0;
    for (cp_chunk *c = chunks; c; c = c->next) {
        (*nchunks)++;
        *nhandles += c->nlocal;
        for (uint32_t i = 0; i < c->nslots; i++) {
            uint32_t v = atomic_load_explicit(&c->refs[i], memory_order_relaxed);
            if (v)
                (*nslots_used)++;
            if (v && !(v & RUN_TAIL))
                *nrefs += v;
        }
    }
}

/* ---- fork ---- */

/* Before the fork, with the arena locked: the child-to-be will hold every handle we hold. */
static void at_fork_prepare(void)
{
    pthread_mutex_lock(&arena_mutex);
    if (released_all || cp_arena_fork_execs)
        return;
    for (cp_chunk *c = chunks; c; c = c->next) {
        for (uint32_t i = 0; c->nlocal && i < c->nslots; i++)
            if (c->local[i])
                atomic_fetch_add(&c->refs[i], 1);
    }
}

static void at_fork_parent(void)
{
    pthread_mutex_unlock(&arena_mutex);
}

static void at_fork_child(void)
{
    pthread_mutex_init(&arena_mutex, NULL);
}

int cp_arena_init(void)
{
    static int done;
    if (done)
        return 0;
    int r = pthread_atfork(at_fork_prepare, at_fork_parent, at_fork_child);
    if (r != 0)
        return -r;
    done = 1;
    return 0;
}
