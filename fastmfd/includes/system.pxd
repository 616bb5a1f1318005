# POSIX and Linux calls the core makes that Cython's bundled headers lack.
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

cdef extern from "<sys/prctl.h>" nogil:
    int PR_SET_PDEATHSIG
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5)

cdef extern from "<limits.h>" nogil:
    int IOV_MAX

cdef extern from "pagescan.h" nogil:
    void fm_pagescan_init()
    bint fm_buffer_is_zero(const void *buf, size_t length)

cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE
