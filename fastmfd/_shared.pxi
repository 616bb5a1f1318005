# Shared-memory structures used by several processes at once: the zero-copy
# buffer pool, the atomic round-robin channel selector, the dirty bitmap and
# the per-channel counters. Each lives in its own fastmfd.shm.SharedMemory
# segment, starts with a header holding a magic number (checked on attach),
# and is driven only by the atomics of includes/atomics.h plus process-shared
# POSIX semaphores for blocking. Nothing here spins: a waiter sleeps on a
# semaphore in slices of at most WAIT_SLICE seconds, checking for signals and
# for an abort between slices.
#
# All four are created and attached by one template (_SharedStructure._open);
# a structure only says how big its segment is, where its arrays are and how
# it starts out.

cdef double WAIT_SLICE = 0.5


cdef inline size_t align_up(size_t n, size_t a) noexcept nogil:
    return (n + a - 1) & ~(a - 1)


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int sem_wait_slice(sem_t *sem, double seconds) noexcept nogil:
    """Take the semaphore within ``seconds``: 0 taken, 1 timed out, 2 interrupted."""
    cdef timespec deadline
    cdef double until
    if seconds <= 0:
        return 0 if sem_trywait(sem) == 0 else 1
    until = monotonic() + seconds
    deadline.tv_sec = <time_t>until
    deadline.tv_nsec = <long>((until - deadline.tv_sec) * 1e9)
    if sem_clockwait(sem, CLOCK_MONOTONIC, &deadline) == 0:
        return 0
    return 2 if errno == EINTR else 1


cdef int wait_semaphore(sem_t *sem, double timeout, const uint32_t *aborted,
                        str what) except -1:
    """Block (GIL released) until the semaphore is taken: 1, or timeout: 0.

    ``timeout`` None-like (< 0) waits forever. Raises Aborted once the
    structure is aborted, and lets signal handlers (Ctrl-C) run.
    """
    cdef double deadline = monotonic() + timeout if timeout >= 0 else -1
    cdef double slice_
    cdef int rc
    while True:
        if fm_load32(<uint32_t *>aborted):
            raise Aborted(f"{what} was aborted")
        slice_ = WAIT_SLICE
        if deadline >= 0:
            slice_ = min(slice_, deadline - monotonic())
            if slice_ <= 0:
                return 1 if sem_trywait(sem) == 0 else 0
        with nogil:
            rc = sem_wait_slice(sem, slice_)
        if rc == 0:
            if fm_load32(<uint32_t *>aborted):
                sem_post(sem)       # pass the wake-up on to the next waiter
                raise Aborted(f"{what} was aborted")
            return 1
        if rc == 2:
            PyErr_CheckSignals()


