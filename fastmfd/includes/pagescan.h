/* Zero-page detection at memory speed (QEMU: buffer_is_zero).
 *
 * Most non-zero pages differ from zero in their first bytes, so the first
 * 16 bytes are tested on their own; the rest is OR-reduced 128 (AVX2) or 64
 * (SSE2) bytes per step with an early exit, which keeps the loop bound by
 * memory bandwidth on all-zero pages. The AVX2 variant is picked once, when
 * the core is imported. A tail shorter than 64 bytes is checked bytewise. */
#ifndef FASTMFD_PAGESCAN_H
#define FASTMFD_PAGESCAN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2")))
static int fm_is_zero_avx2(const unsigned char *p, size_t len) {
    size_t i = 0;
    for (; i + 128 <= len; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(p + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(p + i + 96));
        __m256i x = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if (!_mm256_testz_si256(x, x))
            return 0;
    }
    for (; i < len; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + i));
        if (!_mm256_testz_si256(a, a))
            return 0;
    }
    return 1;
}

static int fm_is_zero_sse2(const unsigned char *p, size_t len) {
    const __m128i zero = _mm_setzero_si128();
    for (size_t i = 0; i < len; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(p + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(p + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(p + i + 48));
        __m128i x = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(x, zero)) != 0xFFFF)
            return 0;
    }
    return 1;
}
#endif

static int fm_is_zero_generic(const unsigned char *p, size_t len) {
    for (size_t i = 0; i < len; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, sizeof w);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
            return 0;
    }
    return 1;
}

typedef int (*fm_is_zero_fn)(const unsigned char *, size_t);

static fm_is_zero_fn fm_pick_is_zero(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return fm_is_zero_avx2;
    return fm_is_zero_sse2;
#else
    return fm_is_zero_generic;
#endif
}

static fm_is_zero_fn fm_is_zero_impl = fm_is_zero_generic;

/* Called once when the core is imported, before any thread scans. */
static void fm_pagescan_init(void) { fm_is_zero_impl = fm_pick_is_zero(); }

/* Nonzero when p[0..len) is all zero bytes. */
static inline int fm_buffer_is_zero(const void *buf, size_t len) {
    const unsigned char *p = (const unsigned char *)buf;
    size_t body = len & ~(size_t)63;
    uint64_t head[2];
    for (size_t i = body; i < len; i++)
        if (p[i])
            return 0;
    if (body == 0)
        return 1;
    memcpy(head, p, sizeof head);
    if (head[0] | head[1])
        return 0;
    return fm_is_zero_impl(p, body);
}

#endif
