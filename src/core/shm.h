/* Shared-memory segments: memfd_create + mmap(MAP_SHARED). Inherited across fork; the fd is
   handed to spawned children. The kernel frees a segment when its last fd and mapping go,
   so a SIGKILLed process leaks nothing. */
#ifndef CPOOL_SHM_H
#define CPOOL_SHM_H

#include <stddef.h>

typedef struct {
    int fd;       /* close-on-exec memfd, -1 once closed */
    void *addr;   /* MAP_SHARED mapping of the whole segment, NULL when unmapped */
    size_t size;
} cp_shm_t;

/* Create a zero-filled segment of size bytes. Returns 0 or -errno. */
int cp_shm_create(cp_shm_t *shm, size_t size, const char *debug_name);

/* Map an existing segment from fd (the fd is dup'ed, close-on-exec; the caller keeps its own).
   size 0 means "ask fstat". Returns 0 or -errno. */
int cp_shm_attach(cp_shm_t *shm, int fd, size_t size);

/* Unmap and close; safe to call twice. */
void cp_shm_close(cp_shm_t *shm);

#endif
