# Hot loops over pages, GIL released: zero-page detection, and scatter/gather
# I/O of a header plus a list of pages to or from a file descriptor, looping
# over partial transfers and EINTR. Adjacent pages are merged into one iovec,
# so a contiguous run of 128 pages costs one iovec, not 128.

cdef size_t pages_to_iov(iovec *iov, uint8_t *base, const uint64_t *offsets, size_t n,
                         size_t page_size) noexcept nogil:
    """Fill iov with the pages at byte ``offsets`` from ``base``; returns iovecs used (<= n)."""
    cdef size_t i, k = 0
    cdef uint8_t *page
    for i in range(n):
        page = base + offsets[i]
        if k and <uint8_t *>iov[k - 1].iov_base + iov[k - 1].iov_len == page:
            iov[k - 1].iov_len += page_size
        else:
            iov[k].iov_base = page
            iov[k].iov_len = page_size
            k += 1
    return k


cdef uintptr_t SYSTEM_PAGE = <uintptr_t>sysconf(_SC_PAGESIZE)


cdef int populate_for_write(const iovec *iov, size_t count, size_t skip_upto=0,
                            bint read=False) noexcept nogil:
    """Map the memory behind iov into this process ahead of writing it, one
    system call per run of pages (runs of at most ``skip_upto`` bytes left to
    the write that follows); returns 0, or the errno of a run that no memory
    can back. ``read``: the memory is a tmpfs file's (RegionRef.populate_read).

    A receive worker's first write to a region page takes a page fault each
    (shared mappings get no fault-around), and on fresh memory that fault
    overhead costs as much as clearing the page; MADV_POPULATE_WRITE maps a
    whole run in one kernel entry (a lone page gains nothing from it: the
    caller may leave runs of ``skip_upto`` bytes to a readv, which faults them
    in and says EFAULT where no memory backs them). It is also the check that
    the memory exists: regions and pools are sparse, and a write to a page that a full
    file system (/dev/shm, or a region file's disk) cannot back would be a
    SIGBUS (a copy in C) or EFAULT (a readv); populate says EFAULT or ENOMEM
    first. Other failures (EINVAL: a kernel before 5.14) are ignored: the
    copy that follows faults the pages in, as without this call.

    On tmpfs, MADV_POPULATE_READ serves as well and, for pages the file holds
    already (a warm region, a later round), far better: a read fault maps the
    sixteen pages around it that are there (fault-around, which write faults
    on shared mappings lack), and a tmpfs mapping has no dirty accounting, so
    they come mapped writable and the write that follows takes no fault. A
    hole is allocated by either. Measured on warm /dev/shm, 1 GiB mapped anew:
    75-81 CPU-ms and 16385 faults against 185-225 CPU-ms and 262144, then no
    fault for the writes after either. A disk file system's pages would come
    read-only (its writes are accounted), a second fault each: WRITE there.
    """
    cdef size_t i
    cdef uintptr_t start, end
    cdef int advice = MADV_POPULATE_READ if read else MADV_POPULATE_WRITE
    for i in range(count):
        if iov[i].iov_len <= skip_upto:
            continue
        start = <uintptr_t>iov[i].iov_base & ~(SYSTEM_PAGE - 1)
        end = (<uintptr_t>iov[i].iov_base + iov[i].iov_len + SYSTEM_PAGE - 1) & ~(SYSTEM_PAGE - 1)
        if madvise(<void *>start, end - start, advice) != 0 \
                and (errno == EFAULT or errno == ENOMEM):
            return errno
    return 0


cdef int populate_range(void *start, size_t length, bint read=False) noexcept nogil:
    """populate_for_write of the one run ``start`` .. ``start + length``."""
    cdef iovec run
    run.iov_base = start
    run.iov_len = length
    return populate_for_write(&run, 1, 0, read)


