/* Pool bindings: PoolCore (the parent's dispatch and result collection, and the workers' loop)
   and PoolJob (base of AsyncResult, MapResult and the imap iterators), over core/taskring.

   Per task, nothing here leaves C: arguments are encoded (a compact form for plain builtin values,
   pickle otherwise) straight into the shared task ring; a worker takes the next task under a
   robust lock without a syscall while busy, runs it, and writes the result into the result
   ring; whoever waits for a result drains that ring. Workers spin briefly before sleeping on a
   futex; a parent waiting for a result spins briefly too, so a busy stream of results costs
   no wake-up syscalls. The background collector (callbacks, feeding, deaths) sleeps in poll()
   on the pool's eventfd and the workers' pidfds: a worker's exit wakes it at once, and a
   worker writes the eventfd only when the collector sleeps and wants the wake: for every
   result while callbacks are due, else when the result ring fills up or a worker runs dry
   while tasks wait to be fed. */
#include "module.h"

#include <errno.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/types.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"
#include "pool_payload.h"
#include "pool_protocol.h"
#include "shm.h"
#include "spawn.h"
#include "taskring.h"

#define WORKER_SPIN_NS 100000     /* a worker spins this long for the next task before sleeping */
#define WAITER_SPIN_NS 100000     /* a parent waiting for a result it needs now spins this long */
#define EAGER_SLICE_NS 50000000   /* sleeps are cut in slices so Ctrl-C and deaths are seen */
#define PENDING_SLICE_NS 1000000  /* tasks wait outside the ring: feed them this often */
#define WORKER_SLICE_NS 100000000
#define PARENT_CHECK_NS 1000000   /* a worker looks for a dead parent this often at most */
#define MAX_BATCH_ITEMS 64        /* items per task message at most, when chunks are batched */
#define RETURN_AFTER_NS 1000000   /* a batched chunk this slow: give the rest back if others idle */

enum { POOL_RUN = 0, POOL_CLOSE = 1, POOL_TERMINATE = 2 };

/* Holders of heap blocks: a pool's worker slot, or its parent's messages not yet read (blocks
   read by the parent are CP_HEAP_PARENT's: freed by their objects, never swept). */
#define HOLDER(tag, idx) ((int32_t)(((uint32_t)(tag) << 16) | (uint32_t)(idx)))
#define IN_FLIGHT 0xffffu
#define MAX_TAG 0x7fffu
enum { JOB_APPLY = 0, JOB_MAP = 1, JOB_IMAP = 2 };

typedef cp_buf bytebuf;

static int buf_reserve(bytebuf *b, size_t n)
{
    return cp_buf_reserve(b, n);
}

static int buf_append(bytebuf *b, const void *src, size_t n)
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

static int job_set_chunk(PoolJob *j, uint64_t idx, int ok, PyObject *value, PyObject **finished);

/* Bumped in every forked child: a pool's parent side belongs to the process that made it
   (a child writing into its rings, or reading its results, would break the parent's pool). */
static uint64_t fork_generation;

static void bump_fork_generation(void)
{
    fork_generation++;
}

static int foreign(PoolCore *c)
{
    return c->fork_gen != fork_generation;
}

static PyObject *module_of(PyObject *self)
{
    return PyType_GetModuleByDef(Py_TYPE(self), &cp_moduledef);
}

/* ---- payloads (pool_payload.c): plain form, pickle with buffers in the heap, pickle ---- */

static int encode_to(PoolCore *c, cp_state *st, bytebuf *b, PyObject *o, uint32_t *enc)
{
    return cp_payload_encode(st, c->heap, c->send_holder, b, o, enc);
}

static PyObject *decode(PoolCore *c, cp_state *st, const uint8_t *buf, uint64_t len, uint32_t enc)
{
    return cp_payload_decode(st, c->heap, c->read_holder, buf, len, enc);
}

static int64_t timeout_arg(PyObject *o, int *err)
{
    *err = 0;
    if (o == NULL || o == Py_None)
        return CP_NO_DEADLINE;
    double t = PyFloat_AsDouble(o);
    if (t == -1.0 && PyErr_Occurred()) {
        *err = 1;
        return 0;
    }
    return cp_deadline_after(t);
}

static int64_t duration_ns(PyObject *o, int *err)
{
    *err = 0;
    if (o == NULL || o == Py_None)
        return 0;
    double t = PyFloat_AsDouble(o);
    if (t == -1.0 && PyErr_Occurred()) {
        *err = 1;
        return 0;
    }
    if (!(t > 0)) {
        PyErr_SetString(PyExc_ValueError, "task_timeout must be a positive number of seconds");
        *err = 1;
        return 0;
    }
    return (int64_t)(t * 1e9);
}

/* =========================== the parent: sending tasks =========================== */

static void flush_pending(PoolCore *c)
{
    while (c->pend_head) {
        pending_msg *m = c->pend_head;
        if (!cp_tr_put(c->p, &c->p->tasks, m->data, m->len, 0, &m->off))
            return;
        c->pend_head = m->next;
        if (!c->pend_head)
            c->pend_tail = NULL;
        PyMem_RawFree(m);
    }
    if (c->state == POOL_CLOSE && !atomic_load(&c->p->closing)) {
        /* Everything is in the ring: workers may leave once it is empty. */
        atomic_store(&c->p->closing, 1);
        cp_tr_ring_bell(&c->p->tasks);
    }
}

/* Queue one task message (in b): into the ring if it fits and nothing is waiting before
   it, else onto the pending list, which the result collection drains. */
static int send_msg(PoolCore *c, bytebuf *b)
{
    uint64_t off = 0;
    c->outstanding++;
    if (!c->pend_head && cp_tr_put(c->p, &c->p->tasks, b->buf, b->len, 0, &off))
        return 0;
    pending_msg *m = PyMem_RawMalloc(sizeof(pending_msg) + b->len);
    if (!m) {
        PyErr_NoMemory();
        return -1;
    }
    m->next = NULL;
    m->len = b->len;
    m->off = off;
    memcpy(m->data, b->buf, b->len);
    if (c->pend_tail)
        c->pend_tail->next = m;
    else
        c->pend_head = m;
    c->pend_tail = m;
    return 0;
}

/* Build a task message for chunks [first, first+n) of job (arguments encoded straight into
   it) and send it. An argument that cannot be encoded raises here. Pickling may run Python
   code that lets another thread submit (or this one, re-entering): only the outermost call
   uses the core's reusable buffer. */
static int build_task(PoolCore *c, cp_state *st, PoolJob *job, int kind, uint32_t first,
                      uint32_t n, PyObject *func_bytes, PyObject *chunks)
{
    bytebuf local = {0}, *b = c->scratch_busy ? &local : &c->scratch;
    c->scratch_busy++;
    int rc = -1;
    int64_t t0 = c->p->stats ? cp_now_ns() : 0;
    cp_task_hdr_t h = {0};
    h.job_id = job->id;
    h.timeout_ns = job->timeout_ns;
    h.first_chunk = first;
    h.nchunks = n;
    h.kind = (uint32_t)kind;
    h.func_len = (uint32_t)PyBytes_GET_SIZE(func_bytes);
    b->len = 0;
    if (buf_reserve(b, sizeof h + h.func_len) < 0)
        goto done;
    b->len = sizeof h;
    buf_append(b, PyBytes_AS_STRING(func_bytes), h.func_len);
    size_t args_at = b->len;
    if (encode_to(c, st, b, chunks, &h.flags) < 0)
        goto done;
    if (b->len - args_at > UINT32_MAX - 4096) {
        PyErr_SetString(PyExc_OverflowError, "task arguments larger than 4 GiB");
        goto done;
    }
    h.args_len = (uint32_t)(b->len - args_at);
    h.task_seq = ++c->next_seq;
    memcpy(b->buf, &h, sizeof h);
    if (n > 1) {
        PyObject *key = PyLong_FromUnsignedLongLong(h.task_seq);
        /* Arguments with blocks in the heap are kept as objects: the blocks are the
           worker's to free once it has read them, so a resend encodes them afresh. */
        PyObject *v = !key ? NULL
                      : h.flags == CP_ENC_PICKLE5
                          ? Py_BuildValue("(OIiII)", chunks, h.flags, kind, first, n)
                          : Py_BuildValue("(y#IiII)", (const char *)b->buf + args_at,
                                          (Py_ssize_t)h.args_len, h.flags, kind, first, n);
        int r = v ? PyDict_SetItem(c->batches, key, v) : -1;
        Py_XDECREF(key);
        Py_XDECREF(v);
        if (r < 0)
            goto done;
    }
    rc = send_msg(c, b);
done:
    if (t0)
        c->st_encode_ns += cp_now_ns() - t0;
    c->scratch_busy--;
    PyMem_RawFree(local.buf);
    return rc;
}

/* The function pickled once; plain functions are pickled by name, so the bytes of the last one
   are reused while it is the same object. */
static PyObject *func_bytes_of(PoolCore *c, cp_state *st, PyObject *func)
{
    if (func == c->last_func && c->last_func_bytes)
        return Py_NewRef(c->last_func_bytes);
    if (!PyCallable_Check(func)) {
        PyErr_Format(PyExc_TypeError, "'%.200s' object is not callable", Py_TYPE(func)->tp_name);
        return NULL;
    }
    PyObject *b = cp_pickle_dumps(st, func);
    if (!b)
        return NULL;
    if (PyFunction_Check(func) || PyCFunction_Check(func)) {
        Py_XSETREF(c->last_func, Py_NewRef(func));
        Py_XSETREF(c->last_func_bytes, Py_NewRef(b));
    }
    return b;
}

static int check_running(PoolCore *c)
{
    if (foreign(c)) {
        PyErr_SetString(PyExc_ValueError, "a pool can only be used by the process that created it");
        return -1;
    }
    if (c->state != POOL_RUN) {
        PyErr_SetString(PyExc_ValueError, "Pool not running");
        return -1;
    }
    return 0;
}

static PoolJob *new_job(PoolCore *c, int kind, PyObject *callback, PyObject *error_callback)
{
    PyTypeObject *tp = (PyTypeObject *)c->cls[kind];
    PoolJob *j = (PoolJob *)tp->tp_alloc(tp, 0);
    if (!j)
        return NULL;
    j->core = (PoolCore *)Py_NewRef(c);
    j->id = ++c->next_job;
    j->kind = kind;
    j->success = 1;
    j->callback = (callback && callback != Py_None) ? Py_NewRef(callback) : NULL;
    j->error_callback = (error_callback && error_callback != Py_None) ? Py_NewRef(error_callback) : NULL;
    j->timeout_ns = c->default_timeout_ns;
    if (c->owner) {
#if PY_VERSION_HEX >= 0x030D0000
        PyObject *pool = NULL;
        if (PyWeakref_GetRef(c->owner, &pool) < 0)
            PyErr_Clear();
        j->pool = pool; /* a new reference, or NULL once the Pool died */
#else
        PyObject *pool = PyWeakref_GetObject(c->owner); /* borrowed; None once it died */
        if (pool && pool != Py_None)
            j->pool = Py_NewRef(pool);
#endif
    }
    if (j->callback || j->error_callback) {
        j->has_cb = 1;
        /* The handler may be asleep already: its results must wake it, to run the callback. */
        if (c->ncallbacks++ == 0)
            atomic_store(&c->p->results.bg_eager, 1);
    }
    return j;
}

/* The table holds apply and map jobs (their results must arrive even if the caller dropped
   them: callbacks). An imap iterator is held by its caller only: the table keeps a capsule
   of its address, which the iterator removes when it dies, so an imap left half-read is
   freed, and its late results are dropped. */
static int register_job(PoolCore *c, PoolJob *j)
{
    PyObject *key = PyLong_FromUnsignedLongLong(j->id);
    if (!key)
        return -1;
    PyObject *v = j->kind == JOB_IMAP ? PyCapsule_New(j, NULL, NULL) : Py_NewRef(j);
    int r = v ? PyDict_SetItem(c->jobs, key, v) : -1;
    Py_XDECREF(v);
    Py_DECREF(key);
    if (r == 0)
        j->registered = 1;
    return r;
}

static PoolJob *job_of_entry(PyObject *v)
{
    return PyCapsule_CheckExact(v) ? (PoolJob *)PyCapsule_GetPointer(v, NULL) : (PoolJob *)v;
}

