/* The ring core on its own, from C (no Python): wrap-around in both rings, FIFO across the
   hot/cold switch, size limits, the cold ring growing (with wrapped records) and shrinking,
   a copy stopped by its cancel check, and a forked producer against a consumer. Exit 0 when all pass. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "deadline.h"
#include "ring.h"

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
    return cp_ring_put(r, &m, 1, 0, &done, NULL, NULL);
}

static void check_got(const unsigned char *p, const cp_ring_got *g, uint64_t want)
{
    uint64_t i;
    memcpy(&i, p + g->offset, 8);
    CHECK(g->kind == 1 && i == want && g->len == 8 + len_of(i));
    for (uint64_t k = 0; k < len_of(i); k++)
        CHECK(p[g->offset + 8 + k] == (unsigned char)(i + k));
}

static uint64_t cold_peak; /* the largest cold ring churn() saw */

/* Uneven puts and gets, every message checked in order. */
static void churn(cp_ring_t *r, unsigned char *buf, size_t cap, int rounds, int max_put)
{
    cp_ring_got got[64];
    uint64_t next_put = 0, next_get = 0;
    for (int round = 0; round < rounds; round++) {
        int nput = rand() % max_put;
        for (int k = 0; k < nput; k++) {
            int rc = put_one(r, next_put);
            CHECK(rc == 0 || rc == -EAGAIN);
            if (rc == 0)
                next_put++;
        }
        long n = cp_ring_get(r, buf, cap, 1 + rand() % 8, got, 0, NULL);
        CHECK(n > 0 || n == -EAGAIN);
        for (long k = 0; k < n; k++)
            check_got(buf, &got[k], next_get++);
        CHECK(cp_ring_count(r) == next_put - next_get);
        if (r->h->cold > cold_peak)
            cold_peak = r->h->cold;
    }
    long n;
    while ((n = cp_ring_get(r, buf, cap, 64, got, 0, NULL)) > 0)
        for (long k = 0; k < n; k++)
            check_got(buf, &got[k], next_get++);
    CHECK(next_get == next_put && cp_ring_count(r) == 0);
}

static int calls, stop_at;

static int stop_on_call(void *arg)
{
    return ++calls == stop_at;
}

int main(void)
{
    static unsigned char buf[1 << 17];
    cp_ring_got got[64];
    cp_ring_t r;

    /* A cold ring that starts at one page and grows to 1 MiB, backlog built up in bursts so
       the live records are wrapped when it grows; it shrinks back once empty. */
    CHECK(cp_ring_create(&r, 16 << 10, 4096, 1 << 20, 0) == 0);
    churn(&r, buf, sizeof buf, 3000, 14);
    CHECK(cold_peak >= (64 << 10) && cold_peak <= (1 << 20));
    CHECK(r.h->cold == 4096); /* the get that found it empty shrank it */
    cp_ring_close(&r);

    /* A copy stopped by its cancel check commits nothing; the next one goes through whole. */
    {
        size_t n = 3 * CP_RING_SLICE + 12345, done;
        unsigned char *src = malloc(n), *dst = malloc(n);
        CHECK(src && dst);
        for (size_t k = 0; k < n; k++)
            src[k] = (unsigned char)(k * 31 + 7);
        cp_ring_piece p = {src, n};
        cp_ring_msg m = {.kind = 3, .npieces = 1, .pieces = &p, .len = n};
        cp_ring_cancel stop = {stop_on_call, NULL};
        CHECK(cp_ring_create(&r, 0, 0, 0, 0) == 0);
        calls = 0, stop_at = 2;
        CHECK(cp_ring_put(&r, &m, 1, 0, &done, NULL, &stop) == -ECANCELED && done == 0);
        CHECK(cp_ring_count(&r) == 0);
        calls = 0, stop_at = 1000;
        CHECK(cp_ring_put(&r, &m, 1, 0, &done, NULL, &stop) == 0 && done == 1 && calls == 4);
        calls = 0, stop_at = 4; /* the last check, after the last slice */
        CHECK(cp_ring_get(&r, dst, n, 1, got, 0, &stop) == -ECANCELED && cp_ring_count(&r) == 1);
        calls = 0, stop_at = 1000;
        CHECK(cp_ring_get(&r, dst, n, 1, got, 0, &stop) == 1 && got[0].len == n);
        CHECK(memcmp(src, dst, n) == 0 && cp_ring_count(&r) == 0);
        cp_ring_close(&r);
        free(src);
        free(dst);
    }

    /* One process: a 16 KiB hot ring and a 64 KiB cold one, filled and drained unevenly. */
    CHECK(cp_ring_create(&r, 16 << 10, 64 << 10, 64 << 10, 0) == 0);
    uint64_t next_put = 0, next_get = 0;
    for (int round = 0; round < 2000; round++) {
        int nput = rand() % 9;
        for (int k = 0; k < nput; k++) {
            int rc = put_one(&r, next_put);
            CHECK(rc == 0 || rc == -EAGAIN);
            if (rc == 0)
                next_put++;
        }
        long n = cp_ring_get(&r, buf, sizeof buf, 1 + rand() % 8, got, 0, NULL);
        CHECK(n > 0 || n == -EAGAIN);
        for (long k = 0; k < n; k++)
            check_got(buf, &got[k], next_get++);
        CHECK(cp_ring_count(&r) == next_put - next_get);
    }
    /* Too big for either ring: refused, and the ring still works. */
    cp_ring_piece big = {buf, 100 << 10};
    cp_ring_msg m = {.kind = 2, .npieces = 1, .pieces = &big, .len = 100 << 10};
    size_t done;
    CHECK(cp_ring_put(&r, &m, 1, 0, &done, NULL, NULL) == -EMSGSIZE && done == 0);
    /* A record bigger than the caller's buffer is described, not taken. */
    while (cp_ring_get(&r, buf, sizeof buf, 64, got, 0, NULL) > 0)
        ;
    CHECK(put_one(&r, 1) == 0); /* 8 + 7919 bytes */
    CHECK(cp_ring_get(&r, buf, 100, 1, got, 0, NULL) == -EMSGSIZE && got[0].len == 8 + len_of(1));
    CHECK(cp_ring_get(&r, buf, sizeof buf, 1, got, 0, NULL) == 1);
    check_got(buf, &got[0], 1);
    cp_ring_close(&r);

    /* A forked producer, this process the consumer, through a small ring whose cold part
       grows in the producer (this process remaps when it sees the new size). */
    CHECK(cp_ring_create(&r, 8 << 10, 4096, 256 << 10, 0) == 0);
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
        long n = cp_ring_get(&r, buf, sizeof buf, 64, got, 0, NULL);
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
