/* Connection bindings: the cpool.connection.Connection type (framing, I/O and pickling in C,
   the standard library's wire format), Pipe() and wait() over fds with poll(2). */
#include "module.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "structmember.h"

#include "deadline.h"
#include "frame.h"
#include "spin.h"

/* A message without maxlength is allocated at its full size up to this; above it the buffer
   grows (by doubling, mremap for large blocks, so no copy) as data arrives, so a garbage
   length followed by EOF costs at most twice what actually came. */
#define GROW_START ((size_t)64 << 20)
/* Payloads from this size up make the connection ask for a bigger kernel buffer once. */
#define BULK_BYTES (64 << 10)
#define BULK_BUFFER (1 << 20)

typedef struct {
    PyObject_HEAD
    int fd; /* -1 once closed */
    char readable;
    char writable;
    char is_sock;
    char grown; /* kernel buffer already enlarged for bulk transfers */
    cp_spin_t spin; /* how long a recv polls for the next message before it blocks */
    PyObject *weakreflist;
    /* The message being read. A receive that a signal handler's exception (Ctrl-C) or a
       timeout stops mid-message leaves its progress here and the next receive goes on with
       it, so nothing is lost and the stream stays in step (the standard library's next
       receive reads payload bytes as a header). Keeping the partly filled payload also spares
       KeyboardInterrupt the free of a large one (the kernel unmaps ~600 MB per 0.1 s). */
    struct {
        unsigned char hdr[CP_FRAME_HDR_MAX];
        size_t hdr_done;   /* header bytes read: 4, then 12 for a long header */
        int have_len;      /* hdr is whole and len decoded */
        uint64_t len;      /* payload length */
        PyObject *payload; /* bytes of cap bytes being filled, done of them read; or NULL */
        size_t cap, done;
    } rx;
} ConnObject;

static inline cp_state *state_of(PyTypeObject *defining_class)
{
    return (cp_state *)PyType_GetModuleState(defining_class);
}

/* ---- argument checks with the standard library's messages ---- */

static int check_closed(ConnObject *self)
{
    if (self->fd < 0) {
        PyErr_SetString(PyExc_OSError, "handle is closed");
        return -1;
    }
    return 0;
}

static int check_readable(ConnObject *self)
{
    if (check_closed(self) < 0)
        return -1;
    if (!self->readable) {
        PyErr_SetString(PyExc_OSError, "connection is write-only");
        return -1;
    }
    return 0;
}

static int check_writable(ConnObject *self)
{
    if (check_closed(self) < 0)
        return -1;
    if (!self->writable) {
        PyErr_SetString(PyExc_OSError, "connection is read-only");
        return -1;
    }
    return 0;
}

/* The next receive starts a new message. */
static void rx_reset(ConnObject *self)
{
    Py_CLEAR(self->rx.payload);
    memset(&self->rx, 0, sizeof self->rx);
}

/* Closing ends the message being read, if any. */
static void close_fd(ConnObject *self)
{
    int fd = self->fd;
    self->fd = -1;
    rx_reset(self);
    if (fd >= 0)
        close(fd); /* never retried on EINTR: the fd is gone either way on Linux */
}

/* The stream is out of step after a refused length (its payload was not read): a duplex
   connection stops reading, a read-only one is closed, as the standard library does. */
static PyObject *bad_message_length(ConnObject *self)
{
    rx_reset(self);
    if (self->writable)
        self->readable = 0;
    else
        close_fd(self);
    PyErr_SetString(PyExc_OSError, "bad message length");
    return NULL;
}