cdef int raise_unpopulated(int err, str what, str call="populate") except -1:
    """Raise the clean error for a populate_for_write (or place_runs: ``call``)
    that found no memory (err: its errno). Called only then: ``what`` is text
    built for the error."""
    raise MigrationError(f"{what}: no memory to write into: the file system that holds "
                         f"it is full (its file's, or /dev/shm for shared memory; {call}: "
                         f"{errno_module.errorcode.get(err, err)})")


cdef int place_runs(int uffd, RegionRef *ref, const iovec *iov, size_t count,
                    const uint8_t *src, uint32_t page_size) noexcept nogil:
    """Place the bytes at ``src``, in order, into ``ref`` where each iov entry
    (a run of pages in its mapping ``base``) says, through its placing mapping
    (includes/placing.h). A page written before in this session (its bit in
    ``ref.received``) is copied through ``base`` instead: UFFDIO_COPY would
    allocate a page before finding it there, and fail where memory is short.
    So is a page the kernel finds there anyway (EEXIST) or has no memory for
    (ENOSPC, ENOMEM: populated through ``base`` first, which says whether
    any memory is left). Returns 0, or the errno of what failed."""
    cdef size_t i, at, end, stop, done
    cdef uint64_t page
    cdef int rc
    cdef bint written
    for i in range(count):
        at = <size_t>(<const uint8_t *>iov[i].iov_base - ref.base)
        end = at + iov[i].iov_len
        while at < end:
            # The stretch from here to the first page whose received bit differs
            # (from the next page boundary: after a page copied alone, ``at``
            # may be inside a page larger than a system page).
            page = at // page_size
            written = (fm_load64(&ref.received[page >> 6]) >> (page & 63)) & 1
            stop = (page + 1) * page_size
            while stop < end:
                page = stop // page_size
                if ((fm_load64(&ref.received[page >> 6]) >> (page & 63)) & 1) != written:
                    break
                stop += page_size
            if not written:
                rc = fm_place_copy(uffd, ref.place + at, src, stop - at, &done)
                src += done
                at += done
                if rc == 0:
                    continue
                if rc != -EEXIST and rc != -ENOSPC and rc != -ENOMEM:
                    return -rc
                stop = at + SYSTEM_PAGE         # that page through the mapping, then on
            rc = copy_through_mapping(ref, at, src, stop - at)
            if rc:
                return rc
            src += stop - at
            at = stop
    return 0


cdef int copy_through_mapping(RegionRef *ref, size_t at, const uint8_t *src,
                              size_t length) noexcept nogil:
    """Copy ``length`` bytes from ``src`` to byte ``at`` of ``ref`` through its
    mapping, populated first: 0, or EFAULT/ENOMEM where no memory backs it."""
    cdef int failed = populate_range(ref.base + at, length, ref.populate_read)
    if failed:
        return failed
    memcpy(ref.base + at, src, length)
    return 0


def placing_available():
    """Whether this process may place pages with userfaultfd (includes/placing.h;
    where it may not, receive workers write through their mapping). Test face."""
    cdef int uffd = fm_place_open()
    if uffd < 0:
        return False
    close_fd(uffd)
    return True


def populate(uint8_t[::1] memory, str what):
    """Fault ``memory`` in for writing, GIL released: every page allocated and
    mapped before data arrives (a destination's prealloc). Raises the clean
    MigrationError where its file system (/dev/shm) cannot back it, never a
    SIGBUS; on a kernel without MADV_POPULATE_WRITE (< 5.14) it does nothing."""
    cdef int failed
    if memory.shape[0] == 0:
        return
    with nogil:
        failed = populate_range(&memory[0], memory.shape[0])
    if failed:
        raise_unpopulated(failed, what)


cdef size_t gather_iov(const iovec *iov, size_t n, uint8_t *dst) noexcept nogil:
    """Copy the bytes iov describes into dst, one after the other; returns the total."""
    cdef size_t i, pos = 0
    for i in range(n):
        memcpy(dst + pos, iov[i].iov_base, iov[i].iov_len)
        pos += iov[i].iov_len
    return pos


cdef ssize_t transfer_all(int fd, iovec *iov, size_t count, bint reading) noexcept nogil:
    """readv or writev every byte described by iov (which is consumed), looping
    over partial transfers and EINTR.

    Returns the bytes moved — fewer than asked only when a read meets end of
    file — or -errno.
    """
    cdef ssize_t n, total = 0
    cdef size_t left
    cdef int batch
    while count:
        batch = <int>(count if count < <size_t>IOV_MAX else IOV_MAX)
        n = readv(fd, iov, batch) if reading else writev(fd, iov, batch)
        if n < 0:
            if errno == EINTR:
                continue
            return -errno
        if n == 0 and reading:
            break
        total += n
        left = n
        while count and left >= iov[0].iov_len:
            left -= iov[0].iov_len
            iov += 1
            count -= 1
        if count and left:
            iov[0].iov_base = <uint8_t *>iov[0].iov_base + left
            iov[0].iov_len -= left
    return total


cdef ssize_t writev_all(int fd, iovec *iov, size_t count) noexcept nogil:
    """Write every byte described by iov (which is consumed); bytes written or -errno."""
    return transfer_all(fd, iov, count, False)


cdef ssize_t readv_all(int fd, iovec *iov, size_t count) noexcept nogil:
    """Fill every byte described by iov (which is consumed); bytes read (fewer
    only at end of file) or -errno."""
    return transfer_all(fd, iov, count, True)


cdef ssize_t read_exact(int fd, void *buf, size_t size) noexcept nogil:
    cdef iovec one
    one.iov_base = buf
    one.iov_len = size
    return readv_all(fd, &one, 1)


cdef ssize_t write_exact(int fd, const void *buf, size_t size) noexcept nogil:
    cdef iovec one
    one.iov_base = <void *>buf
    one.iov_len = size
    return writev_all(fd, &one, 1)


cdef int check_page_size(size_t page_size) except -1:
    # Offsets and lengths are divided by it (C division: 0 kills the process).
    if page_size == 0:
        raise ValueError("page_size must be at least 1 byte")
    return 0


cdef object page_io(int fd, const uint8_t[::1] header, uint8_t *base, size_t base_size,
                    object offsets, size_t page_size, bint reading):
    cdef uint64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.uint64)
    cdef size_t i, n = offs.shape[0], count = 0
    cdef size_t want = header.shape[0] + n * page_size
    cdef ssize_t done
    cdef iovec *iov
    check_page_size(page_size)
    for i in range(n):
        if offs[i] % page_size or offs[i] > base_size or base_size - offs[i] < page_size:
            raise ValueError(f"page offset {offs[i]:#x} is not a page inside the buffer")
    iov = <iovec *>PyMem_Malloc((n + 1) * sizeof(iovec))
    if iov == NULL:
        raise MemoryError()
    try:
        if header.shape[0]:
            iov[0].iov_base = <void *>&header[0]
            iov[0].iov_len = header.shape[0]
            count = 1
        if n:
            count += pages_to_iov(iov + count, base, &offs[0], n, page_size)
        with nogil:
            done = transfer_all(fd, iov, count, reading)
        if done < 0:
            raise OSError(-done, strerror(-done))
        if <size_t>done != want:
            raise EOFError(f"end of file after {done} of {want} bytes")
        return done
    finally:
        PyMem_Free(iov)


# Test face: the engines gather pages into iovecs and writev/readv them in C
# (_channel.pxi). These two run the same pages_to_iov + transfer_all loops on
# any fd, so tests can drive partial transfers, EINTR and end of file through
# a pipe or socketpair, and check the bytes, without a migration around them.

def writev_pages(int fd, const uint8_t[::1] header, const uint8_t[::1] buffer, offsets,
                 size_t page_size=4096):
    """Write ``header`` then the pages of ``buffer`` at byte ``offsets``, in one gather.

    Loops over partial writes and EINTR; returns the bytes written.
    """
    return page_io(fd, header, <uint8_t *>&buffer[0] if buffer.shape[0] else NULL,
                   buffer.shape[0], offsets, page_size, False)


def readv_pages(int fd, uint8_t[::1] header, uint8_t[::1] buffer, offsets,
                size_t page_size=4096):
    """Read exactly ``len(header)`` bytes into ``header`` then one page per offset.

    Loops over partial reads and EINTR; raises ``EOFError`` if the stream ends
    first. Returns the bytes read.
    """
    return page_io(fd, header, &buffer[0] if buffer.shape[0] else NULL, buffer.shape[0],
                   offsets, page_size, True)


cdef int clear_page_runs(RegionRef *ref, const uint64_t *offsets, size_t n,
                         uint32_t page_size) noexcept nogil:
    """Zero the pages at byte ``offsets`` of ``ref``, a run of adjacent pages at a
    time. In a sparse region (a sparse file mapped shared) a run of at least
    PUNCH_MIN_BYTES is a hole punched into the file (MADV_REMOVE: fallocate
    PUNCH_HOLE|KEEP_SIZE under the mapping; every mapping of it then reads
    zeros), so pages cleared in a later round keep no disk blocks or tmpfs
    memory, and are not written back at the flush; a shorter run is
    zero-filled (cheaper than a punch). Where the file system cannot punch
    (EOPNOTSUPP, EINVAL) the run is zero-filled, and so is every later one.
    In fresh memory a punched page is no longer one written (its ``received``
    bit is dropped): it is a hole again, which a read would allocate (in other
    memory the bit says the page was sent: check_every_page_came). A run is
    populated before it is zero-filled: on a file system that copies on
    write, writing a page that holds data takes a new block, and where there
    is none that is a SIGBUS. Returns 0, or populate's errno (nothing more
    cleared)."""
    cdef size_t i = 0, j
    cdef uint64_t length, page
    cdef int failed
    while i < n:
        j = i + 1
        while j < n and offsets[j] == offsets[j - 1] + page_size:
            j += 1
        length = (j - i) * <uint64_t>page_size
        if (ref.sparse and length >= PUNCH_MIN_BYTES
                and madvise(ref.base + offsets[i], length, MADV_REMOVE) == 0):
            if ref.fresh and ref.received != NULL:
                for page in range(offsets[i] // page_size, offsets[j - 1] // page_size + 1):
                    fm_fetch_and64(&ref.received[page >> 6], ~((<uint64_t>1) << (page & 63)))
        else:
            if ref.sparse and length >= PUNCH_MIN_BYTES:
                ref.sparse = False
            failed = populate_range(ref.base + offsets[i], length, ref.populate_read)
            if failed:
                return failed
            memset(ref.base + offsets[i], 0, length)
        i = j
    return 0


def clear_pages(uint8_t[::1] buffer, offsets, size_t page_size, bint punch,
                DirtyBitmap written=None, str what="memory"):
    """Zero the pages at byte ``offsets`` (page-aligned, inside ``buffer``) as a
    receive worker does (clear_page_runs): with ``punch`` (``buffer`` maps a
    sparse file shared) its long runs as holes, their pages unmarked in
    ``written`` (the pages written, when given). False when no hole could be
    punched (``punch`` off, the memory or its page size not fit for it).
    Raises MigrationError, naming ``what``, where no memory is left to zero."""
    cdef RegionRef ref
    cdef int failed
    cdef uint64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.uint64)
    cdef size_t i, n = offs.shape[0]
    check_page_size(page_size)
    for i in range(n):
        if offs[i] % page_size or offs[i] + page_size > <uint64_t>buffer.shape[0]:
            raise IndexError(f"page at byte {offs[i]} outside a buffer of "
                             f"{buffer.shape[0]} bytes, or not page-aligned")
    if written is not None and written.hdr.npages * <uint64_t>page_size < buffer.shape[0]:
        raise ValueError("written map smaller than the buffer")
    if n == 0:
        return punch
    memset(&ref, 0, sizeof(ref))
    ref.base = &buffer[0]
    ref.received = written.words if written is not None else NULL
    ref.fresh = written is not None
    ref.holes.fd = -1
    ref.sparse = punch and page_size % SYSTEM_PAGE == 0
    with nogil:
        failed = clear_page_runs(&ref, &offs[0], n, <uint32_t>page_size)
    if failed:
        raise_unpopulated(failed, what)
    return ref.sparse


