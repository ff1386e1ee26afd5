/*
 * vmctl-exec-mux: the guest side of vmctl's exec channel.
 *
 * One process serves every org.vmctl.exec.N virtio-serial port; each port
 * carries one session at a time: a command with its stdin, stdout, stderr
 * and exit status, on pipes or on a pty. The frames are described in
 * docs/guest-contract.md ("Exec channel"). A shell script cannot do this:
 * busybox has no `script` applet for a pty, and reading binary frames in
 * sh costs a process per chunk. Plain C and libc only, so the micro image
 * builds it statically with the host's cc and NixOS with its stdenv.
 *
 * Usage: vmctl-exec-mux [-r READY_FILE] PORT...
 * Every buffer is fixed: the host may have at most STDIN_WINDOW bytes of
 * stdin in flight (it waits for 'C' credit), and output is read from the
 * command only while the port's outgoing buffer has room.
 *
 * A pipe session starts in a warm shell when one is waiting: a `sh` forked
 * and exec'd ahead of time (after the previous session), which sources the
 * command from a pipe on fd 3. Under TCG starting a shell costs ~15-20 ms,
 * most of `vmctl exec -- true`; the host's next process start hides it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAXPORTS 16
#define HDR 3
#define IN_CAP 4096 /* host frames fit PIPE_BUF: written whole or not at all */
#define CHUNK 16384
#define OUT_CAP (4 * (CHUNK + HDR))
#define STDIN_WINDOW 65536
#define CMD_MAX (256 * 1024)
#define RETRY_MS 50
#define WARM_CMD_MAX 60000 /* fits an empty pipe: written whole without blocking */

struct port {
    int fd;
    long long retry_at; /* while the host side is closed (socket chardevs) */
    unsigned char in[IN_CAP];
    size_t inlen;
    unsigned char out[OUT_CAP];
    size_t outlen;
    char cmd[CMD_MAX + 1];
    size_t cmdlen;
    int cmd_bad;
    /* the session */
    int active, tty, exited, status;
    pid_t pid;
    int sin, sout, serr; /* -1 when closed; with a pty all three are the master */
    unsigned char stdin_buf[STDIN_WINDOW];
    size_t stdin_len;
    int stdin_eof, eof_done;
    size_t credit; /* stdin bytes delivered, not yet reported to the host */
};

static struct port ports[MAXPORTS];
static int nports;
static int sigpipe_fds[2];
/* The warm shell: pid 0 when none; its stdin, stdout, stderr and command pipe. */
static struct {
    pid_t pid;
    int in, out, err, cmd;
    long long retry_at;
} warm = {0, -1, -1, -1, -1, 0};

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void on_sigchld(int sig) {
    int saved = errno;
    (void)sig;
    if (write(sigpipe_fds[1], "c", 1) < 0) { /* full: a wake-up is pending anyway */
    }
    errno = saved;
}

static int room(struct port *p) { return OUT_CAP - p->outlen; }

static void emit(struct port *p, char type, const void *data, size_t len) {
    if (room(p) < (int)(len + HDR))
        return; /* callers check room first; never overflow */
    p->out[p->outlen] = (unsigned char)type;
    p->out[p->outlen + 1] = (unsigned char)(len >> 8);
    p->out[p->outlen + 2] = (unsigned char)(len & 0xff);
    memcpy(p->out + p->outlen + HDR, data, len);
    p->outlen += len + HDR;
}

static void emit_text(struct port *p, char type, const char *text) { emit(p, type, text, strlen(text)); }

