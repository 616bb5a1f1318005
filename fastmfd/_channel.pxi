# The per-channel engines the worker processes run (DESIGN §3).
#
#   source main process                      send worker (one per channel)
#     ChannelSelector.select() ─┐              SendEngine.run(cmd_fd):
#     page indices -> mailbox   ├─ Command ──▶   RAM job: zero scan, compress,
#     device chunk -> pool slot ┘  (pipe)        frame, writev from the region
#                                                SYNC, device chunk, QUIT
#
#   destination                              receive worker (one per channel)
#     RecvEngine.run() returns at each SYNC and at EOF; RAM payloads are
#     read (or inflated) straight into the region; device chunks land in a
#     pool slot and their descriptor goes down the reassembly pipe.
#
# A Command is a fixed 32-byte record, so several threads of the source main
# process can write commands to one worker's pipe without locks (writes of
# at most PIPE_BUF bytes to a pipe are atomic). The per-channel counters live
# in a shared Counters segment (_shared.pxi) so either main process reads
# live totals without asking its workers.

# ---------------------------------------------------------------- pipe records

# Commands and descriptors cross their pipes as raw structs (_core.pxd); the
# readers take them in these sizes.
if sizeof(Command) != 32 or sizeof(Descriptor) != DESCRIPTOR_SIZE:
    raise ImportError("fastmfd._core: a pipe record has an unexpected size")


def pack_command(uint32_t kind, uint32_t target=0, uint32_t count=0, uint32_t slot=0,
                 uint64_t round=0):
    """The 32-byte record for a worker's command pipe (``kind`` is a CMD_*)."""
    cdef Command cmd = Command(kind=kind, target=target, count=count, slot=slot, round=round,
                               reserved=0)
    return (<char *>&cmd)[:sizeof(cmd)]


def pack_descriptor(uint32_t device, uint32_t idx, uint32_t flags, uint32_t slot,
                    uint32_t length, uint32_t channel):
    """The 24-byte record announcing a device chunk in a pool slot."""
    cdef Descriptor desc = Descriptor(device=device, idx=idx, flags=flags, slot=slot,
                                      length=length, channel=channel)
    return (<char *>&desc)[:sizeof(desc)]


def unpack_descriptors(const uint8_t[::1] data):
    """Descriptors read from the reassembly pipe: a list of 6-tuples
    ``(device, idx, flags, slot, length, channel)``."""
    cdef size_t i, n = data.shape[0] // sizeof(Descriptor)
    cdef const Descriptor *d = <const Descriptor *>&data[0] if n else NULL
    if data.shape[0] % sizeof(Descriptor):
        raise ValueError(f"{data.shape[0]} bytes are not whole descriptors")
    return [(d[i].device, d[i].idx, d[i].flags, d[i].slot, d[i].length, d[i].channel)
            for i in range(n)]


cdef inline void bump(uint64_t *row, int field, uint64_t by) noexcept nogil:
    # Add to a Counters field (ST_*). One writer per row: a plain atomic store keeps readers consistent.
    fm_store64(&row[field], row[field] + by)


cdef double socket_timeout(int fd, int option) noexcept:
    """The socket's SO_SNDTIMEO or SO_RCVTIMEO in seconds (0: none)."""
    cdef timeval tv
    cdef socklen_t size = sizeof(tv)
    if getsockopt(fd, SOL_SOCKET, option, &tv, &size) != 0:
        return 0
    return tv.tv_sec + tv.tv_usec * 1e-6


# ---------------------------------------------------------------- regions as the engines see them

cdef bint sparse_on_tmpfs(int fd) except -1:
    """Whether the file ``fd`` is on tmpfs and has holes now: only there does a
    read of a hole allocate it (and SEEK_DATA elsewhere may not know of data
    still in the page cache: FUSE does not flush first); and a file with none
    (tmpfs counts every page it holds) is not worth an lseek, which walks the
    page cache to the end of an extent, once per channel and round."""
    st = os.fstat(fd)
    return on_tmpfs(fd) and st.st_blocks * 512 < st.st_size