static void unregister_job(PoolCore *c, PoolJob *j)
{
    if (!j->registered)
        return;
    j->registered = 0;
    PyObject *key = PyLong_FromUnsignedLongLong(j->id);
    if (!key || PyDict_DelItem(c->jobs, key) < 0)
        PyErr_Clear();
    Py_XDECREF(key);
}

/* apply(func, args, kwds, callback, error_callback, task_timeout) -> ApplyResult */
static PyObject *core_apply(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "apply(func, args, kwds, callback, error_callback, task_timeout)");
        return NULL;
    }
    if (check_running(c) < 0)
        return NULL;
    cp_state *st = cp_get_state(module_of((PyObject *)c));
    PyObject *func = args[0], *fargs = args[1], *kwds = args[2];
    int err;
    int64_t tmo = duration_ns(args[5], &err);
    if (err)
        return NULL;
    PyObject *fb = func_bytes_of(c, st, func);
    if (!fb)
        return NULL;
    PyObject *targs = PyTuple_Check(fargs) ? Py_NewRef(fargs) : PySequence_Tuple(fargs);
    if (!targs) {
        Py_DECREF(fb);
        return NULL;
    }
    int kind = CP_TASK_APPLY;
    PyObject *chunk;
    if (kwds != Py_None && !(PyDict_Check(kwds) && PyDict_GET_SIZE(kwds) == 0)) {
        kind = CP_TASK_APPLY_KW;
        chunk = Py_BuildValue("((OO))", targs, kwds);
    }
    else {
        chunk = PyTuple_Pack(1, targs);
    }
    Py_DECREF(targs);
    if (!chunk) {
        Py_DECREF(fb);
        return NULL;
    }
    PoolJob *j = new_job(c, JOB_APPLY, args[3], args[4]);
    if (!j)
        goto fail;
    j->nchunks = 1;
    if (tmo)
        j->timeout_ns = tmo;
    if (register_job(c, j) < 0)
        goto fail;
    if (build_task(c, st, j, kind, 0, 1, fb, chunk) < 0) {
        unregister_job(c, j);
        goto fail;
    }
    Py_DECREF(fb);
    Py_DECREF(chunk);
    return (PyObject *)j;
fail:
    Py_XDECREF(j);
    Py_DECREF(fb);
    Py_DECREF(chunk);
    return NULL;
}

/* Chunks per task message: several small chunks share one message (one take, one wake),
   but a message holds few items so the workers stay evenly loaded. */
static uint32_t batch_for(PoolCore *c, uint64_t nchunks, Py_ssize_t chunksize)
{
    if (c->maxtasks)
        return 1; /* a worker that may run one task only must not take several at once */
    uint64_t b = nchunks / ((uint64_t)c->nworkers * 8);
    if (b > MAX_BATCH_ITEMS / (uint64_t)chunksize)
        b = MAX_BATCH_ITEMS / (uint64_t)chunksize;
    if (b < 1)
        b = 1;
    return (uint32_t)b;
}

/* Send chunks [first, first+n) of a map whose chunk tuples are in chunks (a list of n).
   An argument that cannot be encoded raises here, in the caller. */
static int send_chunks(PoolCore *c, cp_state *st, PoolJob *j, uint32_t first, PyObject *chunks)
{
    Py_ssize_t n = PyList_GET_SIZE(chunks);
    PyObject *tup = PyList_AsTuple(chunks);
    if (!tup)
        return -1;
    int r = build_task(c, st, j, j->star ? CP_TASK_STARMAP : CP_TASK_MAP, first, (uint32_t)n,
                       j->func_bytes, tup);
    Py_DECREF(tup);
    return r;
}

/* map(func, seq, chunksize, star, callback, error_callback, task_timeout) -> MapResult */
static PyObject *core_map(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "map(func, seq, chunksize, star, callback, error_callback, task_timeout)");
        return NULL;
    }
    if (check_running(c) < 0)
        return NULL;
    cp_state *st = cp_get_state(module_of((PyObject *)c));
    /* A range is cut chunk by chunk: its numbers are made as they are sent, never all at
       once (memory that is freed and reused at once instead of faulted in and out). */
    int is_range = PyRange_Check(args[1]);
    PyObject *seq = is_range ? Py_NewRef(args[1]) : PySequence_Fast(args[1], "map() needs a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t chunksize = PyLong_AsSsize_t(args[2]);
    int star = PyObject_IsTrue(args[3]);
    int err;
    int64_t tmo = duration_ns(args[6], &err);
    PoolJob *j = NULL;
    PyObject *batch = NULL;
    if ((chunksize == -1 && PyErr_Occurred()) || star < 0 || err)
        goto fail;
    Py_ssize_t n = is_range ? PyObject_Length(seq) : PySequence_Fast_GET_SIZE(seq);
    if (n < 0)
        goto fail;
    j = new_job(c, JOB_MAP, args[4], args[5]);
    if (!j)
        goto fail;
    j->star = star;
    j->length = n;
    if (tmo)
        j->timeout_ns = tmo;
    j->value = PyList_New(n);
    if (!j->value)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(j->value, i, Py_NewRef(Py_None));
    if (n == 0 || chunksize <= 0) {
        /* As the standard library: an empty map is ready at once, without callbacks. */
        j->complete = j->done = 1;
        Py_DECREF(seq);
        return (PyObject *)j;
    }
    j->chunksize = chunksize;
    j->nchunks = (uint64_t)((n + chunksize - 1) / chunksize);
    j->func_bytes = func_bytes_of(c, st, args[0]);
    if (!j->func_bytes)
        goto fail;
    if (register_job(c, j) < 0)
        goto fail;
    uint32_t per = batch_for(c, j->nchunks, chunksize);
    PyObject **items = is_range ? NULL : PySequence_Fast_ITEMS(seq);
    for (uint64_t first = 0; first < j->nchunks; first += per) {
        uint64_t m = j->nchunks - first < per ? j->nchunks - first : per;
        batch = PyList_New((Py_ssize_t)m);
        if (!batch)
            goto fail_registered;
        for (uint64_t k = 0; k < m; k++) {
            Py_ssize_t lo = (Py_ssize_t)(first + k) * chunksize;
            Py_ssize_t hi = lo + chunksize < n ? lo + chunksize : n;
            PyObject *t;
            if (is_range) {
                PyObject *part = PySequence_GetSlice(seq, lo, hi);
                t = part ? PySequence_Tuple(part) : NULL;
                Py_XDECREF(part);
            }
            else if ((t = PyTuple_New(hi - lo)) != NULL) {
                for (Py_ssize_t i = lo; i < hi; i++)
                    PyTuple_SET_ITEM(t, i - lo, Py_NewRef(items[i]));
            }
            if (!t)
                goto fail_registered;
            PyList_SET_ITEM(batch, (Py_ssize_t)k, t);
        }
        if (send_chunks(c, st, j, (uint32_t)first, batch) < 0)
            goto fail_registered;
        Py_CLEAR(batch);
    }
    Py_DECREF(seq);
    return (PyObject *)j;
fail_registered:
    /* Chunks already sent run, their results are dropped: the caller gets the error. */
    unregister_job(c, j);
fail:
    Py_XDECREF(batch);
    Py_XDECREF(j);
    Py_DECREF(seq);
    return NULL;
}

/* Pull chunks from an imap's input until its window is full; an input that raises ends the
   input there (the error is raised by next() in its place). */
static int imap_topup(PoolJob *j, cp_state *st)
{
    PoolCore *c = j->core;
    if (j->exhausted || c->state == POOL_TERMINATE)
        return 0;
    uint64_t inflight = j->nsent - j->nyielded;
    if (inflight >= j->window || (j->nsent && j->window - inflight < j->batch))
        return 0;
    uint64_t want = j->window - inflight;
    while (want > 0 && !j->exhausted) {
        uint64_t m = want < j->batch ? want : j->batch;
        PyObject *batch = PyList_New(0);
        if (!batch)
            return -1;
        for (uint64_t k = 0; k < m && !j->exhausted; k++) {
            PyObject *t = PyTuple_New(j->chunksize);
            if (!t) {
                Py_DECREF(batch);
                return -1;
            }
            Py_ssize_t got = 0;
            while (got < j->chunksize) {
                PyObject *item = PyIter_Next(j->iter);
                if (!item) {
                    if (PyErr_Occurred()) {
                        j->iter_exc = cp_fetch_exc();
                        /* As the standard library does: a chunk whose input failed is not
                           run; the items read into it are dropped (the tuple frees them) and
                           the error is raised in its place. */
                        got = 0;
                    }
                    j->exhausted = 1;
                    break;
                }
                PyTuple_SET_ITEM(t, got++, item);
            }
            if (got == 0) {
                Py_DECREF(t);
                break;
            }
            if (got < j->chunksize && _PyTuple_Resize(&t, got) < 0) {
                Py_DECREF(batch);
                return -1;
            }
            j->length += got; /* so a lost last chunk knows how many items it held */
            int r = PyList_Append(batch, t);
            Py_DECREF(t);
            if (r < 0) {
                Py_DECREF(batch);
                return -1;
            }
        }
        Py_ssize_t nb = PyList_GET_SIZE(batch);
        if (nb > 0) {
            uint64_t first = j->nsent;
            j->nsent += (uint64_t)nb;
            j->nchunks = j->nsent;
            if (send_chunks(c, st, j, (uint32_t)first, batch) < 0) {
                /* Unencodable arguments: send the chunks one by one; those that cannot go
                   fail in next(), in their place, and the others still run. */
                PyErr_Clear();
                for (Py_ssize_t k = 0; k < nb; k++) {
                    PyObject *one = PyList_GetSlice(batch, k, k + 1);
                    if (!one) {
                        Py_DECREF(batch);
                        return -1;
                    }
                    int sent = send_chunks(c, st, j, (uint32_t)(first + (uint64_t)k), one);
                    Py_DECREF(one);
                    if (sent == 0)
                        continue;
                    PyObject *exc = cp_fetch_exc();
                    PyObject *none = NULL;
                    int r = job_set_chunk(j, first + (uint64_t)k, 0, exc, &none);
                    Py_XDECREF(exc);
                    Py_XDECREF(none);
                    if (r < 0) {
                        Py_DECREF(batch);
                        return -1;
                    }
                }
            }
        }
        Py_DECREF(batch);
        want -= (uint64_t)nb < want ? (uint64_t)nb : want;
        if (nb == 0)
            break;
    }
    return 0;
}

/* imap(func, iterator, chunksize, ordered, star, buffersize, task_timeout) -> iterator */
static PyObject *core_imap(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "imap(func, it, chunksize, ordered, star, buffersize, task_timeout)");
        return NULL;
    }
    if (check_running(c) < 0)
        return NULL;
    cp_state *st = cp_get_state(module_of((PyObject *)c));
    Py_ssize_t chunksize = PyLong_AsSsize_t(args[2]);
    int ordered = PyObject_IsTrue(args[3]);
    int star = PyObject_IsTrue(args[4]);
    Py_ssize_t window = PyLong_AsSsize_t(args[5]);
    int err;
    int64_t tmo = duration_ns(args[6], &err);
    if ((chunksize == -1 || window == -1) && PyErr_Occurred())
        return NULL;
    if (ordered < 0 || star < 0 || err)
        return NULL;
    if (chunksize < 1 || window < 1) {
        PyErr_SetString(PyExc_ValueError, "chunksize and buffersize must be 1+");
        return NULL;
    }
    PoolJob *j = new_job(c, JOB_IMAP + (ordered ? 0 : 1), NULL, NULL);
    if (!j)
        return NULL;
    j->kind = JOB_IMAP;
    j->ordered = ordered;
    j->star = star;
    j->chunksize = chunksize;
    j->window = (uint64_t)window;
    if (tmo)
        j->timeout_ns = tmo;
    j->batch = j->window / ((uint64_t)c->nworkers * 4);
    if (j->batch > MAX_BATCH_ITEMS / (uint64_t)chunksize)
        j->batch = MAX_BATCH_ITEMS / (uint64_t)chunksize;
    if (j->batch < 1 || c->maxtasks)
        j->batch = 1;
    j->iter = PyObject_GetIter(args[1]);
    j->store = ordered ? PyDict_New() : PyList_New(0);
    j->func = Py_NewRef(args[0]);
    if (!j->iter || !j->store)
        goto fail;
    j->func_bytes = func_bytes_of(c, st, args[0]);
    if (!j->func_bytes)
        goto fail;
    if (register_job(c, j) < 0)
        goto fail;
    if (imap_topup(j, st) < 0) {
        unregister_job(c, j);
        goto fail;
    }
    return (PyObject *)j;
