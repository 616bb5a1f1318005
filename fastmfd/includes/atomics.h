/* C11 atomics on memory shared between processes.
 *
 * Every shared counter, flag and stack head in fastmfd lives in a MAP_SHARED
 * segment that several processes map at different addresses, so only
 * lock-free, address-free operations are allowed: the GCC/Clang __atomic
 * builtins on naturally aligned 32- and 64-bit words. All of them are
 * sequentially consistent; the hot paths touch them a few times per packet,
 * where the cost of a full barrier is noise next to a 512 KiB writev. */
#ifndef FASTMFD_ATOMICS_H
#define FASTMFD_ATOMICS_H

#include <stdint.h>

#define FM_SC __ATOMIC_SEQ_CST

static inline uint32_t fm_load32(const uint32_t *p) { return __atomic_load_n(p, FM_SC); }
static inline uint64_t fm_load64(const uint64_t *p) { return __atomic_load_n(p, FM_SC); }
static inline void fm_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, FM_SC); }
static inline void fm_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, FM_SC); }

static inline int fm_cas32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, FM_SC, FM_SC);
}
static inline int fm_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, FM_SC, FM_SC);
}

static inline uint32_t fm_fetch_add32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, FM_SC); }
static inline uint32_t fm_fetch_sub32(uint32_t *p, uint32_t v) { return __atomic_fetch_sub(p, v, FM_SC); }
static inline uint64_t fm_fetch_add64(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, FM_SC); }
static inline uint64_t fm_fetch_or64(uint64_t *p, uint64_t v) { return __atomic_fetch_or(p, v, FM_SC); }
static inline uint64_t fm_fetch_and64(uint64_t *p, uint64_t v) { return __atomic_fetch_and(p, v, FM_SC); }
static inline uint64_t fm_exchange64(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, FM_SC); }

#endif
