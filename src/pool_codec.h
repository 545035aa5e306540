/* Compact encoding of plain values for pool payloads (pickle is the fallback). */
#ifndef CPOOL_POOL_CODEC_H
#define CPOOL_POOL_CODEC_H

#include "module.h"

#include <stdint.h>

/* bytes, None when o is not plain (then pickle it), or NULL with an exception. */
PyObject *cp_plain_encode(PyObject *o);

/* The value encoded in buf, or NULL with an exception (ValueError if corrupt). */
PyObject *cp_plain_decode(const uint8_t *buf, uint64_t len);

#endif
