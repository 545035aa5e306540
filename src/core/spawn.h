/* Start a program with exactly the chosen fds inherited (fork + exec), and wait for children. */
#ifndef CPOOL_SPAWN_H
#define CPOOL_SPAWN_H

#include <sys/types.h>

/* Fork and execv(path, argv). Only fds listed in pass_fds survive exec (they keep their numbers);
   signal mask and dispositions are reset in the child. Everything is allocated by the caller:
   between fork and exec the child makes only async-signal-safe calls.
   Returns the child's pid, or -errno (the exec's errno when the exec itself failed). */
pid_t cp_spawn(const char *path, char *const argv[], const int *pass_fds, int npass);

/* pidfd_open(2): an fd that becomes readable when pid exits. -errno on failure. */
int cp_pidfd_open(pid_t pid);

/* pidfd_send_signal(2): 0, or -1 with errno (ESRCH once the process is gone). */
int cp_pidfd_send_signal(int pidfd, int sig);

#endif
