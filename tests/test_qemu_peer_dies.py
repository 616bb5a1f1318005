"""A real QEMU peer that dies (SIGKILL) or stops (SIGSTOP) in the middle of a
migration, either way: the QEMU source of ``qemu.receive`` / ``listen --qemu``,
the ``-incoming defer`` destination of ``qemu.send`` / ``send --qemu``.

Each migration is slowed down (QEMU's ``max-bandwidth``, send's
``max_bandwidth``) so that the peer is hit while pages are landing. A killed
peer closes its connections: the call fails at once, well within a stall
timeout it could otherwise have waited for (PATIENT). A stopped one keeps them
open and silent: the call fails at its stall timeout, naming what it waited
for. Either way with one MigrationError, no file that looks complete and
nothing left behind: no worker, /dev/shm segment or socket (the leak check).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmfd import qemu
from fastmfd.errors import MigrationError
from leakcheck import GRACE_SECONDS
from proc_scan import alive, process_tree
from qemu_support import (QEMUS, Background, Guest, Receiver, assert_nothing_complete,
                          incoming_guest, listening_command, needs_qemu, pattern, saved_guest,
                          wait_until_filled)

GUEST_MIB = 64                  # 3/4 of it data: 48 MiB of pages
SLOW = 8 << 20                  # bytes/s: some 6 s for those pages
UNDER_WAY = 4 << 20             # bytes landed: the peer is hit mid-migration
PATIENT = 60.0                  # a stall timeout no failure here may wait for
PROMPT = 20.0                   # seconds a failing call has to return: it did not hang
STALL = 2.0                     # the stall timeout of the stopped-peer cases


def tcp_buffer_cap(name: str) -> int:
    """The most bytes autotuning lets a TCP socket's buffer grow to here: the
    third value of net.ipv4.tcp_wmem (send) or tcp_rmem (receive). Neither
    qemu.send nor QEMU sets SO_SNDBUF or SO_RCVBUF, which would turn it off
    (protocol.sockets.tune_data_socket)."""
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


# A destination stopped mid-send takes nothing more, and says nothing (no return
# path): the send fails at its stall timeout only if its channels still have
# more to send than their connections can hold, each its sender's and its
# receiver's buffer full, or it writes the rest into them and ends as if
# migrated. The guest's pages left when it stops (3/4 of the guest, less
# UNDER_WAY and a second at SLOW landed meanwhile) are made more than that.
SEND_CHANNELS = 2
HELD_AT_MOST = SEND_CHANNELS * (tcp_buffer_cap("tcp_wmem") + tcp_buffer_cap("tcp_rmem"))
STOPPED_GUEST_MIB = -(-(UNDER_WAY + SLOW + HELD_AT_MOST + (1 << 20)) * 4 // 3 >> 20)

# receive(), its source killed: the main channel cut short, or a multifd
# channel (at a packet's end, or inside one: its worker says so).
SOURCE_KILLED = (r"^(main channel at byte \d+: the source closed it before the stream's end "
                 r"\(its migration failed or was cancelled, or it exited\): .*truncated"
                 r"|multifd channel \d: (the source closed it before its SYNC for barrier \d+"
                 r"|the connection from \S+ closed after \d+ of \d+ bytes of RAM \w+))")
# send(), its destination killed: a channel's write broke, or the main channel
# was found closed; then what to check on the destination.
DESTINATION_KILLED = (r"^(main|multifd) channel( \d)?: .*(Broken pipe|Connection reset by peer"
                      r"|the destination (closed|broke) the connection).* \((the destination "
                      r"closed the connection: )?did its QEMU exit, or drop the stream")


@pytest.fixture(params=QEMUS)
def source(request, tmp_path):
    """A QEMU guest about to migrate at SLOW bytes/s over 2 multifd channels."""
    ram_path = tmp_path / "src-ram.img"
    pattern(GUEST_MIB, seed=5).tofile(ram_path)
    guest = Guest(tmp_path, str(ram_path), GUEST_MIB, binary=request.param)
    try:
        guest.set_multifd(2, "none", max_bandwidth=SLOW)
        yield guest
    finally:
        resume_and_close(guest)


def resume_and_close(guest: Guest) -> None:
    """Kill the guest, stopped or not (continued first: nothing is left stopped)."""
    if guest.process.poll() is None:
        os.kill(guest.process.pid, signal.SIGCONT)
    guest.close()


def kill(guest: Guest) -> None:
    guest.process.kill()
    guest.process.wait()


def landing(out):
    """The receiver's block files, as their pages land."""
    return lambda: out.glob("*.part")


