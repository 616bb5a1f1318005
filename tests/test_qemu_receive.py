"""fastmfd as the destination of a QEMU migration (``fastmfd.qemu.receive``,
``fastmfd listen --qemu``).

Two sources: a real QEMU guest, 7.2 and 10 (QEMU 10's own ``pc`` machine
type; each skipped, saying why, without its binary), and real captures
replayed over sockets, connection for connection, whole, cut short or
corrupted (these run everywhere): QEMU 7.2's, QEMU 10.0's with the 7.2
machine type (shared/data), and QEMU 10.0's with its own machine type
(tests/data/qemu-10.0-native).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from captures import BLOCKS, UUID
from inspect_support import NATIVE_CAPTURES
from fastmfd import _core, qemu
from fastmfd._engine.memory_bound import WORKER_BYTES
from fastmfd._engine.qemu_channels import QemuChannel, choose_channels, migration_uuid
from fastmfd.errors import ConfigError, FastMFDError, MigrationError, ProtocolError
from fastmfd.protocol.bytereader import ByteReader
from fastmfd.protocol.setup import MAX_REGIONS
from fastmfd.protocol.qemu import (RAM_CONTINUE, RAM_ZERO, SYNC_PER_ROUND, SYNC_PER_SECTION,
                                   QevmDecoder, decode_qemu_main)
from fastmfd.protocol.qemu_encoding import (encode_multifd_flush, encode_open_return_path,
                                            encode_ram_eos, encode_ram_start,
                                            encode_stream_start, encode_zero_records)
from fastmfd.protocol.qemu_return_path import (encode_rp_pong, encode_rp_shut,
                                               encode_rp_switchover_ack)
from fastmfd.protocol.sockets import connect, parse_address
from qemu_support import (QEMU, QEMU10, QEMUS, Guest, Receiver, assert_nothing_complete,
                          listening_command, needs_qemu10, pattern, saved_guest)

GUEST_MIB = 64
FINAL = ("completed", "failed", "cancelled")    # a migration's last status
BIOS_BASE = 0xFFFC0000          # pc.bios (256 KiB) is mapped just below 4 GiB


# ---------------------------------------------------------------- a real QEMU

@pytest.fixture
def guest_ram(tmp_path):
    ram = pattern(GUEST_MIB, seed=7)
    # A zero first quarter: a hole no file system fills in, whatever its extent policy.
    ram[:len(ram) // 4] = 0
    path = tmp_path / "guest-ram.img"
    ram.tofile(path)
    return path, ram


@pytest.fixture(params=QEMUS)
def guest(request, tmp_path, guest_ram):
    g = Guest(tmp_path, str(guest_ram[0]), GUEST_MIB, binary=request.param)
    yield g
    g.close()


def expected_flavour(guest: Guest) -> dict:
    """The stream flavour the manifest records: QEMU 10's ``pc`` syncs per round
    and lists zero pages in its packets; 7.2 does neither."""
    native = guest.binary == QEMU10
    return {"multifd_sync": SYNC_PER_ROUND if native else SYNC_PER_SECTION,
            "zero_page_detection": "multifd" if native else "legacy"}


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
    flavour = expected_flavour(guest)
    assert {key: manifest[key] for key in flavour} == flavour
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


def test_qemu_at_its_highest_zstd_level_fits_the_receiving_window(tmp_path, guest, guest_ram):
    """multifd-zstd-level 20, QEMU's highest, streams with a 32 MiB window: the most
    each receiving channel takes (ZSTD_WINDOW_LOG_MAX)."""
    guest.set_multifd(2, "zstd")
    guest.qmp.command("migrate-set-parameters", **{"multifd-zstd-level": 20})
    receiver = Receiver(tmp_path / "out")
    guest.migrate(receiver.address)
    assert guest.wait() == "completed"
    mem = next(b["file"] for b in receiver.result().manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(tmp_path / "out" / mem, dtype=np.uint8), guest_ram[1])


def _migrated_into_the_command(guest, out, *options: str) -> str:
    """``guest`` migrated into ``fastmfd listen --qemu --dir out *options``, which must
    exit 0: what it printed on stdout."""
    with listening_command(out, "--stall-timeout", "10", *options) as (listen, address):
        guest.migrate(address)
        assert guest.wait() == "completed"
        printed, rest = listen.communicate(timeout=60)
    assert listen.returncode == 0, rest
    return printed


def test_listen_qemu_command(tmp_path, guest, guest_ram):
    """The CLI: exit 0 once QEMU's stream ended and every file is written; with
    --json, what it wrote and learnt on stdout."""
    out = tmp_path / "out"
    guest.set_multifd(2, "zstd")
    printed = _migrated_into_the_command(guest, out, "--json")
    manifest = json.loads((out / "manifest.json").read_text())
    result = json.loads(printed)
    assert result["manifest"] == manifest and len(result["channels"]) == 2
    assert result["files"]["manifest"] == str(out / "manifest.json")
    assert result["sizes"][result["files"]["regions"]["mem"]] == guest_ram[1].size
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), guest_ram[1])


def test_listen_qemu_force_over_a_save_of_more_blocks_leaves_the_new_save_alone(tmp_path, guest):
    """--force over the save of a guest with a VGA (its vga.vram and ROM blocks) by
    one of a guest without: the old manifest went, the VGA's block files stayed,
    listed by no manifest, removed by nothing (qemuuser review, defect 1: a
    two-NUMA-node guest's m0.img, m1.img)."""
    saved, _ = saved_guest(tmp_path, 2, "none", binary=guest.binary, mib=16,
                           options=("-device", "VGA,vgamem_mb=1"))
    earlier = {b["file"] for b in json.loads((saved / "manifest.json").read_text())["blocks"]}
    guest.set_multifd(2, "none")
    _migrated_into_the_command(guest, saved, "--force")
    blocks = {b["file"] for b in json.loads((saved / "manifest.json").read_text())["blocks"]}
    assert earlier - blocks, earlier        # blocks of the earlier guest's VGA
    assert set(os.listdir(saved)) == blocks | {"manifest.json", "vmstate.bin"}


def test_listen_qemu_max_memory_fails_a_migration_whose_channels_do_not_fit(tmp_path, guest):
    """--max-memory on listen --qemu, as listen's: QEMU's third channel (each counted
    with a zstd window, and a worker of 16 MiB) does not fit in 100 MiB; QEMU's
    migration fails with the listener's, which names the bound, and leaves nothing."""
    out = tmp_path / "out"
    guest.set_multifd(4, "none")
    with listening_command(out, "--stall-timeout", "10", "--max-memory", "100M") as (
            listen, address):
        guest.migrate(address)
        assert guest.wait() == "failed"
        _, err = listen.communicate(timeout=60)
    assert listen.returncode == 1, err
    need = qemu_channels_memory(3, 0)
    # The third to connect, whichever of QEMU's channels that was.
    assert re.search(r"multifd channel [0-3]: " + re.escape(
        f"QEMU's 3 multifd channel(s) so far need {need} bytes of receive buffers (512 KiB "
        f"packets, and a zstd window of up to 32 MiB each: a channel's compression is learnt "
        f"from its first page); this receiver holds at most {100 << 20} (max_memory)"), err), err
    assert_nothing_complete(out)


def polled_status(guest: Guest, until: tuple[str, ...], seconds: float, never: str) -> str:
    """The source's migration status once it is one of ``until`` (asked every
    50 ms); ``never``: the failure after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (status := guest.qmp.command("query-migrate")["status"]) not in until:
        assert time.monotonic() < deadline, never
        time.sleep(0.05)
    return str(status)


@pytest.fixture(params=QEMUS)
def traced_guest(request, tmp_path, guest_ram):
    """A source QEMU with the capability return-path, tracing what its return
    path gets (PONG, SHUT)."""
    g = Guest(tmp_path, str(guest_ram[0]), GUEST_MIB, binary=request.param,
              options=("-trace", "source_return_path_thread_*"))
    try:
        g.set_multifd(2, "zstd")
        g.qmp.command("migrate-set-capabilities", capabilities=[
            {"capability": "return-path", "state": True}])
        yield g
    finally:
        g.close()


def test_a_source_with_a_return_path_completes_once_the_files_are_durable(
        tmp_path, traced_guest, guest_ram):
    """With a return path, QEMU waits at its stream's end for the destination's
    SHUT, which fastmfd says once every file is committed: when QEMU reports
    completed, the manifest is there. Its PING is answered (PONG 1); the
    return path's commands are the connection's, not recorded for a replay.
    (It was refused: "a return path, which fastmfd does not serve".)"""
    out = tmp_path / "out"
    receiver = Receiver(out)
    traced_guest.migrate(receiver.address)
    assert traced_guest.wait() == "completed"
    assert (out / "manifest.json").exists()
    manifest = receiver.result().manifest
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), guest_ram[1])
    assert [c["section"] for c in manifest["commands"]] == (
        [] if traced_guest.binary == QEMU else ["08000b0000"])      # SWITCHOVER_START
    log = open(traced_guest.log_path).read()
    assert re.search(r"source_return_path_thread_pong (0x)?0*1\b", log), log
    assert re.search(r"source_return_path_thread_shut (0x)?0\b", log), log


@needs_qemu10
def test_a_source_with_switchover_ack_is_acked_and_completes(tmp_path, guest_ram):
    """A running QEMU 10 guest with switchover-ack (its own pc machine type, so it
    surely knows the message) waits for the destination's ack before its
    switchover: acked at once, it completes, and the file holds its RAM as it
    stopped. Before, it never switched over, iterating until cancelled (a
    paused guest's source does not wait for the ack)."""
    out = tmp_path / "out"
    guest = Guest(tmp_path, str(guest_ram[0]), GUEST_MIB, binary=QEMU10)
    try:
        guest.set_multifd(2, "none")
        guest.qmp.command("migrate-set-capabilities", capabilities=[
            {"capability": "return-path", "state": True},
            {"capability": "switchover-ack", "state": True}])
        guest.qmp.command("cont")
        receiver = Receiver(out)
        guest.migrate(receiver.address)
        # (Polled: its MIGRATION_PASS events keep wait() waiting past its timeout.)
        assert polled_status(guest, FINAL, 20, "the source never switched over") == "completed"
        mem = next(b["file"] for b in receiver.result().manifest["blocks"]
                   if b["idstr"] == "mem")
        assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8),
                              np.fromfile(guest_ram[0], dtype=np.uint8))
    finally:
        guest.close()


