"""ChildSet: the one owner of a group of child processes (channel workers here)."""

from __future__ import annotations

import errno
import gc
import os
import socket
import sys
import time

import numpy as np
import pytest

import fastmfd
from fastmfd.tools.loopback import LoopbackMigration
from fastmfd.protocol.sockets import tune_main_socket
from fastmfd.errors import ConfigError, MigrationError
from fastmfd.shm import list_segments
from fastmfd._engine.processes import ChildSet, child_setup, run_child
from fastmfd._engine.workers import recv_worker_main, send_worker_main
from fastmfd.protocol.control import Drained, Failed, Ready, failure_text
from migration_support import make_region
from proc_scan import alive

MIB = 1 << 20


def test_stop_lets_every_idle_worker_exit_by_itself():
    # Idle workers exit when told to; stop() must wait for all of them, not kill
    # the slower ones once the first has gone.
    workers = ChildSet(recv_worker_main, [f"receive channel {i}" for i in range(4)])
    workers.stop(timeout=30)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]


def _exits_at_once(conn):
    """A worker body that dies before it reports ready."""


def _says_ready(conn):
    child_setup()
    conn.send(Ready())
    conn.recv()


def test_a_worker_set_is_entered_only_once_every_worker_is_up():
    workers = ChildSet(_says_ready, ["up 0", "up 1"])
    try:
        # Ready means started, imported and waiting for its session.
        assert all(worker.process.is_alive() for worker in workers)
    finally:
        workers.stop()
    assert all(worker.exitcode == 0 for worker in workers)


def test_a_worker_that_dies_before_ready_is_named_with_its_exit():
    with pytest.raises(MigrationError) as info:
        ChildSet(_exits_at_once, ["early"])
    assert info.value.channel == "early"
    assert "exited with status 0" in str(info.value)


def _closes_its_pipe_then_exits_slowly(conn):
    """Dies before it reports ready, its exit known 2 s after its pipe closed (as when
    the forkserver, which reports it, is slow to run)."""
    conn.close()
    time.sleep(2)


def test_a_worker_whose_pipe_closed_before_ready_is_named_with_its_exit():
    """Its pipe closed, a child is exiting: the wait for its Ready waits for its exit
    status (it gave that 0.5 s, then said "no Ready report within 30 s" at once)."""
    with pytest.raises(MigrationError, match="exited with status 0") as info:
        ChildSet(_closes_its_pipe_then_exits_slowly, ["slow to exit"])
    assert info.value.channel == "slow to exit"


def _fails_in_its_session(conn):
    def body(pipe, params, stack):
        raise ValueError("the cause it reported")
    run_child(conn, body)


def test_a_worker_that_reported_its_failure_and_exited_is_judged_by_its_report():
    """A child reports its failure, then exits 1. Whoever finds it dead (a send to it
    breaking its pipe, a check that it is alive) must raise the failure it reported:
    a send of Drained to a reassembly process that had just failed said "the worker
    process exited with status 1" and hid the device's error (a CI run)."""
    workers = ChildSet(_fails_in_its_session, ["failing"])
    try:
        child = workers[0]
        child.start_session(None, [])
        child.process.join(30)
        assert child.exitcode == 1
        with pytest.raises(MigrationError, match="ValueError: the cause it reported") as info:
            child.send(Drained())
        assert info.value.channel == "failing"
    finally:
        workers.stop()


def _reports_its_failure_then_exits_slowly(conn):
    """A child that reports its failure and closes its pipe, and whose exit is not
    known for a while (as when the forkserver, which reports it, is slow to run)."""
    def body(pipe, params, stack):
        try:
            raise ValueError("the cause it reported")
        except ValueError as exc:
            pipe.report_failure(exc)
        pipe.conn.close()
        time.sleep(30)
    run_child(conn, body)


def test_a_worker_whose_pipe_broke_is_judged_by_its_report_before_its_exit_is_known():
    """A send to a child that reported its failure and closed its end of the pipe
    raises that failure at once, without waiting for its exit status (it waited a
    second for it, then said "cannot reach the process: Broken pipe")."""
    workers = ChildSet(_reports_its_failure_then_exits_slowly, ["failing"])
    try:
        child = workers[0]
        child.start_session(None, [])
        deadline = time.monotonic() + 30
        with pytest.raises(MigrationError, match="ValueError: the cause it reported") as info:
            while time.monotonic() < deadline:      # until its end of the pipe is closed
                child.send(Drained())
                time.sleep(0.01)
        assert info.value.channel == "failing"
        assert child.exitcode is None, "it exited: not the case this test makes"
    finally:
        workers.kill()
        workers.stop()


@pytest.mark.parametrize("exc, text", [
    (ConnectionResetError(errno.ECONNRESET, "send: Connection reset by peer"),
     "send: Connection reset by peer (ECONNRESET)"),
    (FileExistsError(errno.EEXIST, "File exists", "ram.img.part"),
     "File exists: ram.img.part (EEXIST)"),
    (OSError(4095, "made up"), "made up (errno 4095)"),
    (OSError("no errno"), "OSError: no errno"),
    (MigrationError("no data for 2 s", channel="main channel"), "main channel: no data for 2 s"),
    (ValueError("the cause"), "ValueError: the cause"),
])
def test_a_failure_is_reported_in_words(exc, text):
    """A system call's error in its own words and its errno's name, not Python's
    type and number; a MigrationError as it is; anything else by its type."""
    assert failure_text(exc) == text


