/* Shared declarations of the cpool._core bindings: module state, part init hooks, error helpers. */
#ifndef CPOOL_MODULE_H
#define CPOOL_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Module state: exceptions and the heap types of every part. Slots are named so each part
   finds its own; m_traverse/m_clear walk the whole array. */
enum {
    CP_EXC_PROCESS_ERROR,
    CP_EXC_BUFFER_TOO_SHORT,
    CP_EXC_TIMEOUT_ERROR,
    CP_EXC_AUTHENTICATION_ERROR,
    CP_EXC_WORKER_LOST_ERROR,
    CP_TYPE_CONNECTION,
    CP_TYPE_SEMLOCK,
    CP_TYPE_SHAREDMEM,
    CP_TYPE_QUEUE,
    CP_TYPE_POOL,
    CP_TYPE_POOLJOB,
    CP_TYPE_BUFHEAP, CP_TYPE_HEAPBLOCK, CP_TYPE_HEAPCOLLECTOR, /* pool_payload.c */
    CP_TYPE_FORK_POPEN,
    CP_TYPE_EVENT, CP_TYPE_SHAREDBLOCK, CP_WARN_OWNER_DIED, CP_TYPE_CONDWAITERS, /* synchronize.c */
    CP_OBJ_PICKLE_DUMPS,   /* pickle.dumps / loads cached for the hot paths */
    CP_OBJ_PICKLE_LOADS,
    CP_OBJ_QUEUE_EMPTY, CP_OBJ_QUEUE_FULL, /* queue.Empty / queue.Full */
    /* process.c: what a forked child's bootstrap reads (set by fork_setup) */
    CP_OBJ_FORK_KEYS, CP_OBJ_FORK_PROCESS_DICT, CP_OBJ_FORK_UTIL_DICT, CP_OBJ_FORK_AFTERFORK,
    CP_OBJ_FORK_THREADING_DICT, CP_OBJ_FORK_SYS_DICT, CP_OBJ_FORK_ATEXIT_DICT,
    CP_NSLOTS_USED
};
#define CP_NSLOTS 32
_Static_assert(CP_NSLOTS_USED <= CP_NSLOTS, "module state: raise CP_NSLOTS");

typedef struct {
    PyObject *slot[CP_NSLOTS];
} cp_state;

extern PyModuleDef cp_moduledef;

static inline cp_state *cp_get_state(PyObject *module)
{
    return (cp_state *)PyModule_GetState(module);
}

/* State from an instance of one of our heap types (works for subclasses too). */
static inline cp_state *cp_state_from_type(PyTypeObject *tp)
{
    PyObject *m = PyType_GetModuleByDef(tp, &cp_moduledef);
    return m ? cp_get_state(m) : NULL;
}

/* The raised exception as one object, normalised, traceback attached (the error indicator is
   cleared); and back. The 3.12 API, on 3.11 too. */
static inline PyObject *cp_fetch_exc(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb && v)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
#endif
}

static inline void cp_restore_exc(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* Raise OSError from a negative errno, naming the syscall ("read: Bad file descriptor").
   Returns NULL so callers can `return cp_err_errno(...)`. */
PyObject *cp_err_errno(int neg_errno, const char *syscall);

/* Add a heap type made from spec to the module and remember it in slot. 0 or -1. */
int cp_add_type(PyObject *module, int slot, PyType_Spec *spec, PyObject *base);

/* Part initialisers, called from the module's exec slot; each returns 0 or -1. */
int cp_exec_process(PyObject *module);
int cp_exec_pool(PyObject *module);
int cp_exec_pool_payload(PyObject *module);
int cp_exec_connection(PyObject *module);
int cp_exec_synchronize(PyObject *module);
int cp_exec_queue(PyObject *module);
int cp_exec_shared_memory(PyObject *module);

#endif
