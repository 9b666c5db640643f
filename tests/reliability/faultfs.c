/* faultfs: an LD_PRELOAD shim that injects file-system faults under one directory.
 *
 * Compiled at test time (see tests/reliability/faults.py) and loaded into a real `featcache` subprocess.
 * It interposes the libc entry points that both CPython and HDF5's C library use, so a fault hits
 * whichever layer writes: open/open64/openat/openat64/creat, write/pwrite/pwrite64/writev/pwritev,
 * dup/dup2/dup3, rename/renameat/renameat2, mkdir/mkdirat, unlink/unlinkat/rmdir, access/faccessat, fsync/fdatasync.
 *
 * Environment:
 *   FEATCACHE_FAULT_DIR          absolute directory; only paths under it are affected (required)
 *   FEATCACHE_FAULT_MATCH        only paths whose text contains this substring (default: all)
 *   FEATCACHE_FAULT_OPS          comma list of: open,write,rename,mkdir,unlink,access,fsync,read (default
 *                                write); open = opening to write or create, read = opening to read
 *   FEATCACHE_FAULT_ERRNO        ENOSPC | EACCES | EROFS | EIO | EDQUOT | a number (default ENOSPC)
 *   FEATCACHE_FAULT_AFTER_BYTES  writes succeed until this many bytes went to matching files, then the
 *                                crossing write is cut short and every later one fails (disk full)
 *   FEATCACHE_FAULT_AFTER_OPS    the first N matching operations succeed, the next ones fail
 *                                (neither AFTER_*: every matching operation fails)
 *   FEATCACHE_FAULT_ACTION       fail (default): return -1 with the errno; kill: SIGKILL the process
 *                                instead (a crash at an exact point of the write stream); stop: SIGSTOP
 *                                it there once, then carry on without a fault after SIGCONT (a process
 *                                frozen at an exact point, for concurrency tests)
 *   FEATCACHE_FAULT_LOG          file that receives "bytes=N ops=N faults=N" at a normal exit (of a process that did matching I/O)
 *
 * A fault, once triggered, stays: a full disk does not empty itself. Reads fail only with ops=read.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum {
    OP_OPEN = 1, OP_WRITE = 2, OP_RENAME = 4, OP_MKDIR = 8, OP_UNLINK = 16, OP_ACCESS = 32, OP_FSYNC = 64, OP_READ = 128
};

#define MAX_FD 65536

static char g_dir[PATH_MAX];
static size_t g_dir_len;
static char g_match[512];
static char g_log[PATH_MAX];
static unsigned g_ops = OP_WRITE;
static int g_errno = ENOSPC;
static long long g_after_bytes = -1, g_after_ops = -1;
static int g_kill, g_stop, g_stopped;
static int g_active;
static int g_tripped;
static long long g_bytes, g_nops, g_nfaults;
static unsigned char g_tracked[MAX_FD];
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;

#define REAL(name, ret, ...)                                       \
    static ret (*real_##name)(__VA_ARGS__);                        \
    static void load_##name(void) {                                \
        if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);   \
    }

REAL(open, int, const char *, int, ...)
REAL(open64, int, const char *, int, ...)
REAL(openat, int, int, const char *, int, ...)
REAL(openat64, int, int, const char *, int, ...)
REAL(creat, int, const char *, mode_t)
REAL(close, int, int)
REAL(dup, int, int)
REAL(dup2, int, int, int)
REAL(dup3, int, int, int, int)
REAL(write, ssize_t, int, const void *, size_t)
REAL(pwrite, ssize_t, int, const void *, size_t, off_t)
REAL(pwrite64, ssize_t, int, const void *, size_t, off_t)
REAL(writev, ssize_t, int, const struct iovec *, int)
REAL(pwritev, ssize_t, int, const struct iovec *, int, off_t)
REAL(rename, int, const char *, const char *)
REAL(renameat, int, int, const char *, int, const char *)
REAL(renameat2, int, int, const char *, int, const char *, unsigned)
REAL(mkdir, int, const char *, mode_t)
REAL(mkdirat, int, int, const char *, mode_t)
REAL(unlink, int, const char *)
REAL(unlinkat, int, int, const char *, int)
REAL(rmdir, int, const char *)
REAL(access, int, const char *, int)
REAL(faccessat, int, int, const char *, int, int)
REAL(fsync, int, int)
REAL(fdatasync, int, int)

static int parse_errno(const char *s) {
    if (!s || !*s) return ENOSPC;
    if (!strcmp(s, "ENOSPC")) return ENOSPC;
    if (!strcmp(s, "EACCES")) return EACCES;
    if (!strcmp(s, "EPERM")) return EPERM;
    if (!strcmp(s, "EROFS")) return EROFS;
    if (!strcmp(s, "EIO")) return EIO;
    if (!strcmp(s, "EDQUOT")) return EDQUOT;
    return atoi(s);
}

static unsigned parse_ops(const char *s) {
    unsigned m = 0;
    if (!s || !*s) return OP_WRITE;
    if (strstr(s, "open")) m |= OP_OPEN;
    if (strstr(s, "write")) m |= OP_WRITE;
    if (strstr(s, "rename")) m |= OP_RENAME;
    if (strstr(s, "mkdir")) m |= OP_MKDIR;
    if (strstr(s, "unlink")) m |= OP_UNLINK;
    if (strstr(s, "access")) m |= OP_ACCESS;
    if (strstr(s, "fsync")) m |= OP_FSYNC;
    if (strstr(s, "read")) m |= OP_READ;
    return m;
}

__attribute__((constructor)) static void faultfs_init(void) {
    const char *d = getenv("FEATCACHE_FAULT_DIR");
    if (!d || !*d) return;
    snprintf(g_dir, sizeof g_dir, "%s", d);
    g_dir_len = strlen(g_dir);
    while (g_dir_len > 1 && g_dir[g_dir_len - 1] == '/') g_dir[--g_dir_len] = 0;
    const char *m = getenv("FEATCACHE_FAULT_MATCH");
    snprintf(g_match, sizeof g_match, "%s", m ? m : "");
    const char *l = getenv("FEATCACHE_FAULT_LOG");
    snprintf(g_log, sizeof g_log, "%s", l ? l : "");
    g_ops = parse_ops(getenv("FEATCACHE_FAULT_OPS"));
    g_errno = parse_errno(getenv("FEATCACHE_FAULT_ERRNO"));
    const char *b = getenv("FEATCACHE_FAULT_AFTER_BYTES");
    if (b && *b) g_after_bytes = atoll(b);
    const char *o = getenv("FEATCACHE_FAULT_AFTER_OPS");
    if (o && *o) g_after_ops = atoll(o);
    const char *a = getenv("FEATCACHE_FAULT_ACTION");
    g_kill = a && !strcmp(a, "kill");
    g_stop = a && !strcmp(a, "stop");
    g_active = 1;
}

__attribute__((destructor)) static void faultfs_fini(void) {
    /* A process that did no matching I/O (a worker the tested process started) leaves the log alone:
       otherwise the last process to exit, not the one under test, would write it. */
    if (!g_active || !g_log[0] || (g_bytes == 0 && g_nops == 0)) return;
    load_open();
    load_write();
    load_close();
    int fd = real_open(g_log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char buf[160];
    int n = snprintf(buf, sizeof buf, "bytes=%lld ops=%lld faults=%lld\n", g_bytes, g_nops, g_nfaults);
    real_write(fd, buf, (size_t)n);
    real_close(fd);
}