def test_a_source_with_a_return_path_fails_when_the_files_cannot_be_committed(
        tmp_path, traced_guest):
    """fastmfd fails after the source's last byte (a manifest.json of someone
    else appeared in DIR; it is not replaced): with a return path, the source
    is told, and its migration fails, the guest still its own, where it had
    reported completed and given up a guest whose state no file holds. The
    source pauses before its switchover (pause-before-switchover) while the
    file appears, once the receiver has claimed its files' names (at the block
    list): a receiver late to read it found the file there already, and said
    "manifest.json exists (a file): not replacing it without --force" (4 runs in
    6 with its polls late 0-50 ms and a busy CPU)."""
    out = tmp_path / "out"
    traced_guest.qmp.command("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": True}])
    receiver = Receiver(out)
    traced_guest.migrate(receiver.address)
    polled_status(traced_guest, ("pre-switchover",), 30,
                  "the source never paused before its switchover")
    deadline = time.monotonic() + 30
    while not any(out.glob("*.part")):
        assert time.monotonic() < deadline, "the receiver never took the block list"
        time.sleep(0.01)
    (out / "manifest.json").write_text("someone else's\n")
    traced_guest.qmp.command("migrate-continue", state="pre-switchover")
    with pytest.raises(MigrationError, match="manifest.json appeared while the migration was "
                                             "received: not replacing it"):
        receiver.result()
    assert traced_guest.wait() == "failed"
    assert os.listdir(out) == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "someone else's\n"
    assert re.search(r"source_return_path_thread_shut (0x)?0*1\b",
                     open(traced_guest.log_path).read())


def test_postcopy_is_refused(tmp_path, guest):
    """postcopy-ram makes QEMU open a return path (answered), then advise postcopy:
    refused, naming it; QEMU's migration fails, no file is left."""
    if guest.binary != QEMU:
        pytest.skip("QEMU 10.0 itself refuses postcopy-ram with multifd")
    out = tmp_path / "out"
    guest.set_multifd(2, "none")
    guest.qmp.command("migrate-set-capabilities", capabilities=[
        {"capability": "postcopy-ram", "state": True}])
    receiver = Receiver(out)
    guest.migrate(receiver.address)
    with pytest.raises(ProtocolError, match=r"postcopy \(POSTCOPY_ADVISE: capability "
                                            r"postcopy-ram\) is not supported"):
        receiver.result()
    assert guest.wait() == "failed"
    assert_nothing_complete(out)


@pytest.mark.parametrize("capability, match", [
    # Listed blocks whose pages never come: they completed as all-hole files.
    ("x-ignore-shared", "x-ignore-shared.*no page of its shared file-backed RAM blocks"),
    # A POSTCOPY_ADVISE without data: it was refused as plain "postcopy".
    ("dirty-bitmaps", r"POSTCOPY_ADVISE: capability dirty-bitmaps"),
])
def test_an_unsupported_capability_is_refused_naming_it(tmp_path, guest, capability, match):
    """A capability fastmfd cannot receive is refused, named, before any file is
    written: x-ignore-shared (the guest's RAM is the shared file-backed block
    it never sends), dirty-bitmaps (postcopy advised, without postcopy-ram);
    QEMU's migration fails, no file is left.

    QEMU learns of the refusal only on a return path (its SHUT 1): without one,
    x-ignore-shared's stream (no page of the guest's RAM) was all written into
    the socket before the refusal closed it, and QEMU said "completed" (1 run in
    3 under load)."""
    out = tmp_path / "out"
    guest.set_multifd(2, "none")
    guest.qmp.command("migrate-set-capabilities", capabilities=[
        {"capability": capability, "state": True},
        {"capability": "return-path", "state": True}])
    receiver = Receiver(out)
    guest.migrate(receiver.address)
    with pytest.raises(ProtocolError, match=match):
        receiver.result()
    assert guest.wait() == "failed"
    assert_nothing_complete(out)


@pytest.mark.parametrize("stranger", [b"GET / HTTP/1.0\r\n\r\n", b"", None, "bad-version",
                                      "other-uuid", "same-id"],
                         ids=["garbage", "closes", "silent", "multifd-bad-version",
                              "multifd-other-uuid", "multifd-same-id"])
def test_a_stranger_before_qemu_is_dropped(tmp_path, guest, guest_ram, stranger):
    """A connection that is not QEMU's (garbage, nothing then closing, nothing at
    all, or the multifd magic and an init packet of another version, of another
    UUID than QEMU's (all zero: no -uuid) or of an id one of QEMU's channels has) comes
    before QEMU's main channel: dropped; QEMU's migration succeeds."""
    out = tmp_path / "out"
    guest.set_multifd(2, "zstd")
    receiver = Receiver(out)
    if isinstance(stranger, str):
        stranger = MULTIFD_STRANGERS[stranger](bytes(16))
    with connect(parse_address(receiver.address), 5) as intruder:
        if stranger is not None:
            _send_quietly(intruder, stranger)       # it may be dropped before it is done
        guest.migrate(receiver.address)
        assert guest.wait() == "completed"
        manifest = receiver.result().manifest
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), guest_ram[1])


@pytest.mark.parametrize("channel_header", [True, False], ids=["header", "old way"])
def test_a_fastmfd_source_at_a_qemu_listener_is_told_apart(tmp_path, caplog, channel_header):
    """fastmfd's own source sent to ``listen --qemu`` (a user's mix-up): dropped as
    any stranger, its log line saying where its stream goes (it said only 'first
    bytes 00000000'). The source is told what the listener is: it said "connection
    reset ... (is a fastmfd listener there? a QEMU destination takes `fastmfd send
    --qemu`)", a wrong fix (a review)."""
    import fastmfd
    # (its timeout is waited out once the source is dropped: 3 s, the source connects at once)
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", str(tmp_path / "out"), timeout=3.0)
    ram = fastmfd.Region.create("ram", 16 * 4096)
    failed: list[BaseException] = []

    def receive() -> None:
        try:
            receiver.receive()
        except MigrationError as exc:
            failed.append(exc)
    thread = threading.Thread(target=receive)
    try:
        with caplog.at_level(logging.WARNING, logger="fastmfd"):
            thread.start()
            with fastmfd.Source(receiver.address, fastmfd.MigrationConfig(
                    channels=1, timeout=30, channel_header=channel_header)) as src:
                src.add_region(ram)
                with pytest.raises(MigrationError) as error:
                    src.migrate(live=False)     # dropped, not left waiting
            thread.join(30)
    finally:
        receiver.close()
        ram.close()
    assert str(error.value) == (f"main channel to {receiver.address}: the peer failed: this is "
                                f"a QEMU destination (`fastmfd listen --qemu`): it takes a "
                                f"QEMU's migration; a fastmfd source's goes to `fastmfd "
                                f"listen` without --qemu")
    assert "no QEMU connected" in str(failed[0])
    assert "it goes to `fastmfd listen` without --qemu" in caplog.text


