"""QemuReceiver and QemuSender (and qemu.receive/send, which make one) under
lifecycle misuse, as test_close_from_thread, test_forked_child and
test_gc_callback check a Source and a Destination: close() or cancel() from
another thread while the call runs, a child forked from the owner's process,
one dropped unclosed.

A call cancelled (or closed from another thread) ends at once with one
MigrationError naming it, the QEMU peer's migration fails with the
connections, and nothing is left: no worker, socket, segment, nor file (a
failed receive leaves no .part file, nor the directory it made). A forked
child's close() frees nothing of the parent's; one dropped unclosed is freed
when collected, with a ResourceWarning.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastmfd import qemu
from fastmfd._engine import cancelling, qemu_sending
from fastmfd._engine.qemu_receiving import QemuReceiving
from fastmfd._engine.session import _free as free_unclosed
from fastmfd.errors import ConfigError, MigrationError
from fastmfd.protocol.bytereader import ByteReader, StreamReader
from fastmfd.protocol.qemu import RAM_CONTINUE, RAM_PAGE, QevmDecoder
from fastmfd.tools.outputs import OutputDir
from proc_scan import alive
from qemu_support import (PAGE, QEMUS, Background, Guest, assert_nothing_complete,
                          incoming_guest, pattern, saved_guest, wait_until_filled)
from test_qemu_receive import capture_bytes, receive_replay, replay

GUEST_MIB = 64
SLOW = 8 << 20                  # bytes/s: the migration is under way when closed
PROMPT = 10.0                   # seconds a cancelled call has to return
ROOT = Path(__file__).resolve().parent.parent


def assert_closed(call: Background, name: str) -> None:
    """``call`` ended within PROMPT with the one MigrationError a close() gives."""
    with pytest.raises(MigrationError) as failed:
        call.result(PROMPT)
    assert str(failed.value) == f"the {name} was closed", repr(failed.value)


def assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5.0
    while left := [pid for pid in pids if alive(pid)]:
        assert time.monotonic() < deadline, f"workers outlived their owner: {left}"
        time.sleep(0.02)


# ---------------------------------------------------------------- close() from a thread

def test_a_receiver_closed_from_another_thread_while_it_waits(tmp_path, leaks):
    """Before any QEMU came: receive() raised ValueError (a closed listener's
    fd -1) and the directory it made was left."""
    out = tmp_path / "out"
    receiver = qemu.QemuReceiver(f"unix:{tmp_path / 'r.sock'}", out, timeout=PROMPT * 3)
    call = Background("receive()", receiver.receive)
    time.sleep(0.3)                         # waiting for QEMU
    receiver.close()
    assert_closed(call, "QemuReceiver")
    assert_nothing_complete(out)
    assert not (tmp_path / "r.sock").exists()
    with pytest.raises(ConfigError, match="closed"):
        receiver.receive()
    leaks.assert_clean()


@pytest.mark.parametrize("qemu_binary", QEMUS)
def test_a_receiver_closed_from_another_thread_mid_migration(tmp_path, qemu_binary, leaks):
    """receive() raised AttributeError (its workers freed under it) and left
    every .part file; QEMU's migration fails, as a cancel's would."""
    ram_path = tmp_path / "src-ram.img"
    pattern(GUEST_MIB, seed=5).tofile(ram_path)
    source = Guest(tmp_path, str(ram_path), GUEST_MIB, binary=qemu_binary)
    out = tmp_path / "out"
    try:
        source.set_multifd(2, "none", max_bandwidth=SLOW)
        receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", out, stall_timeout=60.0)
        pids = receiver.worker_pids()
        call = Background("receive()", receiver.receive)
        source.migrate(receiver.address)
        wait_until_filled(lambda: out.glob("*.part"), 4 << 20)
        closing = [threading.Thread(target=receiver.close) for _ in range(2)]   # twice at once
        for thread in closing:
            thread.start()
        assert_closed(call, "QemuReceiver")
        for thread in closing:
            thread.join(PROMPT)
        assert source.wait(PROMPT) == "failed"
    finally:
        source.close()
    assert_nothing_complete(out)
    assert_gone(pids)
    leaks.assert_clean()


@pytest.mark.parametrize("qemu_binary", QEMUS)
def test_a_sender_closed_from_another_thread_mid_migration(tmp_path, qemu_binary, leaks):
    """close() unmapped the block files under send(), which read them: the
    process died of SIGSEGV."""
    saved, _ = saved_guest(tmp_path, 2, "none", qemu_binary, mib=GUEST_MIB)
    guest, _, address = incoming_guest(tmp_path, 2, "none", qemu_binary, mib=GUEST_MIB)
    try:
        sender = qemu.QemuSender(saved, channels=2, max_bandwidth=SLOW, stall_timeout=60.0)
        pids = sender.worker_pids()
        call = Background("send()", lambda: sender.send(address))
        deadline = time.monotonic() + PROMPT
        while guest.qmp.command("query-migrate").get("status") != "active":
            assert time.monotonic() < deadline, "the destination never started loading"
            time.sleep(0.05)
        time.sleep(0.5)                     # pages under way
        sender.close()
        assert_closed(call, "QemuSender")
        assert guest.wait(PROMPT) == "failed"
    finally:
        guest.close()
    assert_gone(pids)
    with pytest.raises(ConfigError, match="closed"):
        sender.send(address)
    leaks.assert_clean()


def test_a_receiver_closed_from_another_thread_as_it_flushes_ends_it_there(
        tmp_path, qemu72_captures, leaks, monkeypatch):
    """A disk slow to take the block files (here the first one's fsync lasts until
    the close() comes): the final flush and the commit looked at no cancel, so
    close() waited for them (up to CLOSE_WAIT, 10 s, then freed the receiver under
    them) and the receive committed all the same. Now it fails there, and leaves
    no file that looks complete."""
    out = tmp_path / "out"
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", out, stall_timeout=PROMPT)
    flushing, closing = threading.Event(), threading.Event()
    fsync_part, cancel = OutputDir.fsync_part, receiver.cancel

    def slow_disk(output: OutputDir, name: str) -> None:
        flushing.set()
        closing.wait(PROMPT)
        fsync_part(output, name)

    def cancelled(reason: str = "cancelled") -> None:
        closing.set()
        cancel(reason)
    monkeypatch.setattr(OutputDir, "fsync_part", slow_disk)
    monkeypatch.setattr(receiver, "cancel", cancelled)
    call = Background("receive()", receiver.receive)
    socks = replay(receiver.address, capture_bytes(qemu72_captures, "none"), keep_open=True)
    try:
        assert flushing.wait(PROMPT), "the receive never flushed"
        receiver.close()
        assert_closed(call, "QemuReceiver")
    finally:
        for sock in socks:
            sock.close()
    assert_nothing_complete(out)
    leaks.assert_clean()


class _BlockList(Exception):
    """Where a main channel's block list ends, and its blocks."""


