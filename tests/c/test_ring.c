/* The ring core on its own, from C (no Python): wrap-around in both rings, FIFO across the
   hot/cold switch, size limits, and a forked producer against a consumer. Exit 0 when all pass. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "deadline.h"
#include "ring.h"

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

static unsigned char payload[1 << 16];

/* Message number i: length and content follow from i, so a reader can check it. */
static uint64_t len_of(uint64_t i)
{
    return (i * 7919) % 9000;
}

static void fill(uint64_t i)
{
    for (uint64_t k = 0; k < len_of(i); k++)
        payload[k] = (unsigned char)(i + k);
}

static int put_one(cp_ring_t *r, uint64_t i)
{
    fill(i);
    cp_ring_piece pieces[2] = {{&i, 8}, {payload, len_of(i)}};
    cp_ring_msg m = {.kind = 1, .npieces = 2, .pieces = pieces, .len = 8 + len_of(i)};
    size_t done;
    return cp_ring_put(r, &m, 1, 0, &done, NULL);
}

static void check_got(const unsigned char *p, const cp_ring_got *g, uint64_t want)
{
    uint64_t i;
    memcpy(&i, p + g->offset, 8);
    CHECK(g->kind == 1 && i == want && g->len == 8 + len_of(i));
    for (uint64_t k = 0; k < len_of(i); k++)
        CHECK(p[g->offset + 8 + k] == (unsigned char)(i + k));
}

int main(void)
{
    static unsigned char buf[1 << 17];
    cp_ring_got got[64];
    cp_ring_t r;

    /* One process: a 16 KiB hot ring and a 64 KiB cold one, filled and drained unevenly. */
    CHECK(cp_ring_create(&r, 16 << 10, 64 << 10, 0) == 0);
    uint64_t next_put = 0, next_get = 0;
    for (int round = 0; round < 2000; round++) {
        int nput = rand() % 9;
        for (int k = 0; k < nput; k++) {
            int rc = put_one(&r, next_put);
            CHECK(rc == 0 || rc == -EAGAIN);
            if (rc == 0)
                next_put++;
        }
        long n = cp_ring_get(&r, buf, sizeof buf, 1 + rand() % 8, got, 0);
        CHECK(n > 0 || n == -EAGAIN);
        for (long k = 0; k < n; k++)
            check_got(buf, &got[k], next_get++);
        CHECK(cp_ring_count(&r) == next_put - next_get);
    }
    /* Too big for either ring: refused, and the ring still works. */
    cp_ring_piece big = {buf, 100 << 10};
    cp_ring_msg m = {.kind = 2, .npieces = 1, .pieces = &big, .len = 100 << 10};
    size_t done;
    CHECK(cp_ring_put(&r, &m, 1, 0, &done, NULL) == -EMSGSIZE && done == 0);
    /* A record bigger than the caller's buffer is described, not taken. */
    while (cp_ring_get(&r, buf, sizeof buf, 64, got, 0) > 0)
        ;
    CHECK(put_one(&r, 1) == 0); /* 8 + 7919 bytes */
    CHECK(cp_ring_get(&r, buf, 100, 1, got, 0) == -EMSGSIZE && got[0].len == 8 + len_of(1));
    CHECK(cp_ring_get(&r, buf, sizeof buf, 1, got, 0) == 1);
    check_got(buf, &got[0], 1);
    cp_ring_close(&r);

    /* A forked producer, this process the consumer, through a small ring. */
    CHECK(cp_ring_create(&r, 8 << 10, 32 << 10, 0) == 0);
    const uint64_t total = 20000;
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        for (uint64_t i = 0; i < total; i++) {
            int rc;
            while ((rc = put_one(&r, i)) == -EAGAIN)
                cp_ring_wait_writable(&r, cp_ring_consumed(&r), cp_now_ns() + 1000000);
            if (rc != 0)
                _exit(2);
        }
        _exit(0);
    }
    uint64_t want = 0;
    while (want < total) {
        long n = cp_ring_get(&r, buf, sizeof buf, 64, got, 0);
        if (n == -EAGAIN) {
            CHECK(cp_ring_wait_readable(&r, cp_now_ns() + 5000000000LL) != -ETIMEDOUT);
            continue;
        }
        CHECK(n > 0);
        for (long k = 0; k < n; k++)
            check_got(buf, &got[k], want++);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    cp_ring_close(&r);
    puts("ring: ok");
    return 0;
}
