# Compression methods (QEMU multifd-zlib.c / multifd-zstd.c): one stream per
# channel for the whole session, never reset, each packet ending with a
# flush, so the bytes on the wire are one standard zlib or zstd stream per
# channel (spec §4). Each method is a Codec: compress a packet's pages (an
# iovec list, read in place) into the codec's own output buffer; decompress a
# packet's payload straight into the destination pages. Output sizes are
# exact: a payload that inflates to more or fewer bytes than its pages is a
# ProtocolError, and decompression never writes past the pages it was given.

cdef int grow(uint8_t **buf, size_t *cap, size_t need, str what="compression buffer"
              ) except -1:
    """Make the PyMem buffer ``*buf`` (``*cap`` bytes) hold at least ``need``.
    It only grows, so a channel's steady stream of packets stops allocating."""
    cdef uint8_t *grown
    if need > cap[0]:
        grown = <uint8_t *>PyMem_Realloc(buf[0], need)
        if grown == NULL:
            raise MemoryError(f"cannot allocate {need} bytes of {what} (for a packet's "
                              f"pages: at most packet_pages x page_size, from SETUP)")
        buf[0] = grown
        cap[0] = need
    return 0


cdef class Codec:
    """Base of the per-channel compression streams; ``flag`` is the wire bit."""

    cdef int reserve(self, size_t raw_bytes) except -1:
        return grow(&self.out, &self.out_cap, self.bound(raw_bytes))

    cdef size_t bound(self, size_t raw_bytes) noexcept:
        return raw_bytes + raw_bytes // 8 + 4096

    cdef ssize_t compress_iov(self, const iovec *iov, size_t n, size_t raw_bytes,
                              const uint8_t **result) except -1:
        raise NotImplementedError

    cdef int decompress_iov(self, const uint8_t *src, size_t size, const iovec *iov,
                            size_t n) except -1:
        raise NotImplementedError

    cdef ssize_t decompress_bounded(self, const uint8_t *src, size_t size, uint8_t *dst,
                                    size_t cap) except -1:
        """Decompress one packet whose size is not known in advance (a device
        chunk) into dst; more than ``cap`` bytes is a ProtocolError."""
        raise NotImplementedError

    def __dealloc__(self):
        PyMem_Free(self.out)

    # -- Python-level helpers, contiguous buffers only: inspect decompresses
    # captured payloads; compress() is test face (tests build compressed
    # captures and streams with it; workers compress iovecs in C).
    def compress(self, const uint8_t[::1] data):
        """Compress ``data`` as one packet (ending with a flush); returns bytes."""
        cdef iovec one
        cdef const uint8_t *result
        cdef ssize_t size
        one.iov_base = <void *>&data[0] if data.shape[0] else NULL
        one.iov_len = data.shape[0]
        size = self.compress_iov(&one, 1 if data.shape[0] else 0, data.shape[0], &result)
        return (<const char *>result)[:size]

    def decompress_upto(self, const uint8_t[::1] data, uint8_t[::1] out):
        """Decompress one packet of unknown inflated size (a device chunk) into
        ``out``; returns the bytes produced. Not fitting ``out`` is a ProtocolError."""
        if data.shape[0] == 0 or out.shape[0] == 0:
            raise ProtocolError("compressed payload is empty", field="next_packet_size",
                                received=0, expected="> 0")
        return self.decompress_bounded(&data[0], data.shape[0], &out[0], out.shape[0])

    def decompress_into(self, const uint8_t[::1] data, uint8_t[::1] out):
        """Decompress one packet's ``data`` into ``out``, which it must fill exactly."""
        cdef iovec one
        if data.shape[0] == 0:
            raise ProtocolError("compressed payload is empty", field="next_packet_size",
                                received=0, expected="> 0")
        one.iov_base = &out[0] if out.shape[0] else NULL
        one.iov_len = out.shape[0]
        self.decompress_iov(&data[0], data.shape[0], &one, 1 if out.shape[0] else 0)


