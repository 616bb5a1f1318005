"""The command line's conventions (issue #11): ``--version``; results (``--json``)
on stdout, progress and logs (``-v``) on stderr, for ``send`` and ``listen``
alike; ``--timeout`` and ``--max-bandwidth``; QEMU's address forms;
``inspect DIR``; every user mistake is exit 2 and one line, before any work;
OS errors keep their errno; wrong types are TypeErrors naming the parameter.
Commands run in real subprocesses over real sockets."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import fastmfd
from fastmfd.tools import cli
from fastmfd.protocol.sockets import parse_address
from inspect_support import ROUND_ENDS, two_rounds
from listen_support import Listener, listens_at

PAGE = 4096
TIMEOUT = 120


def fastmfd_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmfd", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, **kwargs)


def assert_one_line_usage_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for word in words:
        assert word in done.stderr


def test_version():
    done = fastmfd_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fastmfd {fastmfd.__version__}"


def send_to_a_json_listener(out, *send_args: str, sock: str = "sock",
                            listen_extra: tuple[str, ...] = ()
                            ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """``fastmfd send ADDRESS *send_args`` into ``fastmfd listen ADDRESS --dir out
    --json -v *listen_extra`` (its ``args[1]``, a Unix socket named ``sock``): both
    commands' results."""
    sock_dir = tempfile.mkdtemp(prefix="fmfd-cli-")      # a Unix path holds 107 bytes
    address = f"unix:{sock_dir}/{sock}"
    listen_args = ["listen", address, "--dir", str(out), "--timeout", "60", "--json", "-v",
                   *listen_extra]
    listener = subprocess.Popen([sys.executable, "-m", "fastmfd", *listen_args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 0
        while not listens_at(f"{sock_dir}/{sock}") and deadline < 600:
            deadline += 1
            threading.Event().wait(0.05)
        sent = fastmfd_cli("send", address, *send_args)
        received = listener.communicate(timeout=TIMEOUT)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return sent, subprocess.CompletedProcess(listen_args, listener.returncode, *received)


def test_send_and_listen_print_json_on_stdout_and_the_rest_on_stderr(tmp_path):
    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(32 * PAGE) + bytes(32 * PAGE))
    out = tmp_path / "out"
    sent, listened = send_to_a_json_listener(out, str(image), "--json", "-v", "--timeout", "30",
                                             "--max-bandwidth", "64M", "--compression", "zstd")
    address, received_out, received_err = listened.args[1], listened.stdout, listened.stderr
    assert sent.returncode == 0, sent.stderr
    assert listened.returncode == 0, received_err
    stats = json.loads(sent.stdout)             # stdout is the JSON and nothing else
    assert stats["ram_bytes"] == 64 * PAGE and stats["zero_pages"] == 32
    assert stats["compression"] == "zstd"
    assert "sending 1 image(s)" in sent.stderr        # -v: a log line, on stderr
    bar = sent.stderr.splitlines()[1]               # the progress bar's last state
    assert "256.0/256.0 KiB" in bar and "iB/s" in bar, sent.stderr
    assert not re.search(r"\d [kMG]B", sent.stderr)       # binary units only
    result = json.loads(received_out)
    assert result["files"]["regions"] == {"ram": str(out / "ram.img")}
    assert result["sizes"][str(out / "ram.img")] == 64 * PAGE
    assert result["stats"]["zero_pages"] == 32
    assert f"listening on {address}" in received_err
    assert "the source's SETUP: 1 region(s) (256 KiB)" in received_err     # -v
    assert (out / "ram.img").read_bytes() == image.read_bytes()


def test_listen_prints_addresses_and_paths_with_their_brackets(tmp_path):
    """rich's markup took '[o]' and '[e]' for style tags: 'listening on unix:.../sck',
    'ram -> .../savd/ram.img'."""
    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(4 * PAGE))
    out = tmp_path / "sav[e]d"
    sent, listened = send_to_a_json_listener(out, f"ram={image}", "-q", sock="s[o]ck")
    assert sent.returncode == 0 and listened.returncode == 0, sent.stderr + listened.stderr
    assert f"listening on {listened.args[1]}\n" in listened.stderr, listened.stderr
    # Each on one line, however long (rich folded them at 80 columns in a file: a review)
    assert len(f"region ram -> {out / 'ram.img'} (16.0 KiB)") > 80
    assert f"\nregion ram -> {out / 'ram.img'} (16.0 KiB)\n" in listened.stderr, \
        listened.stderr
    assert re.search(rf"^manifest -> {re.escape(str(out / 'manifest.json'))} \(\d+ B\)$",
                     listened.stderr, re.M), listened.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip: a network namespace whose lo has a "
                           "ULA IPv6 address (::1 keeps its brackets: rich's tags start "
                           "with a letter)")
@pytest.mark.parametrize("qemu", [[], ["--qemu"]])
def test_listen_on_an_ipv6_host_that_starts_with_a_letter_prints_it(tmp_path, qemu):
    """fd00::/8, as Docker's IPv6 networks use: '[fd00:77::2]' was read as a style tag,
    and the line said 'listening on tcp::PORT', this tool's notation for every IPv4
    interface."""
    command = [sys.executable, "-m", "fastmfd", "listen", *qemu, "tcp:[fd00:77::2]:0",
               "--dir", str(tmp_path / "out"), "--timeout", "0.2"]
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && ip addr add fd00:77::2/128 dev lo '
         'nodad && exec "$@"', "sh", *command], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1, done.stderr
    assert re.search(r"^listening on tcp:\[fd00:77::2\]:[1-9]\d*\b", done.stderr, re.M), \
        done.stderr


