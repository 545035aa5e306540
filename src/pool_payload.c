/* Pool payloads: the plain form, pickle with large buffers placed once in the pool's shared heap
   (read there in place by the receiver), or pickle; the heap's Python types. */
#include "pool_payload.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "structmember.h"

#include "bufheap.h"
#include "shm.h"

#define BIG_COPY (1u << 20) /* copies this large run without the GIL */

typedef struct HeapBlock HeapBlock;

struct BufferHeap {
    PyObject_HEAD
    cp_shm_t shm;
    cp_heap_t *h;
    HeapBlock *live;         /* blocks read in place in this process (a list) */
    PyObject *weakreflist;
    pid_t pid;               /* the process that created or attached it */
    PyObject *kw_callback;   /* ("buffer_callback",) */
    PyObject *kw_buffers;    /* ("buffers",) */
    PyObject *dumps;         /* dumps(obj, buffer_callback), or NULL: pickle.dumps */
};

/* One block read in place: its buffer is the block's bytes; the block is freed when the
   last view goes (only in the process that read it: a forked copy leaves it alone).
   Before a fork its bytes move to private memory at the same address (privatize), so the
   child gets them copy-on-write as it would any other memory, not shared. */
struct HeapBlock {
    PyObject_HEAD
    BufferHeap *heap;
    uint64_t off, len;
    pid_t pid;
    HeapBlock *prev, *next;  /* in heap->live while pid is this process */
    int private_;            /* its address holds a private copy, not the heap's pages */
};

/* pickle's buffer_callback while encoding one payload: copies each large contiguous buffer
   into a new block and records it; anything else stays in band. */
typedef struct {
    PyObject_HEAD
    BufferHeap *heap;
    int32_t holder;          /* of the blocks it allocates */
    uint64_t *desc;          /* off, len pairs */
    Py_ssize_t n, cap;
} Collector;

static BufferHeap *as_heap(PyObject *o)
{
    return (BufferHeap *)o;
}

static size_t page_round(uint64_t n)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return ((size_t)n + pg - 1) & ~(pg - 1);
}

/* ---- BufferHeap ---- */

static PyObject *heap_alloc_obj(PyObject *module)
{
    cp_state *st = cp_get_state(module);
    PyTypeObject *tp = (PyTypeObject *)st->slot[CP_TYPE_BUFHEAP];
    BufferHeap *bh = (BufferHeap *)tp->tp_alloc(tp, 0);
    if (!bh)
        return NULL;
    bh->shm.fd = -1;
    bh->pid = getpid();
    bh->kw_callback = Py_BuildValue("(s)", "buffer_callback");
    bh->kw_buffers = Py_BuildValue("(s)", "buffers");
    if (!bh->kw_callback || !bh->kw_buffers) {
        Py_DECREF(bh);
        return NULL;
    }
    return (PyObject *)bh;
}

PyObject *cp_bufheap_create(PyObject *module, uint64_t data)
{
    BufferHeap *bh = (BufferHeap *)heap_alloc_obj(module);
    if (!bh)
        return NULL;
    size_t size = cp_heap_size(data);
    int r = cp_shm_create(&bh->shm, size, "cpool-pool-buffers");
    if (r == 0)
        r = cp_heap_init(bh->shm.addr, size);
    if (r < 0) {
        Py_DECREF(bh);
        return cp_err_errno(r, "memfd_create");
    }
    bh->h = bh->shm.addr;
    return (PyObject *)bh;
}

PyObject *cp_bufheap_attach(PyObject *module, int fd, uint64_t size)
{
    BufferHeap *bh = (BufferHeap *)heap_alloc_obj(module);
    if (!bh)
        return NULL;
    int r = cp_shm_attach(&bh->shm, fd, (size_t)size);
    if (r < 0) {
        Py_DECREF(bh);
        return cp_err_errno(r, "mmap");
    }
    if (cp_heap_check(bh->shm.addr, bh->shm.size) < 0) {
        Py_DECREF(bh);
        PyErr_SetString(PyExc_ValueError, "not a cpool buffer heap");
        return NULL;
    }
    bh->h = bh->shm.addr;
    return (PyObject *)bh;
}

