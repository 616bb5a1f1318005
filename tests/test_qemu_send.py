"""fastmfd as the source of a QEMU migration (``fastmfd.qemu.send``,
``fastmfd send --qemu``): a directory ``listen --qemu`` saved, played back.

Into a fresh real QEMU 7.2 started with ``-incoming defer`` (skipped without
one), which must complete with the guest's RAM; and, everywhere, into
``qemu.receive`` itself, which must save the same directory again.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fastmfd import qemu
from fastmfd.errors import ConfigError, MigrationError
from qemu_support import Guest, needs_qemu, pattern
from test_qemu_receive import Receiver, replay

GUEST_MIB = 64


def saved_guest(tmp_path, channels: int, compression: str):
    """A real guest's migration saved by ``qemu.receive``: (directory, its RAM)."""
    ram = pattern(GUEST_MIB, seed=3)
    ram_path = tmp_path / "src-ram.img"
    ram.tofile(ram_path)
    source = Guest(tmp_path, str(ram_path), GUEST_MIB)
    try:
        source.set_multifd(channels, compression)
        receiver = Receiver(tmp_path / "saved")
        source.migrate(receiver.address)
        assert source.wait() == "completed"
        receiver.result()
    finally:
        source.close()
    return tmp_path / "saved", ram


def incoming_guest(tmp_path, channels: int, compression: str):
    """A fresh QEMU waiting for a migration: (guest, its RAM file, address)."""
    ram_path = tmp_path / "dst-ram.img"
    with open(ram_path, "wb") as f:
        f.truncate(GUEST_MIB << 20)
    guest = Guest(tmp_path, str(ram_path), GUEST_MIB, incoming=True, name="dst")
    try:
        guest.set_multifd(channels, compression)
        guest.qmp.command("migrate-incoming", uri="tcp:127.0.0.1:0")
        socket_address = guest.qmp.command("query-migrate")["socket-address"][0]
    except BaseException:
        guest.close()
        raise
    return guest, ram_path, f"tcp:{socket_address['host']}:{socket_address['port']}"


@needs_qemu
@pytest.mark.parametrize("channels, compression", [(1, "zlib"), (2, "none"), (4, "zstd")])
def test_saved_migration_goes_back_into_qemu(tmp_path, channels, compression):
    saved, ram = saved_guest(tmp_path, 2, "none")
    guest, ram_path, address = incoming_guest(tmp_path, channels, compression)
    try:
        sent = qemu.send(address, str(saved), channels=channels, compression=compression,
                         stall_timeout=10.0)
        assert guest.wait() == "completed"
        assert np.array_equal(np.fromfile(ram_path, dtype=np.uint8), ram)
        assert len(sent) == channels and all(c["syncs"] == 2 for c in sent)
        guest.qmp.command("cont")
        assert guest.qmp.command("query-status")["status"] == "running"
    finally:
        guest.close()


@needs_qemu
def test_send_qemu_command(tmp_path):
    saved, ram = saved_guest(tmp_path, 4, "zstd")
    guest, ram_path, address = incoming_guest(tmp_path, 2, "zlib")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fastmfd", "send", "--qemu", address, "--dir", str(saved),
             "--channels", "2", "--compression", "zlib", "--stall-timeout", "10"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert guest.wait() == "completed"
        assert np.array_equal(np.fromfile(ram_path, dtype=np.uint8), ram)
    finally:
        guest.close()


@pytest.mark.parametrize("channels, compression", [(1, "none"), (3, "zstd"), (2, "zlib")])
def test_send_into_receive_saves_the_same_directory(tmp_path, qemu72_captures, channels,
                                                    compression):
    """fastmfd -> fastmfd in QEMU's protocol: the replayed capture, saved, sent and
    saved again, gives the same blocks and device sections."""
    first = Receiver(tmp_path / "first")
    socks = replay(first.address, qemu72_captures / "pattern-zstd")
    try:
        saved = first.result()
    finally:
        for sock in socks:
            sock.close()
    second = Receiver(tmp_path / "second")
    qemu.send(second.address, str(tmp_path / "first"), channels=channels,
              compression=compression, stall_timeout=10.0)
    again = second.result()
    assert again.manifest["channels"] == channels
    assert again.manifest["compression"] == compression
    for key in ("blocks", "configuration", "uuid", "machine", "page_size"):
        assert again.manifest[key] == saved.manifest[key]
    for block in saved.manifest["blocks"]:
        name = block["file"]
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
    assert (tmp_path / "second" / "vmstate.bin").read_bytes() == \
        (tmp_path / "first" / "vmstate.bin").read_bytes()


def test_send_refuses_a_directory_without_a_qemu_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"regions": [], "devices": []}))
    with pytest.raises(ConfigError, match="not the manifest of a QEMU migration"):
        qemu.send("tcp:127.0.0.1:9", str(tmp_path))


def test_send_refuses_a_manifest_naming_a_path(tmp_path, qemu72_captures):
    first = Receiver(tmp_path / "saved")
    socks = replay(first.address, qemu72_captures / "pattern-none")
    try:
        first.result()
    finally:
        for sock in socks:
            sock.close()
    path = tmp_path / "saved" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["blocks"][0]["file"] = "../outside.img"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="expected a file name in"):
        qemu.send("tcp:127.0.0.1:9", str(tmp_path / "saved"))


@needs_qemu
def test_a_destination_expecting_other_channels_fails_the_send(tmp_path):
    """QEMU negotiates nothing: a destination waiting for 4 channels gets 2 and reads
    nothing; the send fails within its deadline, saying what to check."""
    saved, _ = saved_guest(tmp_path, 2, "none")
    guest, _, address = incoming_guest(tmp_path, 4, "none")
    try:
        with pytest.raises(MigrationError, match="multifd-channels 2"):
            qemu.send(address, str(saved), channels=2, stall_timeout=2.0)
    finally:
        guest.close()
