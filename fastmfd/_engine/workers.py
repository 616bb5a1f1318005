"""Worker processes: one per channel on each side, owned by a :class:`WorkerSet`.

::

    Source / Destination main process                worker process (forkserver child)
      WorkerSet.start()  ─────────── spawn ─────────▶  worker_main(conn)
      worker.start_session(session, fds) ── conn ──▶     session = conn.recv(); fds by SCM_RIGHTS
                                                         send: SendEngine.run(cmd_fd)
                                                         recv: loop RecvEngine.run():
      WorkerSet.events() ◀── ("sync", n) ─────────────       at a SYNC: report, wait for "go"
                        ─── ("go", n) ────────────────▶
                        ◀── ("done"|"eof", totals) ───     end
                        ◀── ("error", text, traceback)     any failure, then exit(1)

The control connection carries only session setup and per-round events
(pickled, never per packet). Workers ignore SIGINT (the main process owns
the teardown), die with their parent (PR_SET_PDEATHSIG through the
forkserver chain), and are started before the timed part of a migration.
The WorkerSet is the one owner: it joins or kills every worker on every
exit path, and turns a worker that died into an error with its exit status
instead of a hang (loky's habit).
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import time
import traceback
from multiprocessing import connection, reduction

from .. import _core
from ..errors import MigrationError
from ..shm import SharedMemory

__all__ = ["WorkerSet", "Worker", "RemoteTraceback", "mp_context"]

_PRELOAD = ["fastmfd._engine.workers"]
READY_TIMEOUT = 30.0        # seconds a worker may take to start


def mp_context() -> multiprocessing.context.BaseContext:
    """The forkserver context, preloading fastmfd so a worker starts in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text}\"\"\""


