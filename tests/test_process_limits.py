"""At the process limit (cgroup pids.max, RLIMIT_NPROC): what cannot start a
process or a thread fails once, naming the limit, and frees what it held.

The CLI tests run ``fastmfd`` for real in a child cgroup with a low pids.max
(root and a writable pids controller, cgroup v1 or v2; skipped otherwise). The
thread tests make one named thread's start raise what CPython raises at the
limit, RuntimeError("can't start new thread"), as the limit does in a real run
at whichever thread comes first."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from multiprocessing import forkserver
from pathlib import Path

import pytest

import fastmfd
from fastmfd._engine.forkserver_start import mp_context
from fastmfd._engine.open_files import PROCESS_LIMIT
from fastmfd._engine.processes import Child
from fastmfd._engine.workers import recv_worker_main
from fastmfd.threads import THREAD_LIMIT
from listen_support import REPO


# What fastmfd sets unless the user did: unset for the command tests, as a user's shell has.
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
# The console script's entry (python -m fastmfd goes through fastmfd/__init__.py).
CONSOLE_SCRIPT = ("-c", "import sys, _fastmfd_cli; sys.argv[0] = 'fastmfd'; "
                  "sys.exit(_fastmfd_cli.main())")


def _pids_cgroup_parent() -> Path | None:
    """Where a child cgroup with a pids.max can be made here, None if nowhere."""
    root = Path("/sys/fs/cgroup")
    v2 = root / "cgroup.controllers"
    if v2.exists():
        return root if "pids" in v2.read_text().split() else None
    return root / "pids" if (root / "pids" / "pids.max").exists() or \
        (root / "pids" / "cgroup.procs").exists() else None


@pytest.fixture
def pids_limited():
    """``run(limit, *args)``: ``python -m fastmfd ARGS`` in a child cgroup of
    pids.max ``limit`` (every process and thread counts); the cgroup is removed
    once its processes are gone."""
    parent = _pids_cgroup_parent()
    if os.geteuid() != 0 or parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs root and a writable cgroup pids controller (v1 or v2)")
    made: list[Path] = []

    def run(limit: int, *args: str, timeout: float = 120,
            command: tuple[str, ...] = ("-m", "fastmfd")) -> subprocess.CompletedProcess:
        group = parent / f"fastmfd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        made.append(group)
        (group / "pids.max").write_text(str(limit))
        procs = str(group / "cgroup.procs")

        def enter() -> None:        # in the child, before it runs Python
            with open(procs, "w") as f:
                f.write("0")
        env = {k: v for k, v in os.environ.items() if k not in BLAS_THREADS}
        env["PYTHONPATH"] = str(REPO)
        return subprocess.run([sys.executable, *command, *args], env=env,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=enter)
    yield run
    for group in made:
        for _ in range(200):        # its processes' exits are reaped a little later
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"{group}: processes left in it")


def test_listen_forever_ends_on_a_failure_before_any_source(pids_limited, tmp_path):
    """Its workers cannot start (the reassembly's thread, here): there is no
    source, so it is no session; retried, it failed again at once, hundreds of
    times a second, forever."""
    done = pids_limited(12, "listen", f"unix:{tmp_path}/sock", "--dir", str(tmp_path / "out"),
                        "--forever", timeout=30)
    assert done.returncode == 1, done.stderr
    assert "session failed" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fastmfd listen: "), done.stderr


@pytest.mark.parametrize("limit", [6, 8, 10, 11, 12, 13])
def test_listen_at_the_process_limit_says_so_in_one_line(pids_limited, tmp_path, limit):
    """Whatever comes first at the limit (here, with no BLAS thread: a fork at 6, 8
    and 11, a worker's thread at 10 and 12, the accept thread at 13), one line.
    A worker that cannot start its watchdog thread reported nothing: "the worker
    process exited with status 1", after multiprocessing's traceback of it. A fork
    the forkserver cannot make ended it with its traceback, and the answer read
    was "EOFError: unexpected EOF", with the command's traceback."""
    done = pids_limited(limit, "listen", f"unix:{tmp_path}/sock", "--dir",
                        str(tmp_path / "out"), "--timeout", "3")
    assert done.returncode == 1, done.stderr
    said = done.stderr.split("fastmfd listen: ")     # (after "listening on ...", if it is)
    assert len(said) == 2 and "\n" not in said[1].strip(), done.stderr
    assert PROCESS_LIMIT in said[1] or THREAD_LIMIT in said[1], done.stderr


@contextlib.contextmanager
def thread_refused(name: str, times: int | None = None):
    """``threading.Thread.start`` of a thread named ``name`` raises what CPython
    raises when the kernel refuses a thread (the first ``times``; None: every one)."""
    start = threading.Thread.start
    refused: list[threading.Thread] = []

    def limited(thread: threading.Thread) -> None:
        if thread.name == name and (times is None or len(refused) < times):
            refused.append(thread)
            raise RuntimeError("can't start new thread")
        start(thread)
    threading.Thread.start = limited        # type: ignore[method-assign]
    try:
        yield refused
    finally:
        threading.Thread.start = start      # type: ignore[method-assign]


def _receive(dst: fastmfd.Destination, outcome: list[BaseException]) -> None:
    try:
        dst.receive()
    except fastmfd.FastMFDError as exc:
        outcome.append(exc)


def test_a_source_whose_monitor_cannot_start_names_the_limit_and_frees_all(leaks):
    """The monitor was kept before it started: close() joined a thread that never
    ran, raised "cannot join thread before it is started" in place of the cause,
    and stopped there: the source's segments and descriptors stayed."""
    with fastmfd.Region.create("ram", 4 << 20) as ram, \
            fastmfd.Destination("tcp:127.0.0.1:0", timeout=60) as dst:
        failed: list[BaseException] = []
        receiver = threading.Thread(target=_receive, args=(dst, []))
        receiver.start()
        with thread_refused("fastmfd source monitor") as refused:
            try:
                with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=2)) as src:
                    src.add_region(ram)
                    src.migrate(live=False)
            except fastmfd.MigrationError as exc:
                failed.append(exc)
        receiver.join()
    assert refused and failed, "the source did not fail"
    assert str(failed[0]) == ("main channel: cannot start a thread (fastmfd source monitor): "
                              f"{THREAD_LIMIT}")
    leaks.assert_clean()


