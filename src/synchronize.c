/* Bindings of the shared-memory arena: SemLock (Lock, RLock, Semaphore), Event, CondWaiters
   (a Condition's sleepers) and SharedBlock (the memory behind Value/Array), each one handle on
   an arena slot. */
#include "module.h"

#include <errno.h>
#include <stdlib.h>

#include "arena.h"
#include "condvar.h"
#include "deadline.h"
#include "semlock.h"

/* Blocked waiters come back this often to run signal handlers (a signal that lands between the
   spin and the futex sleep does not interrupt the sleep) and to look for a dead lock owner. */
#define TICK_NS (80 * 1000 * 1000)

/* ---- the part every handle shares ---- */

typedef struct {
    PyObject_HEAD
    cp_ref_t ref;
} HandleObject;

static int handle_alloc(HandleObject *self, size_t size)
{
    cp_arena_lock();
    int r = cp_arena_alloc(size, &self->ref);
    cp_arena_unlock();
    if (r < 0) {
        self->ref.chunk = NULL;
        cp_err_errno(r, "memfd_create");
        return -1;
    }
    return 0;
}

static void handle_dealloc(PyObject *op)
{
    HandleObject *self = (HandleObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (self->ref.chunk) {
        cp_arena_lock();
        cp_arena_release(&self->ref);
        cp_arena_unlock();
    }
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* _export() -> (fd, slot): for pickling to a child being spawned. The child's reference is
   taken now, before this process could drop its own and let the slot be reused. */
static PyObject *handle_export(PyObject *op, PyObject *unused)
{
    HandleObject *self = (HandleObject *)op;
    cp_arena_lock();
    int fd = cp_arena_export(&self->ref);
    cp_arena_unlock();
    return Py_BuildValue("(iI)", fd, self->ref.slot);
}

/* _unexport(): give back the reference of an _export() whose child will never adopt it. */
static PyObject *handle_unexport(PyObject *op, PyObject *unused)
{
    HandleObject *self = (HandleObject *)op;
    cp_arena_lock();
    cp_arena_unexport(&self->ref);
    cp_arena_unlock();
    Py_RETURN_NONE;
}

/* A new object of type cls on the chunk behind fd (consumed), adopting the reference the
   parent took for slot: the common part of every _attach(fd, slot, ...). */
static HandleObject *handle_attach(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "_attach(fd, slot, ...)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    unsigned long slot = PyLong_AsUnsignedLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    PyTypeObject *type = (PyTypeObject *)cls;
    HandleObject *self = (HandleObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    cp_arena_lock();
    int r = cp_arena_attach((int)fd, (uint32_t)slot, &self->ref);
    cp_arena_unlock();
    if (r < 0) {
        self->ref.chunk = NULL;
        Py_DECREF(self);
        return (HandleObject *)cp_err_errno(r, "attach");
    }
    return self;
}

/* Wait loop shared by locks and events: calls step(obj, until, first) with the GIL released,
   in steps of at most TICK_NS, checking signals between steps; only the first step spins.
   step returns 1 done, -ETIMEDOUT or -EINTR. Returns 1 done, 0 deadline passed, -1 exception. */
typedef int (*wait_step_fn)(void *obj, int64_t until, int first);

static int wait_loop_ticks(wait_step_fn step, void *obj, int64_t deadline, int64_t tick_ns)
{
    /* Only a wait that may last spins: a poll (timeout 0 or negative) looks once. */
    for (int first = deadline > cp_now_ns();; first = 0) {
        int64_t tick = cp_now_ns() + tick_ns;
        int64_t until = deadline < tick ? deadline : tick;
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = step(obj, until, first);
        Py_END_ALLOW_THREADS
        if (r == 1)
            return 1;
        if (r == -ETIMEDOUT && until == deadline)
            return 0;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static int wait_loop(wait_step_fn step, void *obj, int64_t deadline)
{
    return wait_loop_ticks(step, obj, deadline, TICK_NS);
}

/* timeout (None or absent: for ever) -> absolute deadline. */
static int timeout_deadline(PyObject *timeout, int64_t *deadline)
{
    if (!timeout || timeout == Py_None) {
        *deadline = CP_NO_DEADLINE;
        return 0;
    }
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    *deadline = cp_deadline_after(t);
    return 0;
}

/* Parse (block=True, timeout=None) -> *deadline: CP_NO_DEADLINE for none, 0 for "don't wait". */
static int parse_block_timeout(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                               const char *first, int64_t *deadline)
{
    PyObject *block = nargs > 0 ? args[0] : NULL;
    PyObject *timeout = nargs > 1 ? args[1] : NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "expected at most 2 arguments, got %zd", nargs);
        return -1;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        PyObject **dst;
        if (first && PyUnicode_CompareWithASCIIString(key, first) == 0)
            dst = &block;
        else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0)
            dst = &timeout;
        else {
            PyErr_Format(PyExc_TypeError, "unexpected keyword argument %R", key);
            return -1;
        }
        if (*dst) {
            PyErr_Format(PyExc_TypeError, "argument %R given twice", key);
            return -1;
        }
        *dst = args[nargs + i];
    }
    if (block) {
        int b = PyObject_IsTrue(block);
        if (b < 0)
            return -1;
        if (!b) {
            *deadline = 0; /* non-blocking: the timeout is ignored, as in the standard library */
            return 0;
        }
    }
    return timeout_deadline(timeout, deadline);
}

/* ---- SemLock ---- */

typedef struct {
    HandleObject h;
    cp_sem_t *sem;
    int kind;
    /* Held by this process: how many times, by which thread. Both belong to the process that
       set them (count_pid): a forked child, which has a copy of the object, holds nothing. */
    unsigned long last_tid;
    long count;
    uint32_t count_pid;
    cp_spin_t spin;
} SemLockObject;

#define SEM(op) ((SemLockObject *)(op))
static inline long sem_count(SemLockObject *o)
{
    return o->count_pid == cp_sem_self() ? o->count : 0;
}

#define ISMINE(o) (sem_count(o) > 0 && PyThread_get_thread_ident() == (o)->last_tid)

static int semlock_check(SemLockObject *self)
{
    cp_sem_t *s = self->h.ref.addr;
    if (s->magic != CP_SEM_MAGIC || s->kind > CP_SEM_MUTEX) {
        PyErr_SetString(PyExc_ValueError, "not a SemLock in shared memory");
        return -1;
    }
    self->sem = s;
    self->kind = (int)s->kind;
    self->spin.ns = CP_SPIN_INIT;
    return 0;
}

static PyObject *semlock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "value", "maxvalue", NULL};
    int kind;
    long long value, maxvalue;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLL:SemLock", kwlist, &kind, &value, &maxvalue))
        return NULL;
    if (kind != CP_SEM_RECURSIVE && kind != CP_SEM_SEMAPHORE && kind != CP_SEM_MUTEX) {
        PyErr_SetString(PyExc_ValueError, "unrecognized kind");
        return NULL;
    }
    /* The standard library's errors: sem_open's EINVAL, C int overflow. */
    if (value < 0) {
        errno = EINVAL;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (value > CP_SEM_VALUE_MAX || maxvalue > CP_SEM_VALUE_MAX) {
        PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to C int");
        return NULL;
    }
    if (maxvalue < 0 || value > maxvalue ||
        (kind != CP_SEM_SEMAPHORE && maxvalue != 1)) {
        PyErr_SetString(PyExc_ValueError, "invalid maxvalue");
        return NULL;
    }
    SemLockObject *self = (SemLockObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (handle_alloc(&self->h, sizeof(cp_sem_t)) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->sem = self->h.ref.addr;
    self->kind = kind;
    self->spin.ns = CP_SPIN_INIT;
    cp_sem_init(self->sem, kind, (uint32_t)value, (uint32_t)maxvalue);
    return (PyObject *)self;
}

static PyObject *semlock_attach(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    SemLockObject *self = (SemLockObject *)handle_attach(cls, args, nargs);
    if (self && semlock_check(self) < 0)
        Py_CLEAR(self);
    return (PyObject *)self;
}

typedef struct {
    SemLockObject *self;
    uint32_t dead;  /* set when the lock was taken over from this dead process */
    uint64_t dead_start;
} sem_wait_arg;

static int sem_wait_step(void *obj, int64_t until, int first)
{
    sem_wait_arg *a = obj;
    cp_sem_t *s = a->self->sem;
    int r = cp_sem_wait(s, until, first ? &a->self->spin : NULL);
    if (r == 0)
        return 1;
    if (r == -ETIMEDOUT && s->kind != CP_SEM_SEMAPHORE && (a->dead = cp_mutex_take_from_dead(s, &a->dead_start)))
        return 1;
    return r;
}

static int warn_owner_died(SemLockObject *self, uint32_t dead)
{
    cp_state *st = cp_state_from_type(Py_TYPE(self));
    if (!st)
        return -1;
    return PyErr_WarnFormat(st->slot[CP_WARN_OWNER_DIED], 1,
                            "the process that held this %s died (pid %u); the lock passes to "
                            "pid %u, and what it protected may be inconsistent",
                            self->kind == CP_SEM_RECURSIVE ? "RLock" : "Lock", dead,
                            cp_sem_self());
}

static PyObject *semlock_acquire(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    SemLockObject *self = SEM(op);
    int64_t deadline = CP_NO_DEADLINE;
    if ((nargs || kwnames) && parse_block_timeout(args, nargs, kwnames, "block", &deadline) < 0)
        return NULL;
    if (self->kind == CP_SEM_RECURSIVE && ISMINE(self)) {
        self->count++;
        Py_RETURN_TRUE;
    }
    if (cp_sem_trywait(self->sem) == 0)
        goto taken;
    if (deadline == 0)
        Py_RETURN_FALSE;
    sem_wait_arg a = {self, 0, 0};
    int r = wait_loop(sem_wait_step, &a, deadline);
    if (r <= 0)
        return r < 0 ? NULL : Py_NewRef(Py_False);
    if (a.dead && warn_owner_died(self, a.dead) < 0) {
        /* The warning became an error: the lock is left as it was, the dead process's, so the
           next acquirer learns it too. */
        cp_mutex_give_back(self->sem, a.dead, a.dead_start);
        return NULL;
    }
taken:
    self->count = sem_count(self) + 1;
    self->count_pid = cp_sem_self();
    self->last_tid = PyThread_get_thread_ident();
    Py_RETURN_TRUE;
}

static PyObject *semlock_release(PyObject *op, PyObject *unused)
{
    SemLockObject *self = SEM(op);
    if (self->kind == CP_SEM_RECURSIVE) {
        if (!ISMINE(self)) {
            PyErr_SetString(PyExc_AssertionError,
                            "attempt to release recursive lock not owned by thread");
            return NULL;
        }
        if (self->count > 1) {
            self->count--;
            Py_RETURN_NONE;
        }
    }
    if (cp_sem_post(self->sem) < 0) {
        PyErr_SetString(PyExc_ValueError, "semaphore or lock released too many times");
        return NULL;
    }
    if (sem_count(self) > 0)
        self->count--;
    Py_RETURN_NONE;
}

static PyObject *semlock_enter(PyObject *op, PyObject *unused)
{
    return semlock_acquire(op, NULL, 0, NULL);
}

static PyObject *semlock_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    return semlock_release(op, NULL);
}

static PyObject *semlock_count(PyObject *op, PyObject *unused)
{
    return PyLong_FromLong(sem_count(SEM(op)));
}

static PyObject *semlock_is_mine(PyObject *op, PyObject *unused)
{
    return PyBool_FromLong(ISMINE(SEM(op)));
}

static PyObject *semlock_get_value(PyObject *op, PyObject *unused)
{
    return PyLong_FromUnsignedLong(cp_sem_value(SEM(op)->sem));
}

static PyObject *semlock_is_zero(PyObject *op, PyObject *unused)
{
    return PyBool_FromLong(cp_sem_value(SEM(op)->sem) == 0);
}

static PyObject *semlock_after_fork(PyObject *op, PyObject *unused)
{
    SEM(op)->count = 0;
    Py_RETURN_NONE;
}

static PyObject *semlock_get_kind(PyObject *op, void *closure)
{
    return PyLong_FromLong(SEM(op)->kind);
}

static PyObject *semlock_get_maxvalue(PyObject *op, void *closure)
{
    return PyLong_FromUnsignedLong(SEM(op)->sem->maxvalue);
}

static PyObject *semlock_get_owner_pid(PyObject *op, void *closure)
{
    SemLockObject *self = SEM(op);
    if (self->kind == CP_SEM_SEMAPHORE)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(atomic_load(&self->sem->word));
}

static PyObject *semlock_get_owner_start(PyObject *op, void *closure)
{
    return PyLong_FromUnsignedLongLong(atomic_load(&SEM(op)->sem->owner_start));
}

static PyMethodDef semlock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))semlock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(block=True, timeout=None) -> bool: False when the timeout passed."},
    {"release", semlock_release, METH_NOARGS, "Release once."},
    {"__enter__", semlock_enter, METH_NOARGS, "Acquire, blocking."},
    {"__exit__", (PyCFunction)(void (*)(void))semlock_exit, METH_FASTCALL, "Release."},
    {"_count", semlock_count, METH_NOARGS, "Acquisitions held by this process."},
    {"_is_mine", semlock_is_mine, METH_NOARGS, "Held by the calling thread."},
    {"_get_value", semlock_get_value, METH_NOARGS, "Semaphore value (a lock: 1 when free)."},
    {"_is_zero", semlock_is_zero, METH_NOARGS, "Value is 0."},
    {"_after_fork", semlock_after_fork, METH_NOARGS, "Forget this process's holdings (a child)."},
    {"_export", handle_export, METH_NOARGS, "(fd, slot) for a child being spawned."},
    {"_unexport", handle_unexport, METH_NOARGS, "Undo an _export() never delivered."},
    {"_attach", (PyCFunction)(void (*)(void))semlock_attach, METH_FASTCALL | METH_CLASS,
     "_attach(fd, slot): the SemLock exported by the parent."},
    {NULL},
};