cdef class _RegionTable:
    """The session's regions, in SETUP order, as C pointers (kept mapped by ``keep``)."""

    def __cinit__(self, regions, received=None, fresh=None, sparse=None,
                  uint32_t page_size=0, place_fds=None, hole_fds=None):
        cdef const uint8_t[::1] view        # a source's may be read-only (Region.read_only)
        cdef DirtyBitmap bm
        regions = list(regions)
        self.uffd = -1
        self.keep = regions + list(received or [])
        self.count = len(regions)
        self.refs = <RegionRef *>PyMem_Calloc(max(1, self.count), sizeof(RegionRef))
        self.entries = <RegionEntry *>PyMem_Calloc(max(1, self.count), sizeof(RegionEntry))
        if self.refs == NULL or self.entries == NULL:
            raise MemoryError(f"cannot allocate "
                              f"{self.count * (sizeof(RegionRef) + sizeof(RegionEntry))} bytes "
                              f"of region table ({self.count} regions, from SETUP)")
        for i, region in enumerate(regions):
            view = region.buffer
            raw = encode_name(region.name, "region name")
            self.refs[i].base = <uint8_t *>&view[0]
            self.refs[i].size = view.shape[0]
            self.refs[i].writable = not region.read_only
            memcpy(self.refs[i].name, <const char *>raw, len(raw))
            self.refs[i].name_len = len(raw)
            memcpy(self.entries[i].name, <const char *>raw, len(raw))
            self.entries[i].size = view.shape[0]
            self.refs[i].holes.fd = -1
            if hole_fds is not None and hole_fds[i] >= 0 and sparse_on_tmpfs(hole_fds[i]):
                self.refs[i].holes.fd = hole_fds[i]
            forget_extents(&self.refs[i].holes)
            # How to populate it (populate_for_write): known where the worker
            # opened its file (for its holes, or to place pages into).
            file_fd = (hole_fds[i] if hole_fds is not None and hole_fds[i] >= 0
                       else place_fds[i] if place_fds is not None else -1)
            self.refs[i].populate_read = file_fd >= 0 and on_tmpfs(file_fd)
            if received is not None:
                bm = received[i]
                # The engine indexes it in the session's pages: a region of larger
                # pages has a map too small for them.
                if bm.hdr.npages * <uint64_t>(page_size or region.page_size) < view.shape[0]:
                    raise ValueError("received map smaller than its region")
                self.refs[i].received = bm.words
                self.refs[i].fresh = fresh[i]
            # A hole is punched a system page at a time: a smaller page is zero-filled.
            self.refs[i].sparse = (sparse is not None and sparse[i]
                                   and region.page_size % SYSTEM_PAGE == 0)
            if (place_fds is not None and place_fds[i] >= 0 and received is not None
                    and region.page_size % SYSTEM_PAGE == 0):
                self.refs[i].place = self.placing_mapping(place_fds[i], view.shape[0])

    cdef void forget_holes(self) noexcept:
        """Drop the holes learnt: at a round's end, after which the regions change."""
        cdef int i
        for i in range(self.count):
            forget_extents(&self.refs[i].holes)

    cdef uint8_t *placing_mapping(self, int fd, size_t size) noexcept:
        """A second mapping of the file ``fd`` registered for placing pages
        (includes/placing.h), or NULL where userfaultfd or the file's file
        system cannot (the engine then writes through the region's mapping)."""
        cdef void *mapped
        if not self.tried_placing:
            self.tried_placing = True
            self.uffd = fm_place_open()
        if self.uffd < 0:
            return NULL
        mapped = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if mapped == MAP_FAILED:
            return NULL
        if fm_place_register(self.uffd, mapped, size) != 0:
            munmap(mapped, size)
            return NULL
        return <uint8_t *>mapped

    def __dealloc__(self):
        if self.refs != NULL:
            for i in range(self.count):
                if self.refs[i].place != NULL:
                    munmap(self.refs[i].place, self.refs[i].size)
        if self.uffd >= 0:
            close_fd(self.uffd)
        PyMem_Free(self.refs)
        PyMem_Free(self.entries)


cdef class _EngineBase:
    """What both engines share: the socket, the layout, the codec, counters."""

    cdef void *alloc(self, size_t size, str what, str fields) except NULL:
        """``size`` bytes (PyMem, counted in buffer_bytes), or a MemoryError
        naming ``what`` they were for and the SETUP ``fields`` that sized them."""
        cdef void *p = PyMem_Malloc(size if size else 1)
        if p == NULL:
            raise MemoryError(f"cannot allocate {size} bytes of {what} ({fields})")
        self.buffer_bytes += size
        return p

    cdef int _setup(self, int fd, uint32_t channel, dict params, object codec, list regions,
                    Counters counters, BufferPool pool, list devices, object received,
                    object fresh, TLSChannel tls, object sparse=None,
                    object place_fds=None, object hole_fds=None) except -1:
        cdef uint32_t pp = params["packet_pages"]
        comp_flag = 0 if codec is None else (<Codec>codec).flag
        ram_layout_init(&self.lay, pp, params["page_size"], params.get("layout", LAYOUT_CURRENT),
                        comp_flag, 0, params.get("checksum", False), params.get("auto", False))
        self.link.fd = fd
        self.link.ssl = NULL
        self.link.err[0] = 0
        if tls is not None:
            if tls.ssl == NULL or tls.fd != fd:
                raise ValueError(f"the TLS channel runs on fd {tls.fd}, "
                                 f"not on the engine's fd {fd}")
            self.tls = tls
            self.link.ssl = tls.ssl
            self.link.staging = <uint8_t *>self.alloc(TLS_STAGING_SIZE, "TLS staging buffer",
                                                      "fixed size")
            self.link.staging_cap = TLS_STAGING_SIZE
        self.channel = channel
        self.codec = codec
        self.regions = _RegionTable(regions, received, fresh, sparse, self.lay.page_size,
                                    place_fds, hole_fds)
        self.counters = counters
        self.stats = counters.row(channel)
        self.pool = pool
        self.device_names = [(encode_name(idstr, "idstr"), inst) for idstr, inst in devices]
        largest = max([self.regions.refs[i].size for i in range(self.regions.count)] or [0])
        sizes = channel_buffers(pp, self.lay.page_size, largest, params.get("chunk_size", 0),
                                pool is not None, False)
        self.packet_cap = sizes.pages
        # A compressed payload is read whole into scratch: no larger than it holds.
        self.lay.max_payload = ram_max_payload(sizes.pages, self.lay.page_size)
        self.scratch_cap = sizes.scratch
        fields = packet_fields(pp, self.lay.page_size, sizes.pages)
        self.header = <uint8_t *>self.alloc(sizes.header, "packet header buffer",
                                            f"packet_pages {pp}, from SETUP")
        self.scratch = <uint8_t *>self.alloc(
            sizes.scratch, "packet buffer", fields + (
                f"; device_chunk_size {params.get('chunk_size', 0)}" if pool is not None
                else ""))
        self.iov = <iovec *>self.alloc(sizes.iov, "packet I/O vector", fields)
        self.normal = <uint64_t *>self.alloc(sizes.offsets, "page offsets", fields)
        self.zero = <uint64_t *>self.alloc(sizes.offsets, "zero page offsets", fields)
        return 0

    def __dealloc__(self):
        PyMem_Free(self.link.staging)
        PyMem_Free(self.header)
        PyMem_Free(self.scratch)
        PyMem_Free(self.iov)
        PyMem_Free(self.normal)
        PyMem_Free(self.zero)

    cdef int check_io(self, ssize_t rc, size_t want, str what, bint sending=False) except -1:
        """Raise for a failed or short transfer of ``want`` bytes (rc: bytes or -errno).

        The socket's timeout (the session's stall_timeout, set by the main
        process) ends a transfer that made no progress for that long with
        EAGAIN, in plain and TLS transfers alike."""
        cdef bytes reason
        if rc == -EAGAIN:
            raise MigrationError(
                f"{what}: no progress for "
                f"{socket_timeout(self.link.fd, SO_SNDTIMEO if sending else SO_RCVTIMEO):g} s ("
                + ("the peer takes no data)" if sending else "no data arrives)"))
        if rc < 0:
            if rc == -EPROTO and self.link.err[0]:
                reason = self.link.err      # OpenSSL's reason (_tls.pxi)
                raise OSError(EPROTO, f"{what}: TLS: {reason.decode(errors='replace')}")
            raise OSError(-rc, f"{what}: {strerror(-rc).decode()}")
        if <size_t>rc != want:
            # The peer ended its stream inside a packet (only a read is short:
            # transfer_all), as the main channel's reader says a message cut short.
            raise ConnectionClosed(f"connection closed after {rc} of {want} bytes of {what}",
                                   field="length", received=rc, expected=want)
        return 0