def test_a_destination_that_cannot_greet_fails_at_once_naming_the_limit():
    """The accept thread died ("Exception in thread fastmfd admission"): nobody was
    accepted any more, and receive() waited its whole timeout (an hour for
    ``listen``), then raised "cannot join thread before it is started"."""
    with fastmfd.Region.create("ram", 4 << 20) as ram, thread_refused("fastmfd greeting", 1), \
            fastmfd.Destination("tcp:127.0.0.1:0", timeout=120) as dst:
        outcome: list[BaseException] = []
        receiver = threading.Thread(target=_receive, args=(dst, outcome))
        receiver.start()
        with pytest.raises(fastmfd.MigrationError) as told:
            with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
                src.add_region(ram)
                src.migrate(live=False)
        receiver.join()
    expected = f"main channel: cannot start a thread (fastmfd greeting): {THREAD_LIMIT}"
    assert [str(e) for e in outcome] == [expected]
    assert expected in str(told.value)


needs_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2,
                                 reason="OpenBLAS starts no thread on one core")


@needs_cores
@pytest.mark.parametrize("command", [("-m", "fastmfd"), CONSOLE_SCRIPT],
                         ids=["python -m fastmfd", "console script"])
def test_numpy_starts_no_blas_thread_for_the_command(pids_limited, command):
    """pids.max 1: the main thread alone. OpenBLAS could not start its thread at
    numpy's import and raised SIGINT: "fastmfd: interrupted", exit 130, for what
    is a missing file (exit 2)."""
    done = pids_limited(1, "send", "tcp:127.0.0.1:9", "ram=/nonexistent", command=command)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("fastmfd send: region 'ram': cannot open /nonexistent: "
                           "No such file or directory\n")


