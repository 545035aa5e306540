/* Queue bindings: cpool._core.Queue, the C base class of cpool.queues.Queue, SimpleQueue and
   JoinableQueue. Objects are encoded in the caller (common exact types directly, the rest with
   pickle protocol 5, large buffers out of band) and copied once into the shared ring. */
#include "module.h"

#include <errno.h>
#include <string.h>

#include "deadline.h"
#include "pool_payload.h"
#include "ring.h"

/* Record kinds. Exact builtin types skip pickle altogether (subclasses are pickled). */
enum {
    K_PICKLE = 0, /* pickle bytes */
    K_PICKLE5,    /* [nbuf][pickle len][buffer len x nbuf] pickle, then 8-aligned buffers */
    K_NONE,
    K_TRUE,
    K_FALSE,
    K_INT,        /* int64 */
    K_FLOAT,      /* double */
    K_BYTES,
    K_BYTEARRAY,
    K_STR,        /* UTF-8 */
};

/* Copies above this size run with the GIL released. */
#define BIG_COPY (64 * 1024)
/* A blocking put of at least this many bytes that finds the hot ring full waits a little for a
   reader that is taking records, rather than spill into the cold ring (first-touch page faults
   there cost more than the copy). It spills as soon as readers stall. */
#define FLOW_MIN (64 * 1024)
#define FLOW_STEP_NS 2000000LL
#define FLOW_MAX_NS 20000000LL
#define STACK_GET 8192
#define MANY_CHUNK (256 * 1024)

/* The destination of a large get whose copy Ctrl-C stopped: a bytes/bytearray (owner) or heap
   scratch, of cap bytes, for the records of one allocation class (dst_class). */
typedef struct {
    PyObject *owner;
    char *scratch;
    size_t cap;
    int cls;
} spare_dst;

typedef struct {
    PyObject_HEAD
    cp_ring_t ring;
    int attached;
    int closed;   /* this handle only, as in the standard library */
    int put_used; /* put() was called through this handle (empty() after close() raises) */
    int joinable; /* put() counts a task that task_done() finishes */
    PyObject *dumps, *loads, *empty_exc, *full_exc;
    PyObject *protocol;        /* 5 */
    PyObject *kw_callback;     /* ("buffer_callback",) */
    PyObject *kw_buffers;      /* ("buffers",) */
    spare_dst spare;           /* a large get's destination kept over Ctrl-C (get_large) */
} QueueObject;

/* ---- encoding one object into pieces of a ring message ---- */

#define INLINE_PIECES 4

typedef struct {
    cp_ring_msg msg;
    cp_ring_piece inline_pieces[INLINE_PIECES];
    cp_ring_piece *pieces;   /* inline_pieces or heap (out-of-band buffers) */
    unsigned char scalar[8]; /* int / float payload */
    uint64_t *oob_header;    /* K_PICKLE5 header, heap */
    PyObject *keep;          /* object whose memory the pieces point into (owned) */
    Py_buffer *views;        /* exported buffers held while copying */
    Py_ssize_t nviews;
    Py_buffer own_view;      /* bytearray payload */
    int has_own_view;
} encoded;

static const unsigned char zeros[8];

static void encoded_clear(encoded *e)
{
    if (e->has_own_view)
        PyBuffer_Release(&e->own_view);
    for (Py_ssize_t i = 0; i < e->nviews; i++)
        PyBuffer_Release(&e->views[i]);
    PyMem_Free(e->views);
    PyMem_Free(e->oob_header);
    if (e->pieces != e->inline_pieces)
        PyMem_Free(e->pieces);
    Py_CLEAR(e->keep);
    memset(e, 0, sizeof *e);
}

static void set_single(encoded *e, uint32_t kind, const void *base, size_t len)
{
    e->pieces = e->inline_pieces;
    e->msg.kind = kind;
    e->msg.pieces = e->pieces;
    if (len == 0) {
        e->msg.npieces = 0;
        e->msg.len = 0;
        return;
    }
    e->pieces[0].base = base;
    e->pieces[0].len = len;
    e->msg.npieces = 1;
    e->msg.len = len;
}

/* Pickle; with out-of-band buffers when obj may have some: the pickle, then each buffer copied
   straight from the object (e.g. a numpy array's data) into the ring. Falls back to in-band for
   non-contiguous buffers. Returns 0 or -1 with an exception (the put raises, nothing written). */