# ---------------------------------------------------------------- replayed captures

# Per capture set (the ``captures`` fixture): where its SYNCs sit and where its zero pages went.
CAPTURE_FLAVOURS = {"7.2": (SYNC_PER_SECTION, "legacy"), "10.0": (SYNC_PER_SECTION, "legacy"),
                    "10.0-native": (SYNC_PER_ROUND, "multifd")}


def capture_bytes(directory: Path, kind: str) -> dict[str, bytes]:
    """``conn0.bin`` (main) ... of ``pattern-<kind>``, decompressed where stored
    as ``.zst``."""
    files = {}
    for i in range(3):
        path = directory / f"pattern-{kind}" / f"conn{i}.bin"
        if path.is_file():
            files[path.name] = path.read_bytes()
        else:
            packed = path.with_name(path.name + ".zst").read_bytes()
            files[path.name] = zstandard.ZstdDecompressor().decompressobj().decompress(packed)
    return files


def replay(address: str, files: dict[str, bytes], cut: dict[str, int] | None = None,
           strangers: tuple[bytes | None, ...] = (), keep_open: bool = False,
           pause: dict[str, int] | None = None, resume: threading.Event | None = None
           ) -> list[socket.socket]:
    """Send a capture's connections as its QEMU did: the main channel connects
    first, then each multifd channel, and (as QEMU's setup SYNC ensures) all are
    connected before the main channel's first byte; each sends from its own
    thread. ``cut`` ends a file's connection after that many bytes; each of
    ``strangers`` connects before all and sends its bytes (None: nothing, and
    stays open); ``keep_open``: the connections stay open after their bytes, as
    QEMU's do until its cleanup; ``pause``: a file's connection stops for 0.2 s
    after that many bytes (until ``resume`` is set, if given). Returns the
    sockets, for the test to close."""
    cut = cut or {}
    target = parse_address(address)
    socks = []
    for stranger in strangers:
        socks.append(connect(target, 5))
        if stranger is not None:
            _send_quietly(socks[-1], stranger)
    pause = pause or {}
    streams = [(connect(target, 5), data[:cut.get(name)], pause.get(name))
               for name, data in files.items()]
    for sock, data, pause_at in streams:
        socks.append(sock)
        threading.Thread(target=_send_quietly, args=(sock, data, not keep_open, pause_at,
                                                     resume), daemon=True).start()
    return socks


def _send_quietly(sock: socket.socket, data: bytes, end: bool = True,
                  pause_at: int | None = None, resume: threading.Event | None = None) -> None:
    try:
        if pause_at is not None:
            sock.sendall(data[:pause_at])
            if resume is None:
                time.sleep(0.2)
            else:
                resume.wait(30)
            data = data[pause_at:]
        sock.sendall(data)
        if end:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass            # the receiver gave up first: what the test checks


def capture_pattern(mib: int = 32) -> np.ndarray:
    """The captures' guest RAM (their README): page i holds the u64 i, every
    fourth page zero."""
    return pattern(mib)


def receive_replay(out, files: dict[str, bytes], receive_args: dict | None = None,
                   **replay_args) -> qemu.QemuReceived:
    receiver = Receiver(out, **{"stall_timeout": 5.0, **(receive_args or {})})
    return receive_replay_into(receiver, files, **replay_args)


def receive_replay_into(receiver: Receiver, files: dict[str, bytes],
                        **replay_args) -> qemu.QemuReceived:
    socks = replay(receiver.address, files, **replay_args)
    try:
        return receiver.result()
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("kind", ["none", "zlib", "zstd"])
def test_capture_replay_is_received(tmp_path, captures, kind):
    which, directory = captures
    files = capture_bytes(directory, kind)
    out = tmp_path / "out"
    manifest = receive_replay(out, files).manifest
    assert manifest["channels"] == 2 and manifest["compression"] == kind
    assert manifest["uuid"] == UUID.hex()
    assert (manifest["multifd_sync"], manifest["zero_page_detection"]) == \
        CAPTURE_FLAVOURS[which]
    assert manifest["syncs"] >= 2 and manifest["machine"].startswith("pc-i440fx-")
    assert {b["idstr"]: b["size"] for b in manifest["blocks"]} == BLOCKS
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), capture_pattern())
    start = manifest["vmstate"]["stream_offset"]
    assert (out / "vmstate.bin").read_bytes() == files["conn0.bin"][start:]
    # QEMU 10's own pc announces the switchover (the VM stopped) before the RAM
    # END section: COMMAND 11 (SWITCHOVER_START), no data; the others send none.
    assert manifest["commands"] == ([{"before": "ram-end", "section": "08000b0000"}]
                                    if which == "10.0-native" else [])


def test_the_migration_is_complete_at_the_stream_end_not_when_qemu_closes(tmp_path, captures):
    """QEMU's destination completes at the VM description, the stream's last
    bytes, and QEMU's source closes its connections after that, in its cleanup.
    receive() completes there too, every connection still open (it waited for
    their ends: 4.5-23.3 ms of QEMU's cleanup in each 1 GiB migration)."""
    _, directory = captures
    files = capture_bytes(directory, "zstd")
    out = tmp_path / "out"
    manifest = receive_replay(out, files, keep_open=True).manifest
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), capture_pattern())
    start = manifest["vmstate"]["stream_offset"]
    assert (out / "vmstate.bin").read_bytes() == files["conn0.bin"][start:]
    assert manifest["compression"] == "zstd" and manifest["channels"] == 2


def test_a_brace_before_the_stream_end_is_not_taken_for_it(tmp_path, captures):
    """The main channel pauses right after the first '}' inside the VM description:
    what has come ends as a stream may, but its length says more is due, so
    receive() reads on, and completes with all of it (the connections open)."""
    _, directory = captures
    files = capture_bytes(directory, "none")
    main = files["conn0.bin"]
    brace = main.index(b"}", main.rindex(b"\x00\x06") + 6) + 1
    assert brace < len(main)
    out = tmp_path / "out"
    manifest = receive_replay(out, files, keep_open=True, pause={"conn0.bin": brace}).manifest
    start = manifest["vmstate"]["stream_offset"]
    assert (out / "vmstate.bin").read_bytes() == main[start:]


def test_a_receiver_made_ahead_has_its_workers_up_and_receives_once(tmp_path, captures):
    _, directory = captures
    files = capture_bytes(directory, "none")
    with qemu.QemuReceiver("tcp:127.0.0.1:0", str(tmp_path / "out"), workers=3,
                           stall_timeout=10.0) as receiver:
        pids = receiver.worker_pids()
        assert len(pids) == 3 and {p.pid for p in multiprocessing.active_children()} == set(pids)
        socks = replay(receiver.address, files)
        try:
            received = receiver.receive()
        finally:
            for sock in socks:
                sock.close()
        with pytest.raises(ConfigError, match="receives once"):
            receiver.receive()
    assert received.manifest["channels"] == 2
    mem = next(b["file"] for b in received.manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(tmp_path / "out" / mem, dtype=np.uint8),
                          capture_pattern())
    assert receiver.worker_pids() == []
    with pytest.raises(ConfigError, match="closed"):
        receiver.receive()


def test_a_receiver_closed_unused_leaves_nothing(tmp_path):
    # The autouse leak check fails the test if a worker, segment or socket is left.
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", str(tmp_path / "out"), workers=2)
    assert len(multiprocessing.active_children()) == 2
    receiver.close()
    receiver.close()
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "out").exists()      # nor the directory it made for its files


