/* Named POSIX shared memory (shm_open) segments: open/create and size, unlink; no Python here. */
#ifndef CP_POSIX_SHM_H
#define CP_POSIX_SHM_H
#include <stddef.h>

/* Opens name with shm_open's flags (O_CLOEXEC added) and mode; sizes it with ftruncate when it
   was opened with O_CREAT and size > 0; reports its size by fstat. Returns 0 or a negative
   errno; on failure nothing stays open, and a segment this call created is unlinked again. */
int cp_pshm_open(const char *name, int flags, int mode, size_t size, int *fd_out,
                 size_t *size_out);
int cp_pshm_unlink(const char *name);
#endif