/* Optional timeout argument: None -> no deadline. -1 on error. */
static int parse_deadline(PyObject *obj, int64_t *deadline)
{
    if (obj == NULL || obj == Py_None) {
        *deadline = CP_NO_DEADLINE;
        return 0;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    *deadline = cp_deadline_after(t);
    return 0;
}

/* ---- I/O with the GIL released; signals checked between attempts ---- */

/* Read exactly len bytes (resuming at *done). 0 done, CP_FRAME_EOF, -1 with an exception. */
static int read_exact(ConnObject *self, int fd, void *buf, size_t len, size_t *done,
                      int64_t deadline)
{
    for (;;) {
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = cp_read_full(fd, buf, len, done, deadline, self->is_sock);
        Py_END_ALLOW_THREADS
        if (r >= 0)
            return r;
        if (r == -EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        if (r == -ETIMEDOUT)
            PyErr_SetString(PyExc_TimeoutError, "timed out waiting for a message");
        else
            cp_err_errno(r, "read");
        return -1;
    }
}

static int write_frame(ConnObject *self, const void *data, size_t len)
{
    unsigned char hdr[CP_FRAME_HDR_MAX];
    struct iovec iov[2];
    iov[0].iov_base = hdr;
    iov[0].iov_len = cp_frame_header_encode(hdr, len);
    iov[1].iov_base = (void *)data;
    iov[1].iov_len = len;
    int fd = self->fd;
    if (len >= BULK_BYTES && !self->grown) {
        self->grown = 1;
        cp_fd_grow_buffer(fd, self->is_sock, BULK_BUFFER);
    }
    size_t done = 0;
    for (;;) {
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = cp_write_iov(fd, iov, 2, &done, self->is_sock);
        Py_END_ALLOW_THREADS
        if (r == 0)
            return 0;
        if (r == -EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        cp_err_errno(r, "write");
        return -1;
    }
}

static int fd_has_input(void *fd)
{
    struct pollfd p = {.fd = *(int *)fd, .events = POLLIN};
    return poll(&p, 1, 0) != 0; /* ready, hung up, or an error the read will report */
}

/* read_exact's end of file within a message: the message is gone, and so is the stream. */
static int rx_eof(ConnObject *self, int in_message)
{
    if (in_message)
        PyErr_SetString(PyExc_OSError, "got end of file during message");
    else
        PyErr_SetNone(PyExc_EOFError);
    rx_reset(self);
    return -1;
}

/* Read (the rest of) the current message's header: 0 and rx.len; -1 with an exception
   (EOFError when nothing came). Progress stays in self->rx when it stops mid-header. */
static int rx_header(ConnObject *self, int fd, int64_t deadline)
{
    if (self->rx.have_len)
        return 0;
    unsigned char *h = self->rx.hdr;
    if (self->rx.hdr_done == 0 &&
        (deadline == CP_NO_DEADLINE || cp_deadline_left_ns(deadline) > CP_SPIN_MAX_NS)) {
        /* A reply often comes within microseconds when the peer runs on another core; a
           sleep in read() and the wake-up cost far more (tens of microseconds in a VM whose
           idle core halts). So poll for a while first; the budget adapts (spin.h). */
        Py_BEGIN_ALLOW_THREADS
        cp_spin_until(fd_has_input, &fd, &self->spin, 1);
        Py_END_ALLOW_THREADS
    }
    int r = 0;
    if (self->rx.hdr_done < 4)
        r = read_exact(self, fd, h, 4, &self->rx.hdr_done, deadline);
    if (r == CP_FRAME_EOF)
        return rx_eof(self, self->rx.hdr_done > 0);
    if (r < 0)
        return -1;
    int kind = cp_frame_header_short(h, &self->rx.len);
    if (kind == 1) {
        size_t done = self->rx.hdr_done - 4;
        r = read_exact(self, fd, h + 4, 8, &done, deadline);
        self->rx.hdr_done = 4 + done;
        if (r == CP_FRAME_EOF)
            return rx_eof(self, 1);
        if (r < 0)
            return -1;
        self->rx.len = cp_frame_header_long(h + 4);
    } else if (kind < 0) {
        bad_message_length(self);
        return -1;
    }
    self->rx.have_len = 1;
    return 0;
}

/* Start the current message's payload: a bytes object of its size up to GROW_START (of at least
   `filled` bytes), holding the `filled` bytes already read at src. 0, or -1 with MemoryError. */
static int rx_start_payload(ConnObject *self, const char *src, size_t filled)
{
    uint64_t len = self->rx.len;
    size_t cap = len < GROW_START ? (size_t)len : filled > GROW_START ? filled : GROW_START;
    if (!(self->rx.payload = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap)))
        return -1;
    if (filled)
        memcpy(PyBytes_AS_STRING(self->rx.payload), src, filled);
    self->rx.cap = cap;
    self->rx.done = filled;
    return 0;
}

/* Read (the rest of) the current message's payload into a bytes object of its exact size
   (no intermediate copy; grown by doubling from GROW_START so that a bogus length followed by
   EOF costs at most twice what came). The message, its progress reset; NULL with an exception,
   the progress kept when a signal or the deadline stopped it. */
static PyObject *rx_payload(ConnObject *self, int fd, int64_t deadline)
{
    uint64_t len = self->rx.len;
    if (!self->rx.payload && rx_start_payload(self, NULL, 0) < 0)
        return NULL;
    for (;;) {
        int r = read_exact(self, fd, PyBytes_AS_STRING(self->rx.payload), self->rx.cap,
                           &self->rx.done, deadline);
        if (r == CP_FRAME_EOF) {
            rx_eof(self, 1);
            return NULL;
        }
        if (r < 0)
            return NULL;
        if (self->rx.cap == len) {
            PyObject *b = self->rx.payload;
            self->rx.payload = NULL;
            rx_reset(self);
            return b;
        }
        size_t cap = (uint64_t)self->rx.cap * 2 < len ? self->rx.cap * 2 : (size_t)len;
        if (_PyBytes_Resize(&self->rx.payload, (Py_ssize_t)cap) < 0) {
            rx_reset(self); /* the payload was freed: the stream is out of step */
            return NULL;
        }
        self->rx.cap = cap;
    }
}

/* Refuse a message longer than maxlength (< 0: no limit) or than a bytes object can be. */
static int rx_check_length(ConnObject *self, Py_ssize_t maxlength)
{
    uint64_t len = self->rx.len;
    if ((maxlength >= 0 && len > (uint64_t)maxlength) || len > (uint64_t)PY_SSIZE_T_MAX) {
        bad_message_length(self);
        return -1;
    }
    return 0;
}

/* One whole message as bytes; maxlength < 0 means no limit. */
static PyObject *recv_message(ConnObject *self, Py_ssize_t maxlength, int64_t deadline)
{
    int fd = self->fd;
    if (rx_header(self, fd, deadline) < 0 || rx_check_length(self, maxlength) < 0)
        return NULL;
    return rx_payload(self, fd, deadline);
}

/* ---- methods ---- */

static int conn_init(PyObject *op, PyObject *args, PyObject *kwds)
{
    ConnObject *self = (ConnObject *)op;
    static char *kwlist[] = {"handle", "readable", "writable", NULL};
    PyObject *handle;
    int readable = 1, writable = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|pp:Connection", kwlist, &handle, &readable,
                                     &writable))
        return -1;
    PyObject *idx = PyNumber_Index(handle);
    if (!idx)
        return -1;
    long fd = PyLong_AsLong(idx);
    Py_DECREF(idx);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "invalid handle");
        return -1;
    }
    if (!readable && !writable) {
        PyErr_SetString(PyExc_ValueError,
                        "at least one of `readable` and `writable` must be True");
        return -1;
    }
    close_fd(self); /* __init__ called again: the old fd is ours to close */
    self->fd = (int)fd;
    self->readable = (char)readable;
    self->writable = (char)writable;
    self->is_sock = cp_fd_is_socket((int)fd) == 1;
    self->grown = 0;
    return 0;
}

static PyObject *conn_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ConnObject *self = (ConnObject *)type->tp_alloc(type, 0);
    if (self) {
        self->fd = -1;
        self->spin = (cp_spin_t)CP_SPIN_LONG;
    }
    return (PyObject *)self;
}

/* Make a Connection over fd (which it then owns); used by Pipe(). */
static PyObject *conn_from_fd(PyTypeObject *type, int fd, int readable, int writable, int is_sock)
{
    ConnObject *self = (ConnObject *)conn_new(type, NULL, NULL);
    if (!self) {
        close(fd);
        return NULL;
    }
    self->fd = fd;
    self->readable = (char)readable;
    self->writable = (char)writable;
    self->is_sock = (char)is_sock;
    return (PyObject *)self;
}

static void conn_dealloc(PyObject *op)
{
    ConnObject *self = (ConnObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (self->weakreflist)
        PyObject_ClearWeakRefs(op);
    close_fd(self);
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* Buffer argument + offset/size checks, with the standard library's messages. */
static int get_send_slice(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                          Py_buffer *view, Py_ssize_t *off, Py_ssize_t *size)
{
    static const char *names[] = {"buf", "offset", "size"};
    PyObject *a[3] = {NULL, NULL, NULL};
    if (nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "send_bytes() takes at most 3 arguments");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        a[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int i = 0; i < 3; i++) {
            if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0) {
                if (a[i]) {
                    PyErr_Format(PyExc_TypeError, "send_bytes() got multiple values for "
                                 "argument '%s'", names[i]);
                    return -1;
                }
                a[i] = args[nargs + k];
                found = 1;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "send_bytes() got an unexpected keyword argument '%U'",
                         name);
            return -1;
        }
    }
    if (!a[0]) {
        PyErr_SetString(PyExc_TypeError, "send_bytes() missing required argument 'buf'");
        return -1;
    }
    Py_ssize_t o = 0, s = -1;
    if (a[1]) {
        o = PyNumber_AsSsize_t(a[1], PyExc_OverflowError);
        if (o == -1 && PyErr_Occurred())
            return -1;
    }
    if (a[2] && a[2] != Py_None) {
        s = PyNumber_AsSsize_t(a[2], PyExc_OverflowError);
        if (s == -1 && PyErr_Occurred())
            return -1;
        if (s < 0) {
            PyErr_SetString(PyExc_ValueError, "size is negative");
            return -1;
        }
    }
    if (PyObject_GetBuffer(a[0], view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    Py_ssize_t n = view->len;
    const char *err = NULL;
    if (o < 0)
        err = "offset is negative";
    else if (n < o)
        err = "buffer length < offset";
    else if (s < 0)
        s = n - o;
    else if (o + s > n)
        err = "buffer length < offset + size";
    if (err) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    *off = o;
    *size = s;
    return 0;
}

static PyObject *conn_send_bytes(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    ConnObject *self = (ConnObject *)op;
    if (check_writable(self) < 0)
        return NULL;
    Py_buffer view;
    Py_ssize_t off, size;
    if (get_send_slice(args, nargs, kwnames, &view, &off, &size) < 0)
        return NULL;
    int r = write_frame(self, (const char *)view.buf + off, (size_t)size);
    PyBuffer_Release(&view);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *conn_send(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    ConnObject *self = (ConnObject *)op;
    if (nargs != 1 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "send() takes exactly one argument (obj)");
        return NULL;
    }
    if (check_writable(self) < 0)
        return NULL;
    cp_state *st = state_of(cls);
    PyObject *pargs[2] = {args[0], PyLong_FromLong(5)}; /* protocol 5: small int, no leak */
    PyObject *data = PyObject_Vectorcall(st->slot[CP_OBJ_PICKLE_DUMPS], pargs, 2, NULL);
    Py_DECREF(pargs[1]);
    if (!data)
        return NULL;
    int r;
    if (PyBytes_CheckExact(data)) {
        r = write_frame(self, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
    } else {
        Py_buffer view;
        r = PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS);
        if (r == 0) {
            r = write_frame(self, view.buf, (size_t)view.len);
            PyBuffer_Release(&view);
        }
    }
    Py_DECREF(data);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int parse_maxlength(PyObject *obj, Py_ssize_t *maxlength)
{
    *maxlength = -1;
    if (obj == NULL || obj == Py_None)
        return 0;
    Py_ssize_t m = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (m == -1 && PyErr_Occurred())
        return -1;
    if (m < 0) {
        PyErr_SetString(PyExc_ValueError, "negative maxlength");
        return -1;
    }
    *maxlength = m;
    return 0;
}

static PyObject *conn_recv_bytes(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    ConnObject *self = (ConnObject *)op;
    PyObject *maxobj = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                      "maxlength") != 0)) {
        PyErr_SetString(PyExc_TypeError, "recv_bytes() takes at most one argument (maxlength)");
        return NULL;
    }
    if (nargs + nkw == 1)
        maxobj = args[0];
    if (check_readable(self) < 0)
        return NULL;
    Py_ssize_t maxlength;
    if (parse_maxlength(maxobj, &maxlength) < 0)
        return NULL;
    return recv_message(self, maxlength, CP_NO_DEADLINE);
}

