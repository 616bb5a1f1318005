"""fastmfd as the destination of a QEMU migration (``fastmfd.qemu.receive``,
``fastmfd listen --qemu``).

Two sources: a real QEMU 7.2 guest (skipped without qemu-system-x86_64),
and the real 7.2 captures replayed over sockets, connection for
connection, whole or cut short (these run everywhere).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from captures import BLOCKS, UUID
from fastmfd import _core, qemu
from fastmfd.errors import ConnectError, MigrationError, ProtocolError
from fastmfd.protocol.qemu import (encode_ram_eos, encode_ram_start, encode_stream_start,
                                   encode_zero_records)
from fastmfd.protocol.sockets import connect, parse_address
from qemu_support import Guest, needs_qemu, pattern

GUEST_MIB = 64
BIOS_BASE = 0xFFFC0000          # pc.bios (256 KiB) is mapped just below 4 GiB


class Receiver:
    """``qemu.receive`` in a thread: ``address`` once it listens, then ``result()``."""

    def __init__(self, directory, **kwargs) -> None:
        self.listening = threading.Event()
        self.outcome: dict = {}
        kwargs.setdefault("stall_timeout", 10.0)
        kwargs.setdefault("timeout", 30.0)

        def run() -> None:
            try:
                self.outcome["result"] = qemu.receive(
                    "tcp:127.0.0.1:0", str(directory), on_listening=self._listening, **kwargs)
            except BaseException as exc:        # handed to the test thread
                self.outcome["error"] = exc
            self.listening.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.listening.wait(30), "receive() never listened"
        if "error" in self.outcome:
            raise self.outcome["error"]

    def _listening(self, address: str) -> None:
        self.address = address
        self.listening.set()

    def result(self, timeout: float = 60.0) -> qemu.QemuReceived:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receive() did not return"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]


def assert_nothing_complete(directory) -> None:
    """A failed receive leaves no file, not even a .part one."""
    assert sorted(os.listdir(directory)) == []


# ---------------------------------------------------------------- a real QEMU

@pytest.fixture
def guest_ram(tmp_path):
    ram = pattern(GUEST_MIB, seed=7)
    # A zero first quarter: a hole no file system fills in, whatever its extent policy.
    ram[:len(ram) // 4] = 0
    path = tmp_path / "guest-ram.img"
    ram.tofile(path)
    return path, ram


@pytest.fixture
def guest(tmp_path, guest_ram):
    g = Guest(tmp_path, str(guest_ram[0]), GUEST_MIB)
    yield g
    g.close()


@needs_qemu
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_qemu_migrates_into_files(tmp_path, guest, guest_ram, channels, compression):
    out = tmp_path / "out"
    guest.set_multifd(channels, compression)
    receiver = Receiver(out)
    guest.migrate(receiver.address)
    assert guest.wait() == "completed"
    received = receiver.result()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == received.manifest
    assert manifest["channels"] == channels
    assert manifest["compression"] == compression
    assert manifest["page_size"] == 4096 and manifest["stream_version"] == 3
    blocks = {b["idstr"]: b for b in manifest["blocks"]}
    assert blocks["mem"]["size"] == GUEST_MIB << 20
    files = {b["file"] for b in manifest["blocks"]}
    assert len(files) == len(blocks) and all("/" not in f for f in files)

    mem = out / blocks["mem"]["file"]
    assert np.array_equal(np.fromfile(mem, dtype=np.uint8), guest_ram[1])
    assert mem.stat().st_blocks * 512 <= mem.stat().st_size - (GUEST_MIB << 20) // 4
    bios = tmp_path / "bios.bin"
    guest.qmp.command("pmemsave", val=BIOS_BASE, size=blocks["pc.bios"]["size"],
                      filename=str(bios))
    assert (out / blocks["pc.bios"]["file"]).read_bytes() == bios.read_bytes()

    vmstate = (out / "vmstate.bin").read_bytes()
    assert len(vmstate) == manifest["vmstate"]["size"] > 0
    assert not [name for name in os.listdir(out) if name.endswith(".part")]


@needs_qemu
def test_listen_qemu_command(tmp_path, guest, guest_ram):
    """The CLI: exit 0 once QEMU's stream ended and every file is written."""
    out = tmp_path / "out"
    guest.set_multifd(2, "zstd")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = subprocess.Popen(
        [sys.executable, "-m", "fastmfd", "listen", "--qemu", f"tcp:127.0.0.1:{port}",
         "--dir", str(out), "--stall-timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in listen.stderr:
            if "listening on" in line:
                break
        guest.migrate(f"tcp:127.0.0.1:{port}")
        assert guest.wait() == "completed"
        rest, _ = listen.communicate(timeout=60)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    assert listen.returncode == 0, rest
    manifest = json.loads((out / "manifest.json").read_text())
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), guest_ram[1])


@needs_qemu
def test_postcopy_is_refused(tmp_path, guest):
    """postcopy-ram makes QEMU open a return path (then advise postcopy) first:
    refused, naming it; QEMU's migration fails, no file is left."""
    out = tmp_path / "out"
    guest.set_multifd(2, "none")
    guest.qmp.command("migrate-set-capabilities", capabilities=[
        {"capability": "postcopy-ram", "state": True}])
    receiver = Receiver(out)
    guest.migrate(receiver.address)
    with pytest.raises(ProtocolError, match="return path"):
        receiver.result()
    assert guest.wait() == "failed"
    assert_nothing_complete(out)


# ---------------------------------------------------------------- replayed captures