/* Absolute text of ``path`` as seen from ``dirfd`` (no symlink resolution: the tests use real paths). */
static void resolve(int dirfd, const char *path, char *out, size_t cap) {
    if (!path) {
        out[0] = 0;
        return;
    }
    if (path[0] == '/') {
        snprintf(out, cap, "%s", path);
        return;
    }
    char base[PATH_MAX];
    base[0] = 0;  /* out holds 2 * PATH_MAX + 2: base, '/', path */
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof base)) base[0] = 0;
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof base - 1);
        base[n > 0 ? n : 0] = 0;
    }
    while (path[0] == '.' && path[1] == '/') path += 2;
    snprintf(out, cap, "%s/%s", base, path);
}

static int affected(const char *abs) {
    if (!g_active || !abs[0]) return 0;
    if (strncmp(abs, g_dir, g_dir_len) != 0) return 0;
    if (abs[g_dir_len] != '/' && abs[g_dir_len] != 0) return 0;
    return !g_match[0] || strstr(abs + g_dir_len, g_match) != NULL;
}

static int affected_at(int dirfd, const char *path) {
    if (!g_active) return 0;
    char abs[2 * PATH_MAX + 2];
    resolve(dirfd, path, abs, sizeof abs);
    return affected(abs);
}

/* ACTION=stop: freeze here the first time, and report "no fault" from then on. */
static int stop_here(void) {
    if (!g_stop) return 0;
    if (!g_stopped) {
        g_stopped = 1;
        kill(getpid(), SIGSTOP);
    }
    return 1;
}

