# The C-level contract of fastmfd._core (asyncpg / uvloop style).
#
# Everything one part of the core relies on from another is declared here:
# the constants, the structs that lie in memory other code reads (wire
# headers, shared-memory headers, pipe records), every cdef class with its C
# fields (what each holds, who writes it) and the cdef functions the .pxi
# files call across. A helper that only its own .pxi uses stays there. C
# headers are declared only under includes/.
#
# Constants have one name each, the same in C and in Python: `cpdef enum`
# for those the Python side uses (the wire vocabulary, worker commands and
# events), `cdef enum` for those only the core uses.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from posix.types cimport off_t
from posix.uio cimport iovec

from fastmfd.includes.libz cimport z_stream
from fastmfd.includes.libzstd cimport ZSTD_CCtx, ZSTD_DCtx, ZSTD_outBuffer
from fastmfd.includes.openssl cimport SSL, SSL_CTX
from fastmfd.includes.system cimport sem_t


# ================================================================ _wire.pxi

cpdef enum:
    # Wire facts (DESIGN §4, spec §1-§3, §6).
    MULTIFD_MAGIC = 0x11223344
    CHANNEL_HEADER_SIZE = 12
    INIT_PACKET_SIZE = 64
    DEVICE_HEADER_SIZE = 276
    RAM_CHECKSUM_AT = 40            # checksum extension: a RAM header's unused64[0]
    DEVICE_CHECKSUM_SIZE = 8        # checksum extension: a BE u64 after a device payload
    CHUNK_HEADER_SIZE = 12

    FLAG_SYNC = 0x01
    FLAG_ZLIB = 0x02
    FLAG_ZSTD = 0x04
    FLAG_DEVICE_STATE = 0x40
    FLAG_STORED = 0x100             # fastmfd extension: payload sent uncompressed
    CHUNK_FLAG_LAST = 0x01

    CHANNEL_MAIN = 0
    CHANNEL_POSTCOPY = 1
    CHANNEL_MULTIFD = 2
    CHANNEL_DEVICE_STATE = 3

cdef enum:
    MULTIFD_VERSION = 1
    ZSTD_WINDOW_LOG_MAX = 25        # a receiving channel's zstd window: at most 32 MiB
    CHANNEL_HEADER_BODY = 4         # the header_size value: one BE u32 channel_type
    RAM_HEADER_FIXED = 320          # RAM header bytes before the offset array
    IDSTR_SIZE = 256                # a NUL-padded name field (ramblock, idstr)
    MAX_NAME_LEN = 255              # longest region / device name (plus a NUL)
    CHUNK_VERSION = 0
    CHUNK_IDX_INVALID = 0xFFFFFFFF
    COMPRESSION_MASK_72 = 0x0E      # compression bits QEMU 7.2 defines
    COMPRESSION_MASK = 0x3E         # ... QEMU >= 9.0


cdef struct WireError:              # filled by a decoder that refuses a field
    const char *packet              # which structure: "RAM packet", "init packet", ...
    const char *field               # which field failed
    char received[300]              # the value received, as text
    char expected[300]              # what was expected, as text


cdef struct RamLayout:              # one session's RAM packet geometry; set by ram_layout_init
    uint32_t packet_pages           # offsets in the header (QEMU page_count)
    uint32_t page_size
    uint32_t header_size            # RAM_HEADER_FIXED + 8 * packet_pages
    bint qemu72                     # QEMU 7.2: stale fields in empty packets, no zero pages
    uint32_t comp_flag              # compression bit every data packet carries
    bint comp_optional              # "auto": a data packet carries comp_flag or no bit (raw)
    uint32_t extensions             # negotiated fastmfd flag bits (FLAG_STORED)
    bint checksum                   # unused64[0] carries a CRC-32 of the payload
    uint32_t max_payload            # bound on next_packet_size of compressed packets