def init_packet(uuid: bytes, channel: int, version: int = 1) -> bytes:
    """A multifd channel's first 64 bytes (``version`` written over the real one)."""
    packet = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(packet, uuid, channel)
    packet[4:8] = version.to_bytes(4, "big")
    return bytes(packet)


# Connections that start as a multifd channel, but are not QEMU's: they come
# before the main channel. Ids: the named capture's (QEMU's) channels are 0 and 1.
MULTIFD_STRANGERS = {
    "bad-version": lambda uuid: init_packet(uuid, 0, version=2),
    "cut-short": lambda uuid: init_packet(uuid, 0)[:30],
    "magic-only": lambda uuid: init_packet(uuid, 0)[:4],
    "other-uuid": lambda uuid: init_packet(bytes(b ^ 0xFF for b in uuid), 0),
    "same-id": lambda uuid: init_packet(uuid, 1),
    "id-beyond": lambda uuid: init_packet(uuid, 7),
}


@pytest.mark.parametrize("stranger", ["other", *MULTIFD_STRANGERS])
def test_strangers_before_the_capture_are_dropped(tmp_path, captures, stranger):
    """Connections that are not QEMU's before the main channel: garbage, nothing
    then closing, nothing and staying open; or the multifd magic and an init
    packet QEMU's channels do not send (cut short, another version) or could not
    (another UUID, an id QEMU's channels have or do not reach). Dropped, and the
    migration is received."""
    files = capture_bytes(captures[1], "zstd")
    out = tmp_path / "out"
    strangers: tuple[bytes | None, ...] = (
        (b"GET / HTTP/1.0\r\n\r\n", b"", None, b"QE") if stranger == "other"
        else (MULTIFD_STRANGERS[stranger](UUID),))
    manifest = receive_replay(out, files, strangers=strangers).manifest
    assert manifest["channels"] == 2 and manifest["uuid"] == UUID.hex()
    mem = next(b["file"] for b in manifest["blocks"] if b["idstr"] == "mem")
    assert np.array_equal(np.fromfile(out / mem, dtype=np.uint8), capture_pattern())


def test_a_stranger_trickling_an_init_packet_does_not_hold_the_migration_up(tmp_path,
                                                                           captures):
    """A connection before the main channel sends the multifd magic, then the
    rest of its init packet a byte every 0.2 s. The packet is waited for once,
    not per byte (that held the receiver up to 60 waits of LATE_BYTES_WAIT, the
    main channel unread): it is dropped, and the migration is received while
    the stranger is still trickling."""
    files = capture_bytes(captures[1], "none")
    receiver = Receiver(tmp_path / "out", stall_timeout=10.0)
    stranger = connect(parse_address(receiver.address), 5)
    packet = init_packet(UUID, 0)
    sent = [stranger.send(packet[:4])]

    def trickle() -> None:
        try:
            for byte in packet[4:]:
                time.sleep(0.2)
                sent.append(stranger.send(bytes([byte])))
        except OSError:
            pass                # dropped: what the test checks

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    while len(sent) < 2:        # the magic and a byte: a multifd channel begun
        time.sleep(0.01)
    socks = replay(receiver.address, files)
    try:
        manifest = receiver.result().manifest
        assert sum(sent) < len(packet), "received only once the stranger had sent it all"
    finally:
        stranger.close()
        trickler.join(20)
        for sock in socks:
            sock.close()
    assert manifest["channels"] == 2


def test_silent_strangers_are_waited_for_together(tmp_path, captures):
    """Ten connections before the main channel say nothing and stay open. At
    barrier 1 they get LATE_BYTES_WAIT (1 s) together, not one after another
    (which held the migration up 10 s): it is received well within 6 s."""
    files = capture_bytes(captures[1], "none")
    late = threading.Event()
    timer = threading.Timer(6.0, late.set)
    receiver = Receiver(tmp_path / "out", stall_timeout=30.0)
    timer.start()
    try:
        manifest = receive_replay_into(receiver, files, strangers=(None,) * 10).manifest
        assert not late.is_set(), "the silent strangers were waited for one by one"
    finally:
        timer.cancel()
    assert manifest["channels"] == 2


@pytest.mark.parametrize("sent, keep_open, match", [
    (b"", True, r"it sent nothing within 1 s of the setup section's end"),
    (b"\x11\x22", False, r"it sent 2 bytes"),
    (b"GET / HTTP/1.0\r\n\r\n", False, r"it sent first bytes 47455420"),
], ids=["silent", "magic-cut", "other"])
def test_a_connection_after_the_main_channel_that_is_not_a_channel_fails(
        tmp_path, captures, sent, keep_open, match):
    """QEMU connects its channels after its main channel: a connection after it
    that is not a multifd channel (silent, cut short, other bytes) was one of
    QEMU's. Dropping it lost its pages (the migration "succeeded" with fewer
    channels, found by fuzzing): it fails the migration."""
    files = {**capture_bytes(captures[1], "none"), "stranger": sent}
    out = tmp_path / "out"
    with pytest.raises((ProtocolError, MigrationError),
                       match=r"a connection after the main channel \(from 127.0.0.1:\d+\): "
                             "not one of QEMU's channels: " + match):
        receive_replay(out, files, keep_open=keep_open)
    assert_nothing_complete(out)


class _FirstBarrier(QevmDecoder):
    class Found(Exception):
        pass

    def on_sync(self) -> None:
        raise self.Found()


def first_barrier_at(main: bytes) -> int:
    """Where the main channel's first SYNC barrier record (8 bytes: the setup
    section's EOS or MULTIFD_FLUSH) starts."""
    decoder = _FirstBarrier(ByteReader("main channel", main), 4096)
    with pytest.raises(_FirstBarrier.Found):
        decoder.decode_ram()
    return decoder.r.pos - 8


def test_a_channel_of_the_migration_after_the_setup_section_fails_it(tmp_path, captures,
                                                                     caplog):
    """A multifd channel with the migration's UUID that connects once the
    channels were counted (barrier 1) would have its pages missed: it fails
    the migration; the main channel waits meanwhile."""
    files = capture_bytes(captures[1], "none")
    main = files.pop("conn0.bin")
    (first, first_data), (late, late_data) = files.items()
    resume = threading.Event()
    caplog.set_level(logging.INFO, logger="fastmfd")
    receiver = Receiver(tmp_path / "out", stall_timeout=30.0)
    socks = replay(receiver.address, {"conn0.bin": main, first: first_data}, keep_open=True,
                   pause={"conn0.bin": first_barrier_at(main) + 8}, resume=resume)
    with failing_replay(receiver, socks, resume, tmp_path / "out",
                        r"multifd channel \d of this migration \(uuid [0-9a-f]+\) connected "
                        r"after the setup section ended"):
        deadline = time.monotonic() + 20
        while "1 multifd channels counted" not in caplog.text:
            assert time.monotonic() < deadline, "barrier 1 never came"
            time.sleep(0.01)
        socks += replay(receiver.address, {late: late_data}, keep_open=True)


def test_silent_connections_after_the_count_are_dropped_as_others_come(tmp_path, captures,
                                                                       caplog):
    """Once the channels were counted, the listener still tells connections
    apart (a late channel of the migration fails it); one that says nothing
    is dropped as the next comes, LATE_BYTES_WAIT on, so a client holding
    connections open cannot use up the receiver's descriptors. The
    migration goes on."""
    files = capture_bytes(captures[1], "none")
    main = files["conn0.bin"]
    resume = threading.Event()
    caplog.set_level(logging.INFO, logger="fastmfd")
    receiver = Receiver(tmp_path / "out", stall_timeout=30.0)
    socks = replay(receiver.address, files, keep_open=True,
                   pause={"conn0.bin": first_barrier_at(main) + 8}, resume=resume)
    address = parse_address(receiver.address)
    try:
        deadline = time.monotonic() + 20
        while "2 multifd channels counted" not in caplog.text:
            assert time.monotonic() < deadline, "barrier 1 never came"
            time.sleep(0.01)
        silent = connect(address, 5)
        socks.append(silent)
        silent.settimeout(0.5)
        # Others come, each beyond LATE_BYTES_WAIT after the one before (counted from
        # when the receiver took it, which a loaded host may do late): one drops it.
        deadline = time.monotonic() + 20
        while True:
            time.sleep(1.5)
            socks.append(connect(address, 5))
            with contextlib.suppress(TimeoutError):
                if silent.recv(1) == b"":
                    break
            assert time.monotonic() < deadline, "the silent connection was kept"
        resume.set()
        manifest = receiver.result().manifest
    finally:
        resume.set()
        for sock in socks:
            sock.close()
    assert manifest["channels"] == 2