cdef uint32_t packet_crc(uint32_t chain, const uint8_t *header, size_t header_size,
                         const iovec *iov, size_t n) noexcept nogil:
    """CRC-32 of a packet as sent, its header (checksum field zero) then its
    payload, continuing ``chain``: the CRC of the channel's packets before it.

    The header counts as much as the payload: a flipped offset or region name
    would put intact pages in the wrong place, a flipped idstr or size would
    give a device another device's bytes. The chain makes each CRC cover the
    channel's order too: a packet lost, repeated or moved within the channel
    fails, and a compressed channel is one stream, whose packets inflated out
    of order give wrong pages with no error from the decompressor."""
    cdef unsigned long crc = crc32(chain, header, <unsigned int>header_size)
    cdef size_t i, done, take
    for i in range(n):
        done = 0
        while done < iov[i].iov_len:
            take = min(iov[i].iov_len - done, <size_t>(1 << 30))
            crc = crc32(crc, <const unsigned char *>iov[i].iov_base + done, <unsigned int>take)
            done += take
    return <uint32_t>crc


# ---------------------------------------------------------------- pacing

cdef void pacer_init(Pacer *p, double rate) noexcept nogil:
    p.rate = rate
    p.tokens = 0
    p.last = monotonic()


cdef void pace(Pacer *p, size_t nbytes) noexcept nogil:
    """Hold the channel to ``p.rate``: take ``nbytes`` from the bucket and sleep off
    any debt. The bucket refills at the rate since the last call but holds at
    most the packet at hand, so the channel is never more than one packet ahead
    of its rate, however long it was idle: smooth, packet by packet."""
    cdef double now, debt
    cdef timespec req, rem
    if p.rate <= 0:
        return
    now = monotonic()
    p.tokens = min(<double>nbytes, p.tokens + (now - p.last) * p.rate)
    p.last = now
    p.tokens -= nbytes
    if p.tokens < 0:
        debt = -p.tokens / p.rate
        req.tv_sec = <time_t>debt
        req.tv_nsec = <long>((debt - req.tv_sec) * 1e9)
        while nanosleep(&req, &rem) != 0 and errno == EINTR:
            req = rem


# ---------------------------------------------------------------- send

