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
    _pages.pxi     zero-page scan, scatter/gather readv/writev of page lists,
                   placing pages into fresh memory (includes/placing.h)
    _codecs.pxi    one zlib or zstd stream per channel, straight from/into pages
    _tls.pxi       TLS through OpenSSL: the handshake, and the Link the
                   engines read and write through (plain socket or TLS)
    _adaptive.pxi  compression="auto": each send channel's choice, packet by
                   packet, between raw pages and a zstd level
    _buffers.pxi   how large an engine's packet buffers are (and what a
                   destination charges max_memory for its channels)
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
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.errno cimport (EAGAIN, ECONNRESET, EDQUOT, EEXIST, EFAULT, EINTR, ENOMEM, ENOSPC,
                         ENXIO, EPIPE, EPROTO, ETIMEDOUT, errno)
from libc.stdint cimport uintptr_t
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy, memset, strcmp, strerror, strncpy, strstr
from libc.time cimport time_t, timespec
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl
from posix.time cimport timeval
from posix.types cimport off_t
from posix.unistd cimport close as close_fd, lseek
from posix.uio cimport readv, writev

from fastmfd.includes.atomics cimport (
    fm_cas32, fm_cas64, fm_exchange64, fm_fetch_add32, fm_fetch_add64, fm_fetch_and64,
    fm_fetch_or64, fm_fetch_sub32, fm_load32, fm_load64, fm_store32, fm_store64,
)
from fastmfd.includes.libz cimport (
    crc32, MAX_WBITS, Z_BUF_ERROR, Z_DEFAULT_STRATEGY, Z_DEFLATED, Z_NO_FLUSH, Z_OK, Z_SYNC_FLUSH,
    compressBound, deflate, deflateEnd, deflateInit2, inflate, inflateEnd, inflateInit2,
)
from fastmfd.includes.libzstd cimport (
    ZSTD_CCtx_setParameter, ZSTD_DCtx_setParameter, ZSTD_c_compressionLevel, ZSTD_compressBound,
    ZSTD_compressStream2, ZSTD_createCCtx, ZSTD_createDCtx, ZSTD_d_windowLogMax,
    ZSTD_decompressStream, ZSTD_e_continue, ZSTD_e_end, ZSTD_e_flush, ZSTD_freeCCtx, ZSTD_freeDCtx,
    ZSTD_getErrorName, ZSTD_inBuffer, ZSTD_isError, ZSTD_maxCLevel, ZSTD_minCLevel, ZSTD_outBuffer,
)
from fastmfd.includes.openssl cimport (
    ASN1_STRING, ASN1_STRING_get0_data, ASN1_STRING_length, ASN1_STRING_to_UTF8, BIO_number_read,
    ERR_clear_error, ERR_error_string_n, ERR_get_error, ERR_reason_error_string, GEN_DNS,
    GEN_EMAIL, GEN_IPADD, GENERAL_NAME_get0_value, GENERAL_NAMES, GENERAL_NAMES_free,
    NID_commonName, NID_subject_alt_name, OPENSSL_free, SSL_CIPHER, SSL_CIPHER_get_name,
    SSL_CTX_check_private_key,
    SSL_CTX_free, SSL_CTX_load_verify_locations, SSL_CTX_new, SSL_CTX_set_cipher_list,
    SSL_CTX_set_ciphersuites, SSL_CTX_set_client_CA_list, SSL_CTX_set_default_read_buffer_len,
    SSL_CTX_set_default_verify_paths, SSL_CTX_set_max_proto_version,
    SSL_CTX_set_min_proto_version, SSL_CTX_set_mode, SSL_CTX_set_num_tickets,
    SSL_CTX_set_options, SSL_CTX_set_read_ahead, SSL_CTX_set_verify,
    SSL_CTX_use_PrivateKey_file, SSL_CTX_use_certificate_chain_file, SSL_ERROR_SYSCALL,
    SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_ERROR_ZERO_RETURN, SSL_FILETYPE_PEM,
    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, SSL_MODE_AUTO_RETRY, SSL_OP_IGNORE_UNEXPECTED_EOF,
    SSL_OP_NO_COMPRESSION, SSL_OP_NO_RENEGOTIATION, SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
    SSL_VERIFY_PEER, SSL_do_handshake, SSL_free, SSL_get0_param, SSL_get1_peer_certificate,
    SSL_get_current_cipher, SSL_get_error, SSL_get_rbio, SSL_get_verify_result, SSL_get_version,
    SSL_load_client_CA_file, SSL_new, SSL_read_ex, SSL_set1_host, SSL_set_accept_state,
    SSL_set_connect_state, SSL_set_fd, SSL_set_hostflags, SSL_set_tlsext_host_name, SSL_shutdown,
    SSL_write_ex, TLS1_2_VERSION, TLS1_3_VERSION, TLS_client_method, TLS_server_method,
    X509, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, X509_NAME, X509_NAME_ENTRY_get_data,
    X509_NAME_get_entry, X509_NAME_get_index_by_NID, X509_VERIFY_PARAM_set1_ip_asc, X509_V_OK,
    X509_free, X509_get_ext_d2i, X509_get_subject_name, X509_verify_cert_error_string,
    sk_GENERAL_NAME_num, sk_GENERAL_NAME_value,
)
from fastmfd.includes.system cimport (
    CLOCK_MONOTONIC, IOV_MAX, MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_REMOVE, MSG_PEEK,
    OFF_MAX, POLLIN, POLLOUT, PR_SET_PDEATHSIG, SEEK_DATA, SEEK_HOLE, SHUT_WR, SIOCOUTQ,
    SO_RCVTIMEO, SO_SNDBUF, SO_SNDTIMEO, SOL_SOCKET, TMPFS_MAGIC, _SC_PAGESIZE, __builtin_ctzll,
    __builtin_popcountll, c_sysinfo, clock_gettime, nanosleep, fm_buffer_is_zero, fm_pagescan_init,
    fm_place_copy, fm_place_open, fm_place_register, fstatfs, getsockopt, ioctl, madvise,
    MAP_FAILED, MAP_SHARED, mincore, mmap, munmap, poll, pollfd, prctl, PROT_READ, PROT_WRITE,
    recv, sem_clockwait, sem_init, sem_post, sem_trywait, shutdown, socklen_t, statfs, strnlen,
    sysconf, sysinfo,
)

import errno as errno_module
import ipaddress
import os

import numpy as np

from fastmfd.errors import (Aborted, ConnectionClosed, MigrationError, ProtocolError, TLSError,
                            printable)
from fastmfd.shm import SharedMemory

fm_pagescan_init()


def die_with_parent(int sig=9):
    """Have the kernel send ``sig`` (default SIGKILL) to this process when its parent exits."""
    if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(errno, "prctl(PR_SET_PDEATHSIG) failed")


cdef bint gc_running = False


def note_collection(str phase, dict info):
    """A ``gc.callbacks`` entry: note whether a garbage collection runs
    (:func:`collecting`). Compiled, not for speed: it runs no bytecode, so a
    signal that comes meanwhile (Ctrl-C, the CLI's SIGTERM) is raised after the
    collection; raised inside a Python callback, it was printed as "Exception
    ignored" and lost, and the migration went on."""
    global gc_running
    gc_running = phase == "start"


def collecting():
    """Whether a garbage collection is running (as :func:`note_collection` saw)."""
    return gc_running

include "_wire.pxi"
include "_shared.pxi"
include "_pages.pxi"
include "_codecs.pxi"
include "_tls.pxi"
include "_adaptive.pxi"
include "_buffers.pxi"
include "_channel.pxi"
include "_pattern.pxi"
