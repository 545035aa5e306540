/* What the pool's binding files share (not part of the module's interface): the PoolCore and
   PoolJob objects, the holders of heap blocks, and the functions one file calls in another.
   pool_submit.c builds and sends task messages (the parent), pool_collect.c takes results,
   notices dead and overrunning workers and shuts the pool down (the parent), pool_worker.c is
   the loop that runs in a worker, pool.c holds the two types and their method tables. The
   messages themselves are described in pool_protocol.h. */
#ifndef CPOOL_POOL_PRIVATE_H
#define CPOOL_POOL_PRIVATE_H

#include "module.h"

#include <pthread.h>
#include <string.h>
#include <sys/types.h>

#include "deadline.h"
#include "pool_payload.h"
#include "pool_protocol.h"
#include "shm.h"
#include "taskring.h"

enum { POOL_RUN = 0, POOL_CLOSE = 1, POOL_TERMINATE = 2 };

/* Holders of heap blocks: a pool's worker slot, or its parent's messages not yet read (blocks
   read by the parent are CP_HEAP_PARENT's: freed by their objects, never swept). */
#define HOLDER(tag, idx) ((int32_t)(((uint32_t)(tag) << 16) | (uint32_t)(idx)))
#define IN_FLIGHT 0xffffu
#define MAX_TAG 0x7fffu
enum { JOB_APPLY = 0, JOB_MAP = 1, JOB_IMAP = 2 };

typedef cp_buf bytebuf;

static inline int buf_reserve(bytebuf *b, size_t n)
{
    return cp_buf_reserve(b, n);
}

static inline int buf_append(bytebuf *b, const void *src, size_t n)
{
    if (buf_reserve(b, b->len + n) < 0)
        return -1;
    memcpy(b->buf + b->len, src, n);
    b->len += n;
    return 0;
}

/* A task message that did not fit in the ring yet (apply_async never blocks). */
typedef struct pending_msg {
    struct pending_msg *next;
    uint64_t len, off;
    uint8_t data[];
} pending_msg;

typedef struct PoolCore {
    PyObject_HEAD
    cp_shm_t shm;
    cp_pool_shm_t *p;
    uint32_t nworkers;
    int state;
    int is_parent;
    uint32_t maxtasks;
    int64_t default_timeout_ns;
    uint64_t next_job, next_seq;
    int64_t outstanding;       /* task messages sent and not answered */
    PyObject *jobs;            /* dict: job id -> PoolJob not yet complete */
    pending_msg *pend_head, *pend_tail;
    PyThread_type_lock drain_lock;
    bytebuf scratch, inbuf;
    int scratch_busy;          /* build_task is using scratch (re-entered through pickling) */
    bytebuf *partial;          /* per worker: result message being reassembled */
    uint64_t *last_done;       /* per worker: task_seq of its last result */
    uint32_t *last_chunk;      /* per worker: chunk index of its last result */
    PyObject *batches;         /* dict: task_seq -> (args, enc, kind, first, n) of messages of
                                  several chunks in flight, so chunks a dead worker never
                                  started can be sent again (args: the encoded bytes, or the
                                  chunks themselves when their buffers went to the heap) */
    PyObject *heap;            /* BufferHeap of large buffers (shared by the process's pools), or
                                  NULL */
    uint32_t tag;              /* this pool's number among the heap's users: names its holders */
    int32_t send_holder;       /* holder of the blocks this process allocates for a message */
    int32_t read_holder;       /* ... and of the blocks it reads */
    int64_t created_ns;
    int64_t st_encode_ns;      /* Pool(stats=True): building task messages, */
    int64_t st_decode_ns;      /* ... taking results (decoding, storing, not callbacks) */
    uint64_t *timed_out;       /* per worker: task_seq killed for overrunning its timeout */
    int *pidfds;
    pid_t *pids;
    int wake_fd;               /* eventfd that wakes the background collector (this process's
                                  number for it: inherited under fork, passed by fd else) */
    PyObject *last_func, *last_func_bytes;
    PyObject *wrap_exc, *encoding_error;
    PyObject *cls[4];          /* ApplyResult, MapResult, IMapIterator, IMapUnorderedIterator */
    int64_t ncallbacks;        /* jobs with a callback not yet run */
    uint64_t fork_gen;         /* fork_generation when made: a forked copy must not use it */
    PyObject *owner;           /* weak reference to the Python Pool */
} PoolCore;

