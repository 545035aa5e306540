/* fork + exec with a chosen set of inherited fds, in the manner of _posixsubprocess and libuv:
   signals blocked around fork, errno of a failed exec reported over a close-on-exec pipe. */
#define _GNU_SOURCE
#include "spawn.h"

#include "arena.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void child_fail(int errpipe, int err)
{
    ssize_t r;
    do
        r = write(errpipe, &err, sizeof err);
    while (r < 0 && errno == EINTR);
    _exit(127);
}

pid_t cp_spawn(const char *path, char *const argv[], const int *pass_fds, int npass)
{
    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) < 0)
        return -errno;

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);

    cp_arena_fork_execs = 1; /* the child inherits no arena handle: it execs at once */
    pid_t pid = fork();
    cp_arena_fork_execs = 0;
    if (pid == 0) {
        /* Child: async-signal-safe calls only. */
        close(errpipe[0]);
        for (int i = 0; i < npass; i++) {
            int fl = fcntl(pass_fds[i], F_GETFD);
            if (fl < 0 || fcntl(pass_fds[i], F_SETFD, fl & ~FD_CLOEXEC) < 0)
                child_fail(errpipe[1], errno);
        }
        /* What _posixsubprocess leaves a multiprocessing child (restore_signals=False): the
           parent's signal mask, and ignored signals still ignored after exec. Caught signals are
           reset first (exec would reset them anyway) so no parent handler runs here before exec
           once the mask is restored. */
        for (int sig = 1; sig < NSIG; sig++) {
            struct sigaction sa;
            if (sigaction(sig, NULL, &sa) == 0 &&
                ((sa.sa_flags & SA_SIGINFO) ||
                 (sa.sa_handler != SIG_IGN && sa.sa_handler != SIG_DFL)))
                signal(sig, SIG_DFL);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        execv(path, argv);
        child_fail(errpipe[1], errno);
    }
    int fork_err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(errpipe[1]);
    if (pid < 0) {
        close(errpipe[0]);
        return -fork_err;
    }

    int child_err = 0;
    ssize_t n;
    do
        n = read(errpipe[0], &child_err, sizeof child_err);
    while (n < 0 && errno == EINTR);
    close(errpipe[0]);
    if (n == (ssize_t)sizeof child_err) {
        /* exec failed: reap the child that exited with 127 so it leaves no zombie */
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        return -child_err;
    }
    return pid;
}

int cp_pidfd_open(pid_t pid)
{
#ifdef SYS_pidfd_open
    long fd = syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0)
        return -errno;
    /* pidfds are always close-on-exec */
    return (int)fd;
#else
    (void)pid;
    return -ENOSYS;
#endif
}

int cp_pidfd_send_signal(int pidfd, int sig)
{
#ifdef SYS_pidfd_send_signal
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
#else
    (void)pidfd;
    (void)sig;
    errno = ENOSYS;
    return -1;
#endif
}