cdef object inflate_error(size_t produced, size_t expected, str detail):
    return ProtocolError(
        f"compressed payload: {detail}: produced {produced} bytes, expected {expected}",
        field="payload", received=produced, expected=expected)


cdef class ZlibCodec(Codec):
    """zlib (RFC 1950) with libz: deflate per page through a bounce buffer, as QEMU
    does, because a live workload may rewrite a page while it is compressed."""

    def __cinit__(self, bint compressing, int level=1):
        self.flag = FLAG_ZLIB
        self.compressing = compressing
        memset(&self.strm, 0, sizeof(z_stream))
        if compressing:
            if not 0 <= level <= 9:
                raise ValueError(f"zlib level {level} outside 0..9")
            rc = deflateInit2(&self.strm, level, Z_DEFLATED, MAX_WBITS, 8, Z_DEFAULT_STRATEGY)
        else:
            rc = inflateInit2(&self.strm, MAX_WBITS)
        if rc != Z_OK:
            raise MemoryError(f"zlib stream init failed ({rc})")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            if self.compressing:
                deflateEnd(&self.strm)
            else:
                inflateEnd(&self.strm)

    cdef size_t bound(self, size_t raw_bytes) noexcept:
        return compressBound(raw_bytes) + 64

    cdef ssize_t compress_iov(self, const iovec *iov, size_t n, size_t raw_bytes,
                              const uint8_t **result) except -1:
        cdef size_t i, pos, take
        cdef int rc = Z_OK, flush
        self.reserve(raw_bytes)
        with nogil:
            self.strm.next_out = self.out
            self.strm.avail_out = <unsigned int>self.out_cap
            for i in range(n):
                pos = 0
                while pos < iov[i].iov_len and rc == Z_OK:
                    take = min(<size_t>BOUNCE_SIZE, iov[i].iov_len - pos)
                    memcpy(self.bounce, <const uint8_t *>iov[i].iov_base + pos, take)
                    pos += take
                    self.strm.next_in = self.bounce
                    self.strm.avail_in = <unsigned int>take
                    flush = Z_SYNC_FLUSH if (i + 1 == n and pos == iov[i].iov_len) else Z_NO_FLUSH
                    rc = deflate(&self.strm, flush)
                    if self.strm.avail_in:
                        rc = Z_BUF_ERROR
            if n == 0:
                self.strm.avail_in = 0
                rc = deflate(&self.strm, Z_SYNC_FLUSH)
        if rc != Z_OK:
            raise RuntimeError(f"deflate failed ({rc})")
        result[0] = self.out
        return self.out_cap - self.strm.avail_out

    cdef int decompress_iov(self, const uint8_t *src, size_t size, const iovec *iov,
                            size_t n) except -1:
        cdef size_t i, produced = 0, expected = 0
        cdef int rc = Z_OK
        cdef uint8_t sink
        for i in range(n):
            expected += iov[i].iov_len
        with nogil:
            self.strm.next_in = src
            self.strm.avail_in = <unsigned int>size
            for i in range(n):
                self.strm.next_out = <uint8_t *>iov[i].iov_base
                self.strm.avail_out = <unsigned int>iov[i].iov_len
                while self.strm.avail_out and rc == Z_OK:
                    rc = inflate(&self.strm, Z_SYNC_FLUSH)
                    if rc == Z_BUF_ERROR and self.strm.avail_in == 0:
                        break
                produced += iov[i].iov_len - self.strm.avail_out
                if rc != Z_OK or self.strm.avail_out:
                    break
            if rc == Z_OK and produced == expected:
                # Whatever input is left (the flush marker, an empty stored
                # block) must yield no more output: offer one byte of room.
                self.strm.next_out = &sink
                self.strm.avail_out = 1
                rc = inflate(&self.strm, Z_SYNC_FLUSH)
                if rc == Z_BUF_ERROR:
                    rc = Z_OK
        if rc != Z_OK and rc != Z_BUF_ERROR:
            msg = self.strm.msg.decode() if self.strm.msg != NULL else f"error {rc}"
            raise inflate_error(produced, expected, f"inflate failed: {msg}")
        if produced != expected:
            raise inflate_error(produced, expected, "inflated too few bytes")
        if self.strm.avail_out == 0 or self.strm.avail_in:
            raise inflate_error(produced + 1, expected, "inflates to more than its pages")
        return 0


    cdef ssize_t decompress_bounded(self, const uint8_t *src, size_t size, uint8_t *dst,
                                    size_t cap) except -1:
        cdef int rc = Z_OK
        cdef uint8_t sink
        cdef size_t produced
        cdef bint overflow = False
        with nogil:
            self.strm.next_in = src
            self.strm.avail_in = <unsigned int>size
            self.strm.next_out = dst
            self.strm.avail_out = <unsigned int>cap
            while self.strm.avail_in and self.strm.avail_out and rc == Z_OK:
                rc = inflate(&self.strm, Z_SYNC_FLUSH)
            produced = cap - self.strm.avail_out
            if rc == Z_OK and self.strm.avail_out == 0:
                # Full: what input is left must not yield another byte.
                self.strm.next_out = &sink
                self.strm.avail_out = 1
                rc = inflate(&self.strm, Z_SYNC_FLUSH)
                overflow = self.strm.avail_out == 0
        if rc == Z_BUF_ERROR and self.strm.avail_in == 0:
            rc = Z_OK
        if rc != Z_OK:
            msg = self.strm.msg.decode() if self.strm.msg != NULL else f"error {rc}"
            raise inflate_error(produced, cap, f"inflate failed: {msg}")
        if overflow or self.strm.avail_in:
            raise inflate_error(cap + 1, cap, "inflates to more than a chunk may hold")
        return produced