def test_listen_json_lists_every_file_whatever_the_regions_are_named(tmp_path):
    """Regions named like the manifest or like a device's ``idstr/instance`` are
    each listed (they shared one key of "files" with the manifest or the device)."""
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(os.urandom(4 * PAGE))
    out = tmp_path / "out"
    sent, listened = send_to_a_json_listener(
        out, f"manifest={tmp_path / 'a'}", f"nic0/1={tmp_path / 'b'}",
        "--state", f"nic0:1={tmp_path / 'c'}", "--quiet")
    assert sent.returncode == 0 and listened.returncode == 0, sent.stderr + listened.stderr
    files = json.loads(listened.stdout)["files"]
    assert files["manifest"] == str(out / "manifest.json")
    assert sorted(files["regions"]) == ["manifest", "nic0/1"]
    assert list(files["devices"]) == ["nic0/1"]
    paths = [*files["regions"].values(), *files["devices"].values(), files["manifest"]]
    assert sorted(paths) == sorted(str(out / name) for name in os.listdir(out))
    assert (out / "nic0.1.state").read_bytes() == (tmp_path / "c").read_bytes()
    for name, source in (("manifest", "a"), ("nic0/1", "b")):
        assert Path(files["regions"][name]).read_bytes() == (tmp_path / source).read_bytes()


@pytest.mark.parametrize("text, expected", [
    ("tcp:127.0.0.1:4444", "tcp:127.0.0.1:4444"),
    ("tcp://127.0.0.1:4444", "tcp:127.0.0.1:4444"),
    ("tcp://[::1]:4444", "tcp:[::1]:4444"),
    ("tcp:[fe80::1%lo]:4444", "tcp:[fe80::1%lo]:4444"),
    ("tcp::4444", "tcp:0.0.0.0:4444"),              # QEMU's -incoming tcp::PORT
    ("unix:/run/x.sock", "unix:/run/x.sock"),
])
def test_address_forms(text, expected):
    assert str(parse_address(text)) == expected


@pytest.mark.parametrize("text", [
    "tcp:[::1:5",           # a bracket left open: was taken, then 'tcp:[[::1]:5' to connect to
    "tcp:::1]:5", "tcp:[[::1]]:5", "tcp:[]:5",
    "tcp:::5",              # ':' is no IPv6 address
])
def test_a_malformed_tcp_host_is_a_bad_address(text):
    with pytest.raises(fastmfd.ConfigError, match="^bad address"):
        parse_address(text)


@pytest.mark.parametrize("text, said", [
    ("tcp:127.0.0.1:65536", "port '65536' is not in 0..65535"),
    ("tcp://[::1]:99999", "port '99999' is not in 0..65535"),
    ("tcp:127.0.0.1:abc", "port 'abc' is not a number (0..65535)"),
    ("tcp:localhost:-1", "port '-1' is not a number (0..65535)"),
    # Digits to str.isdigit(): int() refused the first (a bare ValueError), and took
    # the Arabic-Indic second as port 123 (a reread).
    ("tcp:127.0.0.1:\u00b2", "port '\u00b2' is not a number (0..65535)"),
    ("tcp:127.0.0.1:\u0661\u0662\u0663", "port '\u0661\u0662\u0663' is not a number (0..65535)"),
])
def test_a_bad_port_is_named_as_the_problem(text, said):
    """It was "expected tcp:HOST:PORT ...", which the address already looked like."""
    with pytest.raises(fastmfd.ConfigError) as error:
        parse_address(text)
    assert str(error.value) == f"bad address {text!r}: {said}"


def test_source_and_destination_refuse_an_open_bracket_when_made():
    """Source took it (its migrate() failed with 'cannot connect to tcp:[[::1]:5: Name
    or service not known'), Destination raised a ListenError about a name lookup."""
    for make, text in ((fastmfd.Source, "tcp:[::1:5"), (fastmfd.Destination, "tcp:[::1:0")):
        with pytest.raises(fastmfd.ConfigError, match=r"^bad address 'tcp:\[::1:\d'") as error:
            make(text)
        assert not isinstance(error.value, fastmfd.ListenError)


def test_listen_on_qemu_form_with_a_free_port_accepts_a_migration(tmp_path):
    ram = fastmfd.Region.create("ram", 16 * PAGE)
    ram.array[:] = 3
    try:
        with fastmfd.Destination("tcp::0", workers=1) as dst:
            port = dst.address.split(":")[-1]
            box = {}
            thread = threading.Thread(target=lambda: box.update(r=dst.receive()))
            thread.start()
            with fastmfd.Source(f"tcp://127.0.0.1:{port}",
                                fastmfd.MigrationConfig(channels=1)) as src:
                src.add_region(ram)
                src.migrate(live=False)
            thread.join(60)
            assert (box["r"].regions["ram"].array == 3).all()
    finally:
        ram.close()


def test_listen_dir_on_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "afile").write_text("")
    done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "afile"))
    assert_one_line_usage_error(done, "afile")