static void trip(void) {
    g_tripped = 1;
    g_nfaults++;
    if (g_kill) kill(getpid(), SIGKILL);
}

/* One metadata operation on an affected path: 1 = make it fail. */
static int op_fails(unsigned op) {
    if (!(g_ops & op)) return 0;
    pthread_mutex_lock(&g_mu);
    int fail;
    if (g_tripped) {
        fail = 1;
    } else if (g_after_ops >= 0) {
        fail = g_nops >= g_after_ops;
    } else {
        fail = g_after_bytes < 0;  /* no trigger given: always */
    }
    g_nops++;
    if (fail && stop_here()) fail = 0;
    if (fail) trip();
    pthread_mutex_unlock(&g_mu);
    return fail;
}

static int fail_with(void) {
    errno = g_errno;
    return -1;
}

static int wants_write(int flags) { return (flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)) != 0; }

static void track(int fd, int on) {
    if (fd >= 0 && fd < MAX_FD) g_tracked[fd] = (unsigned char)on;
}

static int do_open_common(int dirfd, const char *path, int flags, int *blocked) {
    *blocked = 0;
    if (!wants_write(flags)) { /* opening to read fails only with ops=read (an unreadable file, even as root) */
        if ((g_ops & OP_READ) && affected_at(dirfd, path) && op_fails(OP_READ)) *blocked = 1;
        return 0;
    }
    int aff = affected_at(dirfd, path);
    if (aff && op_fails(OP_OPEN)) *blocked = 1;
    return aff;
}

/* open(2)'s optional third argument, only passed when a file may be created. va_start must run in the
 * variadic function itself, hence a macro. */
#define READ_OPEN_MODE(flags, mode)             \
    do {                                        \
        if ((flags) & (O_CREAT | O_TMPFILE)) {  \
            va_list ap_;                        \
            va_start(ap_, flags);               \
            (mode) = va_arg(ap_, mode_t);       \
            va_end(ap_);                        \
        }                                       \
    } while (0)

int open(const char *path, int flags, ...) {
    load_open();
    mode_t mode = 0;
    READ_OPEN_MODE(flags, mode);
    int blocked, aff = do_open_common(AT_FDCWD, path, flags, &blocked);
    if (blocked) return fail_with();
    int fd = real_open(path, flags, mode);
    track(fd, aff);
    return fd;
}

