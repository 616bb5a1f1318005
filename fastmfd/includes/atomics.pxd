# Declarations for includes/atomics.h: sequentially consistent atomics on
# naturally aligned words inside MAP_SHARED segments.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "atomics.h" nogil:
    uint32_t fm_load32(const uint32_t *p)
    uint64_t fm_load64(const uint64_t *p)
    void fm_store32(uint32_t *p, uint32_t v)
    void fm_store64(uint64_t *p, uint64_t v)
    bint fm_cas32(uint32_t *p, uint32_t expected, uint32_t desired)
    bint fm_cas64(uint64_t *p, uint64_t expected, uint64_t desired)
    uint32_t fm_fetch_add32(uint32_t *p, uint32_t v)
    uint32_t fm_fetch_sub32(uint32_t *p, uint32_t v)
    uint64_t fm_fetch_add64(uint64_t *p, uint64_t v)
    uint64_t fm_fetch_or64(uint64_t *p, uint64_t v)
    uint64_t fm_fetch_and64(uint64_t *p, uint64_t v)
    uint64_t fm_exchange64(uint64_t *p, uint64_t v)