def far_ends(clients: list[socket.socket]) -> list[tuple[int, int]]:
    """Each client's connection as the far end has it: its TCP state and the
    bytes it has not read (IPv4, /proc/net/tcp)."""
    ends = {(c.getpeername()[1], c.getsockname()[1]): i for i, c in enumerate(clients)}
    found: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        key = tuple(int(f.split(":")[1], 16) for f in fields[1:3])
        if key in ends:
            found[ends[key]] = (int(fields[3], 16), int(fields[4].split(":")[1], 16))
    assert len(found) == len(clients), f"connections missing from /proc/net/tcp: {found}"
    return [found[i] for i in range(len(clients))]


CLOSE_WAIT = 8                          # the far end has the client's FIN


def channel_packets(data: bytes) -> list[tuple[int, _core.RamPacket]]:
    """A capture's multifd channel: where each packet starts, and its header."""
    codec = _core.RamPacketCodec(128, layout=_core.LAYOUT_QEMU72)
    packets, at = [], _core.INIT_PACKET_SIZE
    while at < len(data):
        packet = codec.decode(data[at:at + codec.header_size])
        packets.append((at, packet))
        at += codec.header_size + packet.payload_size
    return packets


@pytest.mark.parametrize("extra, match", [
    ("page", r"multifd channel \d: \d+ pages after its last SYNC"),
    ("sync", r"multifd channel \d: (SYNC \d+ after the stream's end|\d+ SYNC packets, "
             r"expected \d+)"),
])
def test_a_channel_going_on_after_its_last_sync_fails_the_migration(tmp_path, captures,
                                                                    extra, match):
    """A multifd channel sends a page (a copy of its first data packet, one
    byte changed), or another SYNC, after its last SYNC, then closes. All
    pages precede the last SYNC in QEMU's stream, and its SYNCs match the
    main channel's barriers: this fails the migration. Before, the page was
    written into the block file, before or after receive() had committed it
    (found by fuzzing). The main channel's last byte waits until the channel
    is read to its end."""
    files = capture_bytes(captures[1], "none")
    header = _core.RamPacketCodec(128, layout=_core.LAYOUT_QEMU72).header_size
    channel = next(name for name in files if name != "conn0.bin")
    data = files[channel]
    packets = channel_packets(data)
    if extra == "page":
        at, packet = next((at, p) for at, p in packets if p.normal_pages)
        more = bytearray(data[at:at + header + packet.payload_size])
        more[header + 8] ^= 0x55
    else:
        at, packet = [(at, p) for at, p in packets if p.is_sync][-1]
        more = bytearray(data[at:at + header + packet.payload_size])
    files[channel] = data + bytes(more)
    main = files["conn0.bin"]
    resume = threading.Event()
    receiver = Receiver(tmp_path / "out", stall_timeout=30.0)
    socks = replay(receiver.address, files, pause={"conn0.bin": len(main) - 1}, resume=resume)
    with failing_replay(receiver, socks, resume, tmp_path / "out", match):
        client = socks[list(files).index(channel)]
        deadline = time.monotonic() + 20
        # All its bytes came and were read; its FIN too, unless its worker holds
        # at that extra SYNC (an unread FIN counts as a byte here).
        while (end := far_ends([client])[0])[0] != CLOSE_WAIT or end[1] > 1:
            assert time.monotonic() < deadline, f"channel not read to its end: {end}"
            time.sleep(0.01)


def test_a_channel_a_sync_ahead_fails_saying_it_went_on(tmp_path):
    """A multifd channel with a SYNC early (the flag on a data packet) is a
    barrier ahead for the rest of the stream: it is still sending when the
    main channel ends and the channels are shut for reading. Its worker,
    cut short mid-packet, failed as "connection closed after N of M bytes"
    alone, as a source gone would (found by fuzzing): now it says why."""
    files = capture_bytes(NATIVE_CAPTURES, "none")
    data = files["conn1.bin"]
    packets = channel_packets(data)
    early, later = packets[3][0], packets[5][0]
    assert packets[3][1].normal_pages and not packets[3][1].is_sync
    flags = int.from_bytes(data[early + 8:early + 12], "big") | _core.FLAG_SYNC
    files["conn1.bin"] = _flip(data, early + 8, flags.to_bytes(4, "big"))
    out = tmp_path / "out"
    receiver = Receiver(out, stall_timeout=5.0)
    resume = threading.Event()
    # Held in the middle of a packet (its 1344-byte header, then data) until the
    # receiver failed: cut short there.
    socks = replay(receiver.address, files, resume=resume,
                   pause={"conn1.bin": later + 1344 + 100})
    with failing_replay(receiver, socks, resume, out, r"multifd channel \d: the connection "
                        r"from \S+ closed .* \(the stream had ended and every channel had sent "
                        r"its last SYNC, but this one went on sending, and was shut for reading "
                        r"here\)",
                        hold=True):
        pass


def _syncs_only(block: str, size: int, page: int, syncs: int) -> bytes:
    """A QEMU 7.2 multifd channel 0 that sends no page: its init packet, then
    ``syncs`` SYNC packets (for a stream of one block ``block`` of ``size``)."""
    codec = _core.RamPacketCodec(128, page, _core.LAYOUT_QEMU72, 0, {block: size})
    sync = bytearray(codec.header_size)
    codec.encode(sync, flags=_core.FLAG_SYNC, ramblock=b"", normal=(), zero=(),
                 next_packet_size=0)
    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, bytes(16), 0)
    return bytes(init) + bytes(sync) * syncs


@contextlib.contextmanager
def failing_replay(receiver: Receiver, socks: list[socket.socket], resume: threading.Event,
                   out: Path, match: str, hold: bool = False) -> Iterator[None]:
    """Around a test's steps while a replay is paused: then it resumes (after the
    failure, with ``hold``), the receiver fails as ``match`` says, leaving nothing
    that looks complete; the replay's connections (``socks``, as the steps left
    it) are closed."""
    try:
        yield
        if not hold:
            resume.set()
        with pytest.raises((ProtocolError, MigrationError), match=match):
            receiver.result()
    finally:
        resume.set()
        for sock in socks:
            sock.close()
    assert_nothing_complete(out)


_NATIVE_NONE = functools.cache(lambda: capture_bytes(NATIVE_CAPTURES, "none"))


def _header_spots(name: str, data: bytes) -> list[int]:
    """Where the fields are: the main channel's RAM part, or a multifd channel's
    init packet and packet headers (its pages are data, which any byte may be)."""
    if name == "conn0.bin":
        return list(range(_ram_bytes({name: data})))
    header = _core.RamPacketCodec(128, layout=_core.LAYOUT_QEMU72).header_size
    return [*range(_core.INIT_PACKET_SIZE),
            *(at + i for at, _ in channel_packets(data) for i in range(header))]


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_stream_is_received_or_fails_cleanly(tmp_path_factory, data):
    """A live replay of a capture with a field byte changed, or cut short: the
    receiver returns, or fails with one fastmfd error leaving nothing that
    looks complete; never another exception, a hang or a leak (the autouse
    leak check). Fuzzing this way found what the tests above now pin."""
    files = dict(_NATIVE_NONE())
    name = data.draw(st.sampled_from(sorted(files)))
    spots = _header_spots(name, files[name])
    at = data.draw(st.sampled_from(spots))
    if data.draw(st.booleans()):
        files[name] = _flip(files[name], at, bytes([data.draw(st.integers(0, 255))]))
    else:
        files[name] = files[name][:at]
    out = tmp_path_factory.mktemp("mutated") / "out"
    try:
        # (a main channel cut at its first byte is no QEMU's: that waits out the
        # timeout for one to connect, which the replay's connections beat at once)
        received = receive_replay(out, files, receive_args={"stall_timeout": 2.0,
                                                            "timeout": 5.0})
    except FastMFDError as exc:
        event(f"failed: {type(exc).__name__}")
        assert_nothing_complete(out)
    else:
        event("received")
        assert (out / "manifest.json").is_file() and received.manifest["channels"] >= 1


