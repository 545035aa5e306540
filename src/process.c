/* Process bindings: fork as os.fork() does it, spawn with chosen fds, waiting on a child
   through its pidfd with a deadline and Ctrl-C checks. */
#include "module.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "deadline.h"
#include "spawn.h"

/* Flush sys.stdout/sys.stderr so buffered output is not printed again by the child. */
static void flush_std_streams(void)
{
    static const char *names[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *f = PySys_GetObject(names[i]); /* borrowed */
        if (f && f != Py_None) {
            PyObject *r = PyObject_CallMethod(f, "flush", NULL);
            if (r)
                Py_DECREF(r);
            else
                PyErr_Clear(); /* a closed or broken stream must not stop the fork */
        }
    }
}

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

static PyObject *cp_fork(PyObject *module, PyObject *unused)
{
    flush_std_streams();
#if PY_VERSION_HEX >= 0x030C0000
    /* Counted before the fork, warned after it in the parent, as os.fork() does. */
    long nthreads = count_threads();
#endif
    PyOS_BeforeFork();
    pid_t pid = fork();
    int saved = errno;
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    PyOS_AfterFork_Parent();
    if (pid < 0)
        return cp_err_errno(-saved, "fork");
#if PY_VERSION_HEX >= 0x030C0000
    if (nthreads > 1) {
        if (PyErr_WarnFormat(PyExc_DeprecationWarning, 1,
                             "This process (pid=%d) is multi-threaded, use of fork() may lead "
                             "to deadlocks in the child.", (int)getpid()) < 0) {
            /* The child exists: its pid must reach the caller even when warnings are errors
               (os.fork behaves the same), so the error is dropped after being reported. */
            PyErr_WriteUnraisable(NULL);
        }
    }
#endif
    return PyLong_FromLong(pid);
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

/* wait_exit(pid, pidfd, timeout) -> exit code, or None if still running at the deadline
   (or already reaped elsewhere). timeout None waits for ever; Ctrl-C interrupts. */
static PyObject *cp_wait_exit(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "wait_exit(pid, pidfd, timeout)");
        return NULL;
    }
    long pid = PyLong_AsLong(args[0]);
    long pidfd = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    int64_t deadline = CP_NO_DEADLINE;
    if (args[2] != Py_None) {
        double t = PyFloat_AsDouble(args[2]);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        deadline = cp_deadline_after(t);
    }
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
                Py_RETURN_NONE; /* reaped by someone else, as the standard library reports it */
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

static PyMethodDef process_methods[] = {
    {"fork", cp_fork, METH_NOARGS,
     "fork() -> pid\n\nFork like os.fork(): std streams flushed, at-fork handlers run, the 3.12+ "
     "warning about forking a multi-threaded process."},
    {"pidfd_open", cp_pidfd, METH_O, "pidfd_open(pid) -> fd readable once pid has exited."},
    {"spawnv_passfds", (PyCFunction)(void (*)(void))cp_spawnv_passfds, METH_FASTCALL,
     "spawnv_passfds(path, args, passfds) -> pid\n\nfork+exec with only passfds inherited."},
    {"wait_exit", (PyCFunction)(void (*)(void))cp_wait_exit, METH_FASTCALL,
     "wait_exit(pid, pidfd, timeout) -> exitcode or None"},
    {NULL, NULL, 0, NULL},
};

int cp_exec_process(PyObject *module)
{
    return PyModule_AddFunctions(module, process_methods);
}