fail:
    Py_DECREF(j);
    return NULL;
}

/* =========================== the parent: collecting results =========================== */

/* The outcome of j is known: it leaves the table and waits on *finished for its callbacks. */
static int job_complete(PoolJob *j, PyObject **finished)
{
    j->complete = 1;
    unregister_job(j->core, j);
    if (!*finished && !(*finished = PyList_New(0)))
        return -1;
    return PyList_Append(*finished, (PyObject *)j);
}

/* Record the outcome of chunk idx of job (ok: 1 results, 0 an error, -1 a list of errors, one
   per item of an imap chunk). Jobs that become complete go on *finished. */
static int job_set_chunk(PoolJob *j, uint64_t idx, int ok, PyObject *value, PyObject **finished)
{
    if (j->complete)
        return 0;
    int now_complete = 0;
    if (j->kind == JOB_APPLY) {
        j->success = ok;
        Py_XSETREF(j->value, Py_NewRef(value));
        now_complete = 1;
    }
    else if (j->kind == JOB_MAP) {
        if (!ok) {
            j->success = 0;
            Py_XSETREF(j->value, Py_NewRef(value));
            now_complete = 1;
        }
        else {
            PyObject *seq = PySequence_Fast(value, "map chunk result is not a list");
            if (!seq)
                return -1;
            Py_ssize_t lo = (Py_ssize_t)idx * j->chunksize;
            Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
            if (lo + m > j->length)
                m = j->length - lo;
            for (Py_ssize_t i = 0; i < m; i++)
                PyList_SetItem(j->value, lo + i, Py_NewRef(PySequence_Fast_GET_ITEM(seq, i)));
            Py_DECREF(seq);
            if (++j->ndone == j->nchunks)
                now_complete = 1;
        }
    }
    else {
        /* (True, results), (False, the chunk's error) or (None, one error per item: lost) */
        PyObject *pair = PyTuple_Pack(2, ok > 0 ? Py_True : ok == 0 ? Py_False : Py_None, value);
        if (!pair)
            return -1;
        int r;
        if (j->ordered) {
            PyObject *key = PyLong_FromUnsignedLongLong(idx);
            r = key ? PyDict_SetItem(j->store, key, pair) : -1;
            Py_XDECREF(key);
        }
        else {
            r = PyList_Append(j->store, pair);
        }
        Py_DECREF(pair);
        j->ndone++;
        return r;
    }
    return now_complete ? job_complete(j, finished) : 0;
}

static PoolJob *lookup_job(PoolCore *c, uint64_t id)
{
    PyObject *key = PyLong_FromUnsignedLongLong(id);
    if (!key)
        return NULL;
    PyObject *j = PyDict_GetItemWithError(c->jobs, key);
    Py_DECREF(key);
    return j ? job_of_entry(j) : NULL; /* borrowed */
}

/* Send chunks [from, first+n) of a retained message again: in one message, or (split) one
   message per chunk so idle workers can share them. */
static int resend_rest(PoolCore *c, cp_state *st, PoolJob *j, PyObject *batch, uint32_t from,
                       int split)
{
    PyObject *args;
    unsigned int enc, first, n;
    int kind;
    if (!PyArg_ParseTuple(batch, "OIiII", &args, &enc, &kind, &first, &n))
        return -1;
    PyObject *chunks = enc == CP_ENC_PICKLE5
                           ? Py_NewRef(args)
                           : decode(c, st, (const uint8_t *)PyBytes_AS_STRING(args),
                                    (uint64_t)PyBytes_GET_SIZE(args), enc);
    if (!chunks)
        return -1;
    int r = 0;
    Py_ssize_t lo = (Py_ssize_t)(from - first), step = split ? 1 : (Py_ssize_t)n;
    for (; r == 0 && lo < (Py_ssize_t)n; lo += step) {
        PyObject *rest = PyTuple_GetSlice(chunks, lo, lo + step);
        if (!rest) {
            r = -1;
            break;
        }
        r = build_task(c, st, j, kind, first + (uint32_t)lo, (uint32_t)PyTuple_GET_SIZE(rest),
                       j->func_bytes, rest);
        Py_DECREF(rest);
    }
    Py_DECREF(chunks);
    return r;
}

static int take_result(PoolCore *c, cp_state *st, uint32_t w, const uint8_t *msg, uint64_t len,
                       PyObject **finished)
{
    cp_res_hdr_t h;
    if (len < sizeof h)
        return 0;
    memcpy(&h, msg, sizeof h);
    c->last_done[w] = h.task_seq;
    c->last_chunk[w] = h.first_chunk + h.nchunks - 1;
    if (h.status & CP_RES_LAST) {
        c->outstanding--;
        if (h.status & CP_RES_BATCH) {
            PyObject *key = PyLong_FromUnsignedLongLong(h.task_seq);
            PyObject *batch = key ? PyDict_GetItemWithError(c->batches, key) : NULL;
            int rc = 0;
            if (batch && (h.status & CP_RES_RETURN)) {
                /* The worker found its chunks slow while others had nothing to do: it gave
                   back those it had not started, and they go out one by one. */
                PoolJob *j = lookup_job(c, h.job_id);
                if (j && !j->complete) {
                    Py_INCREF(j);
                    rc = resend_rest(c, st, j, batch, h.first_chunk, 1);
                    Py_DECREF(j);
                }
            }
            if (!key || PyDict_DelItem(c->batches, key) < 0)
                PyErr_Clear();
            Py_XDECREF(key);
            if (h.status & CP_RES_RETURN)
                return rc;
        }
    }
    h.status &= CP_RES_STATUS;
    PoolJob *j = lookup_job(c, h.job_id);
    if (!j) {
        /* The job already failed: late chunks are dropped, their heap blocks with them. */
        cp_payload_drop(c->heap, msg + sizeof h, len - sizeof h, h.flags);
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(j);
    int rc = -1;
    if (j->kind == JOB_MAP && !j->complete && h.status == CP_RES_OK && h.nchunks == 1 &&
        h.flags == CP_ENC_PLAIN) {
        /* A map chunk of plain values: decoded straight into the result list. */
        Py_ssize_t lo = (Py_ssize_t)h.first_chunk * j->chunksize;
        Py_ssize_t m = cp_plain_decode_chunk_into(msg + sizeof h, len - sizeof h, j->value, lo);
        if (m >= 0) {
            rc = 0;
            if (++j->ndone == j->nchunks)
                rc = job_complete(j, finished);
            Py_DECREF(j);
            return rc;
        }
        if (m == -1) {
            Py_DECREF(j);
            return -1;
        }
    }
    PyObject *out = decode(c, st, msg + sizeof h, len - sizeof h, h.flags);
    if (!out) {
        /* Cannot unpickle the result here: that is the task's outcome. */
        PyObject *exc = cp_fetch_exc();
        rc = 0;
        for (uint32_t i = 0; i < h.nchunks && rc == 0; i++)
            rc = job_set_chunk(j, h.first_chunk + i, 0, exc, finished);
        Py_DECREF(exc);
        Py_DECREF(j);
        return rc;
    }
    if (!PyTuple_Check(out) || PyTuple_GET_SIZE(out) != (Py_ssize_t)h.nchunks) {
        PyErr_SetString(PyExc_RuntimeError, "malformed pool result");
        goto done;
    }
    rc = 0;
    for (uint32_t i = 0; i < h.nchunks && rc == 0; i++) {
        PyObject *v = PyTuple_GET_ITEM(out, i);
        if (h.status == CP_RES_OK) {
            rc = job_set_chunk(j, h.first_chunk + i, 1, v, finished);
        }
        else {
            if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2) {
                PyErr_SetString(PyExc_RuntimeError, "malformed pool result");
                rc = -1;
                break;
            }
            rc = job_set_chunk(j, h.first_chunk + i, PyObject_IsTrue(PyTuple_GET_ITEM(v, 0)),
                               PyTuple_GET_ITEM(v, 1), finished);
        }
    }
done:
    Py_DECREF(out);
    Py_DECREF(j);
    return rc;
}

static int process_result(PoolCore *c, cp_state *st, uint32_t w, const uint8_t *msg, uint64_t len,
                          PyObject **finished)
{
    if (!c->p->stats)
        return take_result(c, st, w, msg, len, finished);
    int64_t t0 = cp_now_ns();
    int rc = take_result(c, st, w, msg, len, finished);
    c->st_decode_ns += cp_now_ns() - t0;
    return rc;
}

/* Run callbacks of jobs that just completed, then make them ready, and wake other waiters. */
static void finish_jobs(PoolCore *c, PyObject *finished)
{
    if (!finished)
        return;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(finished); i++) {
        PoolJob *j = (PoolJob *)PyList_GET_ITEM(finished, i);
        PyObject *cb = j->success ? j->callback : j->error_callback;
        if (cb) {
            PyObject *r = PyObject_CallOneArg(cb, j->value);
            if (r)
                Py_DECREF(r);
            else
                PyErr_WriteUnraisable(cb); /* a failing callback must not stop the others */
        }
        j->done = 1;
        if (j->has_cb) {
            j->has_cb = 0;
            c->ncallbacks--;
        }
        Py_CLEAR(j->pool); /* may be the Pool's last reference: its finalizer runs here */
        Py_CLEAR(j->callback);
        Py_CLEAR(j->error_callback);
    }
    Py_DECREF(finished);
}

static void wake_parent_waiters(PoolCore *c)
{
    cp_tr_t *r = &c->p->results;
    if (atomic_load(&r->sleepers) > 0)
        cp_tr_ring_bell(r);
}

/* Read every result in the ring; the caller holds drain_lock. Jobs completed go on
   *finished. Returns how many messages were read. */
static int drain_locked(PoolCore *c, cp_state *st, PyObject **finished)
{
    cp_pool_shm_t *p = c->p;
    cp_tr_t *r = &p->results;
    int n = 0;
    uint64_t len;
    uint32_t tag;
    while (cp_tr_peek(p, r, &len, &tag)) {
        uint32_t w = tag >> 8;
        int rc = 0;
        if (w < c->nworkers) {
            if ((tag & (CP_PIECE_FIRST | CP_PIECE_LAST)) == (CP_PIECE_FIRST | CP_PIECE_LAST)) {
                const uint8_t *ptr = cp_tr_piece_ptr(p, r, len);
                if (!ptr) {
                    if (buf_reserve(&c->inbuf, len) < 0) {
                        PyErr_NoMemory();
                        rc = -1;
                    }
                    else {
                        cp_tr_copy_out(p, r, 0, c->inbuf.buf, len);
                        ptr = c->inbuf.buf;
                    }
                }
                if (ptr)
                    rc = process_result(c, st, w, ptr, len, finished);
            }
            else {
                bytebuf *b = &c->partial[w];
                if (tag & CP_PIECE_FIRST)
                    b->len = 0;
                if (buf_reserve(b, b->len + len) < 0) {
                    PyErr_NoMemory();
                    rc = -1;
                }
                else {
                    cp_tr_copy_out(p, r, 0, b->buf + b->len, len);
                    b->len += len;
                    if (tag & CP_PIECE_LAST) {
                        rc = process_result(c, st, w, b->buf, b->len, finished);
                        b->len = 0;
                    }
                }
            }
        }
        cp_tr_pop(r, len);
        if (rc < 0)
            PyErr_WriteUnraisable((PyObject *)c);
        n++;
    }
    return n;
}

/* After a drain: feed waiting tasks, run callbacks of completed jobs, wake other waiters. */
static void after_drain(PoolCore *c, PyObject *finished, int n)
{
    flush_pending(c);
    finish_jobs(c, finished);
    if (n)
        wake_parent_waiters(c);
}

/* Collect every result in the ring (one thread at a time; others return at once).
   Returns how many messages were read. */
static int drain(PoolCore *c)
{
    if (!c->is_parent || foreign(c))
        return 0;
    if (cp_tr_empty(&c->p->results)) {
        if (c->pend_head)
            flush_pending(c);
        return 0;
    }
    if (!PyThread_acquire_lock(c->drain_lock, NOWAIT_LOCK))
        return 0;
    PyObject *finished = NULL;
    int n = drain_locked(c, cp_get_state(module_of((PyObject *)c)), &finished);
    PyThread_release_lock(c->drain_lock);
    after_drain(c, finished, n);
    return n;
}