# Test face: the send engine runs fm_buffer_is_zero (includes/pagescan.h) on
# each page in C; these expose the same scan so tests check it on edge cases
# and benchmarks measure its speed.

def is_zero(const uint8_t[::1] buffer):
    """True when every byte of ``buffer`` is zero (QEMU's buffer_is_zero)."""
    cdef bint zero
    with nogil:
        zero = fm_buffer_is_zero(&buffer[0], buffer.shape[0]) if buffer.shape[0] else True
    return zero


def find_zero_pages(const uint8_t[::1] buffer, size_t page_size=4096, pages=None):
    """Indices of the all-zero pages of ``buffer`` among ``pages`` (default: every page)."""
    cdef size_t total
    cdef uint64_t[::1] idx
    cdef uint64_t[::1] out
    cdef size_t i, n, k = 0
    check_page_size(page_size)
    total = buffer.shape[0] // page_size
    if pages is None:
        idx = np.arange(total, dtype=np.uint64)
    else:
        idx = np.ascontiguousarray(pages, dtype=np.uint64)
    n = idx.shape[0]
    for i in range(n):
        if idx[i] >= total:
            raise IndexError(f"page {idx[i]} outside a buffer of {total} pages")
    result = np.empty(n, dtype=np.uint64)
    out = result
    with nogil:
        for i in range(n):
            if fm_buffer_is_zero(&buffer[0] + idx[i] * page_size, page_size):
                out[k] = idx[i]
                k += 1
    return result[:k].copy()


# The send engine lists a mailbox page index with this bit as a zero page
# without reading it (a packet layout that lists zero pages); the main
# process sets it on pages it knows are zero, such as a file's holes.
cdef uint64_t KNOWN_ZERO_BIT = (<uint64_t>1) << 63
KNOWN_ZERO_PAGE = KNOWN_ZERO_BIT


cdef bint no_swap() noexcept nogil:
    """No swap device is in use: then a tmpfs page holding data stays in the
    page cache (nothing can swap it out)."""
    cdef sysinfo info
    return c_sysinfo(&info) == 0 and info.totalswap == 0


cdef bint on_tmpfs(int fd) noexcept nogil:
    cdef statfs fs
    return fstatfs(fd, &fs) == 0 and fs.f_type == TMPFS_MAGIC


cdef int extent_at(Extents *known, off_t pos, off_t *data, off_t *hole) noexcept nogil:
    """The data extent of ``known.fd`` at or after ``pos``: [data, hole) (data =
    OFF_MAX: none before the end of the file); 0, or the errno of a failed
    lseek. The last extent found is kept in ``known`` and answers again while
    ``pos`` is in it or the hole before it."""
    if not (known.hole_from <= pos < known.data_to):
        known.hole_from = pos
        known.data_from = lseek(known.fd, pos, SEEK_DATA)
        if known.data_from < 0:
            if errno != ENXIO:          # ENXIO: no data from pos to the end of the file
                forget_extents(known)
                return errno
            known.data_from = known.data_to = OFF_MAX
        else:
            known.data_to = lseek(known.fd, known.data_from, SEEK_HOLE)
            if known.data_to < 0:
                forget_extents(known)
                return errno
    data[0] = max(pos, known.data_from)
    hole[0] = known.data_to
    return 0