static int encode_pickle(QueueObject *q, PyObject *obj, encoded *e)
{
    PyObject *data;
    if (!cp_may_have_buffers(obj, 0)) {
        PyObject *args[2] = {obj, q->protocol};
        if (!(data = PyObject_Vectorcall(q->dumps, args, 2, NULL)))
            return -1;
        e->keep = data;
        set_single(e, K_PICKLE, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
        return 0;
    }
    PyObject *bufs = PyList_New(0);
    if (!bufs)
        return -1;
    PyObject *append = PyObject_GetAttrString(bufs, "append");
    if (!append) {
        Py_DECREF(bufs);
        return -1;
    }
    PyObject *args[3] = {obj, q->protocol, append};
    data = PyObject_Vectorcall(q->dumps, args, 2, q->kw_callback);
    Py_DECREF(append);
    if (!data) {
        Py_DECREF(bufs);
        return -1;
    }
    Py_ssize_t nbuf = PyList_GET_SIZE(bufs);
    if (nbuf > 0) {
        e->views = PyMem_Calloc((size_t)nbuf, sizeof(Py_buffer));
        if (!e->views)
            goto nomem;
        for (Py_ssize_t i = 0; i < nbuf; i++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(bufs, i), &e->views[i], PyBUF_C_CONTIGUOUS) < 0) {
                /* Not contiguous: pickle again with every buffer in band. */
                PyErr_Clear();
                for (Py_ssize_t k = 0; k < e->nviews; k++)
                    PyBuffer_Release(&e->views[k]);
                PyMem_Free(e->views);
                e->views = NULL;
                e->nviews = 0;
                nbuf = 0;
                Py_DECREF(data);
                data = PyObject_Vectorcall(q->dumps, args, 2, NULL);
                if (!data) {
                    Py_DECREF(bufs);
                    return -1;
                }
                break;
            }
            e->nviews++;
        }
    }
    Py_DECREF(bufs);
    e->keep = data;
    if (nbuf == 0) {
        set_single(e, K_PICKLE, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));
        return 0;
    }
    size_t hdr_n = 2 + (size_t)nbuf;
    e->oob_header = PyMem_Malloc(hdr_n * 8);
    e->pieces = PyMem_Malloc((2 + 2 * (size_t)nbuf) * sizeof(cp_ring_piece));
    if (!e->oob_header || !e->pieces)
        goto nomem;
    uint64_t plen = (uint64_t)PyBytes_GET_SIZE(data);
    e->oob_header[0] = (uint64_t)nbuf;
    e->oob_header[1] = plen;
    uint32_t np = 0;
    e->pieces[np++] = (cp_ring_piece){e->oob_header, hdr_n * 8};
    e->pieces[np++] = (cp_ring_piece){PyBytes_AS_STRING(data), plen};
    uint64_t total = hdr_n * 8 + plen;
    for (Py_ssize_t i = 0; i < nbuf; i++) {
        uint64_t pad = (8 - (total & 7)) & 7;
        if (pad) {
            e->pieces[np++] = (cp_ring_piece){zeros, pad};
            total += pad;
        }
        e->oob_header[2 + i] = (uint64_t)e->views[i].len;
        e->pieces[np++] = (cp_ring_piece){e->views[i].buf, (size_t)e->views[i].len};
        total += (uint64_t)e->views[i].len;
    }
    e->msg.kind = K_PICKLE5;
    e->msg.pieces = e->pieces;
    e->msg.npieces = np;
    e->msg.len = total;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

static int encode(QueueObject *q, PyObject *obj, encoded *e)
{
    memset(e, 0, sizeof *e);
    e->pieces = e->inline_pieces;
    PyTypeObject *tp = Py_TYPE(obj);
    if (obj == Py_None) {
        set_single(e, K_NONE, NULL, 0);
        return 0;
    }
    if (obj == Py_True || obj == Py_False) {
        set_single(e, obj == Py_True ? K_TRUE : K_FALSE, NULL, 0);
        return 0;
    }
    if (tp == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (!overflow) {
            memcpy(e->scalar, &v, 8);
            set_single(e, K_INT, e->scalar, 8);
            return 0;
        }
    }
    else if (tp == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(obj);
        memcpy(e->scalar, &d, 8);
        set_single(e, K_FLOAT, e->scalar, 8);
        return 0;
    }
    else if (tp == &PyBytes_Type) {
        Py_INCREF(obj);
        e->keep = obj;
        set_single(e, K_BYTES, PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj));
        return 0;
    }
    else if (tp == &PyByteArray_Type) {
        /* The export stops another thread from resizing it while we copy without the GIL. */
        if (PyObject_GetBuffer(obj, &e->own_view, PyBUF_SIMPLE) < 0)
            return -1;
        e->has_own_view = 1;
        set_single(e, K_BYTEARRAY, e->own_view.buf, (size_t)e->own_view.len);
        return 0;
    }
    else if (tp == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (s) {
            Py_INCREF(obj);
            e->keep = obj;
            set_single(e, K_STR, s, (size_t)n);
            return 0;
        }
        PyErr_Clear(); /* lone surrogates: pickle copes */
    }
    else if (tp == &PyMemoryView_Type) {
        /* memoryview does not pickle; as a PickleBuffer it goes out of band and arrives as a
           memoryview (over a bytearray in the receiver). */
        PyObject *pb = PyObject_CallOneArg((PyObject *)&PyPickleBuffer_Type, obj);
        if (!pb)
            return -1;
        int rc = encode_pickle(q, pb, e);
        Py_DECREF(pb);
        return rc;
    }
    return encode_pickle(q, obj, e);
}

/* ---- decoding one record ---- */

/* owner: the object the payload was copied into, when it is exactly what the kind wants
   (a bytes or bytearray of the right size); else NULL and ptr is scratch memory. */
