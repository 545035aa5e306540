/* The loop that runs in a pool's worker process: take the next task under the ring's robust
   lock (no syscall while tasks keep coming; a short spin, then a futex sleep), run its chunks,
   and hand each result back on its own, so a worker that dies mid-message loses one chunk only.
   A dead parent is noticed through a pidfd and ends the loop. */
#include "pool_private.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "spawn.h"

#define WORKER_SPIN_NS 100000     /* a worker spins this long for the next task before sleeping */
#define WORKER_SLICE_NS 100000000
#define PARENT_CHECK_NS 1000000   /* a worker looks for a dead parent this often at most */
#define RETURN_AFTER_NS 1000000   /* a batched chunk this slow: give the rest back if others idle */

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

/* Lock the many side of a ring, the GIL released while blocked (an abandoned lock is taken
   over). 0, or -1 with an exception. */
static int lock_ring(cp_tr_t *r)
{
    int lk;
    Py_BEGIN_ALLOW_THREADS
    lk = cp_tr_lock(r);
    Py_END_ALLOW_THREADS
    if (lk < 0) {
        cp_err_errno(lk, "pthread_mutex_lock");
        return -1;
    }
    return 0;
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
        if (lock_ring(r) < 0)
            return -1;
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
    if (lock_ring(r) < 0)
        return -1;
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
PyObject *core_worker_loop(PoolCore *c, PyObject *const *args, Py_ssize_t nargs)
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
    PyObject *chunks = NULL, *setup_err = NULL; /* of the task being run */
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
        chunks = func ? decode(c, st, ab, h.args_len, h.flags) : NULL;
        stat_add(stats, &slot->st_decode_ns, &mark);
        if (chunks && (!PyTuple_Check(chunks) || PyTuple_GET_SIZE(chunks) != h.nchunks)) {
            Py_CLEAR(chunks);
            PyErr_SetString(PyExc_RuntimeError, "malformed task");
        }
        /* The function or the arguments cannot be unpickled here: every chunk fails with it. */
        setup_err = chunks ? NULL : wrapped_exc(c);
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
            if (e)
                goto done;
            uint32_t status = (all_ok ? CP_RES_OK : CP_RES_ERR) |
                              (i + 1 == h.nchunks ? CP_RES_LAST : 0) |
                              (h.nchunks > 1 ? CP_RES_BATCH : 0);
            cp_res_hdr_t rh = {h.job_id, h.task_seq, h.first_chunk + i, 1, status, enc};
            memcpy(out.buf, &rh, sizeof rh);
            /* The result's blocks are the parent's from here: were this worker to die before
               publishing, they would leak rather than be freed under the parent's feet. */
            cp_payload_hand_over(c->heap, out.buf + sizeof rh, out.len - sizeof rh, enc,
                                 CP_HEAP_PARENT);
            if (worker_publish(c, (uint32_t)w, &out, &pw) < 0)
                goto done;
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
                    worker_publish(c, (uint32_t)w, &out, &pw) < 0)
                    goto done;
                ran = i + 1;
                break;
            }
        }
        Py_CLEAR(chunks);
        Py_CLEAR(setup_err);
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
    Py_XDECREF(chunks);
    Py_XDECREF(setup_err);
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