cdef struct RamPacketInfo:          # a validated RAM header, as ram_decode leaves it
    uint32_t flags
    uint32_t pages_alloc
    uint32_t normal_pages
    uint32_t zero_pages
    uint32_t next_packet_size
    uint64_t packet_num
    uint64_t checksum
    const uint8_t *ramblock         # NUL-terminated name inside the header buffer
    const uint8_t *offsets          # BE u64 offsets: normal pages, then zero pages
    int region                      # index into the region table; -1 for empty packets


cdef struct RegionEntry:            # what ram_decode checks a ramblock and its offsets against
    char name[256]
    uint64_t size


cdef struct DeviceHeaderInfo:       # a validated device-state header
    uint32_t flags
    char idstr[256]
    uint32_t instance_id
    uint32_t next_packet_size


cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]

cdef inline uint64_t ld64(const uint8_t *p) noexcept nogil:
    return ((<uint64_t>ld32(p)) << 32) | ld32(p + 4)

cdef inline void st32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = v >> 16
    p[2] = v >> 8
    p[3] = v

cdef inline void st64(uint8_t *p, uint64_t v) noexcept nogil:
    st32(p, <uint32_t>(v >> 32))
    st32(p + 4, <uint32_t>v)


cdef int raise_wire_error(WireError *err) except -1
cdef bytes encode_name(object name, str what)
cdef int ram_layout_init(RamLayout *lay, uint32_t packet_pages, uint32_t page_size, str layout,
                         uint32_t comp_flag, uint32_t extensions, bint checksum,
                         bint comp_optional) except -1
cdef int ram_decode(const RamLayout *lay, const RegionEntry *regions, int nregions,
                    const uint8_t *p, RamPacketInfo *out, WireError *err,
                    int region_hint) noexcept nogil
cdef size_t ram_encode(const RamLayout *lay, uint8_t *p, uint32_t flags, uint64_t packet_num,
                       const char *ramblock, size_t name_len,
                       const uint64_t *normal, uint32_t nnormal,
                       const uint64_t *zero, uint32_t nzero,
                       uint32_t next_packet_size, uint64_t checksum) noexcept nogil
cdef int device_decode(const uint8_t *p, uint32_t comp_flag, bint comp_optional,
                       uint32_t extensions, uint32_t max_payload, DeviceHeaderInfo *out,
                       WireError *err) noexcept nogil
cdef void device_encode(uint8_t *p, uint32_t flags, const char *idstr, size_t idstr_len,
                        uint32_t instance_id, uint32_t next_packet_size) noexcept nogil
cdef int chunk_decode(const uint8_t *p, uint32_t *idx, uint32_t *flags,
                      WireError *err) noexcept nogil


cdef class RamPacket:
    cdef readonly uint32_t flags
    cdef readonly uint32_t pages_alloc
    cdef readonly uint32_t normal_pages
    cdef readonly uint32_t zero_pages
    cdef readonly uint32_t next_packet_size
    cdef readonly uint64_t packet_num
    cdef readonly uint64_t checksum
    cdef readonly str ramblock
    cdef readonly object offsets        # numpy uint64: normal pages
    cdef readonly object zero_offsets   # numpy uint64: zero pages
    cdef readonly uint32_t payload_size # bytes of payload following the header


cdef class RamPacketCodec:
    cdef RamLayout lay
    cdef RegionEntry *regions       # owned (PyMem); NULL when no region table was given
    cdef int nregions               # -1: no table, offsets are checked for alignment only
    cdef int hint                   # the region of the last packet: the usual next one
    cdef object last_ramblock       # encode(): the last str/bytes name and its encoding,
    cdef bytes last_raw             # as a sender names the same region packet after packet

    cdef int decode_into(self, const uint8_t *p, RamPacketInfo *info) except -1
    cdef bytes ramblock_bytes(self, object ramblock)


# ================================================================ _shared.pxi