def test_listen_on_a_port_in_use_keeps_its_errno(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        address = f"tcp:127.0.0.1:{taken.getsockname()[1]}"
        done = fastmfd_cli("listen", address, "--dir", str(tmp_path / "out"))
        assert_one_line_usage_error(done, "Address already in use")
        with pytest.raises(fastmfd.ListenError) as error:
            with fastmfd.Destination(address, workers=0):
                pass
    finally:
        taken.close()
    assert error.value.errno == errno.EADDRINUSE
    assert isinstance(error.value, OSError) and isinstance(error.value, fastmfd.ConfigError)


def test_a_refused_connection_keeps_its_errno():
    with socket.socket() as probe:           # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = fastmfd.MigrationConfig(channels=1, timeout=0.5)
    ram = fastmfd.Region.create("ram", PAGE)
    try:
        with fastmfd.Source(f"tcp:127.0.0.1:{port}", config) as src:
            src.add_region(ram)
            with pytest.raises(fastmfd.ConnectError) as error:
                src.migrate(live=False)
    finally:
        ram.close()
    assert error.value.errno == errno.ECONNREFUSED
    assert isinstance(error.value, ConnectionError)


@pytest.mark.parametrize("args, words", [
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--timeout", "0"],
     ["--timeout", "positive number of seconds"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--max-bandwidth", "fast"],
     ["--max-bandwidth", "is not a size"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--stall-timeout", "-1"], ["--stall-timeout"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--channels", "0"], ["--channels", ">= 1"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--downtime-limit", "0.3"],
     ["fastmfd send: unrecognized arguments: --downtime-limit", "fastmfd send --help"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--status-json", "-1"], ["--status-json"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--status-json", "nan"], ["--status-json"]),
    (["demo", "--size", "1000"], ["not a whole number of 4 KiB pages"]),
    (["listen", "tcp:127.0.0.1:0", "--max-sessions", "3", "--forever"],
     ["--forever: not allowed with argument --max-sessions"]),
    (["listen", "tcp:127.0.0.1:0", "--workers", "3"], ["--workers goes with --qemu"]),
    (["listen", "tcp:127.0.0.1:0", "--tls-cert", "/dev/null"],
     ["--tls-cert and --tls-key go together"]),
    (["bench", "--size", "64M", "--qemu-binary", "/nonexistent"],
     ["--qemu-binary goes with --peer qemu"]),
    (["demo", "--size", "64M", "--tls", "--tls-cert", "/dev/null", "--tls-key", "/dev/null"],
     ["--tls makes throwaway certificates"]),
    (["send", "unix:/tmp/" + "a" * 200, "/nonexistent"], ["holds at most 107 bytes"]),
    (["listen", "unix:/tmp/" + "a" * 200], ["holds at most 107 bytes"]),
    (["bench", "--compression", "lz4"], ["lz4: choose from", "fastmfd bench --help"]),
    (["demo", "--size", "0"], ["--size", "not a positive size"]),
    (["listen", "tcp:127.0.0.1:0", "--timeout", "0"], ["--timeout"]),
    (["listen", "tcp:127.0.0.1:0", "--max-memory", "0"], ["--max-memory"]),
    (["listen", "tcp:127.0.0.1:0", "--qemu", "--workers", "-3"], ["--workers"]),
    # Any number of workers started (300: 6.6 GiB), though a migration uses 288 at most.
    (["listen", "tcp:127.0.0.1:0", "--qemu", "--workers", "289"],
     ["--workers: '289' is not a whole number in 1..288"]),
    (["listen"], ["required: address"]),
    ([], ["required: COMMAND"]),
    (["--bogus"], ["fastmfd: unrecognized arguments: --bogus", "fastmfd --help"]),
    (["--bogus", "send", "tcp:127.0.0.1:1", "/nonexistent"],
     ["fastmfd: unrecognized arguments: --bogus"]),
    (["--auth-key-file=/nonexistent", "send", "tcp:127.0.0.1:1", "/nonexistent"],
     ["fastmfd: unrecognized arguments: --auth-key-file"]),     # was dropped, not refused
    (["bogus"], ["argument COMMAND: invalid choice: 'bogus'"]),
    # A level with no level to set was taken and ignored.
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--level", "5"],
     ["--level sets zlib's or zstd's level; --compression none takes none"]),
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--compression", "auto", "--level", "5"],
     ["--compression auto takes none"]),
    # The other side's TLS option: a sender's --tls-authz was taken and ignored.
    (["send", "tcp:127.0.0.1:1", "/nonexistent", "--tls-authz", "a.example"],
     ["unrecognized arguments: --tls-authz a.example"]),
    (["listen", "tcp:127.0.0.1:0", "--tls-hostname", "a.example"],
     ["unrecognized arguments: --tls-hostname a.example"]),
])
def test_a_mistake_argparse_finds_is_one_line_too(args, words):
    """Before any work (a listener would wait for its sender): exit 2, and one
    line saying what and where to read more, not argparse's usage block."""
    assert_one_line_usage_error(fastmfd_cli(*args), *words)


def test_a_command_line_is_parsed_once_whatever_the_order():
    """-v before and after the command add up, once each (a second parse of the
    command's part counted them again); a repeatable option keeps each value
    once; images may follow options."""
    parse = cli._build_parser().parse_command_line
    assert parse(["send", "-v", "tcp:h:1", "--state", "a=s", "img"]).verbose == 1
    assert parse(["-v", "send", "-vv", "tcp:h:1", "img", "--json"]).verbose == 3
    args = parse(["send", "tcp:h:1", "--state", "a=s", "img", "--state", "b=t", "img2"])
    assert (args.state, args.images, args.command) == (["a=s", "b=t"], ["img", "img2"], "send")
    assert args.func is cli.cmd_send


@pytest.mark.parametrize("args, flag", [
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--checksum"], "--checksum"),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--status-json"], "--status-json"),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--status-json", "0.1"],
     "--status-json"),
    # was "compression 'auto': expected none, zlib or zstd", --qemu unsaid
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--compression", "auto"],
     "--compression auto"),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--state", "a=/dev/null"],
     "--state"),        # was "no images": the --state file was not named
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--forever"], "--forever"),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--max-sessions", "2"], "--max-sessions"),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--prealloc"], "--prealloc"),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--tls-cert", "/dev/null", "--tls-key",
      "/dev/null"], "--tls-ca"),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--auth-key-file", "/dev/null"],
     "--auth-key-file"),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--auth-key-file", "/dev/null"],
     "--auth-key-file"),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--huge-pages"], "--huge-pages"),
])
def test_what_a_qemu_peer_cannot_take_is_refused_not_ignored(args, flag):
    assert_one_line_usage_error(fastmfd_cli(*args), "--qemu", flag)


