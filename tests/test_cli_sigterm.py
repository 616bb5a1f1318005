"""SIGTERM to a ``fastmfd`` command does what Ctrl-C does: the session fails on
both sides with an error that says so, the command cleans up (no ``.part`` or
final file left, no process, no shared memory) and exits with 143 (128 +
SIGTERM; Ctrl-C exits with 130). Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import fastmfd
from listen_support import Listener
from migration_support import make_region

PAGE = 4096
TERMINATED = 128 + signal.SIGTERM


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigterm_to_listen_fails_the_sender_and_removes_the_files(tmp_path):
    out = tmp_path / "out"
    region = make_region("ram", 64 * PAGE, seed=4)
    try:
        with Listener(out) as listener:
            with fastmfd.Source(listener.address) as source:
                source.add_region(region)
                # ~1 s of device state: the signal lands mid-transfer.
                source.add_device(fastmfd.SyntheticDevice("nic0", 0, 4 << 20,
                                                          read_rate=4 << 20))
                with pytest.raises(fastmfd.MigrationError, match="terminated by SIGTERM"):
                    # on_stop: after SETUP (the .part files exist), before any page went
                    source.migrate(live=False, on_stop=lambda: (
                        wait_for(lambda: os.path.exists(out / "nic0.0.state.part"),
                                 "the listener's files"),
                        listener.proc.send_signal(signal.SIGTERM)))
            status, err = listener.finish()
    finally:
        region.close()
    assert status == TERMINATED, err
    assert "fastmfd listen: terminated (SIGTERM)" in err
    assert not out.exists()        # nor the directory the listener made


def test_sigterm_to_send_fails_the_listener(tmp_path):
    image, fifo, out = tmp_path / "ram.img", tmp_path / "state", tmp_path / "out"
    image.write_bytes(os.urandom(16 * PAGE))
    os.mkfifo(fifo)
    with Listener(out) as listener:
        sender = subprocess.Popen([sys.executable, "-m", "fastmfd", "send", listener.address,
                                   str(image), "--state", f"slow={fifo}", "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        writer = os.open(fifo, os.O_WRONLY)     # the sender opened it: it is running
        try:
            # More than a pipe holds: back once the sender reads the state (switchover,
            # the RAM handed out); the rest never comes, the sender waits mid-transfer.
            data = memoryview(b"s" * (256 << 10))
            while data:
                data = data[os.write(writer, data):]
            sender.send_signal(signal.SIGTERM)
            _, sender_err = sender.communicate(timeout=30)
        finally:
            os.close(writer)            # lets the device's blocked read end
            if sender.poll() is None:
                sender.kill()
                sender.communicate()
        status, err = listener.finish()
    assert sender.returncode == TERMINATED, sender_err
    assert "fastmfd send: terminated (SIGTERM)" in sender_err
    assert status == 1 and "the source failed: terminated by SIGTERM" in err, err
    assert not out.exists()        # nor the directory the listener made


@pytest.mark.parametrize("command, started", [
    (["demo", "--size", "16M", "--device-size", "8M", "--device-rate", "4M"], "Device state"),
    (["bench", "--size", "16M", "--channels", "1", "--compression", "zlib", "--repeat", "100"],
     "verified"),
])
def test_sigterm_to_demo_and_bench(tmp_path, command, started):
    log = tmp_path / "log"
    with open(log, "w") as output:
        proc = subprocess.Popen([sys.executable, "-m", "fastmfd", *command], stdout=output,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: started in log.read_text(), f"{started!r} in the output", 60)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert proc.returncode == TERMINATED, text
    assert f"fastmfd {command[0]}: terminated (SIGTERM)" in text
