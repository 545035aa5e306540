/* Named POSIX shared memory: shm_open born close-on-exec, sized with ftruncate, size by fstat. */
#define _GNU_SOURCE
#include "posix_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int cp_pshm_create(const char *name, size_t size, int *fd_out)
{
    int fd;
    do {
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    int r;
    do {
        r = ftruncate(fd, (off_t)size);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        /* A segment we could not size is of no use to anyone: take its name back. */
        int err = errno;
        shm_unlink(name);
        close(fd);
        return -err;
    }
    *fd_out = fd;
    return 0;
}

int cp_pshm_attach(const char *name, int *fd_out, size_t *size_out)
{
    int fd;
    do {
        fd = shm_open(name, O_RDWR | O_CLOEXEC, 0600);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    *fd_out = fd;
    *size_out = (size_t)st.st_size;
    return 0;
}

int cp_pshm_unlink(const char *name)
{
    return shm_unlink(name) < 0 ? -errno : 0;
}