static PyGetSetDef semlock_getset[] = {
    {"kind", semlock_get_kind, NULL, "RECURSIVE_MUTEX 0, SEMAPHORE 1, cpool's Lock 2."},
    {"maxvalue", semlock_get_maxvalue, NULL, "Largest value."},
    {"_owner_pid", semlock_get_owner_pid, NULL, "pid holding the lock, 0 when free."},
    {"_owner_start", semlock_get_owner_start, NULL,
     "Start time of the holder (/proc/PID/stat field 22), 0 when free or not yet known."},
    {NULL},
};

static PyType_Slot semlock_slots[] = {
    {Py_tp_new, semlock_new},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_methods, semlock_methods},
    {Py_tp_getset, semlock_getset},
    {Py_tp_doc, "SemLock(kind, value, maxvalue): a lock or semaphore in shared memory."},
    {0, NULL},
};

static PyType_Spec semlock_spec = {
    .name = "cpool._core.SemLock",
    .basicsize = sizeof(SemLockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = semlock_slots,
};

/* ---- Event ---- */

typedef struct {
    HandleObject h;
    cp_sem_t *sem;
    cp_spin_t spin;
} EventObject;

#define EV(op) ((EventObject *)(op))

static PyObject *event_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Event() takes no arguments");
        return NULL;
    }
    EventObject *self = (EventObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (handle_alloc(&self->h, sizeof(cp_sem_t)) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->sem = self->h.ref.addr;
    self->spin.ns = CP_SPIN_INIT;
    cp_sem_init(self->sem, CP_SEM_EVENT, 0, 1);
    return (PyObject *)self;
}

static PyObject *event_attach(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    EventObject *self = (EventObject *)handle_attach(cls, args, nargs);
    if (!self)
        return NULL;
    self->sem = self->h.ref.addr;
    self->spin.ns = CP_SPIN_INIT;
    if (self->sem->magic != CP_SEM_MAGIC || self->sem->kind != CP_SEM_EVENT) {
        PyErr_SetString(PyExc_ValueError, "not an Event in shared memory");
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *event_set(PyObject *op, PyObject *unused)
{
    cp_event_set(EV(op)->sem);
    Py_RETURN_NONE;
}

static PyObject *event_clear(PyObject *op, PyObject *unused)
{
    cp_event_clear(EV(op)->sem);
    Py_RETURN_NONE;
}

static PyObject *event_is_set(PyObject *op, PyObject *unused)
{
    return PyBool_FromLong(cp_event_is_set(EV(op)->sem));
}

typedef struct {
    EventObject *ev;
    uint32_t start;
} event_wait_arg;

static int event_wait_step(void *obj, int64_t until, int first)
{
    event_wait_arg *a = obj;
    return cp_event_wait(a->ev->sem, a->start, until, first ? &a->ev->spin : NULL);
}

static PyObject *event_wait(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    EventObject *self = EV(op);
    event_wait_arg a = {self, atomic_load(&self->sem->word)};
    if (a.start & 1)
        Py_RETURN_TRUE;
    /* wait(timeout=None): one optional argument, by position or keyword */
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1 ||
        (nkw && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0)) {
        PyErr_SetString(PyExc_TypeError, "wait() takes one optional argument: timeout");
        return NULL;
    }
    int64_t deadline;
    if (timeout_deadline(nargs + nkw ? args[0] : NULL, &deadline) < 0)
        return NULL;
    int r = wait_loop(event_wait_step, &a, deadline);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r == 1 || cp_event_is_set(self->sem));
}

static PyMethodDef event_methods[] = {
    {"set", event_set, METH_NOARGS, "Set the flag and wake every waiter."},
    {"clear", event_clear, METH_NOARGS, "Reset the flag."},
    {"is_set", event_is_set, METH_NOARGS, "The flag."},
    {"wait", (PyCFunction)(void (*)(void))event_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(timeout=None) -> bool: True once the flag is (or was, while waiting) set."},
    {"_export", handle_export, METH_NOARGS, "(fd, slot) for a child being spawned."},
    {"_unexport", handle_unexport, METH_NOARGS, "Undo an _export() never delivered."},
    {"_attach", (PyCFunction)(void (*)(void))event_attach, METH_FASTCALL | METH_CLASS,
     "_attach(fd, slot): the Event exported by the parent."},
    {NULL},
};

static PyType_Slot event_slots[] = {
    {Py_tp_new, event_new},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_methods, event_methods},
    {Py_tp_doc, "Event(): a flag in shared memory that processes can wait for."},
    {0, NULL},
};

static PyType_Spec event_spec = {
    .name = "cpool._core.Event",
    .basicsize = sizeof(EventObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = event_slots,
};

/* ---- CondWaiters: a Condition's sleepers ---- */

/* A sleeper watching for dead co-sleepers (a Barrier's party) wakes this often, and the one
   that looks (one per interval among all) reports a death within about 100 ms of it. */
#define WATCH_TICK_NS (30 * 1000 * 1000)

typedef struct {
    HandleObject h;
    cp_cond_t *cond;
} CondObject;

#define COND(op) (((CondObject *)(op))->cond)

static PyObject *cond_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "CondWaiters() takes no arguments");
        return NULL;
    }
    CondObject *self = (CondObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (handle_alloc(&self->h, sizeof(cp_cond_t)) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->cond = self->h.ref.addr;
    cp_cond_init(self->cond);
    return (PyObject *)self;
}

static PyObject *cond_attach(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    CondObject *self = (CondObject *)handle_attach(cls, args, nargs);
    if (!self)
        return NULL;
    self->cond = self->h.ref.addr;
    if (self->cond->magic != CP_COND_MAGIC || self->cond->nslots != CP_COND_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "not a CondWaiters in shared memory");
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *cond_enlist(PyObject *op, PyObject *unused)
{
    int i = cp_cond_enlist(COND(op));
    if (i < 0)
        return PyErr_Format(PyExc_RuntimeError,
                            "more than %d threads or processes wait on one Condition",
                            CP_COND_SLOTS);
    return PyLong_FromLong(i);
}

typedef struct {
    cp_cond_t *cond;
    int slot, watch, dead;
} cond_sleep_arg;

static int cond_sleep_step(void *obj, int64_t until, int first)
{
    cond_sleep_arg *a = obj;
    int r = cp_cond_sleep(a->cond, a->slot, until);
    if (r == -ETIMEDOUT && a->watch && cp_cond_dead_sleepers(a->cond, WATCH_TICK_NS) > 0) {
        a->dead = 1;
        return 1;
    }
    return r;
}

/* _sleep(slot, timeout, watch) -> 1 woken, 0 timed out, 2 (watch only) another sleeper died.
   The slot is free again when this returns or raises. */
static PyObject *cond_sleep(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_sleep(slot, timeout, watch)");
        return NULL;
    }
    long slot = PyLong_AsLong(args[0]);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= CP_COND_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "slot out of range");
        return NULL;
    }
    int watch = PyObject_IsTrue(args[2]);
    int64_t deadline;
    if (watch < 0 || timeout_deadline(args[1], &deadline) < 0)
        return NULL;
    cond_sleep_arg a = {COND(op), (int)slot, watch, 0};
    int r = wait_loop_ticks(cond_sleep_step, &a, deadline, watch ? WATCH_TICK_NS : TICK_NS);
    if (r == 1 && !a.dead)
        return PyLong_FromLong(1);
    /* Timed out, interrupted or a death seen: leave, unless a notify came first. */
    int woken = cp_cond_leave(a.cond, a.slot);
    if (r < 0)
        return NULL; /* the interrupt wins, as in threading.Condition: a wake-up is lost */
    return PyLong_FromLong(woken ? 1 : a.dead ? 2 : 0);
}

