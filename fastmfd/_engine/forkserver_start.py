"""Starting a child through multiprocessing's forkserver, fastmfd's way.

The forkserver preloads fastmfd (a child starts in milliseconds), starts
without the current directory on its import path (:mod:`fastmfd.safe_path`),
and a child it starts never imports the caller's ``__main__``. Its answer to
each start has a deadline: a stopped or blocked forkserver answers nothing,
and the start would wait for it for ever.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import (connection, forkserver, popen_forkserver, process, reduction, spawn,
                             util)
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from typing import Any, Iterator

from ..errors import ConfigError, MigrationError
from ..safe_path import safe_import_path
from ..shm import start_tracker
from .control_pickling import MAIN_KEYS
from .liveness import process_stopped
from .open_files import FORK_FAILED, PROCESS_LIMIT

__all__ = ["mp_context", "interrupts_deferred", "ForkServerChild", "READY_TIMEOUT",
           "forkserver_pid", "stopped_forkserver", "forkserver_ended", "forkserver_ended_within",
           "leave_to_the_forkserver", "forkserver_failure", "describe_exit"]

# Imported once by the forkserver, so a child starts in milliseconds.
# _fastmfd_forkserver first: it gives the forkserver its parent's import path.
_PRELOAD = ["_fastmfd_forkserver", "fastmfd._engine.workers", "fastmfd._engine.reassembly",
            "fastmfd._engine.forkserver_exit"]
READY_TIMEOUT = 30.0                # seconds a child may take to start
FORKSERVER_EXIT_WAIT = 2.0          # seconds for a forkserver that ended to say how


def mp_context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, preloading fastmfd.

    The forkserver starts the resource tracker if nothing did yet: started
    here first, it is fastmfd's quiet one (shm.start_tracker)."""
    start_tracker()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    # Started with SIGINT and SIGHUP blocked, which it inherits: a Ctrl-C or a hangup
    # (a terminal signals its whole process group) before its first preload
    # (_fastmfd_forkserver) ignores them waits, and is dropped then. This process
    # meets its own once the block ends.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGHUP})
    try:
        _leave_the_parents_temp_dir()
        _check_temp_dir()
        # Started here, not by a child's start (see safe_path)
        with safe_import_path():
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return ctx


def _check_temp_dir() -> None:
    """ConfigError unless a temporary directory is there for the forkserver's socket
    (multiprocessing makes its pymp-* directory in one): on a read-only root without
    a writable /tmp, Python's "No usable temporary directory found in [...]" said
    neither what it was for nor what to do."""
    try:
        util.get_temp_dir()
    except FileNotFoundError:
        raise ConfigError("no usable temporary directory (TMPDIR, /tmp, /var/tmp, /usr/tmp, "
                          "the current directory: none writable): fastmfd's worker processes "
                          "need one for multiprocessing's forkserver socket; set TMPDIR to a "
                          "writable directory") from None


# The temporary directory (pymp-*) of the process this one was forked from: the
# forkserver's socket goes there, and it is the parent's, removed at its exit.
_parents_temp_dir: str | None = None


def _forget_the_parents_processes() -> None:
    """Run in a child just forked from this process (``os.fork()``, multiprocessing's
    'fork'): multiprocessing's state, copied, still calls the parent's forkserver
    and workers this process's.

    - Its workers leave multiprocessing's children: that module's exit handler,
      run at the child's normal exit, SIGTERMs every daemonic child it knows,
      which killed the parent's workers under a running session.
    - The forkserver is forgotten: multiprocessing waits on its pid to see it
      runs (``ChildProcessError`` in a child, whose child it is not), and the
      inherited end of its "alive" pipe kept it running after the parent's exit.
      The child starts its own, in its own temporary directory
      (:func:`_leave_the_parents_temp_dir`), when it uses fastmfd.
    """
    global _parents_temp_dir
    _parents_temp_dir = _process_config().get("tempdir")
    # multiprocessing.process._children: the set that handler walks (not public API).
    children: set[process.BaseProcess] = getattr(process, "_children", set())
    children.difference_update([c for c in children if isinstance(c, ForkServerChild)])
    # CPython's private ForkServer state, not in typeshed:
    server: Any = forkserver._forkserver
    if server._forkserver_pid is None:
        return              # none inherited (the forkserver forking a worker, say)
    try:
        os.close(server._forkserver_alive_fd)
    except OSError:
        pass
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    # A thread of the parent's starting a worker held it at the fork: held for ever here.
    server._lock = threading.Lock()