cdef enum:
    HEADER_ALIGN = 64               # the arrays after each header start on a cache line
    POOL_MAGIC = 0x464d4d504f4f4c31         # "FMMPOOL1"
    SELECTOR_MAGIC = 0x464d4d53454c4531     # "FMMSELE1"
    BITMAP_MAGIC = 0x464d4d4449525431       # "FMMDIRT1"
    COUNTERS_MAGIC = 0x464d4d434e545231     # "FMMCNTR1"

    # A Counters row: one u64 per field, in COUNTER_FIELDS order.
    ST_PACKETS = 0                  # RAM packets (SYNC packets included)
    ST_NORMAL = 1                   # pages sent / applied with data
    ST_ZERO = 2                     # pages listed as zero
    ST_WIRE = 3                     # bytes on the wire (headers and payloads)
    ST_DEVICE_PACKETS = 4
    ST_DEVICE_BYTES = 5             # chunk bytes (header + data), before compression
    ST_SYNCS = 6
    ST_JOBS = 7
    ST_COMPRESSED = 8               # payloads (RAM pages, device chunks) sent/received compressed
    ST_RAW = 9                      # ... and raw
    ST_FIELDS = 10


# Each shared header starts with its magic, stored last by create() so an
# attacher never sees a half-formatted structure.

cdef struct PoolHeader:
    uint64_t magic
    uint64_t slot_size              # usable bytes per slot
    uint64_t stride                 # distance between slots (slot_size rounded to 64)
    uint64_t data_offset            # first slot, page aligned
    uint64_t head                   # Treiber stack head: (ABA tag << 32) | (slot + 1); 0 = empty
    uint32_t nslots
    uint32_t aborted
    sem_t free_slots                # counts slots on the stack; waiters sleep here


cdef struct SelectorHeader:
    uint64_t magic
    uint64_t cursor                 # next_channel, advanced by fetch-add
    uint32_t nchannels
    uint32_t aborted
    uint32_t waiters                # callers asleep in select(): release() posts only then
    uint32_t _pad
    sem_t ready                     # posted by release() when someone may be waiting


cdef struct BitmapHeader:
    uint64_t magic
    uint64_t npages


cdef struct CountersHeader:
    uint64_t magic
    uint64_t packet_num             # the session-wide packet number (atomic fetch-add)
    uint32_t nrows
    uint32_t _pad


cdef class _SharedStructure:
    cdef readonly object segment    # fastmfd.shm.SharedMemory: its creator unlinks it
    cdef uint8_t *base              # the mapping; NULL once closed
    cdef size_t size                # bytes mapped
    cdef uint64_t magic             # set by each structure's __cinit__: its header's magic
    cdef size_t header_size         # ... and the size of that header

    cdef int _open(self, object segment, tuple geometry) except -1
    cdef int _map(self, object segment, size_t need) except -1
    # The hooks each structure fills in; _open runs them in this order.
    cdef int _set_geometry(self, tuple geometry) except -1
    cdef size_t _locate(self) except 0
    cdef int _format(self) except -1
    cdef int check_open(self) except -1


cdef class BufferPool(_SharedStructure):
    cdef PoolHeader *hdr
    cdef uint32_t *next_free        # per slot: the slot below it on the stack, + 1
    cdef uint32_t *held             # per slot: 1 while acquired
    cdef bytearray backed           # per slot, this process: known to have memory

    cdef uint8_t *slot_ptr(self, uint32_t slot) noexcept nogil
    cdef int64_t _pop(self) noexcept nogil
    cdef void _push(self, uint32_t slot) noexcept nogil
    cdef int64_t acquire_slot(self, double timeout) except -2
    cdef int release_slot(self, uint32_t slot) except -1
    cdef int check_slot(self, uint32_t slot) except -1
    cdef int back_slot(self, uint32_t slot) except -1