static PyObject *cond_notify(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_notify(n, reclaim)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    int reclaim = PyObject_IsTrue(args[1]);
    if ((n == -1 && PyErr_Occurred()) || reclaim < 0)
        return NULL;
    if (n <= 0)
        return PyLong_FromLong(0);
    uint32_t want = n > CP_COND_SLOTS ? CP_COND_SLOTS : (uint32_t)n;
    return PyLong_FromLong(cp_cond_notify(COND(op), want, reclaim));
}

static PyObject *cond_reap(PyObject *op, PyObject *unused)
{
    return PyLong_FromLong(cp_cond_reap(COND(op)));
}

static PyObject *cond_sleeping(PyObject *op, PyObject *unused)
{
    return PyLong_FromLong(cp_cond_sleeping(COND(op)));
}

static PyMethodDef cond_methods[] = {
    {"_enlist", cond_enlist, METH_NOARGS,
     "Under the lock, before releasing it to sleep: a slot for the caller."},
    {"_sleep", (PyCFunction)(void (*)(void))cond_sleep, METH_FASTCALL,
     "_sleep(slot, timeout, watch) -> 1 woken, 0 timed out, 2 another sleeper died (watch)."},
    {"_notify", (PyCFunction)(void (*)(void))cond_notify, METH_FASTCALL,
     "_notify(n, reclaim) -> live sleepers woken, oldest first; dead ones passed over (freed "
     "when reclaim, else kept for _reap)."},
    {"_reap", cond_reap, METH_NOARGS, "Free dead sleepers' slots: how many."},
    {"_sleeping", cond_sleeping, METH_NOARGS, "Sleepers now."},
    {"_export", handle_export, METH_NOARGS, "(fd, slot) for a child being spawned."},
    {"_unexport", handle_unexport, METH_NOARGS, "Undo an _export() never delivered."},
    {"_attach", (PyCFunction)(void (*)(void))cond_attach, METH_FASTCALL | METH_CLASS,
     "_attach(fd, slot): the CondWaiters exported by the parent."},
    {NULL},
};

