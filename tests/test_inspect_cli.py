"""``fastmfd inspect FILE... [--json] [--packet-pages N] [--layout L]``."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from fastmfd.tools.cli import main
from fastmfd.tools.inspect.capture import read_capture
from inspect_support import PACKET_PAGES, ROUND_ENDS, capture_files, two_rounds, write_files
from listen_support import run_cli

BORDER = re.compile("[│|]")     # rich draws ASCII borders when stdout is not UTF-8


def run_module(*args: str, **options) -> subprocess.CompletedProcess:
    """``python -m fastmfd inspect ARGS``, as a user runs it (listen_support.run_cli)."""
    return run_cli("inspect", *args, **options)


def test_text_summary_of_a_qemu_capture():
    files = capture_files("zlib")
    done = run_module(*map(str, files))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    summary = read_capture(files).summary()
    assert "layout qemu-7.2" in out and f"files in {files[0].parent}" in out
    assert f"{summary['main']['eos']} EOS" in out
    assert f"{summary['main']['zero_pages']} zero pages" in out
    rows = [line for line in out.splitlines() if "conn1.bin" in line or "conn2.bin" in line]
    for channel, row in zip(summary["channels"], rows):
        cells = [cell.strip() for cell in BORDER.split(row)[1:-1]]
        assert cells[:8] == [Path(channel["file"]).name, str(channel["id"]), "multifd", "zlib",
                             str(channel["packets"]), str(channel["pages"]["normal"]),
                             str(channel["pages"]["zero"]), str(channel["syncs"])]
        assert cells[-1] == str(channel["bytes"])
    for name, block in summary["blocks"].items():
        assert [name, str(block["size"]), str(block["pages"]), str(block["pages_expected"])] \
            in [[cell.strip() for cell in BORDER.split(line)[1:-1]] for line in out.splitlines()]


def test_json_summary_is_the_capture_summary(capsys):
    files = capture_files("zstd")
    assert main(["inspect", "--json", *map(str, reversed(files))]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(read_capture(files).summary()))
    assert [c["syncs"] for c in printed["channels"]] == [3, 3]


def test_layout_and_packet_pages_options(tmp_path, capsys):
    files = two_rounds("zlib").files(ROUND_ENDS)
    del files["main.bin"]
    paths = [str(p) for p in write_files(tmp_path, files)]
    assert main(["inspect", "--json", "--packet-pages", str(PACKET_PAGES), *paths]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["layout"], printed["packet_pages"]) == ("current", PACKET_PAGES)
    assert printed["main"] is None
    _, conn1, conn2 = capture_files("none")
    assert main(["inspect", "--layout", "qemu-7.2", str(conn1), str(conn2)]) == 0
    assert "main channel: not in the capture" in capsys.readouterr().out


def test_a_corrupt_file_is_one_line_on_stderr(tmp_path):
    bad = tmp_path / "conn1.bin"
    bad.write_bytes(capture_files("zlib")[1].read_bytes()[:5000])
    conn0, _, conn2 = capture_files("zlib")
    done = run_module(str(conn0), str(bad), str(conn2))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"fastmfd inspect: {bad} at byte ")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [["--layout", "qemu-9"], []])
def test_bad_arguments_are_usage_errors(args):
    with pytest.raises(SystemExit) as info:
        main(["inspect", *args])
    assert info.value.code == 2


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_file_that_is_not_regular_is_a_usage_error_before_it_is_read(tmp_path, kind):
    # A FIFO nobody writes blocked the open (and the read) for ever; /dev/zero was
    # read until memory ran out (here: 256 MiB, a MemoryError traceback).
    path = tmp_path / "conn0.bin"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    done = run_module(str(tmp_path), timeout=20, max_data=256 << 20)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert done.stderr == f"fastmfd inspect: {path}: {what}, not a regular file\n"


def test_a_capture_is_mapped_not_read_into_memory(tmp_path):
    # 1 GiB (sparse: no disk) under a 256 MiB allocation limit: read whole, it was
    # a MemoryError; mapped, its first bytes are judged (zeros: no known channel).
    big = tmp_path / "conn0.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    done = run_module(str(big), timeout=20, max_data=256 << 20)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"fastmfd inspect: {big} at byte 0: unknown channel")
    assert len(done.stderr.splitlines()) == 1


def test_an_empty_capture_file_is_located_not_mapped(tmp_path):
    empty = tmp_path / "conn0.bin"
    empty.touch()
    done = run_module(str(empty), timeout=20)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"fastmfd inspect: {empty} at byte 0: unknown channel")


def test_a_capture_of_a_tls_connection_is_said_to_be_one(tmp_path):
    # What a TLS client sends first (a real ClientHello, as fastmfd's channels in TLS
    # open): "unknown channel: first bytes 16030102" was all inspect said of it.
    import ssl
    outgoing = ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing,
                                                   server_hostname="destination")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    capture = tmp_path / "conn0.bin"
    capture.write_bytes(outgoing.read())
    done = run_module(str(capture), timeout=20)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"fastmfd inspect: {capture} at byte 0: a TLS record "
                                  f"(first bytes 1603"), done.stderr
    assert "inspect decodes plaintext captures only" in done.stderr


def _tls_records() -> dict[str, bytes]:
    """Real first bytes of TLS connections (trustme's CA): what a TLS 1.3-only server
    sends a TLS 1.2 client over a socket pair (an alert), and a TLS 1.3 client's
    second flight (ChangeCipherSpec first) and application data, as a capture started
    mid-session holds them."""
    import socket
    import ssl
    import threading

    import trustme
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.issue_cert("destination").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)

    def handshake(tls: ssl.SSLSocket | ssl.SSLObject) -> None:
        with pytest.raises((ssl.SSLWantReadError, ssl.SSLError)):
            tls.do_handshake()

    old_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ca.configure_trust(old_ctx)
    outgoing = ssl.MemoryBIO()
    handshake(old_ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="destination"))
    ours, theirs = socket.socketpair()
    with ours, server_ctx.wrap_socket(theirs, server_side=True,
                                      do_handshake_on_connect=False) as server:
        refusing = threading.Thread(target=handshake, args=(server,))
        refusing.start()
        ours.sendall(outgoing.read())
        refusing.join()             # it failed, its alert sent
        ours.settimeout(10)
        alert = ours.recv(4096)

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="destination")
    server_side = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    handshake(client)
    s_in.write(c_out.read())
    handshake(server_side)
    c_in.write(s_out.read())
    client.do_handshake()
    second = c_out.read()
    client.write(b"QEVM")
    return {"alert": alert, "second flight": second, "data": c_out.read()}


def test_a_capture_starting_with_any_tls_record_is_said_to_be_tls(tmp_path):
    # A capture starting with an alert (0x15), a ChangeCipherSpec (0x14) or application
    # data (0x17) was an "unknown channel"; only a handshake record (0x16) was named TLS.
    records = _tls_records()
    assert {name: data[:2] for name, data in records.items()} == {
        "alert": b"\x15\x03", "second flight": b"\x14\x03", "data": b"\x17\x03"}
    for name, data, what in [("alert", records["alert"], "an alert"),
                             ("second flight", records["second flight"], "a ChangeCipherSpec"),
                             ("data", records["data"], "application data")]:
        capture = tmp_path / f"{name}.bin"
        capture.write_bytes(data)
        done = run_module(str(capture), timeout=20)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"fastmfd inspect: {capture} at byte 0: a TLS record "
                                      f"(first bytes {data[:4].hex()}: {what}): this "
                                      "connection was in TLS"), done.stderr


NO_QEMU_CHECKSUM = ("fastmfd inspect: checksum: QEMU's packets (the qemu-7.2 layout, or a QEMU "
                    "main channel) carry no fastmfd checksum\n")


@pytest.mark.parametrize("which, options, status", [
    ("all", [], 2), ("channel", ["--layout", "qemu-7.2"], 2), ("channel", [], 1)])
def test_checksum_with_qemus_packets_is_one_line(which, options, status):
    """--checksum with a QEMU capture: the qemu-7.2 layout (given, or a QEMU main
    channel's; or tried when a lone channel failed as current) made a RamPacketCodec
    with fastmfd's checksum: ValueError 'the QEMU 7.2 layout has no fastmfd
    extensions', a traceback (found by benchmarks/fuzz.py's inspect target)."""
    files = capture_files("none")
    paths = map(str, files if which == "all" else files[1:2])
    done = run_module("--checksum", *options, *paths)
    assert done.returncode == status and done.stdout == "", done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    if status == 2:
        assert done.stderr == NO_QEMU_CHECKSUM
    else:
        assert "RAM packet field 'checksum'" in done.stderr, done.stderr
