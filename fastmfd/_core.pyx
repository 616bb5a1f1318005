# cython: freethreading_compatible = False
"""fastmfd's C-speed core.

Only what must run at C speed lives here (DESIGN §6); everything else is
Python. The extension is built from one file per concept, with _core.pxd as
the C-level contract between them (constants, structs, cdef classes, cdef
functions used across files) and includes/ declaring every C header:

    _wire.pxi      channel header, init packet, RAM and device-state packet
                   headers, device chunk header: encode and validate
    _shared.pxi    shared-memory structures: buffer pool, channel selector,
                   dirty bitmap, counters (C11 atomics, process-shared
                   semaphores), all created and attached by one template
    _pages.pxi     zero-page scan, scatter/gather readv/writev of page lists
    _codecs.pxi    one zlib or zstd stream per channel, straight from/into pages
    _channel.pxi   the per-channel send and receive engines the workers run
    _pattern.pxi   deterministic synthetic device content, generated and checked

Hot paths release the GIL and never allocate per packet.

The Python surface is what the library calls, plus a small "test face": a
few functions and methods that expose a C loop or encoder on its own (named
where they are defined, and in _core.pyi) so tests and benchmarks can pin its
bytes and measure it without a whole migration around it.
"""

from cpython.buffer cimport (
    PyBUF_FORMAT, PyBUF_SIMPLE, PyBUF_STRIDES, PyBUF_WRITABLE, PyBuffer_Release,
    PyObject_CheckBuffer, PyObject_GetBuffer,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.errno cimport EAGAIN, EFAULT, EINTR, ENOMEM, errno
from libc.stdint cimport uintptr_t
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy, memset, strcmp, strerror, strncpy
from libc.time cimport time_t, timespec
from posix.time cimport timeval
from posix.uio cimport readv, writev

from fastmfd.includes.atomics cimport (
    fm_cas32, fm_cas64, fm_exchange64, fm_fetch_add32, fm_fetch_add64, fm_fetch_or64,
    fm_fetch_sub32, fm_load32, fm_load64, fm_store32, fm_store64,
)
from fastmfd.includes.libz cimport (
    crc32, MAX_WBITS, Z_BUF_ERROR, Z_DEFAULT_STRATEGY, Z_DEFLATED, Z_NO_FLUSH, Z_OK, Z_SYNC_FLUSH,
    compressBound, deflate, deflateEnd, deflateInit2, inflate, inflateEnd, inflateInit2,
)
from fastmfd.includes.libzstd cimport (
    ZSTD_CCtx_setParameter, ZSTD_DCtx_setParameter, ZSTD_c_compressionLevel, ZSTD_compressBound,
    ZSTD_compressStream2, ZSTD_createCCtx, ZSTD_createDCtx, ZSTD_d_windowLogMax,
    ZSTD_decompressStream, ZSTD_e_continue, ZSTD_e_flush, ZSTD_freeCCtx, ZSTD_freeDCtx,
    ZSTD_getErrorName, ZSTD_inBuffer, ZSTD_isError, ZSTD_maxCLevel, ZSTD_minCLevel, ZSTD_outBuffer,
)
from fastmfd.includes.system cimport (
    CLOCK_MONOTONIC, IOV_MAX, MADV_POPULATE_WRITE, PR_SET_PDEATHSIG, SHUT_WR, SO_RCVTIMEO,
    SO_SNDTIMEO, SOL_SOCKET, _SC_PAGESIZE, __builtin_ctzll, __builtin_popcountll, clock_gettime,
    fm_buffer_is_zero, fm_pagescan_init, getsockopt, madvise, prctl, sem_clockwait, sem_init,
    sem_post, sem_trywait, shutdown, socklen_t, strnlen, sysconf,
)

import numpy as np

from fastmfd.errors import Aborted, MigrationError, ProtocolError
from fastmfd.shm import SharedMemory

fm_pagescan_init()


def die_with_parent(int sig=9):
    """Have the kernel send ``sig`` (default SIGKILL) to this process when its parent exits."""
    if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(errno, "prctl(PR_SET_PDEATHSIG) failed")

include "_wire.pxi"
include "_shared.pxi"
include "_pages.pxi"
include "_codecs.pxi"
include "_channel.pxi"
include "_pattern.pxi"