def _leave_the_parents_temp_dir() -> None:
    """Before a forked child starts its own forkserver: put its socket in a
    directory of the child's, not in the parent's, whose exit removes it (the
    child could start no worker then), and which the child's forkserver would
    remove at its own end (:mod:`.forkserver_exit`), under the parent's."""
    # multiprocessing's own 'fork' child copied its config before the fork, so
    # it is looked at here, in whichever process is current by now.
    config = _process_config()
    if _parents_temp_dir is not None and config.get("tempdir") == _parents_temp_dir:
        del config["tempdir"]


def _process_config() -> dict[str, Any]:
    """The current process's multiprocessing settings, its temporary directory's
    among them (CPython's private state, not in typeshed)."""
    config: dict[str, Any] = process.current_process()._config  # type: ignore[attr-defined]
    return config


os.register_at_fork(after_in_child=_forget_the_parents_processes)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C (or a SIGTERM or SIGHUP the CLI raises as an exception) during the
    block is handled at its end, by the handler it would have met: a child's start
    interrupted half-way left it to fail on start data it could not read
    (``EOFError: Ran out of input``, its traceback printed), or its pid unknown,
    to kill before this process exits. Only the main thread sets handlers, and
    only a Python function can be put back: otherwise a signal is handled as ever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    deferred = [sig for sig, handler in previous.items() if callable(handler)]
    came: list[int] = []
    for sig in deferred:
        signal.signal(sig, lambda number, _: came.append(number))
    try:
        yield
    finally:
        for sig in deferred:
            signal.signal(sig, previous[sig])
        for number in dict.fromkeys(came):
            signal.raise_signal(number)


class _PopenWithoutMain(popen_forkserver.Popen):
    """multiprocessing's forkserver launch, less the caller's ``__main__``.

    multiprocessing's children re-import the caller's main module before they
    run (to find a target defined there); fastmfd's targets never are, and the
    import re-ran an unguarded script in every worker and failed on ``python -``
    (``<stdin>`` is no file). The preparation data says where the main module
    is: it is kept on the process object instead, for a message that names
    ``__main__`` (:mod:`.control_pickling`). This is
    ``popen_forkserver.Popen._launch`` (CPython 3.11-3.13) with that change and one
    more: the forkserver's answer has a deadline (a stopped or blocked one never answers).
    """

    def _launch(self, process_obj: ForkServerChild) -> None:
        prep_data = spawn.get_preparation_data(process_obj.name)
        process_obj.callers_main = {k: prep_data.pop(k) for k in MAIN_KEYS if k in prep_data}
        buf = io.BytesIO()
        set_spawning_popen(self)        # popen_forkserver's is this one, imported
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        # _fds and close_fds are CPython's, private, so not in typeshed:
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        _parent_w = os.dup(w)       # the child's "parent sentinel", as in the original
        self.finalizer = util.Finalize(self, util.close_fds,  # type: ignore[attr-defined]
                                       (_parent_w, self.sentinel))
        try:
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
        except (BrokenPipeError, ConnectionResetError):
            # It ended as it took the request (its fork failed): said as below. The
            # CLI took a BrokenPipeError for its output's reader gone: exit 1, silent.
            raise forkserver_gone(process_obj.name) from None
        if not connection.wait([self.sentinel], process_obj.start_timeout):
            raise forkserver_failure(process_obj.name, process_obj.start_timeout)
        try:
            self.pid = forkserver.read_signed(self.sentinel)
        except EOFError:        # it ended instead of answering: "unexpected EOF" said nothing
            raise forkserver_gone(process_obj.name) from None