static PyObject *decode(QueueObject *q, uint32_t kind, const char *ptr, uint64_t len, PyObject *owner)
{
    switch (kind) {
    case K_NONE:
        Py_RETURN_NONE;
    case K_TRUE:
        Py_RETURN_TRUE;
    case K_FALSE:
        Py_RETURN_FALSE;
    case K_INT: {
        long long v;
        memcpy(&v, ptr, 8);
        return PyLong_FromLongLong(v);
    }
    case K_FLOAT: {
        double d;
        memcpy(&d, ptr, 8);
        return PyFloat_FromDouble(d);
    }
    case K_BYTES:
        if (owner && PyBytes_CheckExact(owner) && (uint64_t)PyBytes_GET_SIZE(owner) == len)
            return Py_NewRef(owner);
        return PyBytes_FromStringAndSize(ptr, (Py_ssize_t)len);
    case K_BYTEARRAY:
        if (owner && PyByteArray_CheckExact(owner) && (uint64_t)PyByteArray_GET_SIZE(owner) == len)
            return Py_NewRef(owner);
        return PyByteArray_FromStringAndSize(ptr, (Py_ssize_t)len);
    case K_STR:
        return PyUnicode_DecodeUTF8(ptr, (Py_ssize_t)len, NULL);
    case K_PICKLE: {
        PyObject *mv = PyMemoryView_FromMemory((char *)ptr, (Py_ssize_t)len, PyBUF_READ);
        if (!mv)
            return NULL;
        PyObject *res = PyObject_CallOneArg(q->loads, mv);
        Py_DECREF(mv);
        return res;
    }
    case K_PICKLE5:
        break;
    default:
        PyErr_Format(PyExc_ValueError, "corrupt queue record (kind %u)", kind);
        return NULL;
    }
    /* Out-of-band buffers become slices of one bytearray holding the record, so numpy arrays
       and memoryviews use that memory without another copy. */
    PyObject *ba;
    if (owner && PyByteArray_CheckExact(owner) && (uint64_t)PyByteArray_GET_SIZE(owner) == len)
        ba = Py_NewRef(owner);
    else if (!(ba = PyByteArray_FromStringAndSize(ptr, (Py_ssize_t)len)))
        return NULL;
    const char *base = PyByteArray_AS_STRING(ba);
    uint64_t nbuf, plen;
    PyObject *res = NULL, *mv = NULL, *buffers = NULL, *pick = NULL;
    if (len < 16)
        goto corrupt;
    memcpy(&nbuf, base, 8);
    memcpy(&plen, base + 8, 8);
    if (nbuf > (len - 16) / 8 || plen > len - 16 - 8 * nbuf)
        goto corrupt;
    uint64_t at = 16 + 8 * nbuf;
    if (!(mv = PyMemoryView_FromObject(ba)) || !(buffers = PyList_New((Py_ssize_t)nbuf)))
        goto done;
    if (!(pick = PySequence_GetSlice(mv, (Py_ssize_t)at, (Py_ssize_t)(at + plen))))
        goto done;
    at += plen;
    for (uint64_t i = 0; i < nbuf; i++) {
        uint64_t blen;
        memcpy(&blen, base + 16 + 8 * i, 8);
        at = (at + 7) & ~7ULL;
        if (at > len || blen > len - at)
            goto corrupt;
        PyObject *s = PySequence_GetSlice(mv, (Py_ssize_t)at, (Py_ssize_t)(at + blen));
        if (!s)
            goto done;
        PyList_SET_ITEM(buffers, (Py_ssize_t)i, s);
        at += blen;
    }
    PyObject *args[2] = {pick, buffers};
    res = PyObject_Vectorcall(q->loads, args, 1, q->kw_buffers);
    goto done;
corrupt:
    PyErr_SetString(PyExc_ValueError, "corrupt queue record (out-of-band layout)");
done:
    Py_XDECREF(pick);
    Py_XDECREF(buffers);
    Py_XDECREF(mv);
    Py_DECREF(ba);
    return res;
}

/* ---- argument helpers ---- */

/* Fill out[0..n) from positional args then keywords named in names; missing ones stay as
   given (defaults). 0 or -1. */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const char *const *names, int n, int nrequired, PyObject **out)
{
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, n, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    if (kwnames) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            const char *key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
            if (!key)
                return -1;
            int j = 0;
            while (j < n && strcmp(names[j], key) != 0)
                j++;
            if (j == n) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%s'", fname, key);
                return -1;
            }
            if (j < nargs) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname, key);
                return -1;
            }
            out[j] = args[nargs + k];
        }
    }
    for (int j = 0; j < nrequired; j++) {
        if (!out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[j]);
            return -1;
        }
    }
    return 0;
}

/* block/timeout as the standard library reads them -> deadline; *blocking = 0 for no wait. */
static int read_deadline(PyObject *block, PyObject *timeout, int *blocking, int64_t *deadline)
{
    *blocking = block ? PyObject_IsTrue(block) : 1;
    if (*blocking < 0)
        return -1;
    *deadline = CP_NO_DEADLINE;
    if (*blocking && timeout && timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred())
            return -1;
        *deadline = cp_deadline_after(t);
    }
    return 0;
}

static int check_open(QueueObject *q)
{
    if (!q->attached) {
        PyErr_SetString(PyExc_ValueError, "queue not initialized");
        return -1;
    }
    if (q->closed) {
        PyErr_Format(PyExc_ValueError, "Queue %R is closed", (PyObject *)q);
        return -1;
    }
    return 0;
}

/* The start of every put/get: the queue must be open; block/timeout -> deadline. */
static int begin_op(QueueObject *q, PyObject *block, PyObject *timeout, int *blocking, int64_t *deadline)
{
    if (check_open(q) < 0)
        return -1;
    return read_deadline(block, timeout, blocking, deadline);
}

/* After a wait returned rc: 0 to retry, -1 with an exception (Ctrl-C, or exc on timeout). */
static int after_wait(int rc, PyObject *timeout_exc)
{
    if (rc == -EINTR)
        return PyErr_CheckSignals() < 0 ? -1 : 0;
    if (rc == -ETIMEDOUT) {
        PyErr_SetNone(timeout_exc);
        return -1;
    }
    if (rc < 0) {
        cp_err_errno(rc, "futex");
        return -1;
    }
    return 0;
}

/* ---- Ctrl-C during a large copy ---- */

/* The GIL released around a ring operation, with a cancel check the core calls between slices
   of a large copy: it takes the GIL back for PyErr_CheckSignals (which runs the handlers; a
   handler that raises stops the copy and its exception stays set). */
typedef struct {
    cp_ring_cancel cancel;
    PyThreadState *ts;
} nogil_call;

static int check_signals_nogil(void *arg)
{
    nogil_call *c = arg;
    PyEval_RestoreThread(c->ts);
    int stop = PyErr_CheckSignals() < 0;
    c->ts = PyEval_SaveThread();
    return stop;
}

static int put_nogil(QueueObject *q, const cp_ring_msg *msgs, size_t n, int flags, size_t *done,
                     uint64_t *seen)
{
    nogil_call c = {{check_signals_nogil, &c}, PyEval_SaveThread()};
    int rc = cp_ring_put(&q->ring, msgs, n, flags, done, seen, &c.cancel);
    PyEval_RestoreThread(c.ts);
    return rc;
}

