"""Decode captured multifd channel bytes: fastmfd's own and a real QEMU 7.2's.

One file per captured connection. Each is classified by its first bytes, the
main channel is decoded first (it names the blocks and, for QEMU 7.2, carries
the zero pages, each kept with its round), then the multifd channels are
decoded round by round, so a page sent again in a later round overwrites the
earlier copy exactly as the SYNC barriers order them on a real destination
(spec §5.3, DESIGN §4.6)::

    FILE... ── first bytes ─┬─ "QEVM" ─────▶ protocol.qemu ───┐ blocks; ZERO/PAGE records
                            │                                  │ into the image, by round
                            ├─ "FMFD" ─────▶ fastmfd_main ─────┤ SETUP, ROUND_END, old-way
                            │  (channel hdr type 0)            │ device chunks
                            └─ 0x11223344 ─▶ multifd.open_channels: init packet, id
                               (channel hdr type 2/3)   │
        for round r = 0, 1, ...:                        ▼
            every channel (by id) up to and including its next SYNC packet
            (multifd.ChannelDecoder: one persistent decompressor each), its pages
            replacing a main channel copy of round r or before
                                                        ▼
            contents.RamImage {block: {offset: page}}, contents.DeviceChunks (by idx)
                                                        ▼
        records.Capture: .channels, .blocks, .ram, .devices, .summary() ──▶ command

Every fault in any file is one :class:`~fastmfd.errors.ProtocolError` located
as ``"<file> at byte <offset>"`` and naming the field; every length read from
a file is checked against the bytes really there before it is used, and
decompression is bounded by the page count in the header (``_core`` codecs).

A fact two files must agree on (a block name or size, the UUID, the number
of rounds) is reported in the file where the disagreement shows, which is not
always the damaged one: the capture cannot tell which side is wrong.

Limits: QEMU captures are decoded up to the main channel's first device
section (device sections are not decoded, but the stream must end with
QEMU_VM_EOF and the VM description, which QEMU sends in precopy unless the
machine suppresses it); a multifd channel cut exactly at a packet boundary is
only caught when its main channel is in the capture (SYNC count against the
main channel's round ends). A compressed device-state packet is inflated
with a bound — the SETUP's chunk size, or 64 MiB without SETUP — since its
header does not say how large the chunk is.

Modules, each importing only those listed before it (and the protocol layer:
``protocol.qemu`` decodes QEMU's main channel, ``protocol.bytereader`` reads
every file)::

    records       PacketRecord, Channel, FastmfdMainChannel, Capture: the result
    session       Session: what the decoders must know; the compression flags
    setup_rules   apply_setup, check_arguments: SETUP (read leniently) into the session
    contents      RamImage, DeviceChunks: pages and device state put together
    fastmfd_main  decode_fastmfd_main: fastmfd's main channel
    multifd       open_channels, ChannelDecoder, check_rounds: the multifd channels
    capture       read_capture: the entry point
    command       the ``fastmfd inspect`` arguments, cli_main and its tables
"""