@pytest.mark.parametrize("exc, closed", [
    (BrokenPipeError(errno.EPIPE, "send: Broken pipe"), True),
    (OSError(errno.ECONNRESET, "send: Connection reset by peer"), True),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), False),
    (MigrationError("no progress for 2 s (the peer takes no data)"), False),
])
def test_a_failure_says_whether_its_peer_closed_the_connection(exc, closed):
    """A send that met the connection its peer closed (EPIPE, ECONNRESET) is most likely
    the consequence of the peer's failure: the main process then waits for its word."""
    report = Failed.of(exc, "traceback")
    assert (report.peer_closed, report.text) == (closed, failure_text(exc))


def test_the_main_channel_sends_small_messages_at_once():
    """ROUND_END, COMPLETE and LOADED are small: Nagle's algorithm would hold each
    one for the peer's delayed ACK (~40 ms per answer)."""
    with socket.socket() as sock:
        tune_main_socket(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_workers_keep_their_share_until_the_session_closes_then_exit(leaks):
    # After its last report (Done, Eof) a worker tears nothing down until the
    # owner closes: that work is not the migration's to wait for. Closing then
    # ends every one of them, with nothing left over (the leak check).
    image = make_region("ram", 4 * MIB, seed=7)
    try:
        with LoopbackMigration(fastmfd.MigrationConfig(channels=2), [image]) as migration:
            pids = migration.pids()
            migration.run()

            def still_running(result: fastmfd.DestinationResult) -> list[int]:
                assert np.array_equal(result.regions["ram"].array, image.array)
                return [pid for side in ("source", "destination") for pid in pids[side]
                        if alive(pid)]

            workers = pids["source"] + pids["destination"]
            assert migration.finish(still_running).checked == workers
        assert not any(alive(pid) for pid in workers)
    finally:
        image.close()


def _owner(side: str, tmp_path) -> fastmfd.Source | fastmfd.Destination:
    """A Source (nothing listens at its address: it is never asked to migrate) or a
    Destination on a Unix socket (a file that must go with it)."""
    if side == "source":
        return fastmfd.Source("tcp:127.0.0.1:1")
    return fastmfd.Destination(f"unix:{tmp_path}/d.sock", workers=2)


@pytest.mark.parametrize("side", ["source", "destination"])
def test_an_owner_is_entered_once(side, tmp_path, leaks):
    # A nested `with` used to start a second set of workers over the first, which
    # close() then missed (they died later, each printing an EOFError traceback).
    owner = _owner(side, tmp_path)
    name = type(owner).__name__
    with owner:
        pids = owner.worker_pids()
        with pytest.raises(ConfigError, match=f"this {name} was entered already"):
            with owner:
                pass
        assert owner.worker_pids() == pids
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(ConfigError, match=f"a {name} is entered once"):
        owner.__enter__()
    assert owner.worker_pids() == []


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_closed_owner_is_not_entered(side, tmp_path, leaks):
    # Entered after close(), it started its workers again; and receive() on a closed
    # Destination said "use the Destination as a context manager".
    owner = _owner(side, tmp_path)
    name = type(owner).__name__
    owner.close()
    with pytest.raises(ConfigError, match=f"^this {name} was closed: make a new one$"):
        with owner:
            pytest.fail(f"entered; its workers: {owner.worker_pids()}")
    assert owner.worker_pids() == []
    call = owner.migrate if side == "source" else owner.receive
    with pytest.raises(ConfigError, match=f"^this {name} was closed: make a new one$"):
        call()


def _freed(pids: list[int], segments: list[str], path=None, within: float = 10) -> bool:
    """Wait (up to ``within`` s) until no worker in ``pids`` lives, no segment in
    ``segments`` is linked and the socket file ``path`` (if given) is gone: a
    collection's finalizer frees from a thread of its own."""
    deadline = time.monotonic() + within
    while set(segments) & set(list_segments()) or any(alive(pid) for pid in pids) \
            or (path is not None and path.exists()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("side", ["source", "destination"])
def test_an_owner_collected_unclosed_frees_what_it_holds(side, tmp_path, leaks):
    # Dropped without close(), an entered owner kept its /dev/shm segments until
    # the interpreter's exit. Now its finalizer frees everything, saying so.
    owner = _owner(side, tmp_path).__enter__()
    pids = owner.worker_pids()
    parts = getattr(owner, "_parts", None)        # the source's shared structures
    held = [] if parts is None else [parts.counters.name, parts.ram_selector.name,
                                     parts.mailbox_shm.name]
    assert pids and set(held) <= set(list_segments())
    with pytest.warns(ResourceWarning, match=f"unclosed fastmfd.{type(owner).__name__}"):
        del owner, parts
        gc.collect()
    assert _freed(pids, held, tmp_path / "d.sock")


@pytest.mark.parametrize("side", ["source", "destination"])
def test_an_owner_collected_unclosed_after_its_session_call_frees_what_it_holds(
        side, tmp_path, leaks):
    # Its session (kept by the finalizer) led back to it: the Destination's through
    # the on_setup hook, the Source's through its failure's traceback. It was then
    # freed only at the interpreter's exit: the listener accepting, segments kept.
    owner = _owner(side, tmp_path).__enter__()
    pids = owner.worker_pids()
    if isinstance(owner, fastmfd.Source):
        with make_region("r", 1 << 20) as ram:
            owner.add_region(ram)
            with pytest.raises(MigrationError):
                owner.migrate(live=False)       # nothing listens at its address
        held = [owner._parts.counters.name, owner._parts.mailbox_shm.name]
    else:
        owner.timeout = 0.2
        with pytest.raises(MigrationError):
            owner.receive()                     # no source comes
        held = []
    assert set(held) <= set(list_segments())
    with pytest.warns(ResourceWarning, match=f"unclosed fastmfd.{type(owner).__name__}"):
        del owner
        gc.collect()
    assert _freed(pids, held, tmp_path / "d.sock")


def test_an_owner_collected_by_a_gc_pass_inside_the_resource_tracker_frees_all(leaks):
    # A cyclic collection runs finalizers in whatever thread it interrupts. In one
    # interrupting multiprocessing's resource tracker (a segment being created),
    # the finalizer's unregister was a reentrant call: Python 3.11.7 skips it,
    # warning that each segment "might leak" (and the tracker keeps its name);
    # earlier 3.11s raised, leaving the rest of the owner behind. A collection's
    # finalizer now frees the owner from a thread of its own. (Holding the
    # tracker's lock around gc.collect() is that interruption.)
    from multiprocessing import resource_tracker
    owner = fastmfd.Source("tcp:127.0.0.1:1").__enter__()
    owner.cycle = owner                             # only a cyclic collection frees it
    pids = owner.worker_pids()
    held = [owner._parts.counters.name, owner._parts.ram_selector.name,
            owner._parts.mailbox_shm.name]
    del owner
    unraisable = []
    previous, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with pytest.warns(ResourceWarning, match="unclosed fastmfd.Source") as said:
            with resource_tracker._resource_tracker._lock:
                gc.collect()
        freed = _freed(pids, held)
    finally:
        sys.unraisablehook = previous
    assert unraisable == []
    assert [str(w.message) for w in said if w.category is not ResourceWarning] == []
    assert freed


def test_a_fork_of_an_owner_s_process_leaves_its_resources_alone(tmp_path, leaks):
    # A child forked from the owner's process runs the owner's finalizer at its
    # exit too: it shut the parent's sockets and stopped the parent's workers.
    with fastmfd.Source("tcp:127.0.0.1:1") as owner:
        pids = owner.worker_pids()
        child = os.fork()
        if child == 0:
            os._exit(_exit_as_a_fork_does())
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert all(alive(pid) for pid in pids)


def test_a_fork_leaving_an_owner_s_with_leaves_its_resources_alone(leaks):
    # A child forked inside the owner's `with` leaves it too when it exits normally:
    # its close() stopped the parent's workers and unlinked the parent's segments.
    with fastmfd.Source("tcp:127.0.0.1:1") as owner:
        pids = owner.worker_pids()
        held = [owner._parts.counters.name, owner._parts.ram_selector.name,
                owner._parts.mailbox_shm.name]
        child = os.fork()
        if child == 0:
            os._exit(_use_then_leave(owner))
        _, status = os.waitpid(child, 0)
        assert all(alive(pid) for pid in pids)
        assert set(held) <= set(list_segments())
        assert os.waitstatus_to_exitcode(status) == 0


def _use_then_leave(owner: fastmfd.Source) -> int:
    """In a forked child: 0 if ``owner``'s migrate() is refused as the parent's and its
    close() raises nothing (a failure's status otherwise, never an exception)."""
    try:
        owner.migrate()
    except ConfigError as exc:
        refused = "was forked from" in str(exc)
    except BaseException:
        refused = False
    try:
        owner.close()
    except BaseException:
        return 2
    return 0 if refused else 1


def _exit_as_a_fork_does() -> int:
    """Run, in a forked child, the finalizers an exiting interpreter runs (only
    fastmfd's: a whole exit, multiprocessing's handler too, is test_forked_child's)."""
    import weakref
    for finalizer in list(weakref.finalize._registry):       # type: ignore[attr-defined]
        info = finalizer.peek()
        if info is not None and getattr(info[1], "__name__", "") == "_free_unclosed":
            finalizer()
    return 0


def test_a_worker_whose_owner_is_gone_exits_quietly():
    # Its end of the control pipe closed without a Stop (the owner collected, or
    # its process gone): it exits at once, status 0, not 1 with an EOFError traceback.
    workers = ChildSet(send_worker_main, ["send channel 0"])
    try:
        workers[0].conn.close()
        workers[0].process.join(10)
        assert workers[0].exitcode == 0
    finally:
        workers.stop()
