/* Shared-memory segments over memfd: born close-on-exec, sized with ftruncate, mapped shared. */
#define _GNU_SOURCE
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int cp_shm_create(cp_shm_t *shm, size_t size, const char *debug_name)
{
    shm->fd = -1;
    shm->addr = NULL;
    shm->size = 0;
    if (size == 0)
        return -EINVAL;
    int fd = memfd_create(debug_name ? debug_name : "cpool", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)size) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    void *addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) {
        int err = errno;
        close(fd);
        return -err;
    }
    shm->fd = fd;
    shm->addr = addr;
    shm->size = size;
    return 0;
}

int cp_shm_attach(cp_shm_t *shm, int fd, size_t size)
{
    shm->fd = -1;
    shm->addr = NULL;
    shm->size = 0;
    if (size == 0) {
        struct stat st;
        if (fstat(fd, &st) < 0)
            return -errno;
        size = (size_t)st.st_size;
        if (size == 0)
            return -EINVAL;
    }
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
        return -errno;
    void *addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, own, 0);
    if (addr == MAP_FAILED) {
        int err = errno;
        close(own);
        return -err;
    }
    shm->fd = own;
    shm->addr = addr;
    shm->size = size;
    return 0;
}

void cp_shm_close(cp_shm_t *shm)
{
    if (shm->addr) {
        munmap(shm->addr, shm->size);
        shm->addr = NULL;
    }
    if (shm->fd >= 0) {
        close(shm->fd); /* never retried on EINTR: the fd is gone either way on Linux */
        shm->fd = -1;
    }
}
