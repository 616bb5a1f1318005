# POSIX and Linux calls the core makes that Cython's bundled headers lack,
# and the compiler builtins it uses.
from libc.time cimport timespec

cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass
    int sem_init(sem_t *sem, int pshared, unsigned int value)
    int sem_destroy(sem_t *sem)
    int sem_post(sem_t *sem)
    int sem_trywait(sem_t *sem)
    int sem_clockwait(sem_t *sem, int clockid, const timespec *abstime)
    int sem_getvalue(sem_t *sem, int *sval)

cdef extern from "<time.h>" nogil:
    int CLOCK_MONOTONIC
    int clock_gettime(int clk_id, timespec *tp)
    int nanosleep(const timespec *req, timespec *rem)

cdef extern from "<sys/prctl.h>" nogil:
    int PR_SET_PDEATHSIG
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5)

cdef extern from "<limits.h>" nogil:
    int IOV_MAX

cdef extern from "pagescan.h" nogil:
    void fm_pagescan_init()
    bint fm_buffer_is_zero(const void *buf, size_t length)

cdef extern from "placing.h" nogil:
    int fm_place_open()
    int fm_place_register(int uffd, void *addr, size_t length)
    int fm_place_copy(int uffd, void *dst, const void *src, size_t length, size_t *done)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

cdef extern from *:
    """
    #include <sys/mman.h>
    /* Linux 5.14+ (uapi asm-generic/mman-common.h): older C libraries lack the
       name, older kernels answer EINVAL (harmless: the caller ignores it). */
    #ifndef MADV_POPULATE_READ
    #define MADV_POPULATE_READ 22
    #endif
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    """
    int MADV_POPULATE_READ
    int MADV_POPULATE_WRITE
    int MADV_REMOVE
    int madvise(void *addr, size_t length, int advice) nogil
    int mincore(void *addr, size_t length, unsigned char *vec) nogil

cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf)

cdef extern from "<linux/magic.h>" nogil:
    long TMPFS_MAGIC

cdef extern from "<sys/sysinfo.h>" nogil:
    struct sysinfo:
        unsigned long totalswap
    int c_sysinfo "sysinfo"(sysinfo *info)

cdef extern from *:
    """
    #include <unistd.h>
    /* Linux 3.1+; C libraries name them only under _GNU_SOURCE. */
    #ifndef SEEK_DATA
    #define SEEK_DATA 3
    #define SEEK_HOLE 4
    #endif
    #include <stdint.h>
    #define FM_OFF_MAX ((off_t)INT64_MAX)   /* off_t: 64 bits (Python's _FILE_OFFSET_BITS) */
    """
    int SEEK_DATA
    int SEEK_HOLE
    long long OFF_MAX "FM_OFF_MAX"

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int shutdown(int sockfd, int how)
    int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
    int SHUT_WR
    int SOL_SOCKET
    int SO_SNDTIMEO
    int SO_RCVTIMEO
    int SO_SNDBUF

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/sockios.h>" nogil:
    unsigned long SIOCOUTQ          # bytes in a socket's send queue (TCP: not yet acknowledged)

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE

# GCC / Clang builtins (no header): one instruction each on x86-64 and arm64.
cdef extern from * nogil:
    int __builtin_popcountll(unsigned long long x)
    int __builtin_ctzll(unsigned long long x)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd *fds, nfds_t nfds, int timeout)
    short POLLIN
    short POLLOUT

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    int MSG_PEEK
