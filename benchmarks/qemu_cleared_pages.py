"""Pages a QEMU >= 9.0 stream clears in a later round (issue #10): what
``listen --qemu`` pays to clear them in its block file.

::

    python benchmarks/qemu_cleared_pages.py [--mib 256] [--dir /tmp] [--runs 5]
                                            [--pattern runs|alternate]

A QEMU 10 guest whose memory is rewritten with zeros during a migration
sends those pages as data in one round and lists them as zero pages in its
multifd packets in the next; the receive worker clears each (a hole punched
where the block file is sparse, else zeros written). The stream here is that
case, built with fastmfd's codec in QEMU 10's own flavour (per-round SYNCs,
zero pages listed): a ``--mib`` block, every page data in round 2 over two
channels, and in round 3 listed as zero: every page (``runs``: 128 adjacent
pages per packet), or every other page (``alternate``: no two adjacent, the
worst case for one call per run). It is sent over loopback TCP into
``fastmfd.qemu.receive`` writing into ``--dir``; each run is timed from the
main channel's arrival to the commit (everything fsynced), and the block
file's allocated size is given after it. The stream is built before timing.

Run it with two builds to compare them (PYTHONPATH picks the build; run the
two in alternation on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import threading

import numpy as np

from fastmfd import _core, qemu
from fastmfd.protocol.qemu_encoding import (encode_multifd_flush, encode_ram_eos,
                                            encode_ram_start, encode_stream_start)
from fastmfd.protocol.sockets import connect, parse_address

PAGE = 4096
PACKET_PAGES = 128
BLOCK = "pc.ram"
CHANNELS = 2


def build_stream(mib: int, pattern: str) -> list[bytes]:
    """The main channel and each multifd channel's bytes."""
    size = mib << 20
    part, end = (bytes([kind]) + (2).to_bytes(4, "big") for kind in (0x02, 0x03))
    barrier = encode_multifd_flush() + encode_ram_eos(2, True)
    main = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
            + encode_ram_start(2, {BLOCK: size}) + barrier
            + part + barrier + part + barrier + end + barrier)
    description = json.dumps({"page_size": PAGE, "devices": []}).encode()
    main += b"\x00\x06" + len(description).to_bytes(4, "big") + description

    codec = _core.RamPacketCodec(PACKET_PAGES, PAGE, _core.LAYOUT_CURRENT, 0, {BLOCK: size})
    header = bytearray(codec.header_size)

    def packet(flags: int, normal=(), data: bytes = b"", zero=()) -> bytes:
        codec.encode(header, flags=flags, ramblock=BLOCK if len(normal) + len(zero) else b"",
                     normal=normal, zero=zero, next_packet_size=len(data))
        return bytes(header) + data

    offsets = np.arange(size // PAGE, dtype=np.uint64) * PAGE
    cleared = offsets if pattern == "runs" else offsets[::2]
    payload = np.random.default_rng(1).integers(1, 255, PACKET_PAGES * PAGE,
                                                dtype=np.uint8).tobytes()
    channels = []
    for ch in range(CHANNELS):
        init = bytearray(_core.INIT_PACKET_SIZE)
        _core.encode_init_packet(init, bytes(16), ch)
        parts = [bytes(init), packet(_core.FLAG_SYNC)]                         # setup
        for start in range(ch * PACKET_PAGES, len(offsets), CHANNELS * PACKET_PAGES):
            parts.append(packet(0, offsets[start:start + PACKET_PAGES], payload))
        parts.append(packet(_core.FLAG_SYNC))                                  # round 2
        mine = cleared[ch * PACKET_PAGES:]
        for start in range(0, len(mine), CHANNELS * PACKET_PAGES):
            parts.append(packet(0, zero=mine[start:start + PACKET_PAGES]))
        parts += [packet(_core.FLAG_SYNC), packet(_core.FLAG_SYNC)]            # rounds 3, 4
        channels.append(b"".join(parts))
    return [main, *channels]


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def one_run(streams: list[bytes], directory: str) -> tuple[float, int]:
    """Seconds from the main channel's arrival to the commit, and the block
    file's allocated bytes."""
    listening = threading.Event()
    address: list[str] = []

    def on_listening(where: str) -> None:
        address.append(where)
        listening.set()

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = qemu.receive("tcp:127.0.0.1:0", directory,
                                             on_listening=on_listening, stall_timeout=60.0)
        except BaseException as exc:
            outcome["error"] = exc
            listening.set()

    receiver = threading.Thread(target=run)
    receiver.start()
    listening.wait(60)
    socks = []
    try:
        if address:
            target = parse_address(address[0])
            socks = [connect(target, 10) for _ in streams]
            for sock, data in zip(socks, streams):
                threading.Thread(target=send_quietly, args=(sock, data), daemon=True).start()
        receiver.join()
    finally:
        for sock in socks:
            sock.close()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    path = result.files[BLOCK]
    return result.seconds, os.stat(path).st_blocks * 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pattern", choices=("runs", "alternate"), default="runs")
    args = parser.parse_args()
    streams = build_stream(args.mib, args.pattern)
    times = []
    for _ in range(args.runs):
        directory = tempfile.mkdtemp(prefix="cleared-", dir=args.dir)
        try:
            seconds, allocated = one_run(streams, directory)
        finally:
            shutil.rmtree(directory)
        times.append(seconds)
        print(f"{seconds:.3f} s, block file {allocated >> 20} MiB allocated", flush=True)
    print(f"median {statistics.median(times):.3f} s ({args.mib} MiB, {args.pattern}, "
          f"{args.dir}, {_core.__file__})")


if __name__ == "__main__":
    main()