typedef int (*ready_fn)(PoolJob *);

/* Wait until ready(j) or the deadline: 0 ready, 1 timed out, -1 error (Ctrl-C...). */
static int job_wait(PoolJob *j, ready_fn ready, int64_t deadline)
{
    PoolCore *c = j->core;
    cp_tr_t *r = &c->p->results;
    if (foreign(c) && !ready(j)) {
        PyErr_SetString(PyExc_ValueError, "a pool's results can only be waited for by the "
                        "process that created the pool");
        return -1;
    }
    for (;;) {
        uint32_t seen = atomic_load(&r->bell);
        if (ready(j))
            return 0;
        int n = drain(c);
        if (n < 0)
            return -1;
        if (ready(j))
            return 0;
        if (n > 0)
            continue;
        if (cp_deadline_left_ns(deadline) == 0)
            return 1;
        /* Spin a little before sleeping: a result usually follows within microseconds, and
           a caller that is awake when it lands costs the worker no wake-up syscall. */
        int64_t until = cp_now_ns() + EAGER_SLICE_NS;
        if (until > deadline)
            until = deadline;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = cp_tr_wait_bell(r, seen, WAITER_SPIN_NS, until);
        Py_END_ALLOW_THREADS
        (void)rc;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static int ready_done(PoolJob *j)
{
    return j->done;
}

/* ---- dead and overrunning workers ---- */

/* "SIGKILL" for 9, from the signal module (only on this error path); NULL, no error set, if
   it has no name for it. */
static PyObject *signal_name(int sig)
{
    PyObject *name = NULL;
    PyObject *mod = PyImport_ImportModule("signal");
    if (mod) {
        PyObject *member = PyObject_CallMethod(mod, "Signals", "i", sig);
        if (member) {
            name = PyObject_GetAttrString(member, "name");
            Py_DECREF(member);
        }
        Py_DECREF(mod);
    }
    PyErr_Clear();
    return name;
}

static PyObject *make_worker_lost(PoolCore *c, cp_state *st, uint32_t w, int exitcode, int timed_out,
                                  int64_t timeout_ns)
{
    PyObject *exc;
    if (timed_out)
        exc = PyObject_CallFunction(st->slot[CP_EXC_TIMEOUT_ERROR], "s",
                                    "task exceeded its timeout; its worker was replaced");
    else
        exc = PyObject_CallFunction(st->slot[CP_EXC_WORKER_LOST_ERROR], "s",
                                    "a pool worker died while running the task");
    if (!exc)
        return NULL;
    PyObject *code = PyLong_FromLong(exitcode);
    if (!code || PyObject_SetAttrString(exc, "exitcode", code) < 0) {
        Py_XDECREF(code);
        Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(code);
    if (!timed_out) {
        /* As 3.15's BrokenProcessPool cause reads ("Process PID terminated abruptly with exit
           code N"), plus the signal's name: the pid and the way it died find it in the logs. */
        PyObject *pid = PyLong_FromLong((long)c->pids[w]);
        if (!pid || PyObject_SetAttrString(exc, "pid", pid) < 0) {
            Py_XDECREF(pid);
            Py_DECREF(exc);
            return NULL;
        }
        Py_DECREF(pid);
        PyObject *how = exitcode < 0 ? signal_name(-exitcode) : NULL;
        PyObject *msg = how ? PyUnicode_FromFormat("worker %u (pid %d) terminated abruptly "
                                                   "with exit code %d (%S) while running the "
                                                   "task", w, (int)c->pids[w], exitcode, how)
                            : PyUnicode_FromFormat("worker %u (pid %d) terminated abruptly "
                                                   "with exit code %d while running the task",
                                                   w, (int)c->pids[w], exitcode);
        Py_XDECREF(how);
        if (msg) {
            PyObject *a = PyTuple_Pack(1, msg);
            if (a)
                PyObject_SetAttrString(exc, "args", a);
            Py_XDECREF(a);
            Py_DECREF(msg);
        }
        PyErr_Clear();
    }
    else {
        PyObject *secs = PyFloat_FromDouble((double)timeout_ns / 1e9);
        PyObject *msg = secs ? PyUnicode_FromFormat("task exceeded its timeout of %S s; its "
                                                    "worker was killed and replaced", secs) : NULL;
        Py_XDECREF(secs);
        if (msg) {
            PyObject *a = PyTuple_Pack(1, msg);
            if (a)
                PyObject_SetAttrString(exc, "args", a);
            Py_XDECREF(a);
            Py_DECREF(msg);
        }
        PyErr_Clear();
    }
    return exc;
}

/* Chunk idx of j was lost with worker w (killed, or for overrunning its timeout): each of its
   items fails in its own place, with an error of its own, so a caller pairing inputs with
   outputs stays in step. A map fails as a whole anyway (as on any error). */
static int job_lose_chunk(PoolCore *c, cp_state *st, PoolJob *j, uint64_t idx, uint32_t w,
                          int exitcode, int timed_out, int64_t timeout_ns, PyObject **finished)
{
    Py_ssize_t n = 1;
    if (j->kind == JOB_IMAP) {
        Py_ssize_t left = j->length - (Py_ssize_t)idx * j->chunksize;
        n = left < j->chunksize ? left : j->chunksize;
        if (n < 1)
            n = 1;
    }
    PyObject *errs = PyList_New(n);
    if (!errs)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *exc = make_worker_lost(c, st, w, exitcode, timed_out, timeout_ns);
        if (!exc) {
            Py_DECREF(errs);
            return -1;
        }
        PyList_SET_ITEM(errs, i, exc);
    }
    int r = j->kind == JOB_IMAP ? job_set_chunk(j, idx, -1, errs, finished)
                                : job_set_chunk(j, idx, 0, PyList_GET_ITEM(errs, 0), finished);
    Py_DECREF(errs);
    return r;
}

/* worker_lost(index, exitcode): the worker in slot index has exited. Its results are
   collected, then the task it was running (if it took one) fails. */
static PyObject *core_worker_lost(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "worker_lost(index, exitcode)");
        return NULL;
    }
    long w = PyLong_AsLong(args[0]);
    long code = args[1] == Py_None ? -1 : PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (w < 0 || (uint32_t)w >= c->nworkers) {
        PyErr_SetString(PyExc_IndexError, "worker index out of range");
        return NULL;
    }
    /* Under the drain lock, results it handed back before dying are read first. */
    if (!PyThread_acquire_lock(c->drain_lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(c->drain_lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    cp_state *st = cp_get_state(module_of((PyObject *)c));
    PyObject *finished = NULL;
    int nread = drain_locked(c, st, &finished);
    cp_tr_slot_t *s = cp_pool_slot(c->p, (uint32_t)w);
    uint64_t seq = atomic_load(&s->task_seq);
    uint32_t first = atomic_load(&s->first_chunk), n = atomic_load(&s->nchunks);
    uint32_t last = first + n - 1;
    int answered = c->last_done[w] == seq && c->last_chunk[w] == last;
    int rc = 0;
    if (seq && !answered && c->state != POOL_TERMINATE &&
        atomic_load(&s->taken_pos) < atomic_load(&c->p->tasks.tail)) {
        c->outstanding--;
        /* The chunk it was running fails; chunks of the same message it never started are
           sent again, so nothing runs twice and nothing else is lost. */
        uint32_t cur = c->last_done[w] == seq ? c->last_chunk[w] + 1 : first;
        PyObject *key = PyLong_FromUnsignedLongLong(seq);
        PyObject *batch = key ? PyDict_GetItemWithError(c->batches, key) : NULL;
        Py_XINCREF(batch);
        if (batch && PyDict_DelItem(c->batches, key) < 0)
            PyErr_Clear();
        Py_XDECREF(key);
        PoolJob *j = lookup_job(c, atomic_load(&s->job_id));
        if (j) {
            Py_INCREF(j);
            rc = job_lose_chunk(c, st, j, cur, (uint32_t)w, (int)code, c->timed_out[w] == seq,
                                atomic_load(&s->timeout_ns), &finished);
            if (rc == 0 && batch && cur < last && !j->complete)
                rc = resend_rest(c, st, j, batch, cur + 1, 0);
            Py_DECREF(j);
        }
        Py_XDECREF(batch);
    }
    /* The blocks of the arguments it had read are freed with it. */
    cp_bufheap_reclaim(c->heap, HOLDER(c->tag, w));
    atomic_store(&s->task_seq, 0);
    atomic_store(&s->busy, 0);
    atomic_store(&s->leaving, 0);
    atomic_store(&s->pid, 0);
    c->last_done[w] = 0;
    c->last_chunk[w] = 0;
    c->timed_out[w] = 0;
    c->partial[w].len = 0;
    if (c->pidfds[w] >= 0)
        c->pidfds[w] = -1; /* owned by the Process object, which closes it */
    c->pids[w] = 0;
    PyThread_release_lock(c->drain_lock);
    after_drain(c, finished, nread + 1);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* set_worker(index, pid, pidfd): a (new) worker process runs in slot index. */
static PyObject *core_set_worker(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "set_worker(index, pid, pidfd)");
        return NULL;
    }
    long w = PyLong_AsLong(args[0]), pid = PyLong_AsLong(args[1]), fd = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (w < 0 || (uint32_t)w >= c->nworkers) {
        PyErr_SetString(PyExc_IndexError, "worker index out of range");
        return NULL;
    }
    c->pids[w] = (pid_t)pid;
    c->pidfds[w] = (int)fd;
    Py_RETURN_NONE;
}

/* Kill workers whose current item overran its timeout (they are then reported dead). */
static void check_timeouts(PoolCore *c, int64_t now)
{
    for (uint32_t w = 0; w < c->nworkers; w++) {
        cp_tr_slot_t *s = cp_pool_slot(c->p, w);
        if (!atomic_load(&s->busy))
            continue;
        int64_t t = atomic_load(&s->timeout_ns);
        uint64_t seq = atomic_load(&s->task_seq);
        if (t > 0 && seq && c->timed_out[w] != seq && now - atomic_load(&s->item_start_ns) > t &&
            c->pids[w] > 0) {
            c->timed_out[w] = seq;
            /* Through the pidfd: a forkserver worker is not our child, its pid may be reused. */
            if (c->pidfds[w] < 0 || cp_pidfd_send_signal(c->pidfds[w], SIGKILL) < 0)
                kill(c->pids[w], SIGKILL);
        }
    }
}

/* serve(timeout) -> list of indexes of workers that exited. Run by the pool's handler
   thread: collects results, feeds pending tasks, enforces task timeouts, and sleeps at most
   timeout in one poll() on the wake-up eventfd and the workers' pidfds, so a result it wants,
   close(), terminate() or a worker's exit end the sleep at once. */
static PyObject *core_serve(PoolCore *c, PyObject *arg)
{
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    cp_tr_t *r = &c->p->results;
    int64_t slice = (int64_t)(t * 1e9);
    if (c->pend_head && slice > PENDING_SLICE_NS)
        slice = PENDING_SLICE_NS;
    /* A running task with a timeout: look at the slots often enough. */
    for (uint32_t w = 0; w < c->nworkers; w++)
        if (atomic_load(&cp_pool_slot(c->p, w)->busy) &&
            atomic_load(&cp_pool_slot(c->p, w)->timeout_ns) > 0 && slice > 10000000)
            slice = 10000000;
    if (drain(c) < 0)
        return NULL;
    struct pollfd *pf = PyMem_RawMalloc((c->nworkers + 1) * sizeof(struct pollfd));
    uint32_t *idx = PyMem_RawMalloc(c->nworkers * sizeof(uint32_t)), np = 0;
    if (!pf || !idx) {
        PyMem_RawFree(pf);
        PyMem_RawFree(idx);
        return PyErr_NoMemory();
    }
    pf[0].fd = c->wake_fd;
    pf[0].events = POLLIN;
    pf[0].revents = 0;
    for (uint32_t w = 0; w < c->nworkers; w++) {
        if (c->pidfds[w] >= 0) {
            pf[np + 1].fd = c->pidfds[w];
            pf[np + 1].events = POLLIN;
            pf[np + 1].revents = 0;
            idx[np++] = w;
        }
    }
    /* Results nobody waits for matter when callbacks are due (then every one wakes us) or
       tasks wait to be fed (then a worker running dry does); else only a filling ring. */
    atomic_store(&r->bg_eager, c->ncallbacks > 0);
    atomic_store(&r->bg_idle, c->pend_head != NULL);
    int64_t until = cp_now_ns() + (slice > 0 ? slice : 0);
    int pr;
    Py_BEGIN_ALLOW_THREADS
    pr = cp_tr_wait_bg(r, pf, np + 1, until);
    Py_END_ALLOW_THREADS
    if (drain(c) < 0) {
        PyMem_RawFree(pf);
        PyMem_RawFree(idx);
        return NULL;
    }
    check_timeouts(c, cp_now_ns());
    if (pr <= 0 && np) {
        /* The wait was skipped or cut short before looking at the pidfds: look now. */
        Py_BEGIN_ALLOW_THREADS
        pr = poll(pf + 1, np, 0);
        Py_END_ALLOW_THREADS
    }
    PyObject *dead = PyList_New(0);
    for (uint32_t i = 0; dead && pr > 0 && i < np; i++) {
        if (pf[i + 1].revents) {
            PyObject *v = PyLong_FromUnsignedLong(idx[i]);
            if (!v || PyList_Append(dead, v) < 0)
                Py_CLEAR(dead);
            Py_XDECREF(v);
        }
    }
    PyMem_RawFree(pf);
    PyMem_RawFree(idx);
    return dead;
}

static PyObject *core_close(PoolCore *c, PyObject *unused)
{
    if (foreign(c)) {
        c->state = POOL_CLOSE; /* a forked copy: the pool itself is not ours to close */
        Py_RETURN_NONE;
    }
    if (c->state == POOL_RUN)
        c->state = POOL_CLOSE;
    flush_pending(c);
    cp_tr_ring_bg(c->wake_fd);
    Py_RETURN_NONE;
}

/* terminate(): workers leave at once; the handler thread stops serving. */
static PyObject *core_terminate(PoolCore *c, PyObject *unused)
{
    if (foreign(c)) {
        c->state = POOL_TERMINATE;
        Py_RETURN_NONE;
    }
    c->state = POOL_TERMINATE;
    atomic_store(&c->p->stop, 1);
    atomic_store(&c->p->closing, 1);
    cp_tr_ring_bell(&c->p->tasks);
    wake_parent_waiters(c);
    cp_tr_ring_bg(c->wake_fd);
    Py_RETURN_NONE;
}

/* fail_all(exc): every job still waiting fails with exc (the pool was terminated). */
static PyObject *core_fail_all(PoolCore *c, PyObject *exc)
{
    if (foreign(c))
        Py_RETURN_NONE;
    if (!PyThread_acquire_lock(c->drain_lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(c->drain_lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    PyObject *finished = NULL;
    int n = drain_locked(c, cp_get_state(module_of((PyObject *)c)), &finished);
    PyObject *jobs = PyDict_Values(c->jobs);
    if (!jobs) {
        PyThread_release_lock(c->drain_lock);
        after_drain(c, finished, n);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(jobs); i++) {
        PoolJob *j = job_of_entry(PyList_GET_ITEM(jobs, i));
        if (j->kind == JOB_IMAP) {
            /* imap: next() yields what did arrive in order, then raises exc */
            Py_XSETREF(j->iter_exc, Py_NewRef(exc));
            j->exhausted = 1;
            j->aborted = 1;
            unregister_job(c, j);
            continue;
        }
        if (job_set_chunk(j, 0, 0, exc, &finished) < 0)
            PyErr_WriteUnraisable((PyObject *)c);
    }
    Py_DECREF(jobs);
    PyDict_Clear(c->batches);
    while (c->pend_head) {
        pending_msg *m = c->pend_head;
        c->pend_head = m->next;
        PyMem_RawFree(m);
    }
    c->pend_tail = NULL;
    PyThread_release_lock(c->drain_lock);
    after_drain(c, finished, 1);
    Py_RETURN_NONE;
}

/* idle() -> True when no task is queued, running or unanswered. */
static PyObject *core_idle(PoolCore *c, PyObject *unused)
{
    return PyBool_FromLong(c->outstanding <= 0 && !c->pend_head);
}

/* =========================== the worker loop =========================== */

/* The pool's process, watched through a pidfd: under forkserver it is not our parent. */
typedef struct {
    pid_t pid;
    int pidfd;
    int64_t alive_ns;          /* when it was last seen alive */
} parent_watch;

static int parent_gone(const parent_watch *pw)
{
    if (pw->pidfd >= 0) {
        struct pollfd p = {pw->pidfd, POLLIN, 0};
        return poll(&p, 1, 0) > 0;
    }
    return kill(pw->pid, 0) < 0 && errno == ESRCH;
}

/* Before a task starts: a pool process that died (SIGKILL leaves it no time to say so) will
   never read our results, and queued tasks must not run for nobody. Asked at most once per
   PARENT_CHECK_NS, so a stream of tiny tasks does not pay a syscall each (a poll per task
   measured 0.77-0.85x on pool_apply_async, within this machine's noise on a rerun); a task
   may thus start up to that long after the death, never later. */
static int parent_gone_lately(parent_watch *pw)
{
    int64_t now = cp_now_ns();
    if (now - pw->alive_ns < PARENT_CHECK_NS)
        return 0;
    if (parent_gone(pw))
        return 1;
    pw->alive_ns = now;
    return 0;
}

/* Pool(stats=True): add the time since *mark to counter; *mark moves to now. */
static inline void stat_add(int on, _Atomic uint64_t *counter, int64_t *mark)
{
    if (!on)
        return;
    int64_t now = cp_now_ns();
    atomic_fetch_add_explicit(counter, (uint64_t)(now - *mark), memory_order_relaxed);
    *mark = now;
}

/* Take the next task into buf. 1: got one; 0: time to leave; -1: exception. */
static int worker_take(PoolCore *c, cp_tr_slot_t *slot, bytebuf *buf, parent_watch *pw)
{
    cp_pool_shm_t *p = c->p;
    cp_tr_t *r = &p->tasks;
    int nudged = 0;
    for (;;) {
        /* Read before the flags: close() or terminate() sets a flag, then rings the bell. */
        uint32_t seen = atomic_load(&r->bell);
        if (atomic_load(&p->stop) || parent_gone_lately(pw))
            return 0;
        if (cp_tr_empty(r)) {
            if (atomic_load(&p->closing))
                return 0;
            if (!nudged) {
                /* Out of work: a background collector waiting for that should run now. */
                cp_tr_nudge_idle(&p->results, c->wake_fd);
                nudged = 1;
            }
            int rc;
            Py_BEGIN_ALLOW_THREADS
            rc = cp_tr_wait_data(r, seen, WORKER_SPIN_NS, cp_now_ns() + WORKER_SLICE_NS);
            Py_END_ALLOW_THREADS
            if (rc == -EINTR && PyErr_CheckSignals() < 0)
                return -1;
            continue; /* the wait is cut in slices so a dead parent is seen above */
        }
        int lk;
        Py_BEGIN_ALLOW_THREADS
        lk = cp_tr_lock(r);
        Py_END_ALLOW_THREADS
        if (lk < 0) {
            cp_err_errno(lk, "pthread_mutex_lock");
            return -1;
        }
        uint64_t len;
        uint32_t tag;
        if (!cp_tr_peek(p, r, &len, &tag)) {
            cp_tr_unlock(r);
            continue;
        }
        if (!(tag & CP_PIECE_FIRST) || len < sizeof(cp_task_hdr_t)) {
            /* The rest of a message whose reader was killed: its task has failed already. */
            cp_tr_pop(r, len);
            cp_tr_unlock(r);
            continue;
        }
        if (buf_reserve(buf, len) < 0) {
            cp_tr_unlock(r);
            PyErr_NoMemory();
            return -1;
        }
        cp_tr_copy_out(p, r, 0, buf->buf, len);
        buf->len = len;
        cp_task_hdr_t h;
        memcpy(&h, buf->buf, sizeof h);
        atomic_store(&slot->job_id, h.job_id);
        atomic_store(&slot->first_chunk, h.first_chunk);
        atomic_store(&slot->nchunks, h.nchunks);
        atomic_store(&slot->timeout_ns, h.timeout_ns);
        atomic_store(&slot->item_start_ns, cp_now_ns());
        atomic_store(&slot->taken_pos, atomic_load(&r->tail));
        atomic_store(&slot->busy, 1);
        atomic_store(&slot->task_seq, h.task_seq);
        cp_tr_pop(r, len);
        while (!(tag & CP_PIECE_LAST)) {
            seen = atomic_load(&r->bell);
            if (atomic_load(&p->stop) || parent_gone(pw)) {
                cp_tr_unlock(r);
                return 0;
            }
            if (!cp_tr_peek(p, r, &len, &tag)) {
                Py_BEGIN_ALLOW_THREADS
                cp_tr_wait_data(r, seen, 0, cp_now_ns() + WORKER_SLICE_NS);
                Py_END_ALLOW_THREADS
                continue;
            }
            if (buf_reserve(buf, buf->len + len) < 0) {
                cp_tr_unlock(r);
                PyErr_NoMemory();
                return -1;
            }
            cp_tr_copy_out(p, r, 0, buf->buf + buf->len, len);
            buf->len += len;
            cp_tr_pop(r, len);
        }
        cp_tr_unlock(r);
        return 1;
    }
}

typedef struct {
    PyObject *bytes, *func;
} func_cache_entry;

#define FUNC_CACHE 4

static PyObject *worker_func(cp_state *st, func_cache_entry *cache, const uint8_t *b, uint32_t n)
{
    for (int i = 0; i < FUNC_CACHE; i++) {
        if (cache[i].bytes && (uint32_t)PyBytes_GET_SIZE(cache[i].bytes) == n &&
            memcmp(PyBytes_AS_STRING(cache[i].bytes), b, n) == 0)
            return cache[i].func;
    }
    PyObject *f = cp_payload_decode(st, NULL, 0, b, n, CP_ENC_PICKLE);
    if (!f)
        return NULL;
    PyObject *key = PyBytes_FromStringAndSize((const char *)b, n);
    if (!key) {
        Py_DECREF(f);
        return NULL;
    }
    Py_XDECREF(cache[FUNC_CACHE - 1].bytes);
    Py_XDECREF(cache[FUNC_CACHE - 1].func);
    memmove(cache + 1, cache, sizeof(cache[0]) * (FUNC_CACHE - 1));
    cache[0].bytes = key;
    cache[0].func = f;
    return f;
}

static PyObject *run_chunk(PyObject *func, uint32_t kind, PyObject *chunk, cp_tr_slot_t *slot)
{
    if (kind == CP_TASK_APPLY) {
        if (!PyTuple_Check(chunk))
            return PyErr_Format(PyExc_TypeError, "malformed task");
        return PyObject_Call(func, chunk, NULL);
    }
    if (kind == CP_TASK_APPLY_KW) {
        if (!PyTuple_Check(chunk) || PyTuple_GET_SIZE(chunk) != 2)
            return PyErr_Format(PyExc_TypeError, "malformed task");
        PyObject *a = PyTuple_GET_ITEM(chunk, 0), *k = PyTuple_GET_ITEM(chunk, 1);
        return PyObject_Call(func, a, k == Py_None ? NULL : k);
    }
    PyObject *seq = PySequence_Fast(chunk, "malformed task");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int timed = atomic_load_explicit(&slot->timeout_ns, memory_order_relaxed) > 0;
    PyObject *out = PyList_New(n);
    if (!out) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *r;
        if (timed && i)
            atomic_store_explicit(&slot->item_start_ns, cp_now_ns(), memory_order_relaxed);
        if (kind == CP_TASK_STARMAP) {
            PyObject *t = PyTuple_Check(item) ? Py_NewRef(item) : PySequence_Tuple(item);
            r = t ? PyObject_Call(func, t, NULL) : NULL;
            Py_XDECREF(t);
        }
        else {
            r = PyObject_CallOneArg(func, item);
        }
        if (!r) {
            Py_DECREF(out);
            Py_DECREF(seq);
            return NULL;
        }
        PyList_SET_ITEM(out, i, r);
    }
    Py_DECREF(seq);
    return out;
}

/* The exception of a failed task, ready to travel: wrapped with its traceback text. */
static PyObject *wrapped_exc(PoolCore *c)
{
    PyObject *exc = cp_fetch_exc();
    if (!exc)
        return Py_NewRef(Py_None);
    if (c->wrap_exc) {
        PyObject *w = PyObject_CallOneArg(c->wrap_exc, exc);
        if (w) {
            Py_DECREF(exc);
            return w;
        }
        PyErr_Clear();
    }
    return exc;
}

/* Append the encoded outcomes of a task to out; a value that cannot be pickled becomes that
   chunk's error (MaybeEncodingError), as in the standard library. 0 or -1. */
static int encode_outcome(PoolCore *c, cp_state *st, bytebuf *out, PyObject *vals, char *ok,
                          uint32_t n, int *all_ok, uint32_t *enc)
{
    size_t mark = out->len;
    for (int attempt = 0; attempt < 2; attempt++) {
        PyObject *payload;
        if (*all_ok) {
            payload = Py_NewRef(vals);
        }
        else {
            payload = PyTuple_New(n);
            if (!payload)
                return -1;
            for (uint32_t i = 0; i < n; i++) {
                PyObject *pair = PyTuple_Pack(2, ok[i] ? Py_True : Py_False, PyTuple_GET_ITEM(vals, i));
                if (!pair) {
                    Py_DECREF(payload);
                    return -1;
                }
                PyTuple_SET_ITEM(payload, i, pair);
            }
        }
        int r = encode_to(c, st, out, payload, enc);
        Py_DECREF(payload);
        if (r == 0 || attempt)
            return r;
        /* Find which values do not encode; each becomes a MaybeEncodingError. */
        PyErr_Clear();
        out->len = mark;
        bytebuf probe = {0};
        for (uint32_t i = 0; i < n; i++) {
            uint32_t e;
            PyObject *v = PyTuple_GET_ITEM(vals, i);
            probe.len = 0;
            if (encode_to(c, st, &probe, v, &e) == 0) {
                cp_payload_drop(c->heap, probe.buf, probe.len, e);
                continue;
            }
            PyObject *exc = cp_fetch_exc();
            PyObject *err = c->encoding_error ? PyObject_CallFunctionObjArgs(c->encoding_error, exc, v, NULL)
                                              : NULL;
            if (!err) {
                PyErr_Clear();
                err = PyUnicode_FromString("result could not be pickled");
            }
            Py_DECREF(exc);
            if (!err) {
                PyMem_RawFree(probe.buf);
                return -1;
            }
            PyTuple_SetItem(vals, i, err);
            ok[i] = 0;
            *all_ok = 0;
        }
        PyMem_RawFree(probe.buf);
    }
    return -1;
}

static int worker_publish(PoolCore *c, uint32_t w, bytebuf *out, const parent_watch *pw)
{
    cp_pool_shm_t *p = c->p;
    cp_tr_t *r = &p->results;
    int lk;
    Py_BEGIN_ALLOW_THREADS
    lk = cp_tr_lock(r);
    Py_END_ALLOW_THREADS
    if (lk < 0) {
        cp_err_errno(lk, "pthread_mutex_lock");
        return -1;
    }
    uint64_t off = 0;
    while (!cp_tr_put(p, r, out->buf, out->len, w, &off)) {
        if (atomic_load(&p->stop) || parent_gone(pw))
            break;
        uint64_t left = out->len - off, maxp = cp_tr_max_piece(r);
        uint64_t need = cp_tr_record_size(left < maxp ? left : maxp);
        cp_tr_notify_bg(r, c->wake_fd);
        Py_BEGIN_ALLOW_THREADS
        cp_tr_wait_space(r, need, cp_now_ns() + WORKER_SLICE_NS);
        Py_END_ALLOW_THREADS
    }
    cp_tr_unlock(r);
    cp_tr_notify_bg(r, c->wake_fd);
    return 0;
}

/* worker_loop(index, maxtasks, parent_pid): run tasks until told to leave. */
static PyObject *core_worker_loop(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "worker_loop(index, maxtasks, parent_pid)");
        return NULL;
    }
    long w = PyLong_AsLong(args[0]), maxtasks = PyLong_AsLong(args[1]), ppid = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (w < 0 || (uint32_t)w >= c->p->nslots) {
        PyErr_SetString(PyExc_IndexError, "worker index out of range");
        return NULL;
    }
    cp_state *st = cp_get_state(module_of((PyObject *)c));
    cp_tr_slot_t *slot = cp_pool_slot(c->p, (uint32_t)w);
    atomic_store(&slot->pid, (int32_t)getpid());
    /* Blocks it allocates or reads are its slot's: freed with it if it dies. */
    c->send_holder = c->read_holder = HOLDER(c->tag, w);
    parent_watch pw = {(pid_t)ppid, cp_pidfd_open((pid_t)ppid), 0};
    if (pw.pidfd == -ESRCH)
        Py_RETURN_NONE; /* the pool is gone already */
    func_cache_entry cache[FUNC_CACHE] = {{0}};
    bytebuf in = {0}, out = {0};
    long ntasks = 0;
    PyObject *result = NULL;
    int stats = c->p->stats;
    int64_t mark = stats ? cp_now_ns() : 0;
    for (;;) {
        if (maxtasks > 0 && ntasks >= maxtasks)
            break;
        int rc = worker_take(c, slot, &in, &pw);
        if (rc < 0)
            goto done;
        if (rc == 0)
            break;
        stat_add(stats, &slot->st_wait_ns, &mark);
        cp_task_hdr_t h;
        memcpy(&h, in.buf, sizeof h);
        const uint8_t *fb = in.buf + sizeof h, *ab = fb + h.func_len;
        PyObject *func = worker_func(st, cache, fb, h.func_len);
        PyObject *chunks = func ? decode(c, st, ab, h.args_len, h.flags) : NULL;
        stat_add(stats, &slot->st_decode_ns, &mark);
        if (chunks && (!PyTuple_Check(chunks) || PyTuple_GET_SIZE(chunks) != h.nchunks)) {
            Py_CLEAR(chunks);
            PyErr_SetString(PyExc_RuntimeError, "malformed task");
        }
        /* The function or the arguments cannot be unpickled here: every chunk fails with it. */
        PyObject *setup_err = chunks ? NULL : wrapped_exc(c);
        /* Results go back chunk by chunk, so a worker that dies in the middle of a message
           of several chunks loses only the one it was running. */
        uint32_t ran = h.nchunks;
        int orphaned = 0;
        for (uint32_t i = 0; i < h.nchunks; i++) {
            PyObject *r;
            char ok = 0;
            int64_t chunk_start = cp_now_ns();
            if (i && parent_gone_lately(&pw)) {
                /* The chunks of one message are tasks too: none starts for a dead parent. */
                orphaned = 1;
                ran = i;
                break;
            }
            if (setup_err) {
                r = Py_NewRef(setup_err);
            }
            else {
                /* The timeout is the function's: unpickling the task (which may import the
                   function's module first, in a spawned worker) is not counted. */
                atomic_store_explicit(&slot->item_start_ns, cp_now_ns(), memory_order_relaxed);
                r = run_chunk(func, h.kind, PyTuple_GET_ITEM(chunks, i), slot);
                ok = r != NULL;
                if (!r)
                    r = wrapped_exc(c);
                stat_add(stats, &slot->st_run_ns, &mark);
                if (stats)
                    atomic_fetch_add_explicit(&slot->st_chunks, 1, memory_order_relaxed);
            }
            PyObject *vals = PyTuple_New(1);
            if (!vals) {
                Py_DECREF(r);
                Py_XDECREF(chunks);
                Py_XDECREF(setup_err);
                goto done;
            }
            PyTuple_SET_ITEM(vals, 0, r);
            if (i + 1 == h.nchunks) {
                /* Done with the arguments: their heap blocks are freed before the result
                   takes one, which then reuses their pages (resident, and mapped here). */
                Py_CLEAR(chunks);
            }
            int all_ok = ok;
            uint32_t enc = 0;
            out.len = sizeof(cp_res_hdr_t);
            int e = buf_reserve(&out, out.len) < 0 ||
                    encode_outcome(c, st, &out, vals, &ok, 1, &all_ok, &enc) < 0;
            Py_DECREF(vals);
            if (e) {
                Py_XDECREF(chunks);
                Py_XDECREF(setup_err);
                goto done;
            }
            uint32_t status = (all_ok ? CP_RES_OK : CP_RES_ERR) |
                              (i + 1 == h.nchunks ? CP_RES_LAST : 0) |
                              (h.nchunks > 1 ? CP_RES_BATCH : 0);
            cp_res_hdr_t rh = {h.job_id, h.task_seq, h.first_chunk + i, 1, status, enc};
            memcpy(out.buf, &rh, sizeof rh);
            /* The result's blocks are the parent's from here: were this worker to die before
               publishing, they would leak rather than be freed under the parent's feet. */
            cp_payload_hand_over(c->heap, out.buf + sizeof rh, out.len - sizeof rh, enc,
                                 CP_HEAP_PARENT);
            if (worker_publish(c, (uint32_t)w, &out, &pw) < 0) {
                Py_XDECREF(chunks);
                Py_XDECREF(setup_err);
                goto done;
            }
            stat_add(stats, &slot->st_encode_ns, &mark);
            if (i + 1 < h.nchunks && !setup_err && cp_tr_empty(&c->p->tasks) &&
                cp_now_ns() - chunk_start > RETURN_AFTER_NS) {
                /* Slow chunks and an empty ring: other workers may be idle. Give the chunks
                   not started back to the parent, which sends them out one by one. */
                cp_res_hdr_t back = {h.job_id, h.task_seq, h.first_chunk + i + 1,
                                     h.nchunks - i - 1, CP_RES_RETURN | CP_RES_LAST | CP_RES_BATCH,
                                     CP_ENC_PLAIN};
                out.len = 0;
                if (buf_append(&out, &back, sizeof back) < 0 ||
                    worker_publish(c, (uint32_t)w, &out, &pw) < 0) {
                    Py_XDECREF(chunks);
                    goto done;
                }
                ran = i + 1;
                break;
            }
        }
        Py_XDECREF(chunks);
        Py_XDECREF(setup_err);
        atomic_store(&slot->busy, 0);
        atomic_store(&slot->task_seq, 0);
        ntasks += ran;
        if (orphaned)
            break;
    }
    result = Py_NewRef(Py_None);
    /* Leaving (maxtasksperchild, close): the parent replaces or reaps us sooner if told. */
    atomic_store(&slot->leaving, 1);
    cp_tr_ring_bg(c->wake_fd);
done:
    for (int i = 0; i < FUNC_CACHE; i++) {
        Py_XDECREF(cache[i].bytes);
        Py_XDECREF(cache[i].func);
    }
    PyMem_RawFree(in.buf);
    PyMem_RawFree(out.buf);
    if (pw.pidfd >= 0)
        close(pw.pidfd);
    return result;
}

/* =========================== PoolCore type =========================== */

static int core_alloc_arrays(PoolCore *c, uint32_t n)
{
    c->nworkers = n;
    c->partial = PyMem_RawCalloc(n, sizeof(bytebuf));
    c->last_done = PyMem_RawCalloc(n, sizeof(uint64_t));
    c->last_chunk = PyMem_RawCalloc(n, sizeof(uint32_t));
    c->timed_out = PyMem_RawCalloc(n, sizeof(uint64_t));
    c->pidfds = PyMem_RawMalloc(n * sizeof(int));
    c->pids = PyMem_RawCalloc(n, sizeof(pid_t));
    if (!c->partial || !c->last_done || !c->last_chunk || !c->timed_out || !c->pidfds ||
        !c->pids) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t i = 0; i < n; i++)
        c->pidfds[i] = -1;
    return 0;
}

/* PoolCore(nworkers, task_ring_bytes, result_ring_bytes, maxtasks, task_timeout, heap, stats):
   heap a BufferHeap (_buffer_heap) for large buffers, None for none (every buffer in band);
   stats: keep the time counters of stats(). */
static PyObject *core_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    unsigned int n;
    unsigned long long tcap, rcap;
    unsigned int maxtasks;
    PyObject *tmo = Py_None, *heap = Py_None;
    int stats = 0;
    if (!PyArg_ParseTuple(args, "IKKI|OOp:PoolCore", &n, &tcap, &rcap, &maxtasks, &tmo,
                          &heap, &stats))
        return NULL;
    cp_state *st = cp_state_from_type(tp);
    if (!st)
        return NULL;
    if (heap != Py_None && !PyObject_TypeCheck(heap, (PyTypeObject *)st->slot[CP_TYPE_BUFHEAP])) {
        PyErr_SetString(PyExc_TypeError, "heap must be a BufferHeap or None");
        return NULL;
    }
    if (n < 1 || n > 4096) {
        PyErr_SetString(PyExc_ValueError, "Number of processes must be at least 1");
        return NULL;
    }
    int err;
    int64_t t = duration_ns(tmo, &err);
    if (err)
        return NULL;
    PoolCore *c = (PoolCore *)tp->tp_alloc(tp, 0);
    if (!c)
        return NULL;
    c->shm.fd = -1;
    c->wake_fd = -1;
    c->is_parent = 1;
    c->fork_gen = fork_generation;
    c->maxtasks = maxtasks;
    c->default_timeout_ns = t;
    if (core_alloc_arrays(c, n) < 0)
        goto fail;
    c->jobs = PyDict_New();
    c->batches = PyDict_New();
    c->drain_lock = PyThread_allocate_lock();
    if (!c->jobs || !c->batches || !c->drain_lock)
        goto fail;
    size_t size = cp_pool_shm_size(n, tcap, rcap);
    int r = cp_shm_create(&c->shm, size, "cpool-pool");
    if (r < 0) {
        cp_err_errno(r, "memfd_create");
        goto fail;
    }
    c->p = c->shm.addr;
    r = cp_pool_shm_init(c->p, size, n, tcap, rcap);
    if (r < 0) {
        cp_err_errno(r, "pthread_mutex_init");
        goto fail;
    }
    c->p->stats = (uint32_t)stats;
    c->created_ns = cp_now_ns();
    /* Non-blocking: a worker's wake never blocks, the collector's reset never waits. */
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->wake_fd < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "eventfd");
        goto fail;
    }
    if (heap != Py_None) {
        static uint32_t pools;
        c->heap = Py_NewRef(heap);
        c->tag = pools++ % MAX_TAG + 1;
        c->send_holder = HOLDER(c->tag, IN_FLIGHT);
        c->read_holder = CP_HEAP_PARENT;
    }
    return (PyObject *)c;