def assert_fails(pending: Background | Receiver, pattern: str) -> str:
    """``pending`` (a receive() or send() running) fails within PROMPT seconds
    with one MigrationError matching ``pattern``, on one line; its text."""
    with pytest.raises(MigrationError, match=pattern) as failed:
        pending.result(PROMPT)
    assert "\n" not in str(failed.value), repr(failed.value)
    return str(failed.value)


# ---------------------------------------------------------------- qemu.receive

def killed_mid_migration(out: Path, source: Guest, leaks, pattern: str = SOURCE_KILLED,
                         **receive) -> None:
    """The connections end with the source: receive() fails then, not at its
    stall timeout, and removes its .part files (and the directory it made)."""
    receiver = Receiver(out, stall_timeout=PATIENT, **receive)
    source.migrate(receiver.address)
    wait_until_filled(landing(out), UNDER_WAY)
    kill(source)
    assert_fails(receiver, pattern)
    assert_nothing_complete(out)
    source.close()          # its QMP socket is the test's
    leaks.assert_clean()


def stopped_mid_migration(out: Path, source: Guest, leaks, **receive) -> None:
    """The connections stay open and silent: receive() fails at its stall
    timeout, saying what did not come."""
    receiver = Receiver(out, stall_timeout=STALL, **receive)
    source.migrate(receiver.address)
    wait_until_filled(landing(out), UNDER_WAY)
    os.kill(source.process.pid, signal.SIGSTOP)
    assert_fails(receiver, r"^(main channel: no data for 2 s|multifd channel \d: no SYNC for "
                           r"barrier \d+ within 2 s)$")
    assert_nothing_complete(out)
    resume_and_close(source)
    leaks.assert_clean()


def test_a_source_killed_mid_migration_fails_receive_at_once(tmp_path, source, leaks):
    killed_mid_migration(tmp_path / "out", source, leaks)


def test_a_source_stopped_mid_migration_fails_receive_at_its_stall_timeout(tmp_path, source,
                                                                            leaks):
    stopped_mid_migration(tmp_path / "out", source, leaks)


def test_a_receive_worker_stopped_mid_migration_is_named_as_stopped(tmp_path, source, leaks):
    """The receive said only "multifd channel N: no SYNC for barrier K within S s" (or
    "main channel: no data for S s"), which reads as QEMU's or the link's doing, where
    fastmfd's own worker was stopped (a review, in a network-namespace pair); `fastmfd
    listen` and `send --qemu` say so."""
    out = tmp_path / "out"
    with qemu.QemuReceiver("tcp:127.0.0.1:0", out, stall_timeout=STALL) as receiver:
        receiving = Background("receive()", receiver.receive)
        source.migrate(receiver.address)
        wait_until_filled(landing(out), UNDER_WAY)
        pid = receiver._session.channels[1].worker.process.pid      # (its session's)
        os.kill(pid, signal.SIGSTOP)
        try:
            # (QEMU's main channel waits on that channel too: whichever wait ends first)
            assert_fails(receiving, r"^(multifd channel 1: no SYNC for barrier \d+ within 2 s"
                                    r"|main channel: no data for 2 s) "
                                    r"\(the receive worker of multifd channel 1 is stopped\)$")
        finally:
            with contextlib.suppress(ProcessLookupError):     # (stopped: killed by then)
                os.kill(pid, signal.SIGCONT)
    assert_nothing_complete(out)
    resume_and_close(source)
    leaks.assert_clean()


@needs_qemu
def test_listen_qemu_fails_when_its_source_is_killed(tmp_path, leaks):
    """The command: exit 1 at once, one line on stderr, no file, no process left."""
    ram_path = tmp_path / "src-ram.img"
    pattern(GUEST_MIB, seed=5).tofile(ram_path)
    source = Guest(tmp_path, str(ram_path), GUEST_MIB)
    out = tmp_path / "out"
    try:
        source.set_multifd(2, "none", max_bandwidth=SLOW)
        with listening_command(out, "--stall-timeout", str(PATIENT)) as (listen, address):
            source.migrate(address)
            wait_until_filled(landing(out), UNDER_WAY)
            tree = process_tree(listen.pid)
            kill(source)
            printed, said = listen.communicate(timeout=PROMPT)
    finally:
        source.close()
    assert listen.returncode == 1, said
    assert printed == ""
    assert len(said.splitlines()) == 1, said
    assert said.startswith("fastmfd listen: main channel at byte ") \
        or said.startswith("fastmfd listen: multifd channel "), said
    assert_nothing_complete(out)
    assert_tree_gone(tree)


def assert_tree_gone(tree: set[int]) -> None:
    """A command's processes (its workers, its forkserver) end with it."""
    deadline = time.monotonic() + GRACE_SECONDS
    while left := [pid for pid in tree if alive(pid)]:
        assert time.monotonic() < deadline, f"processes of the command outlived it: {left}"
        time.sleep(0.02)