cdef inline void forget_extents(Extents *known) noexcept nogil:
    """Drop what ``known`` kept: the file changed since (or an lseek failed)."""
    known.hole_from = known.data_to = -1


cdef enum PageExtent:
    PAGE_HOLE       # all in a hole of its file: reads as zero
    PAGE_DATA       # all data, or not known
    PAGE_PARTLY     # partly in a hole (a page larger than a system page)


cdef PageExtent page_extent(RegionRef *ref, uint64_t offset, uint32_t page_size) noexcept nogil:
    """Where the page at byte ``offset`` of ``ref`` lies in its file, as
    ``ref.holes`` knows (no fd, or an lseek that failed: data)."""
    cdef off_t data, hole
    if ref.holes.fd < 0 or extent_at(&ref.holes, <off_t>offset, &data, &hole) != 0:
        return PAGE_DATA
    if <uint64_t>data >= offset + page_size:
        return PAGE_HOLE
    if <uint64_t>data > offset or <uint64_t>hole < offset + page_size:
        return PAGE_PARTLY
    return PAGE_DATA


cdef int may_hold_data(RegionRef *ref, uint64_t offset, uint32_t page_size) noexcept nogil:
    """1 when the page at byte ``offset`` of ``ref`` may hold data that a zero
    page sent for it must erase, 0 when it cannot, known without reading the
    page; or -errno where it could not be populated (below). Fresh memory is
    zero but where this session wrote (its ``received`` bit; a punched page
    is a hole again, and its bit dropped). Other memory may, but in the holes
    of its file on tmpfs (``ref.holes``, when given): they read as zero, and
    a read would allocate each, a SIGBUS where the file system is full. A
    page only partly in a hole is populated first, so that reading and
    clearing it fail cleanly there instead."""
    cdef uint64_t page = offset // page_size
    cdef PageExtent where
    cdef int failed
    if ref.fresh:
        return (fm_load64(&ref.received[page >> 6]) >> (page & 63)) & 1
    where = page_extent(ref, offset, page_size)
    if where == PAGE_HOLE:
        return 0
    if where == PAGE_PARTLY:
        failed = populate_range(ref.base + offset, page_size, ref.populate_read)
        if failed:
            return -failed
    return 1