int open64(const char *path, int flags, ...) {
    load_open64();
    mode_t mode = 0;
    READ_OPEN_MODE(flags, mode);
    int blocked, aff = do_open_common(AT_FDCWD, path, flags, &blocked);
    if (blocked) return fail_with();
    int fd = real_open64(path, flags, mode);
    track(fd, aff);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    load_openat();
    mode_t mode = 0;
    READ_OPEN_MODE(flags, mode);
    int blocked, aff = do_open_common(dirfd, path, flags, &blocked);
    if (blocked) return fail_with();
    int fd = real_openat(dirfd, path, flags, mode);
    track(fd, aff);
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    load_openat64();
    mode_t mode = 0;
    READ_OPEN_MODE(flags, mode);
    int blocked, aff = do_open_common(dirfd, path, flags, &blocked);
    if (blocked) return fail_with();
    int fd = real_openat64(dirfd, path, flags, mode);
    track(fd, aff);
    return fd;
}

int creat(const char *path, mode_t mode) {
    load_creat();
    int blocked, aff = do_open_common(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, &blocked);
    if (blocked) return fail_with();
    int fd = real_creat(path, mode);
    track(fd, aff);
    return fd;
}

int close(int fd) {
    load_close();
    track(fd, 0);
    return real_close(fd);
}

/* A duplicated descriptor refers to the same file, and dup2 onto a descriptor replaces its file. */
int dup(int fd) {
    load_dup();
    int n = real_dup(fd);
    if (n >= 0 && n < MAX_FD && fd >= 0 && fd < MAX_FD) g_tracked[n] = g_tracked[fd];
    return n;
}

int dup2(int fd, int fd2) {
    load_dup2();
    int n = real_dup2(fd, fd2);
    if (n >= 0 && n < MAX_FD && fd >= 0 && fd < MAX_FD) g_tracked[n] = g_tracked[fd];
    return n;
}

int dup3(int fd, int fd2, int flags) {
    load_dup3();
    int n = real_dup3(fd, fd2, flags);
    if (n >= 0 && n < MAX_FD && fd >= 0 && fd < MAX_FD) g_tracked[n] = g_tracked[fd];
    return n;
}

/* How many of ``count`` bytes a write to ``fd`` may pass through: count, fewer (cut short), or -1 (fail). */
static ssize_t allowance(int fd, size_t count) {
    if (!g_active || fd < 0 || fd >= MAX_FD || !g_tracked[fd]) return (ssize_t)count;
    ssize_t allowed = (ssize_t)count;
    pthread_mutex_lock(&g_mu);
    if (g_ops & OP_WRITE) {
        if (g_tripped) {
            allowed = -1;
        } else if (g_after_bytes >= 0) {
            long long left = g_after_bytes - g_bytes;
            if (left <= 0) {
                allowed = -1;
            } else if ((long long)count > left) {
                allowed = (ssize_t)left; /* the write that fills the disk goes in part-way */
                g_tripped = 1;
                g_nfaults++;
            }
            if (g_stop && (allowed < 0 || (size_t)allowed < count)) { /* freeze, then let it all through */
                stop_here();
                g_tripped = 0;
                g_after_bytes = -1;
                g_ops &= ~(unsigned)OP_WRITE;
                allowed = (ssize_t)count;
            }
        } else if (g_after_ops >= 0) {
            allowed = g_nops >= g_after_ops ? -1 : (ssize_t)count;
            g_nops++;
        } else {
            allowed = -1;
        }
        if (allowed < 0) trip();
    }
    if (allowed > 0) g_bytes += allowed;
    pthread_mutex_unlock(&g_mu);
    return allowed;
}

static ssize_t after_partial(ssize_t done, size_t want) {
    /* a write cut short by a full disk: with ACTION=kill the process dies right after it */
    if (g_kill && done >= 0 && (size_t)done < want) kill(getpid(), SIGKILL);
    return done;
}

