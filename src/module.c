/* cpool._core: module definition, multi-phase init, exceptions shared by every part. */
#include "module.h"

#include <errno.h>
#include <string.h>

PyObject *cp_err_errno(int neg_errno, const char *syscall)
{
    int err = neg_errno < 0 ? -neg_errno : neg_errno;
    PyObject *msg = PyUnicode_FromFormat("%s: %s", syscall, strerror(err));
    if (!msg)
        return NULL;
    PyObject *args = Py_BuildValue("(iN)", err, msg);
    if (!args)
        return NULL;
    /* OSError's constructor picks the errno subclass (BrokenPipeError, ...) for us. */
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);
    Py_DECREF(args);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

int cp_add_type(PyObject *module, int slot, PyType_Spec *spec, PyObject *base)
{
    PyObject *tp = PyType_FromModuleAndSpec(module, spec, base);
    if (!tp)
        return -1;
    if (PyModule_AddType(module, (PyTypeObject *)tp) < 0) {
        Py_DECREF(tp);
        return -1;
    }
    cp_get_state(module)->slot[slot] = tp;
    return 0;
}

static int add_exception(PyObject *m, int slot, const char *dotted, PyObject *base, const char *doc)
{
    PyObject *exc = PyErr_NewExceptionWithDoc(dotted, doc, base, NULL);
    if (!exc)
        return -1;
    const char *shortname = strrchr(dotted, '.') + 1;
    if (PyModule_AddObjectRef(m, shortname, exc) < 0) {
        Py_DECREF(exc);
        return -1;
    }
    cp_get_state(m)->slot[slot] = exc;
    return 0;
}

static int cp_exec(PyObject *m)
{
    cp_state *st = cp_get_state(m);
    /* The names say "cpool.X" so instances pickle and unpickle through the public module. */
    if (add_exception(m, CP_EXC_PROCESS_ERROR, "cpool.ProcessError", PyExc_Exception,
                      "Base class of cpool's own errors.") < 0)
        return -1;
    PyObject *pe = st->slot[CP_EXC_PROCESS_ERROR];
    if (add_exception(m, CP_EXC_BUFFER_TOO_SHORT, "cpool.BufferTooShort", pe,
                      "recv_bytes_into() got a buffer too small; args[0] is the whole message.") < 0 ||
        add_exception(m, CP_EXC_TIMEOUT_ERROR, "cpool.TimeoutError", pe,
                      "A result or a task did not arrive in time.") < 0 ||
        add_exception(m, CP_EXC_AUTHENTICATION_ERROR, "cpool.AuthenticationError", pe,
                      "The peer failed the authkey challenge.") < 0 ||
        add_exception(m, CP_EXC_WORKER_LOST_ERROR, "cpool.WorkerLostError", pe,
                      "A pool worker died while running the task; .exitcode says how, .pid "
                      "which.") < 0 ||
        PyObject_SetAttrString(st->slot[CP_EXC_WORKER_LOST_ERROR], "exitcode", Py_None) < 0 ||
        PyObject_SetAttrString(st->slot[CP_EXC_WORKER_LOST_ERROR], "pid", Py_None) < 0)
        return -1;

    PyObject *pickle = PyImport_ImportModule("pickle");
    if (!pickle)
        return -1;
    st->slot[CP_OBJ_PICKLE_DUMPS] = PyObject_GetAttrString(pickle, "dumps");
    st->slot[CP_OBJ_PICKLE_LOADS] = PyObject_GetAttrString(pickle, "loads");
    Py_DECREF(pickle);
    if (!st->slot[CP_OBJ_PICKLE_DUMPS] || !st->slot[CP_OBJ_PICKLE_LOADS])
        return -1;

    if (cp_exec_connection(m) < 0)
        return -1;
    if (cp_exec_process(m) < 0)
        return -1;
    if (cp_exec_pool_payload(m) < 0)
        return -1;
    if (cp_exec_pool(m) < 0)
        return -1;
    if (cp_exec_queue(m) < 0)
        return -1;
    if (cp_exec_synchronize(m) < 0)
        return -1;
    if (cp_exec_shared_memory(m) < 0)
        return -1;
    return 0;
}

static int cp_traverse(PyObject *m, visitproc visit, void *arg)
{
    cp_state *st = cp_get_state(m);
    for (int i = 0; i < CP_NSLOTS; i++)
        Py_VISIT(st->slot[i]);
    return 0;
}

static int cp_clear(PyObject *m)
{
    cp_state *st = cp_get_state(m);
    for (int i = 0; i < CP_NSLOTS; i++)
        Py_CLEAR(st->slot[i]);
    return 0;
}

static void cp_free(void *m)
{
    cp_clear((PyObject *)m);
}

static PyModuleDef_Slot cp_slots[] = {
    {Py_mod_exec, cp_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    /* Declared, not assumed: the audit in docs/python-3.14.md found state that only the GIL
       protects (a pool's job lists and counters, borrowed list items, a global counter), so a
       free-threaded build re-enables the GIL when it imports this module. */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

PyModuleDef cp_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cpool._core",
    .m_doc = "cpool's C core: fork, pipes and connections, shared-memory locks, queues and pools.",
    .m_size = sizeof(cp_state),
    .m_slots = cp_slots,
    .m_traverse = cp_traverse,
    .m_clear = cp_clear,
    .m_free = cp_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&cp_moduledef);
}
