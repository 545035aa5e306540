/* The shared-memory channel toolkit: what the queues' ring (ring.c) and the pool's task and
   result rings (taskring.c) both do with a circular byte area of records.

   A record is an 8-byte header and a payload padded to 8 bytes, so a header never straddles
   the wrap point of an area whose size is a multiple of 8; a payload may, and is copied in two
   pieces there. Positions only grow (64-bit); an area's offset of a position is wrap(). */
#ifndef CPOOL_CHANNEL_H
#define CPOOL_CHANNEL_H

#include <stdint.h>
#include <string.h>

#define CP_CHAN_PAGE 4096ULL
#define CP_CHAN_REC_HDR 8ULL /* bytes of a record's header */

static inline uint64_t cp_chan_align8(uint64_t n)
{
    return (n + 7) & ~7ULL;
}

static inline uint64_t cp_chan_page_down(uint64_t n)
{
    return n & ~(CP_CHAN_PAGE - 1);
}

static inline uint64_t cp_chan_page_up(uint64_t n)
{
    return (n + CP_CHAN_PAGE - 1) & ~(CP_CHAN_PAGE - 1);
}

/* The smallest power of two of at least a page that holds n bytes (an area's size). */
static inline uint64_t cp_chan_pow2_pages(uint64_t n)
{
    uint64_t p = CP_CHAN_PAGE;
    while (p < n)
        p <<= 1;
    return p;
}

/* Bytes a record of a len-byte payload takes in an area: header + padded payload. */
static inline uint64_t cp_chan_record_size(uint64_t len)
{
    return CP_CHAN_REC_HDR + cp_chan_align8(len);
}

/* Offset of a position in an area of size bytes: a power of two masks, any other size (a
   grown cold ring of whole pages) takes the remainder. */
static inline uint64_t cp_chan_wrap(uint64_t pos, uint64_t size)
{
    return (size & (size - 1)) ? pos % size : pos & (size - 1);
}

/* A record's header at position pos (8-aligned: it never wraps), written and read. */
static inline void cp_chan_put_hdr(unsigned char *area, uint64_t size, uint64_t pos, const void *hdr)
{
    memcpy(area + cp_chan_wrap(pos, size), hdr, CP_CHAN_REC_HDR);
}

static inline void cp_chan_get_hdr(const unsigned char *area, uint64_t size, uint64_t pos, void *hdr)
{
    memcpy(hdr, area + cp_chan_wrap(pos, size), CP_CHAN_REC_HDR);
}

/* How one piece is copied: NULL for memcpy, or the caller's copy (in slices, with a cancel
   check, faulting pages in: see ring.c), which returns 0 or a negative errno that stops the
   copy. */
typedef int (*cp_chan_copy_fn)(void *ctx, void *dst, const void *src, uint64_t n);

static inline int cp_chan_copy_piece(cp_chan_copy_fn copy, void *ctx, void *dst, const void *src,
                                     uint64_t n)
{
    if (copy)
        return copy(ctx, dst, src, n);
    memcpy(dst, src, n);
    return 0;
}

/* Copy n bytes from src to the area at position pos, in two pieces where it wraps. */
static inline int cp_chan_copy_in(unsigned char *area, uint64_t size, uint64_t pos, const void *src,
                                  uint64_t n, cp_chan_copy_fn copy, void *ctx)
{
    uint64_t off = cp_chan_wrap(pos, size);
    uint64_t first = n < size - off ? n : size - off;
    int rc = cp_chan_copy_piece(copy, ctx, area + off, src, first);
    if (rc == 0 && n > first)
        rc = cp_chan_copy_piece(copy, ctx, area, (const unsigned char *)src + first, n - first);
    return rc;
}

/* Copy n bytes of the area at position pos to dst, in two pieces where it wraps. */
static inline int cp_chan_copy_out(const unsigned char *area, uint64_t size, uint64_t pos, void *dst,
                                   uint64_t n, cp_chan_copy_fn copy, void *ctx)
{
    uint64_t off = cp_chan_wrap(pos, size);
    uint64_t first = n < size - off ? n : size - off;
    int rc = cp_chan_copy_piece(copy, ctx, dst, area + off, first);
    if (rc == 0 && n > first)
        rc = cp_chan_copy_piece(copy, ctx, (unsigned char *)dst + first, area, n - first);
    return rc;
}

#endif