cdef class _SharedStructure:
    """Base: a SharedMemory segment holding one structure, and its base pointer.

    ``X.create(...)`` makes a segment owned by the calling process (closing it
    unlinks it); ``X.attach(name)`` maps one another process created (closing
    it only unmaps).
    """

    @classmethod
    def attach(cls, str name):
        """Attach to a structure another process created."""
        cdef _SharedStructure s = cls.__new__(cls)
        s._open(SharedMemory.attach(name), None)
        return s

    cdef int _open(self, object segment, tuple geometry) except -1:
        """Map ``segment`` and make the structure usable: the one create/attach
        sequence. ``geometry`` (the create() arguments) formats a new segment;
        None attaches to a formatted one. On failure the segment is closed
        (which unlinks it when this process created it)."""
        cdef size_t need
        try:
            self._map(segment, self.header_size)
            if geometry is not None:
                self._set_geometry(geometry)
            elif fm_load64(<uint64_t *>self.base) != self.magic:
                raise ValueError(f"segment {segment.name} does not hold the expected structure")
            need = self._locate()
            if need > self.size:
                raise ValueError(f"segment {segment.name} holds {self.size} bytes, needs {need} "
                                 "(truncated)")
            if geometry is not None:
                self._format()
                # Last: an attacher checks the magic, so it never sees a
                # structure half formatted.
                fm_store64(<uint64_t *>self.base, self.magic)
        except BaseException:
            self.base = NULL
            segment.close()
            raise
        return 0

    cdef int _map(self, object segment, size_t need) except -1:
        # Its own function: the typed view must be gone before _open's error
        # path closes the segment (an exported view blocks the unmap).
        cdef uint8_t[::1] view = segment.buf
        self.segment = segment
        if <size_t>view.shape[0] < need:
            raise ValueError(f"segment {segment.name} holds {view.shape[0]} bytes, "
                             f"needs {need}")
        self.base = &view[0]
        self.size = view.shape[0]
        return 0

    cdef int _set_geometry(self, tuple geometry) except -1:
        """create(): write ``geometry`` into the new header, where _locate reads it."""
        raise NotImplementedError

    cdef size_t _locate(self) except 0:
        """Point the typed fields into the segment; return the bytes its geometry needs."""
        raise NotImplementedError

    cdef int _format(self) except -1:
        """create(): the initial state, beyond zero-filled memory."""
        return 0

    @property
    def name(self):
        return self.segment.name

    cdef int check_open(self) except -1:
        # Every pointer into the segment dangles once it is unmapped: refuse
        # instead of touching them.
        if self.base == NULL:
            raise ValueError(f"{type(self).__name__} is closed")
        return 0

    def close(self):
        """Unmap; the owner also unlinks the segment.

        Raises ``BufferError``, leaving the structure open and usable (but
        already unlinked), while views of its memory (``BufferPool.view``)
        are alive. Not to be called while another thread is still inside a
        method: ``abort()`` first.
        """
        if self.segment is not None and not self.segment.closed:
            self.segment.close()
        self.base = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef _SharedStructure create_structure(type cls, size_t size, str tag, tuple geometry,
                                       object allocate=True):
    """A new ``cls`` in a new segment of ``size`` bytes owned by the calling process
    (``allocate``: as SharedMemory.create's)."""
    cdef _SharedStructure s = cls.__new__(cls)
    s._open(SharedMemory.create(size, tag=tag, allocate=allocate), geometry)
    return s


# ---------------------------------------------------------------- buffer pool

cdef size_t pool_size(uint32_t nslots, uint64_t slot_size) noexcept:
    return pool_data_offset(nslots) + nslots * align_up(slot_size, 64)


cdef inline size_t pool_data_offset(uint32_t nslots) noexcept:
    # Header, then next_free[] and held[] (u32 each per slot), then the slots
    # on a page boundary.
    return align_up(align_up(sizeof(PoolHeader), HEADER_ALIGN) + 8 * <size_t>nslots, 4096)


