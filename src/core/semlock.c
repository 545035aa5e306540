/* Futex mutex, semaphore and event on words in shared memory; owner-death detection by pid and
   start time. */
#define _GNU_SOURCE
#include "semlock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"

/* ---- own pid, cached (getpid is a syscall on current glibc) ---- */

uint32_t cp_sem_self_pid;
uint64_t cp_sem_self_start_cache;

static void self_after_fork(void)
{
    cp_sem_self_pid = (uint32_t)getpid();
    cp_sem_self_start_cache = 0; /* the child started now: read on first use */
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

int cp_proc_start(pid_t pid, uint64_t *start, int *zombie)
{
    char path[64], buf[512];
    *start = 0;
    *zombie = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return n < 0 && errno == ESRCH ? -ESRCH : 0;
    buf[n] = '\0';
    /* The name (field 2) may hold spaces and parentheses: the fields start after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 0;
    p += 2;
    *zombie = *p == 'Z' || *p == 'X';
    for (int field = 3; field < 22; field++) { /* field 3 is the state, 22 the start time */
        p = strchr(p, ' ');
        if (!p)
            return 0;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 0;
}

uint64_t cp_sem_self_start_read(void)
{
    uint64_t start;
    int zombie;
    cp_proc_start((pid_t)cp_sem_self_pid, &start, &zombie);
    cp_sem_self_start_cache = start;
    return start;
}

int cp_proc_dead(pid_t pid, uint64_t start)
{
    if (pid <= 0)
        return 0;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 1;
    /* kill() succeeds on a zombie: a killed holder stays one until its parent reaps it. */
    uint64_t now_start;
    int zombie;
    if (cp_proc_start(pid, &now_start, &zombie) == -ESRCH)
        return 1;
    return zombie || (start && now_start && now_start != start);
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
            if (atomic_compare_exchange_strong(&s->word, &v, me)) {
                atomic_store(&s->owner_start, cp_sem_self_start());
                return 0;
            }
            continue;
        }
        /* Sleepers are counted, not flagged in the word: a release makes a system call only
           while someone actually sleeps, even under steady contention. */
        int r = cp_sleep_counted(&s->word, v, &s->nwaiters, NULL, NULL, deadline);
        if (r == -EINTR || r == -ETIMEDOUT)
            return cp_sem_trywait(s) == 0 ? 0 : r;
    }
}

static int semaphore_wait(cp_sem_t *s, int64_t deadline)
{
    for (;;) {
        if (cp_sem_trywait(s) == 0)
            return 0;
        int r = cp_sleep_counted(&s->word, 0, &s->nwaiters, NULL, NULL, deadline);
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
        if (v == 0)
            return -EOVERFLOW;
        /* Cleared first: while the word still names us, a start time of 0 reads "unknown",
           never another process's time that would make us look dead to the next owner. */
        atomic_store(&s->owner_start, 0);
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

uint32_t cp_mutex_take_from_dead(cp_sem_t *s, uint64_t *dead_start)
{
    uint32_t pid = atomic_load(&s->word);
    if (pid == 0)
        return 0;
    uint64_t start = atomic_load(&s->owner_start);
    if (atomic_load(&s->word) != pid)
        return 0; /* changed hands while we looked: start may be the new owner's */
    if (pid == cp_sem_self()) {
        /* Our pid, another start time: a process that had our pid before us died holding it. */
        if (!start || start == cp_sem_self_start())
            return 0;
    } else if (!cp_proc_dead((pid_t)pid, start)) {
        return 0;
    }
    /* The start time is claimed (set to 0) before the word, so that no other waiter, seeing
       our pid beside the dead owner's start time, takes us for dead in turn. */
    if (start && !atomic_compare_exchange_strong(&s->owner_start, &start, 0))
        return 0;
    uint32_t expected = pid;
    if (!atomic_compare_exchange_strong(&s->word, &expected, cp_sem_self()))
        return 0;
    atomic_store(&s->owner_start, cp_sem_self_start());
    *dead_start = start;
    return pid;
}

void cp_mutex_give_back(cp_sem_t *s, uint32_t pid, uint64_t start)
{
    uint32_t mine = cp_sem_self();
    atomic_store(&s->owner_start, 0);
    if (atomic_compare_exchange_strong(&s->word, &mine, pid))
        atomic_store(&s->owner_start, start);
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
        int r = cp_sleep_counted(&s->word, start, &s->nwaiters, NULL, NULL, deadline);
        if (atomic_load(&s->word) != start)
            return 1;
        if (r == -EINTR || r == -ETIMEDOUT)
            return r;
    }
}