static long get_nogil(QueueObject *q, void *dst, size_t cap, size_t maxn, cp_ring_got *got)
{
    nogil_call c = {{check_signals_nogil, &c}, PyEval_SaveThread()};
    long n = cp_ring_get(&q->ring, dst, cap, maxn, got, 0, &c.cancel);
    PyEval_RestoreThread(c.ts);
    return n;
}

/* ---- put ---- */

/* Put msgs[0..n) in order, waiting for room as block/deadline say. 0 or -1 (Full, Ctrl-C...).
   *done tells how many went in. */
static int put_msgs(QueueObject *q, cp_ring_msg *msgs, size_t n, uint64_t bytes, int blocking,
                    int64_t deadline, size_t *done_total)
{
    int flags = q->joinable ? CP_RING_TASK : 0;
    int big = bytes > BIG_COPY;
    int hot_only = blocking && bytes >= FLOW_MIN;
    int64_t flow_end = 0;
    *done_total = 0;
    for (;;) {
        uint64_t seen = 0;
        size_t done = 0;
        int rc = -EBUSY, fl = flags | (hot_only ? CP_RING_HOT_ONLY : 0);
        if (!big)
            rc = cp_ring_put(&q->ring, msgs + *done_total, n - *done_total, fl | CP_RING_TRYLOCK,
                             &done, &seen, NULL);
        if (rc == -EBUSY)
            rc = put_nogil(q, msgs + *done_total, n - *done_total, fl, &done, &seen);
        *done_total += done;
        if (rc == 0)
            return 0;
        if (rc == -ECANCELED)
            return -1; /* a signal handler raised mid-copy: that message was not put */
        if (rc == -ETIMEDOUT) {
            /* The lock's holder is stopped: stay interruptible and honour our deadline. */
            if (PyErr_CheckSignals() < 0)
                return -1;
            if (cp_deadline_left_ns(deadline) == 0) {
                PyErr_SetNone(q->full_exc);
                return -1;
            }
            continue;
        }
        if (rc == -EMSGSIZE) {
            PyErr_Format(PyExc_ValueError, "message of %llu bytes is larger than the queue's capacity",
                         (unsigned long long)msgs[*done_total].len);
            return -1;
        }
        if (rc == -ENOMEM) {
            PyErr_Format(PyExc_MemoryError,
                         "queue cannot hold a message of %llu bytes: its shared memory could not "
                         "grow to that size (address space limit?)",
                         (unsigned long long)msgs[*done_total].len);
            return -1;
        }
        if (rc == -ENOSPC) {
            /* Hot ring full: worth a short wait only while a reader is taking records. */
            int64_t now = cp_now_ns();
            if (!flow_end)
                flow_end = now + FLOW_MAX_NS;
            int64_t d = now + FLOW_STEP_NS;
            if (d > flow_end)
                d = flow_end;
            if (d > deadline)
                d = deadline;
            Py_BEGIN_ALLOW_THREADS
            rc = cp_ring_wait_writable(&q->ring, seen, d);
            Py_END_ALLOW_THREADS
            if (rc == -EINTR && PyErr_CheckSignals() < 0)
                return -1;
            if (rc == -ETIMEDOUT || cp_now_ns() >= flow_end)
                hot_only = 0;
            continue;
        }
        if (rc != -EAGAIN) {
            cp_err_errno(rc, "queue put");
            return -1;
        }
        if (!blocking) {
            PyErr_SetNone(q->full_exc);
            return -1;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = cp_ring_wait_writable(&q->ring, seen, deadline);
        Py_END_ALLOW_THREADS
        if (after_wait(rc, q->full_exc) < 0)
            return -1;
    }
}

/* A message given as its pickle already (a Connection-style send_bytes() on the queue's
   _writer): stored as the pickle record it is, so get() unpickles it. */
static int encode_pickled(PyObject *data, encoded *e)
{
    memset(e, 0, sizeof *e);
    if (PyObject_GetBuffer(data, &e->own_view, PyBUF_SIMPLE) < 0)
        return -1;
    e->has_own_view = 1;
    set_single(e, K_PICKLE, e->own_view.buf, (size_t)e->own_view.len);
    return 0;
}

/* put(obj): obj encoded as a value, or (pickled) taken as the bytes of its pickle. */
static PyObject *do_put(QueueObject *q, PyObject *obj, PyObject *block, PyObject *timeout, int pickled)
{
    int blocking;
    int64_t deadline;
    if (begin_op(q, block, timeout, &blocking, &deadline) < 0)
        return NULL;
    q->put_used = 1;
    encoded e;
    if ((pickled ? encode_pickled(obj, &e) : encode(q, obj, &e)) < 0) {
        encoded_clear(&e);
        return NULL;
    }
    size_t done;
    int rc = put_msgs(q, &e.msg, 1, e.msg.len, blocking, deadline, &done);
    encoded_clear(&e);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Queue_put(QueueObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs == 1 && !kwnames)
        return do_put(q, args[0], NULL, NULL, 0);
    static const char *const names[] = {"obj", "block", "timeout"};
    PyObject *a[3] = {NULL, NULL, NULL};
    if (parse_args("put", args, nargs, kwnames, names, 3, 1, a) < 0)
        return NULL;
    return do_put(q, a[0], a[1], a[2], 0);
}

static PyObject *Queue_put_nowait(QueueObject *q, PyObject *obj)
{
    return do_put(q, obj, Py_False, NULL, 0);
}

static PyObject *Queue_put_pickled(QueueObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"data", "block", "timeout"};
    PyObject *a[3] = {NULL, NULL, NULL};
    if (parse_args("_put_pickled", args, nargs, kwnames, names, 3, 1, a) < 0)
        return NULL;
    return do_put(q, a[0], a[1], a[2], 1);
}

