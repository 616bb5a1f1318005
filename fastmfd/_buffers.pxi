# How large a channel engine's buffers are (_channel.pxi allocates them): sized by the
# session's packet geometry, cut to what its largest region can use, and the same sum a
# destination charges against max_memory at SETUP (_engine/session_regions.py).

cdef struct ChannelBuffers:          # what an engine allocates, in bytes (channel_buffers)
    uint32_t pages                  # pages a packet's buffers hold
    size_t header, scratch, iov, offsets, unpacked


cdef ChannelBuffers channel_buffers(uint32_t packet_pages, uint32_t page_size,
                                    uint64_t largest_region, size_t chunk_size, bint devices,
                                    bint unpacks) noexcept nogil:
    """An engine's buffers for a session's geometry: sized for packet_pages, or for
    fewer pages where the session's largest region has fewer (ram_decode refuses a
    packet listing more pages than its region has), so that a SETUP of 128 MiB
    packets for a 4 KiB region does not make each channel allocate 272 MiB.
    ``devices``: room for a compressed device chunk too; ``unpacks``: a buffer
    where compressed pages are inflated before they are placed."""
    cdef ChannelBuffers b
    b.pages = <uint32_t>max(<uint64_t>1, min(<uint64_t>packet_pages,
                                             largest_region // page_size))
    b.header = max(<size_t>RAM_HEADER_FIXED + 8 * <size_t>packet_pages,
                   <size_t>DEVICE_HEADER_SIZE)
    b.scratch = ram_max_payload(b.pages, page_size)
    if devices:
        b.scratch = max(b.scratch, chunk_size * 2 + 65536)
    b.iov = (b.pages + 2) * sizeof(iovec)
    b.offsets = b.pages * sizeof(uint64_t)
    b.unpacked = <size_t>b.pages * page_size if unpacks else 0
    return b


def receive_channel_bytes(uint32_t packet_pages, uint32_t page_size, uint64_t largest_region,
                          size_t chunk_size, bint devices, str compression, bint tls=False):
    """What one receive channel allocates for a session (the buffers RecvEngine
    makes, as it caps them), with the largest zstd window a peer can make its
    decompressor hold where the session compresses with zstd: what a destination
    counts against max_memory per channel. Placing is assumed (the default for
    fresh memory): a compressed session's pages are inflated in a buffer first."""
    cdef bint compressed = compression != "none"
    cdef ChannelBuffers b = channel_buffers(packet_pages, page_size, largest_region,
                                            chunk_size, devices, compressed)
    return (b.header + b.scratch + b.iov + 2 * b.offsets + b.unpacked
            + (TLS_STAGING_SIZE if tls else 0)
            + ((1 << ZSTD_WINDOW_LOG_MAX) if compression in ("zstd", "auto") else 0))


cdef str packet_fields(uint32_t packet_pages, uint32_t page_size, uint32_t pages):
    """Where a packet buffer's size comes from, for an allocation that failed."""
    return (f"packet_pages {packet_pages} x page_size {page_size}, from SETUP"
            + (f", cut to the {pages} pages of the largest region"
               if pages < packet_pages else ""))