static void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void end_session(struct port *p) {
    if (p->active && !p->exited && p->pid > 0)
        kill(-p->pid, SIGKILL); /* reaped by the SIGCHLD loop */
    if (p->tty) /* sin is the master, closed as sout */
        p->sin = -1;
    close_fd(&p->sin);
    close_fd(&p->sout);
    close_fd(&p->serr);
    p->active = p->exited = p->tty = 0;
    p->pid = 0;
    p->stdin_len = p->credit = 0;
    p->stdin_eof = p->eof_done = 0;
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void child(struct port *p, int tty, const char *slave, int in[2], int out[2], int err[2],
                  const char *term) {
    signal(SIGCHLD, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (tty) {
        int s = open(slave, O_RDWR);
        if (s < 0)
            _exit(126);
        ioctl(s, TIOCSCTTY, 0);
        dup2(s, 0), dup2(s, 1), dup2(s, 2);
        if (s > 2)
            close(s);
        if (*term)
            setenv("TERM", term, 1);
    } else {
        dup2(in[0], 0), dup2(out[1], 1), dup2(err[1], 2);
        unsetenv("TERM");
    }
    execl("/bin/sh", "sh", "-c", p->cmd, (char *)NULL);
    _exit(127);
}

static void close_pipes(int a[2], int b[2], int c[2], int d[2]) {
    int *all[4] = {a, b, c, d};
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++)
            if (all[i][j] >= 0)
                close(all[i][j]), all[i][j] = -1;
}

/* Fork and exec the next warm shell: `sh -c '. /proc/self/fd/3'`, blocked in
 * reading its command until a session takes it. */
static void warm_up(void) {
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, cmd[2] = {-1, -1};
    if (warm.pid > 0 || warm.retry_at > now_ms())
        return;
    for (int i = 0; i < nports; i++)
        if (ports[i].active) /* never compete with a running command for the CPU */
            return;
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) ||
        pipe2(cmd, O_CLOEXEC))
        goto fail;
    pid_t pid = fork();
    if (pid < 0)
        goto fail;
    if (pid == 0) {
        signal(SIGCHLD, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        dup2(in[0], 0), dup2(out[1], 1), dup2(err[1], 2);
        if (cmd[0] == 3)
            fcntl(3, F_SETFD, 0);
        else
            dup2(cmd[0], 3);
        unsetenv("TERM");
        execl("/bin/sh", "sh", "-c", ". /proc/self/fd/3", (char *)NULL);
        _exit(127);
    }
    close(in[0]), close(out[1]), close(err[1]), close(cmd[0]);
    warm.pid = pid, warm.in = in[1], warm.out = out[0], warm.err = err[0], warm.cmd = cmd[1];
    return;
fail:
    close_pipes(in, out, err, cmd);
    warm.retry_at = now_ms() + 1000;
}

static void warm_gone(void) {
    close_fd(&warm.in), close_fd(&warm.out), close_fd(&warm.err), close_fd(&warm.cmd);
    warm.pid = 0;
}

/* Hand the command to the warm shell; 0 when there is none or it does not fit. */
static int take_warm(struct port *p) {
    static const char prefix[] = "exec 3<&-; "; /* the command's line 1 stays line 1 */
    size_t plen = sizeof prefix - 1;
    if (warm.pid <= 0 || p->cmdlen + plen + 1 > WARM_CMD_MAX)
        return 0;
    char *buf = malloc(p->cmdlen + plen + 1);
    if (!buf)
        return 0;
    memcpy(buf, prefix, plen);
    memcpy(buf + plen, p->cmd, p->cmdlen);
    buf[plen + p->cmdlen] = '\n';
    ssize_t n = write(warm.cmd, buf, p->cmdlen + plen + 1);
    free(buf);
    if (n != (ssize_t)(p->cmdlen + plen + 1)) { /* it died or was stopped: start cold */
        kill(-warm.pid, SIGKILL);
        warm_gone();
        return 0;
    }
    close_fd(&warm.cmd); /* EOF ends the sourced file */
    p->active = 1, p->tty = 0, p->pid = warm.pid;
    p->sin = warm.in, p->sout = warm.out, p->serr = warm.err;
    nonblock(p->sin), nonblock(p->sout), nonblock(p->serr);
    warm.in = warm.out = warm.err = -1;
    warm.pid = 0;
    return 1;
}

static void spawn(struct port *p, const char *spec) {
    char flags[16] = "-", term[64] = "";
    unsigned rows = 24, cols = 80;
    sscanf(spec, "%15s %u %u %63s", flags, &rows, &cols, term);
    for (char *c = term; *c; c++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-", *c))
            term[0] = 0;
    if (p->cmd_bad || p->cmdlen == 0) {
        emit_text(p, '2', p->cmd_bad ? "vmctl-exec-mux: command too long or not text\n"
                                     : "vmctl-exec-mux: request has no command\n");
        emit_text(p, 'E', "126");
        return;
    }
    p->cmd[p->cmdlen] = 0;
    int tty = strchr(flags, 't') != NULL;
    if (!tty && take_warm(p))
        return;
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
    char slave[64] = "";
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    if (tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) || unlockpt(master) || ptsname_r(master, slave, sizeof slave))
            goto fail;
        ioctl(master, TIOCSWINSZ, &ws); /* before fork: a 'W' frame right after wins */
    } else if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
        goto fail;
    }
    pid_t pid = fork();
    if (pid < 0)
        goto fail;
    if (pid == 0)
        child(p, tty, slave, in, out, err, term);
    p->active = 1, p->tty = tty, p->pid = pid;
    if (tty) {
        nonblock(master);
        p->sin = p->sout = master; /* serr stays -1: a pty merges them */
    } else {
        close(in[0]), close(out[1]), close(err[1]);
        p->sin = in[1], p->sout = out[0], p->serr = err[0];
        nonblock(p->sin), nonblock(p->sout), nonblock(p->serr);
    }
    return;