typedef struct PoolJob {
    PyObject_HEAD
    PoolCore *core;
    uint64_t id;
    int kind, star, ordered;
    int complete;              /* the outcome is known */
    int done;                  /* ... and its callbacks have run: ready() */
    int success;
    int has_cb;                /* counted in core->ncallbacks until its callbacks ran */
    PyObject *value;
    PyObject *callback, *error_callback;
    PyObject *pool;            /* the Python Pool, kept alive until the outcome is in (as the
                                  standard library's results do) */
    Py_ssize_t chunksize, length;
    uint64_t nchunks, ndone;
    int64_t timeout_ns;
    /* imap */
    PyObject *func, *func_bytes, *iter, *iter_exc, *store, *cur;
    Py_ssize_t store_pos, cur_pos;
    int cur_raises;            /* cur holds the errors of a lost chunk, one per item */
    uint64_t nsent, nyielded, next_chunk, window, batch;
    int exhausted;
    int aborted;               /* the pool was terminated: no more chunks will come */
    int registered;            /* in core->jobs */
} PoolJob;

/* Bumped in every forked child (pool.c): a pool's parent side belongs to the process that made
   it (a child writing into its rings, or reading its results, would break the parent's pool). */
extern uint64_t fork_generation;

static inline int foreign(PoolCore *c)
{
    return c->fork_gen != fork_generation;
}

static inline PyObject *module_of(PyObject *self)
{
    return PyType_GetModuleByDef(Py_TYPE(self), &cp_moduledef);
}

/* Payloads (pool_payload.c): plain form, pickle with buffers in the heap, pickle; blocks are
   held by the process's holder for what it sends and for what it reads. */
static inline int encode_to(PoolCore *c, cp_state *st, bytebuf *b, PyObject *o, uint32_t *enc)
{
    return cp_payload_encode(st, c->heap, c->send_holder, b, o, enc);
}

static inline PyObject *decode(PoolCore *c, cp_state *st, const uint8_t *buf, uint64_t len,
                               uint32_t enc)
{
    return cp_payload_decode(st, c->heap, c->read_holder, buf, len, enc);
}

/* ---- pool_submit.c: the parent sends tasks ---- */

/* A task_timeout argument in ns (0: none); *err set, with an exception, if it is not valid. */
int64_t duration_ns(PyObject *o, int *err);
/* Move pending task messages into the ring while they fit. */
void flush_pending(PoolCore *c);
/* Build a task message for chunks [first, first+n) of job and send it. 0 or -1. */
int build_task(PoolCore *c, cp_state *st, PoolJob *job, int kind, uint32_t first,
               uint32_t n, PyObject *func_bytes, PyObject *chunks);
/* The job of an entry of core->jobs (a capsule for imap iterators). */
PoolJob *job_of_entry(PyObject *v);
void unregister_job(PoolCore *c, PoolJob *j);
/* Send chunks of an imap's input until its window is full. 0 or -1. */
int imap_topup(PoolJob *j, cp_state *st);
PyObject *core_apply(PoolCore *c, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_map(PoolCore *c, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_imap(PoolCore *c, PyObject *const *args, Py_ssize_t nargs);

/* ---- pool_collect.c: the parent collects results, handles deaths, shuts down ---- */

typedef int (*ready_fn)(PoolJob *);

/* Record the outcome of chunk idx of j; jobs that complete go on *finished. 0 or -1. */
int job_set_chunk(PoolJob *j, uint64_t idx, int ok, PyObject *value, PyObject **finished);
/* Collect every result in the ring (one thread at a time). How many messages were read. */
int drain(PoolCore *c);
/* Wait until ready(j) or the deadline: 0 ready, 1 timed out, -1 error (Ctrl-C...). */
int job_wait(PoolJob *j, ready_fn ready, int64_t deadline);
PyObject *core_worker_lost(PoolCore *c, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_set_worker(PoolCore *c, PyObject *const *args, Py_ssize_t nargs);
PyObject *core_serve(PoolCore *c, PyObject *arg);
PyObject *core_close(PoolCore *c, PyObject *unused);
PyObject *core_terminate(PoolCore *c, PyObject *unused);
PyObject *core_fail_all(PoolCore *c, PyObject *exc);
PyObject *core_idle(PoolCore *c, PyObject *unused);

/* ---- pool_worker.c: the loop of a worker process ---- */

PyObject *core_worker_loop(PoolCore *c, PyObject *const *args, Py_ssize_t nargs);

#endif