void cp_bufheap_set_dumps(PyObject *heap, PyObject *dumps)
{
    if (heap)
        Py_XSETREF(as_heap(heap)->dumps, dumps == Py_None ? NULL : Py_NewRef(dumps));
}

void cp_bufheap_reclaim(PyObject *heap, int32_t holder)
{
    if (heap)
        cp_heap_free_held_by(as_heap(heap)->h, holder);
}

int cp_bufheap_fd(PyObject *heap)
{
    return as_heap(heap)->shm.fd;
}

uint64_t cp_bufheap_size(PyObject *heap)
{
    return as_heap(heap)->shm.size;
}

uint64_t cp_bufheap_used(PyObject *heap)
{
    return cp_heap_used(as_heap(heap)->h);
}

static void bufheap_dealloc(BufferHeap *bh)
{
    PyTypeObject *tp = Py_TYPE(bh);
    if (bh->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)bh);
    Py_XDECREF(bh->kw_callback);
    Py_XDECREF(bh->kw_buffers);
    Py_XDECREF(bh->dumps);
    cp_shm_close(&bh->shm);
    tp->tp_free(bh);
    Py_DECREF(tp);
}

static PyObject *heap_get_used(PyObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(cp_bufheap_used(self));
}

static PyObject *heap_get_pid(PyObject *self, void *closure)
{
    return PyLong_FromLong((long)as_heap(self)->pid);
}

static PyObject *heap_trim(PyObject *self, PyObject *arg)
{
    unsigned long ms = PyLong_AsUnsignedLong(arg);
    if (ms == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t resident;
    Py_BEGIN_ALLOW_THREADS
    resident = cp_heap_trim(as_heap(self)->h, (uint32_t)ms);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(resident);
}

/* Move the bytes of every block read in place here into private memory at the same address
   (one copy, then mremap over the heap's pages): called before a fork. */
static PyObject *heap_privatize(PyObject *self, PyObject *unused)
{
    BufferHeap *bh = as_heap(self);
    pid_t me = getpid();
    unsigned long long moved = 0;
    for (HeapBlock *b = bh->live; b; b = b->next) {
        if (b->private_ || b->pid != me || !b->len)
            continue;
        size_t n = page_round(b->len);
        void *at = cp_heap_ptr(bh->h, b->off);
        void *tmp = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (tmp == MAP_FAILED)
            return PyErr_SetFromErrno(PyExc_OSError);
        memcpy(tmp, at, n);
        if (mremap(tmp, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, at) != at) {
            munmap(tmp, n);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        b->private_ = 1;
        moved += n;
    }
    return PyLong_FromUnsignedLongLong(moved);
}

static PyMethodDef bufheap_methods[] = {
    {"privatize", heap_privatize, METH_NOARGS,
     "privatize() -> bytes: before a fork, move the blocks read in place here to private "
     "memory at the same addresses, so a child gets them copy-on-write"},
    {"trim", heap_trim, METH_O,
     "trim(idle_ms) -> bytes: give back the pages of free blocks unused for idle_ms; the bytes "
     "of free blocks still resident"},
    {NULL},
};

static PyGetSetDef bufheap_getset[] = {
    {"used", heap_get_used, NULL, "bytes in blocks", NULL},
    {"pid", heap_get_pid, NULL, "the process this view of the heap belongs to", NULL},
    {NULL},
};

static PyMemberDef bufheap_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(BufferHeap, weakreflist), READONLY},
    {NULL},
};

static PyType_Slot bufheap_slots[] = {
    {Py_tp_members, bufheap_members},
    {Py_tp_dealloc, bufheap_dealloc},
    {Py_tp_getset, bufheap_getset},
    {Py_tp_methods, bufheap_methods},
    {Py_tp_doc, "A pool's shared heap of large buffers (internal)."},
    {0, NULL},
};

static PyType_Spec bufheap_spec = {
    .name = "cpool._core.BufferHeap",
    .basicsize = sizeof(BufferHeap),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = bufheap_slots,
};

/* ---- HeapBlock ---- */