/* _recv_bytes_timeout(maxlength, timeout): recv_bytes with a deadline (TimeoutError); the
   Listener uses it so a silent client cannot hold accept() for ever. */
static PyObject *conn_recv_bytes_timeout(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    ConnObject *self = (ConnObject *)op;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_recv_bytes_timeout(maxlength, timeout)");
        return NULL;
    }
    if (check_readable(self) < 0)
        return NULL;
    Py_ssize_t maxlength;
    int64_t deadline;
    if (parse_maxlength(args[0], &maxlength) < 0 || parse_deadline(args[1], &deadline) < 0)
        return NULL;
    return recv_message(self, maxlength, deadline);
}

static PyObject *conn_recv(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                           Py_ssize_t nargs, PyObject *kwnames)
{
    ConnObject *self = (ConnObject *)op;
    if (nargs || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "recv() takes no arguments");
        return NULL;
    }
    if (check_readable(self) < 0)
        return NULL;
    PyObject *data = recv_message(self, -1, CP_NO_DEADLINE);
    if (!data)
        return NULL;
    PyObject *obj = PyObject_Vectorcall(state_of(cls)->slot[CP_OBJ_PICKLE_LOADS], &data, 1, NULL);
    Py_DECREF(data);
    return obj;
}

static PyObject *conn_recv_bytes_into(PyObject *op, PyTypeObject *cls, PyObject *const *args,
                                      Py_ssize_t nargs, PyObject *kwnames)
{
    ConnObject *self = (ConnObject *)op;
    PyObject *bufobj = NULL, *offobj = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "recv_bytes_into() takes at most 2 arguments");
        return NULL;
    }
    if (nargs > 0)
        bufobj = args[0];
    if (nargs > 1)
        offobj = args[1];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        PyObject **slot = NULL;
        if (PyUnicode_CompareWithASCIIString(name, "buf") == 0)
            slot = &bufobj;
        else if (PyUnicode_CompareWithASCIIString(name, "offset") == 0)
            slot = &offobj;
        if (!slot || *slot) {
            PyErr_Format(PyExc_TypeError, "recv_bytes_into() got an unexpected or repeated "
                         "keyword argument '%U'", name);
            return NULL;
        }
        *slot = args[nargs + k];
    }
    if (!bufobj) {
        PyErr_SetString(PyExc_TypeError, "recv_bytes_into() missing required argument 'buf'");
        return NULL;
    }
    if (check_readable(self) < 0)
        return NULL;
    Py_ssize_t off = 0;
    if (offobj) {
        off = PyNumber_AsSsize_t(offobj, PyExc_OverflowError);
        if (off == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(bufobj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *result = NULL;
    if (off < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        goto done;
    }
    if (off > view.len) {
        PyErr_SetString(PyExc_ValueError, "offset too large");
        goto done;
    }
    int fd = self->fd;
    if (rx_header(self, fd, CP_NO_DEADLINE) < 0 || rx_check_length(self, -1) < 0)
        goto done;
    uint64_t len = self->rx.len;
    if (len <= (uint64_t)(view.len - off) && !self->rx.payload) {
        /* Straight into the caller's buffer, which our Py_buffer keeps alive and in place. */
        size_t got = 0;
        int r = read_exact(self, fd, (char *)view.buf + off, (size_t)len, &got, CP_NO_DEADLINE);
        if (r == 0) {
            rx_reset(self);
            result = PyLong_FromSsize_t((Py_ssize_t)len);
        }
        else if (r == CP_FRAME_EOF)
            rx_eof(self, 1);
        else if (got > 0) {
            /* Stopped mid-message: what came so far is kept for the next receive, which
               need not be into this buffer. */
            if (rx_start_payload(self, (char *)view.buf + off, got) < 0)
                rx_reset(self);
        }
    } else {
        PyObject *whole = rx_payload(self, fd, CP_NO_DEADLINE);
        if (whole && len <= (uint64_t)(view.len - off)) {
            memcpy((char *)view.buf + off, PyBytes_AS_STRING(whole), (size_t)len);
            result = PyLong_FromSsize_t((Py_ssize_t)len);
        }
        else if (whole)
            PyErr_SetObject(state_of(cls)->slot[CP_EXC_BUFFER_TOO_SHORT], whole);
        Py_XDECREF(whole);
    }
done:
    PyBuffer_Release(&view);
    return result;
}

/* poll one fd for input until deadline: 1 ready, 0 not, -1 error. */
static int poll_one(int fd, int64_t deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = cp_poll_until(&p, 1, deadline);
        Py_END_ALLOW_THREADS
        if (r >= 0)
            return r > 0;
        if (r != -EINTR) {
            cp_err_errno(r, "poll");
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static PyObject *conn_poll(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    ConnObject *self = (ConnObject *)op;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                      "timeout") != 0)) {
        PyErr_SetString(PyExc_TypeError, "poll() takes at most one argument (timeout)");
        return NULL;
    }
    if (check_readable(self) < 0)
        return NULL;
    int64_t deadline = cp_now_ns();
    if (nargs + nkw == 1 && parse_deadline(args[0], &deadline) < 0)
        return NULL;
    int r = poll_one(self->fd, deadline);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *conn_fileno(PyObject *op, PyObject *unused)
{
    ConnObject *self = (ConnObject *)op;
    if (check_closed(self) < 0)
        return NULL;
    return PyLong_FromLong(self->fd);
}

static PyObject *conn_close(PyObject *op, PyObject *unused)
{
    close_fd((ConnObject *)op);
    Py_RETURN_NONE;
}

static PyObject *conn_enter(PyObject *op, PyObject *unused)
{
    return Py_NewRef(op);
}

static PyObject *conn_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    close_fd((ConnObject *)op);
    Py_RETURN_NONE;
}

/* Pickled only to reach a child being started (the fd is handed over by cpool.reduction). */
static PyObject *conn_reduce(PyObject *op, PyObject *unused)
{
    PyObject *mod = PyImport_ImportModule("cpool.connection");
    if (!mod)
        return NULL;
    PyObject *r = PyObject_CallMethod(mod, "reduce_connection", "O", op);
    Py_DECREF(mod);
    return r;
}

static PyObject *conn_get_closed(PyObject *op, void *c)
{
    return PyBool_FromLong(((ConnObject *)op)->fd < 0);
}

static PyObject *conn_get_readable(PyObject *op, void *c)
{
    return PyBool_FromLong(((ConnObject *)op)->readable);
}

static PyObject *conn_get_writable(PyObject *op, void *c)
{
    return PyBool_FromLong(((ConnObject *)op)->writable);
}

/* The standard library's private attribute, kept for code that reads it (or sets it to None
   to give the fd up without closing it). */
static PyObject *conn_get_handle(PyObject *op, void *c)
{
    ConnObject *self = (ConnObject *)op;
    if (self->fd < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->fd);
}

static int conn_set_handle(PyObject *op, PyObject *value, void *c)
{
    ConnObject *self = (ConnObject *)op;
    if (value == NULL || value == Py_None) {
        self->fd = -1;
        return 0;
    }
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "invalid handle");
        return -1;
    }
    self->fd = (int)fd;
    self->is_sock = cp_fd_is_socket((int)fd) == 1;
    return 0;
}