cdef class ZstdCodec(Codec):
    """zstd with libzstd: one frame per channel that is flushed, never ended —
    except where the sender changes its level (``compression="auto"``): libzstd
    applies a new level only to a new frame, so the packet that starts at the
    new level first ends the frame (3 bytes), and the stream goes on as the
    next frame. A decompressor reads concatenated frames as one stream."""

    def __cinit__(self, bint compressing, int level=1):
        self.flag = FLAG_ZSTD
        if compressing:
            self.cctx = ZSTD_createCCtx()
            if self.cctx == NULL:
                raise MemoryError("cannot allocate a zstd compression context")
            self.set_level(level)
        else:
            self.dctx = ZSTD_createDCtx()
            if self.dctx == NULL:
                raise MemoryError("cannot allocate a zstd decompression context")
            # Bound the window a peer can make each receiving channel allocate:
            # zstd's own limit is 2^27 (128 MiB); the highest level QEMU and
            # fastmfd send, 20, streams with 2^25.
            check_zstd(ZSTD_DCtx_setParameter(self.dctx, ZSTD_d_windowLogMax,
                                              ZSTD_WINDOW_LOG_MAX), "window")

    def __dealloc__(self):
        if self.cctx != NULL:
            ZSTD_freeCCtx(self.cctx)
        if self.dctx != NULL:
            ZSTD_freeDCtx(self.dctx)

    cpdef int set_level(self, int level) except -1:
        """Compress the next packet (and those after it) at ``level``."""
        if not ZSTD_minCLevel() <= level <= ZSTD_maxCLevel():
            raise ValueError(f"zstd level {level} outside {ZSTD_minCLevel()}.."
                             f"{ZSTD_maxCLevel()}")
        self.level = level      # compress_iov applies it: at once, or with a new frame
        return 0

    cdef size_t bound(self, size_t raw_bytes) noexcept:
        return ZSTD_compressBound(raw_bytes) + 64     # + a frame's end and the next one's header

    cdef ssize_t compress_iov(self, const iovec *iov, size_t n, size_t raw_bytes,
                              const uint8_t **result) except -1:
        cdef ZSTD_outBuffer out
        cdef ZSTD_inBuffer inp
        cdef size_t i, rc = 0
        self.reserve(raw_bytes)
        out.dst = self.out
        out.size = self.out_cap
        out.pos = 0
        if self.in_frame and self.level != self.frame_level:
            self.end_frame(&out)
        if not self.in_frame:
            check_zstd(ZSTD_CCtx_setParameter(self.cctx, ZSTD_c_compressionLevel, self.level),
                       "set level")
            self.frame_level = self.level
            self.in_frame = True
        with nogil:
            for i in range(n):
                inp.src = iov[i].iov_base
                inp.size = iov[i].iov_len
                inp.pos = 0
                while inp.pos < inp.size:
                    rc = ZSTD_compressStream2(self.cctx, &out, &inp, ZSTD_e_continue)
                    if ZSTD_isError(rc) or out.pos == out.size:
                        break
                if ZSTD_isError(rc):
                    break
            if not ZSTD_isError(rc):
                inp.src = NULL
                inp.size = 0
                inp.pos = 0
                rc = 1
                while rc != 0 and not ZSTD_isError(rc) and out.pos < out.size:
                    rc = ZSTD_compressStream2(self.cctx, &out, &inp, ZSTD_e_flush)
        if ZSTD_isError(rc) or rc != 0:
            raise RuntimeError(f"zstd compression failed: "
                               f"{ZSTD_getErrorName(rc).decode() if ZSTD_isError(rc) else 'output full'}")
        result[0] = self.out
        return out.pos

    cdef int end_frame(self, ZSTD_outBuffer *out) except -1:
        """End the current frame into ``out`` (a new level starts a new frame)."""
        cdef ZSTD_inBuffer none
        cdef size_t rc = 1
        none.src = NULL
        none.size = 0
        none.pos = 0
        while rc != 0 and not ZSTD_isError(rc) and out.pos < out.size:
            rc = ZSTD_compressStream2(self.cctx, out, &none, ZSTD_e_end)
        if rc != 0:
            raise RuntimeError(f"zstd frame end failed: "
                               f"{ZSTD_getErrorName(rc).decode() if ZSTD_isError(rc) else 'output full'}")
        self.in_frame = False
        return 0

    cdef int decompress_iov(self, const uint8_t *src, size_t size, const iovec *iov,
                            size_t n) except -1:
        cdef ZSTD_inBuffer inp
        cdef ZSTD_outBuffer out
        cdef size_t i, rc = 0, produced = 0, expected = 0
        cdef uint8_t sink
        for i in range(n):
            expected += iov[i].iov_len
        inp.src = src
        inp.size = size
        inp.pos = 0
        with nogil:
            for i in range(n):
                rc = zstd_fill(self.dctx, &out, iov[i].iov_base, iov[i].iov_len, &inp)
                produced += out.pos
                if ZSTD_isError(rc) or out.pos < out.size:
                    break
            if not ZSTD_isError(rc) and produced == expected:
                # zstd buffers input internally, so consumed input proves
                # nothing: the stream must have no byte left to give.
                rc = zstd_fill(self.dctx, &out, &sink, 1, &inp)
        if ZSTD_isError(rc):
            raise inflate_error(produced, expected,
                                f"zstd: {ZSTD_getErrorName(rc).decode()}")
        if produced != expected:
            raise inflate_error(produced, expected, "decompressed too few bytes")
        if out.pos or inp.pos != inp.size:
            raise inflate_error(produced + 1, expected, "decompresses to more than its pages")
        return 0


    cdef ssize_t decompress_bounded(self, const uint8_t *src, size_t size, uint8_t *dst,
                                    size_t cap) except -1:
        cdef ZSTD_inBuffer inp
        cdef ZSTD_outBuffer out
        cdef size_t rc, produced
        cdef uint8_t sink
        inp.src = src
        inp.size = size
        inp.pos = 0
        with nogil:
            rc = zstd_fill(self.dctx, &out, dst, cap, &inp)
            produced = out.pos
            if not ZSTD_isError(rc) and produced == cap:
                # Full: what input is left must not yield another byte.
                rc = zstd_fill(self.dctx, &out, &sink, 1, &inp)
        if ZSTD_isError(rc):
            raise inflate_error(produced, cap, f"zstd: {ZSTD_getErrorName(rc).decode()}")
        if inp.pos != inp.size or (produced == cap and out.pos):
            raise inflate_error(cap + 1, cap, "decompresses to more than a chunk may hold")
        return produced