cdef class ChannelSelector(_SharedStructure):
    cdef SelectorHeader *hdr
    cdef uint32_t *busy             # per channel: 1 while a job runs on it

    cdef int try_select(self) noexcept nogil
    cdef int select_channel(self, double timeout) except -2
    cdef int release_channel(self, uint32_t ch) except -1
    cdef int check_channel(self, uint32_t ch) except -1


cdef class DirtyBitmap(_SharedStructure):
    cdef BitmapHeader *hdr
    cdef uint64_t *words            # bit p of words[p // 64]: page p
    cdef size_t nwords

    cdef int mark_range(self, uint64_t first, uint64_t count) except -1
    cdef void _extract(self, const uint64_t *taken, uint64_t[::1] out) noexcept


cdef class Counters(_SharedStructure):
    cdef CountersHeader *hdr
    cdef uint64_t *rows             # nrows rows of ST_FIELDS; row r written only by channel r

    cdef uint64_t *row(self, uint32_t r) except NULL


# ================================================================ _pages.pxi

cpdef enum:
    # Shortest run of pages clear_page_runs punches out of a sparse file. Measured
    # (README, issue #10): on ext4 punching beats zero-filling and writing back from
    # runs of 8 to 16 pages on; on tmpfs it never beats zero-filling, and costs
    # about the same from 32 pages on (and frees the memory).
    PUNCH_MIN_BYTES = 128 << 10

cdef size_t pages_to_iov(iovec *iov, uint8_t *base, const uint64_t *offsets, size_t n,
                         size_t page_size) noexcept nogil
cdef int populate_for_write(const iovec *iov, size_t count, size_t skip_upto=*,
                            bint read=*) noexcept nogil
cdef int raise_unpopulated(int err, str what) except -1
cdef size_t gather_iov(const iovec *iov, size_t n, uint8_t *dst) noexcept nogil
cdef ssize_t writev_all(int fd, iovec *iov, size_t count) noexcept nogil
cdef ssize_t readv_all(int fd, iovec *iov, size_t count) noexcept nogil
cdef ssize_t read_exact(int fd, void *buf, size_t size) noexcept nogil
cdef ssize_t write_exact(int fd, const void *buf, size_t size) noexcept nogil


# ================================================================ _codecs.pxi

cdef enum:
    BOUNCE_SIZE = 65536             # libz deflates through a bounce buffer this large
    STORED_BLOCK_MAX = 65535        # bytes a deflate stored block holds (after a 5-byte header)
    ZLIB_HEADER_SIZE = 2            # CMF, FLG (no preset dictionary)


cdef class Codec:
    cdef readonly uint32_t flag     # the wire bit: FLAG_ZLIB or FLAG_ZSTD
    cdef uint8_t *out               # compressed output of the last packet (owned, PyMem)
    cdef size_t out_cap

    cdef int reserve(self, size_t raw_bytes) except -1
    cdef size_t bound(self, size_t raw_bytes) noexcept
    cdef ssize_t compress_iov(self, const iovec *iov, size_t n, size_t raw_bytes,
                              const uint8_t **result) except -1
    cdef int decompress_iov(self, const uint8_t *src, size_t size, const iovec *iov,
                            size_t n) except -1
    cdef ssize_t decompress_bounded(self, const uint8_t *src, size_t size, uint8_t *dst,
                                    size_t cap) except -1


cdef class ZlibCodec(Codec):
    cdef z_stream strm
    cdef bint compressing
    cdef bint ready                 # strm was initialised: __dealloc__ ends it
    cdef uint8_t bounce[BOUNCE_SIZE]


cdef class ZstdCodec(Codec):
    cdef ZSTD_CCtx *cctx            # compressing; NULL otherwise
    cdef ZSTD_DCtx *dctx            # decompressing; NULL otherwise
    cdef readonly int level         # compressing: the level of the next packet
    cdef int frame_level            # ... and of the frame in progress
    cdef bint in_frame              # a frame was started (and not ended)

    cpdef int set_level(self, int level) except -1
    cdef int end_frame(self, ZSTD_outBuffer *out) except -1