static PyObject *conn_repr(PyObject *op)
{
    ConnObject *self = (ConnObject *)op;
    const char *mode = self->readable ? (self->writable ? "rw" : "r") : "w";
    if (self->fd < 0)
        return PyUnicode_FromFormat("<%s closed>", Py_TYPE(op)->tp_name);
    return PyUnicode_FromFormat("<%s fd=%d %s>", Py_TYPE(op)->tp_name, self->fd, mode);
}

#define FASTKW (METH_FASTCALL | METH_KEYWORDS)
#define CMETH (METH_METHOD | METH_FASTCALL | METH_KEYWORDS)

static PyMethodDef conn_methods[] = {
    {"send", (PyCFunction)(void (*)(void))conn_send, CMETH,
     "send(obj)\n\nSend a picklable object (pickle protocol 5)."},
    {"recv", (PyCFunction)(void (*)(void))conn_recv, CMETH,
     "recv() -> obj\n\nReceive an object sent with send(); EOFError when the peer is gone."},
    {"send_bytes", (PyCFunction)(void (*)(void))conn_send_bytes, FASTKW,
     "send_bytes(buf, offset=0, size=None)\n\nSend bytes from a bytes-like object."},
    {"recv_bytes", (PyCFunction)(void (*)(void))conn_recv_bytes, FASTKW,
     "recv_bytes(maxlength=None) -> bytes\n\nOSError('bad message length') above maxlength."},
    {"recv_bytes_into", (PyCFunction)(void (*)(void))conn_recv_bytes_into, CMETH,
     "recv_bytes_into(buf, offset=0) -> int\n\nBufferTooShort (holding the message) when it "
     "does not fit."},
    {"_recv_bytes_timeout", (PyCFunction)(void (*)(void))conn_recv_bytes_timeout, METH_FASTCALL,
     "_recv_bytes_timeout(maxlength, timeout) -> bytes; TimeoutError at the deadline."},
    {"poll", (PyCFunction)(void (*)(void))conn_poll, FASTKW,
     "poll(timeout=0.0) -> bool\n\nWhether input is available (None waits for ever)."},
    {"fileno", conn_fileno, METH_NOARGS, "The connection's file descriptor."},
    {"close", conn_close, METH_NOARGS, "Close the connection."},
    {"__enter__", conn_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))conn_exit, METH_FASTCALL, NULL},
    {"__reduce__", conn_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef conn_getset[] = {
    {"closed", conn_get_closed, NULL, "True if the connection is closed", NULL},
    {"readable", conn_get_readable, NULL, "True if the connection is readable", NULL},
    {"writable", conn_get_writable, NULL, "True if the connection is writable", NULL},
    {"_handle", conn_get_handle, conn_set_handle, "The fd, None once closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef conn_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(ConnObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot conn_slots[] = {
    {Py_tp_doc, "Connection(handle, readable=True, writable=True)\n\n"
                "A message connection over a file descriptor (a socket or a pipe), in the "
                "standard library's wire format. It owns the fd and closes it."},
    {Py_tp_new, conn_new},
    {Py_tp_init, conn_init},
    {Py_tp_dealloc, conn_dealloc},
    {Py_tp_repr, conn_repr},
    {Py_tp_methods, conn_methods},
    {Py_tp_getset, conn_getset},
    {Py_tp_members, conn_members},
    {0, NULL},
};

static PyType_Spec conn_spec = {
    .name = "cpool.connection.Connection",
    .basicsize = sizeof(ConnObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = conn_slots,
};

/* ---- module functions ---- */

/* Pipe(duplex=True) -> (Connection, Connection); a socketpair when duplex, else a one-way
   pipe (reading end first). Both fds close-on-exec from birth. */
static PyObject *cp_pipe(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                      "duplex") != 0)) {
        PyErr_SetString(PyExc_TypeError, "Pipe() takes at most one argument (duplex)");
        return NULL;
    }
    int duplex = 1;
    if (nargs + nkw == 1 && (duplex = PyObject_IsTrue(args[0])) < 0)
        return NULL;
    PyTypeObject *tp = (PyTypeObject *)cp_get_state(module)->slot[CP_TYPE_CONNECTION];
    int fds[2];
    if (duplex) {
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0)
            return cp_err_errno(-errno, "socketpair");
    } else if (pipe2(fds, O_CLOEXEC) < 0) {
        return cp_err_errno(-errno, "pipe2");
    }
    PyObject *c1 = conn_from_fd(tp, fds[0], 1, duplex, duplex);
    if (!c1) {
        close(fds[1]);
        return NULL;
    }
    PyObject *c2 = conn_from_fd(tp, fds[1], duplex, 1, duplex);
    if (!c2) {
        Py_DECREF(c1);
        return NULL;
    }
    return Py_BuildValue("(NN)", c1, c2);
}

