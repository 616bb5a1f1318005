# compression="auto": each send channel decides, packet by packet, whether a
# payload goes raw or through zstd, and at which level (README "Adaptive
# compression"). All of it is a few float operations per packet, in C.
#
# What it measures, per channel (exponentially weighted, weight 1/8 per packet;
# bytes and seconds are averaged apart, so each interval or packet counts by size):
#   drain    wire bytes/s the link takes. From SIOCOUTQ (bytes queued, not yet
#            acknowledged) before and after each write: the bytes that left
#            the queue between two writes over the time between them. Only an
#            interval in which the queue stayed backed up (a quarter of the send
#            buffer still waiting when the next packet came) measures the link;
#            any other is a lower bound, and raises the estimate if above it.
#            max_bandwidth's share (the pacer) is a known link rate too. A peer
#            on this host (loopback, Unix socket) is not measured: its "link"
#            is the CPUs both ends share, which compression only loads more.
#   speed    raw bytes/s zstd compresses (wall clock around the call, so a CPU
#            shared with other work counts as slower), and
#   savings  1 - compressed/raw, both from every compressed packet, scaled to
#            level 1 by the level's typical factors (AUTO_SPEED, AUTO_SAVINGS),
#            so one packet at any level updates the estimate for all levels.
#
# How it decides: sending raw moves `drain` raw bytes/s; compressing at level
# L moves min(speed_L, drain / (1 - savings_L)) raw bytes/s — the CPU or the
# link, whichever is slower (the kernel sends while the worker compresses).
# It compresses at the level with the best rate when that beats raw by
# AUTO_GAIN, so a slow link gets a strong level, a fast one a negative (fast)
# level, and a link faster than the CPU compresses gets raw pages. No link
# limit known (the queue never backs up): raw, no sampling. While sending raw
# over a limited link it compresses one packet in `sample_every` (16, doubling
# up to 128 while compression does not pay) to notice compressible data; every
# compressed packet is sent as such (the zstd stream must hold what the
# destination's holds), so a sample costs CPU and, on data zstd cannot shrink,
# a few bytes of framing.
#
# While it compresses, the drain it measures cannot exceed what zstd produces:
# a link that got faster (or one underestimated in TCP's slow start) would
# look just fast enough to keep compressing, for good. So when `idle_limit`
# compressed writes in a row find the queue not backed up (the link takes
# every byte as soon as it is made: the CPU sets the pace), it forgets the
# link's rate and measures it again sending raw; `idle_limit` doubles (16 up
# to 1024) each time, so a link at the edge does not make it flip often.

cdef enum:
    AUTO_NLEVELS = 6
    AUTO_REFERENCE = 3              # AUTO_LEVEL[3] == 1: the level the estimates are scaled to
    AUTO_SETTLE = 8                 # backed-up intervals before the drain estimate counts
                                    # (TCP's slow start would make it low)
    AUTO_SAMPLE_MIN = 16
    AUTO_SAMPLE_MAX = 128
    AUTO_IDLE_MIN = 16
    AUTO_IDLE_MAX = 1024

# zstd levels to pick from, fastest first, with each one's typical compression
# speed and savings relative to level 1 (libzstd 1.5 on English-like text).
cdef int AUTO_LEVEL[AUTO_NLEVELS]
cdef double AUTO_SPEED[AUTO_NLEVELS]
cdef double AUTO_SAVINGS[AUTO_NLEVELS]
AUTO_LEVEL[:] = [-10, -5, -1, 1, 2, 3]
AUTO_SPEED[:] = [1.3, 1.15, 1.05, 1.0, 0.9, 0.65]
AUTO_SAVINGS[:] = [0.6, 0.74, 0.83, 1.0, 1.03, 1.05]

cdef double AUTO_WEIGHT = 0.125     # of a new sample in each average
cdef double AUTO_GAIN = 1.25        # compress only when it is predicted 25 % faster than raw


cdef void auto_init(AutoChoice *a, double pace_rate, bint measure_socket) noexcept nogil:
    memset(a, 0, sizeof(AutoChoice))
    a.pace_rate = pace_rate
    a.measure_socket = measure_socket
    a.level_index = -1
    a.sample_every = AUTO_SAMPLE_MIN
    a.idle_limit = AUTO_IDLE_MIN


cdef double auto_link_rate(const AutoChoice *a) noexcept nogil:
    """Wire bytes/s the link takes; 0 when no limit is known."""
    cdef double drain = a.drain if a.settled >= AUTO_SETTLE else 0
    if a.pace_rate > 0 and (drain <= 0 or a.pace_rate < drain):
        return a.pace_rate
    return drain


cdef inline double auto_rate(const AutoChoice *a, int i, double link) noexcept nogil:
    """Raw bytes/s compressing at AUTO_LEVEL[i] would move over a ``link`` of wire bytes/s."""
    cdef double ratio = max(1 - min(a.savings * AUTO_SAVINGS[i], 0.98), 0.02)
    return min(a.speed * AUTO_SPEED[i], link / ratio)


cdef void auto_decide(AutoChoice *a) noexcept nogil:
    """Set ``level_index`` (-1: raw) and ``best_index`` from the estimates."""
    cdef double link = auto_link_rate(a), best = 0, rate
    cdef int i
    a.level_index = -1
    if link <= 0 or a.speed <= 0:
        return
    for i in range(AUTO_NLEVELS):
        rate = auto_rate(a, i, link)
        if rate > best:             # ties go to the faster level: less CPU
            best = rate
            a.best_index = i
    if best > link * AUTO_GAIN:
        a.level_index = a.best_index


