# TLS on a channel's socket, driven from C through OpenSSL (issue 8).
#
#   TLSChannel.connect(fd, ...) / .accept(fd, ...)   handshake, in C, GIL released,
#                                                     within one total deadline
#   SendEngine(..., tls=channel) / RecvEngine(...)   every read and write of the
#                                                     engine goes through its Link
#
# A Link is what the engines read and write through: a plain socket (ssl ==
# NULL: exactly transfer_all, as before TLS existed) or an OpenSSL session on
# that socket. TLS writes encrypt straight from the region's pages: an iovec
# element of at least TLS_DIRECT_MIN bytes goes to SSL_write as it is, while
# small ones (packet headers, scattered 4 KiB pages) are gathered into the
# engine's staging buffer first so they leave as full 16 KiB records rather
# than one record each. TLS reads decrypt into the destination pages (OpenSSL
# copies each record's plaintext out of its read buffer into the target).
#
# Errors come back as -errno for the engines' check_io: a socket timeout
# (SO_RCVTIMEO / SO_SNDTIMEO on the blocking socket: SSL_ERROR_WANT_*) is
# -EAGAIN, a system call error its errno, and a TLS failure -EPROTO with
# OpenSSL's reason kept in Link.err ("decryption failed or bad record mac").
#
# Settings of every context: TLS 1.2 minimum (1.3 is negotiated whenever both
# sides have it), no compression, no renegotiation, no session tickets (a
# channel connects once), SSL_OP_IGNORE_UNEXPECTED_EOF (a FIN without
# close_notify reads as end of stream: the protocol's totals check that a
# session is whole), SSL_MODE_AUTO_RETRY and read-ahead with a read buffer of
# TLS_READ_BUFFER bytes (engines never poll a data socket, so OpenSSL may
# read several records per system call).
#
# The TLSChannel does not own the fd (the Python socket object does): it owns
# the SSL and SSL_CTX, freed when it is.

cdef void tls_reason(char *buf, size_t cap) noexcept nogil:
    """The first error on this thread's OpenSSL queue (its root cause), as
    text; clears the queue."""
    cdef unsigned long e = ERR_get_error()
    cdef const char *reason
    buf[0] = 0
    if e:
        reason = ERR_reason_error_string(e)
        if reason != NULL:
            snprintf(buf, cap, "%s", reason)
        else:
            ERR_error_string_n(e, buf, cap)
    else:
        snprintf(buf, cap, "unknown error")
    ERR_clear_error()


cdef int wait_fd(int fd, short events, double deadline) noexcept nogil:
    """poll() fd for events until the monotonic deadline (< 0: none).

    1 when ready (or in error: the next call reports it), 0 when the deadline
    passed, -errno when poll failed."""
    cdef pollfd p
    cdef double left
    cdef int ms, rc
    p.fd = fd
    p.events = events
    while True:
        if deadline < 0:
            ms = -1
        else:
            left = deadline - monotonic()
            if left <= 0:
                return 0
            ms = <int>(left * 1000.0) + 1 if left < 2e6 else 2000000000
        p.revents = 0
        rc = poll(&p, 1, ms)
        if rc > 0:
            return 1
        if rc < 0 and errno != EINTR:
            return -errno


cdef int set_nonblocking(int fd, int *saved) noexcept nogil:
    """Make fd non-blocking, remembering its flags in saved; 0 or -errno."""
    saved[0] = fcntl(fd, F_GETFL)
    if saved[0] < 0 or fcntl(fd, F_SETFL, saved[0] | O_NONBLOCK) < 0:
        return -errno
    return 0


# ---------------------------------------------------------------- the handshake

cdef void say_plaintext(int fd, char *msg, size_t cap) noexcept nogil:
    """msg: the peer's first bytes open no TLS record; up to 8 of them, left unread,
    in hex: a plaintext service's greeting, or a TLS record other than a
    handshake's (0x17: this side missed the start of the peer's answer)."""
    cdef uint8_t head[8]
    cdef ssize_t n = recv(fd, head, sizeof(head), MSG_PEEK)
    cdef ssize_t i
    cdef size_t used = <size_t>snprintf(msg, cap, "the peer does not speak TLS (it sent "
                                        "plaintext")
    for i in range(n if n > 0 else 0):
        if used + 5 >= cap:
            break
        used += <size_t>snprintf(msg + used, cap - used, "%s%02x", ": " if i == 0 else " ",
                                 head[i])
    if used + 2 <= cap:
        snprintf(msg + used, cap - used, ")")


