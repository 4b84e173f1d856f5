/* What verification costs, with no Python in the way: the lower bound that docs/benchmarks.md
 * compares cprd's handoff with.
 *
 * A parent process sends N fds of mixed kinds (35% regular files, 25% eventfds, 10% memfds, 10%
 * pipe ends, 20% socketpair ends, like `cprd --populate` mixes) to a forked child over a
 * SOCK_SEQPACKET socketpair, PER fds a message. The child receives them (MSG_CMSG_CLOEXEC) and,
 * with VERIFY=1, calls fstat() on each, with VERIFY=2 fstat() and fcntl(F_GETFL) (what cprd's
 * target does for every fd). Printed: ms from the first send to the child's "done", 5 runs.
 *
 *   cc -O2 -o verify_floor docs/verify_floor.c
 *   ./verify_floor 7530 0 253     # the floor: batches of 253, nothing verified
 *   ./verify_floor 7530 2 253     # the same, every fd verified as cprd does
 *   ./verify_floor 7530 0 1       # one fd per message, nothing verified
 *
 * Needs RLIMIT_NOFILE above N (ulimit -n). Regular files are created in the current directory
 * (vf-*) and removed at the end.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s N VERIFY(0|1|2) PER_MESSAGE(1..253)\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), verify = atoi(argv[2]), per = atoi(argv[3]);
    if (n < 1 || per < 1 || per > 253)
        return 2;
    int *fds = malloc(sizeof(int) * n), made = 0, pair[2];
    while (made < n) {
        int k = made % 20;
        if (k < 7) {
            char path[64];
            snprintf(path, sizeof path, "vf-%d", made);
            fds[made++] = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
            unlink(path);
        } else if (k < 12) {
            fds[made++] = eventfd(0, EFD_CLOEXEC);
        } else if (k < 14) {
            fds[made++] = memfd_create("vf", MFD_CLOEXEC);
        } else {
            if (k < 16 ? pipe2(pair, O_CLOEXEC) : socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair))
                return perror("pipe/socketpair"), 1;
            fds[made++] = pair[0];
            if (made < n)
                fds[made++] = pair[1];
            else
                close(pair[1]);
        }
        if (fds[made - 1] < 0)
            return perror("creating fds (is ulimit -n above N?)"), 1;
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv))
        return perror("socketpair"), 1;
    for (int rep = 0; rep < 5; rep++) {
        pid_t pid = fork();
        if (pid == 0) {
            static char buf[65536], cbuf[CMSG_SPACE(253 * sizeof(int))];
            long sum = 0;
            int got = 0;
            struct stat st;
            close(sv[0]);
            for (int i = 0; i < n; i++)
                close(fds[i]); /* room for the ones that arrive */
            if (write(sv[1], "r", 1) != 1)
                _exit(1);
            while (got < n) {
                struct iovec io = {buf, sizeof buf};
                struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
                if (recvmsg(sv[1], &m, MSG_CMSG_CLOEXEC) < 0 || (m.msg_flags & MSG_CTRUNC))
                    _exit(1);
                struct cmsghdr *c = CMSG_FIRSTHDR(&m);
                int cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int), *f = (int *)CMSG_DATA(c);
                for (int i = 0; verify && i < cnt; i++) {
                    sum += fstat(f[i], &st) == 0 ? (long)st.st_ino : 0;
                    if (verify > 1)
                        sum += fcntl(f[i], F_GETFL);
                }
                got += cnt;
            }
            if (write(sv[1], "k", 1) != 1)
                _exit(1);
            _exit(sum == 42);
        }
        char c, payload[253 * 34];
        memset(payload, 1, sizeof payload);
        if (read(sv[0], &c, 1) != 1)
            return 1;
        double t0 = now_ms();
        for (int i = 0; i < n; i += per) {
            int cnt = n - i < per ? n - i : per;
            char cbuf[CMSG_SPACE(253 * sizeof(int))];
            struct iovec io = {payload, cnt * 34}; /* about what cprd's records weigh */
            struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf,
                               .msg_controllen = CMSG_SPACE(cnt * sizeof(int))};
            struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(cnt * sizeof(int));
            memcpy(CMSG_DATA(cm), fds + i, cnt * sizeof(int));
            if (sendmsg(sv[0], &m, 0) < 0)
                return perror("sendmsg"), 1;
        }
        if (read(sv[0], &c, 1) != 1)
            return 1;
        printf("N=%d verify=%d per_message=%d: %.3f ms\n", n, verify, per, now_ms() - t0);
        waitpid(pid, NULL, 0);
    }
    return 0;
}