fail:
    Py_DECREF(c);
    return NULL;
}

/* _attach(fd, size, wake_fd, heap_fd, heap_size, tag): the worker's view of a pool handed over
   by fd (spawn, forkserver); heap_fd -1 when the pool has no heap. The fds stay the caller's:
   the segments are mapped, the eventfd duplicated. */
static PyObject *core_attach(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "_attach(fd, size, wake_fd, heap_fd, heap_size, tag)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[1]);
    long wfd = PyLong_AsLong(args[2]);
    long hfd = PyLong_AsLong(args[3]);
    unsigned long long hsize = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long tag = PyLong_AsUnsignedLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    PyTypeObject *tp = (PyTypeObject *)cls;
    PoolCore *c = (PoolCore *)tp->tp_alloc(tp, 0);
    if (!c)
        return NULL;
    c->shm.fd = -1;
    c->wake_fd = fcntl((int)wfd, F_DUPFD_CLOEXEC, 0);
    if (c->wake_fd < 0) {
        Py_DECREF(c);
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "fcntl");
    }
    int r = cp_shm_attach(&c->shm, (int)fd, (size_t)size);
    if (r < 0) {
        Py_DECREF(c);
        return cp_err_errno(r, "mmap");
    }
    c->p = c->shm.addr;
    if (cp_pool_shm_check(c->p, c->shm.size) < 0) {
        Py_DECREF(c);
        PyErr_SetString(PyExc_ValueError, "not a cpool pool segment");
        return NULL;
    }
    if (core_alloc_arrays(c, c->p->nslots) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    c->jobs = PyDict_New();
    if (!c->jobs) {
        Py_DECREF(c);
        return NULL;
    }
    if (hfd >= 0 && !(c->heap = cp_bufheap_attach(module_of((PyObject *)c), (int)hfd, hsize))) {
        Py_DECREF(c);
        return NULL;
    }
    c->tag = (uint32_t)tag;
    return (PyObject *)c;
}