static PyObject *Queue_put_many(QueueObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"iterable", "block", "timeout"};
    PyObject *a[3] = {NULL, NULL, NULL};
    int blocking;
    int64_t deadline;
    if (parse_args("put_many", args, nargs, kwnames, names, 3, 1, a) < 0 ||
        begin_op(q, a[1], a[2], &blocking, &deadline) < 0)
        return NULL;
    q->put_used = 1;
    PyObject *seq = PySequence_Fast(a[0], "put_many() needs an iterable");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    encoded *enc = PyMem_Calloc(n ? (size_t)n : 1, sizeof(encoded));
    cp_ring_msg *msgs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(cp_ring_msg));
    PyObject *res = NULL;
    Py_ssize_t nenc = 0;
    if (!enc || !msgs) {
        PyErr_NoMemory();
        goto done;
    }
    /* Everything is encoded before anything is put: an unpicklable item puts nothing. */
    uint64_t bytes = 0;
    for (; nenc < n; nenc++) {
        if (encode(q, PySequence_Fast_GET_ITEM(seq, nenc), &enc[nenc]) < 0) {
            encoded_clear(&enc[nenc]);
            goto done;
        }
        msgs[nenc] = enc[nenc].msg;
        bytes += enc[nenc].msg.len;
    }
    size_t done_n;
    if (put_msgs(q, msgs, (size_t)n, bytes, blocking, deadline, &done_n) == 0)
        res = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < nenc; i++)
        encoded_clear(&enc[i]);
    PyMem_Free(enc);
    PyMem_Free(msgs);
    Py_DECREF(seq);
    return res;
}

/* ---- get ---- */

/* One attempt at taking up to maxn records into dst; the lock is tried with the GIL held
   and waited for without it. */
static long try_get(QueueObject *q, void *dst, size_t cap, size_t maxn, cp_ring_got *got, int nogil)
{
    long n = -EBUSY;
    if (!nogil)
        n = cp_ring_get(&q->ring, dst, cap, maxn, got, CP_RING_TRYLOCK, NULL);
    while (n == -EBUSY || n == -ETIMEDOUT) {
        if (n == -ETIMEDOUT && PyErr_CheckSignals() < 0)
            return -EINTR; /* the lock's holder is stopped and Ctrl-C came */
        n = get_nogil(q, dst, cap, maxn, got);
    }
    return n;
}

/* A failed try_get as an exception (-EINTR: KeyboardInterrupt is already set). NULL. */
static PyObject *get_error(QueueObject *q, long n)
{
    if (n == -EINTR || n == -ECANCELED)
        return NULL; /* the exception is set (Ctrl-C, or what a signal handler raised) */
    if (n == -ENOMEM)
        return PyErr_Format(PyExc_MemoryError,
                            "queue get: cannot map the queue's shared memory (%llu bytes)",
                            (unsigned long long)q->ring.h->cold);
    return cp_err_errno((int)n, "queue get");
}

/* Wait until a record may be there. 0 to retry, -1 with Empty / KeyboardInterrupt. */
static int wait_readable(QueueObject *q, int blocking, int64_t deadline)
{
    if (!blocking) {
        PyErr_SetNone(q->empty_exc);
        return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cp_ring_wait_readable(&q->ring, deadline);
    Py_END_ALLOW_THREADS
    return after_wait(rc, q->empty_exc);
}

/* What a large record is copied into: a bytes/bytearray made for it when that is what it
   decodes to (one copy), else heap scratch. */
enum { DST_BYTES, DST_BYTEARRAY, DST_SCRATCH };

static int dst_class(int kind)
{
    if (kind == K_BYTES)
        return DST_BYTES;
    return kind == K_BYTEARRAY || kind == K_PICKLE5 ? DST_BYTEARRAY : DST_SCRATCH;
}

static void spare_clear(spare_dst *s)
{
    Py_CLEAR(s->owner);
    PyMem_RawFree(s->scratch);
    memset(s, 0, sizeof *s);
}

/* Take one record whose payload is too big for the stack.
   A copy stopped by Ctrl-C keeps its partly filled destination in q->spare for the retry that
   usually follows, instead of freeing it: the kernel unmaps about 600 MB per 0.1 s, so freeing a
   1.5 GB destination would hold KeyboardInterrupt back past the 100 ms promise. The next large
   get takes it when class and size match and frees it otherwise; so do dealloc and close(). */
static PyObject *get_large(QueueObject *q, const cp_ring_got *want, int *again)
{
    spare_dst d = {NULL, NULL, (size_t)want->len, dst_class(want->kind)};
    char *dst = NULL;
    if (q->spare.cap == d.cap && q->spare.cls == d.cls && (q->spare.owner || q->spare.scratch)) {
        d = q->spare; /* ours alone now: another thread's get cannot take it too */
        memset(&q->spare, 0, sizeof q->spare);
    }
    else {
        spare_clear(&q->spare);
        if (d.cls == DST_BYTES)
            d.owner = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)d.cap);
        else if (d.cls == DST_BYTEARRAY)
            d.owner = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)d.cap);
        else if (!(d.scratch = PyMem_RawMalloc(d.cap ? d.cap : 1)))
            PyErr_NoMemory();
        if (!d.owner && !d.scratch)
            return NULL;
    }
    if (d.scratch)
        dst = d.scratch;
    else
        dst = d.cls == DST_BYTES ? PyBytes_AS_STRING(d.owner) : PyByteArray_AS_STRING(d.owner);
    cp_ring_got got;
    long n = try_get(q, dst, d.cap, 1, &got, d.cap > BIG_COPY);
    PyObject *res = NULL;
    if (n == 1)
        res = decode(q, got.kind, dst + got.offset, got.len, got.offset == 0 ? d.owner : NULL);
    else if (n == -EMSGSIZE || n == -EAGAIN)
        *again = 1; /* another reader took it first */
    else
        get_error(q, n);
    if ((n == -EINTR || n == -ECANCELED) && d.cap > BIG_COPY) {
        spare_clear(&q->spare); /* another thread's, stashed while we copied */
        q->spare = d;
        return NULL;
    }
    spare_clear(&d);
    return res;
}

