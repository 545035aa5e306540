/* Length-prefixed frames over fds in the standard library's multiprocessing wire format
   (4-byte big-endian signed length; -1 then an 8-byte length above 2 GiB), with resumable
   exact reads/writes, CLOCK_MONOTONIC deadlines and poll(2). No Python here: 0 or -errno. */
#ifndef CPOOL_FRAME_H
#define CPOOL_FRAME_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define CP_FRAME_HDR_MAX 12
/* Lengths at or below this go in the short (4-byte) header, as the standard library does. */
#define CP_FRAME_SHORT_MAX 0x7fffffffu
/* Positive result of cp_read_full: the peer closed the connection (*done says how much came). */
#define CP_FRAME_EOF 1

/* Encode the header for a payload of len bytes into out; returns the header size (4 or 12). */
size_t cp_frame_header_encode(unsigned char out[CP_FRAME_HDR_MAX], uint64_t len);

/* Decode the first 4 header bytes: 0 and *len for a short header, 1 when an 8-byte length
   follows (decode it with cp_frame_header_long), -EBADMSG for any other negative length. */
int cp_frame_header_short(const unsigned char h[4], uint64_t *len);
uint64_t cp_frame_header_long(const unsigned char h[8]);

/* Write every byte of iov to fd. Resumable: *done counts the bytes already written and must
   start at 0. is_sock selects sendmsg(MSG_NOSIGNAL). Returns 0, -EINTR (a signal may have
   come: check it and call again; also after any short write, since the kernel reports the
   progress rather than EINTR when a signal interrupts a partly done transfer) or -errno. */
int cp_write_iov(int fd, const struct iovec *iov, int iovcnt, size_t *done, int is_sock);

/* Read exactly len bytes into buf. Resumable like cp_write_iov. With a deadline other than
   CP_NO_DEADLINE, poll(2) first and give -ETIMEDOUT when it passes. Returns 0, CP_FRAME_EOF,
   -EINTR, -ETIMEDOUT or -errno. */
int cp_read_full(int fd, void *buf, size_t len, size_t *done, int64_t deadline, int is_sock);

/* poll(2) the set for the deadline. Returns how many are ready (0 on timeout), -EINTR or
   -errno. One call; the caller loops on -EINTR after checking signals. */
int cp_poll_until(struct pollfd *pfds, nfds_t n, int64_t deadline);

/* 1 if fd is a socket, 0 if not, -errno. */
int cp_fd_is_socket(int fd);

/* Make the kernel buffer of fd large enough for bulk transfers (SO_SNDBUF on sockets,
   F_SETPIPE_SZ on pipes); best effort, never shrinks. */
void cp_fd_grow_buffer(int fd, int is_sock, int bytes);

#endif
