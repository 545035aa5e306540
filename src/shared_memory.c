/* Bindings for named POSIX shared memory: _core.shm_create/shm_attach/shm_unlink. */
#include "module.h"
#include "core/posix_shm.h"

static int raise_errno(int neg, PyObject *name)
{
    errno = -neg;
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    return -1;
}

static PyObject *shm_create(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "shm_create(name: str, size: int)");
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(args[0]);
    if (!name)
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "'size' must be a positive number different from zero");
        return NULL;
    }
    int fd = -1, r;
    Py_BEGIN_ALLOW_THREADS
    r = cp_pshm_create(name, (size_t)size, &fd);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        raise_errno(r, args[0]);
        return NULL;
    }
    return PyLong_FromLong(fd);
}

static PyObject *shm_attach(PyObject *self, PyObject *name_obj)
{
    (void)self;
    if (!PyUnicode_Check(name_obj)) {
        PyErr_SetString(PyExc_TypeError, "shm_attach(name: str)");
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(name_obj);
    if (!name)
        return NULL;
    int fd = -1, r;
    size_t size = 0;
    Py_BEGIN_ALLOW_THREADS
    r = cp_pshm_attach(name, &fd, &size);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        raise_errno(r, name_obj);
        return NULL;
    }
    return Py_BuildValue("(in)", fd, (Py_ssize_t)size);
}

static PyObject *shm_unlink_(PyObject *self, PyObject *name_obj)
{
    (void)self;
    if (!PyUnicode_Check(name_obj)) {
        PyErr_SetString(PyExc_TypeError, "shm_unlink(name: str)");
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(name_obj);
    if (!name)
        return NULL;
    int r = cp_pshm_unlink(name);
    if (r < 0) {
        raise_errno(r, name_obj);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef shm_functions[] = {
    {"shm_create", (PyCFunction)(void (*)(void))shm_create, METH_FASTCALL,
     "shm_create(name, size) -> fd: a new named segment (O_EXCL, close-on-exec), sized."},
    {"shm_attach", shm_attach, METH_O, "shm_attach(name) -> (fd, size) of an existing segment."},
    {"shm_unlink", shm_unlink_, METH_O, "shm_unlink(name): remove the segment's name."},
    {NULL, NULL, 0, NULL},
};

int cp_exec_shared_memory(PyObject *module)
{
    return PyModule_AddFunctions(module, shm_functions);
}