cdef int peek_first_byte(int fd, bint server, bint wait, double deadline, double timeout,
                         char *msg, size_t cap) noexcept nogil:
    """Check that the peer's first byte opens a TLS record: a handshake record
    (0x16), or for a client an alert (0x15). Waits for it until the deadline
    when ``wait``, else only looks. 0 when it does, 1 when nothing has come
    (not waiting), -1 with msg otherwise."""
    cdef uint8_t first
    cdef ssize_t n
    cdef int w
    while True:
        if wait:
            w = wait_fd(fd, POLLIN, deadline)
            if w == 0:
                snprintf(msg, cap, "TLS handshake: no answer within %.3g s", timeout)
                return -1
            if w < 0:
                snprintf(msg, cap, "TLS handshake: poll: %s", strerror(-w))
                return -1
        n = recv(fd, &first, 1, MSG_PEEK)       # the fd is non-blocking
        if n == 1:
            break
        if n == 0 or errno == ECONNRESET:
            snprintf(msg, cap, "the peer closed the connection during the TLS handshake "
                     "(does it use TLS?)")
            return -1
        if errno == EAGAIN and not wait:
            return 1
        if errno != EAGAIN and errno != EINTR:
            snprintf(msg, cap, "TLS handshake: %s", strerror(errno))
            return -1
    if first == 0x16 or (not server and first == 0x15):
        return 0
    say_plaintext(fd, msg, cap)
    return -1


cdef int handshake_loop(SSL *ssl, int fd, bint server, double deadline, double timeout,
                        char *msg, size_t cap) noexcept nogil:
    # looked: the answer's first byte was looked at, or found read by OpenSSL
    # already; checked: looked at, and it opens a TLS record.
    cdef bint looked = False, checked = False
    cdef int ret, err, saved, w
    cdef long verify
    cdef char reason[200]
    cdef int first
    # A server waits for the client's first byte; a client looks once before
    # its first call, which sends its hello and reads the answer if one is
    # there already (a plaintext server may greet first).
    first = peek_first_byte(fd, server, server, deadline, timeout, msg, cap)
    if first < 0:
        return -1
    looked = checked = first == 0
    while True:
        ERR_clear_error()
        ret = SSL_do_handshake(ssl)
        if ret == 1:
            return 0
        saved = errno
        err = SSL_get_error(ssl, ret)
        if err == SSL_ERROR_WANT_READ:
            if not looked:
                looked = True
                # A client has sent its hello: the answer must be TLS. Unless the
                # call read its start already (it was there: a server that sends
                # its ServerHello, then the rest of its flight, and a client held
                # off the CPU between its write and its read), and took it as
                # TLS: the socket holds the flight's middle now, an encrypted
                # record's 0x17, which was said to be plaintext (QEMU 7.2's GnuTLS).
                if BIO_number_read(SSL_get_rbio(ssl)) == 0:
                    if peek_first_byte(fd, False, True, deadline, timeout, msg, cap) < 0:
                        return -1
                    checked = True
                    continue
            w = wait_fd(fd, POLLIN, deadline)
        elif err == SSL_ERROR_WANT_WRITE:
            w = wait_fd(fd, POLLOUT, deadline)
        elif err == SSL_ERROR_ZERO_RETURN or (
                err == SSL_ERROR_SYSCALL and (saved == 0 or saved == ECONNRESET
                                              or saved == EPIPE)):
            ERR_clear_error()
            snprintf(msg, cap, "the peer closed the connection during the TLS handshake "
                     "(does it use TLS?)")
            return -1
        elif err == SSL_ERROR_SYSCALL:
            ERR_clear_error()
            snprintf(msg, cap, "TLS handshake failed: %s", strerror(saved))
            return -1
        else:
            tls_reason(reason, sizeof(reason))
            if strstr(reason, "unexpected eof") != NULL:
                snprintf(msg, cap, "the peer closed the connection during the TLS handshake "
                         "(does it use TLS?)")
                return -1
            if not checked and strstr(reason, "wrong version number") != NULL:
                # The answer arrived within the call that sent the hello (its
                # bytes read: they cannot be shown).
                snprintf(msg, cap, "the peer does not speak TLS (it sent plaintext)")
                return -1
            verify = SSL_get_verify_result(ssl)
            if verify != X509_V_OK:
                snprintf(msg, cap, "TLS handshake failed: %s (%s)", reason,
                         X509_verify_cert_error_string(verify))
            else:
                snprintf(msg, cap, "TLS handshake failed: %s", reason)
            return -1
        if w == 0:
            snprintf(msg, cap, "TLS handshake: no answer within %.3g s", timeout)
            return -1
        if w < 0:
            snprintf(msg, cap, "TLS handshake: poll: %s", strerror(-w))
            return -1