def replay(address: str, capture, cut: dict[str, int] | None = None,
           first: bytes | None = None) -> list[socket.socket]:
    """Send a capture's connections as its QEMU did: the main channel connects
    first, then each multifd channel, and (as QEMU's setup SYNC ensures) all are
    connected before the main channel's first byte; each sends from its own
    thread. ``cut`` ends a file's connection after that many bytes; ``first``:
    a stranger's bytes before all. Returns the sockets, for the test to close."""
    cut = cut or {}
    target = parse_address(address)
    socks = []
    if first is not None:
        socks.append(connect(target, 5))
        socks[-1].sendall(first)
    streams = []
    for name in ("conn0.bin", "conn1.bin", "conn2.bin"):
        try:
            streams.append((connect(target, 5), (capture / name).read_bytes()[:cut.get(name)]))
        except ConnectError:
            if first is None:
                raise
            break           # the stranger already failed the receive: it stopped listening
    for sock, data in streams:
        socks.append(sock)
        threading.Thread(target=_send_quietly, args=(sock, data), daemon=True).start()
    return socks


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass            # the receiver gave up first: what the test checks


def capture_pattern(mib: int = 32) -> np.ndarray:
    """The captures' guest RAM (their README): page i holds the u64 i, every
    fourth page zero."""
    return pattern(mib)


@pytest.mark.parametrize("kind", ["none", "zlib", "zstd"])
def test_capture_replay_is_received(tmp_path, qemu72_captures, kind):
    out = tmp_path / "out"
    receiver = Receiver(out)
    socks = replay(receiver.address, qemu72_captures / f"pattern-{kind}")
    try:
        received = receiver.result()
    finally:
        for sock in socks:
            sock.close()
    manifest = received.manifest
    assert manifest["channels"] == 2 and manifest["compression"] == kind
    assert manifest["uuid"] == UUID.hex()
    assert {b["idstr"]: b["size"] for b in manifest["blocks"]} == BLOCKS
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), capture_pattern())
    main = (qemu72_captures / f"pattern-{kind}" / "conn0.bin").read_bytes()
    start = manifest["vmstate"]["stream_offset"]
    assert (out / "vmstate.bin").read_bytes() == main[start:]


@pytest.mark.parametrize("cut, match", [
    ({"conn0.bin": 10000}, r"main channel at byte \d+.*truncated"),
    ({"conn0.bin": -100}, r"does not end with QEMU_VM_EOF"),
    ({"conn1.bin": 1344 * 3 + 5000}, r"multifd channel \d"),
], ids=["main-in-ram", "main-in-devices", "multifd-in-packet"])
def test_truncated_stream_fails_cleanly(tmp_path, qemu72_captures, cut, match):
    out = tmp_path / "out"
    receiver = Receiver(out, stall_timeout=5.0)
    socks = replay(receiver.address, qemu72_captures / "pattern-none", cut)
    try:
        with pytest.raises((ProtocolError, MigrationError), match=match):
            receiver.result()
    finally:
        for sock in socks:
            sock.close()
    assert_nothing_complete(out)


def test_wrong_magic_fails_cleanly(tmp_path, qemu72_captures):
    out = tmp_path / "out"
    receiver = Receiver(out)
    socks = replay(receiver.address, qemu72_captures / "pattern-none", first=b"GET / HTTP/1.0\r\n")
    try:
        with pytest.raises((ProtocolError, MigrationError),
                           match="first bytes 47455420, expected 5145564d"):
            receiver.result()
    finally:
        for sock in socks:
            sock.close()
    assert_nothing_complete(out)


# ---------------------------------------------------------------- a stream made here

def test_zero_page_after_data_is_written(tmp_path):
    """A page sent as data in one round and as ZERO in the next ends up zero (the
    file is not left holding the older data); pages only ever zero stay holes."""
    block, size, page = "pc.ram", 1 << 20, 4096
    part, end = (bytes([kind]) + (2).to_bytes(4, "big") for kind in (0x02, 0x03))
    eos = encode_ram_eos(2, True)
    main = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
            + encode_ram_start(2, {block: size}) + eos           # round 1: setup
            + part + eos                                         # round 2: data (multifd)
            + part + encode_zero_records(block, np.array([5 * page, 9 * page],
                                                         dtype=np.uint64)) + eos
            + end + eos)
    description = json.dumps({"page_size": page, "devices": []}).encode()
    main += b"\x00\x06" + len(description).to_bytes(4, "big") + description

    codec = _core.RamPacketCodec(128, page, _core.LAYOUT_QEMU72, 0, {block: size})
    header = bytearray(codec.header_size)

    def packet(flags, normal=(), data=b""):
        codec.encode(header, flags=flags, ramblock=block if normal else b"", normal=normal,
                     next_packet_size=len(data))
        return bytes(header) + data

    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, bytes(16), 0)
    channel = (bytes(init) + packet(_core.FLAG_SYNC)                    # setup
               + packet(0, [5 * page], b"\x77" * page) + packet(_core.FLAG_SYNC)   # round 2
               + packet(_core.FLAG_SYNC) + packet(_core.FLAG_SYNC))     # rounds 3, 4

    out = tmp_path / "out"
    receiver = Receiver(out)
    target = parse_address(receiver.address)
    socks = [connect(target, 5), connect(target, 5)]
    try:
        for sock, data in zip(socks, (main, channel)):
            threading.Thread(target=_send_quietly, args=(sock, data), daemon=True).start()
        received = receiver.result()
    finally:
        for sock in socks:
            sock.close()
    image = (out / received.manifest["blocks"][0]["file"]).read_bytes()
    assert image == bytes(size)
    assert received.manifest["ram_section_ends"] == 4