cdef class BufferPool(_SharedStructure):
    """``nslots`` fixed-size slots in one shared-memory segment.

    ``acquire`` and ``release`` work from any process attached to the pool,
    lock-free (an ABA-tagged Treiber stack of free slots). ``view(slot)`` is a
    writable memoryview of the slot's bytes, no copy made. Releasing a slot
    that is not held (a double release included) raises ``ValueError``.

    Exhaustion: ``acquire(timeout=0)`` returns ``None`` at once when no slot
    is free; ``acquire(timeout=t)`` sleeps up to ``t`` seconds for a release
    and then returns ``None``; ``acquire()`` sleeps until a slot is released.
    After ``abort()`` every waiter, current or future, raises ``Aborted``.

    A ``sparse`` pool allocates only its bookkeeping up front: a slot's memory
    is allocated when first written, so a pool sized for the worst case costs
    what its traffic uses. Writers ``populate(slot)`` first: it fails cleanly
    where a write would be a SIGBUS (``/dev/shm`` full), and costs one system
    call per slot and process (a slot once backed stays backed).
    """

    def __cinit__(self):
        self.magic = POOL_MAGIC
        self.header_size = sizeof(PoolHeader)

    @classmethod
    def create(cls, uint32_t nslots, uint64_t slot_size, str tag="pool", bint sparse=False):
        """Create a pool in a new segment owned by the calling process."""
        if nslots == 0 or slot_size == 0:
            raise ValueError("a pool needs at least one slot of at least one byte")
        return create_structure(cls, pool_size(nslots, slot_size), tag, (nslots, slot_size),
                                pool_data_offset(nslots) if sparse else True)

    cdef int _set_geometry(self, tuple geometry) except -1:
        cdef PoolHeader *hdr = <PoolHeader *>self.base
        hdr.nslots, hdr.slot_size = geometry
        hdr.stride = align_up(hdr.slot_size, 64)
        hdr.data_offset = pool_data_offset(hdr.nslots)
        return 0

    cdef size_t _locate(self) except 0:
        self.hdr = <PoolHeader *>self.base
        self.next_free = <uint32_t *>(self.base + align_up(sizeof(PoolHeader), HEADER_ALIGN))
        self.held = self.next_free + self.hdr.nslots
        return self.hdr.data_offset + self.hdr.nslots * self.hdr.stride

    cdef int _format(self) except -1:
        cdef uint32_t i, n = self.hdr.nslots
        # Stack of every slot, slot 0 on top (held[] starts zero-filled).
        for i in range(n):
            self.next_free[i] = i + 2 if i + 1 < n else 0
        self.hdr.head = 1
        if sem_init(&self.hdr.free_slots, 1, n) != 0:
            raise OSError(errno, "sem_init failed")
        return 0

    @property
    def nslots(self):
        self.check_open()
        return self.hdr.nslots

    @property
    def slot_size(self):
        self.check_open()
        return self.hdr.slot_size

    @property
    def free_count(self):
        """Slots free now (a snapshot: other processes may change it at once)."""
        cdef uint32_t slot, held = 0
        self.check_open()
        # Counted from the held flags: after abort() the semaphore is one high.
        for slot in range(self.hdr.nslots):
            held += fm_load32(&self.held[slot])
        return self.hdr.nslots - held

    cdef int check_slot(self, uint32_t slot) except -1:
        self.check_open()
        if slot >= self.hdr.nslots:
            raise ValueError(f"slot {slot} is out of range (pool of {self.hdr.nslots})")
        return 0

    cdef uint8_t *slot_ptr(self, uint32_t slot) noexcept nogil:
        return self.base + self.hdr.data_offset + slot * self.hdr.stride

    cdef int64_t _pop(self) noexcept nogil:
        cdef uint64_t old, new
        cdef uint32_t top
        while True:
            old = fm_load64(&self.hdr.head)
            top = <uint32_t>old
            if top == 0:
                return -1
            new = (((old >> 32) + 1) << 32) | fm_load32(&self.next_free[top - 1])
            if fm_cas64(&self.hdr.head, old, new):
                return top - 1

    cdef void _push(self, uint32_t slot) noexcept nogil:
        cdef uint64_t old, new
        while True:
            old = fm_load64(&self.hdr.head)
            fm_store32(&self.next_free[slot], <uint32_t>old)
            new = (((old >> 32) + 1) << 32) | (slot + 1)
            if fm_cas64(&self.hdr.head, old, new):
                return

    cdef int64_t acquire_slot(self, double timeout) except -2:
        """A free slot, or -1 when none came free within ``timeout`` (< 0: forever)."""
        cdef int64_t slot
        self.check_open()
        if not wait_semaphore(&self.hdr.free_slots, timeout, &self.hdr.aborted, "buffer pool"):
            return -1
        # The semaphore counts slots on the stack, so the pop cannot miss.
        slot = self._pop()
        if slot < 0 or not fm_cas32(&self.held[slot], 0, 1):
            raise RuntimeError(f"buffer pool {self.segment.name} is corrupt")
        return slot

    cdef int release_slot(self, uint32_t slot) except -1:
        self.check_slot(slot)
        if not fm_cas32(&self.held[slot], 1, 0):
            raise ValueError(f"slot {slot} is not held (released twice?)")
        self._push(slot)
        sem_post(&self.hdr.free_slots)
        return 0

    def acquire(self, timeout=None):
        """Take a free slot and return its index, or ``None`` on timeout (see class doc)."""
        cdef int64_t slot = self.acquire_slot(-1.0 if timeout is None else timeout)
        return None if slot < 0 else slot

    def release(self, uint32_t slot):
        """Give a held slot back."""
        self.release_slot(slot)

    def is_held(self, uint32_t slot):
        self.check_slot(slot)
        return bool(fm_load32(&self.held[slot]))

    cdef int back_slot(self, uint32_t slot) except -1:
        cdef int failed
        if self.backed is None:
            self.backed = bytearray(self.hdr.nslots)
        if self.backed[slot]:
            return 0
        with nogil:
            failed = populate_range(self.slot_ptr(slot), self.hdr.slot_size)
        if failed:
            raise_unpopulated(failed, "device-state buffer")
        self.backed[slot] = 1
        return 0

    def populate(self, uint32_t slot):
        """Back the slot with memory before writing it: MigrationError, not a
        SIGBUS, when ``/dev/shm`` is full (once per slot in each process)."""
        self.check_slot(slot)
        self.back_slot(slot)

    def view(self, uint32_t slot):
        """A writable memoryview of the slot (``slot_size`` bytes), without copying."""
        self.check_slot(slot)
        cdef size_t start = self.hdr.data_offset + slot * self.hdr.stride
        return self.segment.buf[start:start + self.hdr.slot_size]

    def abort(self):
        """Make every waiter, present and future, raise ``Aborted``."""
        self.check_open()
        fm_store32(&self.hdr.aborted, 1)
        sem_post(&self.hdr.free_slots)