cdef int tls_handshake(SSL *ssl, int fd, bint server, double timeout, char *msg,
                       size_t cap) noexcept nogil:
    """Run the whole handshake within timeout seconds (< 0: no limit), the fd
    non-blocking meanwhile and waited on with poll(); its flags are restored
    after. 0, or -1 with the reason in msg."""
    cdef int flags, rc
    cdef double deadline = monotonic() + timeout if timeout >= 0 else -1.0
    rc = set_nonblocking(fd, &flags)
    if rc < 0:
        snprintf(msg, cap, "TLS handshake: fcntl: %s", strerror(-rc))
        return -1
    rc = handshake_loop(ssl, fd, server, deadline, timeout, msg, cap)
    fcntl(fd, F_SETFL, flags)
    return rc


# ---------------------------------------------------------------- the link

cdef int tls_io_error(Link *link, int ret, int saved, bint reading) noexcept nogil:
    """After SSL_read_ex / SSL_write_ex failed on a blocking socket: 1 to call
    again (EINTR), 0 at the end of the stream, or -errno."""
    cdef int err = SSL_get_error(link.ssl, ret)
    if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
        ERR_clear_error()
        # EINTR: call again; else SO_RCVTIMEO / SO_SNDTIMEO ran out (or the fd is non-blocking)
        return 1 if saved == EINTR else -EAGAIN
    if err == SSL_ERROR_ZERO_RETURN:
        ERR_clear_error()
        return 0 if reading else -EPIPE
    if err == SSL_ERROR_SYSCALL:
        ERR_clear_error()
        if saved == 0:
            return 0 if reading else -EPIPE
        return -saved
    tls_reason(link.err, sizeof(link.err))
    return -EPROTO


cdef ssize_t tls_write_all(Link *link, const uint8_t *buf, size_t size) noexcept nogil:
    """SSL_write every byte of buf (records of 16 KiB); size or -errno."""
    cdef size_t done = 0, wrote
    cdef int ret, r
    while done < size:
        wrote = 0
        ret = SSL_write_ex(link.ssl, buf + done, size - done, &wrote)
        if ret == 1:
            done += wrote
            continue
        r = tls_io_error(link, ret, errno, False)
        if r != 1:         # 1: called again with the same arguments, as OpenSSL requires
            return r if r < 0 else -EPIPE
    return <ssize_t>size


cdef ssize_t tls_writev(Link *link, const iovec *iov, size_t count) noexcept nogil:
    cdef size_t i, used = 0, take, size
    cdef const uint8_t *p
    cdef ssize_t total = 0, r
    # SSL_get_error needs an empty error queue; every failure path below
    # empties it again, so once per packet is enough (ERR_clear_error costs
    # as much as a small SSL_read).
    ERR_clear_error()
    for i in range(count):
        p = <const uint8_t *>iov[i].iov_base
        size = iov[i].iov_len
        if link.staging == NULL or size >= TLS_DIRECT_MIN:
            if used:
                # Top the staged bytes up to a whole record from this element, so
                # a packet header does not leave as a small record of its own.
                take = TLS_RECORD - used % TLS_RECORD if used % TLS_RECORD else 0
                if take > size:
                    take = size
                if used + take <= link.staging_cap:
                    memcpy(link.staging + used, p, take)
                    used += take
                    p += take
                    size -= take
                r = tls_write_all(link, link.staging, used)
                if r < 0:
                    return r
                used = 0
            if size:
                r = tls_write_all(link, p, size)
                if r < 0:
                    return r
        else:
            if used + size > link.staging_cap:
                r = tls_write_all(link, link.staging, used)
                if r < 0:
                    return r
                used = 0
            memcpy(link.staging + used, p, size)
            used += size
        total += iov[i].iov_len
    if used:
        r = tls_write_all(link, link.staging, used)
        if r < 0:
            return r
    return total


cdef ssize_t tls_readv(Link *link, const iovec *iov, size_t count) noexcept nogil:
    cdef size_t i, size, got
    cdef uint8_t *p
    cdef ssize_t total = 0
    cdef int ret, r
    ERR_clear_error()       # once per call, as in tls_writev
    for i in range(count):
        p = <uint8_t *>iov[i].iov_base
        size = iov[i].iov_len
        while size:
            got = 0
            ret = SSL_read_ex(link.ssl, p, size, &got)
            if ret == 1:
                p += got
                size -= got
                total += got
                continue
            r = tls_io_error(link, ret, errno, True)
            if r == 1:
                continue
            return total if r == 0 else r
    return total


