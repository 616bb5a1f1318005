# Wire framing: the multifd channel header, init packet, RAM packet header,
# device-state packet header and device chunk header (DESIGN §4, spec §1-§3,
# §6). Encoders write into caller-owned buffers; decoders validate every field
# before anything is used and report a failure as a WireError, which the
# Python-facing wrappers turn into a ProtocolError naming the field, the value
# received and the value expected.

# Constants, the structs and the big-endian accessors are in _core.pxd.

# The RAM header layouts RamPacketCodec speaks (strings: they name a layout
# in inspect's output and options, they never go on the wire). "qemu-7.2"
# decodes what any QEMU source writes: 7.2's stale fields in empty packets are
# tolerated, and the zero-page list of QEMU >= 9.0 is read (7.2 leaves those
# bytes zero); it encodes 7.2's packets, which every QEMU reads.
LAYOUT_CURRENT = "current"
LAYOUT_QEMU72 = "qemu-7.2"


# ---------------------------------------------------------------- errors

cdef int wire_fail(WireError *err, const char *packet, const char *field,
                   const char *received, const char *expected) noexcept nogil:
    err.packet = packet
    err.field = field
    strncpy(err.received, received, 299)
    err.received[299] = 0
    strncpy(err.expected, expected, 299)
    err.expected[299] = 0
    return -1


cdef int wire_fail_u64(WireError *err, const char *packet, const char *field,
                       uint64_t received, const char *expected) noexcept nogil:
    cdef char text[32]
    snprintf(text, sizeof(text), "%llu", <unsigned long long>received)
    return wire_fail(err, packet, field, text, expected)


cdef int wire_fail_hex(WireError *err, const char *packet, const char *field,
                       uint64_t received, const char *expected) noexcept nogil:
    cdef char text[32]
    snprintf(text, sizeof(text), "0x%llx", <unsigned long long>received)
    return wire_fail(err, packet, field, text, expected)


cdef int raise_wire_error(WireError *err) except -1:
    received = printable(err.received.decode("utf-8", "backslashreplace"))   # a peer's name
    expected = err.expected.decode("utf-8", "backslashreplace")
    packet = err.packet.decode()
    field = err.field.decode()
    raise ProtocolError(f"{packet} field '{field}': received {received}, expected {expected}",
                        field=field, received=received, expected=expected)


cdef int check_preamble(const uint8_t *p, const char *packet, WireError *err) noexcept nogil:
    """The magic and version every multifd init, RAM and device-state packet opens with."""
    cdef uint32_t magic = ld32(p), version = ld32(p + 4)
    if magic != MULTIFD_MAGIC:
        return wire_fail_hex(err, packet, "magic", magic, "0x11223344")
    if version != MULTIFD_VERSION:
        return wire_fail_u64(err, packet, "version", version, "1")
    return 0


cdef object truncated(str what, size_t got, size_t size):
    return ProtocolError(f"{what} field 'length': received {got} bytes, expected {size} "
                         "(truncated)", field="length", received=got, expected=size)


cdef object too_small(str what, size_t got, size_t size):
    return ValueError(f"{what}: output buffer holds {got} bytes, needs {size}")


cdef inline const uint8_t *need(const uint8_t[::1] buf, size_t size, str what) except NULL:
    if <size_t>buf.shape[0] < size:
        raise truncated(what, buf.shape[0], size)
    return &buf[0]


cdef inline uint8_t *need_out(uint8_t[::1] buf, size_t size, str what) except NULL:
    if <size_t>buf.shape[0] < size:
        raise too_small(what, buf.shape[0], size)
    return &buf[0]


# RamPacketCodec.encode() and validate() run once per packet, where creating
# a typed memoryview costs more than encoding the header: they take their
# buffers through the buffer protocol directly. The caller of each get_*
# releases the view (PyBuffer_Release) once it returned.