@pytest.mark.parametrize("args, words", [
    # listen --qemu took it, listened, and died with OverflowError from poll() once QEMU
    # connected; 0.001 failed every migration.
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--dir", "OUT", "--stall-timeout", "1e9"],
     ["0.1..86400"]),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--dir", "OUT", "--stall-timeout", "0.001"],
     ["0.1..86400"]),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--stall-timeout", "1e9"],
     ["0.1..86400"]),
    # "listening on ...", then exit 1: "OverflowError: timestamp out of range for platform
    # time_t", a value mistake reported as a failed migration.
    (["listen", "tcp:127.0.0.1:0", "--dir", "OUT", "--timeout", "1e20"], ["at most 604800"]),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--dir", "OUT", "--timeout", "1e20"],
     ["at most 604800"]),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--timeout", "1e20"], ["at most 604800"]),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--timeout", "1e20"],
     ["at most 604800"]),
    # The status thread died of the same OverflowError, the send going on without a line
    # (a reread); "²" is a digit to str.isdigit(), not to int(): a traceback, exit 1.
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--status-json", "1e20"],
     ["--status-json", "more than 604800 seconds"]),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--channels", "\u00b2"],
     ["--channels", "not a whole number"]),
    (["listen", "tcp:127.0.0.1:\u00b2", "--dir", "OUT"], ["port '\u00b2' is not a number"]),
])
def test_a_timeout_out_of_bounds_is_a_usage_error_before_any_work(tmp_path, args, words):
    """One line, exit 2, before listening (a listener says where it listens first)."""
    out = str(tmp_path / "out")
    done = fastmfd_cli(*[out if arg == "OUT" else arg for arg in args], cwd=tmp_path)
    assert_one_line_usage_error(done, *words)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("args, said", [
    # Each was said in the library's words: "Destination(stall_timeout) must be seconds in
    # 0.1..86400 or None", "compression_level must be in 1..20 for zstd", "max_bandwidth
    # 1.0 gives each ..." (1.5 typed), "TLSConfig.ca: cannot read ...".
    (["listen", "tcp:127.0.0.1:0", "--dir", "OUT", "--stall-timeout", "0.001"],
     "--stall-timeout 0.001: must be seconds in 0.1..86400"),
    (["listen", "--qemu", "tcp:127.0.0.1:0", "--dir", "OUT", "--stall-timeout=1e9"],
     "--stall-timeout 1e9: must be seconds in 0.1..86400"),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--compression", "zstd", "--level", "30"],
     "--level 30: must be in 1..20 for zstd"),
    (["send", "--qemu", "tcp:127.0.0.1:1", "--dir", ".", "--compression", "zlib", "--level",
      "10"], "--level 10: must be in 0..9 for zlib"),
    (["bench", "--compression", "zstd", "--level", "42"], "--level 42: must be in 1..20 for zstd"),
    # The channels and stall timeout it is about, not typed, are said to be defaults.
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--max-bandwidth", "10K"],
     "--max-bandwidth 10K: gives each of the 2 channels 5120 bytes/s, less than one packet "
     "(1048576 bytes) per stall timeout (30 s): give a higher rate, or a longer stall timeout "
     "(--channels 2 and --stall-timeout 30: the defaults)"),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--max-bandwidth", "10K", "--channels", "2"],
     "--max-bandwidth 10K: gives each of the 2 channels 5120 bytes/s, less than one packet "
     "(1048576 bytes) per stall timeout (30 s): give a higher rate, or a longer stall timeout "
     "(--stall-timeout 30: the default)"),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--max-bandwidth", "10K", "--channels", "2",
      "--stall-timeout", "30"],
     "--max-bandwidth 10K: gives each of the 2 channels 5120 bytes/s, less than one packet "
     "(1048576 bytes) per stall timeout (30 s): give a higher rate, or a longer stall timeout"),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--timeout", "1e20"],
     "--timeout 1e20: must be seconds > 0, at most 604800 (a week)"),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--channels", "300"], "--channels 300: must be "
     "1..255"),
    (["send", "tcp:127.0.0.1:1", "/dev/zero", "--tls-ca", "OUT"],
     "--tls-ca OUT: cannot read the file: No such file or directory"),
])
def test_a_value_the_library_refuses_is_said_of_the_option_as_typed(tmp_path, args, said):
    out = str(tmp_path / "out")
    done = fastmfd_cli(*[out if arg == "OUT" else arg for arg in args], cwd=tmp_path)
    assert_one_line_usage_error(done)
    assert done.stderr == f"fastmfd {args[0]}: {said.replace('OUT', out)}\n"


@pytest.mark.parametrize("argv, said", [
    (["send", "unix:/nonexistent", "/dev/zero"],
     "--channels 2 (the default; give --channels to change it): must be 1..1"),
    (["send", "unix:/nonexistent", "/dev/zero", "--channels", "2"], "--channels 2: must be 1..1"),
    (["send", "unix:/nonexistent", "/dev/zero", "--channels=2"],
     "--channels 2: must be 1..1"),
    (["send", "unix:/nonexistent", "/dev/zero"],
     "--timeout 30 (the default; give --timeout to change it): must be at most 1"),
])
def test_a_refused_default_is_said_to_be_the_default(monkeypatch, capsys, argv, said):
    """A library refusal of a value the user did not type (the option's default) was
    said as if typed ("--channels 2: ..."): it says it is the default, and which
    option changes it. No default the commands have today is refused, so the library
    call that would refuse it is made to here, as QemuSender refuses a channel count."""
    parameter = said.split()[0].lstrip("-")
    problem = said.partition(": ")[2]

    def refuse(args):
        raise fastmfd.ConfigError(f"{parameter} {getattr(args, parameter):g}: {problem}",
                                  parameter=parameter, problem=problem)
    monkeypatch.setattr(cli, "_config", refuse)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"fastmfd send: {said}\n"