static int block_getbuffer(HeapBlock *b, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)b, cp_heap_ptr(b->heap->h, b->off),
                             (Py_ssize_t)b->len, 0, flags);
}

static void block_unlink(HeapBlock *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else if (b->heap->live == b)
        b->heap->live = b->next;
    if (b->next)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
}

static void block_dealloc(HeapBlock *b)
{
    PyTypeObject *tp = Py_TYPE(b);
    if (b->heap) {
        BufferHeap *bh = b->heap;
        if (b->pid == getpid()) {
            block_unlink(b);
            int mapped = 1;
            if (b->private_ && b->len) {
                /* The heap's pages go back under the address before the block is reused. */
                void *at = cp_heap_ptr(bh->h, b->off);
                mapped = mmap(at, page_round(b->len), PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_FIXED, bh->shm.fd, (off_t)b->off) == at;
            }
            if (mapped)
                cp_heap_free(bh->h, b->off); /* else leaked: never reused under a stale view */
        }
        Py_DECREF(bh);
    }
    tp->tp_free(b);
    Py_DECREF(tp);
}

static PyType_Slot block_slots[] = {
    {Py_tp_dealloc, block_dealloc},
    {Py_bf_getbuffer, block_getbuffer},
    {Py_tp_doc, "Bytes of a pool's shared buffer heap, read in place (internal)."},
    {0, NULL},
};

static PyType_Spec block_spec = {
    .name = "cpool._core.HeapBlock",
    .basicsize = sizeof(HeapBlock),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = block_slots,
};

/* ---- Collector ---- */

static PyObject *collector_call(Collector *c, PyObject *args, PyObject *kw)
{
    PyObject *pb;
    if (!PyArg_ParseTuple(args, "O", &pb))
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(pb, &v, PyBUF_ANY_CONTIGUOUS) < 0) {
        PyErr_Clear();
        Py_RETURN_TRUE; /* not contiguous: pickle copies it in band */
    }
    if (v.len < (Py_ssize_t)CP_HEAP_UNIT || (c->n == c->cap && c->cap > PY_SSIZE_T_MAX / 32)) {
        PyBuffer_Release(&v);
        Py_RETURN_TRUE; /* small: cheaper in band */
    }
    if (c->n == c->cap) {
        Py_ssize_t cap = c->cap ? 2 * c->cap : 4;
        uint64_t *d = PyMem_Realloc(c->desc, (size_t)cap * 2 * sizeof(uint64_t));
        if (!d) {
            PyBuffer_Release(&v);
            return PyErr_NoMemory();
        }
        c->desc = d;
        c->cap = cap;
    }
    cp_heap_t *h = c->heap->h;
    int64_t off = cp_heap_alloc(h, (uint64_t)v.len, c->holder);
    if (off < 0) {
        PyBuffer_Release(&v);
        Py_RETURN_TRUE; /* the heap is full: in band, as without one */
    }
    if (v.len >= (Py_ssize_t)BIG_COPY) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(cp_heap_ptr(h, (uint64_t)off), v.buf, (size_t)v.len);
        Py_END_ALLOW_THREADS
    }
    else {
        memcpy(cp_heap_ptr(h, (uint64_t)off), v.buf, (size_t)v.len);
    }
    c->desc[2 * c->n] = (uint64_t)off;
    c->desc[2 * c->n + 1] = (uint64_t)v.len;
    c->n++;
    PyBuffer_Release(&v);
    Py_RETURN_NONE; /* out of band */
}

static void collector_dealloc(Collector *c)
{
    PyTypeObject *tp = Py_TYPE(c);
    Py_XDECREF(c->heap);
    PyMem_Free(c->desc);
    tp->tp_free(c);
    Py_DECREF(tp);
}

static PyType_Slot collector_slots[] = {
    {Py_tp_dealloc, collector_dealloc},
    {Py_tp_call, collector_call},
    {0, NULL},
};

static PyType_Spec collector_spec = {
    .name = "cpool._core._HeapCollector",
    .basicsize = sizeof(Collector),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = collector_slots,
};

/* ---- encoding ---- */