# ---------------------------------------------------------------- channel selector

cdef size_t selector_size(uint32_t nchannels) noexcept:
    return align_up(sizeof(SelectorHeader), HEADER_ALIGN) + 4 * <size_t>nchannels


cdef class ChannelSelector(_SharedStructure):
    """Atomic round-robin choice of an idle channel (QEMU's ``next_channel``).

    ``select()`` starts at the shared cursor (advanced by one atomic
    fetch-add per call), skips busy channels and marks the one it returns
    busy with a single compare-and-swap, so concurrent callers in any threads
    or processes never get the same channel. ``release(ch)`` marks it idle
    and wakes a sleeping selector. With ``timeout`` 0 (the default) a call
    returns ``None`` at once when every channel is busy; with a timeout it
    sleeps (never spins) until one is released.
    """

    def __cinit__(self):
        self.magic = SELECTOR_MAGIC
        self.header_size = sizeof(SelectorHeader)

    @classmethod
    def create(cls, uint32_t nchannels, str tag="selector"):
        """Create a selector in a new segment owned by the calling process."""
        if nchannels == 0:
            raise ValueError("a selector needs at least one channel")
        return create_structure(cls, selector_size(nchannels), tag, (nchannels,))

    cdef int _set_geometry(self, tuple geometry) except -1:
        (<SelectorHeader *>self.base).nchannels = geometry[0]
        return 0

    cdef size_t _locate(self) except 0:
        self.hdr = <SelectorHeader *>self.base
        self.busy = <uint32_t *>(self.base + align_up(sizeof(SelectorHeader), HEADER_ALIGN))
        return selector_size(self.hdr.nchannels)

    cdef int _format(self) except -1:
        if sem_init(&self.hdr.ready, 1, 0) != 0:
            raise OSError(errno, "sem_init failed")
        return 0

    @property
    def nchannels(self):
        self.check_open()
        return self.hdr.nchannels

    cdef int try_select(self) noexcept nogil:
        cdef uint32_t n = self.hdr.nchannels
        cdef uint64_t start = fm_fetch_add64(&self.hdr.cursor, 1)
        cdef uint32_t k, ch
        for k in range(n):
            ch = (start + k) % n
            if fm_load32(&self.busy[ch]) == 0 and fm_cas32(&self.busy[ch], 0, 1):
                if k:
                    # Move the cursor past the channel taken, like QEMU's
                    # next_channel = ch + 1; otherwise the next call starts
                    # at the busy channels just skipped and picks ch again.
                    fm_fetch_add64(&self.hdr.cursor, k)
                return ch
        return -1

    cdef int select_channel(self, double timeout) except -2:
        """An idle channel, now busy; -1 if none within ``timeout`` (< 0: forever)."""
        cdef int ch
        cdef double deadline = monotonic() + timeout
        cdef double left
        self.check_open()
        ch = self.try_select()
        while ch < 0 and timeout != 0:
            fm_fetch_add32(&self.hdr.waiters, 1)
            # Re-check after announcing ourselves: a release that ran before
            # the increment has already cleared its busy flag.
            ch = self.try_select()
            if ch < 0:
                left = -1.0 if timeout < 0 else deadline - monotonic()
                if timeout >= 0 and left <= 0:
                    fm_fetch_sub32(&self.hdr.waiters, 1)
                    return -1
                try:
                    wait_semaphore(&self.hdr.ready, left, &self.hdr.aborted, "channel selector")
                finally:
                    fm_fetch_sub32(&self.hdr.waiters, 1)
                ch = self.try_select()
            else:
                fm_fetch_sub32(&self.hdr.waiters, 1)
        return ch

    cdef int check_channel(self, uint32_t ch) except -1:
        self.check_open()
        if ch >= self.hdr.nchannels:
            raise ValueError(f"channel {ch} is out of range ({self.hdr.nchannels} channels)")
        return 0

    cdef int release_channel(self, uint32_t ch) except -1:
        self.check_channel(ch)
        if not fm_cas32(&self.busy[ch], 1, 0):
            raise ValueError(f"channel {ch} is not busy")
        if fm_load32(&self.hdr.waiters):
            sem_post(&self.hdr.ready)
        return 0

    def select(self, timeout=0):
        """The next idle channel, marked busy; ``None`` if all stay busy for ``timeout`` s."""
        cdef int ch = self.select_channel(-1.0 if timeout is None else timeout)
        return None if ch < 0 else ch

    def release(self, uint32_t ch):
        """Mark a busy channel idle again."""
        self.release_channel(ch)

    def is_busy(self, uint32_t ch):
        self.check_channel(ch)
        return bool(fm_load32(&self.busy[ch]))

    def abort(self):
        """Make every sleeping and future ``select`` with a timeout raise ``Aborted``."""
        self.check_open()
        fm_store32(&self.hdr.aborted, 1)
        sem_post(&self.hdr.ready)