cdef class SendEngine(_EngineBase):
    """Runs one send channel: executes the commands that arrive on ``cmd_fd``.

    ``params`` holds the session's page_size, packet_pages, zero_page_detection
    and checksum; with ``auto`` (compression="auto", ``codec`` a ZstdCodec) each
    payload goes raw or compressed as _adaptive.pxi decides, measuring the
    link unless ``measure_link`` is False (a peer on this host), within the
    pacer's ``rate``; ``regions`` are attached Region objects in SETUP order;
    ``mailbox`` a writable buffer of at least job_pages u64 page indices that
    the main process fills before each RAM command (with KNOWN_ZERO_PAGE set:
    a zero page that zero_page_detection lists unread); ``selector`` the selector
    this channel belongs to (released after each RAM or device job).
    ``hole_fds`` (per region, an fd of its file or -1): a page in a hole of a
    file on tmpfs is a zero page, listed unread (a read would allocate it in
    the user's sparse file, and be a SIGBUS where its file system is full);
    the holes are learnt afresh each round. A page that must be read although
    it lies in a hole (no zero page detection; a page larger than a system page
    partly in one) is populated first: a clean error where the file system is
    full.
    """

    def __cinit__(self, int fd, uint32_t channel, dict params, codec, list regions,
                  Counters counters, ChannelSelector selector, uint32_t selector_index,
                  mailbox, BufferPool pool=None, list devices=None, TLSChannel tls=None,
                  list hole_fds=None):
        cdef const uint8_t[::1] box = mailbox
        self._setup(fd, channel, params, codec, regions, counters, pool, devices or [],
                    None, None, tls, None, None, hole_fds)
        self.selector = selector
        self.selector_index = selector_index
        self.mailbox_keep = box
        self.mailbox = <const uint64_t *>&box[0]
        self.mailbox_cap = box.shape[0] // 8
        self.zero_detection = params["zero_page_detection"]
        pacer_init(&self.pacer, params.get("rate", 0.0))
        self.auto = params.get("auto", False)
        if self.auto and not isinstance(codec, ZstdCodec):
            raise ValueError("compression auto compresses with zstd")
        auto_init(&self.choice, params.get("rate", 0.0), params.get("measure_link", True))

    def run(self, int cmd_fd):
        """Execute commands until QUIT (then half-close the socket and return)."""
        cdef Command cmd
        cdef ssize_t got
        while True:
            with nogil:
                got = read_exact(cmd_fd, &cmd, sizeof(Command))
            if got != sizeof(Command):
                raise EOFError("the command pipe closed: the main process is gone")
            if cmd.kind == CMD_RAM:
                self.send_ram(cmd.target, cmd.count)
                bump(self.stats, ST_JOBS, 1)
                self.selector.release_channel(self.selector_index)
            elif cmd.kind == CMD_DEVICE:
                self.send_device(cmd.target, cmd.slot, cmd.count)
                bump(self.stats, ST_JOBS, 1)
                self.selector.release_channel(self.selector_index)
            elif cmd.kind == CMD_SYNC:
                self.send_packet(FLAG_SYNC, 0, NULL, 0, 0, 0)
                bump(self.stats, ST_SYNCS, 1)
                self.regions.forget_holes()         # the workload writes on
            elif cmd.kind == CMD_QUIT:
                with nogil:
                    link_close_write(&self.link)
                return
            else:
                raise ValueError(f"unknown command {cmd.kind}")

    cdef int send_ram(self, uint32_t region, uint32_t count) except -1:
        cdef RegionRef *ref
        cdef uint32_t start = 0, m, i, nn, nz
        cdef uint64_t page, off, npages, known_zero
        cdef uint32_t psize = self.lay.page_size
        cdef PageExtent where
        cdef int failed = 0
        if region >= <uint32_t>self.regions.count or count > self.mailbox_cap:
            raise ValueError(f"bad RAM job: region {region}, {count} pages")
        ref = &self.regions.refs[region]
        npages = ref.size // psize
        while start < count:
            m = min(count - start, self.packet_cap)     # what the buffers hold
            nn = 0
            nz = 0
            with nogil:
                for i in range(m):
                    page = self.mailbox[start + i]
                    known_zero = page & KNOWN_ZERO_BIT
                    page &= ~KNOWN_ZERO_BIT
                    if page >= npages:
                        break
                    off = page * psize
                    where = PAGE_HOLE if known_zero else page_extent(ref, off, psize)
                    if self.zero_detection and where == PAGE_HOLE:
                        self.zero[nz] = off
                        nz += 1
                        continue
                    if where != PAGE_DATA and ref.writable:
                        # It is read (here, or as it is sent) where it lies in a hole,
                        # which a read allocates: populated first, so that a full
                        # file system is a clean error, not a SIGBUS. (Only without
                        # zero page detection, or for a page larger than a system
                        # page partly in a hole; a read-only mapping cannot be.)
                        failed = populate_range(ref.base + off, psize, ref.populate_read)
                        if failed:
                            break
                    if self.zero_detection and fm_buffer_is_zero(ref.base + off, psize):
                        self.zero[nz] = off
                        nz += 1
                    else:
                        self.normal[nn] = off
                        nn += 1
            if failed:
                raise_unpopulated(failed, f"region {ref.name.decode()}")
            if nn + nz != m:
                raise ValueError(f"RAM job lists page {page} outside region {ref.name.decode()}")
            # A packet of a fixed method carries its bit even with zero pages only.
            self.send_packet(0 if self.auto else self.lay.comp_flag, region, ref.base, nn, nz, 1)
            start += m
        return 0

    cdef int send_packet(self, uint32_t flags, uint32_t region, uint8_t *base, uint32_t nn,
                         uint32_t nz, bint ram) except -1:
        """Frame and write one RAM packet: normal pages self.normal[:nn] (byte
        offsets from base), zero pages self.zero[:nz]; with nn == nz == 0 a SYNC."""
        cdef size_t k = 1, raw = <size_t>nn * self.lay.page_size
        cdef ssize_t payload = raw
        cdef const uint8_t *blob
        cdef ssize_t rc
        cdef RegionRef *ref = &self.regions.refs[region] if ram else NULL
        cdef uint64_t num = fm_fetch_add64(&self.counters.hdr.packet_num, 1)
        if nn:
            k += pages_to_iov(self.iov + 1, base, self.normal, nn, self.lay.page_size)
            blob = self.compress(self.iov + 1, k - 1, raw, &payload)
            if blob != NULL:
                flags |= self.lay.comp_flag
                self.iov[1].iov_base = <void *>blob
                self.iov[1].iov_len = payload
                k = 2
            elif self.lay.checksum:
                # The CRC must cover the bytes sent, and a live workload may rewrite
                # a page between the CRC and the writev: both read one copy.
                with nogil:
                    gather_iov(self.iov + 1, k - 1, self.scratch)
                self.iov[1].iov_base = self.scratch
                self.iov[1].iov_len = raw
                k = 2
        ram_encode(&self.lay, self.header, flags, num,
                   ref.name if ref != NULL else NULL, ref.name_len if ref != NULL else 0,
                   self.normal, nn, self.zero, nz, <uint32_t>(payload if nn else 0), 0)
        if self.lay.checksum:
            self.crc_chain = packet_crc(self.crc_chain, self.header, self.lay.header_size,
                                        self.iov + 1, k - 1)
            st64(self.header + RAM_CHECKSUM_AT, self.crc_chain)
        self.iov[0].iov_base = self.header
        self.iov[0].iov_len = self.lay.header_size
        rc = self.write_packet(self.iov, k, self.lay.header_size + (payload if nn else 0))
        bump(self.stats, ST_PACKETS, 1)
        bump(self.stats, ST_NORMAL, nn)
        bump(self.stats, ST_ZERO, nz)
        bump(self.stats, ST_WIRE, rc)
        return 0

    cdef const uint8_t *compress(self, iovec *iov, size_t n, size_t raw,
                                 ssize_t *size) except? NULL:
        """The payload ``iov[:n]`` (``raw`` bytes) compressed, its size in ``size``;
        NULL when it goes raw (no codec, or auto chose raw). Counts which."""
        cdef const uint8_t *blob = NULL
        cdef int index
        cdef double started
        if self.codec is not None and not self.auto:
            size[0] = self.codec.compress_iov(iov, n, raw, &blob)
        elif self.auto:
            index = auto_pick(&self.choice)
            if index >= 0:
                (<ZstdCodec>self.codec).set_level(AUTO_LEVEL[index])
                started = monotonic()
                size[0] = self.codec.compress_iov(iov, n, raw, &blob)
                auto_compressed(&self.choice, index, raw, size[0], monotonic() - started)
        bump(self.stats, ST_RAW if blob == NULL else ST_COMPRESSED, 1)
        return blob

    cdef ssize_t write_packet(self, iovec *iov, size_t k, size_t size) except -1:
        """Write one packet of ``size`` bytes at the channel's pace; returns ``size``."""
        cdef ssize_t rc
        with nogil:
            pace(&self.pacer, size)
            if self.auto:
                auto_before_write(&self.choice, self.link.fd)
            rc = link_writev(&self.link, iov, k)
            if self.auto and rc == <ssize_t>size:
                auto_after_write(&self.choice, self.link.fd, size)
        self.check_io(rc, size, "send", True)
        return rc

    cdef int send_device(self, uint32_t device, uint32_t slot, uint32_t length) except -1:
        cdef iovec parts[3]
        cdef uint8_t trailer[DEVICE_CHECKSUM_SIZE]
        cdef size_t k = 2
        cdef const uint8_t *blob
        cdef ssize_t payload = length, rc
        cdef bytes idstr
        if self.pool is None or device >= len(self.device_names):
            raise ValueError(f"bad device job: device {device}")
        if slot >= self.pool.hdr.nslots or length > self.pool.hdr.slot_size or length < 12:
            raise ValueError(f"bad device job: slot {slot}, {length} bytes")
        idstr, instance_id = self.device_names[device]
        parts[1].iov_base = self.pool.slot_ptr(slot)
        parts[1].iov_len = length
        blob = self.compress(&parts[1], 1, length, &payload)
        if blob != NULL:
            parts[1].iov_base = <void *>blob
            parts[1].iov_len = payload
        device_encode(self.header, self.lay.comp_flag if blob != NULL else 0, idstr, len(idstr),
                      instance_id, <uint32_t>payload)
        parts[0].iov_base = self.header
        parts[0].iov_len = DEVICE_HEADER_SIZE
        if self.lay.checksum:
            # The device header has no spare field: the checksum follows the payload.
            self.crc_chain = packet_crc(self.crc_chain, self.header, DEVICE_HEADER_SIZE,
                                        &parts[1], 1)
            st64(trailer, self.crc_chain)
            parts[2].iov_base = trailer
            parts[2].iov_len = DEVICE_CHECKSUM_SIZE
            k = 3
        rc = self.write_packet(parts, k,
                               DEVICE_HEADER_SIZE + payload + (k - 2) * DEVICE_CHECKSUM_SIZE)
        self.pool.release_slot(slot)
        bump(self.stats, ST_DEVICE_PACKETS, 1)
        bump(self.stats, ST_DEVICE_BYTES, length)
        bump(self.stats, ST_WIRE, rc)
        return 0