static PyObject *do_get(QueueObject *q, PyObject *block, PyObject *timeout)
{
    int blocking;
    int64_t deadline;
    if (begin_op(q, block, timeout, &blocking, &deadline) < 0)
        return NULL;
    _Alignas(8) char buf[STACK_GET];
    for (;;) {
        cp_ring_got got;
        long n = try_get(q, buf, sizeof buf, 1, &got, 0);
        if (n == 1)
            return decode(q, got.kind, buf, got.len, NULL);
        if (n == -EMSGSIZE) {
            int again = 0;
            PyObject *res = get_large(q, &got, &again);
            if (res || !again)
                return res;
            continue;
        }
        if (n != -EAGAIN)
            return get_error(q, n);
        if (wait_readable(q, blocking, deadline) < 0)
            return NULL;
    }
}

static PyObject *Queue_get(QueueObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs == 0 && !kwnames)
        return do_get(q, NULL, NULL);
    static const char *const names[] = {"block", "timeout"};
    PyObject *a[2] = {NULL, NULL};
    if (parse_args("get", args, nargs, kwnames, names, 2, 0, a) < 0)
        return NULL;
    return do_get(q, a[0], a[1]);
}

static PyObject *Queue_get_nowait(QueueObject *q, PyObject *unused)
{
    return do_get(q, Py_False, NULL);
}

/* get_many(max_messages=1000, block=True, timeout=None) -> list of at least one message. */
static PyObject *Queue_get_many(QueueObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"max_messages", "block", "timeout"};
    PyObject *a[3] = {NULL, NULL, NULL};
    int blocking;
    int64_t deadline;
    if (parse_args("get_many", args, nargs, kwnames, names, 3, 0, a) < 0 ||
        begin_op(q, a[1], a[2], &blocking, &deadline) < 0)
        return NULL;
    Py_ssize_t maxn = 1000;
    if (a[0] && a[0] != Py_None) {
        maxn = PyLong_AsSsize_t(a[0]);
        if (maxn == -1 && PyErr_Occurred())
            return NULL;
        if (maxn < 1) {
            PyErr_SetString(PyExc_ValueError, "max_messages must be at least 1");
            return NULL;
        }
    }
    size_t cap = MANY_CHUNK;
    char *buf = PyMem_RawMalloc(cap);
    cp_ring_got *got = PyMem_RawMalloc(sizeof(cp_ring_got) * (size_t)(maxn < 4096 ? maxn : 4096));
    PyObject *list = NULL;
    if (!buf || !got) {
        PyErr_NoMemory();
        goto done;
    }
    if (maxn > 4096)
        maxn = 4096; /* a bound on the got[] array; callers loop for more */
    for (;;) {
        long n = try_get(q, buf, cap, (size_t)maxn, got, 0);
        if (n > 0) {
            if (!(list = PyList_New(n)))
                goto done;
            for (long i = 0; i < n; i++) {
                PyObject *o = decode(q, got[i].kind, buf + got[i].offset, got[i].len, NULL);
                if (!o) {
                    Py_CLEAR(list);
                    goto done;
                }
                PyList_SET_ITEM(list, i, o);
            }
            goto done;
        }
        if (n == -EMSGSIZE) {
            int again = 0;
            PyObject *o = get_large(q, &got[0], &again);
            if (o) {
                list = PyList_New(1);
                if (list)
                    PyList_SET_ITEM(list, 0, o);
                else
                    Py_DECREF(o);
                goto done;
            }
            if (!again)
                goto done;
            continue;
        }
        if (n != -EAGAIN) {
            get_error(q, n);
            goto done;
        }
        if (wait_readable(q, blocking, deadline) < 0)
            goto done;
    }
done:
    PyMem_RawFree(buf);
    PyMem_RawFree(got);
    return list;
}

/* ---- the rest of the API ---- */

static PyObject *Queue_qsize(QueueObject *q, PyObject *unused)
{
    if (!q->attached)
        return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(cp_ring_count(&q->ring));
}

static PyObject *Queue_empty(QueueObject *q, PyObject *unused)
{
    /* The standard library's Queue closes its reading end once the feeder thread of a used
       queue is done after close(): empty() then raises. cpool has no feeder: at once. */
    if (q->closed && q->put_used) {
        PyErr_SetString(PyExc_OSError, "handle is closed");
        return NULL;
    }
    return PyBool_FromLong(!q->attached || cp_ring_count(&q->ring) == 0);
}

static PyObject *Queue_full(QueueObject *q, PyObject *unused)
{
    if (!q->attached)
        Py_RETURN_FALSE;
    uint64_t m = q->ring.h->maxsize;
    return PyBool_FromLong(m && cp_ring_count(&q->ring) >= m);
}

static PyObject *Queue_close(QueueObject *q, PyObject *unused)
{
    /* The mapping stays until the object goes: another thread may be inside get(). */
    q->closed = 1;
    spare_clear(&q->spare);
    Py_RETURN_NONE;
}

static PyObject *Queue_task_done(QueueObject *q, PyObject *unused)
{
    if (!q->attached) {
        PyErr_SetString(PyExc_ValueError, "queue not initialized");
        return NULL;
    }
    int rc = cp_ring_task_done(&q->ring, CP_RING_TRYLOCK);
    if (rc == -EBUSY) {
        /* Another holder: wait without the GIL, which that holder may need (a peer thread). */
        Py_BEGIN_ALLOW_THREADS
        rc = cp_ring_task_done(&q->ring, 0);
        Py_END_ALLOW_THREADS
    }
    if (rc == -ERANGE) {
        PyErr_SetString(PyExc_ValueError, "task_done() called too many times");
        return NULL;
    }
    if (rc < 0)
        return cp_err_errno(rc, "task_done");
    Py_RETURN_NONE;
}

/* join(timeout=None): None as in the standard library; with a timeout (cpool's extra) True
   when every task was done, False at the timeout. */