def test_a_config_error_carries_its_parameter_and_problem():
    """What a command says of its option (ConfigError.parameter and .problem), None
    aside: no option gives None."""
    with pytest.raises(fastmfd.ConfigError) as error:
        fastmfd.Destination("tcp:127.0.0.1:0", stall_timeout=0.001)
    assert str(error.value) == ("Destination(stall_timeout) must be seconds in 0.1..86400 or "
                                "None, not 0.001")
    assert (error.value.parameter, error.value.problem) == ("stall_timeout",
                                                            "must be seconds in 0.1..86400")
    with pytest.raises(fastmfd.ConfigError) as error:
        fastmfd.MigrationConfig(channels=2, max_bandwidth=1 << 20, stall_timeout=1)
    assert error.value.parameter == "max_bandwidth"
    assert str(error.value) == f"max_bandwidth 1048576.0 {error.value.problem}"


def test_an_image_that_is_not_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "adir").mkdir()
    done = fastmfd_cli("send", "tcp:127.0.0.1:1", str(tmp_path / "adir"))
    assert_one_line_usage_error(done, f"{tmp_path / 'adir'} is a directory")
    done = fastmfd_cli("send", "tcp:127.0.0.1:1", "/dev/null")
    assert_one_line_usage_error(done, "/dev/null is not a regular file")


@pytest.mark.parametrize("options, words", [
    (["--tls-ca", "/dev/null"], ["needs its own certificate: give --tls-cert and --tls-key"]),
    (["--tls-cert", "/dev/null", "--tls-key", "/dev/null", "--tls-authz", "a.example"],
     ["--tls-authz needs --tls-ca"]),
])
def test_a_listener_tls_mistake_names_its_options(tmp_path, options, words):
    """It named the library's fields instead: "TLSConfig(cert=..., key=...)",
    "TLSConfig.authz needs ca"."""
    done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "out"), *options)
    assert_one_line_usage_error(done, *words)
    assert "TLSConfig" not in done.stderr


def test_a_silent_peer_is_asked_whether_it_is_a_fastmfd_listener(tmp_path):
    """A QEMU's -incoming (send without --qemu) reads nothing before its multifd
    channels come: the send timed out "waiting for SETUP_ACK", saying no more."""
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(PAGE))
    with socket.socket() as listening:          # accepts, never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        done = fastmfd_cli("send", f"tcp:127.0.0.1:{listening.getsockname()[1]}",
                           str(image), "--timeout", "1")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert ("timed out waiting for SETUP_ACK within 1 s (is a fastmfd listener there? a QEMU "
            "destination takes `fastmfd send --qemu`)") in done.stderr


