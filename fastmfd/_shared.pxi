# Shared-memory structures used by several processes at once: the zero-copy
# buffer pool, the atomic round-robin channel selector and the dirty bitmap.
# Each lives in its own fastmfd.shm.SharedMemory segment, starts with a
# header holding a magic number (checked on attach), and is driven only by
# the atomics of includes/atomics.h plus process-shared POSIX semaphores for
# blocking. Nothing here spins: a waiter sleeps on a semaphore in slices of
# at most WAIT_SLICE seconds, checking for signals and for an abort between
# slices.

cdef enum:
    POOL_MAGIC = 0x464d4d504f4f4c31        # "FMMPOOL1"
    SELECTOR_MAGIC = 0x464d4d53454c4531    # "FMMSELE1"
    BITMAP_MAGIC = 0x464d4d4449525431      # "FMMDIRT1"
    HEADER_ALIGN = 64

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
    """Base: a SharedMemory segment holding one structure, and its base pointer."""
    cdef readonly object segment      # fastmfd.shm.SharedMemory
    cdef uint8_t *base
    cdef size_t size

    cdef int _map(self, object segment, size_t need, uint64_t magic, bint create) except -1:
        cdef uint8_t[::1] view = segment.buf
        if <size_t>view.shape[0] < need:
            raise ValueError(f"segment {segment.name} holds {view.shape[0]} bytes, needs {need}")
        self.segment = segment
        self.base = &view[0]
        self.size = view.shape[0]
        if not create and (<uint64_t *>self.base)[0] != magic:
            raise ValueError(f"segment {segment.name} does not hold the expected structure")
        return 0

    @property
    def name(self):
        return self.segment.name

    cdef inline int check_open(self) except -1:
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


# ---------------------------------------------------------------- buffer pool