cdef ssize_t link_writev(Link *link, iovec *iov, size_t count) noexcept nogil:
    if link.ssl == NULL:
        return transfer_all(link.fd, iov, count, False)
    return tls_writev(link, iov, count)


cdef ssize_t link_readv(Link *link, iovec *iov, size_t count) noexcept nogil:
    if link.ssl == NULL:
        return transfer_all(link.fd, iov, count, True)
    return tls_readv(link, iov, count)


cdef ssize_t link_read_exact(Link *link, void *buf, size_t size) noexcept nogil:
    cdef iovec one
    one.iov_base = buf
    one.iov_len = size
    return link_readv(link, &one, 1)


cdef ssize_t link_write_exact(Link *link, const void *buf, size_t size) noexcept nogil:
    cdef iovec one
    one.iov_base = <void *>buf
    one.iov_len = size
    return link_writev(link, &one, 1)


cdef int link_close_write(Link *link) noexcept nogil:
    """End this side's stream: close_notify (TLS), then shutdown(SHUT_WR). 0 or -errno
    (the first failure; the socket is half-closed in any case)."""
    cdef int rc = 0
    if link.ssl != NULL:
        ERR_clear_error()
        if SSL_shutdown(link.ssl) < 0:
            rc = -(errno or EPIPE)
        ERR_clear_error()
    if shutdown(link.fd, SHUT_WR) < 0 and rc == 0:
        rc = -errno
    return rc


cdef ssize_t tls_read_deadline(Link *link, uint8_t *buf, size_t size,
                               double timeout) noexcept nogil:
    """Read exactly size bytes within timeout seconds, the fd non-blocking
    meanwhile; bytes read (fewer only at the end of the stream), -ETIMEDOUT, or
    -errno."""
    cdef double deadline = monotonic() + timeout
    cdef size_t done = 0, got
    cdef int flags, ret, err, saved, w
    cdef ssize_t rc = set_nonblocking(link.fd, &flags)
    if rc < 0:
        return rc
    while done < size:
        ERR_clear_error()
        got = 0
        ret = SSL_read_ex(link.ssl, buf + done, size - done, &got)
        if ret == 1:
            done += got
            continue
        saved = errno
        err = SSL_get_error(link.ssl, ret)
        if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
            ERR_clear_error()
            w = wait_fd(link.fd, POLLIN if err == SSL_ERROR_WANT_READ else POLLOUT, deadline)
            if w == 0:
                rc = -ETIMEDOUT
                break
            if w < 0:
                rc = w
                break
            continue
        rc = tls_io_error(link, ret, saved, True)
        if rc == 1:
            rc = 0
            continue
        break
    fcntl(link.fd, F_SETFL, flags)
    return rc if rc < 0 else <ssize_t>done


# ---------------------------------------------------------------- the relay

cdef int tls_wait_for(Link *link, int err) noexcept nogil:
    """Wait (no deadline) for what OpenSSL asked for (SSL_ERROR_WANT_*); 0 or -errno."""
    cdef int w = wait_fd(link.fd, POLLIN if err == SSL_ERROR_WANT_READ else POLLOUT, -1.0)
    return w if w < 0 else 0


cdef int tls_write_nonblocking(Link *link, const uint8_t *buf, size_t size) noexcept nogil:
    """SSL_write every byte of buf, its fd non-blocking, waiting as OpenSSL asks;
    0 or -errno."""
    cdef size_t done = 0, wrote
    cdef int ret, err, saved, r
    while done < size:
        ERR_clear_error()
        wrote = 0
        ret = SSL_write_ex(link.ssl, buf + done, size - done, &wrote)
        if ret == 1:
            done += wrote
            continue
        saved = errno
        err = SSL_get_error(link.ssl, ret)
        if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
            ERR_clear_error()
            r = tls_wait_for(link, err)
        else:
            r = tls_io_error(link, ret, saved, False)
            if r == 0:
                r = -EPIPE
        if r < 0:
            return r
    return 0