@pytest.mark.parametrize("service, reads_first, answer, words", [
    ("http", True, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
     "the peer is no fastmfd listener: it answered b'HTTP'..., which is no fastmfd message "
     "(a QEMU destination takes `fastmfd send --qemu`)"),
    ("ssh", False, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
     "the peer is no fastmfd listener: it answered b'SSH-'..., which is no fastmfd message"),
    ("closes", True, None,      # (reading SETUP_ACK or still sending SETUP)
     ", before any answer (is a fastmfd listener there? a QEMU destination takes "
     "`fastmfd send --qemu`)"),
])
def test_another_service_is_named_as_no_fastmfd_listener(tmp_path, service, reads_first,
                                                        answer, words):
    """An HTTP or SSH server's answer was read as a message type ("main channel field
    'type': received 1213486160, expected one of [1, ..., 15]", no address); a peer
    that read the greeting and closed (a QEMU's -incoming does) was only a reset."""
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(PAGE))
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]

        def serve() -> None:
            peer, _ = listening.accept()
            with peer:
                if reads_first:
                    peer.recv(65536)
                if answer is not None:
                    peer.sendall(answer)
                    peer.recv(65536)        # until the source closes
                else:                       # an RST: unread bytes left at the close
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))

        server = threading.Thread(target=serve)
        server.start()
        done = fastmfd_cli("send", f"tcp:127.0.0.1:{port}", str(image), "--timeout", "5")
        server.join(10)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"main channel to tcp:127.0.0.1:{port}: " in done.stderr, done.stderr
    assert words in done.stderr and "field 'type'" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """trustme's CA and certificates, written as the commands take them: a good
    pair, another CA's key, an expired certificate, one not yet valid, an encrypted key."""
    import datetime
    trustme = pytest.importorskip("trustme")
    from cryptography.hazmat.primitives import serialization
    directory = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    files = {}

    def put(name, data):
        files[name] = directory / name
        files[name].write_bytes(data)
        files[name].chmod(0o600)

    for name, cert in (("good", ca.issue_cert("localhost")),
                       ("old", ca.issue_cert("localhost", not_before=now - 30 * day,
                                             not_after=now - day)),
                       ("new", ca.issue_cert("localhost", not_before=now + day,
                                             not_after=now + 30 * day))):
        put(f"{name}.pem", b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        put(f"{name}-key.pem", cert.private_key_pem.bytes())
    put("ca.pem", ca.cert_pem.bytes())
    put("other-key.pem", other.issue_cert("localhost").private_key_pem.bytes())
    key = serialization.load_pem_private_key(files["good-key.pem"].read_bytes(), None)
    put("locked-key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    put("image", bytes(4096))
    put("old-ca.pem", _expired_ca(now - 30 * day, now - day))
    return {name: str(path) for name, path in files.items()}


def _expired_ca(not_before, not_after) -> bytes:
    """A self-signed CA certificate valid from ``not_before`` to ``not_after`` (PEM):
    trustme's CAs have no dates to choose."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


NO_CERTIFICATE = "no certificate in the file (PEM: -----BEGIN CERTIFICATE-----)"


@pytest.mark.parametrize("options, said", [
    # Each was said in OpenSSL's words ("TLS configuration: cannot load the certificate ...
    # [SSL] PEM lib (_ssl.c:3905)", "[X509: KEY_VALUES_MISMATCH] key values mismatch", "[X509:
    # NO_CERTIFICATE_OR_CRL_FOUND] ..."), or, expired, was sent to the peer, which refused it.
    ({"cert": "good-key.pem", "key": "good-key.pem"}, ("cert", "good-key.pem", NO_CERTIFICATE)),
    ({"cert": "good.pem", "key": "good.pem"},
     ("key", "good.pem", "no private key in the file (PEM: -----BEGIN ... PRIVATE KEY-----)")),
    ({"cert": "good.pem", "key": "other-key.pem"},
     ("key", "other-key.pem", "not the private key of the certificate given with it")),
    ({"cert": "good.pem", "key": "locked-key.pem"},
     ("key", "locked-key.pem", "the private key is encrypted: give one without a passphrase")),
    ({"cert": "old.pem", "key": "old-key.pem"},
     ("cert", "old.pem", "the certificate expired on ")),
    ({"cert": "new.pem", "key": "new-key.pem"},
     ("cert", "new.pem", "the certificate is not valid until ")),
    ({"ca": "good-key.pem"}, ("ca", "good-key.pem", NO_CERTIFICATE)),
    ({"ca": "old-ca.pem"}, ("ca", "old-ca.pem", "the CA certificate expired on ")),
])
@pytest.mark.parametrize("command", ["send", "listen"])
def test_a_tls_file_that_cannot_serve_is_said_of_its_option(tmp_path, tls_files, command,
                                                            options, said):
    """What is wrong with which --tls-* file, in the command's words, exit 2, before
    any connection (a sender's listener is never connected to; a listener never
    listens)."""
    options = {"ca": "ca.pem", **options}
    if command == "listen" and "cert" not in options:
        options.update(cert="good.pem", key="good-key.pem")
    argv = [arg for name, file in options.items() for arg in (f"--tls-{name}", tls_files[file])]
    option, file, problem = said
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        if command == "send":
            done = fastmfd_cli("send", f"tcp:127.0.0.1:{listening.getsockname()[1]}",
                               tls_files["image"], *argv)
        else:
            done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "out"),
                               *argv)
        listening.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listening.accept()
    assert_one_line_usage_error(done)
    assert done.stderr.startswith(f"fastmfd {command}: --tls-{option} {tls_files[file]}: "
                                  f"{problem}"), done.stderr
    assert not (tmp_path / "out").exists()


def _self_signed(*, ca: bool):
    """A new EC key and its self-signed certificate ("pinned"), valid from a day ago for
    30 days; a CA's (basic constraints) if ``ca``."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pinned")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30)))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    return key, builder.sign(key, hashes.SHA256())


def test_a_ca_file_with_a_pinned_certificate_beside_an_expired_ca_is_taken(tmp_path,
                                                                          tls_files):
    """A --tls-ca file of an expired CA and a valid self-signed certificate that is no
    CA's (a pinned destination): OpenSSL trusts the pinned one, and the session runs.
    check_dates counted the CA certificates only (get_ca_certs leaves the other out),
    found them all expired, and send refused the file: "--tls-ca ...: the CA
    certificate expired on ..."."""
    from cryptography.hazmat.primitives import serialization
    key, pinned = _self_signed(ca=False)
    pem = pinned.public_bytes(serialization.Encoding.PEM)
    files = {"pinned.pem": pem,
             "pinned-key.pem": key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()),
             "cas.pem": Path(tls_files["old-ca.pem"]).read_bytes() + pem,
             "ram.img": os.urandom(16 * PAGE)}
    for name_, data in files.items():
        (tmp_path / name_).write_bytes(data)
        (tmp_path / name_).chmod(0o600)
    sent, listened = send_to_a_json_listener(
        tmp_path / "out", str(tmp_path / "ram.img"), "--tls-ca", str(tmp_path / "cas.pem"),
        listen_extra=("--tls-cert", str(tmp_path / "pinned.pem"),
                      "--tls-key", str(tmp_path / "pinned-key.pem")))
    assert sent.returncode == 0, sent.stderr
    assert listened.returncode == 0, listened.stderr
    assert (tmp_path / "out" / "ram.img").read_bytes() == files["ram.img"]


def _with_dates(pem: bytes, not_before: bytes, not_after: bytes) -> bytes:
    """The certificate ``pem`` with its validity (DER) made GeneralizedTimes
    ``not_before`` and ``not_after``, as given (the signature no longer matches: a
    self-signed certificate trusted as it is, pinned, is not checked against it)."""
    import base64
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def tlv(tag: int, body: bytes) -> bytes:
        size = len(body)
        if size < 128:
            return bytes([tag, size]) + body
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        return bytes([tag, 0x80 | len(raw)]) + raw + body

    def items(body: bytes) -> list[tuple[int, bytes]]:
        out, at = [], 0
        while at < len(body):
            tag, size, at = body[at], body[at + 1], at + 2
            if size & 0x80:
                count = size & 0x7F
                size, at = int.from_bytes(body[at:at + count], "big"), at + count
            out.append((tag, body[at:at + size]))
            at += size
        return out

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    outer = items(items(der)[0][1])
    tbs = items(outer[0][1])
    tbs[4 if tbs[0][0] == 0xA0 else 3] = (0x30, tlv(0x18, not_before) + tlv(0x18, not_after))
    der = tlv(0x30, tlv(0x30, b"".join(tlv(*i) for i in tbs))
              + b"".join(tlv(*i) for i in outer[1:]))
    return (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der)
            + b"-----END CERTIFICATE-----\n")


