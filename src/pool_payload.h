/* Pool payloads (task arguments, results): the compact plain form, else pickle protocol 5 with
   large buffers out of band in the pool's shared heap, else plain pickle. */
#ifndef CPOOL_POOL_PAYLOAD_H
#define CPOOL_POOL_PAYLOAD_H

#include "module.h"
#include "bufheap.h"
#include "pool_codec.h"
#include "pool_protocol.h"

#include <stdint.h>

/* The heap of one pool as seen by one process (a _core.BufferHeap): NULL means none. */
typedef struct BufferHeap BufferHeap;

/* A new heap of about data bytes (NULL with an exception), or one handed over by fd. */
PyObject *cp_bufheap_create(PyObject *module, uint64_t data);
PyObject *cp_bufheap_attach(PyObject *module, int fd, uint64_t size);

/* dumps(obj, buffer_callback) -> bytes: the pickler of payloads that may have buffers (it
   sends read-only arrays as writable copies, as the standard library's protocol 4 does);
   pickle.dumps(obj, protocol=5, buffer_callback=...) until set. */
void cp_bufheap_set_dumps(PyObject *heap, PyObject *dumps);

/* Free the blocks a dead worker held. */
void cp_bufheap_reclaim(PyObject *heap, int32_t holder);

int cp_bufheap_fd(PyObject *heap);
uint64_t cp_bufheap_size(PyObject *heap);
uint64_t cp_bufheap_used(PyObject *heap);

/* Could pickling obj produce out-of-band buffers? Only objects exporting a buffer do (numpy
   arrays, PickleBuffer...; bytes and bytearray pickle in band anyway). Plain containers of
   plain values are checked two levels deep; anything else is assumed to, which costs only the
   callback (skipping it saves a third of the time of pickling a small tuple). Shared by
   Queue and Pool. */
int cp_may_have_buffers(PyObject *obj, int depth);

/* pickle.dumps(o, protocol=5) */
PyObject *cp_pickle_dumps(cp_state *st, PyObject *o);

/* Append the encoding of o to b (heap may be NULL; its new blocks are held by holder); *enc
   says which. 0, or -1 with an exception (b's length as before). */
int cp_payload_encode(cp_state *st, PyObject *heap, int32_t holder, cp_buf *b, PyObject *o,
                      uint32_t *enc);

/* The value of a payload, or NULL with an exception. Its heap blocks become this process's, held
   by holder: freed when the objects reading them go. */
PyObject *cp_payload_decode(cp_state *st, PyObject *heap, int32_t holder, const uint8_t *buf,
                            uint64_t len, uint32_t enc);

/* A payload that will not be decoded: free its heap blocks. */
void cp_payload_drop(PyObject *heap, const uint8_t *buf, uint64_t len, uint32_t enc);

/* A payload about to be handed to another process: its blocks are held by holder now. */
void cp_payload_hand_over(PyObject *heap, const uint8_t *buf, uint64_t len, uint32_t enc,
                          int32_t holder);

#endif
