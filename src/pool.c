/* Pool bindings: the types PoolCore (the parent's dispatch and result collection, and the
   workers' loop) and PoolJob (base of AsyncResult, MapResult and the imap iterators), over
   core/taskring. Here: construction, attributes, method tables and the module glue; the
   methods that send tasks are in pool_submit.c, those that collect results and handle dead
   workers in pool_collect.c, the worker loop in pool_worker.c (shared parts: pool_private.h).

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
#include "pool_private.h"

#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

uint64_t fork_generation;

static void bump_fork_generation(void)
{
    fork_generation++;
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

static int ready_done(PoolJob *j)
{
    return j->done;
}

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