cdef int auto_pick(AutoChoice *a) noexcept nogil:
    """The level index to compress the next payload at, or -1: send it raw."""
    if a.level_index >= 0:
        return a.level_index
    if auto_link_rate(a) <= 0:
        return -1                   # nothing limits the link: compressing cannot pay
    if a.countdown:
        a.countdown -= 1
        return -1
    # A sample, at the level the estimates would pick if compression paid.
    a.sampling = True
    return a.best_index if a.speed > 0 else AUTO_REFERENCE


cdef void auto_compressed(AutoChoice *a, int index, size_t raw, size_t wire,
                          double seconds) noexcept nogil:
    """Account one payload compressed at ``AUTO_LEVEL[index]``, then decide again.

    Bytes and seconds are averaged apart and then divided, so a payload counts by
    its size: a few pages that compress in no time do not outweigh full packets."""
    cdef double weight = AUTO_WEIGHT if a.raw_bytes > 0 else 1
    a.raw_bytes += weight * (raw - a.raw_bytes)
    a.busy += weight * (seconds * AUTO_SPEED[index] - a.busy)
    a.saved += weight * ((<double>raw - wire if wire < raw else 0) / AUTO_SAVINGS[index]
                         - a.saved)
    a.speed = a.raw_bytes / a.busy if a.busy > 0 else 0
    a.savings = a.saved / a.raw_bytes if a.raw_bytes > 0 else 0
    auto_decide(a)
    if a.sampling:
        a.sampling = False
        if a.level_index < 0:
            a.sample_every = min(a.sample_every * 2, <uint32_t>AUTO_SAMPLE_MAX)
        else:
            a.sample_every = AUTO_SAMPLE_MIN
        a.countdown = a.sample_every - 1


cdef int64_t socket_queued(int fd) noexcept nogil:
    """Bytes in the socket's send queue (not yet acknowledged), -1 if unknown."""
    cdef int queued = 0
    if ioctl(fd, SIOCOUTQ, &queued) != 0:
        return -1
    return queued


cdef void auto_before_write(AutoChoice *a, int fd) noexcept nogil:
    if a.measure_socket:
        a.queued_before = socket_queued(fd)


cdef void auto_after_write(AutoChoice *a, int fd, size_t wire) noexcept nogil:
    """Account one write of ``wire`` bytes: the drain since the previous write."""
    cdef int64_t queued
    cdef int sndbuf = 0
    cdef socklen_t size = sizeof(sndbuf)
    if not a.measure_socket:
        return
    queued = socket_queued(fd)
    if queued < 0 or a.queued_before < 0:
        a.measure_socket = False    # not a socket that says: measure nothing
        return
    getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &size)
    auto_account_write(a, queued, sndbuf, wire, monotonic())


cdef void auto_account_write(AutoChoice *a, int64_t queued, int sndbuf, size_t wire,
                             double now) noexcept nogil:
    """auto_after_write's measurements: ``queued`` bytes in the send queue of
    ``sndbuf`` after the write, at ``now``."""
    cdef double seconds = now - a.last_write
    cdef double drained = <double>a.queued_after + wire - queued, weight
    cdef bint backed_up = a.queued_before * 4 >= sndbuf > 0
    if a.level_index >= 0:
        a.idle = 0 if backed_up else a.idle + 1
        if a.idle >= a.idle_limit:      # the CPU sets the pace: measure the link again, raw
            a.idle = 0
            a.idle_limit = min(a.idle_limit * 2, <uint32_t>AUTO_IDLE_MAX)
            a.drained = a.drain_seconds = a.drain = 0
            a.settled = 0
            a.level_index = -1
            a.last_write = now
            a.queued_after = queued
            return
    if a.last_write > 0 and seconds > 0 and drained > 0:
        # Backed up, the interval shows the link's pace; otherwise it is a lower
        # bound, which counts only when above the estimate.
        if backed_up or (a.drain > 0 and drained / seconds > a.drain):
            weight = AUTO_WEIGHT if a.drain_seconds > 0 else 1
            a.drained += weight * (drained - a.drained)
            a.drain_seconds += weight * (seconds - a.drain_seconds)
            a.drain = a.drained / a.drain_seconds
        if backed_up and a.settled < AUTO_SETTLE:
            a.settled += 1
    a.last_write = now
    a.queued_after = queued
    if a.level_index >= 0 or a.settled >= AUTO_SETTLE:
        auto_decide(a)


# ---------------------------------------------------------------- test face

cdef class AutoModel:
    """One channel's auto choice fed given measurements instead of a socket's and
    the clock's, so tests can play a link that changes."""
    cdef AutoChoice a

    def __cinit__(self, double pace_rate=0):
        auto_init(&self.a, pace_rate, True)

    def pick(self) -> int:
        """The level index for the next payload, -1: raw."""
        return auto_pick(&self.a)

    def compressed(self, int index, size_t raw, size_t wire, double seconds):
        """A payload of ``raw`` bytes went out as ``wire`` in ``seconds`` of zstd."""
        auto_compressed(&self.a, index, raw, wire, seconds)

    def wrote(self, int64_t queued_before, int64_t queued_after, size_t wire, double now,
              int sndbuf):
        """A write of ``wire`` bytes: the send queue held ``queued_before`` bytes
        before it and ``queued_after`` after it, at ``now`` seconds."""
        self.a.queued_before = queued_before
        auto_account_write(&self.a, queued_after, sndbuf, wire, now)
