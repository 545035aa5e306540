/* The pool's wire protocol: the headers that start task and result messages in the pool's
   rings (core/taskring carries them as opaque bytes), the kinds of task, the status of a
   result and the encodings of a payload. Shared by the parent's and the workers' sides. */
#ifndef CPOOL_POOL_PROTOCOL_H
#define CPOOL_POOL_PROTOCOL_H

#include <stdint.h>

/* Header that starts every task message (after the piece header). */
typedef struct {
    uint64_t job_id;
    uint64_t task_seq;
    int64_t timeout_ns;
    uint32_t first_chunk;
    uint32_t nchunks;
    uint32_t kind;      /* CP_TASK_* */
    uint32_t func_len;  /* func payload follows this header, then args */
    uint32_t args_len;
    uint32_t flags;     /* CP_ENC_* of func and args */
} cp_task_hdr_t;

/* Header that starts every result message. */
typedef struct {
    uint64_t job_id;
    uint64_t task_seq;
    uint32_t first_chunk;
    uint32_t nchunks;
    uint32_t status;    /* CP_RES_* */
    uint32_t flags;     /* CP_ENC_* of the payload */
} cp_res_hdr_t;

/* Kinds of task; every task message carries nchunks chunks: an args tuple (APPLY), an
   (args, kwds) pair (APPLY_KW), or a tuple of items (MAP, STARMAP). */
enum { CP_TASK_APPLY = 1, CP_TASK_APPLY_KW = 2, CP_TASK_MAP = 3, CP_TASK_STARMAP = 4 };
enum { CP_RES_OK = 0, CP_RES_ERR = 1, CP_RES_STATUS = 0xff,
       CP_RES_LAST = 0x100,   /* the last result of its task message */
       CP_RES_BATCH = 0x200,  /* ... of a message of several chunks */
       CP_RES_RETURN = 0x400 };/* no result: chunks [first, first+n) given back unstarted */

/* Encodings of a payload (the flags of a task or result message). CP_ENC_PICKLE5: a u64 count
   n, n {u64 offset, u64 length} blocks of the heap, then the pickle whose out-of-band buffers
   they are, in order. */
enum { CP_ENC_PICKLE = 0, CP_ENC_PLAIN = 1, CP_ENC_PICKLE5 = 2 };

#endif