static PyObject *Queue_join(QueueObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"timeout"};
    PyObject *a[1] = {NULL};
    if (parse_args("join", args, nargs, kwnames, names, 1, 0, a) < 0)
        return NULL;
    if (!q->attached) {
        PyErr_SetString(PyExc_ValueError, "queue not initialized");
        return NULL;
    }
    int blocking;
    int64_t deadline;
    if (read_deadline(NULL, a[0], &blocking, &deadline) < 0)
        return NULL;
    while (cp_ring_unfinished(&q->ring) != 0) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = cp_ring_wait_joined(&q->ring, deadline);
        Py_END_ALLOW_THREADS
        if (rc == -ETIMEDOUT)
            Py_RETURN_FALSE;
        if (after_wait(rc, PyExc_TimeoutError) < 0)
            return NULL;
    }
    if (!a[0] || a[0] == Py_None)
        Py_RETURN_NONE; /* the standard library's join() returns None */
    Py_RETURN_TRUE;
}

static PyObject *Queue_fileno(QueueObject *q, PyObject *unused)
{
    if (!q->attached) {
        PyErr_SetString(PyExc_ValueError, "queue not initialized");
        return NULL;
    }
    return PyLong_FromLong(q->ring.shm.fd);
}

static PyObject *Queue_notify_fileno(QueueObject *q, PyObject *unused)
{
    if (!q->attached) {
        PyErr_SetString(PyExc_ValueError, "queue not initialized");
        return NULL;
    }
    return PyLong_FromLong(q->ring.notify_fd);
}

/* Arming takes the ring's lock, which a stopped holder may keep: wait in slices, interruptibly. */
static PyObject *Queue_notify_arm(QueueObject *q, PyObject *unused)
{
    if (!q->attached) {
        PyErr_SetString(PyExc_ValueError, "queue not initialized");
        return NULL;
    }
    int rc;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = cp_ring_notify_arm(&q->ring);
        Py_END_ALLOW_THREADS
        if (rc != -ETIMEDOUT)
            break;
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    if (rc < 0)
        return cp_err_errno(rc, "queue notify");
    return PyLong_FromLong(rc);
}

static PyObject *Queue_get_maxsize(QueueObject *q, void *unused)
{
    return PyLong_FromUnsignedLongLong(q->attached ? q->ring.h->maxsize : 0);
}

static PyObject *Queue_get_closed(QueueObject *q, void *unused)
{
    return PyBool_FromLong(q->closed);
}

static PyObject *Queue_get_joinable(QueueObject *q, void *unused)
{
    return PyBool_FromLong(q->joinable);
}

static PyObject *Queue_get_unfinished(QueueObject *q, void *unused)
{
    return PyLong_FromUnsignedLongLong(q->attached ? cp_ring_unfinished(&q->ring) : 0);
}

/* ---- life cycle ---- */

/* Queue(maxsize=0, *, joinable=False, fd=-1, notify_fd=-1, hot=0, cold=0, cold_start=0): a new
   ring (sizes 0 = defaults; cold is the most the cold ring may grow to, cold_start its first
   size), or the one in memfd fd with its eventfd notify_fd (a child attaching to its parent's
   queue). */
static int Queue_init(QueueObject *q, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"maxsize", "joinable", "fd", "notify_fd", "hot", "cold", "cold_start",
                             NULL};
    Py_ssize_t maxsize = 0;
    int joinable = 0, fd = -1, notify_fd = -1;
    unsigned long long hot = 0, cold = 0, cold_start = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n$piiKKK:Queue", kwlist, &maxsize, &joinable,
                                     &fd, &notify_fd, &hot, &cold, &cold_start))
        return -1;
    if ((fd >= 0) != (notify_fd >= 0)) {
        PyErr_SetString(PyExc_ValueError, "fd and notify_fd go together");
        return -1;
    }
    if (q->attached) {
        PyErr_SetString(PyExc_RuntimeError, "Queue already initialized");
        return -1;
    }
    cp_state *st = cp_state_from_type(Py_TYPE(q));
    if (!st)
        return -1;
    int rc;
    if (fd >= 0)
        rc = cp_ring_attach(&q->ring, fd, notify_fd);
    else
        rc = cp_ring_create(&q->ring, hot, cold_start, cold, maxsize > 0 ? (uint64_t)maxsize : 0);
    if (rc < 0) {
        cp_err_errno(rc, fd >= 0 ? "queue attach" : "queue create");
        return -1;
    }
    q->attached = 1;
    q->joinable = joinable;
    Py_XSETREF(q->dumps, Py_NewRef(st->slot[CP_OBJ_PICKLE_DUMPS]));
    Py_XSETREF(q->loads, Py_NewRef(st->slot[CP_OBJ_PICKLE_LOADS]));
    Py_XSETREF(q->empty_exc, Py_NewRef(st->slot[CP_OBJ_QUEUE_EMPTY]));
    Py_XSETREF(q->full_exc, Py_NewRef(st->slot[CP_OBJ_QUEUE_FULL]));
    Py_XSETREF(q->protocol, PyLong_FromLong(5));
    Py_XSETREF(q->kw_callback, Py_BuildValue("(s)", "buffer_callback"));
    Py_XSETREF(q->kw_buffers, Py_BuildValue("(s)", "buffers"));
    if (!q->protocol || !q->kw_callback || !q->kw_buffers)
        return -1;
    return 0;
}

static void Queue_dealloc(QueueObject *q)
{
    PyTypeObject *tp = Py_TYPE(q);
    if (q->attached)
        cp_ring_close(&q->ring);
    spare_clear(&q->spare);
    Py_CLEAR(q->dumps);
    Py_CLEAR(q->loads);
    Py_CLEAR(q->empty_exc);
    Py_CLEAR(q->full_exc);
    Py_CLEAR(q->protocol);
    Py_CLEAR(q->kw_callback);
    Py_CLEAR(q->kw_buffers);
    tp->tp_free((PyObject *)q);
    Py_DECREF(tp);
}