/* _set_owner(weakref to the Pool): results keep the Pool alive until they are in. */
static PyObject *core_set_owner(PoolCore *c, PyObject *ref)
{
    if (!PyWeakref_CheckRef(ref)) {
        PyErr_SetString(PyExc_TypeError, "_set_owner needs a weak reference");
        return NULL;
    }
    Py_XSETREF(c->owner, Py_NewRef(ref));
    Py_RETURN_NONE;
}

/* _set_helpers(wrap_exc, encoding_error, ApplyResult, MapResult, IMapIterator,
                 IMapUnorderedIterator, dumps_collecting) */
static PyObject *core_set_helpers(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "_set_helpers(wrap_exc, encoding_error, 4 classes, dumps_collecting)");
        return NULL;
    }
    cp_bufheap_set_dumps(c->heap, args[6]);
    Py_XSETREF(c->wrap_exc, Py_NewRef(args[0]));
    Py_XSETREF(c->encoding_error, Py_NewRef(args[1]));
    for (int i = 0; i < 4; i++) {
        if (!PyType_Check(args[2 + i])) {
            PyErr_SetString(PyExc_TypeError, "result classes must be types");
            return NULL;
        }
        Py_XSETREF(c->cls[i], Py_NewRef(args[2 + i]));
    }
    Py_RETURN_NONE;
}