# ---------------------------------------------------------------- receive

cdef class RecvEngine(_EngineBase):
    """Runs one receive channel: reads packets until a SYNC or the end.

    ``run()`` returns EVENT_SYNC after applying a SYNC packet (the caller
    holds the barrier, then calls ``run()`` again) and EVENT_EOF when the
    peer closed the connection at a packet boundary. Everything else —
    malformed packets, truncation, I/O errors — raises.

    With ``params["learn_compression"]`` (a QEMU stream: nothing announces
    its method) ``codec`` is None and the channel takes the method of its
    first packet with pages; every later packet must carry the same bits.

    ``received`` (one DirtyBitmap per region) records pages written (and
    not punched out since), so a listed zero page is only zeroed where older
    data may sit (``fresh`` regions started zero-filled); in a ``sparse``
    region (a sparse file mapped shared) it becomes a hole again
    (clear_page_runs). Device chunks go into slots of ``pool``; their
    descriptors are written to ``reassembly_fd``.

    ``place_fds`` (per region, an fd of its file or -1): fresh memory, whose
    pages are assembled in a buffer and placed with userfaultfd's UFFDIO_COPY
    (place_pages, includes/placing.h) instead of written through the
    mapping, which takes a fault and clears each page before the copy (two
    receivers of 512 MiB each into fresh /dev/shm: 0.63 CPU-s against 0.92,
    medians of 10 alternating runs). Where userfaultfd or the file's file
    system does not serve it, the region is written through its mapping.

    ``hole_fds`` (per region, an fd of its file or -1): memory not placed.
    Where it is not fresh, its file's holes, on tmpfs, are learnt
    (may_hold_data) so that a zero page sent for one is not read: the read
    would allocate it, and where the file system is full that is a SIGBUS.
    (On tmpfs an lseek walks the page cache to the end of the extent: a
    region of all data is walked once per round and channel.) Fresh or not,
    its file system says how its pages are populated (RegionRef.populate_read).
    """

    def __cinit__(self, int fd, uint32_t channel, dict params, codec, list regions,
                  Counters counters, list received, list fresh, BufferPool pool=None,
                  list devices=None, int reassembly_fd=-1, bint ram_allowed=True,
                  TLSChannel tls=None, list sparse=None, list place_fds=None,
                  list hole_fds=None):
        self._setup(fd, channel, params, codec, regions, counters, pool, devices or [],
                    received, fresh, tls, sparse, place_fds, hole_fds)
        self.reassembly_fd = reassembly_fd
        self.ram_allowed = ram_allowed
        self.learn_compression = params.get("learn_compression", False)
        if self.learn_compression and codec is not None:
            raise ValueError("a channel that learns its compression starts without a codec")
        self.device_index = {name: i for i, name in enumerate(self.device_names)}
        chunk = params.get("chunk_size", 0) + CHUNK_HEADER_SIZE
        self.max_device_payload = chunk if codec is None else min(
            self.scratch_cap, chunk + chunk // 8 + 65536)
        # Only compressed pages are inflated here before they are placed.
        if (codec is not None or self.learn_compression) and any(
                self.regions.refs[i].place != NULL for i in range(self.regions.count)):
            self.unpacked = <uint8_t *>self.alloc(
                <size_t>self.packet_cap * self.lay.page_size, "buffer for inflated pages",
                packet_fields(self.lay.packet_pages, self.lay.page_size, self.packet_cap))

    def __dealloc__(self):
        PyMem_Free(self.unpacked)      # the base class frees the rest after this

    def run(self):
        cdef ssize_t got
        cdef uint32_t flags
        while True:
            with nogil:
                got = link_read_exact(&self.link, self.header, 12)
            if got == 0:
                return EVENT_EOF
            self.check_io(got, 12, "packet header")
            flags = ld32(self.header + 8)
            if flags & FLAG_DEVICE_STATE and not self.lay.qemu72:
                self.recv_device()
            else:
                if not self.ram_allowed:
                    raise ProtocolError("RAM packet on a device-state channel",
                                        field="flags", received=hex(flags),
                                        expected="DEVICE_STATE (0x40)")
                if self.recv_ram():
                    self.regions.forget_holes()     # other channels write into them next
                    self.rounds += 1
                    bump(self.stats, ST_SYNCS, 1)
                    return EVENT_SYNC

    cdef bint recv_ram(self) except -1:
        """Read and apply one RAM packet; True when it carried SYNC."""
        cdef RamPacketInfo info
        cdef WireError err
        cdef RegionRef *ref
        cdef ssize_t got
        cdef size_t i, k = 0, raw
        cdef uint64_t off, page
        cdef uint32_t psize = self.lay.page_size
        cdef int failed, held
        cdef uint32_t compressed
        cdef size_t lone
        with nogil:
            got = link_read_exact(&self.link, self.header + 12, self.lay.header_size - 12)
        self.check_io(got, self.lay.header_size - 12, "RAM packet header")
        if self.learn_compression and ld32(self.header + 16):
            self.learn_method(ld32(self.header + 8))
        if ram_decode(&self.lay, self.regions.entries, self.regions.count, self.header, &info,
                      &err, self.hint) < 0:
            raise_wire_error(&err)
        bump(self.stats, ST_PACKETS, 1)
        bump(self.stats, ST_WIRE, self.lay.header_size)
        if self.lay.checksum:
            st64(self.header + RAM_CHECKSUM_AT, 0)      # the CRC was taken with it zero
            if not info.normal_pages:
                self.verify_crc("RAM packet", self.lay.header_size, NULL, 0, info.checksum)
        if info.region < 0:
            return info.flags & FLAG_SYNC
        self.hint = info.region
        ref = &self.regions.refs[info.region]
        for i in range(info.normal_pages):
            self.normal[i] = ld64(info.offsets + 8 * i)
        if info.normal_pages:
            raw = <size_t>info.normal_pages * psize
            k = pages_to_iov(self.iov, ref.base, self.normal, info.normal_pages, psize)
            # ram_decode let through only the session's bit, or none where
            # compression is optional ("auto"): the header says which.
            compressed = info.flags & self.lay.comp_flag
            bump(self.stats, ST_COMPRESSED if compressed else ST_RAW, 1)
            if ref.place == NULL:
                # A plain readv faults a lone page in as cheaply as a populate
                # call for writing would, and says EFAULT where no memory backs
                # it; a decompressor or TLS copies in C, where that would be a
                # SIGBUS: everything populated. Populated for reading (tmpfs), a
                # lone page brings its neighbours there along.
                lone = (SYSTEM_PAGE if not compressed and self.link.ssl == NULL
                        and not ref.populate_read else 0)
                with nogil:
                    failed = populate_for_write(self.iov, k, lone, ref.populate_read)
                if failed:
                    raise_unpopulated(failed, f"region {ref.name.decode()}")
            if not compressed and ref.place != NULL:
                with nogil:
                    got = link_read_exact(&self.link, self.scratch, raw)
                self.check_io(got, raw, "RAM payload")
                if self.lay.checksum:
                    self.iov[k].iov_base = self.scratch
                    self.iov[k].iov_len = raw
                    self.verify_crc("RAM packet", self.lay.header_size, &self.iov[k], 1,
                                    info.checksum)
                self.place_pages(ref, self.scratch, k)
            elif not compressed:
                with nogil:
                    got = link_readv(&self.link, self.iov, k)
                if got == -EFAULT:
                    raise_unpopulated(EFAULT, f"region {ref.name.decode()}")
                self.check_io(got, raw, "RAM payload")
                if self.lay.checksum:
                    k = pages_to_iov(self.iov, ref.base, self.normal, info.normal_pages, psize)
                    self.verify_crc("RAM packet", self.lay.header_size, self.iov, k,
                                    info.checksum)
            else:
                with nogil:
                    got = link_read_exact(&self.link, self.scratch, info.next_packet_size)
                self.check_io(got, info.next_packet_size, "RAM payload")
                if self.lay.checksum:
                    self.iov[k].iov_base = self.scratch
                    self.iov[k].iov_len = info.next_packet_size
                    self.verify_crc("RAM packet", self.lay.header_size, &self.iov[k], 1,
                                    info.checksum)
                if ref.place != NULL:
                    self.iov[k].iov_base = self.unpacked
                    self.iov[k].iov_len = raw
                    self.codec.decompress_iov(self.scratch, info.next_packet_size,
                                              &self.iov[k], 1)
                    self.place_pages(ref, self.unpacked, k)
                else:
                    self.codec.decompress_iov(self.scratch, info.next_packet_size, self.iov, k)
            bump(self.stats, ST_WIRE, got)
            with nogil:
                for i in range(info.normal_pages):
                    page = self.normal[i] // psize
                    fm_fetch_or64(&ref.received[page >> 6], (<uint64_t>1) << (page & 63))
        with nogil:
            k = 0
            held = 0
            for i in range(info.zero_pages):
                off = ld64(info.offsets + 8 * (info.normal_pages + i))
                if not ref.fresh and ref.received != NULL:
                    # Sent: where this region held bytes before the session, a page
                    # never sent is looked for at its end (check_every_page_came).
                    page = off // psize
                    fm_fetch_or64(&ref.received[page >> 6], (<uint64_t>1) << (page & 63))
                # A page that may hold data is read before it is cleared (QEMU
                # does too): most are zero already, and a write would dirty them all.
                held = may_hold_data(ref, off, psize)
                if held < 0:
                    break
                if held and not fm_buffer_is_zero(ref.base + off, psize):
                    self.zero[k] = off
                    k += 1
            if held >= 0:
                held = -clear_page_runs(ref, self.zero, k, psize)
        if held < 0:
            raise_unpopulated(-held, f"region {ref.name.decode()}")
        bump(self.stats, ST_NORMAL, info.normal_pages)
        bump(self.stats, ST_ZERO, info.zero_pages)
        return info.flags & FLAG_SYNC

    cdef int place_pages(self, RegionRef *ref, const uint8_t *pages, size_t k) except -1:
        """Place ``pages`` (the packet's, in order) where ``self.iov[:k]`` says in
        ``ref``, through its placing mapping; a page there already (written in
        an earlier round) is copied through the region's mapping instead."""
        cdef int failed
        with nogil:
            failed = place_runs(self.regions.uffd, ref, self.iov, k, pages, self.lay.page_size)
        if failed in (ENOSPC, ENOMEM, EFAULT, EDQUOT):
            raise_unpopulated(failed, f"region {ref.name.decode()}", "place")
        if failed:
            raise OSError(failed, f"region {ref.name.decode()}: placing pages: "
                                  f"{strerror(failed).decode()}")
        return 0

    cdef int learn_method(self, uint32_t flags) except -1:
        """The first packet with pages names the channel's compression (QEMU
        sets the bits only on those, spec §2.4); bits of no known method are
        left for ram_decode to refuse."""
        cdef uint32_t method = flags & (COMPRESSION_MASK_72 if self.lay.qemu72
                                        else COMPRESSION_MASK)
        if method in (0, FLAG_ZLIB, FLAG_ZSTD):
            self.codec = make_codec(COMPRESSION_NAMES[method], False)
            self.lay.comp_flag = method
            self.learn_compression = False
        return 0

    @property
    def compression(self):
        """The channel's method: "none", "zlib" or "zstd" (None: not learnt yet)."""
        if self.learn_compression:
            return None
        return COMPRESSION_NAMES[self.lay.comp_flag]

    cdef int verify_crc(self, str what, size_t header_size, const iovec *iov, size_t n,
                        uint64_t expected) except -1:
        """Check the packet in ``self.header`` (checksum field zero) and ``iov``,
        the next of the channel's chain."""
        cdef uint32_t crc
        with nogil:
            crc = packet_crc(self.crc_chain, self.header, header_size, iov, n)
        if crc != expected:
            raise ProtocolError(f"{what} field 'checksum': received {expected:#x}, "
                                f"expected {crc:#x} (CRC-32 of the header and payload, "
                                f"chained through the channel's packets: this one or one "
                                f"before it was damaged, lost or reordered)",
                                field="checksum", received=expected, expected=crc)
        self.crc_chain = crc
        return 0

    cdef int recv_device(self) except -1:
        cdef DeviceHeaderInfo info
        cdef WireError err
        cdef Descriptor desc
        cdef ssize_t got
        cdef int64_t slot
        cdef uint8_t *dst
        cdef size_t produced
        cdef uint32_t compressed = 0
        cdef iovec wire
        cdef uint8_t trailer[DEVICE_CHECKSUM_SIZE]
        with nogil:
            got = link_read_exact(&self.link, self.header + 12, DEVICE_HEADER_SIZE - 12)
        self.check_io(got, DEVICE_HEADER_SIZE - 12, "device state header")
        if device_decode(self.header, self.lay.comp_flag, self.lay.comp_optional, 0,
                         self.max_device_payload, &info, &err) < 0:
            raise_wire_error(&err)
        key = (<bytes>info.idstr, info.instance_id)
        device = self.device_index.get(key)
        if device is None:
            raise ProtocolError(f"device state packet for unknown device "
                                f"{info.idstr.decode(errors='replace')!r} instance "
                                f"{info.instance_id}", field="idstr",
                                received=info.idstr.decode(errors="replace"),
                                expected="a device of the session")
        if self.pool is None or self.reassembly_fd < 0:
            raise ProtocolError("device state packet in a session without devices",
                                field="flags", received="DEVICE_STATE", expected="RAM only")
        # max_device_payload bounds a compressed payload (read into scratch); one sent
        # raw (auto) is read straight into a slot, which holds one chunk and no more.
        if not (info.flags & self.lay.comp_flag) and \
                info.next_packet_size > self.pool.hdr.slot_size:
            raise ProtocolError(f"device state packet field 'next_packet_size': received "
                                f"{info.next_packet_size}, expected at most "
                                f"{self.pool.hdr.slot_size} for an uncompressed chunk",
                                field="next_packet_size", received=info.next_packet_size,
                                expected=f"<= {self.pool.hdr.slot_size}")
        slot = self.pool.acquire_slot(-1.0)
        try:
            dst = self.pool.slot_ptr(<uint32_t>slot)
            self.pool.back_slot(<uint32_t>slot)
            compressed = info.flags & self.lay.comp_flag
            wire.iov_base = self.scratch if compressed else dst
            wire.iov_len = info.next_packet_size
            with nogil:
                got = link_read_exact(&self.link, <uint8_t *>wire.iov_base, wire.iov_len)
            self.check_io(got, wire.iov_len, "device state payload")
            if self.lay.checksum:
                with nogil:
                    got = link_read_exact(&self.link, trailer, DEVICE_CHECKSUM_SIZE)
                self.check_io(got, DEVICE_CHECKSUM_SIZE, "device state checksum")
                self.verify_crc("device state packet", DEVICE_HEADER_SIZE, &wire, 1,
                                ld64(trailer))
                bump(self.stats, ST_WIRE, DEVICE_CHECKSUM_SIZE)
            if not compressed:
                produced = info.next_packet_size
            else:
                produced = self.codec.decompress_bounded(self.scratch, info.next_packet_size,
                                                         dst, self.pool.hdr.slot_size)
            if produced < CHUNK_HEADER_SIZE:
                raise ProtocolError(f"device chunk: {produced} bytes, shorter than its "
                                    f"{CHUNK_HEADER_SIZE}-byte header", field="length",
                                    received=produced, expected=f">= {CHUNK_HEADER_SIZE}")
            if chunk_decode(dst, &desc.idx, &desc.flags, &err) < 0:
                raise_wire_error(&err)
            desc.device = device
            desc.slot = <uint32_t>slot
            desc.length = <uint32_t>produced
            desc.channel = self.channel
            with nogil:
                got = write_exact(self.reassembly_fd, &desc, sizeof(Descriptor))
            self.check_io(got, sizeof(Descriptor), "reassembly pipe")
        except BaseException:
            self.pool.release_slot(<uint32_t>slot)
            raise
        bump(self.stats, ST_DEVICE_PACKETS, 1)
        bump(self.stats, ST_COMPRESSED if compressed else ST_RAW, 1)
        bump(self.stats, ST_DEVICE_BYTES, produced)
        bump(self.stats, ST_WIRE, DEVICE_HEADER_SIZE + info.next_packet_size)
        return 0