def _ram_bytes(files: dict[str, bytes]) -> int:
    return decode_qemu_main("conn0.bin", files["conn0.bin"]).ram_bytes


@pytest.mark.parametrize("cut, match", [
    (lambda files: {"conn0.bin": _ram_bytes(files) // 2},
     r"main channel at byte \d+.*truncated"),
    (lambda files: {"conn0.bin": -100}, r"does not end with QEMU_VM_EOF"),
    (lambda files: {"conn1.bin": 1344 * 3 + 5000}, r"multifd channel \d"),
], ids=["main-in-ram", "main-in-devices", "multifd-in-packet"])
def test_truncated_stream_fails_cleanly(tmp_path, captures, cut, match):
    files = capture_bytes(captures[1], "none")
    out = tmp_path / "out"
    with pytest.raises((ProtocolError, MigrationError), match=match):
        receive_replay(out, files, cut=cut(files))
    assert_nothing_complete(out)


def _flip(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize("corrupt, match", [
    (lambda files: {"conn0.bin": _flip(files["conn0.bin"], 4, b"\0\0\0\x04")},
     r"main channel field 'version': received 4, expected 3"),
    (lambda files: {"conn0.bin": _flip(files["conn0.bin"], _ram_bytes(files) - 13,
                                       (0x40).to_bytes(8, "big"))},
     r"XBZRLE is not supported"),
    (lambda files: {"conn1.bin": _flip(files["conn1.bin"], 64 + 1344, b"\xde\xad")},
     r"RAM packet field 'magic': received 0xdead3344"),
    (lambda files: {"conn2.bin": _flip(files["conn2.bin"], 64 + 1344 + 16, b"\xff")},
     r"RAM packet field 'normal_pages'"),
    (lambda files: {"conn1.bin": _flip(files["conn1.bin"], 4, b"\0\0\0\x02")},
     r"a connection after the main channel \(from 127.0.0.1:\d+\): not one of QEMU's "
     r"channels: bad init packet: "
     r"init packet field 'version': received 2"),
    (lambda files: {"conn2.bin": _flip(files["conn2.bin"], 8, b"\0" * 16)},
     r"multifd channel \d: init packet field 'uuid': received 0{32}, expected 1234"),
    # The first channel's is taken for the migration's (no configuration/uuid):
    # which channel's uuid is wrong is not known, so both are named.
    (lambda files: {"conn1.bin": _flip(files["conn1.bin"], 8, b"\x01")},
     r"multifd channel (\d): init packet field 'uuid': received 1234\w+, expected 0134\w+ "
     r"\(the migration's: multifd channel (?!\1)\d's, the first after the main channel\)"),
], ids=["main-version", "main-record", "multifd-magic", "multifd-normal-pages",
        "multifd-init-version", "multifd-init-uuid", "multifd-init-first-uuid"])
def test_corrupt_stream_fails_cleanly(tmp_path, captures, corrupt, match):
    files = capture_bytes(captures[1], "zlib")
    files.update(corrupt(files))
    out = tmp_path / "out"
    with pytest.raises((ProtocolError, MigrationError), match=match):
        receive_replay(out, files)
    assert_nothing_complete(out)


def test_the_migrations_uuid_is_the_first_connected_channels_not_the_first_read():
    """The multifd channels send their init packets at once, and the one read first
    was taken for the migration's uuid where the stream carries none: a replay with
    channel 2's uuid zeroed named channel 1's as the wrong one when channel 2's packet
    was read first (test_corrupt_stream_fails_cleanly[10.0-native-multifd-init-uuid]
    failed so in a full suite under load)."""
    first = QemuChannel(1, socket.socket(), None, bytes.fromhex("12" * 16), arrival=1)
    second = QemuChannel(0, socket.socket(), None, bytes(16), arrival=2)
    try:
        read_first = [second, first]        # candidates: in the order their packets came
        assert migration_uuid(read_first, main_arrival=0, configured=None) == first.uuid
        with pytest.raises(ProtocolError, match=(
                rf"^multifd channel 0: init packet field 'uuid': received {'0' * 32}, "
                rf"expected {'12' * 16} \(the migration's: multifd channel 1's, ")):
            choose_channels(read_first, 0, first.uuid)
    finally:
        first.sock.close()
        second.sock.close()


def _flip_at(data: bytes, find: bytes, value: bytes, skip: int = 0) -> bytes:
    """``data`` with ``value`` written where ``find`` first occurs, ``skip`` bytes in."""
    return _flip(data, data.index(find) + skip, value)


@pytest.mark.parametrize("corrupt, match", [
    (lambda main: _flip(main, 9, b"\xff\xff\xff\xff"),
     r"main channel at byte 9: .*'configuration name length': received 4294967295, "
     r"expected at most 255"),
    (lambda main: _flip_at(main, b"pc.bios", b"\x01"),
     r"main channel at byte \d+: main channel block name: b'\\x01c.bios' is not "
     r"1..255 UTF-8 bytes, no control characters"),
    (lambda main: _flip_at(main, b"\x08\x00\x0b\x00\x00", b"\x63", skip=2),
     r"main channel at byte \d+: main channel: unknown command 99"),
    (lambda main: _flip_at(main, b"\x08\x00\x0b\x00\x00", b"\x08", skip=2),
     r"main channel at byte \d+: main channel: command ENABLE_COLO is not supported"),
    (lambda main: _flip_at(main, b"\x08\x00\x0b\x00\x00", b"\x02", skip=2),
     r"main channel at byte \d+: main channel: command PING with 0 bytes of data, "
     r"expected 4"),
    (lambda main: main.replace(b"\x08\x00\x0b\x00\x00", b"\x08\x00\x02\x00\x04" + b"\0" * 4),
     r"main channel at byte \d+: main channel: PING before OPEN_RETURN_PATH: no return "
     r"path to answer on"),
    (lambda main: main.replace(b"\x08\x00\x0b\x00\x00", b"\x08\x00\x0b\x00\x00" * 3),
     r"main channel at byte (\d+): main channel: command SWITCHOVER_START twice \(QEMU sends "
     r"it once; the first at byte (?!\1)\d+\)"),
], ids=["machine-name-length", "idstr-control", "command-unknown", "command-colo",
        "command-length", "ping-unopened", "switchover-twice"])
def test_bounded_and_checked_where_read(tmp_path, corrupt, match):
    """Fields of the main channel fail where they are read (found by fuzzing):
    a machine name length of 4 GiB before anything is allocated for it (it
    was asked of recv() at once: a MemoryError where memory is short), a
    block name that no file may have (a ConfigError without a place), a
    command QEMU does not have, one fastmfd cannot serve, one whose length
    is not QEMU's (QEMU 10's own pc sends SWITCHOVER_START, 08 000b 0000), and a
    second SWITCHOVER_START (each was kept: memory without bound)."""
    files = capture_bytes(NATIVE_CAPTURES, "none")
    files["conn0.bin"] = corrupt(files["conn0.bin"])
    out = tmp_path / "out"
    with pytest.raises((ProtocolError, MigrationError), match=match):
        receive_replay(out, files)
    assert_nothing_complete(out)


def with_return_path(main: bytes, pings: int) -> bytes:
    """``main`` with the commands that open a return path after its
    configuration, and ``pings`` PINGs more (values 2..)."""
    at = 8 + len(decode_qemu_main("conn0.bin", main).configuration)
    more = b"".join(struct.pack(">BHHI", 8, 2, 4, value) for value in range(2, pings + 2))
    return main[:at] + encode_open_return_path(1) + more + main[at:]


def test_a_return_path_is_answered_and_shut_once_the_files_are_committed(tmp_path, captures):
    """Each PING gets its PONG as it comes, and SHUT 0 comes once the manifest is
    on disk, then the connection's end; the switchover is acked first to a source
    of a machine type >= 8.1 (QEMU 10's own pc), which surely knows the message."""
    which, directory = captures
    files = capture_bytes(directory, "none")
    files["conn0.bin"] = with_return_path(files["conn0.bin"], 2)
    receiver = Receiver(tmp_path / "out")
    socks = replay(receiver.address, files, keep_open=True)
    try:
        receiver.result()
        socks[0].settimeout(10)
        said = b""
        while data := socks[0].recv(1 << 16):
            said += data
    finally:
        for sock in socks:
            sock.close()
    ack = encode_rp_switchover_ack() if which == "10.0-native" else b""
    assert said == ack + b"".join(map(encode_rp_pong, [1, 2, 3])) + encode_rp_shut(failed=False)
    assert (tmp_path / "out" / "manifest.json").exists()


def test_a_source_that_reads_nothing_of_its_return_path_fails_it_not_holds_it(tmp_path,
                                                                          qemu72_captures):
    """A source that PINGs and never reads the PONGs fills its connection's buffer
    (2 Mi PINGs: 16 MiB of PONGs, more than this host's socket buffers hold
    unread): the answer that does not fit fails the migration at once, it never
    waits."""
    files = capture_bytes(qemu72_captures, "none")
    files["conn0.bin"] = with_return_path(files["conn0.bin"], 1 << 21)
    out = tmp_path / "out"
    with pytest.raises(MigrationError, match=r"main channel: the source reads nothing of its "
                                             r"return path \(its socket buffer is full\)"):
        receive_replay(out, files)
    assert_nothing_complete(out)


def test_a_save_there_is_refused_naming_force_as_its_caller_knows_it(tmp_path):
    """The library said "not replacing it without --force", a flag its caller does not
    have; ``fastmfd listen --qemu``, the same code, keeps saying --force."""
    (tmp_path / "manifest.json").write_text("{}")
    refused = f"{tmp_path / 'manifest.json'} exists (a file): not replacing it without "
    for make in (qemu.QemuReceiver, qemu.receive):
        with pytest.raises(ConfigError, match=f"^{re.escape(refused)}force=True$"):
            make("tcp:127.0.0.1:0", str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "fastmfd", "listen", "--qemu", "tcp:127.0.0.1:0",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.endswith(f"{refused}--force\n"), done.stderr


def test_blocks_larger_than_max_size_are_refused_before_any_is_written(tmp_path, captures):
    """The block files are sparse and fill as pages arrive: what QEMU announces
    must fit (max_size, or the directory's free space) before a page is taken
    (found in review: a QEMU stream was never checked, fastmfd's own were)."""
    files = capture_bytes(captures[1], "none")
    out = tmp_path / "out"
    with pytest.raises(MigrationError, match=r"main channel: the source sends 32\.\d+ MiB "
                                             r"of regions; max_size allows 16\.0 MiB"):
        receive_replay(out, files, receive_args={"max_size": 16 << 20})
    assert_nothing_complete(out)


def qemu_channels_memory(channels: int, workers: int) -> int:
    """What max_memory holds for ``channels`` QEMU channels (each counted with a zstd
    window: its method is learnt later) and ``workers`` worker processes."""
    return (channels * _core.receive_channel_bytes(128, 4096, 1 << 62, 0, False, "zstd")
            + workers * WORKER_BYTES)


def test_channels_beyond_max_memory_fail_the_migration_as_they_connect(tmp_path, captures):
    """A QEMU receiver took no max_memory (review exp40): each channel QEMU opened made
    it start a worker and its buffers, unbounded. Given one, the channels and workers
    are counted as the channels connect: the second of the capture's does not fit, and
    fails the migration before its worker starts; a bound that holds both receives."""
    files = capture_bytes(captures[1], "none")
    fits = qemu_channels_memory(2, 2)               # the 2 workers started ahead
    out = tmp_path / "out"
    with pytest.raises(MigrationError) as failed:
        receive_replay(out, files, receive_args={"max_memory": fits - 1})
    assert (f"multifd channel 1: QEMU's 2 multifd channel(s) so far need 2 worker processes "
            f"(a receive worker per channel, and those started ahead), 16 MiB each: "
            f"{2 * WORKER_BYTES} bytes, besides {fits - 2 * WORKER_BYTES} bytes of receive "
            f"buffers; this receiver holds at most {fits - 1} (max_memory)") in str(failed.value)
    assert_nothing_complete(out)
    manifest = receive_replay(out, files, receive_args={"max_memory": fits}).manifest
    assert manifest["channels"] == 2


def test_a_stream_whose_end_is_wrong_is_bad_bytes_not_a_source_gone(tmp_path):
    """The whole stream came, and the connection ended as it should, but its VM
    description is not this stream's (the page size): a ProtocolError naming
    it, not "the source closed it before the stream's end" (found in review)."""
    files = capture_bytes(NATIVE_CAPTURES, "none")
    assert files["conn0.bin"].count(b'"page_size": 4096') == 1
    files["conn0.bin"] = files["conn0.bin"].replace(b'"page_size": 4096',
                                                    b'"page_size": 8192')
    out = tmp_path / "out"
    with pytest.raises(ProtocolError, match=r"VM description: expected an object with "
                                            r"'devices' and 'page_size' 4096"):
        receive_replay(out, files)
    assert_nothing_complete(out)


def test_a_stream_without_ram_fails_cleanly(tmp_path):
    """A device section before any RAM section: nothing a saved directory could be
    replayed from (its manifest would have no RAM section id), so it fails at once."""
    timer = b"timer"
    main = (b"QEVM" + (3).to_bytes(4, "big") + b"\x04" + (0).to_bytes(4, "big")
            + bytes([len(timer)]) + timer + (0).to_bytes(4, "big") + (2).to_bytes(4, "big"))
    out = tmp_path / "out"
    with pytest.raises(ProtocolError, match=r"main channel at byte 8: main channel: timer "
                                            r"before the RAM section ended"):
        receive_replay(out, {"conn0.bin": main})
    assert_nothing_complete(out)


# ---------------------------------------------------------------- a stream made here

def test_pages_on_the_main_channel_into_a_full_disk_fail_cleanly(small_disk):
    """QEMU 7.2 may send a page on the main channel (a ZERO record of a fill byte
    other than 0 is one); written into a sparse block file whose disk filled up
    after the block list was checked, that is a clean error, not a SIGBUS (which
    would kill the receiving process: this one)."""
    block, size, page = "pc.ram", 512 << 10, 4096
    eos = encode_ram_eos(2, True)
    part, end = (bytes([kind]) + (2).to_bytes(4, "big") for kind in (0x02, 0x03))
    name = bytes([len(block)]) + block.encode()
    filled = (struct.pack(">Q", RAM_ZERO) + name + b"\x55" + b"".join(
        struct.pack(">QB", n * page | RAM_ZERO | RAM_CONTINUE, 0x55)
        for n in range(1, size // page)))
    start = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
             + encode_ram_start(2, {block: size}) + eos)
    description = json.dumps({"page_size": page, "devices": []}).encode()
    main = (start + part + filled + eos + end + eos
            + b"\x00\x06" + len(description).to_bytes(4, "big") + description)
    channel = _syncs_only(block, size, page, 3)

    out = small_disk / "out"
    receiver = Receiver(out)
    target = parse_address(receiver.address)
    socks = [connect(target, 5), connect(target, 5)]
    resume = threading.Event()
    with failing_replay(receiver, socks, resume, out, r"block pc\.ram: no memory to write "
                        r"into: the file system that holds it is full"):
        threading.Thread(target=_send_quietly, args=(socks[0], main, True, len(start), resume),
                         daemon=True).start()
        threading.Thread(target=_send_quietly, args=(socks[1], channel), daemon=True).start()
        deadline = time.monotonic() + 10
        while not list(out.glob("*.img.part")):
            assert time.monotonic() < deadline, "the block file was never made"
            time.sleep(0.01)
        with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as filler:
            filler.write(bytes(1 << 20))            # the disk full: ENOSPC


@pytest.mark.parametrize("bits", [20, 21])
def test_pages_larger_than_a_multifd_packet_are_refused_where_read(tmp_path, bits):
    """A configuration saying target pages of 1 or 2 MiB (blocks of whole such
    pages): a ProtocolError at its target-page-bits, not receive workers each
    failing on a ValueError (0 pages per 512 KiB packet; found in an audit)."""
    name = b"configuration/target-page-bits"
    configuration = (b"\x07" + (3).to_bytes(4, "big") + b"abc" + bytes([0x05, len(name)])
                     + name + struct.pack(">II", 1, bits))
    eos = encode_ram_eos(2, True)
    main = (encode_stream_start(configuration) + encode_ram_start(2, {"pc.ram": 4 << 20})
            + eos + b"\x03" + (2).to_bytes(4, "big") + eos)
    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, bytes(16), 0)
    out = tmp_path / "out"
    with pytest.raises(ProtocolError, match=rf"main channel at byte 52: configuration field "
                                            rf"'target_page_bits': received {bits}, expected "
                                            r"9..19 \(a multifd packet holds 512 KiB of pages"):
        receive_replay(out, {"conn0.bin": main, "conn1.bin": bytes(init)})
    assert_nothing_complete(out)


def test_a_block_list_of_too_many_blocks_is_refused_where_read(tmp_path):
    """More RAM blocks than fastmfd's own sessions may have regions (a block is
    some 15 bytes of the stream, its file, mapping and bitmap much more): a
    ProtocolError at the first one too many. 30000 took every receive worker
    to a bare OSError (mmap: Cannot allocate memory); found in an audit."""
    blocks = {f"b{i}": 4096 for i in range(MAX_REGIONS + 1)}
    eos = encode_ram_eos(2, True)
    main = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
            + encode_ram_start(2, blocks))
    last = len(main) - len(b"\x05b4096") - 8
    main += eos
    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, bytes(16), 0)
    out = tmp_path / "out"
    with pytest.raises(ProtocolError, match=rf"main channel at byte {last}: RAM block "
                                            rf"list: more than {MAX_REGIONS} blocks"):
        receive_replay(out, {"conn0.bin": main, "conn1.bin": bytes(init)})
    assert_nothing_complete(out)


class _CountingReader(ByteReader):
    """A capture's reader that counts the bytes the decoder looks ahead at."""
    looked_at = 0

    def peek_view(self, n: int) -> memoryview:
        self.looked_at += n
        return super().peek_view(n)


def test_records_that_break_zero_runs_are_decoded_in_linear_time():
    """ZERO records of a fill byte other than 0 (QEMU sends 0; a corrupt or
    hostile stream need not), each breaking the run of zero pages the decoder
    looks for: each look scanned every record at hand, quadratic in what is
    buffered (a 1.6 MB capture took `fastmfd inspect` minutes; found in an
    audit). Now the bytes looked at grow with the stream, not its square."""
    block, page, n = "pc.ram", 4096, 20000
    name = bytes([len(block)]) + block.encode()
    records = struct.pack(">Q", RAM_ZERO) + name + b"\x55" + b"".join(
        struct.pack(">QB", i * page | RAM_ZERO | RAM_CONTINUE, 0x55) for i in range(1, n))
    main = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
            + encode_ram_start(2, {block: n * page}) + encode_ram_eos(2, True)
            + b"\x03" + (2).to_bytes(4, "big") + records + encode_ram_eos(2, True))
    devices = b"\x04" + (3).to_bytes(4, "big") + b"\x05timer" + bytes(8)
    reader = _CountingReader("main channel", main + devices)
    out = QevmDecoder(reader, page).decode_ram()
    assert (out.zero_pages, out.ram_bytes) == (n, len(main))
    assert reader.looked_at < 100 * len(main)


def test_device_state_into_a_full_disk_fails_cleanly(small_disk):
    """The device sections, written into vmstate.bin as they come, fill the disk
    (they are not counted in the room the block list must find): a
    MigrationError naming the file, not a bare OSError (found in an audit)."""
    block, size, page = "pc.ram", 64 << 10, 4096
    eos = encode_ram_eos(2, True)
    description = json.dumps({"page_size": page, "devices": []}).encode()
    devices = b"\x04" + (3).to_bytes(4, "big") + b"\x05timer" + bytes(8) + bytes(2 << 20)
    main = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
            + encode_ram_start(2, {block: size}) + eos + b"\x03" + (2).to_bytes(4, "big") + eos
            + devices + b"\x00\x06" + len(description).to_bytes(4, "big") + description)
    out = small_disk / "out"
    receiver = Receiver(out)
    target = parse_address(receiver.address)
    socks = [connect(target, 5), connect(target, 5)]
    try:
        for sock, data in zip(socks, (main, _syncs_only(block, size, page, 2))):
            threading.Thread(target=_send_quietly, args=(sock, data), daemon=True).start()
        with pytest.raises(MigrationError, match=r"the device state \(vmstate\.bin\): writing "
                                                 r"it to disk failed: No space left on device"):
            receiver.result()
    finally:
        for sock in socks:
            sock.close()
    assert_nothing_complete(out)


