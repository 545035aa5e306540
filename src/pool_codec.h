/* Compact encoding of plain values for pool payloads (pickle is the fallback). */
#ifndef CPOOL_POOL_CODEC_H
#define CPOOL_POOL_CODEC_H

#include "module.h"

#include <stdint.h>

/* A growable byte buffer (PyMem_Raw memory). */
typedef struct {
    uint8_t *buf;
    size_t len, cap;
} cp_buf;

/* Make room for n bytes in total. 0, or -1 with MemoryError. */
int cp_buf_reserve(cp_buf *b, size_t n);

/* Append the encoding of o to b: 0, 1 when o is not plain (b unchanged: pickle it), or -1
   with an exception. */
int cp_plain_encode_to(cp_buf *b, PyObject *o);

/* The value encoded in buf, or NULL with an exception (ValueError if corrupt). */
PyObject *cp_plain_decode(const uint8_t *buf, uint64_t len);

/* If buf encodes a 1-tuple holding a list of m items, store those items in dst[off..off+m)
   (replacing what is there, at most dst's length) and return m; -2 when buf has another
   shape (decode it the general way); -1 with an exception. */
Py_ssize_t cp_plain_decode_chunk_into(const uint8_t *buf, uint64_t len, PyObject *dst,
                                      Py_ssize_t off);

#endif