cdef class IsalZlibCodec(Codec):
    cdef bint compressing
    cdef object stream              # isal_zlib compressobj / decompressobj
    cdef object sync_flush
    cdef object error               # isal_zlib.error
    cdef object last                # bytes of the last packet, kept alive for writev
    cdef bint header_sent           # the zlib header opens the stream's first packet
    cdef uint8_t *gather            # the packet's pages, gathered (owned, PyMem)
    cdef size_t gather_cap

    cdef bytes _inflate(self, const uint8_t *src, size_t size, size_t limit, str what)


# ================================================================ _tls.pxi

cdef enum:
    TLS_RECORD = 16384              # plaintext bytes of a full TLS record
    TLS_DIRECT_MIN = 16384          # iovec elements this large go to SSL_write as they are
    TLS_STAGING_SIZE = 65536        # an engine's gather buffer for the smaller ones
    TLS_READ_BUFFER = 262144        # OpenSSL's read-ahead buffer (several records per read)


cdef struct Pacer:                  # a send channel's token bucket (max_bandwidth's share)
    double rate                     # bytes per second; 0: no limit
    double tokens                   # bytes that may go now; negative: owed, slept off
    double last                     # monotonic() of the last refill


cdef struct Link:                   # what an engine reads and writes through
    int fd                          # the channel's socket
    SSL *ssl                        # NULL: plain socket (transfer_all); else a TLSChannel's
    uint8_t *staging                # TLS gather buffer (owned by the engine); NULL: none
    size_t staging_cap              # a multiple of TLS_RECORD
    char err[200]                   # OpenSSL's reason of the last -EPROTO


cdef ssize_t link_writev(Link *link, iovec *iov, size_t count) noexcept nogil
cdef ssize_t link_readv(Link *link, iovec *iov, size_t count) noexcept nogil
cdef ssize_t link_read_exact(Link *link, void *buf, size_t size) noexcept nogil
cdef ssize_t link_write_exact(Link *link, const void *buf, size_t size) noexcept nogil
cdef int link_close_write(Link *link) noexcept nogil


cdef class TLSChannel:
    cdef SSL_CTX *ctx               # owned
    cdef SSL *ssl                   # owned; NULL until configured
    cdef Link link                  # fd + ssl, no staging (send_all writes one buffer)
    cdef readonly int fd            # not owned: the Python socket object closes it
    cdef readonly bint server

    cdef int _configure(self, int fd, bint server, object cert, object key, object ca,
                        object ciphers) except -1
    cdef int _set_ciphers(self, str ciphers) except -1
    cdef int _expect_host(self, str hostname) except -1
    cdef int _handshake(self, double timeout) except -1
    cdef int _check(self, ssize_t rc, size_t want, str what, double timeout) except -1


# ================================================================ _adaptive.pxi

cdef struct AutoChoice:             # compression="auto": one send channel's measurements
    double pace_rate                # max_bandwidth's share: a known link rate (0: none)
    bint measure_socket             # False for a peer on this host (or a non-socket)
    double drained                  # averages of the bytes that left the send queue
    double drain_seconds            # between two writes, and of the time between them
    double drain                    # drained / drain_seconds: wire bytes/s the link takes
    uint32_t settled                # backed-up intervals measured so far (up to AUTO_SETTLE)
    double raw_bytes                # per compressed payload, averages of: its raw bytes,
    double busy                     # the seconds level 1 would take to compress it,
    double saved                    # and the bytes level 1 would save
    double speed                    # raw_bytes / busy: raw bytes/s zstd compresses (level 1)
    double savings                  # saved / raw_bytes: 1 - compressed/raw (level 1)
    int level_index                 # the level the next payloads go at; -1: raw
    int best_index                  # the best level even when raw is better (samples use it)
    uint32_t sample_every           # while raw: one payload in this many is compressed
    uint32_t countdown              # payloads until the next sample
    bint sampling                   # the payload being compressed is a sample
    int64_t queued_before           # SIOCOUTQ before the write in progress
    int64_t queued_after            # ... and after the previous one
    double last_write               # monotonic() after the previous write
    uint32_t idle                   # compressed writes in a row that found the queue not backed up
    uint32_t idle_limit             # ... after which the link is measured again, raw


