/* The parent's side of a pool that takes results: the ring is drained by whoever waits (or the
   background collector in serve()), results are reassembled per worker and stored in their jobs,
   callbacks run after the drain lock is released. A worker that died or overran its timeout
   fails the chunk it was running; chunks of the same message it never started are sent again.
   Closing, terminating and failing every job in flight end here too. */
#include "pool_private.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "spawn.h"

#define WAITER_SPIN_NS 100000     /* a parent waiting for a result it needs now spins this long */
#define EAGER_SLICE_NS 50000000   /* sleeps are cut in slices so Ctrl-C and deaths are seen */
#define PENDING_SLICE_NS 1000000  /* tasks wait outside the ring: feed them this often */

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
int job_set_chunk(PoolJob *j, uint64_t idx, int ok, PyObject *value, PyObject **finished)
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

/* Run callbacks of jobs that just completed, then make them ready (after_drain wakes the
   other waiters). */
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

/* Take drain_lock, waiting for it if another thread drains (the GIL released meanwhile). */
static void lock_drain(PoolCore *c)
{
    if (!PyThread_acquire_lock(c->drain_lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(c->drain_lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
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
int drain(PoolCore *c)
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

/* Wait until ready(j) or the deadline: 0 ready, 1 timed out, -1 error (Ctrl-C...). */
int job_wait(PoolJob *j, ready_fn ready, int64_t deadline)
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
    PyObject *msg;
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
        msg = how ? PyUnicode_FromFormat("worker %u (pid %d) terminated abruptly with exit "
                                         "code %d (%S) while running the task", w,
                                         (int)c->pids[w], exitcode, how)
                  : PyUnicode_FromFormat("worker %u (pid %d) terminated abruptly with exit "
                                         "code %d while running the task", w, (int)c->pids[w],
                                         exitcode);
        Py_XDECREF(how);
    }
    else {
        PyObject *secs = PyFloat_FromDouble((double)timeout_ns / 1e9);
        msg = secs ? PyUnicode_FromFormat("task exceeded its timeout of %S s; its worker was "
                                          "killed and replaced", secs) : NULL;
        Py_XDECREF(secs);
    }
    if (msg) {
        PyObject *a = PyTuple_Pack(1, msg);
        if (a)
            PyObject_SetAttrString(exc, "args", a);
        Py_XDECREF(a);
        Py_DECREF(msg);
    }
    PyErr_Clear(); /* the error keeps its first message if the detailed one failed */
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
PyObject *core_worker_lost(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
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
    lock_drain(c);
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
PyObject *core_set_worker(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
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
PyObject *core_serve(PoolCore *c, PyObject *arg)
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

PyObject *core_close(PoolCore *c, PyObject *unused)
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
PyObject *core_terminate(PoolCore *c, PyObject *unused)
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
PyObject *core_fail_all(PoolCore *c, PyObject *exc)
{
    if (foreign(c))
        Py_RETURN_NONE;
    lock_drain(c);
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
PyObject *core_idle(PoolCore *c, PyObject *unused)
{
    return PyBool_FromLong(c->outstanding <= 0 && !c->pend_head);
}
