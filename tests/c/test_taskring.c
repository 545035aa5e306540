/* The pool's channel on its own, from C (no Python): records that wrap around the ring's end
   (whole and split into pieces), a full ring and a producer's wait for space, the bell that
   wakes a consumer without data, the robust take-over of a lock whose holder died holding it,
   and a forked producer against a consumer. Exit 0 when all pass. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "deadline.h"
#include "taskring.h"

#define MS 1000000LL

/* A zero-filled shared segment for nslots workers and rings of task_cap and res_cap bytes. */
static cp_pool_shm_t *segment(uint64_t task_cap, uint64_t res_cap, size_t *size)
{
    *size = cp_pool_shm_size(2, task_cap, res_cap);
    void *mem = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(mem != MAP_FAILED);
    CHECK(cp_pool_shm_init(mem, *size, 2, task_cap, res_cap) == 0);
    CHECK(cp_pool_shm_check(mem, *size) == 0);
    return mem;
}

/* Message number i: its length and bytes follow from i, so a reader can check it. */
static uint64_t len_of(uint64_t i, uint64_t most)
{
    return (i * 7919) % most;
}

static void fill(unsigned char *msg, uint64_t i, uint64_t len)
{
    for (uint64_t k = 0; k < len; k++)
        msg[k] = (unsigned char)(i * 13 + k);
}

static void check_msg(const unsigned char *msg, uint64_t i, uint64_t len)
{
    for (uint64_t k = 0; k < len; k++)
        CHECK(msg[k] == (unsigned char)(i * 13 + k));
}

/* Take one whole message (its pieces) from the ring into msg; 1 when one was there. Checks the
   piece flags and that every piece carries the writer's tag. */
static int take(cp_pool_shm_t *p, cp_tr_t *r, unsigned char *msg, uint64_t *len, uint32_t tag)
{
    uint64_t n, got = 0;
    uint32_t t;
    if (!cp_tr_peek(p, r, &n, &t))
        return 0;
    CHECK(t & CP_PIECE_FIRST);
    for (;;) {
        CHECK((t >> 8) == tag && n <= cp_tr_max_piece(r));
        const uint8_t *direct = cp_tr_piece_ptr(p, r, n);
        cp_tr_copy_out(p, r, 0, msg + got, n);
        if (direct)
            CHECK(memcmp(direct, msg + got, n) == 0);
        got += n;
        cp_tr_pop(r, n);
        if (t & CP_PIECE_LAST)
            break;
        /* the rest of a message is published piece by piece: wait for it */
        while (!cp_tr_peek(p, r, &n, &t))
            CHECK(cp_tr_wait_data(r, atomic_load(&r->bell), 0, cp_now_ns() + 5000 * MS) != -ETIMEDOUT);
        CHECK(!(t & CP_PIECE_FIRST));
    }
    *len = got;
    return 1;
}

/* One process: messages up to three pieces long through a one-page ring, in and out in
   uneven bursts, so that positions wrap many times, headers land on every offset and
   payloads straddle the end (piece_ptr then says NULL). */
static void wrap_around(void)
{
    size_t size;
    cp_pool_shm_t *p = segment(4096, 4096, &size);
    cp_tr_t *r = &p->tasks;
    CHECK(r->cap == 4096 && cp_tr_free(r) == 4096 && cp_tr_empty(r));
    static unsigned char msg[4096], out[4096];
    uint64_t most = 3 * cp_tr_max_piece(r), next_put = 0, next_get = 0, straddled = 0;
    for (int round = 0; round < 3000; round++) {
        uint64_t len = len_of(next_put, most), off = 0;
        fill(msg, next_put, len);
        if (cp_tr_put(p, r, msg, len, 5, &off) == 1) {
            next_put++;
        }
        else {
            /* out of space part-way: the reader drains, the rest goes in */
            uint64_t got;
            while (off < len) {
                /* Drain one whole earlier message (take() would wait for the pieces of this
                   one, still to come: only those before next_put). */
                CHECK(next_get < next_put);
                CHECK(take(p, r, out, &got, 5));
                CHECK(got == len_of(next_get, most));
                check_msg(out, next_get++, got);
                cp_tr_put(p, r, msg, len, 5, &off);
            }
            next_put++;
        }
        uint64_t n;
        uint32_t tag;
        if (cp_tr_peek(p, r, &n, &tag)) {
            uint64_t tail = atomic_load(&r->tail);
            int wraps = ((tail + CP_PIECE_HDR) & (r->cap - 1)) + n > r->cap;
            CHECK((cp_tr_piece_ptr(p, r, n) == NULL) == wraps);
            straddled += wraps;
        }
        for (int k = rand() % 3; k > 0 && next_get < next_put; k--) {
            uint64_t got;
            CHECK(take(p, r, out, &got, 5));
            CHECK(got == len_of(next_get, most));
            check_msg(out, next_get++, got);
        }
    }
    while (next_get < next_put) {
        uint64_t got;
        CHECK(take(p, r, out, &got, 5));
        check_msg(out, next_get++, got);
    }
    CHECK(cp_tr_empty(r) && cp_tr_free(r) == r->cap);
    CHECK(atomic_load(&r->head) > 100 * r->cap); /* wrapped many times */
    CHECK(straddled > 0);
    munmap(p, size);
}

/* A full ring: put stops where space runs out and says how far it got; a wait for space
   times out while nobody reads, and returns once a piece is popped; a bell rung without data
   ends a consumer's wait with -EAGAIN. */