cdef void auto_init(AutoChoice *a, double pace_rate, bint measure_socket) noexcept nogil
cdef int auto_pick(AutoChoice *a) noexcept nogil
cdef void auto_compressed(AutoChoice *a, int index, size_t raw, size_t wire,
                          double seconds) noexcept nogil
cdef void auto_before_write(AutoChoice *a, int fd) noexcept nogil
cdef void auto_after_write(AutoChoice *a, int fd, size_t wire) noexcept nogil


# ================================================================ _channel.pxi

cpdef enum:
    # A Command's kind (source main process -> send worker).
    CMD_RAM = 1                     # region, count pages listed in this channel's mailbox
    CMD_DEVICE = 2                  # device, chunk bytes in pool slot `slot`
    CMD_SYNC = 3                    # a SYNC packet closing round `round`
    CMD_QUIT = 4                    # no more packets: half-close the connection and stop

    # What RecvEngine.run() returns.
    EVENT_EOF = 0                   # the peer closed the channel at a packet boundary
    EVENT_SYNC = 1                  # a SYNC packet was applied (round in .rounds)

    DESCRIPTOR_SIZE = 24            # sizeof(Descriptor), read whole from the reassembly pipe


cdef struct Command:                # 32 bytes: at most PIPE_BUF, so a pipe write is atomic
    uint32_t kind                   # CMD_*
    uint32_t target                 # RAM: region index; DEVICE: device index
    uint32_t count                  # RAM: pages in the mailbox; DEVICE: bytes in the slot
    uint32_t slot                   # DEVICE: pool slot
    uint64_t round                  # SYNC: round number
    uint64_t reserved


cdef struct Descriptor:             # a device chunk in a destination pool slot
    uint32_t device
    uint32_t idx
    uint32_t flags
    uint32_t slot
    uint32_t length                 # chunk header + data bytes in the slot
    uint32_t channel


cdef struct Extents:                # where a file's data is, as lseek last said (extent_at)
    int fd                          # -1: not asked (all data)
    off_t hole_from                 # [hole_from, data_from) a hole, [data_from, data_to) data;
    off_t data_from                 # hole_from = data_to = -1: nothing known
    off_t data_to


cdef struct RegionRef:              # a region as the engines see it
    uint8_t *base                   # written only at a destination (never a read-only region)
    uint64_t size
    bint writable                   # mapped writable (a source's may be read-only)
    uint64_t *received              # destination: bit per page written since the session began
    bint fresh                      # destination: memory started zero-filled (zero pages may be skipped)
    bint sparse                     # destination: a sparse file mapped shared: clearing punches holes
    bint populate_read              # its file is on tmpfs: see populate_for_write
    uint8_t *place                  # destination, fresh memory: a second mapping that pages are
                                    # placed into with UFFDIO_COPY (NULL: written through base)
    Extents holes                   # a source's, or a destination's not fresh: its file's holes
                                    # on tmpfs, zero already (a read would allocate them)
    char name[256]
    size_t name_len


cdef class _RegionTable:
    cdef RegionRef *refs            # owned (PyMem), in SETUP order
    cdef int count
    cdef RegionEntry *entries       # name/size table for ram_decode (owned, PyMem)
    cdef list keep                  # the regions and bitmaps the pointers point into
    cdef int uffd                   # the userfaultfd pages are placed with; < 0 without
    cdef bint tried_placing         # uffd was asked for (once per table)

    cdef void forget_holes(self) noexcept
    cdef uint8_t *placing_mapping(self, int fd, size_t size) noexcept