fail:
    emit_text(p, '2', "vmctl-exec-mux: cannot start the command\n");
    emit_text(p, 'E', "126");
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0) close(in[i]);
        if (out[i] >= 0) close(out[i]);
        if (err[i] >= 0) close(err[i]);
    }
    if (master >= 0)
        close(master);
}

static void reset(struct port *p, const unsigned char *id, size_t len) {
    char sync[64];
    end_session(p);
    p->outlen = 0; /* the previous client is gone: drop what it did not read */
    p->cmdlen = 0, p->cmd_bad = 0;
    if (len < 8 || len > 32)
        return;
    for (size_t i = 0; i < len; i++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", id[i]))
            return;
    int n = snprintf(sync, sizeof sync, "\036VMCTL-BEGIN %.*s\n", (int)len, id);
    memcpy(p->out, sync, n);
    p->outlen = n;
}

static void frame(struct port *p, unsigned char type, const unsigned char *data, size_t len) {
    char text[64];
    size_t tl = len < sizeof text - 1 ? len : sizeof text - 1;
    memcpy(text, data, tl);
    text[tl] = 0;
    switch (type) {
    case 'R':
        reset(p, data, len);
        break;
    case 'A':
        if (p->active || p->cmdlen + len > CMD_MAX || memchr(data, 0, len))
            p->cmd_bad = 1;
        else
            memcpy(p->cmd + p->cmdlen, data, len), p->cmdlen += len;
        break;
    case 'X':
        if (!p->active)
            spawn(p, text);
        break;
    case '0':
        if (!p->active || p->exited || p->stdin_eof)
            break;
        if (len == 0) {
            p->stdin_eof = 1;
        } else {
            size_t take = len < STDIN_WINDOW - p->stdin_len ? len : STDIN_WINDOW - p->stdin_len;
            memcpy(p->stdin_buf + p->stdin_len, data, take); /* the host keeps to its window */
            p->stdin_len += take;
        }
        break;
    case 'W':
        if (p->active && p->tty) {
            unsigned rows = 0, cols = 0;
            if (sscanf(text, "%u %u", &rows, &cols) == 2) {
                struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
                ioctl(p->sin, TIOCSWINSZ, &ws); /* the kernel sends SIGWINCH */
            }
        }
        break;
    case 'K':
        if (p->active && !p->exited) {
            int sig = atoi(text);
            if (sig > 0 && sig < 65)
                kill(-p->pid, sig);
        }
        break;
    }
}

static void read_port(struct port *p) {
    ssize_t n = read(p->fd, p->in + p->inlen, IN_CAP - p->inlen);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        p->retry_at = now_ms() + RETRY_MS; /* no host peer: wait, never exit */
        return;
    }
    if (n < 0)
        return;
    p->inlen += n;
    size_t off = 0;
    while (p->inlen - off >= HDR) {
        size_t len = ((size_t)p->in[off + 1] << 8) | p->in[off + 2];
        if (len > IN_CAP - HDR) { /* not a host frame: drop everything buffered */
            off = p->inlen;
            break;
        }
        if (p->inlen - off < HDR + len)
            break;
        frame(p, p->in[off], p->in + off + HDR, len);
        off += HDR + len;
    }
    memmove(p->in, p->in + off, p->inlen - off);
    p->inlen -= off;
}