class ForkServerChild(ForkServerProcess):
    callers_main: dict[str, str] = {}
    start_timeout = READY_TIMEOUT       # seconds the forkserver may take to fork it

    def start(self) -> None:
        with interrupts_deferred():     # a Ctrl-C, SIGTERM, SIGHUP: raised once it started
            super().start()

    # Narrower than ForkServerProcess's (any process): it is only ever given itself.
    @staticmethod
    def _Popen(process_obj: ForkServerChild) -> _PopenWithoutMain:       # type: ignore[override]
        return _PopenWithoutMain(process_obj)


def forkserver_pid() -> int | None:
    """In a child of fastmfd's forkserver, the forkserver's pid, noted before it forked
    (``_fastmfd_forkserver``, its first preload); None in a child of a forkserver the
    program started itself, without fastmfd's preloads."""
    pid = getattr(sys.modules.get("_fastmfd_forkserver"), "FORKSERVER_PID", None)
    return pid if isinstance(pid, int) else None


def stopped_forkserver() -> int | None:
    """The pid of multiprocessing's forkserver if it is stopped (SIGSTOP), else None:
    stopped, it answers no start and reports no exit of its children."""
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return server if process_stopped(server) else None


def forkserver_ended() -> tuple[int, int] | None:
    """multiprocessing's forkserver's pid and exit status (negative: the signal that
    killed it) once it ended, None while it runs. Looked at, not reaped: reaping it
    is multiprocessing's, which starts the next one then (ForkServer.ensure_running)."""
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server is None:
        return None
    try:
        ended = os.waitid(os.P_PID, server, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:       # reaped already: a new one is started
        return None
    if ended is None:
        return None
    killed = ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    return server, -ended.si_status if killed else ended.si_status


def forkserver_ended_within(seconds: float) -> tuple[int, int] | None:
    """:func:`forkserver_ended`, waited for up to ``seconds``: the pipes of a
    forkserver that exits close a moment before the kernel has it ended, and a
    look in between found it running (it said "exited with status 255" where its
    kill was the cause: 4 runs in 40 under load)."""
    deadline = time.monotonic() + seconds
    while (ended := forkserver_ended()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return ended


def describe_exit(code: int | None) -> str:
    """How a process with exit status ``code`` (None: still running) ended, in words."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def leave_to_the_forkserver(child: multiprocessing.process.BaseProcess) -> None:
    """Stop waiting for ``child``, killed but its exit not reported (the forkserver
    is stopped or blocked): multiprocessing's exit handler joins every child it
    knows, without a deadline, so this interpreter would never exit. The
    forkserver reaps it whenever it runs again, or init once it is gone."""
    # multiprocessing.process._children: the set that handler walks (not public API).
    getattr(multiprocessing.process, "_children", set()).discard(child)


def forkserver_gone(name: str) -> MigrationError:
    """The forkserver ended as it was to start ``name``: how, once its exit is known
    (it exits at once: :mod:`.forkserver_exit`). Its fork failed for want of a
    process, the likeliest: said with the limit to raise."""
    ended = forkserver_ended_within(FORKSERVER_EXIT_WAIT)
    if ended is None:
        how = "ended before it answered"
    elif ended[1] == FORK_FAILED:
        how = f"could not fork it: {PROCESS_LIMIT}"
    else:
        how = f"{describe_exit(ended[1])} before it answered"
    return _not_started(name, how)


def forkserver_failure(name: str, waited: float | None = None) -> MigrationError:
    """The forkserver did not start ``name``: it is stopped, or did not answer in ``waited``."""
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return _not_started(name, f"did not start it within {waited:g} s"
                        if waited and not process_stopped(server) else "is stopped")


def _not_started(name: str, how: str) -> MigrationError:
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return MigrationError(f"cannot start the process: multiprocessing's forkserver (pid "
                          f"{server}) {how}", channel=name)
