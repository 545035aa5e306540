/* Process bindings: fork as os.fork() does it, the forked child's bootstrap and the fork Popen
   (ForkPopen), spawn with chosen fds, waiting on a child through its pidfd with a deadline and
   Ctrl-C checks. */
#include "module.h"
#include "structmember.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "deadline.h"
#include "spawn.h"
#include "arena.h"

#if PY_VERSION_HEX >= 0x030C0000
/* How many threads this process has: /proc first (it sees threads Python does not know),
   else the threading module's own count. */
static long count_threads(void)
{
    long n = 0;
    FILE *f = fopen("/proc/self/stat", "re");
    if (f) {
        char line[512];
        size_t len = fread(line, 1, sizeof line - 1, f);
        fclose(f);
        line[len] = '\0';
        /* field 2 (comm) may hold spaces: count fields after its closing ')' */
        char *p = strrchr(line, ')');
        if (p) {
            int field = 2;
            char *save = NULL;
            for (char *tok = strtok_r(p + 1, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
                if (++field == 20) {
                    n = strtol(tok, NULL, 10);
                    break;
                }
            }
        }
    }
    if (n <= 0) {
        PyObject *mods = PySys_GetObject("modules");
        PyObject *th = mods ? PyDict_GetItemString(mods, "threading") : NULL;
        if (th) {
            PyObject *active = PyObject_GetAttrString(th, "_active");
            if (active && PyDict_Check(active))
                n = (long)PyDict_Size(active);
            Py_XDECREF(active);
            PyErr_Clear();
        }
    }
    return n;
}
#endif

/* The parent's side of a fork as os.fork() does it: at-fork handlers before and after, and on
   3.12+ the DeprecationWarning when other threads run (counted before, given after). The child
   calls PyOS_AfterFork_Child() itself. */
static pid_t fork_as_os_does(int *err)
{
#if PY_VERSION_HEX >= 0x030C0000
    long nthreads = count_threads();
#endif
    PyOS_BeforeFork();
    pid_t pid = fork();
    *err = errno;
    if (pid == 0)
        return 0;
    PyOS_AfterFork_Parent();
#if PY_VERSION_HEX >= 0x030C0000
    if (pid > 0 && nthreads > 1) {
        if (PyErr_WarnFormat(PyExc_DeprecationWarning, 1,
                             "This process (pid=%d) is multi-threaded, use of fork() may lead "
                             "to deadlocks in the child.", (int)getpid()) < 0) {
            /* The child exists: its pid must reach the caller even when warnings are errors
               (os.fork behaves the same), so the error is dropped after being reported. */
            PyErr_WriteUnraisable(NULL);
        }
    }
#endif
    return pid;
}

/* ---- the forked child: a Process object's bootstrap in C ----

   Every page a forked child writes is a copy-on-write fault (~2 us here), so the child's
   start-up is what a start/join costs beyond fork itself. The standard library's Python
   bootstrap touches a few hundred pages; this one reads what it can (borrowed references,
   sizes of registries) and calls into Python only for run() and for the rare cases that need
   it: finalizers or children to handle, after-fork hooks, logging, other threads, an exception.
   cpool/process.py's _bootstrap (used by spawn and forkserver) is the same sequence in Python. */

enum {
    K_CURRENT, K_PARENT, K_CHILDREN, K_CHILD_EXITCODE, K_SET_START_METHOD, K_START_METHOD,
    K_RUN, K_FINREG, K_LOGGER, K_EXIT_FUNCTION, K_RUN_AFTER_FORKERS, K_CLOSE_STDIN, K_INFO,
    K_TH_ATEXITS, K_TH_SHUTDOWN, K_STDIN, K_DUNDER_STDIN, K_STDOUT, K_STDERR, K_FLUSH,
    K_DEVNULL, K_PREPARE_DEVNULL, K_LAUNCH, K_TARGET, K_ARGS, K_KWARGS, K_BASE_PROCESS,
    K_MAIN_THREAD, K_HAVE_NATIVE_ID, K_SET_NATIVE_ID, K_AT_CLEAR, K_AT_REGISTER,
    K_AT_NCALLBACKS, K_AT_RUN, K_CLOSE,
    K_COUNT
};

static const char *const fork_key_names[K_COUNT] = {
    "_current_process", "_parent_process", "_children", "_child_exitcode", "_child_start_method",
    "_start_method", "run", "_finalizer_registry", "_logger", "_exit_function",
    "_run_after_forkers", "_close_stdin", "info", "_threading_atexits", "_shutdown", "stdin",
    "__stdin__", "stdout", "stderr", "flush", "_devnull_stdin", "_prepare_devnull_stdin",
    "_launch", "_target", "_args", "_kwargs", "BaseProcess", "_main_thread",
    "_HAVE_THREAD_NATIVE_ID", "_set_native_id", "_clear", "register", "_ncallbacks",
    "_run_exitfuncs", "close",
};

/* The identity counter of Process objects made in this process (restarts in each child). */
static unsigned long process_count;

static PyObject *cp_next_process_count(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLong(++process_count);
}

static PyObject *cp_reset_process_count(PyObject *module, PyObject *unused)
{
    process_count = 0;
    Py_RETURN_NONE;
}

/* fork_setup(process_dict, util_dict, afterfork_data, threading_dict): what the child reads. */
static PyObject *cp_fork_setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyDict_Check(args[1]) || !PyDict_Check(args[2]) ||
        !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "fork_setup(process_dict, util_dict, afterfork_data, threading_dict)");
        return NULL;
    }
    cp_state *st = cp_get_state(module);
    Py_XSETREF(st->slot[CP_OBJ_FORK_PROCESS_DICT], Py_NewRef(args[0]));
    Py_XSETREF(st->slot[CP_OBJ_FORK_UTIL_DICT], Py_NewRef(args[1]));
    Py_XSETREF(st->slot[CP_OBJ_FORK_AFTERFORK], Py_NewRef(args[2]));
    Py_XSETREF(st->slot[CP_OBJ_FORK_THREADING_DICT], Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

typedef struct {
    PyObject *keys, *pd, *ud, *afterfork, *td, *sd, *ad;
} fork_refs;

#define KEY(r, i) PyTuple_GET_ITEM((r)->keys, (i))

/* Borrowed d[key], or NULL (no error) when missing. */
static PyObject *dict_get(PyObject *d, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (!v)
        PyErr_Clear();
    return v;
}

static Py_ssize_t container_size(PyObject *v)
{
    if (!v)
        return 0;
    if (PyDict_Check(v))
        return PyDict_GET_SIZE(v);
    if (PyAnySet_Check(v))
        return PySet_GET_SIZE(v);
    if (PyList_Check(v))
        return PyList_GET_SIZE(v);
    return v == Py_None ? 0 : 1;
}

/* Call d[key](*args); a new reference or NULL with an exception set. */
static PyObject *call_from(PyObject *d, PyObject *key, PyObject *const *args, size_t nargs)
{
    PyObject *fn = PyDict_GetItemWithError(d, key);
    if (!fn) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyObject_Vectorcall(fn, args, nargs, NULL);
}

static int call_from_void(PyObject *d, PyObject *key, PyObject *const *args, size_t nargs)
{
    PyObject *r = call_from(d, key, args, nargs);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* util.info(msg) when cpool's logger exists (util.info does nothing otherwise). */
static void child_log(fork_refs *r, const char *msg, int code)
{
    PyObject *logger = dict_get(r->ud, KEY(r, K_LOGGER));
    if (!logger || logger == Py_None)
        return;
    PyObject *m = code < 0 ? PyUnicode_FromString(msg) : PyUnicode_FromFormat(msg, code);
    if (m) {
        if (call_from_void(r->ud, KEY(r, K_INFO), &m, 1) < 0)
            PyErr_Clear();
        Py_DECREF(m);
    } else {
        PyErr_Clear();
    }
}

static int thread_states(void)
{
    int n = 0;
    for (PyThreadState *t = PyInterpreterState_ThreadHead(PyInterpreterState_Get()); t;
         t = PyThreadState_Next(t))
        n++;
    return n;
}

/* Whether util._exit_function would do anything: finalizers to run, children to join, or a
   logger to tell. Read-only: otherwise the child need not call it (nor touch its pages). */
static int exit_function_has_work(fork_refs *r)
{
    return container_size(dict_get(r->ud, KEY(r, K_FINREG))) ||
           container_size(dict_get(r->pd, KEY(r, K_CHILDREN))) ||
           container_size(dict_get(r->ud, KEY(r, K_LOGGER)));
}

/* sys.stdout.flush(), sys.stderr.flush(), so buffered output is not printed again by a child;
   errors ignored (a closed or broken stream must not stop a fork or an exit). The names are
   the interned keys, sys's dict is read directly: no temporary string per call. */
static void flush_streams(PyObject *keys, PyObject *sysdict)
{
    PyObject *names[2] = {PyTuple_GET_ITEM(keys, K_STDOUT), PyTuple_GET_ITEM(keys, K_STDERR)};
    for (int i = 0; i < 2; i++) {
        PyObject *f = dict_get(sysdict, names[i]);
        if (f && f != Py_None) {
            PyObject *v = PyObject_VectorcallMethod(PyTuple_GET_ITEM(keys, K_FLUSH), &f,
                                                    1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (v)
                Py_DECREF(v);
            else
                PyErr_Clear();
        }
    }
}

/* fork() -> pid, as os.fork() does it (stdout/stderr flushed first): the forkserver's. */
static PyObject *cp_fork(PyObject *module, PyObject *unused)
{
    cp_state *st = cp_get_state(module);
    flush_streams(st->slot[CP_OBJ_FORK_KEYS], st->slot[CP_OBJ_FORK_SYS_DICT]);
    int err;
    pid_t pid = fork_as_os_does(&err);
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    if (pid < 0)
        return cp_err_errno(-err, "fork");
    return PyLong_FromLong(pid);
}

/* What the parent looks up before the fork, so the child only reads it: a lookup in the
   child would write the type's method cache (a page fault) in every child again. */
typedef struct {
    PyObject *obj, *devnull;
    PyObject *start_method;           /* NULL for the default context's Process */
    PyObject *target, *args, *kwargs; /* set when run() is BaseProcess.run: called directly */
} child_plan;

static void plan_clear(child_plan *p)
{
    Py_CLEAR(p->start_method);
    Py_CLEAR(p->target);
    Py_CLEAR(p->args);
    Py_CLEAR(p->kwargs);
}

static int plan_make(fork_refs *r, PyObject *obj, child_plan *p)
{
    PyObject *v = PyObject_GetAttr(obj, KEY(r, K_START_METHOD));
    if (!v)
        return -1;
    if (v == Py_None)
        Py_DECREF(v);
    else
        p->start_method = v;
    /* Looked up on the type: also fills the method cache the child's call would miss. */
    PyObject *run = PyObject_GetAttr((PyObject *)Py_TYPE(obj), KEY(r, K_RUN));
    if (!run)
        return -1;
    PyObject *base = dict_get(r->pd, KEY(r, K_BASE_PROCESS));
    PyObject *base_run = base ? PyObject_GetAttr(base, KEY(r, K_RUN)) : NULL;
    if (!base_run)
        PyErr_Clear();
    if (run == base_run) {
        p->target = PyObject_GetAttr(obj, KEY(r, K_TARGET));
        p->args = p->target ? PyObject_GetAttr(obj, KEY(r, K_ARGS)) : NULL;
        p->kwargs = p->args ? PyObject_GetAttr(obj, KEY(r, K_KWARGS)) : NULL;
        if (!p->kwargs || !PyTuple_Check(p->args) || !PyDict_Check(p->kwargs)) {
            /* Unusual attributes: the child calls run() and gets the same errors. */
            PyErr_Clear();
            Py_CLEAR(p->target);
            Py_CLEAR(p->args);
            Py_CLEAR(p->kwargs);
        }
    }
    Py_DECREF(run);
    Py_XDECREF(base_run);
    return 0;
}

/* run(): BaseProcess.run's `if self._target: self._target(*self._args, **self._kwargs)`
   done here, or the subclass's own run(). New reference, or NULL with an exception. */
static PyObject *child_run(fork_refs *r, child_plan *p)
{
    if (!p->target)
        return PyObject_VectorcallMethod(KEY(r, K_RUN), &p->obj,
                                         1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    int truth = PyObject_IsTrue(p->target);
    if (truth < 0)
        return NULL;
    if (!truth)
        Py_RETURN_NONE;
    return PyObject_Call(p->target, p->args, PyDict_GET_SIZE(p->kwargs) ? p->kwargs : NULL);
}

/* stdin.close(), ignoring OSError and ValueError as util._close_stdin does. */
static int close_stdin_object(fork_refs *r, PyObject *stdin_obj)
{
    PyObject *v = PyObject_VectorcallMethod(KEY(r, K_CLOSE), &stdin_obj,
                                            1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (v) {
        Py_DECREF(v);
        return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_OSError) || PyErr_ExceptionMatches(PyExc_ValueError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

/* Everything from "become the Process" to _exit: the order of process.py's _bootstrap. */
static void _Py_NO_RETURN child_main(fork_refs *r, child_plan *plan)
{
    PyObject *exc = NULL, *v, *obj = plan->obj;
    int code = 1;

    process_count = 0;
#if PY_VERSION_HEX >= 0x030D0000
    /* 3.13+: the child's atexit callbacks are its own (the parent's are dropped, util's exit
       function registered); they run after its threads are joined, as popen_fork does. */
    if (call_from_void(r->ad, KEY(r, K_AT_CLEAR), NULL, 0) < 0)
        goto failed;
    v = dict_get(r->ud, KEY(r, K_EXIT_FUNCTION));
    if (!v || call_from_void(r->ad, KEY(r, K_AT_REGISTER), &v, 1) < 0)
        goto failed;
#endif
    if (plan->start_method &&
        call_from_void(r->pd, KEY(r, K_SET_START_METHOD), &plan->start_method, 1) < 0)
        goto failed;
    /* The parent's children are not this process's (the parent listed obj itself there). */
    v = dict_get(r->pd, KEY(r, K_CHILDREN));
    if (v && PyAnySet_Check(v) && PySet_GET_SIZE(v) && PySet_Clear(v) < 0)
        goto failed;
    /* The child must not read the parent's stdin, as the standard library does it: the
       sys.stdin object is closed and replaced by a /dev/null reader, fd 0 is left alone (a
       child that reopens the descriptor reads the parent's input). The interpreter's own stdin
       is closed here (it does not own fd 0) and replaced by the reader the parent made once;
       anything else the program put in sys.stdin is handled from Python. */
    v = dict_get(r->sd, KEY(r, K_STDIN));
    if (v && v != Py_None) {
        if (v == dict_get(r->sd, KEY(r, K_DUNDER_STDIN))) {
            if (close_stdin_object(r, v) < 0 || PyDict_SetItem(r->sd, KEY(r, K_STDIN),
                                                              plan->devnull) < 0)
                goto failed;
        } else if (call_from_void(r->ud, KEY(r, K_CLOSE_STDIN), NULL, 0) < 0) {
            goto failed;
        }
    }
    /* threading's at-fork handler made this thread the main one but kept the parent's native
       id (through 3.13): the standard library's bootstrap sets it, so does this one. */
    v = dict_get(r->td, KEY(r, K_HAVE_NATIVE_ID));
    if (v && PyObject_IsTrue(v) == 1 && (v = dict_get(r->td, KEY(r, K_MAIN_THREAD)))) {
        v = PyObject_VectorcallMethod(KEY(r, K_SET_NATIVE_ID), &v,
                                      1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (!v)
            goto failed;
        Py_DECREF(v);
    }
    /* The parent's Process object stays alive (this child ends with _exit): freeing it here
       would only write pages. */
    Py_XINCREF(dict_get(r->pd, KEY(r, K_CURRENT)));
    if (PyDict_SetItem(r->pd, KEY(r, K_CURRENT), obj) < 0)
        goto failed;
    v = dict_get(r->pd, KEY(r, K_PARENT));
    if (v && v != Py_None && PyDict_SetItem(r->pd, KEY(r, K_PARENT), Py_None) < 0)
        goto failed;
    /* The parent's finalizers belong to the parent; after-fork hooks run. */
    v = dict_get(r->ud, KEY(r, K_FINREG));
    if (v && PyDict_Check(v) && PyDict_GET_SIZE(v))
        PyDict_Clear(v);
    if (PyDict_GET_SIZE(r->afterfork) &&
        call_from_void(r->ud, KEY(r, K_RUN_AFTER_FORKERS), NULL, 0) < 0)
        goto failed;
    child_log(r, "child process calling self.run()", -1);

    v = child_run(r, plan);
    if (v)
        Py_DECREF(v);
    else
        exc = cp_fetch_exc();
#if PY_VERSION_HEX < 0x030D0000
    /* Up to 3.12 the child's own children are joined and its finalizers run right after run(),
       as at any exit (3.13+: at the end, from atexit). */
    if (exc || exit_function_has_work(r)) {
        if (call_from_void(r->ud, KEY(r, K_EXIT_FUNCTION), NULL, 0) < 0) {
            PyObject *later = cp_fetch_exc();
            if (exc && later)
                PyException_SetContext(later, exc); /* steals exc, as `finally` chains it */
            else
                Py_XDECREF(exc);
            exc = later;
        }
    }
#endif
    if (!exc) {
        code = 0;
        goto finish;
    }
failed:
    if (!exc)
        exc = cp_fetch_exc();
    if (exc) {
        /* SystemExit's code, or the traceback printed and 1: process._child_exitcode. */
        PyObject *args[2] = {obj, exc};
        v = call_from(r->pd, KEY(r, K_CHILD_EXITCODE), args, 2);
        Py_DECREF(exc);
        if (v && PyLong_Check(v)) {
            code = (int)PyLong_AsLong(v);
            if (code == -1 && PyErr_Occurred())
                code = 1;
        } else {
            code = 1;
        }
        Py_XDECREF(v);
        if (PyErr_Occurred())
            PyErr_Print();
    }
finish:
    /* Non-daemon threads run() left behind are joined, as at interpreter exit. */
    if (thread_states() > 1 || container_size(dict_get(r->td, KEY(r, K_TH_ATEXITS)))) {
        if (call_from_void(r->td, KEY(r, K_TH_SHUTDOWN), NULL, 0) < 0)
            PyErr_Print();
    }
    child_log(r, "process exiting with exitcode %d", code);
    flush_streams(r->keys, r->sd);
#if PY_VERSION_HEX >= 0x030D0000
    /* atexit: util's exit function, and what run() registered (only the former: nothing to do
       when it has no work). Flushed again: what the callbacks print must not be lost. */
    v = call_from(r->ad, KEY(r, K_AT_NCALLBACKS), NULL, 0);
    if (!v || !PyLong_Check(v) || PyLong_AsLong(v) != 1 || exit_function_has_work(r)) {
        PyErr_Clear();
        if (call_from_void(r->ad, KEY(r, K_AT_RUN), NULL, 0) < 0)
            PyErr_Print();
        flush_streams(r->keys, r->sd);
    }
    Py_XDECREF(v);
#endif
    /* A thread still running may still use a shared lock: then its reference stays. */
    if (thread_states() == 1 && cp_arena_has_chunks())
        cp_arena_release_all();
    _exit(code);
}

static int fork_refs_of(cp_state *st, fork_refs *r)
{
    *r = (fork_refs){st->slot[CP_OBJ_FORK_KEYS], st->slot[CP_OBJ_FORK_PROCESS_DICT],
                     st->slot[CP_OBJ_FORK_UTIL_DICT], st->slot[CP_OBJ_FORK_AFTERFORK],
                     st->slot[CP_OBJ_FORK_THREADING_DICT], st->slot[CP_OBJ_FORK_SYS_DICT],
                     st->slot[CP_OBJ_FORK_ATEXIT_DICT]};
    if (!r->pd) {
        PyErr_SetString(PyExc_RuntimeError, "cpool._core.fork_setup() was not called");
        return -1;
    }
    return 0;
}

/* Fork; the child runs obj's bootstrap and never returns. The parent gets the child's pid and
   a pidfd for it. 0, or -1 with an exception (and no child left behind). */
static int fork_and_run(cp_state *st, PyObject *obj, pid_t *pid_out, int *pidfd_out)
{
    fork_refs refs;
    if (fork_refs_of(st, &refs) < 0)
        return -1;
    /* One /dev/null reader opened in the parent stands in as every forked child's stdin. */
    PyObject *devnull = dict_get(refs.ud, KEY(&refs, K_DEVNULL)), *made = NULL;
    if (!devnull || devnull == Py_None) {
        made = call_from(refs.ud, KEY(&refs, K_PREPARE_DEVNULL), NULL, 0);
        if (!made)
            return -1;
        devnull = made;
    }
    child_plan plan = {obj, devnull};
    if (plan_make(&refs, obj, &plan) < 0) {
        plan_clear(&plan);
        Py_XDECREF(made);
        return -1;
    }
    flush_streams(refs.keys, refs.sd);
    int saved;
    pid_t pid = fork_as_os_does(&saved);
    if (pid == 0) {
        PyOS_AfterFork_Child();
        child_main(&refs, &plan);
    }
    plan_clear(&plan);
    Py_XDECREF(made);
    if (pid < 0) {
        cp_err_errno(-saved, "fork");
        return -1;
    }
    int pidfd = cp_pidfd_open(pid);
    if (pidfd < 0) {
        /* Without a pidfd the child could not be waited for safely: end it, report why. */
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        cp_err_errno(pidfd, "pidfd_open");
        return -1;
    }
    *pid_out = pid;
    *pidfd_out = pidfd;
    return 0;
}

static PyObject *cp_pidfd(PyObject *module, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred())
        return NULL;
    int fd = cp_pidfd_open((pid_t)pid);
    if (fd < 0)
        return cp_err_errno(fd, "pidfd_open");
    return PyLong_FromLong(fd);
}

/* spawnv_passfds(path, args, passfds) -> pid */
static PyObject *cp_spawnv_passfds(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "spawnv_passfds(path, args, passfds)");
        return NULL;
    }
    PyObject *path_b = NULL, *argseq = NULL, *fdseq = NULL, *result = NULL;
    char **argv = NULL;
    int *fds = NULL;
    if (!PyUnicode_FSConverter(args[0], &path_b))
        return NULL;
    argseq = PySequence_Fast(args[1], "args must be a sequence");
    fdseq = PySequence_Fast(args[2], "passfds must be a sequence");
    if (!argseq || !fdseq)
        goto done;
    Py_ssize_t na = PySequence_Fast_GET_SIZE(argseq), nf = PySequence_Fast_GET_SIZE(fdseq);
    PyObject **argbytes = PyMem_Calloc((size_t)na + 1, sizeof(PyObject *));
    argv = PyMem_Calloc((size_t)na + 1, sizeof(char *));
    fds = PyMem_Calloc((size_t)nf + 1, sizeof(int));
    if (!argbytes || !argv || !fds) {
        PyMem_Free(argbytes);
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t i;
    for (i = 0; i < na; i++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(argseq, i), &argbytes[i]))
            break;
        argv[i] = PyBytes_AS_STRING(argbytes[i]);
    }
    if (i == na) {
        for (i = 0; i < nf; i++) {
            long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(fdseq, i));
            if (fd == -1 && PyErr_Occurred())
                break;
            fds[i] = (int)fd;
        }
        if (i == nf) {
            pid_t pid;
            Py_BEGIN_ALLOW_THREADS
            pid = cp_spawn(PyBytes_AS_STRING(path_b), argv, fds, (int)nf);
            Py_END_ALLOW_THREADS
            result = pid < 0 ? cp_err_errno(pid, "spawn") : PyLong_FromLong(pid);
        }
    }
    for (i = 0; i < na; i++)
        Py_XDECREF(argbytes[i]);
    PyMem_Free(argbytes);
done:
    PyMem_Free(argv);
    PyMem_Free(fds);
    Py_XDECREF(argseq);
    Py_XDECREF(fdseq);
    Py_XDECREF(path_b);
    return result;
}

/* Exit code in the standard library's convention: status, or -signum. */
static int exitcode_of(int status)
{
    if (WIFSIGNALED(status))
        return -WTERMSIG(status);
    return WEXITSTATUS(status);
}

/* The exit code of child pid, or None if it is still running at the deadline (or was already
   reaped elsewhere, as the standard library reports it). Ctrl-C interrupts the wait. */
static PyObject *wait_exit(long pid, long pidfd, int64_t deadline)
{
    for (;;) {
        int status = 0, err = 0;
        pid_t r;
        Py_BEGIN_ALLOW_THREADS
        r = waitpid((pid_t)pid, &status, WNOHANG);
        err = errno;
        if (r == 0 && pidfd >= 0) {
            struct pollfd p = {(int)pidfd, POLLIN, 0};
            int ms = cp_deadline_left_ms(deadline);
            if (ms != 0) {
                int pr = poll(&p, 1, ms);
                err = errno;
                if (pr < 0)
                    r = -2;
                else
                    r = waitpid((pid_t)pid, &status, WNOHANG), err = errno;
            }
        }
        Py_END_ALLOW_THREADS
        if (r == (pid_t)pid)
            return PyLong_FromLong(exitcode_of(status));
        if (r == -2 || (r < 0 && err == EINTR)) {
            if (err != EINTR)
                return cp_err_errno(-err, "poll");
            if (PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        if (r < 0) {
            if (err == ECHILD)
                Py_RETURN_NONE;
            return cp_err_errno(-err, "waitpid");
        }
        if (pidfd < 0) {
            /* No pidfd (old kernel): sleep in short steps, still honouring the deadline. */
            if (cp_deadline_left_ns(deadline) == 0)
                Py_RETURN_NONE;
            Py_BEGIN_ALLOW_THREADS
            usleep(1000);
            Py_END_ALLOW_THREADS
            if (PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        if (cp_deadline_left_ns(deadline) == 0)
            Py_RETURN_NONE;
    }
}

/* A timeout argument (seconds, or None for ever) as a deadline; -1 with an exception. */
static int deadline_of(PyObject *timeout, int64_t *deadline)
{
    *deadline = CP_NO_DEADLINE;
    if (timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred())
            return -1;
        *deadline = cp_deadline_after(t);
    }
    return 0;
}

/* ---- ForkPopen: the fork start method's Popen (popen_fork.Popen), base of the others ----

   In C because every object the parent allocates or touches between two starts is a
   copy-on-write fault after each fork. Subclasses (spawn, forkserver) override _launch and,
   for the forkserver, poll/wait/close. */

typedef struct {
    PyObject_HEAD
    PyObject *pid, *sentinel, *returncode, *pidfd; /* None until known */
} ForkPopen;

static PyObject *fp_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    ForkPopen *self = (ForkPopen *)tp->tp_alloc(tp, 0);
    if (self) {
        self->pid = Py_NewRef(Py_None);
        self->sentinel = Py_NewRef(Py_None);
        self->returncode = Py_NewRef(Py_None);
        self->pidfd = Py_NewRef(Py_None);
    }
    return (PyObject *)self;
}

static cp_state *fp_state(PyObject *self)
{
    return cp_state_from_type(Py_TYPE(self));
}

/* Popen(process_obj): starts the child through self._launch(process_obj). */
static int fp_init(PyObject *self, PyObject *args, PyObject *kw)
{
    PyObject *obj;
    if (kw && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "Popen(process_obj) takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O:Popen", &obj))
        return -1;
    cp_state *st = fp_state(self);
    fork_refs refs;
    if (!st || fork_refs_of(st, &refs) < 0)
        return -1;
    PyObject *call[2] = {self, obj};
    PyObject *r = PyObject_VectorcallMethod(KEY(&refs, K_LAUNCH), call,
                                            2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

static PyObject *fp_launch(PyObject *op, PyObject *obj)
{
    ForkPopen *self = (ForkPopen *)op;
    cp_state *st = fp_state(op);
    pid_t pid;
    int pidfd;
    if (!st || fork_and_run(st, obj, &pid, &pidfd) < 0)
        return NULL;
    PyObject *p = PyLong_FromLong(pid), *fd = PyLong_FromLong(pidfd);
    if (!p || !fd) {
        Py_XDECREF(p);
        Py_XDECREF(fd);
        close(pidfd); /* the child runs on; without its pidfd it is reaped at exit */
        return NULL;
    }
    Py_SETREF(self->pid, p);
    Py_SETREF(self->sentinel, fd);
    Py_SETREF(self->pidfd, Py_NewRef(fd));
    Py_RETURN_NONE;
}

static PyObject *fp_wait_until(ForkPopen *self, int64_t deadline)
{
    if (self->returncode == Py_None) {
        long pid = PyLong_AsLong(self->pid);
        long fd = self->sentinel == Py_None ? -1 : PyLong_AsLong(self->sentinel);
        if (PyErr_Occurred())
            return NULL;
        PyObject *code = wait_exit(pid, fd, deadline);
        if (!code)
            return NULL;
        Py_SETREF(self->returncode, code);
    }
    return Py_NewRef(self->returncode);
}

/* poll(flag=os.WNOHANG) -> exit code or None; flag 0 waits. */
static PyObject *fp_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long flag = WNOHANG;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "poll(flag=os.WNOHANG)");
        return NULL;
    }
    if (nargs == 1 && (flag = PyLong_AsLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    return fp_wait_until((ForkPopen *)self, (flag & WNOHANG) ? 0 : CP_NO_DEADLINE);
}

static PyObject *fp_wait(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    int64_t deadline;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:wait", kwlist, &timeout) ||
        deadline_of(timeout, &deadline) < 0)
        return NULL;
    return fp_wait_until((ForkPopen *)self, deadline);
}

/* Signals go through the pidfd: an unrelated process that reused the pid is never hit. */
static PyObject *fp_send_signal(PyObject *op, PyObject *arg)
{
    ForkPopen *self = (ForkPopen *)op;
    int sig = (int)PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred())
        return NULL;
    if (self->returncode != Py_None || self->pidfd == Py_None)
        Py_RETURN_NONE;
    int fd = (int)PyLong_AsLong(self->pidfd);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (cp_pidfd_send_signal(fd, sig) < 0) {
        int err = errno;
        if (err == ESRCH)
            Py_RETURN_NONE; /* already gone */
        /* Other errors are real unless the child has ended meanwhile. */
        PyObject *code = fp_wait_until(self, cp_deadline_after(0.1));
        if (!code)
            return NULL;
        int running = code == Py_None;
        Py_DECREF(code);
        if (running)
            return cp_err_errno(-err, "pidfd_send_signal");
    }
    Py_RETURN_NONE;
}

static PyObject *fp_signal(PyObject *self, int sig)
{
    PyObject *s = PyLong_FromLong(sig);
    if (!s)
        return NULL;
    PyObject *r = fp_send_signal(self, s);
    Py_DECREF(s);
    return r;
}

static PyObject *fp_terminate(PyObject *self, PyObject *unused)
{
    return fp_signal(self, SIGTERM);
}

static PyObject *fp_kill(PyObject *self, PyObject *unused)
{
    return fp_signal(self, SIGKILL);
}

static PyObject *fp_interrupt(PyObject *self, PyObject *unused)
{
    return fp_signal(self, SIGINT);
}

static PyObject *fp_duplicate_for_child(PyObject *self, PyObject *fd)
{
    return Py_NewRef(fd);
}

/* Close the sentinel (the pidfd, for fork and spawn); None afterwards. */
static int fp_close_sentinel(ForkPopen *self)
{
    if (self->sentinel == Py_None)
        return 0;
    int fd = (int)PyLong_AsLong(self->sentinel);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (self->pidfd == self->sentinel)
        Py_SETREF(self->pidfd, Py_NewRef(Py_None));
    Py_SETREF(self->sentinel, Py_NewRef(Py_None));
    if (close(fd) < 0 && errno != EINTR) {
        cp_err_errno(-errno, "close");
        return -1;
    }
    return 0;
}

static PyObject *fp_close(PyObject *self, PyObject *unused)
{
    if (fp_close_sentinel((ForkPopen *)self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void fp_finalize(PyObject *self)
{
    PyObject *exc = cp_fetch_exc();
    if (fp_close_sentinel((ForkPopen *)self) < 0)
        PyErr_Clear();
    if (exc)
        cp_restore_exc(exc);
}

static void fp_dealloc(PyObject *op)
{
    ForkPopen *self = (ForkPopen *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (PyObject_CallFinalizerFromDealloc(op) < 0)
        return; /* resurrected */
    Py_CLEAR(self->pid);
    Py_CLEAR(self->sentinel);
    Py_CLEAR(self->returncode);
    Py_CLEAR(self->pidfd);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyMethodDef fp_methods[] = {
    {"_launch", fp_launch, METH_O, "_launch(process_obj): fork; the child runs its bootstrap."},
    {"poll", (PyCFunction)(void (*)(void))fp_poll, METH_FASTCALL,
     "poll(flag=os.WNOHANG) -> exit code, or None while running (flag 0 waits)."},
    {"wait", (PyCFunction)(void (*)(void))fp_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> exit code, or None if still running after timeout seconds."},
    {"_send_signal", fp_send_signal, METH_O, "Signal the child through its pidfd."},
    {"terminate", fp_terminate, METH_NOARGS, "SIGTERM"},
    {"kill", fp_kill, METH_NOARGS, "SIGKILL"},
    {"interrupt", fp_interrupt, METH_NOARGS, "SIGINT"},
    {"duplicate_for_child", fp_duplicate_for_child, METH_O,
     "A forked child inherits every fd: the same number."},
    {"close", fp_close, METH_NOARGS, "Close the sentinel."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef fp_members[] = {
    {"pid", T_OBJECT, offsetof(ForkPopen, pid), 0, "The child's pid."},
    {"sentinel", T_OBJECT, offsetof(ForkPopen, sentinel), 0,
     "An fd readable once the child has ended."},
    {"returncode", T_OBJECT, offsetof(ForkPopen, returncode), 0, "None while running."},
    {"_pidfd", T_OBJECT, offsetof(ForkPopen, pidfd), 0, "The fd signals go through."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot fp_slots[] = {
    {Py_tp_doc, "ForkPopen(process_obj)\n\nStarts process_obj with fork (in C, as os.fork "
                "does it, the child's bootstrap included) and waits for it through its pidfd."},
    {Py_tp_new, fp_new},
    {Py_tp_init, fp_init},
    {Py_tp_finalize, fp_finalize},
    {Py_tp_dealloc, fp_dealloc},
    {Py_tp_methods, fp_methods},
    {Py_tp_members, fp_members},
    {0, NULL},
};

static PyType_Spec fp_spec = {
    .name = "cpool._core.ForkPopen",
    .basicsize = sizeof(ForkPopen),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = fp_slots,
};

static PyMethodDef process_methods[] = {
    {"fork", cp_fork, METH_NOARGS,
     "fork() -> pid\n\nFork like os.fork(): std streams flushed, at-fork handlers run, the 3.12+ "
     "warning about forking a multi-threaded process."},
    {"fork_setup", (PyCFunction)(void (*)(void))cp_fork_setup, METH_FASTCALL,
     "fork_setup(process_dict, util_dict, afterfork_data, threading_dict): what a forked "
     "child's bootstrap reads."},
    {"next_process_count", cp_next_process_count, METH_NOARGS,
     "The next identity number of a Process made in this process."},
    {"reset_process_count", cp_reset_process_count, METH_NOARGS,
     "Restart the identity numbers (in a new child)."},
    {"pidfd_open", cp_pidfd, METH_O, "pidfd_open(pid) -> fd readable once pid has exited."},
    {"spawnv_passfds", (PyCFunction)(void (*)(void))cp_spawnv_passfds, METH_FASTCALL,
     "spawnv_passfds(path, args, passfds) -> pid\n\nfork+exec with only passfds inherited."},
    {NULL, NULL, 0, NULL},
};

/* The interned names the fork paths look up, and the dicts of sys and atexit (fork_setup adds
   cpool's own modules' dicts once they exist). */
static int fork_state_init(cp_state *st)
{
    PyObject *keys = PyTuple_New(K_COUNT);
    if (!keys)
        return -1;
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *k = PyUnicode_InternFromString(fork_key_names[i]);
        if (!k) {
            Py_DECREF(keys);
            return -1;
        }
        PyTuple_SET_ITEM(keys, i, k);
    }
    st->slot[CP_OBJ_FORK_KEYS] = keys;
    const char *mods[2] = {"sys", "atexit"};
    int slots[2] = {CP_OBJ_FORK_SYS_DICT, CP_OBJ_FORK_ATEXIT_DICT};
    for (int i = 0; i < 2; i++) {
        PyObject *m = PyImport_ImportModule(mods[i]);
        if (!m)
            return -1;
        st->slot[slots[i]] = Py_NewRef(PyModule_GetDict(m));
        Py_DECREF(m);
    }
    return 0;
}

int cp_exec_process(PyObject *module)
{
    if (fork_state_init(cp_get_state(module)) < 0 ||
        cp_add_type(module, CP_TYPE_FORK_POPEN, &fp_spec, NULL) < 0)
        return -1;
    return PyModule_AddFunctions(module, process_methods);
}