static int core_traverse(PoolCore *c, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(c));
    Py_VISIT(c->jobs);
    Py_VISIT(c->batches);
    Py_VISIT(c->last_func);
    Py_VISIT(c->last_func_bytes);
    Py_VISIT(c->wrap_exc);
    Py_VISIT(c->encoding_error);
    Py_VISIT(c->owner);
    Py_VISIT(c->heap);
    for (int i = 0; i < 4; i++)
        Py_VISIT(c->cls[i]);
    return 0;
}

static int core_clear(PoolCore *c)
{
    Py_CLEAR(c->jobs);
    Py_CLEAR(c->batches);
    Py_CLEAR(c->last_func);
    Py_CLEAR(c->last_func_bytes);
    Py_CLEAR(c->wrap_exc);
    Py_CLEAR(c->encoding_error);
    Py_CLEAR(c->owner);
    if (c->heap && c->is_parent && !foreign(c)) {
        /* The pool is gone (its workers with it): the heap, which outlives it, gets back
           what its workers held and the messages they never read. */
        for (uint32_t w = 0; w < c->nworkers; w++)
            cp_bufheap_reclaim(c->heap, HOLDER(c->tag, w));
        cp_bufheap_reclaim(c->heap, HOLDER(c->tag, IN_FLIGHT));
    }
    Py_CLEAR(c->heap);
    for (int i = 0; i < 4; i++)
        Py_CLEAR(c->cls[i]);
    return 0;
}

static void core_dealloc(PoolCore *c)
{
    PyTypeObject *tp = Py_TYPE(c);
    PyObject_GC_UnTrack(c);
    core_clear(c);
    while (c->pend_head) {
        pending_msg *m = c->pend_head;
        c->pend_head = m->next;
        PyMem_RawFree(m);
    }
    if (c->partial)
        for (uint32_t i = 0; i < c->nworkers; i++)
            PyMem_RawFree(c->partial[i].buf);
    PyMem_RawFree(c->partial);
    PyMem_RawFree(c->last_done);
    PyMem_RawFree(c->last_chunk);
    PyMem_RawFree(c->timed_out);
    PyMem_RawFree(c->pidfds);
    PyMem_RawFree(c->pids);
    PyMem_RawFree(c->scratch.buf);
    PyMem_RawFree(c->inbuf.buf);
    if (c->drain_lock)
        PyThread_free_lock(c->drain_lock);
    cp_shm_close(&c->shm);
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    tp->tp_free(c);
    Py_DECREF(tp);
}

static PyObject *core_get_fd(PoolCore *c, void *closure)
{
    return PyLong_FromLong(c->shm.fd);
}

static PyObject *core_get_wake_fd(PoolCore *c, void *closure)
{
    return PyLong_FromLong(c->wake_fd);
}

static PyObject *core_get_size(PoolCore *c, void *closure)
{
    return PyLong_FromSize_t(c->shm.size);
}

static PyObject *core_get_nworkers(PoolCore *c, void *closure)
{
    return PyLong_FromUnsignedLong(c->nworkers);
}

static PyObject *core_get_state(PoolCore *c, void *closure)
{
    return PyLong_FromLong(c->state);
}

static PyObject *core_get_njobs(PoolCore *c, void *closure)
{
    return PyLong_FromSsize_t(c->jobs ? PyDict_GET_SIZE(c->jobs) : 0);
}

/* The buffer heap: (fd, size, tag) for handing it to a spawned worker, or None. */
static PyObject *core_get_heap(PoolCore *c, void *closure)
{
    if (!c->heap)
        Py_RETURN_NONE;
    return Py_BuildValue("(iKI)", cp_bufheap_fd(c->heap),
                         (unsigned long long)cp_bufheap_size(c->heap), c->tag);
}

static PyObject *core_get_heap_used(PoolCore *c, void *closure)
{
    return PyLong_FromUnsignedLongLong(c->heap ? cp_bufheap_used(c->heap) : 0);
}

/* stats() -> dict of the time counters (ns): the pool's age, the parent's encoding and result
   taking, and per slot (chunks, run, decode, encode, wait); the bytes that went through each
   ring (kept whether or not stats are on). */
static PyObject *core_stats(PoolCore *c, PyObject *unused)
{
    PyObject *slots = PyList_New(c->nworkers);
    for (uint32_t w = 0; slots && w < c->nworkers; w++) {
        cp_tr_slot_t *s = cp_pool_slot(c->p, w);
        PyObject *t = Py_BuildValue("(KKKKK)", (unsigned long long)atomic_load(&s->st_chunks),
                                    (unsigned long long)atomic_load(&s->st_run_ns),
                                    (unsigned long long)atomic_load(&s->st_decode_ns),
                                    (unsigned long long)atomic_load(&s->st_encode_ns),
                                    (unsigned long long)atomic_load(&s->st_wait_ns));
        if (!t)
            Py_CLEAR(slots);
        else
            PyList_SET_ITEM(slots, w, t);
    }
    if (!slots)
        return NULL;
    return Py_BuildValue("{sLsLsLsNsisKsK}", "age_ns", (long long)(cp_now_ns() - c->created_ns),
                         "encode_ns", (long long)c->st_encode_ns, "decode_ns",
                         (long long)c->st_decode_ns, "slots", slots, "enabled", (int)c->p->stats,
                         "task_ring_bytes", (unsigned long long)atomic_load(&c->p->tasks.head),
                         "result_ring_bytes",
                         (unsigned long long)atomic_load(&c->p->results.head));
}

static PyObject *core_get_busy(PoolCore *c, void *closure)
{
    /* Slots of workers running a task (introspection and tests). */
    PyObject *l = PyList_New(0);
    for (uint32_t w = 0; l && w < c->nworkers; w++) {
        if (atomic_load(&cp_pool_slot(c->p, w)->busy)) {
            PyObject *v = PyLong_FromUnsignedLong(w);
            if (!v || PyList_Append(l, v) < 0)
                Py_CLEAR(l);
            Py_XDECREF(v);
        }
    }
    return l;
}

static PyGetSetDef core_getset[] = {
    {"fd", (getter)core_get_fd, NULL, "memfd of the shared segment", NULL},
    {"wake_fd", (getter)core_get_wake_fd, NULL, "eventfd that wakes the pool's handler", NULL},
    {"size", (getter)core_get_size, NULL, "size of the shared segment", NULL},
    {"nworkers", (getter)core_get_nworkers, NULL, "number of worker slots", NULL},
    {"state", (getter)core_get_state, NULL, "0 running, 1 closed, 2 terminated", NULL},
    {"busy", (getter)core_get_busy, NULL, "slots of workers running a task", NULL},
    {"njobs", (getter)core_get_njobs, NULL, "jobs whose results are still expected", NULL},
    {"heap", (getter)core_get_heap, NULL, "(fd, size, tag) of the buffer heap, or None", NULL},
    {"heap_used", (getter)core_get_heap_used, NULL, "bytes of the buffer heap in blocks", NULL},
    {NULL},
};

#define FASTM(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc}