cdef int tls_relay(Link *link, int plain, uint8_t *buf, size_t cap) noexcept nogil:
    """Relay the TLS session and the blocking socket plain both ways (the TLS
    fd non-blocking meanwhile): the peer's bytes, decrypted, to plain, and
    plain's, encrypted, to the peer. The peer's end (close_notify or FIN) shuts
    plain for writing; plain's end ends the session (close_notify, FIN): 0. A
    failure: -errno (-EPROTO with OpenSSL's reason in link.err)."""
    cdef int flags
    cdef int rc = set_nonblocking(link.fd, &flags)
    if rc < 0:
        return rc
    rc = tls_relay_until_plain_ends(link, plain, buf, cap)
    fcntl(link.fd, F_SETFL, flags)
    if rc == 0:
        link_close_write(link)
    return rc


cdef int tls_relay_until_plain_ends(Link *link, int plain, uint8_t *buf,
                                    size_t cap) noexcept nogil:
    """tls_relay's loop, its TLS fd non-blocking: 0 once plain ended, or -errno."""
    cdef pollfd fds[2]
    cdef bint peer_open = True
    cdef short tls_events = POLLIN
    cdef size_t got
    cdef ssize_t n
    cdef int ret, err, saved, r
    cdef iovec one
    while True:
        while peer_open:            # all OpenSSL has decrypted, or can, without waiting
            ERR_clear_error()
            got = 0
            ret = SSL_read_ex(link.ssl, buf, cap, &got)
            if ret == 1:
                one.iov_base = buf
                one.iov_len = got
                n = transfer_all(plain, &one, 1, False)
                if n < 0:
                    return <int>n
                continue
            saved = errno
            err = SSL_get_error(link.ssl, ret)
            if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
                ERR_clear_error()
                tls_events = POLLIN if err == SSL_ERROR_WANT_READ else POLLOUT
                break
            r = tls_io_error(link, ret, saved, True)
            if r < 0:
                return r
            if r == 0:              # the peer's end, passed on
                peer_open = False
                shutdown(plain, SHUT_WR)
        fds[0].fd = plain
        fds[0].events = POLLIN
        fds[0].revents = 0
        fds[1].fd = link.fd
        fds[1].events = tls_events
        fds[1].revents = 0
        if poll(fds, 2 if peer_open else 1, -1) < 0:
            if errno == EINTR:
                continue
            return -errno
        if not fds[0].revents:
            continue
        n = recv(plain, buf, cap, 0)        # readable: it does not wait
        if n == 0:
            return 0
        if n < 0:
            if errno == EINTR or errno == EAGAIN:
                continue
            return -errno
        r = tls_write_nonblocking(link, buf, <size_t>n)
        if r < 0:
            return r


# ---------------------------------------------------------------- the Python face

# OpenSSL's TLS 1.3 suites, AES-128-GCM first: the same security margin for
# a migration's lifetime, and ~15 % less CPU per byte than AES-256-GCM here.
cdef bytes TLS13_DEFAULT_SUITES = (b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                   b"TLS_CHACHA20_POLY1305_SHA256")


cdef bytes tls_path(object path, str what):
    if path is None:
        return None
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError(f"{what} path contains a NUL byte")
    return raw


cdef str tls_error_text():
    cdef char reason[200]
    tls_reason(reason, sizeof(reason))
    return reason.decode(errors="replace")


