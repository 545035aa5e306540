/* Futex mutex, semaphore and event on words in shared memory; owner-death detection by pid. */
#define _GNU_SOURCE
#include "semlock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"

/* ---- own pid, cached (getpid is a syscall on current glibc) ---- */

uint32_t cp_sem_self_pid;

static void self_after_fork(void)
{
    cp_sem_self_pid = (uint32_t)getpid();
}

static void self_init(void)
{
    cp_sem_self_pid = (uint32_t)getpid();
    pthread_atfork(NULL, NULL, self_after_fork);
}

void cp_sem_self_init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, self_init);
}

int cp_pid_dead(pid_t pid)
{
    if (pid <= 0)
        return 0;
    if (kill(pid, 0) < 0)
        return errno == ESRCH;
    /* kill() succeeds on a zombie: a killed holder stays one until its parent reaps it. */
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

void cp_sem_init(cp_sem_t *s, int kind, uint32_t value, uint32_t maxvalue)
{
    s->kind = (uint32_t)kind;
    s->maxvalue = maxvalue;
    atomic_store(&s->nwaiters, 0);
    if (kind == CP_SEM_MUTEX || kind == CP_SEM_RECURSIVE)
        atomic_store(&s->word, value ? 0 : cp_sem_self()); /* value 0: born held by us */
    else
        atomic_store(&s->word, value);
    atomic_store(&s->magic, CP_SEM_MAGIC);
}

static inline int is_mutex(const cp_sem_t *s)
{
    return s->kind == CP_SEM_MUTEX || s->kind == CP_SEM_RECURSIVE;
}

static int sem_taken(void *s)
{
    return cp_sem_trywait(s) == 0;
}

static int mutex_wait(cp_sem_t *s, int64_t deadline)
{
    uint32_t me = cp_sem_self();
    for (;;) {
        uint32_t v = atomic_load(&s->word);
        if (v == 0) {
            if (atomic_compare_exchange_strong(&s->word, &v, me))
                return 0;
            continue;
        }
        /* Sleepers are counted, not flagged in the word: a release makes a system call only
           while someone actually sleeps, even under steady contention. */
        atomic_fetch_add(&s->nwaiters, 1);
        int r = cp_futex_wait(&s->word, v, deadline);
        atomic_fetch_sub(&s->nwaiters, 1);
        if (r == -EINTR || r == -ETIMEDOUT)
            return cp_sem_trywait(s) == 0 ? 0 : r;
    }
}

static int semaphore_wait(cp_sem_t *s, int64_t deadline)
{
    for (;;) {
        if (cp_sem_trywait(s) == 0)
            return 0;
        atomic_fetch_add(&s->nwaiters, 1);
        int r = cp_futex_wait(&s->word, 0, deadline);
        atomic_fetch_sub(&s->nwaiters, 1);
        if (r == -EINTR || r == -ETIMEDOUT)
            return cp_sem_trywait(s) == 0 ? 0 : r;
    }
}

int cp_sem_wait(cp_sem_t *s, int64_t deadline, cp_spin_t *spin)
{
    if (cp_spin_until(sem_taken, s, spin, 0))
        return 0;
    return is_mutex(s) ? mutex_wait(s, deadline) : semaphore_wait(s, deadline);
}

int cp_sem_post(cp_sem_t *s)
{
    uint32_t v = atomic_load(&s->word);
    if (is_mutex(s)) {
        do {
            if (v == 0)
                return -EOVERFLOW;
        } while (!atomic_compare_exchange_weak(&s->word, &v, 0));
        if (atomic_load(&s->nwaiters) > 0)
            cp_futex_wake(&s->word, 1);
        return 0;
    }
    do {
        if (v >= s->maxvalue)
            return -EOVERFLOW;
    } while (!atomic_compare_exchange_weak(&s->word, &v, v + 1));
    if (atomic_load(&s->nwaiters) > 0)
        cp_futex_wake(&s->word, 1);
    return 0;
}

uint32_t cp_sem_value(cp_sem_t *s)
{
    uint32_t v = atomic_load(&s->word);
    if (is_mutex(s))
        return v == 0;
    return v;
}

uint32_t cp_mutex_take_from_dead(cp_sem_t *s)
{
    uint32_t pid = atomic_load(&s->word);
    if (pid == 0 || pid == cp_sem_self() || !cp_pid_dead((pid_t)pid))
        return 0;
    uint32_t expected = pid;
    return atomic_compare_exchange_strong(&s->word, &expected, cp_sem_self()) ? pid : 0;
}

/* ---- events ---- */

void cp_event_set(cp_sem_t *s)
{
    uint32_t v = atomic_load(&s->word);
    do {
        if (v & 1)
            return;
    } while (!atomic_compare_exchange_weak(&s->word, &v, (v + 2) | 1));
    if (atomic_load(&s->nwaiters) > 0)
        cp_futex_wake(&s->word, INT_MAX);
}

void cp_event_clear(cp_sem_t *s)
{
    atomic_fetch_and(&s->word, ~1u);
}

int cp_event_is_set(cp_sem_t *s)
{
    return atomic_load(&s->word) & 1;
}

typedef struct {
    cp_sem_t *s;
    uint32_t start;
} event_arg;

static int event_changed(void *arg)
{
    event_arg *a = arg;
    return atomic_load_explicit(&a->s->word, memory_order_acquire) != a->start;
}

int cp_event_wait(cp_sem_t *s, uint32_t start, int64_t deadline, cp_spin_t *spin)
{
    event_arg a = {s, start};
    if (cp_spin_until(event_changed, &a, spin, 0))
        return 1;
    for (;;) {
        atomic_fetch_add(&s->nwaiters, 1);
        int r = cp_futex_wait(&s->word, start, deadline);
        atomic_fetch_sub(&s->nwaiters, 1);
        if (atomic_load(&s->word) != start)
            return 1;
        if (r == -EINTR || r == -ETIMEDOUT)
            return r;
    }
}
