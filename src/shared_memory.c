/* Bindings for named POSIX shared memory: _core.shm_open/shm_unlink. */
#include "module.h"
#include "core/posix_shm.h"

#include <limits.h>
#include <string.h>

static int raise_errno(int neg, PyObject *name)
{
    errno = -neg;
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    return -1;
}

/* The UTF-8 of a segment name; a NUL inside it would silently name another segment. */
static const char *name_utf8(PyObject *name_obj, const char *usage)
{
    if (!PyUnicode_Check(name_obj)) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    Py_ssize_t len;
    const char *name = PyUnicode_AsUTF8AndSize(name_obj, &len);
    if (name && (Py_ssize_t)strlen(name) != len) {
        PyErr_SetString(PyExc_ValueError, "embedded null character");
        return NULL;
    }
    return name;
}

static PyObject *shm_open_(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    static const char usage[] = "shm_open(name: str, flags: int, mode: int, size: int)";
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    const char *name = name_utf8(args[0], usage);
    if (!name)
        return NULL;
    long flags = PyLong_AsLong(args[1]);
    if (flags == -1 && PyErr_Occurred())
        return NULL;
    long mode = PyLong_AsLong(args[2]);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    if (flags < INT_MIN || flags > INT_MAX || mode < 0 || mode > 07777) {
        PyErr_SetString(PyExc_OverflowError, "shm_open: flags or mode out of range");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[3]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "'size' must be a positive integer");
        return NULL;
    }
    int fd = -1, r;
    size_t actual = 0;
    Py_BEGIN_ALLOW_THREADS
    r = cp_pshm_open(name, (int)flags, (int)mode, (size_t)size, &fd, &actual);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        raise_errno(r, args[0]);
        return NULL;
    }
    return Py_BuildValue("(in)", fd, (Py_ssize_t)actual);
}

static PyObject *shm_unlink_(PyObject *self, PyObject *name_obj)
{
    (void)self;
    const char *name = name_utf8(name_obj, "shm_unlink(name: str)");
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
    {"shm_open", (PyCFunction)(void (*)(void))shm_open_, METH_FASTCALL,
     "shm_open(name, flags, mode, size) -> (fd, size): open (or create, sized) a named segment,\n"
     "close-on-exec; size is ftruncated when flags hold O_CREAT and size > 0."},
    {"shm_unlink", shm_unlink_, METH_O, "shm_unlink(name): remove the segment's name."},
    {NULL, NULL, 0, NULL},
};

int cp_exec_shared_memory(PyObject *module)
{
    return PyModule_AddFunctions(module, shm_functions);
}
