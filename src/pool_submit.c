/* The parent's side of a pool that sends work: apply, map and imap build task messages (the
   arguments encoded straight into them) and put them into the task ring, or on a pending list
   when the ring is full (apply_async never blocks); messages of several chunks are kept until
   answered, so what a dead worker never started can be sent again. */
#include "pool_private.h"

#include <string.h>

#define MAX_BATCH_ITEMS 64        /* items per task message at most, when chunks are batched */

int64_t duration_ns(PyObject *o, int *err)
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

void flush_pending(PoolCore *c)
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
int build_task(PoolCore *c, cp_state *st, PoolJob *job, int kind, uint32_t first,
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
   freed, and its late results are dropped.
   While the table holds an apply or map job, the job cannot be garbage (the handler thread
   holds the core, the core the table), so the cyclic GC is spared walking it: it is untracked
   until it leaves the table. */
static int register_job(PoolCore *c, PoolJob *j)
{
    PyObject *key = PyLong_FromUnsignedLongLong(j->id);
    if (!key)
        return -1;
    PyObject *v = j->kind == JOB_IMAP ? PyCapsule_New(j, NULL, NULL) : Py_NewRef(j);
    int r = v ? PyDict_SetItem(c->jobs, key, v) : -1;
    Py_XDECREF(v);
    Py_DECREF(key);
    if (r == 0) {
        j->registered = 1;
        if (j->kind != JOB_IMAP)
            PyObject_GC_UnTrack(j);
    }
    return r;
}

PoolJob *job_of_entry(PyObject *v)
{
    return PyCapsule_CheckExact(v) ? (PoolJob *)PyCapsule_GetPointer(v, NULL) : (PoolJob *)v;
}

void unregister_job(PoolCore *c, PoolJob *j)
{
    if (!j->registered)
        return;
    j->registered = 0;
    if (j->kind != JOB_IMAP && !PyObject_GC_IsTracked((PyObject *)j))
        PyObject_GC_Track(j); /* before the table's reference goes: it may be the last */
    PyObject *key = PyLong_FromUnsignedLongLong(j->id);
    if (!key || PyDict_DelItem(c->jobs, key) < 0)
        PyErr_Clear();
    Py_XDECREF(key);
}

/* apply(func, args, kwds, callback, error_callback, task_timeout) -> ApplyResult */
PyObject *core_apply(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
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
    if (build_task(c, st, j, kind, 0, 1, fb, chunk) < 0)
        goto fail;
    Py_DECREF(fb);
    Py_DECREF(chunk);
    return (PyObject *)j;
fail:
    if (j)
        unregister_job(c, j);
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
PyObject *core_map(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
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
            goto fail;
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
                goto fail;
            PyList_SET_ITEM(batch, (Py_ssize_t)k, t);
        }
        if (send_chunks(c, st, j, (uint32_t)first, batch) < 0)
            goto fail;
        Py_CLEAR(batch);
    }
    Py_DECREF(seq);
    return (PyObject *)j;
fail:
    /* Chunks already sent run, their results are dropped: the caller gets the error. */
    if (j)
        unregister_job(c, j);
    Py_XDECREF(batch);
    Py_XDECREF(j);
    Py_DECREF(seq);
    return NULL;
}

/* Pull chunks from an imap's input until its window is full; an input that raises ends the
   input there (the error is raised by next() in its place). */
int imap_topup(PoolJob *j, cp_state *st)
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
PyObject *core_imap(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
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
    if (imap_topup(j, st) < 0)
        goto fail;
    return (PyObject *)j;
fail:
    unregister_job(c, j);
    Py_DECREF(j);
    return NULL;
}
