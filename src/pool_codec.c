/* A compact encoding of plain values (None, bool, int64, float, str, bytes, tuples, lists,
   dicts) for pool tasks and results: several times cheaper than pickle for the small and
   string-heavy payloads of fine-grained tasks, and exact (only exact builtin types qualify,
   so the decoded value is equal and of the same type; a list or dict that appears twice in
   one payload sends it to pickle, which keeps the two references one object). Anything else
   falls back to pickle. */
#include "pool_codec.h"

#include <string.h>

enum {
    T_NONE = 0, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_ASCII, T_UTF8, T_BYTES, T_TUPLE, T_LIST, T_DICT
};

#define MAX_DEPTH 16
#define MAX_SHARED 32   /* mutable containers held elsewhere too, checked for aliasing */

typedef cp_buf wbuf;

typedef struct {
    wbuf *w;
    PyObject *seen[MAX_SHARED]; /* lists and dicts with other references, met so far */
    int nseen;
} encoder;

int cp_buf_reserve(cp_buf *b, size_t n)
{
    if (n <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < n)
        cap *= 2;
    uint8_t *nb = PyMem_RawRealloc(b->buf, cap);
    if (!nb) {
        PyErr_NoMemory();
        return -1;
    }
    b->buf = nb;
    b->cap = cap;
    return 0;
}

static int grow(wbuf *w, size_t need)
{
    return cp_buf_reserve(w, w->len + need);
}

static int put(wbuf *w, const void *p, size_t n)
{
    if (grow(w, n) < 0)
        return -1;
    memcpy(w->buf + w->len, p, n);
    w->len += n;
    return 0;
}

static int put_tag_len(wbuf *w, uint8_t tag, size_t n)
{
    if (n > UINT32_MAX)
        return 1;
    uint32_t n32 = (uint32_t)n;
    if (grow(w, 5) < 0)
        return -1;
    w->buf[w->len] = (char)tag;
    memcpy(w->buf + w->len + 1, &n32, 4);
    w->len += 5;
    return 0;
}

/* A list or dict that someone else holds may appear twice in the payload: then it is not
   plain (pickle keeps the two references one object). 0 fine, 1 not plain. */
static int check_alias(encoder *e, PyObject *o)
{
    if (Py_REFCNT(o) == 1)
        return 0; /* held by its container only: it cannot appear anywhere else */
    for (int i = 0; i < e->nseen; i++)
        if (e->seen[i] == o)
            return 1;
    if (e->nseen == MAX_SHARED)
        return 1;
    e->seen[e->nseen++] = o;
    return 0;
}

/* 0 written, 1 not plain, -1 out of memory (MemoryError set). */
static int enc(encoder *e, PyObject *o, int depth)
{
    wbuf *w = e->w;
    PyTypeObject *t = Py_TYPE(o);
    uint8_t tag;
    if (o == Py_None) {
        tag = T_NONE;
        return put(w, &tag, 1);
    }
    if (t == &PyBool_Type) {
        tag = o == Py_True ? T_TRUE : T_FALSE;
        return put(w, &tag, 1);
    }
    if (t == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow)
            return 1;
        char b[9];
        b[0] = T_INT;
        memcpy(b + 1, &v, 8);
        return put(w, b, 9);
    }
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        char b[9];
        b[0] = T_FLOAT;
        memcpy(b + 1, &d, 8);
        return put(w, b, 9);
    }
    if (t == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *s;
        if (PyUnicode_IS_ASCII(o)) {
            n = PyUnicode_GET_LENGTH(o);
            s = (const char *)PyUnicode_DATA(o);
            tag = T_ASCII;
        }
        else {
            s = PyUnicode_AsUTF8AndSize(o, &n);
            if (!s) {
                PyErr_Clear(); /* lone surrogates: pickle knows how */
                return 1;
            }
            tag = T_UTF8;
        }
        int r = put_tag_len(w, tag, (size_t)n);
        return r ? r : put(w, s, (size_t)n);
    }
    if (t == &PyBytes_Type) {
        int r = put_tag_len(w, T_BYTES, (size_t)PyBytes_GET_SIZE(o));
        return r ? r : put(w, PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o));
    }
    if (depth >= MAX_DEPTH)
        return 1;
    PyObject **items;
    Py_ssize_t n;
    if (t == &PyTuple_Type) {
        tag = T_TUPLE;
        items = ((PyTupleObject *)o)->ob_item;
        n = PyTuple_GET_SIZE(o);
    }
    else if (t == &PyList_Type) {
        if (check_alias(e, o))
            return 1;
        tag = T_LIST;
        items = ((PyListObject *)o)->ob_item;
        n = PyList_GET_SIZE(o);
    }
    else if (t == &PyDict_Type) {
        if (check_alias(e, o))
            return 1;
        int r = put_tag_len(w, T_DICT, (size_t)PyDict_GET_SIZE(o));
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (r == 0 && PyDict_Next(o, &pos, &k, &v)) {
            r = enc(e, k, depth + 1);
            if (r == 0)
                r = enc(e, v, depth + 1);
        }
        return r;
    }
    else {
        return 1;
    }
    int r = put_tag_len(w, tag, (size_t)n);
    for (Py_ssize_t i = 0; r == 0 && i < n; i++)
        r = enc(e, items[i], depth + 1);
    return r;
}