cdef class TLSChannel:
    """One TLS session on a connected socket, run by OpenSSL from C.

    Made by :meth:`connect` (client) or :meth:`accept` (server); both run
    the whole handshake with the GIL released, within ``timeout`` seconds,
    and raise :class:`fastmfd.errors.TLSError` naming what failed. Afterwards
    :meth:`send_all` / :meth:`recv_exact` move bytes, and the engines take
    the channel (``tls=``) to run a data channel through it.

    ``ciphers`` None: TLS 1.3's suites with AES-128-GCM first, and
    OpenSSL's default TLS 1.2 list. Otherwise a colon-separated list: names
    starting ``TLS_`` are TLS 1.3 suites (``SSL_CTX_set_ciphersuites``),
    the others OpenSSL's TLS 1.2 cipher list (``SSL_CTX_set_cipher_list``).
    A list of only TLS 1.2 names turns TLS 1.3 off, and one of only TLS 1.3
    suites turns TLS 1.2 off, so the connection always uses a cipher named.

    The channel does not own ``fd`` (the Python socket object does, and
    closes it); it needs the socket in blocking mode for ``send_all``,
    ``recv_exact`` without a timeout and the engines (the handshake and a
    timed ``recv_exact`` make it non-blocking for their duration only).
    """

    def __cinit__(self):
        self.ctx = NULL
        self.ssl = NULL
        self.link.fd = -1
        self.link.ssl = NULL
        self.link.staging = NULL
        self.link.staging_cap = 0
        self.link.err[0] = 0
        self.fd = -1

    def __init__(self):
        raise TypeError("use TLSChannel.connect() or TLSChannel.accept()")

    def __dealloc__(self):
        if self.ssl != NULL:
            SSL_free(self.ssl)
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)

    @staticmethod
    def connect(int fd, *, cert=None, key=None, ca=None, hostname=None, ciphers=None,
                double timeout=10.0):
        """Client side: verify the server's certificate against ``ca`` (a PEM
        file; None: the system's default verify paths) and, when given,
        ``hostname`` (a DNS name, also sent as SNI, or an IP literal).
        ``cert``/``key``: this side's certificate chain and key (mutual TLS;
        ``key`` None: the key is in ``cert``)."""
        cdef TLSChannel ch = TLSChannel.__new__(TLSChannel)
        ch._configure(fd, False, cert, key, ca, ciphers)
        if hostname is not None:
            ch._expect_host(str(hostname))
        ch._handshake(timeout)
        return ch

    @staticmethod
    def accept(int fd, *, cert, key, ca=None, ciphers=None, double timeout=10.0):
        """Server side, with certificate chain ``cert`` and key ``key`` (None:
        the key is in ``cert``). With ``ca`` the client must present a
        certificate that ``ca`` verifies (mutual TLS). A peer whose first byte
        does not open a TLS handshake record is refused before OpenSSL runs."""
        cdef TLSChannel ch = TLSChannel.__new__(TLSChannel)
        if cert is None:
            raise ValueError("a TLS server needs a certificate (cert=)")
        ch._configure(fd, True, cert, key, ca, ciphers)
        ch._handshake(timeout)
        return ch

    cdef int _configure(self, int fd, bint server, object cert, object key, object ca,
                        object ciphers) except -1:
        cdef bytes cert_path = tls_path(cert, "cert")
        cdef bytes key_path = tls_path(key, "key") if key is not None else cert_path
        cdef bytes ca_path = tls_path(ca, "ca")
        if fd < 0:
            raise ValueError(f"bad file descriptor {fd}")
        self.fd = fd
        self.server = server
        ERR_clear_error()
        self.ctx = SSL_CTX_new(TLS_server_method() if server else TLS_client_method())
        if self.ctx == NULL:
            raise TLSError(f"TLS: cannot create a context: {tls_error_text()}")
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_2_VERSION)
        SSL_CTX_set_options(self.ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION
                            | SSL_OP_NO_RENEGOTIATION)
        SSL_CTX_set_mode(self.ctx, SSL_MODE_AUTO_RETRY | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        SSL_CTX_set_read_ahead(self.ctx, 1)
        SSL_CTX_set_default_read_buffer_len(self.ctx, TLS_READ_BUFFER)
        if server:
            SSL_CTX_set_num_tickets(self.ctx, 0)
        if ciphers is not None:
            self._set_ciphers(str(ciphers))
        elif SSL_CTX_set_ciphersuites(self.ctx, TLS13_DEFAULT_SUITES) != 1:
            raise TLSError(f"TLS: cannot set the TLS 1.3 suites: {tls_error_text()}")
        if cert_path is not None:
            if SSL_CTX_use_certificate_chain_file(self.ctx, cert_path) != 1:
                raise TLSError(f"TLS: cannot load the certificate chain {cert!r}: "
                               f"{tls_error_text()}")
            if SSL_CTX_use_PrivateKey_file(self.ctx, key_path, SSL_FILETYPE_PEM) != 1:
                raise TLSError(f"TLS: cannot load the private key "
                               f"{(key if key is not None else cert)!r}: {tls_error_text()}")
            if SSL_CTX_check_private_key(self.ctx) != 1:
                raise TLSError(f"TLS: the private key does not match the certificate {cert!r}: "
                               f"{tls_error_text()}")
        elif key_path is not None:
            raise ValueError("a TLS key without its certificate (cert=)")
        if ca_path is not None:
            if SSL_CTX_load_verify_locations(self.ctx, ca_path, NULL) != 1:
                raise TLSError(f"TLS: cannot load the CA certificates {ca!r}: "
                               f"{tls_error_text()}")
        elif not server and SSL_CTX_set_default_verify_paths(self.ctx) != 1:
            raise TLSError(f"TLS: cannot load the system's CA certificates: {tls_error_text()}")
        if not server:
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER, NULL)
        elif ca_path is not None:
            names = SSL_load_client_CA_file(ca_path)
            if names != NULL:       # the CA names a server lists in its certificate request
                SSL_CTX_set_client_CA_list(self.ctx, names)
            ERR_clear_error()
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL)
        self.ssl = SSL_new(self.ctx)
        if self.ssl == NULL or SSL_set_fd(self.ssl, fd) != 1:
            raise TLSError(f"TLS: cannot set up a session: {tls_error_text()}")
        if server:
            SSL_set_accept_state(self.ssl)
        else:
            SSL_set_connect_state(self.ssl)
        self.link.fd = fd
        self.link.ssl = self.ssl
        return 0

    cdef int _set_ciphers(self, str ciphers) except -1:
        names = [name for name in ciphers.split(":") if name]
        suites = ":".join(name for name in names if name.startswith("TLS_")).encode()
        legacy = ":".join(name for name in names if not name.startswith("TLS_")).encode()
        if not names:
            raise ValueError("ciphers: an empty list")
        if suites:
            if SSL_CTX_set_ciphersuites(self.ctx, suites) != 1:
                raise TLSError(f"TLS: no TLS 1.3 suite in {ciphers!r} is known to OpenSSL: "
                               f"{tls_error_text()}")
        else:
            SSL_CTX_set_max_proto_version(self.ctx, TLS1_2_VERSION)
        if legacy:
            if SSL_CTX_set_cipher_list(self.ctx, legacy) != 1:
                raise TLSError(f"TLS: no TLS 1.2 cipher in {ciphers!r} is known to OpenSSL: "
                               f"{tls_error_text()}")
        else:
            SSL_CTX_set_min_proto_version(self.ctx, TLS1_3_VERSION)
        return 0

    cdef int _expect_host(self, str hostname) except -1:
        literal = hostname[1:len(hostname) - 1] \
            if hostname.startswith("[") and hostname.endswith("]") else hostname
        literal = literal.split("%", 1)[0]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            pass
        else:
            if X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(self.ssl), literal.encode()) != 1:
                raise TLSError(f"TLS: cannot expect the IP address {hostname!r}: "
                               f"{tls_error_text()}")
            return 0
        if not hostname or "\0" in hostname:
            raise ValueError(f"bad TLS hostname {hostname!r}")
        raw = hostname.encode("idna") if not hostname.isascii() else hostname.encode()
        SSL_set_hostflags(self.ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        if SSL_set1_host(self.ssl, raw) != 1 or SSL_set_tlsext_host_name(self.ssl, raw) != 1:
            raise TLSError(f"TLS: cannot expect the host name {hostname!r}: {tls_error_text()}")
        return 0

    cdef int _handshake(self, double timeout) except -1:
        cdef char msg[400]
        cdef int rc
        with nogil:
            rc = tls_handshake(self.ssl, self.fd, self.server, timeout, msg, sizeof(msg))
        if rc < 0:
            raise TLSError(msg.decode(errors="replace"))
        return 0

    cdef int _check(self, ssize_t rc, size_t want, str what, double timeout) except -1:
        cdef bytes reason
        if rc == -EPROTO and self.link.err[0]:
            reason = self.link.err
            self.link.err[0] = 0
            text = reason.decode(errors="replace")
            if " alert " in f" {text} ":
                raise TLSError(f"TLS {what} failed: the peer sent an alert: {text}")
            raise TLSError(f"TLS {what} failed: {text}")
        if rc == -ETIMEDOUT:
            raise TimeoutError(f"TLS {what}: no data within {timeout:g} s")
        if rc == -EAGAIN:
            raise TimeoutError(errno_module.EAGAIN, f"TLS {what}: the socket timed out")
        if rc < 0:
            raise OSError(-rc, f"TLS {what}: {strerror(-rc).decode()}")
        if <size_t>rc != want:
            raise EOFError(f"TLS {what}: connection closed after {rc} of {want} bytes")
        return 0

    def send_all(self, data):
        """Write every byte of ``data`` (bytes-like), GIL released."""
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef size_t n = view.shape[0]
        cdef ssize_t rc
        if self.ssl == NULL:
            raise ValueError("TLSChannel is not connected")
        if n == 0:
            return
        with nogil:
            rc = link_write_exact(&self.link, &view[0], n)
        self._check(rc, n, "send", -1)

    def recv_exact(self, Py_ssize_t n, double timeout=-1):
        """Read exactly ``n`` bytes (GIL released). ``timeout`` < 0: block;
        otherwise raise TimeoutError when they have not all come within that
        many seconds. EOFError when the peer ends the stream first."""
        cdef bytes out
        cdef uint8_t *p
        cdef ssize_t rc
        if self.ssl == NULL:
            raise ValueError("TLSChannel is not connected")
        if n < 0:
            raise ValueError("n must be >= 0")
        out = PyBytes_FromStringAndSize(NULL, n)
        if n == 0:
            return out
        p = <uint8_t *>PyBytes_AS_STRING(out)
        with nogil:
            if timeout < 0:
                rc = link_read_exact(&self.link, p, <size_t>n)
            else:
                rc = tls_read_deadline(&self.link, p, <size_t>n, timeout)
        self._check(rc, <size_t>n, "receive", timeout)
        return out

    def relay(self, int plain_fd, Py_ssize_t buffer_size=1 << 16):
        """Relay this session and the blocking socket ``plain_fd`` both ways (GIL
        released) until ``plain_fd`` ends: the peer's bytes, decrypted, go to
        it, and its bytes, encrypted, to the peer; the peer's end shuts
        ``plain_fd`` for writing, and ``plain_fd``'s end sends close_notify.
        TLSError or OSError when either side fails."""
        cdef uint8_t *buf
        cdef int rc
        if self.ssl == NULL:
            raise ValueError("TLSChannel is not connected")
        if buffer_size <= 0:
            raise ValueError("buffer_size must be > 0")
        buf = <uint8_t *>PyMem_Malloc(buffer_size)
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                rc = tls_relay(&self.link, plain_fd, buf, <size_t>buffer_size)
        finally:
            PyMem_Free(buf)
        self._check(rc, 0, "relay", -1)

    def close_write(self):
        """Send close_notify, then shut the socket's write side (errors ignored:
        the peer may already be gone)."""
        if self.ssl != NULL:
            with nogil:
                link_close_write(&self.link)

    def peer_identities(self):
        """The peer certificate's subject CN, then its subjectAltName DNS names,
        email addresses and IP addresses (as text); [] without a peer certificate."""
        cdef X509 *cert
        cdef X509_NAME *subject
        cdef GENERAL_NAMES *names
        cdef const ASN1_STRING *value
        cdef unsigned char *utf8
        cdef int idx, size, i, kind
        if self.ssl == NULL:
            return []
        cert = SSL_get1_peer_certificate(self.ssl)
        if cert == NULL:
            return []
        found = {GEN_DNS: [], GEN_EMAIL: [], GEN_IPADD: []}
        out = []
        try:
            subject = X509_get_subject_name(cert)
            idx = X509_NAME_get_index_by_NID(subject, NID_commonName, -1)
            while idx >= 0:
                utf8 = NULL
                size = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(
                    X509_NAME_get_entry(subject, idx)))
                if size >= 0 and utf8 != NULL:
                    try:
                        out.append(utf8[:size].decode("utf-8", "replace"))
                    finally:
                        OPENSSL_free(utf8)
                idx = X509_NAME_get_index_by_NID(subject, NID_commonName, idx)
            names = <GENERAL_NAMES *>X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL)
            if names != NULL:
                try:
                    for i in range(sk_GENERAL_NAME_num(names)):
                        value = <const ASN1_STRING *>GENERAL_NAME_get0_value(
                            sk_GENERAL_NAME_value(names, i), &kind)
                        if value == NULL or kind not in found:
                            continue
                        raw = (<const char *>ASN1_STRING_get0_data(value))[
                            :ASN1_STRING_length(value)]
                        if kind == GEN_IPADD:
                            if len(raw) in (4, 16):
                                found[kind].append(str(ipaddress.ip_address(raw)))
                        else:
                            found[kind].append(raw.decode("ascii", "replace"))
                finally:
                    GENERAL_NAMES_free(names)
        finally:
            X509_free(cert)
            ERR_clear_error()
        out += found[GEN_DNS] + found[GEN_EMAIL] + found[GEN_IPADD]
        return list(dict.fromkeys(out))

    @property
    def version(self):
        """The protocol version negotiated, e.g. ``"TLSv1.3"``."""
        return SSL_get_version(self.ssl).decode() if self.ssl != NULL else None

    @property
    def cipher(self):
        """The cipher suite negotiated, e.g. ``"TLS_AES_256_GCM_SHA384"``."""
        cdef const SSL_CIPHER *c
        if self.ssl == NULL:
            return None
        c = SSL_get_current_cipher(self.ssl)
        return SSL_CIPHER_get_name(c).decode() if c != NULL else None