/* The fd to poll for obj: a Connection's own, an int, or obj.fileno(). -1 with an exception. */
static int fd_of(PyTypeObject *conn_type, PyObject *obj)
{
    if (PyObject_TypeCheck(obj, conn_type)) {
        ConnObject *c = (ConnObject *)obj;
        return check_closed(c) < 0 ? -1 : c->fd;
    }
    return PyObject_AsFileDescriptor(obj);
}

/* wait(object_list, timeout=None) -> the objects ready to read (or at EOF), in list order. */
static PyObject *cp_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    static const char *names[] = {"object_list", "timeout"};
    PyObject *a[2] = {NULL, NULL};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2)
        goto usage;
    for (Py_ssize_t i = 0; i < nargs; i++)
        a[i] = args[i];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        int i = 0;
        while (i < 2 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, k), names[i]))
            i++;
        if (i == 2 || a[i])
            goto usage;
        a[i] = args[nargs + k];
    }
    if (!a[0])
        goto usage;
    int64_t deadline;
    if (parse_deadline(a[1], &deadline) < 0)
        return NULL;
    /* A tuple copy: a fileno() method cannot change the list under us. */
    PyObject *seq = PySequence_Tuple(a[0]);
    if (!seq)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyTypeObject *conn_type = (PyTypeObject *)cp_get_state(module)->slot[CP_TYPE_CONNECTION];
    struct pollfd stackfds[16];
    struct pollfd *pfds = n <= 16 ? stackfds : PyMem_Calloc((size_t)n, sizeof *pfds);
    PyObject *result = NULL;
    if (!pfds) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd = fd_of(conn_type, PyTuple_GET_ITEM(seq, i));
        if (fd < 0)
            goto done;
        pfds[i].fd = fd;
        pfds[i].events = POLLIN;
        pfds[i].revents = 0;
    }
    for (;;) {
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = cp_poll_until(pfds, (nfds_t)n, deadline);
        Py_END_ALLOW_THREADS
        if (r >= 0)
            break;
        if (r != -EINTR) {
            cp_err_errno(r, "poll");
            goto done;
        }
        if (PyErr_CheckSignals() < 0)
            goto done;
    }
    result = PyList_New(0);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        if (pfds[i].revents && PyList_Append(result, PyTuple_GET_ITEM(seq, i)) < 0)
            Py_CLEAR(result);
    }
done:
    if (pfds != stackfds)
        PyMem_Free(pfds);
    Py_DECREF(seq);
    return result;
usage:
    PyErr_SetString(PyExc_TypeError, "wait(object_list, timeout=None)");
    return NULL;
}

static PyMethodDef connection_functions[] = {
    {"Pipe", (PyCFunction)(void (*)(void))cp_pipe, FASTKW,
     "Pipe(duplex=True) -> (conn1, conn2)\n\nTwo Connections joined by a socketpair (duplex) or "
     "a pipe (conn1 reads, conn2 writes)."},
    {"wait", (PyCFunction)(void (*)(void))cp_wait, FASTKW,
     "wait(object_list, timeout=None) -> list\n\nWait until objects (Connections, sockets, fds, "
     "process sentinels) are ready to read."},
    {NULL, NULL, 0, NULL},
};

int cp_exec_connection(PyObject *module)
{
    if (cp_add_type(module, CP_TYPE_CONNECTION, &conn_spec, NULL) < 0)
        return -1;
    return PyModule_AddFunctions(module, connection_functions);
}