cdef class _EngineBase:
    cdef Link link                  # the channel's socket, through TLS when tls is set
    cdef TLSChannel tls             # None: plain socket; keeps link.ssl alive
    cdef readonly uint32_t channel
    cdef RamLayout lay
    cdef Codec codec                # None: no compression
    cdef _RegionTable regions
    cdef Counters counters
    cdef uint64_t *stats            # this channel's row of counters
    cdef BufferPool pool            # device chunks; None without devices
    cdef list device_names          # [(idstr bytes, instance_id)]
    cdef uint8_t *header            # one RAM header, reused for every packet
    cdef uint8_t *scratch           # compressed payloads; a checksummed packet's pages
    cdef size_t scratch_cap
    cdef uint32_t packet_cap        # pages a packet's buffers hold (channel_buffers)
    cdef readonly size_t buffer_bytes   # what the engine's buffers take (alloc)
    cdef iovec *iov                 # packet_cap + 2 entries
    cdef uint64_t *normal           # packet_cap byte offsets of the normal pages
    cdef uint64_t *zero             # packet_cap byte offsets of the zero pages
    cdef uint32_t crc_chain         # checksum of the channel's packets so far (packet_crc)

    cdef int _setup(self, int fd, uint32_t channel, dict params, object codec, list regions,
                    Counters counters, BufferPool pool, list devices, object received,
                    object fresh, TLSChannel tls, object sparse=*,
                    object place_fds=*, object hole_fds=*) except -1
    cdef int check_io(self, ssize_t rc, size_t want, str what, bint sending=*) except -1
    cdef void *alloc(self, size_t size, str what, str fields) except NULL


cdef class SendEngine(_EngineBase):
    cdef ChannelSelector selector
    cdef uint32_t selector_index    # this channel's index in selector
    cdef const uint64_t *mailbox    # page indices of the next RAM job, written by the main process
    cdef size_t mailbox_cap
    cdef object mailbox_keep        # keeps the mailbox buffer mapped
    cdef bint zero_detection
    cdef Pacer pacer                # holds this channel to params["rate"] bytes/s
    cdef bint auto                  # compression="auto": choice decides each payload
    cdef AutoChoice choice

    cdef const uint8_t *compress(self, iovec *iov, size_t n, size_t raw,
                                 ssize_t *size) except? NULL
    cdef ssize_t write_packet(self, iovec *iov, size_t k, size_t size) except -1

    cdef int send_ram(self, uint32_t region, uint32_t count) except -1
    cdef int send_packet(self, uint32_t flags, uint32_t region, uint8_t *base, uint32_t nn,
                         uint32_t nz, bint ram) except -1
    cdef int send_device(self, uint32_t device, uint32_t slot, uint32_t length) except -1


cdef class RecvEngine(_EngineBase):
    cdef int reassembly_fd          # where device chunk descriptors go; -1 without devices
    cdef bint ram_allowed           # False on a dedicated device-state channel
    cdef bint learn_compression     # QEMU: the first packet with pages sets codec and lay
    cdef readonly uint64_t rounds   # SYNC packets applied
    cdef int hint                   # the region of the last RAM packet
    cdef dict device_index          # (idstr bytes, instance_id) -> device number
    cdef uint32_t max_device_payload
    cdef uint8_t *unpacked          # a compressed packet's pages before they are placed (NULL:
                                    # no region is placed into)

    cdef bint recv_ram(self) except -1
    cdef int place_pages(self, RegionRef *ref, const uint8_t *pages, size_t k) except -1
    cdef int learn_method(self, uint32_t flags) except -1
    cdef int verify_crc(self, str what, size_t header_size, const iovec *iov, size_t n,
                        uint64_t expected) except -1
    cdef int recv_device(self) except -1
