# The stable libzstd streaming API, through includes/zstd_stable.h.
cdef extern from "zstd_stable.h" nogil:
    ctypedef struct ZSTD_CCtx:
        pass
    ctypedef struct ZSTD_DCtx:
        pass
    ctypedef struct ZSTD_inBuffer:
        const void *src
        size_t size
        size_t pos
    ctypedef struct ZSTD_outBuffer:
        void *dst
        size_t size
        size_t pos
    ctypedef enum ZSTD_EndDirective:
        ZSTD_e_continue
        ZSTD_e_flush
        ZSTD_e_end
    ctypedef enum ZSTD_cParameter:
        ZSTD_c_compressionLevel
    ctypedef enum ZSTD_dParameter:
        ZSTD_d_windowLogMax
    ZSTD_CCtx *ZSTD_createCCtx()
    size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx)
    size_t ZSTD_CCtx_setParameter(ZSTD_CCtx *cctx, ZSTD_cParameter param, int value)
    size_t ZSTD_compressStream2(ZSTD_CCtx *cctx, ZSTD_outBuffer *output, ZSTD_inBuffer *input,
                                ZSTD_EndDirective endOp)
    ZSTD_DCtx *ZSTD_createDCtx()
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx)
    size_t ZSTD_DCtx_setParameter(ZSTD_DCtx *dctx, ZSTD_dParameter param, int value)
    size_t ZSTD_decompressStream(ZSTD_DCtx *dctx, ZSTD_outBuffer *output, ZSTD_inBuffer *input)
    size_t ZSTD_compressBound(size_t srcSize)
    unsigned ZSTD_isError(size_t code)
    const char *ZSTD_getErrorName(size_t code)
    int ZSTD_minCLevel()
    int ZSTD_maxCLevel()