int cp_may_have_buffers(PyObject *obj, int depth)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (obj == Py_None || tp == &PyLong_Type || tp == &PyFloat_Type || tp == &PyUnicode_Type ||
        tp == &PyBytes_Type || tp == &PyByteArray_Type || tp == &PyBool_Type ||
        tp == &PyComplex_Type)
        return 0;
    if (depth >= 2)
        return 1;
    if (tp == &PyTuple_Type || tp == &PyList_Type) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        if (n > 64)
            return 1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (cp_may_have_buffers(PySequence_Fast_GET_ITEM(obj, i), depth + 1))
                return 1;
        return 0;
    }
    if (tp == &PyDict_Type) {
        if (PyDict_GET_SIZE(obj) > 64)
            return 1;
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(obj, &pos, &k, &v))
            if (cp_may_have_buffers(k, depth + 1) || cp_may_have_buffers(v, depth + 1))
                return 1;
        return 0;
    }
    return 1;
}

PyObject *cp_pickle_dumps(cp_state *st, PyObject *o)
{
    PyObject *proto = PyLong_FromLong(5);
    if (!proto)
        return NULL;
    PyObject *args[2] = {o, proto};
    PyObject *r = PyObject_Vectorcall(st->slot[CP_OBJ_PICKLE_DUMPS], args, 2, NULL);
    Py_DECREF(proto);
    return r;
}

static void free_blocks(BufferHeap *bh, const uint64_t *desc, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        cp_heap_free(bh->h, desc[2 * i]);
}

/* pickle.dumps(o, protocol=5, buffer_callback=collector): the pickle, its blocks in c. */
static PyObject *dumps_collecting(cp_state *st, BufferHeap *bh, int32_t holder, PyObject *o,
                                  Collector **out)
{
    PyTypeObject *tp = (PyTypeObject *)st->slot[CP_TYPE_HEAPCOLLECTOR];
    Collector *c = (Collector *)tp->tp_alloc(tp, 0);
    if (!c)
        return NULL;
    c->heap = (BufferHeap *)Py_NewRef((PyObject *)bh);
    c->holder = holder;
    PyObject *pk = NULL;
    if (bh->dumps) {
        PyObject *args[2] = {o, (PyObject *)c};
        pk = PyObject_Vectorcall(bh->dumps, args, 2, NULL);
    }
    else {
        PyObject *proto = PyLong_FromLong(5);
        if (proto) {
            PyObject *args[3] = {o, proto, (PyObject *)c};
            pk = PyObject_Vectorcall(st->slot[CP_OBJ_PICKLE_DUMPS], args, 2, bh->kw_callback);
            Py_DECREF(proto);
        }
    }
    if (pk && !PyBytes_Check(pk)) {
        Py_SETREF(pk, NULL);
        PyErr_SetString(PyExc_TypeError, "the pool's pickler must return bytes");
    }
    if (!pk) {
        free_blocks(bh, c->desc, c->n);
        Py_DECREF(c);
        return NULL;
    }
    *out = c;
    return pk;
}

int cp_payload_encode(cp_state *st, PyObject *heap, int32_t holder, cp_buf *b, PyObject *o,
                      uint32_t *enc)
{
    int r = cp_plain_encode_to(b, o);
    if (r <= 0) {
        *enc = CP_ENC_PLAIN;
        return r;
    }
    Collector *c = NULL;
    PyObject *pk = heap && cp_may_have_buffers(o, 0)
                       ? dumps_collecting(st, as_heap(heap), holder, o, &c)
                       : cp_pickle_dumps(st, o);
    if (!pk)
        return -1;
    size_t plen = (size_t)PyBytes_GET_SIZE(pk), dlen = 0;
    *enc = CP_ENC_PICKLE;
    if (c && c->n) {
        *enc = CP_ENC_PICKLE5;
        dlen = 8 + 16 * (size_t)c->n;
    }
    size_t at = b->len;
    if (cp_buf_reserve(b, at + dlen + plen) < 0) {
        if (c)
            free_blocks(as_heap(heap), c->desc, c->n);
        Py_XDECREF(c);
        Py_DECREF(pk);
        return -1;
    }
    if (dlen) {
        uint64_t n = (uint64_t)c->n;
        memcpy(b->buf + at, &n, 8);
        memcpy(b->buf + at + 8, c->desc, dlen - 8);
    }
    memcpy(b->buf + at + dlen, PyBytes_AS_STRING(pk), plen);
    b->len = at + dlen + plen;
    Py_XDECREF(c);
    Py_DECREF(pk);
    return 0;
}

