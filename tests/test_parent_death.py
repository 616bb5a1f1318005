"""Every child dies with whichever parent dies, and the last one out unlinks the
session's shared memory (issue #9).

A SIGKILLed Destination main process, while a channel is silent, used to leave
its forkserver and the receive worker blocked on that channel running, and
the session's /dev/shm segments in place, until the peer closed its socket.
The destination runs in a real subprocess here; /proc and /dev/shm say what
is left (and the temporary directory: multiprocessing's ``pymp-*`` directory of
the forkserver's socket stayed behind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import fastmfd
from fastmfd.shm import SHM_DIR
from proc_scan import alive, process_tree
from migration_support import FakeSource, hello, setup_message

BOUND = 3.0         # seconds for the whole tree and its segments to go

_DESTINATION = textwrap.dedent("""
    import fastmfd
    if __name__ == "__main__":
        with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
            print(dst.address, flush=True)
            dst.receive()
""")


def _segments_mapped_by(pids: set[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        names.update(line.rsplit("/", 1)[1].split()[0] for line in maps.splitlines()
                     if f"{SHM_DIR}/fastmfd-" in line)
    return names


def _socket_directories(pids: set[int]) -> set[str]:
    """The directories of the Unix sockets bound to a path that ``pids`` hold open
    (a forkserver's listener is in multiprocessing's ``pymp-*`` directory)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    with open("/proc/net/unix") as table:
        rows = [line.split() for line in table.read().splitlines()[1:]]
    return {os.path.dirname(row[7]) for row in rows if len(row) > 7 and row[6] in inodes}


def test_sigkilled_destination_leaves_no_process_and_no_segment():
    proc = subprocess.Popen([sys.executable, "-c", _DESTINATION], stdout=subprocess.PIPE,
                            text=True)
    source = None
    try:
        address = proc.stdout.readline().strip()
        uuid = os.urandom(16)
        source = FakeSource(address, setup_message(fastmfd.MigrationConfig(channels=1), uuid,
                                                   {"ram": 240 << 20}))
        assert source.open_main()[0].name == "SETUP_ACK"
        source.connect(hello(0, uuid))          # a channel, then silence
        deadline = time.monotonic() + 10
        while True:                             # until the worker has the channel
            tree = process_tree(proc.pid) - {proc.pid}
            segments = _segments_mapped_by(tree)
            if any("region-ram" in name for name in segments) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert any("region-ram" in name for name in segments), segments
        # resource tracker, forkserver, the receive worker, the reassembly process
        assert len(tree) >= 4, tree
        directories = _socket_directories(tree)
        assert any(os.path.basename(d).startswith("pymp-") for d in directories), directories

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while time.monotonic() - killed < BOUND + 2:
            left = {pid for pid in tree if alive(pid)}
            kept = {name for name in segments if os.path.exists(os.path.join(SHM_DIR, name))}
            if not left and not kept:
                break
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert not left, f"processes alive {took:.1f} s after the owner died: {sorted(left)}"
        assert not kept, f"segments left {took:.1f} s after the owner died: {sorted(kept)}"
        assert took < BOUND, f"the tree took {took:.1f} s to go"
        # Its forkserver removed the directory of its socket as it went.
        assert not [d for d in directories if os.path.exists(d)], directories
    finally:
        if source is not None:
            source.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_FORKSERVER_DIES = textwrap.dedent("""
    import os, socket, time
    from multiprocessing import forkserver
    from fastmfd._engine.processes import mp_context
    if __name__ == "__main__":
        ctx = mp_context()
        child = ctx.Process(target=time.sleep, args=(0,)); child.start(); child.join()
        server = forkserver._forkserver
        address, pid = server._forkserver_address, server._forkserver_pid
        # A connection that sends no descriptors: the forkserver's loop raises, it exits.
        probe = socket.socket(socket.AF_UNIX); probe.connect(address); probe.close()
        while open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z":
            time.sleep(0.05)
        print(os.path.isdir(os.path.dirname(address)))
        child = ctx.Process(target=time.sleep, args=(0,)); child.start(); child.join()
        print(child.exitcode)
""")


def test_a_forkserver_that_dies_while_its_main_process_lives_keeps_the_directory():
    """Only a main process that is gone has its directory removed: a forkserver
    that exits while it lives (a fork that failed ends its loop) removed it, and
    the next forkserver, binding its socket there, could start no process again
    (found in review)."""
    done = subprocess.run([sys.executable, "-c", _FORKSERVER_DIES], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "0"], (done.stdout, done.stderr)


_FORKSERVER_KILLED = textwrap.dedent("""
    import os, signal, time
    from multiprocessing import forkserver
    from fastmfd._engine.processes import Child, mp_context
    from fastmfd._engine.workers import recv_worker_main
    if __name__ == "__main__":
        child = Child(mp_context(), recv_worker_main, "receive channel 0")
        child.wait_ready()              # set up: it dies with the forkserver
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while child.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.02)
        print(child.death_error())
""")


def test_a_killed_forkserver_is_named_as_what_ended_its_workers():
    """A worker whose forkserver was SIGKILLed (it dies with it) was said to have
    "exited with status 255", multiprocessing's stand-in when the forkserver
    cannot report an exit (found in review)."""
    done = subprocess.run([sys.executable, "-c", _FORKSERVER_KILLED], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip()
    assert said.startswith("receive channel 0: the worker process ended with its parent, "
                           "multiprocessing's forkserver (pid "), said
    assert said.endswith("), which was killed by SIGKILL"), said


_ORPHAN_PROBE = '''
import os, signal, time
from fastmfd._engine.processes import child_setup

def orphaned_before_its_set_up(report):
    """The race made certain: the forkserver dies before this child's prctl (it kills
    its forkserver itself, and waits until it is re-parented)."""
    forkserver = os.getppid()
    os.kill(forkserver, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.getppid() == forkserver and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(report, "w") as f:
        f.write(f"re-parented to {os.getppid()}\\n")
    child_setup()
    with open(report, "a") as f:
        f.write("set up\\n")
'''

_SUBREAPER = textwrap.dedent("""
    import ctypes, os, sys, time
    from fastmfd._engine.forkserver_start import ForkServerChild, mp_context
    from orphan_probe import orphaned_before_its_set_up
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    mp_context()
    child = ForkServerChild(target=orphaned_before_its_set_up, args=(sys.argv[1],),
                            name="probe", daemon=True)
    child.start()
    deadline = time.monotonic() + 30
    while True:
        try:        # this process's child once its forkserver is gone (the subreaper)
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(child.pid, 9)
            raise SystemExit("the orphan still runs")
        time.sleep(0.02)
    print(os.getpid(), os.waitstatus_to_exitcode(status))
""")


def test_a_child_orphaned_before_its_set_up_exits_under_a_subreaper(tmp_path):
    """A child whose forkserver died before its PR_SET_PDEATHSIG took effect exits at
    once: it checked that its parent was init (pid 1), while under a child subreaper
    (systemd --user, any ancestor with PR_SET_CHILD_SUBREAPER) it is re-parented to
    that ancestor, and ran on, outliving its session (found in review). Here the main
    process is the subreaper and the child kills its forkserver before it sets up."""
    (tmp_path / "orphan_probe.py").write_text(_ORPHAN_PROBE)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-c", _SUBREAPER, str(report)], capture_output=True,
                          text=True, timeout=90, env=dict(os.environ, PYTHONPATH=path))
    assert done.returncode == 0, done.stderr
    main, status = done.stdout.split()
    assert report.read_text() == f"re-parented to {main}\n"
    assert status == "1"
