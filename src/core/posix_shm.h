/* Named POSIX shared memory (shm_open) segments: create, attach, unlink; no Python here. */
#ifndef CP_POSIX_SHM_H
#define CP_POSIX_SHM_H
#include <stddef.h>

/* Each returns 0 or a negative errno. */
int cp_pshm_create(const char *name, size_t size, int *fd_out);
int cp_pshm_attach(const char *name, int *fd_out, size_t *size_out);
int cp_pshm_unlink(const char *name);
#endif
