/* Framing and exact reads/writes over fds (see frame.h); runs with the GIL released. */
#define _GNU_SOURCE
#include "frame.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "deadline.h"

size_t cp_frame_header_encode(unsigned char out[CP_FRAME_HDR_MAX], uint64_t len)
{
    if (len <= CP_FRAME_SHORT_MAX) {
        for (int i = 0; i < 4; i++)
            out[i] = (unsigned char)(len >> (24 - 8 * i));
        return 4;
    }
    memset(out, 0xff, 4); /* -1: the real length follows on 8 bytes */
    for (int i = 0; i < 8; i++)
        out[4 + i] = (unsigned char)(len >> (56 - 8 * i));
    return 12;
}

int cp_frame_header_short(const unsigned char h[4], uint64_t *len)
{
    uint32_t u = ((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) | ((uint32_t)h[2] << 8) | h[3];
    if (u == 0xffffffffu)
        return 1;
    if (u & 0x80000000u)
        return -EBADMSG;
    *len = u;
    return 0;
}

uint64_t cp_frame_header_long(const unsigned char h[8])
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | h[i];
    return v;
}

int cp_write_iov(int fd, const struct iovec *iov, int iovcnt, size_t *done, int is_sock)
{
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    while (*done < total) {
        /* Skip what was written already; at most a header and a payload here, so a small
           copy of the vector is cheap. */
        struct iovec rest[4];
        int n = 0;
        size_t skip = *done;
        for (int i = 0; i < iovcnt && n < 4; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            rest[n].iov_base = (char *)iov[i].iov_base + skip;
            rest[n].iov_len = iov[i].iov_len - skip;
            skip = 0;
            n++;
        }
        ssize_t w;
        if (is_sock) {
            struct msghdr msg = {.msg_iov = rest, .msg_iovlen = (size_t)n};
            w = sendmsg(fd, &msg, MSG_NOSIGNAL);
        } else {
            w = writev(fd, rest, n);
        }
        if (w < 0)
            return -errno; /* -EINTR included: the caller checks signals and calls again */
        *done += (size_t)w;
        /* A short write may mean a signal came after some bytes went: the kernel then
           reports progress, not EINTR, so the caller must look at signals before we block
           again. */
        if (*done < total)
            return -EINTR;
    }
    return 0;
}

int cp_poll_until(struct pollfd *pfds, nfds_t n, int64_t deadline)
{
    int r = poll(pfds, n, cp_deadline_left_ms(deadline));
    return r < 0 ? -errno : r;
}

static int wait_readable(int fd, int64_t deadline)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r = cp_poll_until(&p, 1, deadline);
    if (r < 0)
        return r;
    if (r == 0)
        return -ETIMEDOUT;
    if (p.revents & POLLNVAL)
        return -EBADF;
    return 0; /* readable, hung up or in error: the read tells which */
}

int cp_read_full(int fd, void *buf, size_t len, size_t *done, int64_t deadline, int is_sock)
{
    while (*done < len) {
        if (deadline != CP_NO_DEADLINE) {
            int r = wait_readable(fd, deadline);
            if (r < 0)
                return r;
        }
        ssize_t got;
        /* MSG_WAITALL lets the kernel gather a large payload in one call; a signal still
           ends it early (with what came so far), so Ctrl-C is not delayed. */
        if (is_sock)
            got = recv(fd, (char *)buf + *done, len - *done,
                       deadline == CP_NO_DEADLINE ? MSG_WAITALL : 0);
        else
            got = read(fd, (char *)buf + *done, len - *done);
        if (got < 0)
            return -errno;
        if (got == 0)
            return CP_FRAME_EOF;
        *done += (size_t)got;
        /* Short read: maybe a signal ended it (MSG_WAITALL reports progress, not EINTR),
           so let the caller check signals before blocking again. */
        if (*done < len)
            return -EINTR;
    }
    return 0;
}

int cp_fd_is_socket(int fd)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    return S_ISSOCK(st.st_mode) ? 1 : 0;
}

void cp_fd_grow_buffer(int fd, int is_sock, int bytes)
{
    if (is_sock) {
        int cur = 0;
        socklen_t sl = sizeof cur;
        /* The kernel reports twice what was asked (bookkeeping), so compare with that. */
        if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &cur, &sl) == 0 && cur < 2 * bytes)
            (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
    } else {
        int cur = fcntl(fd, F_GETPIPE_SZ);
        if (cur >= 0 && cur < bytes)
            (void)fcntl(fd, F_SETPIPE_SZ, bytes); /* EPERM above pipe-max-size: keep what we have */
    }
}
