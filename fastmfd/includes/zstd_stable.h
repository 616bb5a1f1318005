/* The part of libzstd's stable (>= 1.4.0) streaming API that fastmfd uses.
 *
 * When the development header is installed it is used as is. Otherwise the
 * declarations below, copied from the documented stable ABI, let the core
 * link against the runtime library (libzstd.so.1) that every Debian-like base
 * system ships. */
#ifndef FASTMFD_ZSTD_STABLE_H
#define FASTMFD_ZSTD_STABLE_H

#if defined(__has_include)
#  if __has_include(<zstd.h>)
#    include <zstd.h>
#    define FASTMFD_HAVE_ZSTD_H 1
#  endif
#endif

#ifndef FASTMFD_HAVE_ZSTD_H
#include <stddef.h>

typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
typedef struct ZSTD_inBuffer_s { const void *src; size_t size; size_t pos; } ZSTD_inBuffer;
typedef struct ZSTD_outBuffer_s { void *dst; size_t size; size_t pos; } ZSTD_outBuffer;
typedef enum { ZSTD_e_continue = 0, ZSTD_e_flush = 1, ZSTD_e_end = 2 } ZSTD_EndDirective;
typedef enum { ZSTD_c_compressionLevel = 100 } ZSTD_cParameter;
typedef enum { ZSTD_d_windowLogMax = 100 } ZSTD_dParameter;

ZSTD_CCtx *ZSTD_createCCtx(void);
size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx);
size_t ZSTD_CCtx_setParameter(ZSTD_CCtx *cctx, ZSTD_cParameter param, int value);
size_t ZSTD_compressStream2(ZSTD_CCtx *cctx, ZSTD_outBuffer *output, ZSTD_inBuffer *input,
                            ZSTD_EndDirective endOp);
ZSTD_DCtx *ZSTD_createDCtx(void);
size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx);
size_t ZSTD_DCtx_setParameter(ZSTD_DCtx *dctx, ZSTD_dParameter param, int value);
size_t ZSTD_decompressStream(ZSTD_DCtx *dctx, ZSTD_outBuffer *output, ZSTD_inBuffer *input);
size_t ZSTD_compressBound(size_t srcSize);
unsigned ZSTD_isError(size_t code);
const char *ZSTD_getErrorName(size_t code);
int ZSTD_minCLevel(void);
int ZSTD_maxCLevel(void);
#endif

#endif
