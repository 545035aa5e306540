/* Named POSIX shared memory: shm_open born close-on-exec, sized with ftruncate, size by fstat. */
#define _GNU_SOURCE
#include "posix_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int cp_pshm_open(const char *name, int flags, int mode, size_t size, int *fd_out,
                 size_t *size_out)
{
    int fd;
    do {
        fd = shm_open(name, flags | O_CLOEXEC, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    int r = 0;
    if ((flags & O_CREAT) && size > 0) {
        do {
            r = ftruncate(fd, (off_t)size);
        } while (r < 0 && errno == EINTR);
    }
    struct stat st;
    if (r == 0)
        r = fstat(fd, &st);
    if (r < 0) {
        int err = errno;
        /* A segment we created but could not size is of no use to anyone: take its name back
           (only if we are sure it is ours, i.e. O_EXCL made it). */
        if ((flags & (O_CREAT | O_EXCL)) == (O_CREAT | O_EXCL))
            shm_unlink(name);
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