cdef size_t zstd_fill(ZSTD_DCtx *dctx, ZSTD_outBuffer *out, void *dst, size_t size,
                      ZSTD_inBuffer *inp) noexcept nogil:
    """Decompress into dst[:size] until it is full, the stream stops making
    progress, or an error; ``out.pos`` says how far it got. Returns zstd's
    last return code (0 when there was no room to fill)."""
    cdef size_t rc = 0, before
    out.dst = dst
    out.size = size
    out.pos = 0
    while out.pos < out.size:
        before = inp.pos + out.pos
        rc = ZSTD_decompressStream(dctx, out, inp)
        if ZSTD_isError(rc) or inp.pos + out.pos == before:
            break
    return rc


cdef int check_zstd(size_t rc, str what) except -1:
    if ZSTD_isError(rc):
        raise RuntimeError(f"zstd {what}: {ZSTD_getErrorName(rc).decode()}")
    return 0


cdef class IsalZlibCodec(Codec):
    """zlib-format streams with ISA-L (python-isal), both directions.

    Sending: ISA-L's deflate is wire-compatible with zlib and an order of
    magnitude faster at low levels; the pages are gathered into a bounce
    buffer first, as with libz. Where deflate saves under 1/64 of a packet
    (random pages: ISA-L's Huffman-coded literals come out *larger*), the
    packet goes as deflate stored blocks instead — the same standard stream,
    since a SYNC flush leaves it byte-aligned and the compressor's history
    holds exactly the bytes the inflater's window gets — so the receiver
    copies it at memory speed instead of decoding 512 KiB of literals.

    Receiving: ISA-L's inflate (2.5x libz on text, 1.5x on literals), into a
    bytes object then scattered into the pages; the output is bounded by the
    pages plus one byte, so a payload that inflates to more is caught
    without writing past them.
    """

    def __cinit__(self, bint compressing, int level=1):
        from isal import isal_zlib
        self.flag = FLAG_ZLIB
        self.compressing = compressing
        self.error = isal_zlib.error
        if not compressing:
            self.stream = isal_zlib.decompressobj(15)
            return
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level {level} outside 0..9")
        # zlib levels 1..9 onto ISA-L's 0..3 (ISA-L 1 matches zlib 1's ratio).
        isal_level = 1 if level <= 2 else (2 if level <= 5 else 3)
        self.stream = isal_zlib.compressobj(isal_level, isal_zlib.DEFLATED, 15)
        self.sync_flush = isal_zlib.Z_SYNC_FLUSH

    def __dealloc__(self):
        PyMem_Free(self.gather)

    cdef size_t bound(self, size_t raw_bytes) noexcept:
        return (ZLIB_HEADER_SIZE + raw_bytes
                + 5 * (raw_bytes // STORED_BLOCK_MAX + 1))

    cdef ssize_t compress_iov(self, const iovec *iov, size_t n, size_t raw_bytes,
                              const uint8_t **result) except -1:
        cdef size_t pos, header, size
        if not self.compressing:
            raise ValueError("this zlib stream decompresses")
        grow(&self.gather, &self.gather_cap, raw_bytes, "zlib gather buffer")
        with nogil:
            pos = gather_iov(iov, n, self.gather)
        view = <uint8_t[:pos]>self.gather if pos else b""
        self.last = self.stream.compress(view) + self.stream.flush(self.sync_flush)
        header = 0 if self.header_sent else ZLIB_HEADER_SIZE
        self.header_sent = True
        size = len(self.last)
        if pos == 0 or (size - header) * 64 < pos * 63:
            result[0] = <const uint8_t *>(<bytes>self.last)
            return size
        self.reserve(pos)
        memcpy(self.out, <const uint8_t *>(<bytes>self.last), header)
        result[0] = self.out
        return header + store_blocks(self.gather, pos, self.out + header)

    cdef int decompress_iov(self, const uint8_t *src, size_t size, const iovec *iov,
                            size_t n) except -1:
        cdef size_t i, expected = 0, pos = 0
        cdef const uint8_t *data
        for i in range(n):
            expected += iov[i].iov_len
        out = self._inflate(src, size, expected, "its pages")
        if len(out) < expected:
            raise inflate_error(len(out), expected, "inflated too few bytes")
        data = <const uint8_t *>(<bytes>out)
        with nogil:
            for i in range(n):
                memcpy(iov[i].iov_base, data + pos, iov[i].iov_len)
                pos += iov[i].iov_len
        return 0

    cdef ssize_t decompress_bounded(self, const uint8_t *src, size_t size, uint8_t *dst,
                                    size_t cap) except -1:
        out = self._inflate(src, size, cap, "a chunk may hold")
        memcpy(dst, <const uint8_t *>(<bytes>out), len(out))
        return len(out)

    cdef bytes _inflate(self, const uint8_t *src, size_t size, size_t limit, str what):
        """At most ``limit`` bytes from one packet; more (or a stream that ends) raises."""
        if self.compressing:
            raise ValueError("this zlib stream compresses")
        try:
            out = self.stream.decompress(<uint8_t[:size]><uint8_t *>src, limit + 1)
        except self.error as exc:
            raise inflate_error(0, limit, f"inflate failed: {exc}") from None
        if len(out) > limit or self.stream.unconsumed_tail:
            raise inflate_error(limit + 1, limit, f"inflates to more than {what}")
        if self.stream.eof:
            raise inflate_error(len(out), limit, "the zlib stream ended, channels never end it")
        return out


cdef size_t store_blocks(const uint8_t *data, size_t size, uint8_t *out) noexcept nogil:
    """``data`` as deflate stored blocks (not final) at ``out``; returns the bytes written."""
    cdef size_t pos = 0, written = 0, take
    while pos < size:
        take = min(size - pos, <size_t>STORED_BLOCK_MAX)
        out[written] = 0                                # BFINAL 0, BTYPE 00, byte-aligned
        out[written + 1] = take & 0xFF                  # LEN, then NLEN, little-endian
        out[written + 2] = take >> 8
        out[written + 3] = ~take & 0xFF
        out[written + 4] = (~take >> 8) & 0xFF
        memcpy(out + written + 5, data + pos, take)
        written += 5 + take
        pos += take
    return written


cdef bint isal_available():
    """True when python-isal is installed (fast zlib-format compression)."""
    try:
        import isal.isal_zlib  # noqa: F401
    except ImportError:
        return False
    return True


# The method each compression flag of a RAM packet names (spec §2.4).
COMPRESSION_NAMES = {0: "none", FLAG_ZLIB: "zlib", FLAG_ZSTD: "zstd"}


def make_codec(str method, bint compressing, int level=1, bint use_isal=True):
    """The codec for ``method`` ("zlib" or "zstd"), or None for "none"; zlib
    runs on ISA-L when python-isal is installed (and ``use_isal``). "auto" is
    zstd, ``level`` ignored: its send engine picks per packet whether (and at
    which level) the codec compresses (_adaptive.pxi)."""
    if method == "none":
        return None
    if method == "zlib":
        if use_isal and isal_available():
            return IsalZlibCodec(compressing, level)
        return ZlibCodec(compressing, level)
    if method == "zstd":
        return ZstdCodec(compressing, level)
    if method == "auto":
        return ZstdCodec(compressing)       # the send engine sets each packet's level
    raise ValueError(f"unknown compression method {method!r}")