/* ---- decoding ---- */

/* The block table of a CP_ENC_PICKLE5 payload: *n entries at *desc (unaligned: read with
   memcpy), the pickle after them. -1 if malformed. */
static int parse_blocks(const uint8_t *buf, uint64_t len, uint64_t *n, const uint8_t **desc,
                        const uint8_t **pickle, uint64_t *plen)
{
    if (len < 8)
        return -1;
    memcpy(n, buf, 8);
    if (*n == 0 || *n > (len - 8) / 16)
        return -1;
    *desc = buf + 8;
    *pickle = buf + 8 + 16 * *n;
    *plen = len - 8 - 16 * *n;
    return 0;
}

static void block_at(const uint8_t *desc, uint64_t i, uint64_t *off, uint64_t *len)
{
    memcpy(off, desc + 16 * i, 8);
    memcpy(len, desc + 16 * i + 8, 8);
}

/* Free blocks [from, n) of a block table. */
static void free_unwrapped(BufferHeap *bh, const uint8_t *desc, uint64_t from, uint64_t n)
{
    for (uint64_t k = from; k < n; k++) {
        uint64_t off, blen;
        block_at(desc, k, &off, &blen);
        cp_heap_free(bh->h, off);
    }
}

static PyObject *corrupt(void)
{
    PyErr_SetString(PyExc_ValueError, "corrupt pool payload");
    return NULL;
}

static PyObject *decode_pickle5(cp_state *st, BufferHeap *bh, int32_t holder, const uint8_t *buf,
                                uint64_t len)
{
    uint64_t n, plen;
    const uint8_t *desc, *pickle;
    if (!bh || parse_blocks(buf, len, &n, &desc, &pickle, &plen) < 0)
        return corrupt();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off, blen;
        block_at(desc, i, &off, &blen);
        if (!cp_heap_is_block(bh->h, off, blen))
            return corrupt();
    }
    PyObject *blocks = PyList_New((Py_ssize_t)n);
    if (!blocks) {
        free_unwrapped(bh, desc, 0, n);
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)st->slot[CP_TYPE_HEAPBLOCK];
    pid_t me = getpid();
    for (uint64_t i = 0; i < n; i++) {
        HeapBlock *b = (HeapBlock *)tp->tp_alloc(tp, 0);
        if (!b) {
            free_unwrapped(bh, desc, i, n); /* those wrapped go with the list */
            Py_DECREF(blocks);
            return NULL;
        }
        b->heap = (BufferHeap *)Py_NewRef((PyObject *)bh);
        block_at(desc, i, &b->off, &b->len);
        b->pid = me;
        b->next = bh->live;
        if (bh->live)
            bh->live->prev = b;
        bh->live = b;
        cp_heap_set_holder(bh->h, b->off, holder);
        PyList_SET_ITEM(blocks, (Py_ssize_t)i, (PyObject *)b);
    }
    PyObject *mv = PyMemoryView_FromMemory((char *)pickle, (Py_ssize_t)plen, PyBUF_READ);
    if (!mv) {
        Py_DECREF(blocks);
        return NULL;
    }
    PyObject *args[2] = {mv, blocks};
    PyObject *r = PyObject_Vectorcall(st->slot[CP_OBJ_PICKLE_LOADS], args, 1, bh->kw_buffers);
    Py_DECREF(mv);
    Py_DECREF(blocks);
    return r;
}