static void full_ring(void)
{
    size_t size;
    cp_pool_shm_t *p = segment(4096, 4096, &size);
    cp_tr_t *r = &p->results;
    static unsigned char msg[1 << 14];
    fill(msg, 1, sizeof msg);
    uint64_t off = 0, maxp = cp_tr_max_piece(r);
    CHECK(cp_tr_put(p, r, msg, sizeof msg, 1, &off) == 0);
    CHECK(off == 4 * maxp); /* four whole pieces fill it exactly */
    CHECK(cp_tr_free(r) == 0);
    uint64_t need = cp_tr_record_size(maxp);
    int64_t t0 = cp_now_ns();
    CHECK(cp_tr_wait_space(r, need, t0 + 20 * MS) == -ETIMEDOUT);
    CHECK(cp_now_ns() - t0 >= 19 * MS);
    uint64_t n;
    uint32_t tag;
    CHECK(cp_tr_peek(p, r, &n, &tag) && n == maxp && (tag & 0xff) == CP_PIECE_FIRST);
    cp_tr_pop(r, n);
    CHECK(cp_tr_wait_space(r, need, cp_now_ns() + 20 * MS) == 0);
    CHECK(cp_tr_put(p, r, msg, sizeof msg, 1, &off) == 0 && off == 5 * maxp);
    munmap(p, size);

    /* The bell: a consumer of an empty ring, woken by a ring without data. */
    p = segment(4096, 4096, &size);
    r = &p->tasks;
    uint32_t seen = atomic_load(&r->bell);
    t0 = cp_now_ns();
    CHECK(cp_tr_wait_data(r, seen, 100000, t0 + 10 * MS) == -ETIMEDOUT);
    CHECK(cp_tr_wait_bell(r, seen, 0, cp_now_ns() + 10 * MS) == -ETIMEDOUT);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        usleep(20000);
        cp_tr_ring_bell(r);
        _exit(0);
    }
    int rc = cp_tr_wait_data(r, seen, 0, cp_now_ns() + 5000 * MS);
    CHECK(rc == -EAGAIN && cp_tr_empty(r));
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    munmap(p, size);
}

/* A child takes the consumers' lock and dies holding it: the next locker gets it back, told
   it was abandoned (1), and after that the lock works as ever (0). */
static void robust_takeover(void)
{
    size_t size;
    cp_pool_shm_t *p = segment(4096, 4096, &size);
    for (int ring = 0; ring < 2; ring++) {
        cp_tr_t *r = ring ? &p->results : &p->tasks;
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            if (cp_tr_lock(r) != 0)
                _exit(2);
            _exit(0); /* dies holding it */
        }
        int status;
        CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
        CHECK(cp_tr_lock(r) == 1);
        cp_tr_unlock(r);
        CHECK(cp_tr_lock(r) == 0);
        cp_tr_unlock(r);
    }
    /* Killed by a signal while holding it, with a peer already waiting for it. */
    cp_tr_t *r = &p->tasks;
    int ready[2];
    CHECK(pipe(ready) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (cp_tr_lock(r) != 0)
            _exit(2);
        char c = 1;
        if (write(ready[1], &c, 1) != 1)
            _exit(3);
        pause();
        _exit(4);
    }
    char c;
    CHECK(read(ready[0], &c, 1) == 1);
    kill(pid, SIGKILL);
    CHECK(cp_tr_lock(r) == 1);
    cp_tr_unlock(r);
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFSIGNALED(status));
    close(ready[0]);
    close(ready[1]);
    munmap(p, size);
}

/* A forked producer against this process as the consumer: messages of up to four pieces
   through a small ring, each side sleeping when the other is behind (waits for space and
   for data, with their spins). */
static void producer_consumer(void)
{
    size_t size;
    cp_pool_shm_t *p = segment(8192, 4096, &size);
    cp_tr_t *r = &p->tasks;
    const uint64_t total = 20000, most = 4 * cp_tr_max_piece(r);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        static unsigned char msg[1 << 14];
        for (uint64_t i = 0; i < total; i++) {
            uint64_t len = len_of(i, most), off = 0;
            fill(msg, i, len);
            while (!cp_tr_put(p, r, msg, len, 7, &off)) {
                uint64_t left = len - off, maxp = cp_tr_max_piece(r);
                int rc = cp_tr_wait_space(r, cp_tr_record_size(left < maxp ? left : maxp),
                                          cp_now_ns() + 5000 * MS);
                if (rc == -ETIMEDOUT)
                    _exit(2);
            }
            if (i % 1000 == 0)
                usleep(2000); /* let the consumer fall asleep now and then */
        }
        _exit(0);
    }
    static unsigned char out[1 << 14];
    uint64_t want = 0;
    while (want < total) {
        uint32_t seen = atomic_load(&r->bell);
        uint64_t len;
        if (take(p, r, out, &len, 7)) {
            CHECK(len == len_of(want, most));
            check_msg(out, want++, len);
            continue;
        }
        int rc = cp_tr_wait_data(r, seen, 20000, cp_now_ns() + 5000 * MS);
        CHECK(rc == 0 || rc == -EAGAIN || rc == -EINTR);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(cp_tr_empty(r));
    munmap(p, size);
}

int main(void)
{
    wrap_around();
    full_ring();
    robust_takeover();
    producer_consumer();
    puts("taskring: ok");
    return 0;
}