class _BlockListFinder(QevmDecoder):
    def on_blocks(self) -> None:
        raise _BlockList(self.r.pos, dict(self.out.blocks))


def with_pages_on_main(files: dict[str, bytes], pages: int) -> dict[str, bytes]:
    """A capture whose main channel carries ``pages`` PAGE records after its block
    list (in its largest block), all sent before its first barrier: bytes that
    keep coming while it decodes them."""
    main = files["conn0.bin"]
    with pytest.raises(_BlockList) as found:
        _BlockListFinder(ByteReader("conn0.bin", main), PAGE).decode_ram()
    at, blocks = found.value.args
    block = max(blocks, key=blocks.get)
    assert pages * PAGE <= blocks[block]
    data = bytes(range(256)) * (PAGE // 256)
    records = [struct.pack(">QB", RAM_PAGE, len(block)) + block.encode() + data]
    records += [struct.pack(">Q", i * PAGE | RAM_PAGE | RAM_CONTINUE) + data
                for i in range(1, pages)]
    return {**files, "conn0.bin": main[:at] + b"".join(records) + main[at:]}


def test_a_cancel_while_the_main_channel_keeps_sending_ends_the_receive(
        tmp_path, qemu72_captures, leaks, monkeypatch):
    """Only a wait saw a cancel, and the main channel is read without one while
    its bytes wait: a cancel was seen at its next pause or barrier (3.5 MiB of
    records on it held one for 2.8 s). Now it ends the reading within one read."""
    files = with_pages_on_main(capture_bytes(qemu72_captures, "none"), 8192)   # 32 MiB
    decoding, cancelled = threading.Event(), threading.Event()
    pages: list[int] = []
    on_page = QemuReceiving.on_page

    def counted(session, *args) -> None:
        pages.append(cancelled.is_set())
        if not decoding.is_set():
            decoding.set()
            assert cancelled.wait(PROMPT), "never cancelled"
        on_page(session, *args)

    monkeypatch.setattr(QemuReceiving, "on_page", counted)
    out = tmp_path / "out"
    with qemu.QemuReceiver("tcp:127.0.0.1:0", out, stall_timeout=PROMPT) as receiver:
        call = Background("receive()", receiver.receive)
        socks = replay(receiver.address, files)
        try:
            assert decoding.wait(PROMPT), "no page came"
            receiver.cancel("stop reading")
            cancelled.set()
            with pytest.raises(MigrationError, match="^stop reading$"):
                call.result(PROMPT)
        finally:
            for sock in socks:
                sock.close()
    # What was read when it was cancelled (one read, at most), and no more.
    assert pages.count(True) <= StreamReader.CHUNK // PAGE, pages.count(True)
    assert_nothing_complete(out)
    leaks.assert_clean()


def test_cancel_before_the_call_fails_it_as_it_starts(tmp_path, qemu72_captures, leaks):
    """receive() and send() after cancel(): the cancel's MigrationError, nothing left."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    with qemu.QemuReceiver("tcp:127.0.0.1:0", tmp_path / "out", timeout=PROMPT) as receiver:
        receiver.cancel("not now")
        with pytest.raises(MigrationError, match="^not now$"):
            receiver.receive()
        with qemu.QemuSender(saved, stall_timeout=PROMPT) as sender:
            sender.cancel("not now either")
            with pytest.raises(MigrationError, match="^not now either$"):
                sender.send(receiver.address)
    assert_nothing_complete(tmp_path / "out")
    leaks.assert_clean()


def test_a_send_cancelled_before_it_starts_connects_to_nothing(tmp_path, qemu72_captures,
                                                               leaks):
    """A QEMU destination takes one incoming migration: a send() cancelled before
    it started connected its main channel all the same, and ended it at once,
    failing the destination's migration for a send that never began."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    with socket.create_server(("127.0.0.1", 0)) as destination, \
            qemu.QemuSender(saved, stall_timeout=PROMPT) as sender:
        sender.cancel("not now")
        with pytest.raises(MigrationError, match="^not now$"):
            sender.send(f"tcp:127.0.0.1:{destination.getsockname()[1]}")
        destination.setblocking(False)
        with pytest.raises(BlockingIOError):
            destination.accept()                # no connection was made
    leaks.assert_clean()


def test_a_send_cancelled_while_it_connects_ends_at_once(tmp_path, qemu72_captures, leaks):
    """A destination slow to accept (its backlog full, its SYNs dropped): cancel()
    shut only connections already made, and send() went on connecting until its
    timeout (30 s by default); now the one being made is shut down too."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    fillers: list[socket.socket] = []
    with socket.socket() as destination:
        destination.bind(("127.0.0.1", 0))
        destination.listen(0)
        address = destination.getsockname()
        for _ in range(2):                      # the backlog full: connect() waits
            filler = socket.socket()
            filler.settimeout(0.5)
            with contextlib.suppress(OSError):
                filler.connect(address)
            fillers.append(filler)
        try:
            with qemu.QemuSender(saved, timeout=60.0, stall_timeout=60.0) as sender:
                call = Background("send()", lambda: sender.send(f"tcp:{address[0]}:"
                                                                f"{address[1]}"))
                time.sleep(0.5)                 # connecting
                sender.cancel("stop now")
                with pytest.raises(MigrationError, match="^stop now$"):
                    call.result(PROMPT)
        finally:
            for filler in fillers:
                filler.close()
    leaks.assert_clean()


def test_a_cancel_that_meets_a_send_failing_already_leaves_it_its_failure(
        tmp_path, qemu72_captures, leaks, monkeypatch):
    """A destination whose backlog holds the main channel and no more: the first
    multifd channel's connection times out, and send(), failing, waits for the
    destination's word on why. A cancel meanwhile was what send() raised, the
    failure only its __cause__ (and that said the destination had closed the main
    channel: this side's own shutdown). First error wins, as for a Source."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    await_word = qemu_sending.QemuSending._await_main_word

    def cancelled_meanwhile(session, *args, **kwargs) -> None:
        sender.cancel("too late")
        await_word(session, *args, **kwargs)
    monkeypatch.setattr(qemu_sending.QemuSending, "_await_main_word", cancelled_meanwhile)
    with socket.socket() as destination, \
            qemu.QemuSender(saved, timeout=1.0, stall_timeout=PROMPT) as sender:
        destination.bind(("127.0.0.1", 0))
        destination.listen(0)                   # one connection waits, unaccepted
        with pytest.raises(MigrationError, match="^cannot connect to .*timed out"):
            sender.send("tcp:127.0.0.1:%d" % destination.getsockname()[1])
    leaks.assert_clean()


def test_two_cancels_at_once_are_one_that_came_first(tmp_path, qemu72_captures, leaks,
                                                     monkeypatch):
    """A user's cancel() as close() cancels: both found no cancel yet, each made
    its error, and the one recorded as first was not the one kept, so a failure
    that followed (the cancel's own consequence: the main channel shut) was taken
    for the send's own, and raised with its hint (5 of 30 rounds of
    /work/notes/qcancel/cancel_races_close_mid_send.py). Each error is made here
    as the other cancel makes its own, where both can."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    together = threading.Barrier(2, timeout=1.0)

    class MadeTogether(MigrationError):
        def __init__(self, *args, **kwargs) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()             # (one at a time: the other's wait ends)
            super().__init__(*args, **kwargs)
    for module in (qemu_sending, cancelling):
        monkeypatch.setattr(module, "MigrationError", MadeTogether)
    with qemu.QemuSender(saved, stall_timeout=PROMPT) as sender:
        session = sender._session
        assert session is not None
        cancels = [Background("cancel()", lambda: sender.cancel(reason))
                   for reason in ("one", "other")]
        for cancel in cancels:
            cancel.result(PROMPT)
        assert session._failing(OSError("the main channel, shut")) is session.cancelled
    leaks.assert_clean()


def test_a_sender_s_cancel_that_acts_once_it_was_closed_raises_nothing(tmp_path,
                                                                       qemu72_captures, leaks):
    """cancel() from one thread as close() from another frees the sender: one that
    found the session before close() let go of it, and acts on it after, aborted
    the selector close() had freed (ValueError: ChannelSelector is closed)."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    sender = qemu.QemuSender(saved, stall_timeout=PROMPT)
    session = sender._session
    assert session is not None
    sender.close()
    session.cancel("as it closed")              # what that cancel() does next
    leaks.assert_clean()


def black_hole(listener: socket.socket, ended: threading.Event,
               taken: list[socket.socket]) -> None:
    """Take every connection (into ``taken``, for the caller to close) and read it to
    its end, saying nothing, holding it open; ``ended`` is set when the first one
    (the main channel) ends."""
    def read(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 16):
                pass
        if sock is taken[0]:
            ended.set()
    with contextlib.suppress(OSError):          # (closed: the test is over)
        while True:
            taken.append(listener.accept()[0])
            threading.Thread(target=read, args=(taken[-1],), daemon=True).start()


def test_a_send_cancelled_after_its_stream_was_sent_whole_says_so(tmp_path, qemu72_captures,
                                                                  leaks):
    """The destination read the whole stream and had not yet said whether it
    loaded it: the cancel said "stop now", as if the stream had not been sent,
    though that destination may go on to run the guest."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    ended, taken = threading.Event(), []
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            threading.Thread(target=black_hole, args=(listener, ended, taken),
                             daemon=True).start()
            with qemu.QemuSender(saved, stall_timeout=60.0) as sender:
                call = Background("send()", lambda: sender.send(
                    f"tcp:127.0.0.1:{listener.getsockname()[1]}"))
                assert ended.wait(PROMPT), "the stream never ended"
                sender.cancel("stop now")
                with pytest.raises(MigrationError, match="^stop now after the stream was "
                                   "sent whole: whether the destination loaded it is unknown"):
                    call.result(PROMPT)
    finally:
        for sock in taken:
            sock.close()
    leaks.assert_clean()


# ---------------------------------------------------------------- a forked child

def forked(then) -> int:
    """``then()`` in a child forked now, which exits with what it returns (99
    if it raised): its exit status."""
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            status = then()
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def refused_in_a_child(call) -> int:
    try:
        call()
    except ConfigError as exc:
        return 0 if "which this process was forked from" in str(exc) else 2
    return 1


def test_a_forked_child_leaves_its_parents_receiver_and_sender_alone(tmp_path,
                                                                      qemu72_captures, leaks):
    """The child's close() (leaving the ``with`` it inherited) killed the
    parent's workers, and its receive() would have taken the parent's listener."""
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    sock, out = tmp_path / "r.sock", tmp_path / "out"
    with qemu.QemuReceiver(f"unix:{sock}", out, stall_timeout=PROMPT) as receiver, \
            qemu.QemuSender(saved, stall_timeout=PROMPT) as sender:
        pids = receiver.worker_pids() + sender.worker_pids()

        def child() -> int:
            receiver.close()
            sender.close()
            return 0
        assert forked(child) == 0
        assert forked(lambda: refused_in_a_child(receiver.receive)) == 0
        assert forked(lambda: refused_in_a_child(lambda: sender.send(receiver.address))) == 0
        assert forked(lambda: refused_in_a_child(receiver.cancel)) == 0
        assert all(alive(pid) for pid in pids)
        assert sock.exists() and out.is_dir()
        # The parent's migration runs as if nothing happened.
        call = Background("receive()", receiver.receive)
        sender.send(receiver.address)
        assert call.result(PROMPT * 3).manifest["channels"] == 2
    assert_gone(pids)
    leaks.assert_clean()


# ---------------------------------------------------------------- dropped unclosed

def test_a_receiver_dropped_unclosed_is_freed_when_collected(tmp_path, leaks):
    """Its socket file and the directory it made were left for ever."""
    sock, out = tmp_path / "r.sock", tmp_path / "out"
    receiver = qemu.QemuReceiver(f"unix:{sock}", out)
    pids = receiver.worker_pids()
    with pytest.warns(ResourceWarning, match="unclosed fastmfd.QemuReceiver"):
        del receiver
        gc.collect()
    assert not sock.exists()
    assert_nothing_complete(out)
    assert_gone(pids)
    leaks.assert_clean()


def test_a_sender_dropped_unclosed_is_freed_when_collected(tmp_path, qemu72_captures, leaks):
    saved = tmp_path / "first"
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    sender = qemu.QemuSender(saved)
    pids = sender.worker_pids()
    with pytest.warns(ResourceWarning, match="unclosed fastmfd.QemuSender"):
        del sender
        gc.collect()
    assert_gone(pids)
    leaks.assert_clean()


def test_a_receive_committed_stays_when_its_receiver_is_collected(tmp_path, qemu72_captures,
                                                                  leaks):
    """Dropped unclosed after its receive(): the finalizer frees it, and the
    committed files stay."""
    out = tmp_path / "out"
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", out, stall_timeout=PROMPT)
    socks = replay(receiver.address, capture_bytes(qemu72_captures, "none"))
    try:
        names = {b["file"] for b in receiver.receive().manifest["blocks"]}
    finally:
        for sock in socks:
            sock.close()
    with pytest.warns(ResourceWarning, match="unclosed fastmfd.QemuReceiver"):
        del receiver
        gc.collect()
    assert {p.name for p in out.iterdir()} == names | {"vmstate.bin", "manifest.json"}
    leaks.assert_clean()


# ---------------------------------------------------------------- the program stopped

@pytest.mark.parametrize("qemu_binary", QEMUS)
def test_sys_exit_mid_send_ends_it_at_once(tmp_path, qemu_binary, leaks, exits_on_sigterm):
    """A service's SIGTERM handler (sys.exit(143)) mid-send: qemu.send() raises the
    SystemExit itself, within a second, and the destination QEMU fails (it held
    before this file's fixes; a guard)."""
    saved, _ = saved_guest(tmp_path, 2, "none", qemu_binary, mib=GUEST_MIB)
    guest, _, address = incoming_guest(tmp_path, 2, "none", qemu_binary, mib=GUEST_MIB)
    signalled: dict[str, float] = {}

    def sigterm_once_loading() -> None:
        deadline = time.monotonic() + PROMPT
        while guest.qmp.command("query-migrate").get("status") != "active":
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(0.5)
        signalled["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        thread = threading.Thread(target=sigterm_once_loading)
        thread.start()
        with pytest.raises(SystemExit) as raised:
            qemu.send(address, saved, max_bandwidth=SLOW, stall_timeout=60.0)
        took = time.monotonic() - signalled["at"]
        thread.join(PROMPT)
        assert raised.value.code == 143
        assert took < 1.0, f"send() took {took:.2f} s to end"
        assert guest.wait(PROMPT) == "failed"
    finally:
        guest.close()
    leaks.assert_clean()


def test_a_receiver_open_at_the_interpreters_exit_is_freed_then(tmp_path):
    """Its unix socket file and the directory it made were left behind."""
    sock, out = tmp_path / "r.sock", tmp_path / "out"
    script = ("import sys; from fastmfd import qemu; "
              "r = qemu.QemuReceiver(sys.argv[1], sys.argv[2]); print(r.worker_pids())")
    done = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", "-c", script,
                           f"unix:{sock}", str(out)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert_gone(json.loads(done.stdout))
    assert not sock.exists()
    assert_nothing_complete(out)


# The receive() in a daemon thread as the interpreter exits. The daemon thread is given
# time to say how it ended: an atexit handler registered before any finalizer (atexit
# runs its handlers last registered first) joins it after the receiver is freed.
RUNNING_AT_EXIT = """
import atexit, sys, threading, time, weakref
assert not weakref.finalize._registered_with_atexit, "a finalizer before the join"
threads = []
atexit.register(lambda: [thread.join(10) for thread in threads])
from fastmfd import qemu
r = qemu.QemuReceiver(sys.argv[1], sys.argv[2])
def receive():
    try:
        r.receive()
    except Exception as exc:
        print(f"receive() raised {type(exc).__name__}: {exc}", flush=True)
threads.append(threading.Thread(target=receive, daemon=True))
threads[0].start()
time.sleep(0.5)
"""


def test_a_receive_running_at_the_interpreters_exit_fails_saying_so(tmp_path):
    """receive() in a daemon thread, waiting for QEMU, as the interpreter exits:
    the receiver freed under it, it fails with a MigrationError saying why (it
    raised AssertionError from its cancel's closed wake-up socket)."""
    sock, out = tmp_path / "r.sock", tmp_path / "out"
    done = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", "-c",
                           RUNNING_AT_EXIT, f"unix:{sock}", str(out)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("receive() raised MigrationError: freed while the migration ran "
                           "(its owner was collected, or the interpreter is exiting)\n"), \
        (done.stdout, done.stderr)
    assert not sock.exists()
    assert_nothing_complete(out)


def test_a_receive_cancelled_before_it_failed_raises_the_cancel(tmp_path, leaks, monkeypatch):
    """First error wins, as for a Destination: a failure after the cancel, before
    receive()'s next wait saw it, was what it raised: at the interpreter's exit, a
    wait on a descriptor the receiver's freeing had closed (ValueError: Invalid file
    descriptor: -1), for "freed while the migration ran"."""
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", tmp_path / "out", timeout=PROMPT)

    def cancelled_then_failed(session, *args) -> None:
        receiver.cancel("stop")
        raise ValueError("Invalid file descriptor: -1")
    monkeypatch.setattr(QemuReceiving, "run", cancelled_then_failed)
    with receiver, pytest.raises(MigrationError, match="^stop$") as failed:
        receiver.receive()
    assert isinstance(failed.value.__cause__, ValueError)
    assert_nothing_complete(tmp_path / "out")
    leaks.assert_clean()


def test_a_cancel_during_a_failed_receives_clean_up_leaves_it_its_failure(tmp_path, leaks,
                                                                           monkeypatch):
    """The failure was recorded after the clean-up (the workers stopped, the files
    removed): a cancel from another thread meanwhile counted as first, and receive()
    raised it in place of its own failure (a review)."""
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", tmp_path / "out", timeout=0.5)
    real_close = QemuReceiving.close

    def cancelled_as_it_closes(session) -> None:
        cancel = threading.Thread(target=receiver.cancel, args=("cancelled by the user",))
        cancel.start()
        cancel.join()
        real_close(session)
    monkeypatch.setattr(QemuReceiving, "close", cancelled_as_it_closes)
    with receiver, pytest.raises(MigrationError, match="^main channel: no QEMU connected "):
        receiver.receive()
    assert_nothing_complete(tmp_path / "out")
    leaks.assert_clean()


def test_a_receive_whose_receiver_is_freed_under_it_fails_saying_so(tmp_path, leaks,
                                                                    monkeypatch):
    """The receiver freed from another thread as receive() fails (at the interpreter's
    exit, its finalizer under a daemon thread's receive()): the receive's abort of
    the directory, closed already, raised ValueError (an fsync of its fd, -1) in
    place of "freed while the migration ran"."""
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", tmp_path / "out", timeout=PROMPT)

    def freed_meanwhile(session, *args) -> None:
        free_unclosed(receiver._resources)          # what the finalizer does
        raise ValueError("Invalid file descriptor: -1")     # its next wait's
    monkeypatch.setattr(QemuReceiving, "run", freed_meanwhile)
    with pytest.raises(MigrationError, match="^freed while the migration ran "):
        receiver.receive()
    receiver.close()
    assert_nothing_complete(tmp_path / "out")
    leaks.assert_clean()


def test_a_receive_session_closed_from_two_threads_at_once(tmp_path, leaks):
    """As at the interpreter's exit, whose finalizer frees a receiver whose receive()
    fails in a daemon thread, closing its session too: the second close() took the
    workers from under the first (AttributeError: 'NoneType' object has no attribute
    'stop'; or a region's AssertionError: mapped while open). The first close() is
    held inside the workers' kill meanwhile; the second now waits for it."""
    receiver = qemu.QemuReceiver("tcp:127.0.0.1:0", tmp_path / "out")
    session = receiver._session
    assert session is not None and session.workers is not None
    kill, calls = session.workers.kill, []

    def slow_kill() -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:                 # the first close()'s: the second's runs through
            time.sleep(0.3)
        kill()
    session.workers.kill = slow_kill        # type: ignore[method-assign]
    first = Background("close()", session.close)
    time.sleep(0.1)
    session.close()
    first.result(PROMPT)
    assert calls[0] == "close()", calls
    receiver.close()
    leaks.assert_clean()