cdef struct PoolHeader:
    uint64_t magic
    uint64_t slot_size          # usable bytes per slot
    uint64_t stride             # distance between slots (slot_size rounded to 64)
    uint64_t data_offset        # first slot, page aligned
    uint64_t head               # Treiber stack head: (ABA tag << 32) | (slot + 1); 0 = empty
    uint32_t nslots
    uint32_t aborted
    sem_t free_slots            # counts slots on the stack; waiters sleep here


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
    """
    cdef PoolHeader *hdr
    cdef uint32_t *next_free     # per slot: the slot below it on the stack, + 1
    cdef uint32_t *held          # per slot: 1 while acquired

    @staticmethod
    def segment_size(uint32_t nslots, uint64_t slot_size):
        cdef size_t meta = align_up(sizeof(PoolHeader), HEADER_ALIGN) + 8 * <size_t>nslots
        return align_up(meta, 4096) + nslots * align_up(slot_size, 64)

    @classmethod
    def create(cls, uint32_t nslots, uint64_t slot_size, str tag="pool"):
        """Create a pool in a new segment owned by the calling process."""
        if nslots == 0 or slot_size == 0:
            raise ValueError("a pool needs at least one slot of at least one byte")
        segment = SharedMemory.create(BufferPool.segment_size(nslots, slot_size), tag=tag)
        cdef BufferPool pool = cls.__new__(cls)
        try:
            pool._format(segment, nslots, slot_size)
        except BaseException:
            segment.close()
            raise
        return pool

    @classmethod
    def attach(cls, str name):
        """Attach to a pool another process created."""
        segment = SharedMemory.attach(name)
        cdef BufferPool pool = cls.__new__(cls)
        try:
            pool._map(segment, sizeof(PoolHeader), POOL_MAGIC, False)
            pool._locate()
        except BaseException:
            segment.close()
            raise
        return pool

    cdef int _locate(self) except -1:
        self.hdr = <PoolHeader *>self.base
        self.next_free = <uint32_t *>(self.base + align_up(sizeof(PoolHeader), HEADER_ALIGN))
        self.held = self.next_free + self.hdr.nslots
        if self.hdr.data_offset + self.hdr.nslots * self.hdr.stride > self.size:
            raise ValueError(f"pool segment {self.segment.name} is truncated")
        return 0

    cdef int _format(self, object segment, uint32_t nslots, uint64_t slot_size) except -1:
        cdef uint32_t i
        self._map(segment, BufferPool.segment_size(nslots, slot_size), POOL_MAGIC, True)
        self.hdr = <PoolHeader *>self.base
        self.hdr.slot_size = slot_size
        self.hdr.stride = align_up(slot_size, 64)
        self.hdr.data_offset = align_up(align_up(sizeof(PoolHeader), HEADER_ALIGN)
                                        + 8 * <size_t>nslots, 4096)
        self.hdr.nslots = nslots
        self._locate()
        # Stack of every slot, slot 0 on top.
        for i in range(nslots):
            self.next_free[i] = i + 2 if i + 1 < nslots else 0
            self.held[i] = 0
        self.hdr.head = 1
        if sem_init(&self.hdr.free_slots, 1, nslots) != 0:
            raise OSError(errno, "sem_init failed")
        fm_store64(&self.hdr.magic, POOL_MAGIC)
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

    cdef inline uint8_t *slot_ptr(self, uint32_t slot) noexcept nogil:
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
        self.check_open()
        if slot >= self.hdr.nslots:
            raise ValueError(f"slot {slot} is out of range (pool of {self.hdr.nslots})")
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
        self.check_open()
        if slot >= self.hdr.nslots:
            raise ValueError(f"slot {slot} is out of range")
        return bool(fm_load32(&self.held[slot]))

    def view(self, uint32_t slot):
        """A writable memoryview of the slot (``slot_size`` bytes), without copying."""
        self.check_open()
        if slot >= self.hdr.nslots:
            raise ValueError(f"slot {slot} is out of range")
        cdef size_t start = self.hdr.data_offset + slot * self.hdr.stride
        return self.segment.buf[start:start + self.hdr.slot_size]

    def abort(self):
        """Make every waiter, present and future, raise ``Aborted``."""
        self.check_open()
        fm_store32(&self.hdr.aborted, 1)
        sem_post(&self.hdr.free_slots)


# ---------------------------------------------------------------- channel selector

cdef struct SelectorHeader:
    uint64_t magic
    uint64_t cursor             # next_channel, advanced by fetch-add
    uint32_t nchannels
    uint32_t aborted
    uint32_t waiters            # callers asleep in select(): release() posts only then
    uint32_t _pad
    sem_t ready                 # posted by release() when someone may be waiting


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
    cdef SelectorHeader *hdr
    cdef uint32_t *busy

    @staticmethod
    def segment_size(uint32_t nchannels):
        return align_up(sizeof(SelectorHeader), HEADER_ALIGN) + 4 * <size_t>nchannels

    @classmethod
    def create(cls, uint32_t nchannels, str tag="selector"):
        if nchannels == 0:
            raise ValueError("a selector needs at least one channel")
        segment = SharedMemory.create(ChannelSelector.segment_size(nchannels), tag=tag)
        cdef ChannelSelector sel = cls.__new__(cls)
        try:
            sel._map(segment, ChannelSelector.segment_size(nchannels), SELECTOR_MAGIC, True)
            sel.hdr = <SelectorHeader *>sel.base
            sel.hdr.nchannels = nchannels
            sel.busy = <uint32_t *>(sel.base + align_up(sizeof(SelectorHeader), HEADER_ALIGN))
            if sem_init(&sel.hdr.ready, 1, 0) != 0:
                raise OSError(errno, "sem_init failed")
            fm_store64(&sel.hdr.magic, SELECTOR_MAGIC)
        except BaseException:
            segment.close()
            raise
        return sel

    @classmethod
    def attach(cls, str name):
        segment = SharedMemory.attach(name)
        cdef ChannelSelector sel = cls.__new__(cls)
        try:
            sel._map(segment, sizeof(SelectorHeader), SELECTOR_MAGIC, False)
            sel.hdr = <SelectorHeader *>sel.base
            if ChannelSelector.segment_size(sel.hdr.nchannels) > sel.size:
                raise ValueError(f"selector segment {name} is truncated")
            sel.busy = <uint32_t *>(sel.base + align_up(sizeof(SelectorHeader), HEADER_ALIGN))
        except BaseException:
            segment.close()
            raise
        return sel

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

    cdef int release_channel(self, uint32_t ch) except -1:
        self.check_open()
        if ch >= self.hdr.nchannels:
            raise ValueError(f"channel {ch} is out of range ({self.hdr.nchannels} channels)")
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
        self.check_open()
        if ch >= self.hdr.nchannels:
            raise ValueError(f"channel {ch} is out of range")
        return bool(fm_load32(&self.busy[ch]))

    def abort(self):
        """Make every sleeping and future ``select`` with a timeout raise ``Aborted``."""
        self.check_open()
        fm_store32(&self.hdr.aborted, 1)
        sem_post(&self.hdr.ready)


# ---------------------------------------------------------------- dirty bitmap

cdef struct BitmapHeader:
    uint64_t magic
    uint64_t npages


cdef class DirtyBitmap(_SharedStructure):
    """One bit per page, settable from any process, collected atomically.

    ``mark(first, count)`` sets bits with atomic fetch-or; ``collect()``
    exchanges every word with zero and returns the indices that were set,
    ascending, as a numpy ``uint64`` array. A mark racing with a collect is
    either in this collect's result or left set for the next one — never
    lost.
    """
    cdef BitmapHeader *hdr
    cdef uint64_t *words
    cdef size_t nwords

    @staticmethod
    def segment_size(uint64_t npages):
        return align_up(sizeof(BitmapHeader), HEADER_ALIGN) + 8 * ((npages + 63) // 64)

    @classmethod
    def create(cls, uint64_t npages, str tag="dirty"):
        segment = SharedMemory.create(DirtyBitmap.segment_size(npages), tag=tag)
        cdef DirtyBitmap bm = cls.__new__(cls)
        try:
            bm._map(segment, DirtyBitmap.segment_size(npages), BITMAP_MAGIC, True)
            bm.hdr = <BitmapHeader *>bm.base
            bm.hdr.npages = npages
            bm._locate()
            fm_store64(&bm.hdr.magic, BITMAP_MAGIC)
        except BaseException:
            segment.close()
            raise
        return bm

    @classmethod
    def attach(cls, str name):
        segment = SharedMemory.attach(name)
        cdef DirtyBitmap bm = cls.__new__(cls)
        try:
            bm._map(segment, sizeof(BitmapHeader), BITMAP_MAGIC, False)
            bm.hdr = <BitmapHeader *>bm.base
            if DirtyBitmap.segment_size(bm.hdr.npages) > bm.size:
                raise ValueError(f"bitmap segment {name} is truncated")
            bm._locate()
        except BaseException:
            segment.close()
            raise
        return bm

    cdef void _locate(self) noexcept:
        self.words = <uint64_t *>(self.base + align_up(sizeof(BitmapHeader), HEADER_ALIGN))
        self.nwords = (self.hdr.npages + 63) // 64

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