# ---------------------------------------------------------------- dirty bitmap

cdef size_t bitmap_size(uint64_t npages) noexcept:
    return align_up(sizeof(BitmapHeader), HEADER_ALIGN) + 8 * ((npages + 63) // 64)


cdef class DirtyBitmap(_SharedStructure):
    """One bit per page, settable from any process, collected atomically.

    ``mark(first, count)`` sets bits with atomic fetch-or; ``collect()``
    exchanges every word with zero and returns the indices that were set,
    ascending, as a numpy ``uint64`` array. A mark racing with a collect is
    either in this collect's result or left set for the next one — never
    lost.
    """

    def __cinit__(self):
        self.magic = BITMAP_MAGIC
        self.header_size = sizeof(BitmapHeader)

    @classmethod
    def create(cls, uint64_t npages, str tag="dirty"):
        """Create a bitmap, every page clean, in a new segment owned by the calling process."""
        return create_structure(cls, bitmap_size(npages), tag, (npages,))

    cdef int _set_geometry(self, tuple geometry) except -1:
        (<BitmapHeader *>self.base).npages = geometry[0]
        return 0

    cdef size_t _locate(self) except 0:
        self.hdr = <BitmapHeader *>self.base
        self.words = <uint64_t *>(self.base + align_up(sizeof(BitmapHeader), HEADER_ALIGN))
        self.nwords = (self.hdr.npages + 63) // 64
        return bitmap_size(self.hdr.npages)

    @property
    def npages(self):
        self.check_open()
        return self.hdr.npages

    cdef int mark_range(self, uint64_t first, uint64_t count) except -1:
        cdef uint64_t end = first + count
        cdef uint64_t w, lo, hi, mask
        self.check_open()
        if count == 0:
            return 0
        if end > self.hdr.npages or end < first:
            raise IndexError(f"pages {first}..{end} outside the bitmap of {self.hdr.npages}")
        with nogil:
            w = first >> 6
            while w <= (end - 1) >> 6:
                lo = first - (w << 6) if first > (w << 6) else 0
                hi = end - (w << 6) if end - (w << 6) < 64 else 64
                mask = (~(<uint64_t>0)) if hi - lo == 64 else (((<uint64_t>1 << (hi - lo)) - 1) << lo)
                fm_fetch_or64(&self.words[w], mask)
                w += 1
        return 0

    def mark(self, uint64_t first, uint64_t count=1):
        """Mark ``count`` pages starting at page ``first`` dirty."""
        self.mark_range(first, count)

    def test(self, uint64_t page):
        """Whether ``page`` is marked now (a snapshot; nothing is cleared)."""
        self.check_open()
        if page >= self.hdr.npages:
            raise IndexError(f"page {page} outside the bitmap of {self.hdr.npages}")
        return bool((fm_load64(&self.words[page >> 6]) >> (page & 63)) & 1)

    def marked(self, pages):
        """The page indices in ``pages`` (any integer array-like) marked now, in
        order, as a numpy ``uint64`` array (a snapshot; nothing is cleared)."""
        cdef uint64_t[::1] idx = np.ascontiguousarray(pages, dtype=np.uint64)
        cdef size_t i, k = 0, n = idx.shape[0]
        cdef uint64_t page, npages
        self.check_open()
        npages = self.hdr.npages
        for i in range(n):
            if idx[i] >= npages:
                raise IndexError(f"page {idx[i]} outside the bitmap of {npages}")
        result = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] out = result
        with nogil:
            for i in range(n):
                page = idx[i]
                if (fm_load64(&self.words[page >> 6]) >> (page & 63)) & 1:
                    out[k] = page
                    k += 1
        return result[:k].copy()

    def unmarked(self):
        """``(count, first)``: the pages not marked now, and the first of them (-1 if
        none): a snapshot, from the bits alone."""
        cdef uint64_t page, npages, count = 0, w, bits
        cdef int64_t first = -1
        self.check_open()
        npages = self.hdr.npages
        with nogil:
            for w in range(self.nwords):
                bits = ~fm_load64(&self.words[w])
                if w == self.nwords - 1 and npages % 64:
                    bits &= ((<uint64_t>1) << (npages % 64)) - 1     # (no page past the end)
                if bits:
                    if first < 0:
                        first = w * 64 + __builtin_ctzll(bits)
                    count += __builtin_popcountll(bits)
        return count, first

    def mark_pages(self, pages):
        """Mark every page index in ``pages`` (any integer array-like) dirty."""
        cdef uint64_t[::1] idx = np.ascontiguousarray(pages, dtype=np.uint64)
        cdef size_t i, n = idx.shape[0]
        cdef uint64_t page, npages
        self.check_open()
        npages = self.hdr.npages
        for i in range(n):
            if idx[i] >= npages:
                raise IndexError(f"page {idx[i]} outside the bitmap of {npages}")
        with nogil:
            for i in range(n):
                page = idx[i]
                fm_fetch_or64(&self.words[page >> 6], (<uint64_t>1) << (page & 63))

    def count(self):
        """Pages marked now (a snapshot; nothing is cleared)."""
        cdef size_t w
        cdef uint64_t total = 0
        self.check_open()
        with nogil:
            for w in range(self.nwords):
                total += __builtin_popcountll(fm_load64(&self.words[w]))
        return total

    def collect(self):
        """Clear the bitmap and return the page indices that were set, ascending."""
        cdef uint64_t *taken
        cdef size_t w, total = 0
        cdef uint64_t bits
        cdef uint64_t[::1] out_view
        self.check_open()
        taken = <uint64_t *>PyMem_Malloc(max(self.nwords, 1) * 8)
        if taken == NULL:
            raise MemoryError()
        try:
            with nogil:
                for w in range(self.nwords):
                    # A plain load first keeps untouched cache lines unwritten.
                    bits = fm_load64(&self.words[w])
                    taken[w] = fm_exchange64(&self.words[w], 0) if bits else 0
                    total += __builtin_popcountll(taken[w])
            result = np.empty(total, dtype=np.uint64)
            if total:
                out_view = result
                self._extract(taken, out_view)
            return result
        finally:
            PyMem_Free(taken)

    cdef void _extract(self, const uint64_t *taken, uint64_t[::1] out) noexcept:
        cdef size_t w, k = 0
        cdef uint64_t bits
        with nogil:
            for w in range(self.nwords):
                bits = taken[w]
                while bits:
                    out[k] = (w << 6) + __builtin_ctzll(bits)
                    k += 1
                    bits &= bits - 1