def test_a_certificate_whose_dates_cannot_be_read_is_said_of_its_option(tmp_path):
    """A certificate whose dates have fractional seconds (a GeneralizedTime OpenSSL
    loads, prints 'Jan  1 00:00:00.5 2027 GMT', and refuses at verification: 'format
    error in certificate's notBefore field'): check_dates raised ValueError ('does not
    match format'), a traceback out of send and listen."""
    import datetime
    from cryptography.hazmat.primitives import serialization
    key, certificate = _self_signed(ca=True)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    year = datetime.datetime.now(datetime.timezone.utc).year
    files = {"odd.pem": _with_dates(pem, b"%d0101000000.5Z" % (year - 1),
                                    b"%d0101000000.25Z" % (year + 2)),
             "odd-key.pem": key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
             "ram.img": bytes(PAGE)}
    for name_, data in files.items():
        (tmp_path / name_).write_bytes(data)
        (tmp_path / name_).chmod(0o600)
    assert b"0101000000.5Z" in ssl.PEM_cert_to_DER_cert(files["odd.pem"].decode())
    dates = f"(from 'Jan  1 00:00:00.5 {year - 1} GMT' to 'Jan  1 00:00:00.25 {year + 2} GMT')"
    odd = tmp_path / "odd.pem"
    listened = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "out"),
                           "--tls-cert", str(odd), "--tls-key", str(tmp_path / "odd-key.pem"))
    assert_one_line_usage_error(listened)
    assert listened.stderr == (f"fastmfd listen: --tls-cert {odd}: the certificate has a "
                               f"date that cannot be read {dates}\n")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        sent = fastmfd_cli("send", f"tcp:127.0.0.1:{listening.getsockname()[1]}",
                           str(tmp_path / "ram.img"), "--tls-ca", str(odd))
        listening.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listening.accept()
    assert_one_line_usage_error(sent)
    assert sent.stderr == (f"fastmfd send: --tls-ca {odd}: the CA certificate has a date "
                           f"that cannot be read {dates}\n")
    assert not (tmp_path / "out").exists()


def test_a_certificate_openssl_refuses_is_said_of_it_not_of_the_key(tmp_path):
    """A certificate whose RSA key is 1024 bits, refused at OpenSSL's security level 2
    (Debian's default; set here by OPENSSL_CONF): it was said as "--tls-key KEY: no
    private key in the file", of the right key."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    files = {"cert.pem": cert.public_bytes(serialization.Encoding.PEM),
             "key.pem": key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()),
             "openssl.cnf": b"openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\n"
                            b"system_default = tls\n[tls]\nCipherString = DEFAULT@SECLEVEL=2\n"}
    for name_, data in files.items():
        (tmp_path / name_).write_bytes(data)
        (tmp_path / name_).chmod(0o600)
    done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "out"),
                       "--tls-cert", str(tmp_path / "cert.pem"),
                       "--tls-key", str(tmp_path / "key.pem"),
                       env={**os.environ, "OPENSSL_CONF": str(tmp_path / "openssl.cnf")})
    assert_one_line_usage_error(done)
    assert done.stderr.startswith(f"fastmfd listen: --tls-cert {tmp_path / 'cert.pem'}: "
                                  "OpenSSL refuses the certificate: "), done.stderr
    assert "ee key too small" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_certificate_that_does_not_load_is_refused_before_any_connection(tmp_path):
    """Found at the first connection, it was a failed session on both sides (a
    listener waited for its sender first)."""
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "garbage.pem").chmod(0o600)     # as a key file must be: it is one here
    pem = str(tmp_path / "garbage.pem")
    expected = (f"--tls-cert {pem}: no certificate in the file (PEM: -----BEGIN "
                "CERTIFICATE-----)\n")
    done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "out"),
                       "--tls-cert", pem, "--tls-key", pem, "--timeout", "30")
    assert_one_line_usage_error(done, expected)
    assert not (tmp_path / "out").exists()
    with socket.socket() as listening:          # a sender never connects
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        done = fastmfd_cli("send", f"tcp:127.0.0.1:{listening.getsockname()[1]}", pem,
                           "--tls-cert", pem, "--tls-key", pem)
        assert_one_line_usage_error(done, expected)
        listening.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listening.accept()


@pytest.mark.parametrize("command", [["demo", "--size", "64M"], ["bench", "--size", "64M"],
                                     ["listen", "tcp:127.0.0.1:0"]])
def test_a_short_shared_key_is_refused_before_any_work(tmp_path, command):
    """demo printed its header, bench made its image, before the key was refused."""
    (tmp_path / "key").write_bytes(b"short\n")
    (tmp_path / "key").chmod(0o600)
    done = fastmfd_cli(*command, "--auth-key-file", str(tmp_path / "key"))
    assert_one_line_usage_error(done, f"--auth-key-file {tmp_path / 'key'}: the key has 5 "
                                      f"bytes, at least 16 are needed")


@pytest.mark.parametrize("kind", ["open to others", "fifo", "too long"])
def test_a_key_file_that_is_no_private_key_is_refused_before_any_work(tmp_path, kind):
    """A key file others could read was taken (a key others read proves nothing), a
    FIFO made the command wait for a writer, and a file past 64 KiB was cut short
    silently (from the security review)."""
    key = tmp_path / "key"
    if kind == "fifo":
        os.mkfifo(key, 0o600)
        expected = f"the key file {key} is not a regular file"
    elif kind == "too long":
        key.write_bytes(b"k" * (64 * 1024 + 1))
        key.chmod(0o600)
        expected = f"the key file {key} is longer than 65536 bytes: not a key"
    else:
        key.write_bytes(b"0123456789abcdef\n")
        key.chmod(0o640)
        expected = f"the key file {key} is open to others (mode 0640): make it private " \
                   f"(chmod 600 {key})"
    done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--auth-key-file", str(key))
    assert_one_line_usage_error(done, expected)


def test_a_listener_that_failed_leaves_no_directory_it_made(tmp_path):
    """Nobody came within --timeout: the directories --dir made are gone again, a
    directory that was there before stays."""
    done = fastmfd_cli("listen", "tcp:127.0.0.1:0", "--dir", str(tmp_path / "new" / "out"),
                       "--timeout", "0.2")
    assert done.returncode == 1 and "passed its greeting within 0.2 s" in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


def test_inspect_a_capture_directory(tmp_path):
    for name, data in two_rounds("zlib").files(ROUND_ENDS).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "meta.json").write_text("{}")      # notes beside the captures are skipped
    by_dir = fastmfd_cli("inspect", str(tmp_path), "--json")
    by_files = fastmfd_cli("inspect", *sorted(str(p) for p in tmp_path.glob("*.bin")),
                           "--json")
    assert by_dir.returncode == 0, by_dir.stderr
    assert json.loads(by_dir.stdout) == json.loads(by_files.stdout)


def test_inspect_prints_a_directory_with_its_brackets(tmp_path):
    """rich's markup took '[t]' for a style tag: 'files in .../capd'."""
    captures = tmp_path / "cap[t]"
    captures.mkdir()
    for name, data in two_rounds().files(ROUND_ENDS).items():
        (captures / name).write_bytes(data)
    done = fastmfd_cli("inspect", str(captures))
    assert done.returncode == 0, done.stderr
    assert f"files in {captures}\n" in done.stdout, done.stdout