static PyType_Slot cond_slots[] = {
    {Py_tp_new, cond_new},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_methods, cond_methods},
    {Py_tp_doc, "CondWaiters(): a Condition's sleepers in shared memory, by pid and start time."},
    {0, NULL},
};

static PyType_Spec cond_spec = {
    .name = "cpool._core.CondWaiters",
    .basicsize = sizeof(CondObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = cond_slots,
};

/* ---- SharedBlock: raw shared bytes exposing the buffer protocol ---- */

typedef struct {
    HandleObject h;
    Py_ssize_t size;
} BlockObject;

#define BLOCK(op) ((BlockObject *)(op))

static PyObject *block_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", NULL};
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:SharedBlock", kwlist, &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    BlockObject *self = (BlockObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (handle_alloc(&self->h, (size_t)size) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->size = size;
    return (PyObject *)self;
}

static PyObject *block_attach(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_attach(fd, slot, size)");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (size < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    BlockObject *self = (BlockObject *)handle_attach(cls, args, 2);
    if (!self)
        return NULL;
    cp_chunk *c = self->h.ref.chunk;
    if ((uint64_t)size > (uint64_t)(c->nslots - self->h.ref.slot) * c->slot_size) {
        PyErr_SetString(PyExc_ValueError, "size beyond the shared chunk");
        Py_DECREF(self);
        return NULL;
    }
    self->size = size;
    return (PyObject *)self;
}