static PyMethodDef core_methods[] = {
    FASTM("apply", core_apply, "apply(func, args, kwds, callback, error_callback, task_timeout) -> ApplyResult"),
    FASTM("map", core_map, "map(func, seq, chunksize, star, callback, error_callback, task_timeout) -> MapResult"),
    FASTM("imap", core_imap, "imap(func, it, chunksize, ordered, star, buffersize, task_timeout) -> iterator"),
    {"serve", (PyCFunction)core_serve, METH_O, "serve(timeout) -> indexes of exited workers"},
    FASTM("worker_lost", core_worker_lost, "worker_lost(index, exitcode): fail its task"),
    FASTM("set_worker", core_set_worker, "set_worker(index, pid, pidfd)"),
    {"close", (PyCFunction)core_close, METH_NOARGS, "no more tasks; workers leave when done"},
    {"terminate", (PyCFunction)core_terminate, METH_NOARGS, "workers leave now"},
    {"fail_all", (PyCFunction)core_fail_all, METH_O, "fail_all(exc): fail every job in flight"},
    {"idle", (PyCFunction)core_idle, METH_NOARGS, "whether no task is in flight"},
    {"stats", (PyCFunction)core_stats, METH_NOARGS, "stats() -> dict of time counters (ns)"},
    FASTM("worker_loop", core_worker_loop, "worker_loop(index, maxtasks, parent_pid)"),
    FASTM("_set_helpers", core_set_helpers, "_set_helpers(wrap_exc, encoding_error, classes...)"),
    {"_set_owner", (PyCFunction)core_set_owner, METH_O, "_set_owner(weakref to the Pool)"},
    {"_attach", (PyCFunction)(void (*)(void))core_attach, METH_FASTCALL | METH_CLASS,
     "_attach(fd, size, wake_fd, heap_fd, heap_size, tag) -> PoolCore of a worker"},
    {NULL},
};

static PyType_Slot core_slots[] = {
    {Py_tp_new, core_new},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_methods, core_methods},
    {Py_tp_getset, core_getset},
    {Py_tp_doc, "Shared-memory channels of a Pool: dispatch, result collection, worker loop."},
    {0, NULL},
};

static PyType_Spec core_spec = {
    .name = "cpool._core.PoolCore",
    .basicsize = sizeof(PoolCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = core_slots,
};

/* =========================== PoolJob type =========================== */

static PyObject *raise_not_ready_timeout(PoolJob *j)
{
    cp_state *st = cp_get_state(module_of((PyObject *)j->core));
    PyErr_SetNone(st->slot[CP_EXC_TIMEOUT_ERROR]);
    return NULL;
}

static PyObject *job_ready(PoolJob *j, PyObject *unused)
{
    if (!j->done && j->kind != JOB_IMAP && drain(j->core) < 0)
        return NULL;
    return PyBool_FromLong(j->done);
}

static PyObject *job_successful(PoolJob *j, PyObject *unused)
{
    if (!j->done && drain(j->core) < 0)
        return NULL;
    if (!j->done)
        return PyErr_Format(PyExc_ValueError, "%R not ready", (PyObject *)j);
    return PyBool_FromLong(j->success);
}

static int parse_timeout(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int64_t *deadline)
{
    PyObject *t = Py_None;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "takes at most one argument (timeout)");
        return -1;
    }
    if (nargs == 1)
        t = args[0];
    if (kwnames) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            if (nargs || !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, i)) ||
                PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), "timeout") != 0) {
                PyErr_SetString(PyExc_TypeError, "the only argument is timeout");
                return -1;
            }
            t = args[nargs + i];
        }
    }
    int err;
    *deadline = timeout_arg(t, &err);
    return err ? -1 : 0;
}

static PyObject *job_wait_m(PoolJob *j, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t deadline;
    if (parse_timeout(args, nargs, kwnames, &deadline) < 0)
        return NULL;
    if (job_wait(j, ready_done, deadline) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *job_get(PoolJob *j, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t deadline;
    if (!j->done) {
        if (parse_timeout(args, nargs, kwnames, &deadline) < 0)
            return NULL;
        int r = job_wait(j, ready_done, deadline);
        if (r < 0)
            return NULL;
        if (r > 0)
            return raise_not_ready_timeout(j);
    }
    if (j->success)
        return Py_NewRef(j->value);
    PyErr_SetObject((PyObject *)Py_TYPE(j->value), j->value);
    return NULL;
}

/* ---- imap iteration ---- */

static int imap_ready(PoolJob *j)
{
    if (j->ordered) {
        PyObject *key = PyLong_FromUnsignedLongLong(j->next_chunk);
        int r = key ? PyDict_Contains(j->store, key) : -1;
        Py_XDECREF(key);
        if (r != 0)
            return 1; /* an error counts as ready: the caller will see it */
    }
    else if (j->store_pos < PyList_GET_SIZE(j->store)) {
        return 1;
    }
    return (j->exhausted && j->nyielded >= j->nsent) || j->aborted;
}

static PyObject *imap_next(PoolJob *j, int64_t deadline)
{
    cp_state *st = cp_get_state(module_of((PyObject *)j->core));
    for (;;) {
        if (j->cur) {
            if (j->cur_pos < PyList_GET_SIZE(j->cur)) {
                PyObject *v = PyList_GET_ITEM(j->cur, j->cur_pos++);
                if (!j->cur_raises)
                    return Py_NewRef(v);
                PyErr_SetObject((PyObject *)Py_TYPE(v), v);
                return NULL;
            }
            Py_CLEAR(j->cur);
        }
        if (imap_topup(j, st) < 0)
            return NULL;
        PyObject *pair = NULL;
        if (j->ordered) {
            PyObject *key = PyLong_FromUnsignedLongLong(j->next_chunk);
            if (!key)
                return NULL;
            pair = PyDict_GetItemWithError(j->store, key);
            if (pair) {
                Py_INCREF(pair);
                if (PyDict_DelItem(j->store, key) < 0) {
                    Py_DECREF(key);
                    Py_DECREF(pair);
                    return NULL;
                }
                j->next_chunk++;
            }
            Py_DECREF(key);
            if (!pair && PyErr_Occurred())
                return NULL;
        }
        else if (j->store_pos < PyList_GET_SIZE(j->store)) {
            pair = Py_NewRef(PyList_GET_ITEM(j->store, j->store_pos));
            j->store_pos++;
            if (j->store_pos > 1024 && j->store_pos * 2 > PyList_GET_SIZE(j->store)) {
                /* drop what was read so memory stays bounded */
                if (PyList_SetSlice(j->store, 0, j->store_pos, NULL) < 0) {
                    Py_DECREF(pair);
                    return NULL;
                }
                j->store_pos = 0;
            }
        }
        if (pair) {
            j->nyielded++;
            PyObject *v = PyTuple_GET_ITEM(pair, 1), *flag = PyTuple_GET_ITEM(pair, 0);
            if (flag != Py_False) {
                j->cur = PyList_CheckExact(v) ? Py_NewRef(v) : PySequence_List(v);
                j->cur_pos = 0;
                j->cur_raises = flag == Py_None;
                Py_DECREF(pair);
                if (!j->cur)
                    return NULL;
                continue;
            }
            PyErr_SetObject((PyObject *)Py_TYPE(v), v);
            Py_DECREF(pair);
            return NULL;
        }
        if ((j->exhausted && j->nyielded >= j->nsent) || j->aborted) {
            if (j->iter_exc) {
                PyObject *e = j->iter_exc;
                j->iter_exc = NULL;
                cp_restore_exc(e);
                return NULL;
            }
            if (!j->done) {
                j->done = 1;
                j->complete = 1;
                unregister_job(j->core, j);
                Py_CLEAR(j->iter);
                Py_CLEAR(j->pool);
            }
            PyErr_SetNone(PyExc_StopIteration);
            return NULL;
        }
        int r = job_wait(j, imap_ready, deadline);
        if (r < 0)
            return NULL;
        if (r > 0)
            return raise_not_ready_timeout(j);
    }
}

static PyObject *job_iternext(PoolJob *j)
{
    if (j->kind != JOB_IMAP) {
        PyErr_SetString(PyExc_TypeError, "not an iterator");
        return NULL;
    }
    PyObject *r = imap_next(j, CP_NO_DEADLINE);
    if (!r && PyErr_ExceptionMatches(PyExc_StopIteration))
        PyErr_Clear(); /* tp_iternext: NULL without an error means the end */
    return r;
}

static PyObject *job_next_m(PoolJob *j, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (j->kind != JOB_IMAP) {
        PyErr_SetString(PyExc_TypeError, "not an iterator");
        return NULL;
    }
    int64_t deadline;
    if (parse_timeout(args, nargs, kwnames, &deadline) < 0)
        return NULL;
    return imap_next(j, deadline);
}

static PyObject *job_iter(PyObject *self)
{
    return Py_NewRef(self);
}

static PyObject *job_get_id(PoolJob *j, void *closure)
{
    return PyLong_FromUnsignedLongLong(j->id);
}

static int job_traverse(PoolJob *j, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(j));
    Py_VISIT(j->core);
    Py_VISIT(j->value);
    Py_VISIT(j->callback);
    Py_VISIT(j->error_callback);
    Py_VISIT(j->pool);
    Py_VISIT(j->func);
    Py_VISIT(j->func_bytes);
    Py_VISIT(j->iter);
    Py_VISIT(j->iter_exc);
    Py_VISIT(j->store);
    Py_VISIT(j->cur);
    return 0;
}

static int job_clear(PoolJob *j)
{
    if (j->core) {
        if (j->has_cb) {
            j->has_cb = 0;
            j->core->ncallbacks--; /* dropped before it ran (it never reached a worker) */
        }
        if (j->registered) {
            /* an imap iterator dropped before its end: its late results will be dropped */
            PyObject *exc = cp_fetch_exc(); /* PyErr_Fetch is deprecated since 3.12 */
            unregister_job(j->core, j);
            if (exc)
                cp_restore_exc(exc);
        }
    }
    Py_CLEAR(j->core);
    Py_CLEAR(j->value);
    Py_CLEAR(j->callback);
    Py_CLEAR(j->error_callback);
    Py_CLEAR(j->pool);
    Py_CLEAR(j->func);
    Py_CLEAR(j->func_bytes);
    Py_CLEAR(j->iter);
    Py_CLEAR(j->iter_exc);
    Py_CLEAR(j->store);
    Py_CLEAR(j->cur);
    return 0;
}

static void job_dealloc(PoolJob *j)
{
    PyTypeObject *tp = Py_TYPE(j);
    PyObject_GC_UnTrack(j);

    job_clear(j);
    tp->tp_free(j);
    Py_DECREF(tp);
}

#define FASTKW(name, fn, doc) \
    {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef job_methods[] = {
    {"ready", (PyCFunction)job_ready, METH_NOARGS, "Whether the result has arrived."},
    {"successful", (PyCFunction)job_successful, METH_NOARGS,
     "Whether the call completed without raising; ValueError if not ready."},
    FASTKW("wait", job_wait_m, "wait(timeout=None): until the result is ready or timeout"),
    FASTKW("get", job_get, "get(timeout=None): the result, or raise the task's exception"),
    FASTKW("next", job_next_m, "next(timeout=None): the next result of an imap"),
    {NULL},
};

static PyGetSetDef job_getset[] = {
    {"_job", (getter)job_get_id, NULL, "job id", NULL},
    {NULL},
};

static PyType_Slot job_slots[] = {
    {Py_tp_dealloc, job_dealloc},
    {Py_tp_traverse, job_traverse},
    {Py_tp_clear, job_clear},
    {Py_tp_methods, job_methods},
    {Py_tp_getset, job_getset},
    {Py_tp_iter, job_iter},
    {Py_tp_iternext, job_iternext},
    {Py_tp_doc, "A pool job: AsyncResult, MapResult and the imap iterators build on it."},
    {0, NULL},
};

static PyType_Spec job_spec = {
    .name = "cpool._core.PoolJob",
    .basicsize = sizeof(PoolJob),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .slots = job_slots,
};

int cp_exec_pool(PyObject *module)
{
    static int atfork_done;
    if (!atfork_done) {
        int r = pthread_atfork(NULL, NULL, bump_fork_generation);
        if (r) {
            cp_err_errno(-r, "pthread_atfork");
            return -1;
        }
        atfork_done = 1;
    }
    if (cp_add_type(module, CP_TYPE_POOL, &core_spec, NULL) < 0)
        return -1;
    return cp_add_type(module, CP_TYPE_POOLJOB, &job_spec, NULL);
}