PyObject *cp_payload_decode(cp_state *st, PyObject *heap, int32_t holder, const uint8_t *buf,
                            uint64_t len, uint32_t enc)
{
    if (enc == CP_ENC_PLAIN)
        return cp_plain_decode(buf, len);
    if (enc == CP_ENC_PICKLE5)
        return decode_pickle5(st, heap ? as_heap(heap) : NULL, holder, buf, len);
    PyObject *mv = PyMemoryView_FromMemory((char *)buf, (Py_ssize_t)len, PyBUF_READ);
    if (!mv)
        return NULL;
    PyObject *r = PyObject_CallOneArg(st->slot[CP_OBJ_PICKLE_LOADS], mv);
    Py_DECREF(mv);
    return r;
}

/* Apply fn to every well-formed block of a CP_ENC_PICKLE5 payload. */
static void each_block(PyObject *heap, const uint8_t *buf, uint64_t len, uint32_t enc,
                       void (*fn)(cp_heap_t *, uint64_t, int32_t), int32_t arg)
{
    uint64_t n, plen;
    const uint8_t *desc, *pickle;
    if (!heap || enc != CP_ENC_PICKLE5 || parse_blocks(buf, len, &n, &desc, &pickle, &plen) < 0)
        return;
    cp_heap_t *h = as_heap(heap)->h;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off, blen;
        block_at(desc, i, &off, &blen);
        if (cp_heap_is_block(h, off, blen))
            fn(h, off, arg);
    }
}

static void drop_one(cp_heap_t *h, uint64_t off, int32_t unused)
{
    (void)unused;
    cp_heap_free(h, off);
}

void cp_payload_drop(PyObject *heap, const uint8_t *buf, uint64_t len, uint32_t enc)
{
    each_block(heap, buf, len, enc, drop_one, 0);
}

void cp_payload_hand_over(PyObject *heap, const uint8_t *buf, uint64_t len, uint32_t enc,
                          int32_t holder)
{
    each_block(heap, buf, len, enc, cp_heap_set_holder, holder);
}

/* ---- module functions (tests and benchmarks of the codec) ---- */

static PyObject *payload_encode(PyObject *module, PyObject *o)
{
    cp_buf b = {0};
    uint32_t enc;
    if (cp_payload_encode(cp_get_state(module), NULL, 0, &b, o, &enc) < 0) {
        PyMem_RawFree(b.buf);
        return NULL;
    }
    PyObject *r = Py_BuildValue("(Iy#)", enc, (const char *)b.buf, (Py_ssize_t)b.len);
    PyMem_RawFree(b.buf);
    return r;
}

static PyObject *payload_decode(PyObject *module, PyObject *args)
{
    unsigned int enc;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "Iy*:_payload_decode", &enc, &v))
        return NULL;
    PyObject *r = enc == CP_ENC_PICKLE5 ? corrupt()
                  : cp_payload_decode(cp_get_state(module), NULL, 0, v.buf, (uint64_t)v.len, enc);
    PyBuffer_Release(&v);
    return r;
}

static PyObject *buffer_heap(PyObject *module, PyObject *arg)
{
    unsigned long long size = PyLong_AsUnsignedLongLong(arg);
    if (size == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return cp_bufheap_create(module, size);
}

static PyMethodDef payload_functions[] = {
    {"_buffer_heap", buffer_heap, METH_O,
     "_buffer_heap(bytes) -> BufferHeap: shared memory for pools' large buffers, about bytes "
     "of it (address space: pages are used only as buffers pass through)"},
    {"_payload_encode", payload_encode, METH_O,
     "_payload_encode(obj) -> (encoding, bytes): a pool payload as a worker would get it "
     "(no heap: every buffer in band). 1 is the plain form, 0 pickle."},
    {"_payload_decode", payload_decode, METH_VARARGS, "_payload_decode(encoding, bytes) -> obj"},
    {NULL},
};

int cp_exec_pool_payload(PyObject *module)
{
    if (PyModule_AddFunctions(module, payload_functions) < 0)
        return -1;
    if (cp_add_type(module, CP_TYPE_BUFHEAP, &bufheap_spec, NULL) < 0 ||
        cp_add_type(module, CP_TYPE_HEAPBLOCK, &block_spec, NULL) < 0 ||
        cp_add_type(module, CP_TYPE_HEAPCOLLECTOR, &collector_spec, NULL) < 0)
        return -1;
    return 0;
}
