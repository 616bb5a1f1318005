"""``fastmfd send`` / ``fastmfd listen`` and ``fastmfd demo``, run as commands."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from fastmfd.tools.cli import main
from fastmfd.tools.transfer import ImageSpec, StateSpec, listen_once
from fastmfd.units import parse_size

PAGE = 4096


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmfd", *args], capture_output=True,
                          text=True, timeout=timeout)


def sent_to_listen_once(tmp_path, out, *send_args: str) -> tuple[subprocess.CompletedProcess,
                                                                 dict]:
    """``fastmfd send unix:TMP/sock *send_args`` into listen_once(``out``) in a
    thread: the send's outcome, and the listener's result and files."""
    listening = threading.Event()
    box = {}

    def listen():
        box["result"], box["files"] = listen_once(
            f"unix:{tmp_path}/sock", str(out), timeout=30,
            on_listening=lambda address: listening.set())

    thread = threading.Thread(target=listen)
    thread.start()
    assert listening.wait(30)
    done = run_cli("send", f"unix:{tmp_path}/sock", *send_args)
    thread.join(60)
    return done, box


@pytest.mark.parametrize("text, size", [("4096", 4096), ("64K", 64 << 10), ("256M", 256 << 20),
                                        ("1G", 1 << 30), ("1.5GiB", 3 << 29)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, said", [
    ("9" * 400 + "G", "a number of more than 40 characters is no size"),
    ("1\u212a", "is not a size"), ("\u0661\u0660M", "is not a size")])
def test_a_size_too_long_or_in_other_letters_is_a_usage_error(text, said):
    """float() made 400 nines infinity: int() raised OverflowError, which argparse lets
    through (a traceback out of `bench --size`); Unicode rules took a Kelvin sign for K
    and Arabic-Indic digits for digits."""
    import argparse

    from listen_support import run_cli as run_this_trees_cli
    with pytest.raises(argparse.ArgumentTypeError, match=said):
        parse_size(text)
    done = run_this_trees_cli("bench", "--size", text, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("fastmfd bench: argument --size: "), done.stderr


def test_specs_parse():
    assert ImageSpec.parse("dir/pc.ram.img") == ImageSpec("pc.ram", "dir/pc.ram.img")
    assert ImageSpec.parse("vga=x.bin") == ImageSpec("vga", "x.bin")
    assert StateSpec.parse("nic0=s.bin") == StateSpec("nic0", 0, "s.bin")
    assert StateSpec.parse("0000:00:01.0/vfio:3=s.bin") == \
        StateSpec("0000:00:01.0/vfio", 3, "s.bin")


@pytest.mark.parametrize("compression, images_last", [("zlib", False), ("auto", False),
                                                     ("zlib", True)])
def test_send_to_listen_moves_images_and_state(tmp_path, compression, images_last):
    """``images_last``: the images among and after the options (argparse alone
    took positionals in one run, and refused the rest as unrecognized)."""
    images = {"ram.img": os.urandom(64 * PAGE) + bytes(64 * PAGE), "rom.bin": os.urandom(PAGE)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "nic.state").write_bytes(b"registers" * 1000)
    out = tmp_path / "out"
    images_args = [str(tmp_path / "ram.img"), f"pc.rom={tmp_path / 'rom.bin'}"]
    state_args = ["--state", f"nic0:1={tmp_path / 'nic.state'}"]
    if images_last:
        args = [*state_args, images_args[0], "--compression", compression, images_args[1]]
    else:
        args = [*images_args, *state_args, "--compression", compression]
    done, box = sent_to_listen_once(tmp_path, out, *args, "--quiet")
    assert done.returncode == 0, done.stderr
    assert (out / "ram.img").read_bytes() == images["ram.img"]
    assert (out / "pc.rom.img").read_bytes() == images["rom.bin"]
    assert (out / "nic0.1.state").read_bytes() == b"registers" * 1000
    assert sorted(os.listdir(out)) == ["manifest.json", "nic0.1.state", "pc.rom.img", "ram.img"]
    assert box["files"].devices == {("nic0", 1): str(out / "nic0.1.state")}
    assert box["result"].stats.zero_pages == 64


def test_send_refuses_an_image_that_is_not_whole_pages(tmp_path):
    (tmp_path / "odd.img").write_bytes(b"x" * 5000)
    done = run_cli("send", f"unix:{tmp_path}/nobody", str(tmp_path / "odd.img"))
    assert done.returncode == 2
    assert "multiple of the page size" in done.stderr


def test_send_without_a_listener_fails_clearly(tmp_path):
    (tmp_path / "a.img").write_bytes(bytes(PAGE))
    # (--timeout 1: a refused connection is retried that long, 3 s by default)
    done = run_cli("send", f"unix:{tmp_path}/nobody", str(tmp_path / "a.img"), "--quiet",
                   "--timeout", "1")
    assert done.returncode == 1
    assert "cannot connect" in done.stderr


def test_bad_address_is_a_usage_error(capsys):
    assert main(["send", "carrier-pigeon:home", "/dev/null"]) == 2
    assert "bad address" in capsys.readouterr().err


def test_demo_runs_and_verifies():
    done = run_cli("demo", "--size", "16M", "--device-size", "2M", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical" in done.stdout
    assert "old way" in done.stdout and "% less" in done.stdout


def test_send_status_json_streams_the_status(tmp_path):
    """``--status-json``: one JSON object per line on stdout, ending with the
    completed status, whose totals are the migration's."""
    import json
    (tmp_path / "ram.img").write_bytes(os.urandom(256 * PAGE))
    (tmp_path / "nic.state").write_bytes(b"registers" * 1000)
    done, box = sent_to_listen_once(tmp_path, tmp_path / "out", str(tmp_path / "ram.img"),
                                    "--state", f"nic0={tmp_path / 'nic.state'}",
                                    "--status-json", "0.05")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines, "no status line"
    last = lines[-1]
    assert last["status"] == "completed"
    assert last["ram"]["normal"] == 256 and last["ram"]["total"] == 256 * PAGE
    assert last["device"]["transferred"] == box["result"].stats.device_bytes
    assert last["transferred"] >= box["result"].stats.wire_bytes
    assert all(line["status"] in ("none", "setup", "active", "device", "completed")
               for line in lines)
    assert all(line["record"] == "status" for line in lines)