int cp_plain_encode_to(cp_buf *b, PyObject *o)
{
    size_t mark = b->len;
    encoder e = {b, {NULL}, 0};
    int r = enc(&e, o, 0);
    if (r != 0)
        b->len = mark;
    return r;
}

typedef struct {
    const uint8_t *p, *end;
} rbuf;

static PyObject *corrupt(void)
{
    PyErr_SetString(PyExc_ValueError, "corrupt pool payload");
    return NULL;
}

static int get_len(rbuf *r, uint32_t *n)
{
    if (r->end - r->p < 4)
        return -1;
    memcpy(n, r->p, 4);
    r->p += 4;
    return 0;
}

static PyObject *dec(rbuf *r, int depth)
{
    if (r->p >= r->end || depth > MAX_DEPTH)
        return corrupt();
    uint8_t tag = *r->p++;
    uint32_t n;
    switch (tag) {
    case T_NONE:
        return Py_NewRef(Py_None);
    case T_FALSE:
        return Py_NewRef(Py_False);
    case T_TRUE:
        return Py_NewRef(Py_True);
    case T_INT: {
        long long v;
        if (r->end - r->p < 8)
            return corrupt();
        memcpy(&v, r->p, 8);
        r->p += 8;
        return PyLong_FromLongLong(v);
    }
    case T_FLOAT: {
        double d;
        if (r->end - r->p < 8)
            return corrupt();
        memcpy(&d, r->p, 8);
        r->p += 8;
        return PyFloat_FromDouble(d);
    }
    case T_ASCII:
    case T_UTF8:
    case T_BYTES: {
        if (get_len(r, &n) < 0 || (uint64_t)(r->end - r->p) < n)
            return corrupt();
        const char *s = (const char *)r->p;
        r->p += n;
        if (tag == T_BYTES)
            return PyBytes_FromStringAndSize(s, n);
        if (tag == T_UTF8)
            return PyUnicode_DecodeUTF8(s, n, "strict");
        PyObject *u = PyUnicode_New(n, 127);
        if (u)
            memcpy(PyUnicode_DATA(u), s, n);
        return u;
    }
    case T_TUPLE:
    case T_LIST: {
        if (get_len(r, &n) < 0 || (uint64_t)(r->end - r->p) < n)
            return corrupt(); /* every item takes at least one byte */
        PyObject *c = tag == T_TUPLE ? PyTuple_New(n) : PyList_New(n);
        if (!c)
            return NULL;
        for (uint32_t i = 0; i < n; i++) {
            PyObject *it = dec(r, depth + 1);
            if (!it) {
                Py_DECREF(c);
                return NULL;
            }
            if (tag == T_TUPLE)
                PyTuple_SET_ITEM(c, i, it);
            else
                PyList_SET_ITEM(c, i, it);
        }
        return c;
    }
    case T_DICT: {
        if (get_len(r, &n) < 0 || (uint64_t)(r->end - r->p) / 2 < n)
            return corrupt();
        PyObject *d = PyDict_New();
        for (uint32_t i = 0; d && i < n; i++) {
            PyObject *k = dec(r, depth + 1);
            PyObject *v = k ? dec(r, depth + 1) : NULL;
            if (!v || PyDict_SetItem(d, k, v) < 0)
                Py_CLEAR(d);
            Py_XDECREF(k);
            Py_XDECREF(v);
        }
        return d;
    }
    default:
        return corrupt();
    }
}

PyObject *cp_plain_decode(const uint8_t *buf, uint64_t len)
{
    rbuf r = {buf, buf + len};
    PyObject *o = dec(&r, 0);
    if (o && r.p != r.end) {
        Py_DECREF(o);
        return corrupt();
    }
    return o;
}

Py_ssize_t cp_plain_decode_chunk_into(const uint8_t *buf, uint64_t len, PyObject *dst,
                                      Py_ssize_t off)
{
    rbuf r = {buf, buf + len};
    uint32_t n;
    if (len < 10 || buf[0] != T_TUPLE)
        return -2;
    r.p++;
    if (get_len(&r, &n) < 0 || n != 1 || *r.p != T_LIST)
        return -2;
    r.p++;
    if (get_len(&r, &n) < 0)
        return -2;
    Py_ssize_t room = PyList_GET_SIZE(dst) - off;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *it = dec(&r, 2);
        if (!it)
            return -1;
        if ((Py_ssize_t)i < room)
            Py_SETREF(((PyListObject *)dst)->ob_item[off + i], it);
        else
            Py_DECREF(it);
    }
    if (r.p != r.end) {
        corrupt();
        return -1;
    }
    return (Py_ssize_t)n;
}