@pytest.mark.parametrize("flavour", ["qemu-7.2", "qemu-10"])
def test_zero_page_after_data_is_written(tmpfs_path, flavour):
    """A page sent as data in one round and as zero in the next ends up zero (the
    file is not left holding the older data), and a hole again, as the pages only
    ever zero stay; sent as zero once more, the hole is not read (on tmpfs, where
    the block file is, a read would allocate it again: a SIGBUS on a full disk).
    QEMU 7.2's way: ZERO records on the main channel, a SYNC before each EOS;
    QEMU 10's: zero pages listed in the multifd packets, a SYNC before each
    MULTIFD_FLUSH record (and none at the EOS that follows)."""
    block, size, page = "pc.ram", 1 << 20, 4096
    native = flavour == "qemu-10"
    part, end = (bytes([kind]) + (2).to_bytes(4, "big") for kind in (0x02, 0x03))
    eos = (encode_multifd_flush() if native else b"") + encode_ram_eos(2, True)
    # Round 2 sends page 5 and a run long enough to be punched out as data,
    # rounds 3 and 4 list them (and pages that were never data) as zero.
    run = np.arange(64, 64 + _core.PUNCH_MIN_BYTES // page, dtype=np.uint64) * page
    data = np.concatenate([[5 * page], run]).astype(np.uint64)
    zeros = np.concatenate([[5 * page, 9 * page], run]).astype(np.uint64)
    main = (encode_stream_start(b"\x07" + (3).to_bytes(4, "big") + b"abc")
            + encode_ram_start(2, {block: size}) + eos           # round 1: setup
            + part + eos                                         # round 2: data (multifd)
            + (part + (b"" if native else encode_zero_records(block, zeros)) + eos) * 2
            + end + eos)
    description = json.dumps({"page_size": page, "devices": []}).encode()
    main += b"\x00\x06" + len(description).to_bytes(4, "big") + description

    layout = _core.LAYOUT_CURRENT if native else _core.LAYOUT_QEMU72
    codec = _core.RamPacketCodec(128, page, layout, 0, {block: size})
    header = bytearray(codec.header_size)

    def packet(flags, normal=(), data=b"", zero=()):
        codec.encode(header, flags=flags, ramblock=block if len(normal) + len(zero) else b"",
                     normal=normal, zero=zero, next_packet_size=len(data))
        return bytes(header) + data

    init = bytearray(_core.INIT_PACKET_SIZE)
    _core.encode_init_packet(init, bytes(16), 0)
    channel = (bytes(init) + packet(_core.FLAG_SYNC)                    # setup
               + packet(0, data, b"\x77" * page * len(data))
               + packet(_core.FLAG_SYNC)                                       # round 2
               + ((packet(0, zero=zeros) if native else b"")           # rounds 3, 4
                  + packet(_core.FLAG_SYNC)) * 2
               + packet(_core.FLAG_SYNC))                                       # round 5

    out = tmpfs_path / "out"
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
    path = out / received.manifest["blocks"][0]["file"]
    assert path.read_bytes() == bytes(size)
    # The run's data took blocks until round 3 cleared it: a hole punched, not
    # zeros written; page 5, alone, is zero-filled (cheaper), and keeps its block.
    assert path.stat().st_blocks * 512 <= page
    manifest = received.manifest
    assert manifest["ram_section_ends"] == manifest["syncs"] == 5
    assert (manifest["multifd_sync"], manifest["zero_page_detection"]) == \
        ((SYNC_PER_ROUND, "multifd") if native else (SYNC_PER_SECTION, "legacy"))


def test_a_receiver_that_failed_to_start_leaves_no_directory(tmp_path):
    """A port taken: the directories it made for its files are removed, as after a
    failed receive (listen --qemu --dir NEW left NEW)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="Address already in use"):
            qemu.QemuReceiver(f"tcp:127.0.0.1:{taken.getsockname()[1]}",
                              str(tmp_path / "new" / "out"))
    assert os.listdir(tmp_path) == []