def test_send_status_json_with_json_says_each_lines_kind(tmp_path):
    """``--status-json --json``: the status lines, then the statistics, on one stdout,
    were told apart by which fields each happens to have (both have "channels" and
    "rounds"). Each line says its kind, first, in "record"; ``--json`` alone prints
    the statistics as it always did, without it."""
    import json
    (tmp_path / "ram.img").write_bytes(os.urandom(64 * PAGE))
    done, box = sent_to_listen_once(tmp_path, tmp_path / "out", str(tmp_path / "ram.img"),
                                    "--status-json", "0.05", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [next(iter(line.items())) for line in lines] == (
        [("record", "status")] * (len(lines) - 1) + [("record", "result")])
    assert lines[-2]["status"] == "completed"
    assert lines[-1]["normal_pages"] == 64 and lines[-1]["ram_bytes"] == 64 * PAGE
    done, box = sent_to_listen_once(tmp_path, tmp_path / "again", str(tmp_path / "ram.img"),
                                    "--json")
    assert done.returncode == 0, done.stderr
    alone = json.loads(done.stdout)
    assert "record" not in alone and alone["normal_pages"] == 64


def test_a_save_taken_away_once_committed_is_still_reported(tmp_path, capsys):
    """A consumer may take a save away as soon as its manifest.json is there (the
    README's sign of a complete save): the report looked each file's size up
    after the session, and the FileNotFoundError ended a --forever listener (a
    review). The sizes are the ones committed."""
    import json
    from fastmfd.tools import cli
    from rich.console import Console
    (tmp_path / "ram.img").write_bytes(os.urandom(16 * PAGE))
    done, box = sent_to_listen_once(tmp_path, tmp_path / "out", str(tmp_path / "ram.img"),
                                    "--quiet")
    assert done.returncode == 0, done.stderr
    (tmp_path / "out").rename(tmp_path / "taken")
    cli._report_session(Console(stderr=True), box["result"], box["files"], as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["sizes"] == {str(tmp_path / "out" / "ram.img"): 16 * PAGE,
                                str(tmp_path / "out" / "manifest.json"):
                                    (tmp_path / "taken" / "manifest.json").stat().st_size}


def test_listen_no_source_reached_says_the_connections_it_refused(tmp_path):
    """A listener whose sender has another key waits on until its --timeout, and then
    names the connection it refused meanwhile: it said only "no connection for the main
    channel passed its greeting within 5 s", the wrong key in a warning long gone by."""
    import re

    from listen_support import Listener
    for name, key in (("key", b"k" * 32), ("other", b"o" * 32)):
        (tmp_path / name).write_bytes(key)
        (tmp_path / name).chmod(0o600)
    (tmp_path / "ram.img").write_bytes(os.urandom(16 * PAGE))
    with Listener(tmp_path / "out", "--timeout", "5", "--auth-key-file",
                  str(tmp_path / "key")) as listener:
        sent = run_cli("send", listener.address, str(tmp_path / "ram.img"), "--quiet",
                       "--auth-key-file", str(tmp_path / "other"))
        assert sent.returncode == 1 and "auth_key proof does not match" in sent.stderr, sent
        status, err = listener.finish()
    assert status == 1, err
    assert re.search(r"^fastmfd listen: no connection for the main channel passed its greeting "
                     r"within 5 s; refused 1 connection meanwhile \(a local process: "
                     r".*wrong auth_key proof.*\)$", err, re.M), err


def test_listen_says_the_connections_it_refused_meanwhile(tmp_path):
    """A session's refused connections (strangers, wrong keys: Destination.refused_total)
    are in listen's summary and its --json stats; it said nothing of them (a review)."""
    import json
    import re
    import socket

    from listen_support import Listener
    (tmp_path / "ram.img").write_bytes(os.urandom(16 * PAGE))
    with Listener(tmp_path / "out", "--json") as listener:
        for _ in range(2):
            with socket.socket(socket.AF_UNIX) as stranger:
                stranger.connect(listener.address[5:])
                stranger.sendall(b"GET / HTTP/1.1\r\n\r\n")
                stranger.settimeout(30)
                while stranger.recv(4096):      # refused (counted first): told why, closed
                    pass
        sent = run_cli("send", listener.address, str(tmp_path / "ram.img"), "--quiet")
        assert sent.returncode == 0, sent.stderr
        status, err = listener.finish()
    assert status == 0, err
    said = re.search(r"^refused 2 connections meanwhile \(the last: a local process: (.+)\)$",
                     err, re.M)
    assert said, err
    stats = json.loads(listener.out)["stats"]
    assert stats["refused_connections"] == 2
    assert stats["last_refused"] == f"a local process: {said[1]}"