def test_inspect_a_directory_without_captures_is_a_usage_error(tmp_path):
    assert_one_line_usage_error(fastmfd_cli("inspect", str(tmp_path)), "no *.bin capture files")


def test_wrong_types_are_type_errors_naming_the_parameter():
    src = fastmfd.Source("tcp:127.0.0.1:1")
    with pytest.raises(TypeError, match=r"add_device\(device\) must be a fastmfd.Device.*int"):
        src.add_device(42)
    with pytest.raises(TypeError, match=r"add_region\(region\) must be a fastmfd.Region"):
        src.add_region(b"pages")
    dst = fastmfd.Destination("tcp:127.0.0.1:0", workers=0)
    with pytest.raises(TypeError, match=r"add_loader\(loader\) for 'nic0' must be"):
        dst.add_loader("nic0", 0, object())


@pytest.mark.parametrize("checks, refused", [
    (["--tls-hostname", "localhost", "--tls-authz", "localhost"], None),
    (["--tls-authz", "other.example"], "is not in authz"),
    (["--tls-hostname", "other.example"], "Hostname mismatch"),
])
def test_demo_with_tls_files_gives_each_end_its_own_check(tmp_path, checks, refused):
    """demo runs both ends with one set of --tls-* files: the source checks
    --tls-hostname, the destination --tls-authz (a TLSConfig with the other side's
    check is refused, as that check would be ignored)."""
    import trustme
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "key.pem").chmod(0o600)
    (tmp_path / "chain.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    done = fastmfd_cli("demo", "--size", "16M", "--device-size", "1M",
                       "--tls-cert", str(tmp_path / "chain.pem"),
                       "--tls-key", str(tmp_path / "key.pem"),
                       "--tls-ca", str(tmp_path / "ca.pem"), *checks, cwd=tmp_path)
    if refused is None:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 1 and refused in done.stderr, done.stderr


@pytest.mark.parametrize("json_out", [False, True])
def test_output_read_by_no_one_ends_the_command_quietly(qemu72_captures, json_out):
    """`fastmfd inspect ... | head`: whoever reads the output stops. The JSON went
    out through print(), whose broken pipe was "fastmfd inspect: [Errno 32] Broken
    pipe" (a review); the table through rich, which ends quietly with status 1."""
    args = ["inspect", str(qemu72_captures / "pattern-none"), *(["--json"] if json_out else [])]
    proc = subprocess.Popen([sys.executable, "-m", "fastmfd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                     # before it writes a byte
    said = proc.stderr.read()
    proc.stderr.close()
    assert (proc.wait(TIMEOUT), said) == (1, "")


@pytest.mark.parametrize("closed", [(1,), (0, 1, 2)])
def test_a_listener_started_without_stdout_commits_and_exits_0(tmp_path, closed):
    """Started with fd 1 closed (``>&-``, a wrapper), Python's sys.stdout is None:
    ``listen --json`` received and committed the session, then printed a traceback
    (AttributeError) and exited 1. Closed standard descriptors get /dev/null."""
    image, out = tmp_path / "ram.img", tmp_path / "out"
    image.write_bytes(os.urandom(16 * PAGE))

    def close() -> None:
        for fd in closed:
            os.close(fd)

    with Listener(out, "--json", preexec_fn=close) as listener:
        sent = fastmfd_cli("send", listener.address, str(image), "--quiet")
        status, err = listener.finish()
    assert sent.returncode == 0, sent.stderr
    assert (status, listener.out) == (0, ""), err
    assert "Traceback" not in err
    assert (out / "ram.img").read_bytes() == image.read_bytes()