static int block_getbuffer(PyObject *op, Py_buffer *view, int flags)
{
    BlockObject *self = BLOCK(op);
    return PyBuffer_FillInfo(view, op, self->h.ref.addr, self->size, 0, flags);
}

static Py_ssize_t block_len(PyObject *op)
{
    return BLOCK(op)->size;
}

static PyMethodDef block_methods[] = {
    {"_export", handle_export, METH_NOARGS, "(fd, slot) for a child being spawned."},
    {"_unexport", handle_unexport, METH_NOARGS, "Undo an _export() never delivered."},
    {"_attach", (PyCFunction)(void (*)(void))block_attach, METH_FASTCALL | METH_CLASS,
     "_attach(fd, slot, size): the block exported by the parent."},
    {NULL},
};

static PyType_Slot block_slots[] = {
    {Py_tp_new, block_new},
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_methods, block_methods},
    {Py_bf_getbuffer, block_getbuffer},
    {Py_sq_length, block_len},
    {Py_tp_doc, "SharedBlock(size): zeroed shared memory (from the arena, or a memfd of its own "
                "when big), writable through the buffer protocol."},
    {0, NULL},
};

static PyType_Spec block_spec = {
    .name = "cpool._core.SharedBlock",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = block_slots,
};

/* ---- module functions ---- */