# ---------------------------------------------------------------- qemu.send

def waiting_destination(tmp_path, binary: str, mib: int):
    """A saved guest of ``mib`` MiB (SEND_CHANNELS channels, no compression) and a
    QEMU of the same binary waiting for it: yields (saved directory, guest, its
    RAM file, address)."""
    saved, _ = saved_guest(tmp_path, SEND_CHANNELS, "none", binary, mib=mib)
    guest, ram_path, address = incoming_guest(tmp_path, SEND_CHANNELS, "none", binary,
                                              mib=mib)
    try:
        yield saved, guest, ram_path, address
    finally:
        resume_and_close(guest)


@pytest.fixture(params=QEMUS)
def destination(request, tmp_path):
    yield from waiting_destination(tmp_path, request.param, GUEST_MIB)


@pytest.fixture(params=QEMUS)
def destination_to_stop(request, tmp_path):
    """A destination whose guest has more pages than the send's connections hold."""
    yield from waiting_destination(tmp_path, request.param, STOPPED_GUEST_MIB)


def send_slowly(destination, **kwargs) -> tuple[Background, list[int]]:
    """qemu.send into ``destination`` at SLOW bytes/s, in a thread, once its
    pages are landing: (the call, its worker processes)."""
    saved, guest, ram_path, address = destination
    before = {p.pid for p in multiprocessing.active_children()}
    landed = ram_path.stat().st_blocks * 512
    sending = Background("send()", lambda: qemu.send(
        address, str(saved), channels=SEND_CHANNELS, max_bandwidth=SLOW, **kwargs))
    wait_until_filled(lambda: [ram_path], landed + UNDER_WAY)
    workers = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == SEND_CHANNELS, workers
    return sending, workers


def assert_gone(workers: list[int]) -> None:
    """Gone when send() returned, not left to the leak check's grace."""
    assert not [pid for pid in workers if alive(pid)], "a worker outlived the failed send"


def test_a_destination_killed_mid_send_fails_it_at_once(destination, leaks):
    """The connections end with the destination: send() fails then, not at its
    stall timeout (it waited for it: a dead worker frees no channel), saying
    the destination closed the connection, and its workers are gone."""
    guest = destination[1]
    sending, workers = send_slowly(destination, stall_timeout=PATIENT)
    kill(guest)
    said = assert_fails(sending, DESTINATION_KILLED)
    assert said.count("the destination closed the connection") <= 1, said    # (review)
    assert_gone(workers)
    guest.close()           # its QMP socket is the test's
    leaks.assert_clean()


def test_a_destination_stopped_mid_send_fails_it_at_its_stall_timeout(destination_to_stop,
                                                                      leaks):
    """The connections stay open and take nothing: send() fails at its stall
    timeout, saying what made no progress, and its workers are gone."""
    guest = destination_to_stop[1]
    sending, workers = send_slowly(destination_to_stop, stall_timeout=STALL)
    os.kill(guest.process.pid, signal.SIGSTOP)
    said = assert_fails(sending, r"^(no multifd channel took work for 2 s|main channel: the "
                                 r"destination took no data for 2 s|multifd channel \d: (no "
                                 r"Done report within|no progress for 2 s, after))")
    # It had taken pages: not its configuration first (the checklist alone said that).
    assert "no Done" in said or re.search(r"for 2 s, after \d+ pages were written to its "
                                         r"channels \(did the link go down, or its QEMU stop\? ",
                                         said)
    assert_gone(workers)
    resume_and_close(guest)
    leaks.assert_clean()


@needs_qemu
def test_send_qemu_fails_when_its_destination_is_killed(tmp_path, leaks):
    """The command: exit 1 at once, one line on stderr, no process left."""
    saved, _ = saved_guest(tmp_path, 2, "none", mib=GUEST_MIB)
    guest, ram_path, address = incoming_guest(tmp_path, 2, "none", mib=GUEST_MIB)
    try:
        landed = ram_path.stat().st_blocks * 512
        send = subprocess.Popen(
            [sys.executable, "-m", "fastmfd", "send", "--qemu", address, "--dir", str(saved),
             "--channels", "2", "--compression", "none", "--max-bandwidth", str(SLOW),
             "--stall-timeout", str(PATIENT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_filled(lambda: [ram_path], landed + UNDER_WAY)
            tree = process_tree(send.pid)
            kill(guest)
            printed, said = send.communicate(timeout=PROMPT)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait()
    finally:
        guest.close()
    assert send.returncode == 1, said
    assert printed == ""
    assert len(said.splitlines()) == 1, said
    assert said.startswith("fastmfd send: ")
    assert re.match(DESTINATION_KILLED, said.removeprefix("fastmfd send: ")), said
    assert_tree_gone(tree)