#define FASTKW (METH_FASTCALL | METH_KEYWORDS)

static PyMethodDef Queue_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Queue_put, FASTKW,
     "put(obj, block=True, timeout=None): append obj; queue.Full if no room in time."},
    {"get", (PyCFunction)(void (*)(void))Queue_get, FASTKW,
     "get(block=True, timeout=None): remove and return the oldest item; queue.Empty if none in time."},
    {"put_nowait", (PyCFunction)Queue_put_nowait, METH_O, "put(obj, False)."},
    {"get_nowait", (PyCFunction)Queue_get_nowait, METH_NOARGS, "get(False)."},
    {"put_many", (PyCFunction)(void (*)(void))Queue_put_many, FASTKW,
     "put_many(iterable, block=True, timeout=None): append every item, batched under one lock.\n"
     "Nothing is put if an item cannot be pickled. On queue.Full, the items before were put."},
    {"get_many", (PyCFunction)(void (*)(void))Queue_get_many, FASTKW,
     "get_many(max_messages=1000, block=True, timeout=None): a list of 1..max_messages items\n"
     "taken under one lock (as many as are there); queue.Empty if none in time."},
    {"qsize", (PyCFunction)Queue_qsize, METH_NOARGS, "Approximate number of items."},
    {"empty", (PyCFunction)Queue_empty, METH_NOARGS, "True if the queue is empty (approximate)."},
    {"full", (PyCFunction)Queue_full, METH_NOARGS, "True if the queue is full (approximate)."},
    {"close", (PyCFunction)Queue_close, METH_NOARGS,
     "This process will use the queue no more: put/get raise ValueError."},
    {"task_done", (PyCFunction)Queue_task_done, METH_NOARGS,
     "A task got from the queue is complete (JoinableQueue)."},
    {"join", (PyCFunction)(void (*)(void))Queue_join, FASTKW,
     "Block until every item put has been got and marked task_done() (JoinableQueue)."},
    {"fileno", (PyCFunction)Queue_fileno, METH_NOARGS, "The memfd holding the ring."},
    {"_notify_fileno", (PyCFunction)Queue_notify_fileno, METH_NOARGS,
     "The ring's eventfd (readable while it holds a record once armed), for passing to a child."},
    {"_notify_arm", (PyCFunction)Queue_notify_arm, METH_NOARGS,
     "Keep the eventfd readable exactly while the queue holds a record; returns the fd."},
    {"_put_pickled", (PyCFunction)(void (*)(void))Queue_put_pickled, FASTKW,
     "_put_pickled(data, block=True, timeout=None): put a message given as its pickle."},
    {NULL},
};

static PyObject *Queue_get_recoveries(QueueObject *q, void *unused)
{
    return PyLong_FromUnsignedLongLong(q->attached ? atomic_load(&q->ring.h->recoveries) : 0);
}

static PyObject *Queue_get_waiters(QueueObject *q, void *unused)
{
    if (!q->attached)
        return Py_BuildValue("(iii)", 0, 0, 0);
    cp_ring_header *h = q->ring.h;
    return Py_BuildValue("(III)", atomic_load(&h->get_waiters), atomic_load(&h->put_waiters),
                         atomic_load(&h->join_waiters));
}

static PyObject *Queue_get_armed(QueueObject *q, void *unused)
{
    if (!q->attached)
        return Py_BuildValue("(iii)", 0, 0, 0);
    cp_ring_header *h = q->ring.h;
    return Py_BuildValue("(III)", atomic_load(&h->get_seq) & 1, atomic_load(&h->put_seq) & 1,
                         atomic_load(&h->join_seq) & 1);
}

static PyGetSetDef Queue_getset[] = {
    {"_waiters", (getter)Queue_get_waiters, NULL,
     "processes counted as sleeping in (get, put, join); killed sleepers stay counted", NULL},
    {"_armed", (getter)Queue_get_armed, NULL,
     "whether the next (put, get, task_done) will make a wake-up system call", NULL},
    {"_recoveries", (getter)Queue_get_recoveries, NULL,
     "times the lock was taken over from a process that died holding it", NULL},
    {"_maxsize", (getter)Queue_get_maxsize, NULL, "maxsize, 0 for unbounded", NULL},
    {"_closed", (getter)Queue_get_closed, NULL, "close() was called in this process", NULL},
    {"_joinable", (getter)Queue_get_joinable, NULL, "put() counts tasks", NULL},
    {"_unfinished_tasks", (getter)Queue_get_unfinished, NULL, "tasks not yet done", NULL},
    {NULL},
};

static PyType_Slot Queue_slots[] = {
    {Py_tp_doc, "A multi-producer multi-consumer queue in shared memory (base of cpool.queues)."},
    {Py_tp_init, Queue_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, Queue_dealloc},
    {Py_tp_methods, Queue_methods},
    {Py_tp_getset, Queue_getset},
    {0, NULL},
};

static PyType_Spec Queue_spec = {
    .name = "cpool._core.Queue",
    .basicsize = sizeof(QueueObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = Queue_slots,
};

int cp_exec_queue(PyObject *module)
{
    cp_state *st = cp_get_state(module);
    PyObject *queue = PyImport_ImportModule("queue");
    if (!queue)
        return -1;
    st->slot[CP_OBJ_QUEUE_EMPTY] = PyObject_GetAttrString(queue, "Empty");
    st->slot[CP_OBJ_QUEUE_FULL] = PyObject_GetAttrString(queue, "Full");
    Py_DECREF(queue);
    if (!st->slot[CP_OBJ_QUEUE_EMPTY] || !st->slot[CP_OBJ_QUEUE_FULL])
        return -1;
    return cp_add_type(module, CP_TYPE_QUEUE, &Queue_spec, NULL);
}