def describe_exit(process: multiprocessing.Process) -> str:
    code = process.exitcode
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Worker:
    """One worker process and the main process's end of its control connection."""

    def __init__(self, ctx, target, name: str) -> None:
        self.name = name
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=target, args=(child,), name=name, daemon=True)
        self.process.start()
        child.close()
        self.finished = False          # reported "done"/"eof": its exit is expected

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def next_report(self) -> tuple | None:
        """The worker's next report if one is waiting, else None (also once it is gone)."""
        try:
            return self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the worker's "ready": started, imported, waiting for a session.

        So a Source or Destination is entered only once its workers are up,
        and none of their start-up runs inside a timed migration.
        """
        ready = connection.wait([self.conn, self.sentinel], timeout)
        if self.conn in ready:
            try:
                if self.conn.recv() == ("ready",):
                    return
            except (EOFError, OSError):
                pass
        self.process.join(0.5)
        if self.process.exitcode is not None:
            raise self.death_error()
        raise MigrationError(f"the worker process did not start within {timeout:g} s",
                             channel=self.name)

    def start_session(self, session: dict, fds: list[int]) -> None:
        """Send the session description, then the file descriptors it needs."""
        try:
            self.conn.send(session)
            for fd in fds:
                reduction.send_handle(self.conn, fd, self.process.pid)
        except OSError as exc:
            # A broken pipe means the worker is gone: say what became of it.
            self.process.join(1)
            if self.process.exitcode is not None:
                raise self.death_error() from None
            raise MigrationError(f"cannot hand the session to the worker: "
                                 f"{exc.strerror or exc}", channel=self.name) from None

    def error_from(self, message: tuple) -> MigrationError:
        _, text, remote = message
        error = MigrationError(text, channel=self.name)
        error.__cause__ = RemoteTraceback(remote)
        return error

    def death_error(self) -> MigrationError:
        return MigrationError(f"the worker process {describe_exit(self.process)}",
                              channel=self.name)


class WorkerSet:
    """Starts, watches and stops a group of workers running ``target``."""

    def __init__(self, target, names: list[str]) -> None:
        ctx = mp_context()
        self._lock = threading.Lock()
        self.workers: list[Worker] = []
        try:
            for name in names:
                self.workers.append(Worker(ctx, target, name))
            for worker in self.workers:
                worker.wait_ready()
        except BaseException:
            self.kill()
            self._close_pipes()
            raise

    def __iter__(self):
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, index: int) -> Worker:
        return self.workers[index]

    def add(self, target, name: str) -> Worker:
        worker = Worker(mp_context(), target, name)
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def stop(self, timeout: float = 2.0) -> None:
        """Tell idle workers to exit, wait up to ``timeout`` for all of them, kill what
        is left, close the pipes."""
        for worker in self.workers:
            if worker.process.exitcode is None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        # wait() returns at the first exit (and sleeps its whole timeout on an
        # empty list), so loop until every worker is gone or time is up.
        while running := [w.sentinel for w in self.workers if w.process.exitcode is None]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            connection.wait(running, left)
        self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for worker in self.workers:
            worker.conn.close()

    def kill(self) -> None:
        """Kill every worker still running and reap them all (any thread, idempotent)."""
        with self._lock:
            for worker in self.workers:
                if worker.process.exitcode is None:
                    worker.process.kill()
            for worker in self.workers:
                worker.process.join(timeout=5)


# ------------------------------------------------------------------ worker side

def worker_setup(conn=None) -> None:
    """First thing in a child: ignore Ctrl-C (the main process tears down), die
    with the parent, and (a WorkerSet's worker, given ``conn``) say it is up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _core.die_with_parent()
    if conn is not None:
        conn.send(("ready",))


def _report_failure(conn, exc: BaseException) -> None:
    try:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    except OSError:
        pass


def _attach_session(session: dict, stack: list) -> tuple[list, "_core.Counters", object]:
    """Map the session's regions, counters and pool; remember them for closing."""
    from ..regions import Region
    regions = [Region.attach(h, populate=session.get("populate", False))
               for h in session["regions"]]
    stack.extend(regions)
    counters = _core.Counters.attach(session["counters"])
    stack.append(counters)
    pool = None
    if session.get("pool"):
        pool = _core.BufferPool.attach(session["pool"])
        stack.append(pool)
    return regions, counters, pool


def _close_all(stack: list) -> None:
    for item in reversed(stack):
        try:
            item.close()
        except Exception:
            pass


def _run_session(conn, body) -> None:
    """A worker's life: report ready, take one session, run ``body(conn, session,
    stack)``, close what it attached (``stack``), report an error and exit 1 on
    failure. Told ``None`` instead of a session, it just exits."""
    worker_setup(conn)
    session = conn.recv()
    if session is None:
        return
    stack: list = []
    failed = False
    try:
        body(conn, session, stack)
    except BaseException as exc:
        _report_failure(conn, exc)
        failed = True
    finally:
        _close_all(stack)
    if failed:
        sys.exit(1)


def _send_session(conn, session: dict, stack: list) -> None:
    sock_fd = reduction.recv_handle(conn)
    cmd_fd = reduction.recv_handle(conn)
    regions, counters, pool = _attach_session(session, stack)
    selector = _core.ChannelSelector.attach(session["selector"])
    stack.append(selector)
    mailbox = SharedMemory.attach(session["mailbox"])
    stack.append(mailbox)
    row_bytes = session["job_pages"] * 8
    box = mailbox.buf[session["mailbox_row"] * row_bytes:][:row_bytes]
    codec = _core.make_codec(session["compression"], True, session["compression_level"])
    engine = _core.SendEngine(sock_fd, session["channel"], session, codec, regions, counters,
                              selector, session["selector_index"], box, pool,
                              session["devices"])
    engine.run(cmd_fd)
    del engine, box         # views of the mailbox must go before it closes
    conn.send(("done", None))


def _recv_session(conn, session: dict, stack: list) -> None:
    sock_fd = reduction.recv_handle(conn)
    reassembly_fd = reduction.recv_handle(conn) if session.get("pool") else -1
    regions, counters, pool = _attach_session(session, stack)
    received = [_core.DirtyBitmap.attach(name) for name in session["received"]]
    stack.extend(received)
    codec = _core.make_codec(session["compression"], False)
    engine = _core.RecvEngine(sock_fd, session["channel"], session, codec, regions, counters,
                              received, session["fresh"], pool, session["devices"],
                              reassembly_fd, session["ram"])
    while engine.run() == _core.EVENT_SYNC:
        conn.send(("sync", engine.rounds))
        if conn.recv() is None:
            break
    del engine
    conn.send(("eof", None))


def send_worker_main(conn) -> None:
    """A send worker: runs one channel's SendEngine for one session."""
    _run_session(conn, _send_session)


def recv_worker_main(conn) -> None:
    """A receive worker: runs one channel's RecvEngine, holding at each SYNC."""
    _run_session(conn, _recv_session)