cdef class FileHoles:
    """The zero pages of a file known without reading it, slice after slice: the
    pages in its holes. Reading a hole through a mapping costs a page fault per
    page and, on tmpfs, allocates the page: a sparse file would fill up. A page
    partly in a hole is data; a file system that reports no holes has none.

    Holes are learnt with SEEK_DATA/SEEK_HOLE: two lseeks per hole, which for
    a file of lone zero pages (1 GiB of every other page) is 262144 system
    calls, 78-111 CPU-ms. On tmpfs with no swap in use, a page is data exactly
    when it is in the page cache (both count a page fallocate()d but never
    written as a hole), so one mincore() per slice tells the same:
    ``page_cache`` (default on) uses it there for a slice of both holes and
    data, with no swap in use before and after each call, if it agrees with
    the lseeks on the slice's first hole (absent) and data page (resident): a
    caller the kernel does not let see the page cache, neither owner nor
    writer of the file, is told every page is resident. Elsewhere, and with
    swap, the lseeks. What neither way can tell is a page whose swap-in
    failed during a swapoff (kernels >= 6.2 keep an error entry): the lseeks
    call it data, whose read then fails; mincore calls it a hole, so it goes
    as a zero page: lost either way.

    The last extent found is kept: on tmpfs an lseek walks the page cache from
    where it starts to the extent's end, so a data extent that reaches past a
    slice is walked once, not again for every slice it covers."""

    cdef Extents known
    cdef bint by_residency

    def __cinit__(self, int fd, bint page_cache=True):
        self.known.fd = fd
        forget_extents(&self.known)
        self.by_residency = page_cache and on_tmpfs(fd)

    @property
    def reads_page_cache(self):
        """Whether mincore() may still tell holes (False once it disagreed with the lseeks)."""
        return self.by_residency

    cdef bint resident_zero_pages(self, const uint8_t *base, size_t page_size,
                                  uint64_t first, uint64_t count, uint8_t[::1] state,
                                  uint64_t[::1] out, uint64_t *found) noexcept nogil:
        """zero_pages by mincore() into ``state`` (a byte per system page of the
        slice), for a slice of both holes and data: one extent, all data or all
        hole, is the lseeks' to tell (they walk it once; mincore looks up every
        page). False when the lseeks answer: a slice of one kind, an lseek that
        failed (the lseek walk says how), swap in use, or mincore disagreeing
        with the first hole and data page the lseeks found in the slice (and
        then never again)."""
        cdef size_t per = page_size // SYSTEM_PAGE, j
        cdef uint64_t i, k = 0
        cdef bint resident
        cdef off_t pos = <off_t>(first * page_size), end = <off_t>((first + count) * page_size)
        cdef off_t data, hole
        if (extent_at(&self.known, pos, &data, &hole) or data >= end
                or (data == pos and hole >= end)):
            return False
        if not (no_swap() and mincore(<void *>(base + pos), count * page_size,
                                      &state[0]) == 0 and no_swap()):
            return False
        hole = pos if data > pos else hole              # in the slice, as data is
        if state[(hole - pos) // <off_t>SYSTEM_PAGE] & 1 \
                or not state[(data - pos) // <off_t>SYSTEM_PAGE] & 1:
            self.by_residency = False
            return False
        for i in range(count):
            resident = False
            for j in range(i * per, (i + 1) * per):
                resident = resident or state[j] & 1
            if not resident:
                out[k] = first + i
                k += 1
        found[0] = k
        return True

    def zero_pages(self, const uint8_t[::1] buffer, size_t page_size, uint64_t first,
                   uint64_t count):
        """Indices of the pages in holes among pages ``first`` .. ``first + count
        - 1`` of the file, which ``buffer`` maps."""
        cdef size_t total
        cdef uint64_t[::1] out
        cdef uint8_t[::1] state
        cdef uint64_t page, k = 0, last
        cdef off_t pos, data, hole, end
        cdef int err = 0
        cdef bint answered
        check_page_size(page_size)
        total = buffer.shape[0] // page_size
        if first > total or count > total - first:
            raise IndexError(f"pages {first}..{first + count - 1} outside a buffer of "
                             f"{total} pages")
        result = np.empty(count, dtype=np.uint64)
        out = result
        if count and self.by_residency and page_size % SYSTEM_PAGE == 0:
            state = np.empty(count * (page_size // SYSTEM_PAGE), dtype=np.uint8)
            with nogil:
                answered = self.resident_zero_pages(&buffer[0], page_size, first, count,
                                                    state, out, &k)
            if answered:
                return result[:k].copy()
        pos = <off_t>(first * page_size)
        end = <off_t>((first + count) * page_size)
        with nogil:
            while pos < end:
                err = extent_at(&self.known, pos, &data, &hole)
                if err:
                    break
                data = min(data, end)
                # The hole [pos, data): pos is on a page boundary, its last page may be partial.
                for page in range(<uint64_t>pos // page_size, <uint64_t>data // page_size):
                    out[k] = page
                    k += 1
                if data >= end:
                    break
                last = (<uint64_t>min(hole, end) + page_size - 1) // page_size   # past the data
                pos = <off_t>(last * page_size)
        if err:
            raise OSError(err, f"finding the holes of file descriptor {self.known.fd}: "
                               f"{strerror(err).decode()}")
        return result[:k].copy()