def test_a_forkserver_gone_as_it_takes_a_request_is_said(monkeypatch):
    """At the limit, the forkserver's fork fails as it takes a request, and it ends
    with the request's bytes unread: writing them broke (EPIPE). The CLI took that
    BrokenPipeError for its output's reader gone: exit 1, nothing said (about one
    listen in 12 at pids.max 6). Here the request goes to a pipe already closed."""
    def closed_at_once(fds: list[int]) -> tuple[int, int]:
        answer_r, answer_w = os.pipe()
        request_r, request_w = os.pipe()
        os.close(request_r)
        opened.append(answer_w)
        return answer_r, request_w
    opened: list[int] = []
    ctx = mp_context()
    monkeypatch.setattr(forkserver, "connect_to_new_process", closed_at_once)
    try:
        with pytest.raises(fastmfd.MigrationError) as told:
            Child(ctx, recv_worker_main, "receive channel 0")
    finally:
        for fd in opened:
            os.close(fd)
    assert str(told.value).startswith("receive channel 0: cannot start the process: "
                                      "multiprocessing's forkserver (pid ")


# In a process run by pids_limited: cap() makes its cgroup's pids.max its pids.current
# (+ ``room``), so that the kernel refuses the next thread (or process) it starts: a
# real limit, met by the thread the code starts next.
CAP = """
import os
def cap(room=0):
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.rstrip("\\n").split(":", 2)
        if controllers == "" if v2 else "pids" in controllers.split(","):
            group = ("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/pids") + path
    with open(f"{group}/pids.max", "w") as limit:
        limit.write(str(int(open(f"{group}/pids.current").read()) + room))
"""


def _said(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize("name, code", [
    ("progress bar", """
from fastmfd._engine.progress import RoundProgress
bar = RoundProgress(enabled=True, regions=[], pages_done=lambda: 0)
cap()
bar.__enter__()
"""),
    ("fastmfd status", """
from fastmfd.tools.transfer import _StatusStream
class Status:
    def status(self):
        return {}
stream = _StatusStream(Status(), print, 1.0)
cap()
stream.__enter__()
"""),
    ("fastmfd loopback destination", """
import fastmfd
from fastmfd.tools.loopback import LoopbackMigration
with fastmfd.Region.create("ram", 1 << 20) as ram:
    migration = LoopbackMigration(fastmfd.MigrationConfig(channels=1), [ram])
    try:
        cap()
        migration.run()
    except fastmfd.MigrationError as exc:
        print(exc)
    migration.close()
    print("closed")
"""),
    ("bench cpu meter", """
from fastmfd.tools.bench.trial import CpuMeter
cap()
CpuMeter({"source": []}, complete=False)
"""),
    ("fastmfd uninterruptible step", """
import fastmfd
from fastmfd.tools.whole import run_whole
cap()
try:
    run_whole(lambda: print("ran"))
except fastmfd.MigrationError as exc:
    print(exc)
"""),
], ids=["progress", "status", "loopback", "cpu meter", "whole step"])
def test_a_helper_thread_refused_at_the_limit_names_it(pids_limited, name, code):
    """Threads besides a session's (the progress bar's, rich's own; the command's
    --status-json reports; demo's and bench's loopback destination; bench's CPU
    meter; the thread bench --link runs each ip and tc command in, whole) said
    Python's bare "can't start new thread" at a real limit."""
    run = ("import sys, fastmfd\n" + CAP + "try:\n" + textwrap.indent(code, "    ")
           + "except fastmfd.MigrationError as exc:\n    print(exc)\n")
    done = pids_limited(100, command=("-c", run), timeout=60)
    assert done.returncode == 0, done.stderr
    said = _said(done)
    assert said[0] == f"cannot start a thread ({name}): {THREAD_LIMIT}", done.stdout
    assert said[1:] in ([], ["closed"]), done.stdout


def test_warm_files_without_a_thread_are_none(pids_limited, tmp_path):
    """A refill whose thread the limit refuses is a warm file not made, as where the
    disk is full (a warning): it raised the bare RuntimeError out of listen's loop,
    and close() then joined the thread that never ran ("cannot join thread before
    it is started")."""
    run = CAP + f"""
import logging
logging.basicConfig(format="warning: %(message)s")
from fastmfd.tools.warm_files import WarmFiles
warm = WarmFiles({str(tmp_path)!r})
cap()
warm.refill([(1 << 20, 4096)])
warm.close()
print("closed, held", warm.held_bytes)
"""
    done = pids_limited(100, command=("-c", run), timeout=60)
    assert done.returncode == 0, done.stderr
    assert _said(done) == ["closed, held 0"]
    assert done.stderr == (f"warning: could not prepare warm region files: cannot start a "
                           f"thread (fastmfd warm files): {THREAD_LIMIT}\n")
    assert os.listdir(tmp_path) == []
