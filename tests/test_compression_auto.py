"""compression="auto": each channel sends every payload raw or as zstd, at a level
it picks, and the header of each packet says which.

End to end, over real sockets and worker processes: images of every kind arrive
page-exact; over a throttled link (``max_bandwidth``) a compressible image ends
up compressed and an incompressible one raw, by the per-payload counts both
sides keep. On the wire: an auto session lets a packet be zstd or raw, nothing
else, and the zstd stream survives level changes (each starts a new frame).
"""

from __future__ import annotations

import os
import socket
import struct

import numpy as np
import pytest

import fastmfd
from fastmfd import _core
from fastmfd.errors import ProtocolError
from fastmfd.protocol.setup import Setup
from fastmfd.protocol.sockets import peer_on_this_host
from fastmfd.tools.images import english_like_text, fill_image
from migration_support import Migration
from wire_errors import put_u32, raises_protocol_error

MiB = 1 << 20
ZLIB, ZSTD = _core.FLAG_ZLIB, _core.FLAG_ZSTD


def _migrate(kind: str, size: int, **config) -> tuple[fastmfd.MigrationStats,
                                                      fastmfd.ReceiveStats]:
    image = fastmfd.Region.create("pc.ram", size)
    try:
        fill_image(image, kind)
        with Migration(fastmfd.MigrationConfig(channels=2, compression="auto",
                                               **config)) as migration:
            migration.source.add_region(image)
            stats, result = migration.run().ok()
            received = result.regions["pc.ram"].array
            assert np.array_equal(received, image.array), f"{kind}: pages differ"
            return stats, result.stats
    finally:
        image.close()


def _counts(channels) -> tuple[int, int]:
    return (sum(c.compressed_payloads for c in channels),
            sum(c.raw_payloads for c in channels))


@pytest.mark.parametrize("kind", ["random", "text", "mixed"])
def test_auto_moves_every_kind_of_image_page_exact(kind):
    stats, received = _migrate(kind, 8 * MiB)
    assert stats.compression == "auto"
    # Both ends count each payload by what its header said.
    assert _counts(stats.channels) == _counts(received.channels)
    assert sum(_counts(stats.channels)) > 0


def test_a_compressible_image_over_a_slow_link_goes_compressed():
    stats, received = _migrate("text", 16 * MiB, max_bandwidth=32 * MiB)
    compressed, raw = _counts(stats.channels)
    assert compressed >= 0.9 * (compressed + raw), (compressed, raw)
    assert _counts(received.channels) == (compressed, raw)
    assert stats.wire_bytes < 0.7 * stats.ram_bytes


def test_an_incompressible_image_over_a_slow_link_goes_raw():
    stats, received = _migrate("random", 16 * MiB, max_bandwidth=32 * MiB)
    compressed, raw = _counts(stats.channels)
    # Only samples are compressed: one payload in 16, then fewer.
    assert raw >= 0.8 * (compressed + raw), (compressed, raw)
    assert compressed >= 1, "auto never sampled the data"
    assert _counts(received.channels) == (compressed, raw)


def test_checksums_cover_raw_and_compressed_payloads_alike():
    """Samples go compressed among raw payloads: each CRC covers what was sent."""
    stats, received = _migrate("random", 8 * MiB, max_bandwidth=64 * MiB, checksum=True)
    compressed, raw = _counts(received.channels)
    assert compressed and raw, (compressed, raw)


def test_a_peer_on_this_host_gets_raw_pages_unless_a_cap_makes_compression_pay():
    """On loopback both ends share the CPUs: without a cap nothing is compressed."""
    stats, _ = _migrate("text", 8 * MiB)
    assert _counts(stats.channels) == (0, stats.raw_payloads)


def test_device_state_goes_through_the_same_choice():
    config = fastmfd.MigrationConfig(channels=1, device_state_channels=1, compression="auto",
                                     max_bandwidth=64 * MiB, device_chunk_size=256 << 10)
    with Migration(config) as migration:
        migration.source.add_device(fastmfd.SyntheticDevice("vfio", 0, 4 * MiB, seed=3))
        migration.destination.add_loader("vfio", 0, fastmfd.VerifyLoader(4 * MiB, seed=3))
        stats, result = migration.run().ok()
    assert result.devices == {("vfio", 0): 4 * MiB}
    device = stats.channels[-1]
    assert device.compressed_payloads + device.raw_payloads == device.device_packets
    # Over a capped link the device channel decided too: it compressed (or sampled)
    # at least one chunk, which a channel without the choice never does.
    assert device.compressed_payloads >= 1, (device.compressed_payloads, device.raw_payloads)


# ---------------------------------------------------------------- the wire

def _codec(compression: int, optional: bool) -> _core.RamPacketCodec:
    return _core.RamPacketCodec(128, 4096, compression=compression,
                                regions={"pc.ram": 1 << 20}, compression_optional=optional)


def _packet(codec, flags: int, size: int) -> bytearray:
    out = bytearray(codec.header_size)
    codec.encode(out, flags=flags, ramblock="pc.ram", normal=[0, 4096], next_packet_size=size)
    return out


def test_an_auto_session_takes_zstd_or_raw_packets_by_their_flags():
    codec = _codec(ZSTD, True)
    assert codec.decode(_packet(codec, ZSTD, 100)).payload_size == 100
    assert codec.decode(_packet(codec, 0, 2 * 4096)).payload_size == 2 * 4096
    with raises_protocol_error("next_packet_size", "100", "8192 (normal_pages * page_size)"):
        codec.decode(_packet(codec, 0, 100))           # a raw payload is exactly its pages


@pytest.mark.parametrize("sent", [ZLIB, ZLIB | ZSTD, 0x08])
def test_an_auto_session_refuses_any_other_compression(sent):
    codec = _codec(ZSTD, True)
    with raises_protocol_error("flags", hex(sent), "compression bits 0x4 or none (auto)"):
        codec.decode(put_u32(_packet(codec, ZSTD, 100), 8, sent))


def test_a_fixed_method_still_refuses_a_raw_packet():
    codec = _codec(ZSTD, False)
    with raises_protocol_error("flags", "0x0", "compression bits 0x4"):
        codec.decode(put_u32(_packet(codec, ZSTD, 100), 8, 0))


def test_device_state_of_an_auto_session_is_zstd_or_raw():
    header = bytearray(_core.DEVICE_HEADER_SIZE)
    for flags in (0, ZSTD):
        _core.encode_device_header(header, "vfio", 0, 100, flags)
        assert _core.decode_device_header(header, ZSTD, compression_optional=True)[0] == \
            flags | _core.FLAG_DEVICE_STATE
    _core.encode_device_header(header, "vfio", 0, 100, ZLIB)
    with raises_protocol_error("flags", "0x42", "0x4 or none (auto)"):
        _core.decode_device_header(header, ZSTD, compression_optional=True)


def test_a_receive_engine_of_an_auto_session_fails_on_a_zlib_packet():
    """The check where it matters: a live channel, a peer that claims zlib."""
    src, dst = socket.socketpair()
    region = fastmfd.Region.create("pc.ram", 1 * MiB)
    counters = _core.Counters.create(1, tag="test-counters")
    received = _core.DirtyBitmap.create(256, tag="test-received")
    try:
        params = {"page_size": 4096, "packet_pages": 128, "checksum": False, "chunk_size": 0,
                  "zero_page_detection": True, "auto": True}
        engine = _core.RecvEngine(dst.fileno(), 0, params, _core.make_codec("auto", False),
                                  [region], counters, [received], [True])
        claim = _codec(ZLIB, False)
        src.sendall(_packet(claim, ZLIB, 100) + bytes(100))
        with pytest.raises(ProtocolError, match=r"flags.*0x2.*compression bits 0x4 or none"):
            engine.run()
        del engine
    finally:
        src.close()
        dst.close()
        for owned in (region, counters, received):
            owned.close()


def test_a_raw_device_chunk_larger_than_a_slot_is_refused_before_it_is_read():
    """A raw device-state payload is read straight into a pool slot; the payload
    bound was a compressed one's (up to chunk/8 + 64 KiB more), so a peer could
    write past the slot into the next one, or past the pool (found in review)."""
    chunk = 64 << 10
    slot = chunk + _core.CHUNK_HEADER_SIZE
    src, dst = socket.socketpair()
    region = fastmfd.Region.create("pc.ram", 1 * MiB)
    counters = _core.Counters.create(1, tag="test-counters")
    received = _core.DirtyBitmap.create(256, tag="test-received")
    pool = _core.BufferPool.create(2, slot, tag="test-pool")
    reassembly_r, reassembly_w = os.pipe()
    try:
        for i in range(2):
            pool.view(i)[:] = b"\xaa" * slot
        params = {"page_size": 4096, "packet_pages": 128, "checksum": False,
                  "chunk_size": chunk, "zero_page_detection": True, "auto": True}
        engine = _core.RecvEngine(dst.fileno(), 0, params, _core.make_codec("auto", False),
                                  [region], counters, [received], [True], pool, [("dev0", 0)],
                                  reassembly_w, True)
        header = bytearray(_core.DEVICE_HEADER_SIZE)
        _core.encode_device_header(header, "dev0", 0, slot + 8192, 0)
        src.sendall(bytes(header) + b"\x55" * (slot + 8192))
        with pytest.raises(ProtocolError, match=r"next_packet_size.*received 73740, "
                                                r"expected at most 65548"):
            engine.run()
        del engine
        assert all(bytes(pool.view(i)) == b"\xaa" * slot for i in range(2))
    finally:
        src.close()
        dst.close()
        os.close(reassembly_r)
        os.close(reassembly_w)
        for owned in (region, counters, received, pool):
            owned.close()


def test_zstd_level_changes_start_new_frames_that_any_decoder_reads():
    zstandard = pytest.importorskip("zstandard")
    text = english_like_text(4 * 65536).tobytes()
    packets = [text[i * 65536:(i + 1) * 65536] for i in range(4)] + [bytes(4096)]
    encoder = _core.ZstdCodec(True, 1)
    ours, reference = _core.ZstdCodec(False), zstandard.ZstdDecompressor()
    stream = b""
    for level, packet in zip([1, -5, -5, 3, -10], packets):
        encoder.set_level(level)
        blob = encoder.compress(packet)
        out = bytearray(len(packet))
        ours.decompress_into(blob, out)
        assert out == packet, f"level {level}"
        stream += blob
    # An independent decoder reads the frames one after another: the packets, in order.
    assert reference.decompressobj(read_across_frames=True).decompress(stream) == \
        b"".join(packets)


def test_a_level_outside_zstd_is_refused():
    with pytest.raises(ValueError, match="zstd level"):
        _core.ZstdCodec(True, 1).set_level(1000)


# ---------------------------------------------------------------- the protocol

def test_auto_ignores_compression_level():
    """auto picks every packet's level: a level no fixed method takes is no error."""
    stats, _ = _migrate("text", 1 * MiB, compression_level=100, max_bandwidth=64 * MiB)
    assert stats.compressed_payloads


def test_setup_carries_auto_and_a_destination_accepts_it():
    config = fastmfd.MigrationConfig(compression="auto")
    setup = Setup(uuid=bytes(16), **config.session_values(), regions=(), devices=())
    assert Setup.decode(setup.encode()).compression == "auto"


def test_an_unknown_method_names_auto_among_those_expected():
    with pytest.raises(fastmfd.ConfigError, match="none, zlib, zstd or auto"):
        fastmfd.MigrationConfig(compression="lz4")


def test_loopback_and_unix_peers_are_on_this_host(tmp_path):
    a, b = socket.socketpair()
    with a, b:
        assert peer_on_this_host(a)
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        assert peer_on_this_host(client)


def test_a_connection_reset_before_its_worker_looks_has_no_peer_to_ask_about():
    """A send worker asks before its first write; a peer gone by then (a QEMU that
    refused the connection) made it fail with "OSError: [Errno 107] Transport
    endpoint is not connected" (getpeername) instead of its write's own error."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()                        # a reset
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        assert peer_on_this_host(client) is False


# ---------------------------------------------------------------- the choice, on a played link

class PlayedLink:
    """A send queue of SNDBUF bytes draining at ``rate`` bytes/s, fed by a writer
    that compresses at SPEED raw bytes/s (halving the payload) when the model
    says so: the measurements a send channel would take, without the clock."""
    SNDBUF, PAYLOAD, SPEED, COPY = 4 * MiB, 512 << 10, 500e6, 10e9

    def __init__(self, model: _core.AutoModel) -> None:
        self.model, self.now, self.queued = model, 1.0, 0.0

    def _drain(self, seconds: float, rate: float) -> None:
        self.now += seconds
        self.queued = max(0.0, self.queued - rate * seconds)

    def send(self, packets: int, rate: float) -> list[bool]:
        """Send ``packets`` payloads over a link of ``rate``; which went compressed."""
        compressed = []
        for _ in range(packets):
            index = self.model.pick()
            wire = self.PAYLOAD
            if index >= 0:
                seconds = self.PAYLOAD / self.SPEED
                self._drain(seconds, rate)
                wire //= 2
                self.model.compressed(index, self.PAYLOAD, wire, seconds)
            before = self.queued
            if self.queued + wire > self.SNDBUF:        # the write blocks for room
                self._drain((self.queued + wire - self.SNDBUF) / rate, rate)
            self.queued += wire
            self._drain(wire / self.COPY, rate)
            self.model.wrote(int(before), int(self.queued), wire, self.now, self.SNDBUF)
            compressed.append(index >= 0)
        return compressed


def test_auto_compresses_over_a_slow_link_and_goes_raw_when_it_gets_fast():
    """Compressing, a channel measures at most what zstd makes, so a link that
    got faster looked just fast enough to go on compressing, for good (found in
    review, with a port of the choice to Python). Now compressed writes that
    keep finding the queue not backed up make it measure the link again, raw."""
    link = PlayedLink(_core.AutoModel())
    slow = link.send(400, rate=100e6)           # zstd halves it at 500 MB/s: it pays
    assert sum(slow[-100:]) >= 90, "compression paid on the slow link and was not used"
    fast = link.send(3000, rate=5e9)            # raw now moves 10x what zstd does
    assert sum(fast[-500:]) <= 50, f"still compressing: {sum(fast[-500:])} of the last 500"
    slow_again = link.send(600, rate=100e6)
    assert sum(slow_again[-100:]) >= 90, "compression was not taken up again"