/* Move bytes: command output into frames, stdin into the command. */
static void pump(struct port *p) {
    unsigned char buf[CHUNK];
    if (p->active && p->stdin_len && p->sin >= 0) {
        ssize_t n = write(p->sin, p->stdin_buf, p->stdin_len);
        if (n > 0) {
            memmove(p->stdin_buf, p->stdin_buf + n, p->stdin_len - n);
            p->stdin_len -= n, p->credit += n;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            p->credit += p->stdin_len, p->stdin_len = 0; /* the command closed its stdin */
            if (!p->tty)
                close_fd(&p->sin);
        }
    }
    if (p->active && p->stdin_eof && !p->eof_done && !p->stdin_len && p->sin >= 0) {
        if (p->tty)
            (void)!write(p->sin, "\004", 1); /* ^D: EOF for the line discipline */
        else
            close_fd(&p->sin);
        p->eof_done = 1;
    }
    if (p->credit && room(p) >= 32) {
        char text[24];
        snprintf(text, sizeof text, "%zu", p->credit);
        emit_text(p, 'C', text);
        p->credit = 0;
    }
    int *fds[2] = {&p->sout, &p->serr};
    for (int i = 0; i < 2 && p->active; i++) {
        while (*fds[i] >= 0 && room(p) >= CHUNK + HDR) {
            ssize_t n = read(*fds[i], buf, CHUNK);
            if (n > 0) {
                emit(p, i ? '2' : '1', buf, n);
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EINTR) && !p->exited)
                break;
            /* EOF, EIO (pty closed), or empty after the command exited */
            if (p->tty)
                p->sin = -1; /* the same master */
            close_fd(fds[i]);
        }
    }
    if (p->active && p->exited && p->sout < 0 && p->serr < 0 && room(p) >= 16) {
        char text[16];
        snprintf(text, sizeof text, "%d", p->status);
        end_session(p);
        emit_text(p, 'E', text);
    }
    if (p->outlen) {
        ssize_t n = write(p->fd, p->out, p->outlen);
        if (n > 0) {
            memmove(p->out, p->out + n, p->outlen - n);
            p->outlen -= n;
        }
    }
}

static void reap(void) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == warm.pid) { /* gone while waiting (killed, no /bin/sh): not in a loop */
            warm_gone();
            warm.retry_at = now_ms() + 1000;
        }
        for (int i = 0; i < nports; i++) {
            struct port *p = &ports[i];
            if (p->active && p->pid == pid && !p->exited) {
                p->exited = 1;
                p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *ready = NULL;
    int argi = 1;
    if (argc > 2 && strcmp(argv[1], "-r") == 0)
        ready = argv[2], argi = 3;
    if (argi >= argc || argc - argi > MAXPORTS) {
        fprintf(stderr, "usage: vmctl-exec-mux [-r READY_FILE] PORT... (at most %d)\n", MAXPORTS);
        return 2;
    }
    if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK))
        return 1;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigaction(SIGCHLD, &sa, NULL);
    for (; argi < argc; argi++) {
        struct port *p = &ports[nports++];
        p->fd = open(argv[argi], O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (p->fd < 0) {
            perror(argv[argi]);
            return 1;
        }
        p->sin = p->sout = p->serr = -1;
    }
    if (ready)
        close(open(ready, O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    struct pollfd pfd[1 + MAXPORTS * 4];
    for (;;) {
        int n = 0, timeout = -1;
        warm_up(); /* after the ready file, and after each session it served */
        long long now = now_ms();
        if (warm.pid <= 0 && warm.retry_at > now)
            timeout = (int)(warm.retry_at - now);
        pfd[n++] = (struct pollfd){.fd = sigpipe_fds[0], .events = POLLIN};
        for (int i = 0; i < nports; i++) {
            struct port *p = &ports[i];
            if (p->retry_at > now) {
                int left = (int)(p->retry_at - now);
                timeout = timeout < 0 || left < timeout ? left : timeout;
            } else {
                pfd[n++] = (struct pollfd){.fd = p->fd, .events = POLLIN | (p->outlen ? POLLOUT : 0)};
            }
            if (!p->active)
                continue;
            if (p->sout >= 0 && room(p) >= CHUNK + HDR)
                pfd[n++] = (struct pollfd){.fd = p->sout, .events = POLLIN};
            if (!p->tty && p->serr >= 0 && room(p) >= CHUNK + HDR)
                pfd[n++] = (struct pollfd){.fd = p->serr, .events = POLLIN};
            if (p->sin >= 0 && p->stdin_len)
                pfd[n++] = (struct pollfd){.fd = p->sin, .events = POLLOUT};
        }
        if (poll(pfd, n, timeout) < 0 && errno != EINTR)
            return 1;
        char drain[64];
        while (read(sigpipe_fds[0], drain, sizeof drain) > 0) {
        }
        reap();
        now = now_ms();
        for (int i = 0; i < nports; i++) {
            struct port *p = &ports[i];
            if (p->retry_at <= now) {
                p->retry_at = 0;
                read_port(p);
            }
            pump(p);
        }
    }
}
