# Deterministic test content for synthetic devices: byte o of a stream made
# from `seed` is byte (o % 8) of splitmix64(seed, o // 8), little-endian. Any
# offset can be produced or checked without the bytes before it, at several
# GB/s, so a 100 MiB device costs no memory and almost no time.

cdef inline uint64_t pattern_word(uint64_t seed, uint64_t index) noexcept nogil:
    cdef uint64_t z = seed * <uint64_t>0x9E3779B97F4A7C15 + index + 1
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline uint8_t pattern_byte(uint64_t seed, uint64_t offset) noexcept nogil:
    return <uint8_t>(pattern_word(seed, offset >> 3) >> (8 * (offset & 7)))


cdef inline void store_le64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <uint8_t>(v >> (8 * k))


def fill_pattern(uint8_t[::1] buf, uint64_t seed, uint64_t offset):
    """Fill ``buf`` with the stream of ``seed`` from byte ``offset`` on."""
    cdef size_t i = 0, n = buf.shape[0]
    cdef uint8_t *p = &buf[0] if n else NULL
    with nogil:
        while i < n and (offset + i) & 7:
            p[i] = pattern_byte(seed, offset + i)
            i += 1
        while i + 8 <= n:
            store_le64(p + i, pattern_word(seed, (offset + i) >> 3))
            i += 8
        while i < n:
            p[i] = pattern_byte(seed, offset + i)
            i += 1


def check_pattern(const uint8_t[::1] buf, uint64_t seed, uint64_t offset):
    """Index of the first byte of ``buf`` that differs from the stream of
    ``seed`` at ``offset``, or -1 when all match."""
    cdef size_t i = 0, n = buf.shape[0]
    cdef const uint8_t *p = &buf[0] if n else NULL
    cdef uint8_t word[8]
    cdef ssize_t bad = -1
    with nogil:
        while i < n and bad < 0:
            if (offset + i) & 7 == 0 and i + 8 <= n:
                store_le64(word, pattern_word(seed, (offset + i) >> 3))
                if memcmp(word, p + i, 8) == 0:
                    i += 8
                    continue
            if p[i] != pattern_byte(seed, offset + i):
                bad = i
            i += 1
    return bad
