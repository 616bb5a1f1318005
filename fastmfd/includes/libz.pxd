# The part of zlib.h the core uses: one deflate or inflate stream per channel.
cdef extern from "zlib.h" nogil:
    ctypedef struct z_stream:
        const unsigned char *next_in
        unsigned int avail_in
        unsigned long total_in
        unsigned char *next_out
        unsigned int avail_out
        unsigned long total_out
        const char *msg
    ctypedef z_stream *z_streamp
    int Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_NO_FLUSH, Z_SYNC_FLUSH, Z_DEFLATED
    int Z_DEFAULT_STRATEGY, MAX_WBITS
    int deflateInit2(z_streamp strm, int level, int method, int windowBits, int memLevel,
                     int strategy)
    int deflate(z_streamp strm, int flush)
    int deflateEnd(z_streamp strm)
    int inflateInit2(z_streamp strm, int windowBits)
    int inflate(z_streamp strm, int flush)
    int inflateEnd(z_streamp strm)
    unsigned long compressBound(unsigned long sourceLen)
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len)