cdef int get_bytes(object obj, Py_buffer *view, bint writable, size_t size,
                   str what) except -1:
    """The contiguous bytes of ``obj``, at least ``size`` of them."""
    cdef size_t got
    try:
        PyObject_GetBuffer(obj, view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
    except BufferError as exc:
        raise ValueError(f"{what}: {exc}") from None
    got = view.len
    if got < size:
        PyBuffer_Release(view)
        raise too_small(what, got, size) if writable else truncated(what, got, size)
    return 0


cdef inline bint is_uint64_vector(const Py_buffer *view) noexcept:
    return (view.ndim == 1 and view.itemsize == 8 and view.strides[0] == 8
            and (view.format[0] == c'L' or view.format[0] == c'Q') and view.format[1] == 0)


cdef int get_offsets(object values, Py_buffer *view) except -1:
    """``values`` as one dimension of native uint64: a numpy uint64 array as is."""
    if PyObject_CheckBuffer(values):
        PyObject_GetBuffer(values, view, PyBUF_FORMAT | PyBUF_STRIDES)
        if is_uint64_vector(view):
            return 0
        PyBuffer_Release(view)
    array = np.ascontiguousarray(values, dtype=np.uint64)
    if array.ndim != 1:
        raise ValueError(f"page offsets must be one-dimensional, not {array.ndim}-D")
    PyObject_GetBuffer(array, view, PyBUF_FORMAT | PyBUF_STRIDES)
    return 0


cdef int name_field(const uint8_t *field, bint must_terminate, char *out) noexcept nogil:
    """Copy a 256-byte NUL-padded name into out[256]; -1 when unterminated."""
    cdef size_t n = strnlen(<const char *>field, IDSTR_SIZE)
    if n == IDSTR_SIZE:
        if must_terminate:
            return -1
        n = MAX_NAME_LEN        # QEMU 7.2 forces byte 255 to NUL
    memcpy(out, field, n)
    out[n] = 0
    return 0


cdef bytes encode_name(object name, str what):
    cdef bytes raw = name.encode() if isinstance(name, str) else bytes(name)
    if len(raw) > MAX_NAME_LEN or b"\0" in raw:
        raise ValueError(f"{what} {name!r}: at most {MAX_NAME_LEN} bytes and no NUL")
    return raw


# ---------------------------------------------------------------- channel header (§4.1)

def encode_channel_header(uint8_t[::1] out, uint32_t channel_type):
    """Write the 12-byte channel header (BE u64 header_size = 4, BE u32 type)."""
    cdef uint8_t *p = need_out(out, CHANNEL_HEADER_SIZE, "channel header")
    if channel_type > CHANNEL_DEVICE_STATE:
        raise ValueError(f"unknown channel type {channel_type}")
    st64(p, CHANNEL_HEADER_BODY)
    st32(p + 8, channel_type)
    return CHANNEL_HEADER_SIZE


def decode_channel_header(const uint8_t[::1] data):
    """Validate a channel header and return its channel type."""
    cdef const uint8_t *p = need(data, CHANNEL_HEADER_SIZE, "channel header")
    cdef WireError err
    cdef uint64_t size = ld64(p)
    cdef uint32_t kind = ld32(p + 8)
    if size != CHANNEL_HEADER_BODY:
        wire_fail_u64(&err, "channel header", "header_size", size, "4")
        raise_wire_error(&err)
    if kind > CHANNEL_DEVICE_STATE:
        wire_fail_u64(&err, "channel header", "channel_type", kind,
                      "0 (main), 1 (postcopy), 2 (multifd) or 3 (device state)")
        raise_wire_error(&err)
    return kind


# ---------------------------------------------------------------- init packet (§4.2)

def encode_init_packet(uint8_t[::1] out, const uint8_t[::1] uuid, uint32_t channel_id):
    """Write the 64-byte MultiFDInit_t for ``channel_id`` of session ``uuid``."""
    cdef uint8_t *p = need_out(out, INIT_PACKET_SIZE, "init packet")
    if uuid.shape[0] != 16:
        raise ValueError("uuid must be 16 bytes")
    if channel_id > 255:
        raise ValueError(f"channel id {channel_id} does not fit the u8 id field")
    memset(p, 0, INIT_PACKET_SIZE)
    st32(p, MULTIFD_MAGIC)
    st32(p + 4, MULTIFD_VERSION)
    memcpy(p + 8, &uuid[0], 16)
    p[24] = <uint8_t>channel_id
    return INIT_PACKET_SIZE


def decode_init_packet(const uint8_t[::1] data, expected_uuid=None, channels=None):
    """Validate a MultiFDInit_t; return ``(uuid: bytes, channel_id: int)``.

    Checks magic, version, the UUID against ``expected_uuid`` and the id
    against the channel count (``id < channels``, not QEMU's off-by-one).
    """
    cdef const uint8_t *p = need(data, INIT_PACKET_SIZE, "init packet")
    cdef WireError err
    cdef uint32_t channel_id = p[24]
    if check_preamble(p, "init packet", &err) < 0:
        raise_wire_error(&err)
    uuid = bytes(data[8:24])
    if expected_uuid is not None and uuid != bytes(expected_uuid):
        raise ProtocolError(
            f"init packet field 'uuid': received {uuid.hex()}, expected "
            f"{bytes(expected_uuid).hex()} (the session's)",
            field="uuid", received=uuid.hex(), expected=bytes(expected_uuid).hex())
    if channels is not None and channel_id >= <uint32_t>channels:
        raise ProtocolError(
            f"init packet field 'id': received {channel_id}, expected < {channels} (channels)",
            field="id", received=channel_id, expected=f"< {channels}")
    return uuid, channel_id


# ---------------------------------------------------------------- RAM packet (§4.3)

cdef uint32_t ram_max_payload(uint32_t packet_pages, uint32_t page_size) noexcept nogil:
    # Largest compressed payload accepted: QEMU allocates 1 MiB receive
    # buffers; deflate/zstd never expand a packet by more than a small margin.
    cdef uint64_t raw = <uint64_t>packet_pages * page_size
    cdef uint64_t bound = raw + raw // 8 + 65536
    if bound < (1 << 20):
        bound = 1 << 20
    return <uint32_t>bound


cdef int ram_layout_init(RamLayout *lay, uint32_t packet_pages, uint32_t page_size, str layout,
                         uint32_t comp_flag, uint32_t extensions, bint checksum,
                         bint comp_optional) except -1:
    if packet_pages == 0 or packet_pages > 65536:
        raise ValueError(f"packet_pages {packet_pages} outside 1..65536")
    if page_size < 512 or page_size > (1 << 21) or (page_size & (page_size - 1)):
        raise ValueError(f"page_size {page_size} must be a power of two in 512..2 MiB")
    if <uint64_t>packet_pages * page_size > (1 << 30):
        raise ValueError("a packet may carry at most 1 GiB")
    if layout not in (LAYOUT_CURRENT, LAYOUT_QEMU72):
        raise ValueError(f"unknown layout {layout!r}")
    if comp_flag not in (0, FLAG_ZLIB, FLAG_ZSTD):
        raise ValueError(f"unknown compression flag {comp_flag:#x}")
    if extensions & ~(<uint32_t>FLAG_STORED):
        raise ValueError(f"unknown extension flags {extensions:#x}")
    lay.packet_pages = packet_pages
    lay.page_size = page_size
    lay.header_size = RAM_HEADER_FIXED + 8 * packet_pages
    lay.qemu72 = layout == LAYOUT_QEMU72
    lay.comp_flag = comp_flag
    lay.comp_optional = comp_optional
    lay.extensions = extensions
    lay.checksum = checksum
    lay.max_payload = ram_max_payload(packet_pages, page_size)
    if lay.qemu72 and (extensions or checksum or comp_optional):
        raise ValueError("the QEMU 7.2 layout has no fastmfd extensions")
    if comp_optional and comp_flag == 0:
        raise ValueError("optional compression needs a compression flag")
    return 0


cdef int ram_lookup_region(const RegionEntry *regions, int nregions, const char *name,
                           int hint) noexcept nogil:
    if 0 <= hint < nregions and strcmp(regions[hint].name, name) == 0:
        return hint
    for i in range(nregions):
        if strcmp(regions[i].name, name) == 0:
            return i
    return -1


cdef int ram_fail_page_count(WireError *err, const RamPacketInfo *out, uint64_t pages,
                             const char *name) noexcept nogil:
    """Refuse a packet listing more pages than its region's ``pages``: the count
    of normal pages if that alone is too many, else of zero pages."""
    cdef char text[300]
    if out.normal_pages > pages:
        snprintf(text, sizeof(text), "<= %llu (pages of region '%.200s')",
                 <unsigned long long>pages, name)
        return wire_fail_u64(err, "RAM packet", "normal_pages", out.normal_pages, text)
    snprintf(text, sizeof(text), "<= %llu (pages of region '%.200s' - normal_pages)",
             <unsigned long long>(pages - out.normal_pages), name)
    return wire_fail_u64(err, "RAM packet", "zero_pages", out.zero_pages, text)


cdef int ram_decode(const RamLayout *lay, const RegionEntry *regions, int nregions,
                    const uint8_t *p, RamPacketInfo *out, WireError *err,
                    int region_hint) noexcept nogil:
    """Validate the RAM packet header at p (lay.header_size bytes).

    With ``nregions < 0`` the region table is unknown and only page alignment
    of offsets is checked (inspecting a capture without its main channel).
    """
    cdef uint32_t flags = ld32(p + 8)
    cdef uint32_t comp_mask = COMPRESSION_MASK_72 if lay.qemu72 else COMPRESSION_MASK
    cdef uint32_t allowed = FLAG_SYNC | comp_mask | lay.extensions
    cdef uint32_t npages, i
    cdef uint64_t off, expect_size, limit, last, bits, highest
    cdef char name[256]
    cdef char text[300]         # as long as WireError.expected: may quote a region name
    if check_preamble(p, "RAM packet", err) < 0:
        return -1
    if flags & FLAG_DEVICE_STATE:
        return wire_fail_hex(err, "RAM packet", "flags", flags, "no DEVICE_STATE bit (0x40)")
    if flags & ~allowed:
        snprintf(text, sizeof(text), "only bits 0x%x", allowed)
        return wire_fail_hex(err, "RAM packet", "flags", flags, text)
    out.flags = flags
    out.pages_alloc = ld32(p + 12)
    out.normal_pages = ld32(p + 16)
    out.next_packet_size = ld32(p + 20)
    out.packet_num = ld64(p + 24)
    # Read in both layouts: 7.2 never writes these bytes (its unused[0], zero
    # from allocation), and a QEMU >= 9.0 source lists its zero pages here
    # whatever its machine type's compat properties make of the rest.
    out.zero_pages = ld32(p + 32)
    out.checksum = ld64(p + RAM_CHECKSUM_AT) if lay.checksum else 0
    out.ramblock = p + 64
    out.offsets = p + RAM_HEADER_FIXED
    out.region = -1
    if out.pages_alloc > lay.packet_pages:
        snprintf(text, sizeof(text), "<= %u (packet_pages)", lay.packet_pages)
        return wire_fail_u64(err, "RAM packet", "pages_alloc", out.pages_alloc, text)
    if out.normal_pages > out.pages_alloc:
        snprintf(text, sizeof(text), "<= %u (pages_alloc)", out.pages_alloc)
        return wire_fail_u64(err, "RAM packet", "normal_pages", out.normal_pages, text)
    if out.zero_pages > out.pages_alloc - out.normal_pages:
        snprintf(text, sizeof(text), "<= %u (pages_alloc - normal_pages)",
                 out.pages_alloc - out.normal_pages)
        return wire_fail_u64(err, "RAM packet", "zero_pages", out.zero_pages, text)
    if not lay.qemu72:
        # QEMU >= 10 zeroes the whole header before filling it; the fields
        # fastmfd does not use must be zero unless an extension claims them.
        if ld32(p + 36) or ld64(p + 48) or ld64(p + 56) or (not lay.checksum and ld64(p + RAM_CHECKSUM_AT)):
            return wire_fail(err, "RAM packet", "unused", "nonzero bytes", "all zero")
    npages = out.normal_pages + out.zero_pages
    if npages == 0:
        # A SYNC or empty packet. QEMU 7.2 leaves stale next_packet_size,
        # ramblock and offsets from the channel's previous packet: ignore them.
        # Its flags are not stale: senders leave the compression bits clear
        # (7.2, pure SYNCs) or set the session's, never another method's.
        if (flags & comp_mask) and (flags & comp_mask) != lay.comp_flag:
            snprintf(text, sizeof(text), "compression bits 0x%x or none", lay.comp_flag)
            return wire_fail_hex(err, "RAM packet", "flags", flags, text)
        if not lay.qemu72 and out.next_packet_size != 0:
            return wire_fail_u64(err, "RAM packet", "next_packet_size", out.next_packet_size,
                                 "0 in a packet without pages")
        return 0
    if not lay.qemu72 or out.normal_pages:
        # "auto" sessions decide per packet: the session's method or none.
        if ((flags & comp_mask) != lay.comp_flag
                and not (lay.comp_optional and not (flags & comp_mask))):
            snprintf(text, sizeof(text), "compression bits 0x%x%s", lay.comp_flag,
                     " or none (auto)" if lay.comp_optional else "")
            return wire_fail_hex(err, "RAM packet", "flags", flags, text)
    if name_field(p + 64, not lay.qemu72, name) < 0:
        return wire_fail(err, "RAM packet", "ramblock", "256 bytes without a NUL",
                         "a NUL-terminated name")
    # Payload size: raw pages, or a bounded compressed blob.
    expect_size = <uint64_t>out.normal_pages * lay.page_size
    if out.normal_pages == 0:
        if out.next_packet_size != 0 and not lay.qemu72:
            return wire_fail_u64(err, "RAM packet", "next_packet_size", out.next_packet_size,
                                 "0 in a zero-pages-only packet")
    elif not (flags & comp_mask) or (flags & FLAG_STORED):
        if out.next_packet_size != expect_size:
            snprintf(text, sizeof(text), "%llu (normal_pages * page_size)",
                     <unsigned long long>expect_size)
            return wire_fail_u64(err, "RAM packet", "next_packet_size", out.next_packet_size,
                                 text)
    elif out.next_packet_size == 0 or out.next_packet_size > lay.max_payload:
        snprintf(text, sizeof(text), "1..%u compressed bytes", lay.max_payload)
        return wire_fail_u64(err, "RAM packet", "next_packet_size", out.next_packet_size, text)
    limit = 0
    if nregions >= 0:
        out.region = ram_lookup_region(regions, nregions, name, region_hint)
        if out.region < 0:
            return wire_fail(err, "RAM packet", "ramblock", name, "a region of the session")
        limit = regions[out.region].size
    # Every offset must be page aligned and, with a region table, at most
    # the region's last page. One branch-free pass settles the usual case
    # (all fine); only a packet that fails is scanned again, in order, to
    # report its first bad offset.
    last = limit - lay.page_size if limit >= lay.page_size else 0
    bits = 0
    highest = 0
    for i in range(npages):
        off = ld64(out.offsets + 8 * <size_t>i)
        bits |= off
        highest = off if off > highest else highest
    if not (bits & (lay.page_size - 1)) and (
            nregions < 0 or (limit >= lay.page_size and highest <= last)):
        # No more pages than the region has (a page listed twice would do it): the
        # receive buffers hold what the largest region does (_channel.pxi), no more.
        if nregions >= 0 and npages > limit // lay.page_size:
            return ram_fail_page_count(err, out, limit // lay.page_size, name)
        return 0
    for i in range(npages):
        off = ld64(out.offsets + 8 * <size_t>i)
        if off & (lay.page_size - 1):
            snprintf(text, sizeof(text), "a multiple of the page size %u", lay.page_size)
            return wire_fail_hex(err, "RAM packet", "offset", off, text)
        if nregions >= 0 and (limit < lay.page_size or off > limit - lay.page_size):
            snprintf(text, sizeof(text), "< 0x%llx (size of region '%.200s')",
                     <unsigned long long>limit, name)
            return wire_fail_hex(err, "RAM packet", "offset", off, text)
    return 0


cdef size_t ram_encode(const RamLayout *lay, uint8_t *p, uint32_t flags, uint64_t packet_num,
                       const char *ramblock, size_t name_len,
                       const uint64_t *normal, uint32_t nnormal,
                       const uint64_t *zero, uint32_t nzero,
                       uint32_t next_packet_size, uint64_t checksum) noexcept nogil:
    """Fill a RAM packet header; the caller has checked the counts."""
    cdef uint32_t i
    cdef bint pure_sync = nnormal == 0 and nzero == 0
    memset(p, 0, lay.header_size)
    st32(p, MULTIFD_MAGIC)
    st32(p + 4, MULTIFD_VERSION)
    st32(p + 8, flags)
    # QEMU 7.2 always announces its full capacity; >= 9.0 sends 0 in a pure SYNC.
    st32(p + 12, lay.packet_pages if (lay.qemu72 or not pure_sync) else 0)
    st32(p + 16, nnormal)
    st32(p + 20, next_packet_size)
    st64(p + 24, packet_num)
    if not lay.qemu72:
        st32(p + 32, nzero)
        if lay.checksum:
            st64(p + RAM_CHECKSUM_AT, checksum)
    if name_len:
        memcpy(p + 64, ramblock, name_len)
    for i in range(nnormal):
        st64(p + RAM_HEADER_FIXED + 8 * <size_t>i, normal[i])
    for i in range(nzero):
        st64(p + RAM_HEADER_FIXED + 8 * <size_t>(nnormal + i), zero[i])
    return lay.header_size


cdef void copy_offsets(const uint8_t *wire, uint64_t[::1] out, uint32_t n) noexcept:
    cdef uint32_t i
    for i in range(n):
        out[i] = ld64(wire + 8 * <size_t>i)


cdef class RamPacket:
    """A decoded and validated RAM packet header."""

    @property
    def is_sync(self):
        return bool(self.flags & FLAG_SYNC)

    @property
    def stored(self):
        return bool(self.flags & FLAG_STORED)

    def __repr__(self):
        return (f"RamPacket(flags={self.flags:#x}, normal_pages={self.normal_pages}, "
                f"zero_pages={self.zero_pages}, packet_num={self.packet_num}, "
                f"ramblock={self.ramblock!r}, payload_size={self.payload_size})")


cdef class RamPacketCodec:
    """Encode and validate RAM packet headers of one layout.

    ``layout`` is ``"current"`` (QEMU >= 9.0, fastmfd's own) or ``"qemu-7.2"``;
    ``regions`` maps region names to sizes for the name and bounds checks
    (``None`` checks page alignment only); ``compression`` is the wire flag
    every data packet must carry (0, FLAG_ZLIB or FLAG_ZSTD), or may carry
    with ``compression_optional`` (an ``"auto"`` session: each packet says
    whether its payload is compressed); ``extensions``
    the negotiated fastmfd flag bits; ``checksum`` whether ``unused64[0]``
    carries a payload CRC-32.
    """

    def __cinit__(self, uint32_t packet_pages=128, uint32_t page_size=4096, str layout="current",
                  uint32_t compression=0, regions=None, uint32_t extensions=0,
                  bint checksum=False, bint compression_optional=False):
        ram_layout_init(&self.lay, packet_pages, page_size, layout, compression, extensions,
                        checksum, compression_optional)
        self.nregions = -1
        if regions is not None:
            items = list(dict(regions).items())
            self.regions = <RegionEntry *>PyMem_Calloc(max(1, len(items)), sizeof(RegionEntry))
            if self.regions == NULL:
                raise MemoryError()
            for i, (name, size) in enumerate(items):
                raw = encode_name(name, "region name")
                memcpy(self.regions[i].name, <const char *>raw, len(raw))
                self.regions[i].size = size
            self.nregions = len(items)

    def __dealloc__(self):
        PyMem_Free(self.regions)

    @property
    def header_size(self):
        return self.lay.header_size

    @property
    def packet_pages(self):
        return self.lay.packet_pages

    @property
    def page_size(self):
        return self.lay.page_size

    cdef int decode_into(self, const uint8_t *p, RamPacketInfo *info) except -1:
        cdef WireError err
        if ram_decode(&self.lay, self.regions, self.nregions, p, info, &err, self.hint) < 0:
            raise_wire_error(&err)
        if info.region >= 0:
            self.hint = info.region
        return 0

    def validate(self, data):
        """Check a header exactly as :meth:`decode` does; return normal + zero pages.

        The lean path for callers that only need to know the header is sound
        (and how many offsets it lists): no :class:`RamPacket`, no arrays.
        """
        # Test face: ram_decode as a receive worker runs it, measured and
        # fuzzed without a socket around it.
        cdef Py_buffer view
        cdef RamPacketInfo info
        get_bytes(data, &view, False, self.lay.header_size, "RAM packet header")
        try:
            self.decode_into(<const uint8_t *>view.buf, &info)
        finally:
            PyBuffer_Release(&view)
        return info.normal_pages + info.zero_pages

    def decode(self, data):
        """Validate a header (``header_size`` bytes) and return a :class:`RamPacket`."""
        cdef Py_buffer data_view
        cdef RamPacketInfo info
        cdef RamPacket pkt = RamPacket.__new__(RamPacket)
        cdef uint32_t i, n
        cdef char name[256]
        get_bytes(data, &data_view, False, self.lay.header_size, "RAM packet header")
        try:
            self.decode_into(<const uint8_t *>data_view.buf, &info)
            # The ramblock and the offsets point into the caller's buffer: copy
            # them out before it is released.
            n = info.normal_pages + info.zero_pages
            offsets = np.empty(n, dtype=np.uint64)
            copy_offsets(info.offsets, offsets, n)
            if n:
                name_field(info.ramblock, False, name)
                pkt.ramblock = name.decode("utf-8", "backslashreplace")
            else:
                pkt.ramblock = ""
        finally:
            PyBuffer_Release(&data_view)
        pkt.flags = info.flags
        pkt.pages_alloc = info.pages_alloc
        pkt.normal_pages = info.normal_pages
        pkt.zero_pages = info.zero_pages
        pkt.next_packet_size = info.next_packet_size
        pkt.packet_num = info.packet_num
        pkt.checksum = info.checksum
        pkt.offsets = offsets[:info.normal_pages]
        pkt.zero_offsets = offsets[info.normal_pages:]
        if info.normal_pages == 0:
            pkt.payload_size = 0
        elif not (info.flags & self.lay.comp_flag):
            pkt.payload_size = info.normal_pages * self.lay.page_size
        else:
            pkt.payload_size = info.next_packet_size
        return pkt

    cdef bytes ramblock_bytes(self, object ramblock):
        if ramblock is self.last_ramblock:
            return self.last_raw
        raw = encode_name(ramblock, "ramblock")
        if type(ramblock) is str or type(ramblock) is bytes:      # immutable: cacheable
            self.last_ramblock, self.last_raw = ramblock, raw
        return raw

    def encode(self, out, *, uint32_t flags=0, uint64_t packet_num=0,
               ramblock="", normal=(), zero=(), next_packet_size=None, uint64_t checksum=0):
        """Write a header; returns its size. ``next_packet_size`` defaults to the raw page bytes.

        ``normal`` and ``zero`` are page offsets: a numpy uint64 array is used
        as is, anything else is converted.
        """
        # Test face: senders frame RAM packets in C (SendEngine.send_packet);
        # this is ram_encode on its own, for golden bytes and built captures.
        cdef Py_buffer out_view, normal_view, zero_view
        cdef bint have_normal = False, have_zero = False
        cdef size_t nn = 0, nz = 0
        cdef uint32_t payload
        cdef bytes name = self.ramblock_bytes(ramblock)
        get_bytes(out, &out_view, True, self.lay.header_size, "RAM packet header")
        try:
            if normal is not ():
                get_offsets(normal, &normal_view)
                have_normal = True
                nn = normal_view.shape[0]
            if zero is not ():          # () is by far the usual zero list
                get_offsets(zero, &zero_view)
                have_zero = True
                nz = zero_view.shape[0]
            if nn + nz > self.lay.packet_pages:
                raise ValueError(f"{nn + nz} pages do not fit a packet of "
                                 f"{self.lay.packet_pages}")
            if nz and self.lay.qemu72:
                raise ValueError("the QEMU 7.2 layout cannot list zero pages")
            payload = nn * self.lay.page_size if next_packet_size is None else next_packet_size
            return ram_encode(&self.lay, <uint8_t *>out_view.buf, flags, packet_num,
                              name, len(name),
                              <const uint64_t *>normal_view.buf if nn else NULL, <uint32_t>nn,
                              <const uint64_t *>zero_view.buf if nz else NULL, <uint32_t>nz,
                              payload, checksum)
        finally:
            PyBuffer_Release(&out_view)
            if have_normal:
                PyBuffer_Release(&normal_view)
            if have_zero:
                PyBuffer_Release(&zero_view)


# ---------------------------------------------------------------- device state (§4.4)

cdef int device_decode(const uint8_t *p, uint32_t comp_flag, bint comp_optional,
                       uint32_t extensions, uint32_t max_payload, DeviceHeaderInfo *out,
                       WireError *err) noexcept nogil:
    cdef uint32_t flags = ld32(p + 8)
    cdef uint32_t allowed = FLAG_DEVICE_STATE | comp_flag | extensions
    cdef char text[64]
    if check_preamble(p, "device state packet", err) < 0:
        return -1
    if flags & FLAG_SYNC:
        return wire_fail_hex(err, "device state packet", "flags", flags, "no SYNC bit")
    if not (flags & FLAG_DEVICE_STATE) or (flags & ~allowed):
        snprintf(text, sizeof(text), "0x40 plus only bits 0x%x%s", comp_flag | extensions,
                 " or none (auto)" if comp_optional else "")
        return wire_fail_hex(err, "device state packet", "flags", flags, text)
    if ((flags & COMPRESSION_MASK) != comp_flag
            and not (comp_optional and not (flags & COMPRESSION_MASK))):
        snprintf(text, sizeof(text), "compression bits 0x%x%s", comp_flag,
                 " or none (auto)" if comp_optional else "")
        return wire_fail_hex(err, "device state packet", "flags", flags, text)
    if name_field(p + 12, True, out.idstr) < 0:
        return wire_fail(err, "device state packet", "idstr", "256 bytes without a NUL",
                         "a NUL-terminated idstr")
    out.flags = flags
    out.instance_id = ld32(p + 268)
    out.next_packet_size = ld32(p + 272)
    if out.next_packet_size == 0:
        return wire_fail_u64(err, "device state packet", "next_packet_size", 0,
                             "> 0 (an empty device state packet)")
    if out.next_packet_size > max_payload:
        snprintf(text, sizeof(text), "<= %u", max_payload)
        return wire_fail_u64(err, "device state packet", "next_packet_size",
                             out.next_packet_size, text)
    return 0


cdef void device_encode(uint8_t *p, uint32_t flags, const char *idstr, size_t idstr_len,
                        uint32_t instance_id, uint32_t next_packet_size) noexcept nogil:
    memset(p, 0, DEVICE_HEADER_SIZE)
    st32(p, MULTIFD_MAGIC)
    st32(p + 4, MULTIFD_VERSION)
    st32(p + 8, flags | FLAG_DEVICE_STATE)
    memcpy(p + 12, idstr, idstr_len)
    st32(p + 268, instance_id)
    st32(p + 272, next_packet_size)


def encode_device_header(uint8_t[::1] out, idstr, uint32_t instance_id,
                         uint32_t next_packet_size, uint32_t flags=0):
    """Write a 276-byte device-state packet header (0x40 is always set)."""
    # Test face: the library frames device packets in C (SendEngine); this
    # is device_encode on its own, so tests pin its bytes and build captures.
    cdef uint8_t *p = need_out(out, DEVICE_HEADER_SIZE, "device state header")
    cdef bytes raw = encode_name(idstr, "idstr")
    device_encode(p, flags, raw, len(raw), instance_id, next_packet_size)
    return DEVICE_HEADER_SIZE


def decode_device_header(const uint8_t[::1] data, uint32_t compression=0,
                         uint32_t extensions=0, uint32_t max_payload=1 << 30,
                         bint compression_optional=False):
    """Validate a device-state header; return ``(flags, idstr, instance_id, next_packet_size)``.

    With ``compression_optional`` (an ``"auto"`` session) the packet may carry
    ``compression`` or no compression bit."""
    cdef const uint8_t *p = need(data, DEVICE_HEADER_SIZE, "device state header")
    cdef DeviceHeaderInfo info
    cdef WireError err
    if device_decode(p, compression, compression_optional, extensions, max_payload, &info,
                     &err) < 0:
        raise_wire_error(&err)
    return (info.flags, info.idstr.decode("utf-8", "backslashreplace"), info.instance_id,
            info.next_packet_size)


cdef int chunk_decode(const uint8_t *p, uint32_t *idx, uint32_t *flags,
                      WireError *err) noexcept nogil:
    cdef uint32_t version = ld32(p)
    idx[0] = ld32(p + 4)
    flags[0] = ld32(p + 8)
    if version != CHUNK_VERSION:
        return wire_fail_u64(err, "device chunk", "version", version, "0")
    if idx[0] == CHUNK_IDX_INVALID:
        return wire_fail_hex(err, "device chunk", "idx", idx[0], "not 0xffffffff")
    if flags[0] & ~(<uint32_t>CHUNK_FLAG_LAST):
        return wire_fail_hex(err, "device chunk", "flags", flags[0], "only bit 0x1 (last)")
    return 0


cdef inline void chunk_encode(uint8_t *p, uint32_t idx, uint32_t flags) noexcept nogil:
    st32(p, CHUNK_VERSION)
    st32(p + 4, idx)
    st32(p + 8, flags)


def encode_chunk_header(uint8_t[::1] out, uint32_t idx, uint32_t flags=0):
    """Write the 12-byte chunk header (version 0, idx, flags) in front of chunk data."""
    cdef uint8_t *p = need_out(out, CHUNK_HEADER_SIZE, "chunk header")
    if idx == CHUNK_IDX_INVALID:
        raise ValueError("chunk idx 0xffffffff is reserved as invalid")
    chunk_encode(p, idx, flags)
    return CHUNK_HEADER_SIZE


def decode_chunk_header(const uint8_t[::1] data):
    """Validate a chunk header; return ``(idx, flags)``."""
    cdef const uint8_t *p = need(data, CHUNK_HEADER_SIZE, "device chunk")
    cdef uint32_t idx, flags
    cdef WireError err
    if chunk_decode(p, &idx, &flags, &err) < 0:
        raise_wire_error(&err)
    return idx, flags