static PyObject *arena_stats(PyObject *module, PyObject *unused)
{
    uint64_t nchunks, nhandles, nused, nrefs;
    cp_arena_lock();
    cp_arena_stats(&nchunks, &nhandles, &nused, &nrefs);
    cp_arena_unlock();
    return Py_BuildValue("{sKsKsKsK}", "chunks", (unsigned long long)nchunks, "handles",
                         (unsigned long long)nhandles, "slots_used", (unsigned long long)nused,
                         "refs", (unsigned long long)nrefs);
}

static PyObject *arena_release_all(PyObject *module, PyObject *unused)
{
    cp_arena_release_all();
    Py_RETURN_NONE;
}

static PyMethodDef sync_functions[] = {
    {"arena_stats", arena_stats, METH_NOARGS,
     "Chunks mapped, handles held by this process, slots in use in those chunks and their "
     "shared reference counts."},
    {"arena_release_all", arena_release_all, METH_NOARGS,
     "At exit: drop this process's references to shared slots (later releases do nothing)."},
    {NULL},
};

static void release_at_exit(void)
{
    cp_arena_release_all();
}

int cp_exec_synchronize(PyObject *module)
{
    int r = cp_arena_init();
    if (r < 0) {
        cp_err_errno(r, "pthread_atfork");
        return -1;
    }
    static int atexit_done;
    if (!atexit_done && atexit(release_at_exit) == 0)
        atexit_done = 1;
    cp_sem_self_init();
    if (cp_add_type(module, CP_TYPE_SEMLOCK, &semlock_spec, NULL) < 0 ||
        cp_add_type(module, CP_TYPE_EVENT, &event_spec, NULL) < 0 ||
        cp_add_type(module, CP_TYPE_CONDWAITERS, &cond_spec, NULL) < 0 ||
        cp_add_type(module, CP_TYPE_SHAREDBLOCK, &block_spec, NULL) < 0)
        return -1;
    PyObject *semlock = cp_get_state(module)->slot[CP_TYPE_SEMLOCK];
    PyObject *v = PyLong_FromUnsignedLong(CP_SEM_VALUE_MAX);
    if (!v || PyObject_SetAttrString(semlock, "SEM_VALUE_MAX", v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    Py_DECREF(v);
    PyObject *w = PyErr_NewExceptionWithDoc(
        "cpool.synchronize.OwnerDiedWarning",
        "A Lock or RLock was taken over from a process that died holding it.",
        PyExc_RuntimeWarning, NULL);
    if (!w || PyModule_AddObjectRef(module, "OwnerDiedWarning", w) < 0) {
        Py_XDECREF(w);
        return -1;
    }
    cp_get_state(module)->slot[CP_WARN_OWNER_DIED] = w;
    if (PyModule_AddFunctions(module, sync_functions) < 0)
        return -1;
    return 0;
}