ssize_t write(int fd, const void *buf, size_t count) {
    load_write();
    ssize_t n = allowance(fd, count);
    if (n < 0) return fail_with();
    return after_partial(real_write(fd, buf, (size_t)n), count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    load_pwrite();
    ssize_t n = allowance(fd, count);
    if (n < 0) return fail_with();
    return after_partial(real_pwrite(fd, buf, (size_t)n, off), count);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    load_pwrite64();
    ssize_t n = allowance(fd, count);
    if (n < 0) return fail_with();
    return after_partial(real_pwrite64(fd, buf, (size_t)n, off), count);
}

static size_t iov_total(const struct iovec *iov, int cnt) {
    size_t t = 0;
    for (int i = 0; i < cnt; i++) t += iov[i].iov_len;
    return t;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    load_writev();
    size_t want = iov_total(iov, cnt);
    ssize_t n = allowance(fd, want);
    if (n < 0) return fail_with();
    if ((size_t)n == want) return real_writev(fd, iov, cnt);
    load_write();
    return after_partial(real_write(fd, iov[0].iov_base, (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len), want);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    load_pwritev();
    size_t want = iov_total(iov, cnt);
    ssize_t n = allowance(fd, want);
    if (n < 0) return fail_with();
    if ((size_t)n == want) return real_pwritev(fd, iov, cnt, off);
    load_pwrite();
    return after_partial(
        real_pwrite(fd, iov[0].iov_base, (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len, off), want);
}

static int rename_affected(int ofd, const char *o, int nfd, const char *n) {
    return affected_at(ofd, o) || affected_at(nfd, n);
}

int rename(const char *o, const char *n) {
    load_rename();
    if (rename_affected(AT_FDCWD, o, AT_FDCWD, n) && op_fails(OP_RENAME)) return fail_with();
    return real_rename(o, n);
}

int renameat(int ofd, const char *o, int nfd, const char *n) {
    load_renameat();
    if (rename_affected(ofd, o, nfd, n) && op_fails(OP_RENAME)) return fail_with();
    return real_renameat(ofd, o, nfd, n);
}

int renameat2(int ofd, const char *o, int nfd, const char *n, unsigned flags) {
    load_renameat2();
    if (rename_affected(ofd, o, nfd, n) && op_fails(OP_RENAME)) return fail_with();
    return real_renameat2(ofd, o, nfd, n, flags);
}

int mkdir(const char *p, mode_t m) {
    load_mkdir();
    if (affected_at(AT_FDCWD, p) && op_fails(OP_MKDIR)) return fail_with();
    return real_mkdir(p, m);
}

int mkdirat(int fd, const char *p, mode_t m) {
    load_mkdirat();
    if (affected_at(fd, p) && op_fails(OP_MKDIR)) return fail_with();
    return real_mkdirat(fd, p, m);
}

int unlink(const char *p) {
    load_unlink();
    if (affected_at(AT_FDCWD, p) && op_fails(OP_UNLINK)) return fail_with();
    return real_unlink(p);
}

int unlinkat(int fd, const char *p, int flags) {
    load_unlinkat();
    if (affected_at(fd, p) && op_fails(OP_UNLINK)) return fail_with();
    return real_unlinkat(fd, p, flags);
}

int rmdir(const char *p) {
    load_rmdir();
    if (affected_at(AT_FDCWD, p) && op_fails(OP_UNLINK)) return fail_with();
    return real_rmdir(p);
}

int access(const char *p, int mode) {
    load_access();
    if ((mode & W_OK) && affected_at(AT_FDCWD, p) && op_fails(OP_ACCESS)) return fail_with();
    return real_access(p, mode);
}

int faccessat(int fd, const char *p, int mode, int flags) {
    load_faccessat();
    if ((mode & W_OK) && affected_at(fd, p) && op_fails(OP_ACCESS)) return fail_with();
    return real_faccessat(fd, p, mode, flags);
}

static int sync_fails(int fd) {
    return g_active && (g_ops & OP_FSYNC) && fd >= 0 && fd < MAX_FD && g_tracked[fd] && op_fails(OP_FSYNC);
}

int fsync(int fd) {
    load_fsync();
    if (sync_fails(fd)) return fail_with();
    return real_fsync(fd);
}

int fdatasync(int fd) {
    load_fdatasync();
    if (sync_fails(fd)) return fail_with();
    return real_fdatasync(fd);
}