# ---------------------------------------------------------------- counters

# The keys of Counters.read(), in row order (ST_* in _core.pxd).
cdef tuple COUNTER_FIELDS = ("packets", "normal_pages", "zero_pages", "wire_bytes",
                             "device_packets", "device_bytes", "syncs", "jobs",
                             "compressed_payloads", "raw_payloads")


cdef size_t counters_size(uint32_t nrows) noexcept:
    return align_up(sizeof(CountersHeader), HEADER_ALIGN) + 8 * ST_FIELDS * <size_t>nrows


cdef class Counters(_SharedStructure):
    """Per-channel counters plus the session's packet number, in shared memory.

    Each row has one writer (its channel's worker); readers see live values.
    """

    def __cinit__(self):
        self.magic = COUNTERS_MAGIC
        self.header_size = sizeof(CountersHeader)

    @classmethod
    def create(cls, uint32_t nrows, str tag="counters"):
        """Create ``nrows`` rows of zeros in a new segment owned by the calling process."""
        return create_structure(cls, counters_size(nrows), tag, (nrows,))

    cdef int _set_geometry(self, tuple geometry) except -1:
        (<CountersHeader *>self.base).nrows = geometry[0]
        return 0

    cdef size_t _locate(self) except 0:
        self.hdr = <CountersHeader *>self.base
        self.rows = <uint64_t *>(self.base + align_up(sizeof(CountersHeader), HEADER_ALIGN))
        return counters_size(self.hdr.nrows)

    cdef int _format(self) except -1:
        self.hdr.packet_num = 1         # the first packet sent is number 1
        return 0

    cdef uint64_t *row(self, uint32_t r) except NULL:
        self.check_open()
        if r >= self.hdr.nrows:
            raise IndexError(f"counter row {r} out of range")
        return self.rows + r * ST_FIELDS

    def read(self, uint32_t r):
        """A dict of the row's counters, by name."""
        cdef uint64_t *row = self.row(r)
        return {name: fm_load64(&row[i]) for i, name in enumerate(COUNTER_FIELDS)}

    def total(self, str field):
        """One counter summed over every row."""
        cdef size_t i = COUNTER_FIELDS.index(field)
        cdef uint32_t r
        self.check_open()
        return sum(fm_load64(&self.rows[r * ST_FIELDS + i]) for r in range(self.hdr.nrows))

    @property
    def nrows(self):
        self.check_open()
        return self.hdr.nrows
