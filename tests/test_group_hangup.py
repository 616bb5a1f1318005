"""A hangup (the terminal closed, the ssh connection dropped) signals a whole
process group: a program using fastmfd, and with it fastmfd's forkserver,
workers and resource tracker. What the program does with its SIGHUP is its own
business; fastmfd's processes must not die of theirs before their owner stops
them. They did: the workers of a daemon that takes SIGHUP as "reload" died under
its session, and the resource tracker of one that dies of it went too, leaving
the session's segments in /dev/shm. The program runs in a session of its own
here, and gets a real SIGHUP to its whole group mid-session."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastmfd
from fastmfd.shm import creator_pid, list_segments
from listen_support import REPO
from migration_support import make_region
from proc_scan import alive, left_by, process_group

PAGE = 4096
BOUND = 5.0         # seconds for a dead owner's processes and segments to go

# argv[1] "reload": SIGHUP handled, as a daemon's "reload your configuration" is;
# "default": the program dies of it.
_DESTINATION = textwrap.dedent("""
    import os, signal, sys
    import fastmfd
    if __name__ == "__main__":
        if sys.argv[1] == "reload":
            signal.signal(signal.SIGHUP, lambda *_: os.write(1, b"reloaded\\n"))
        with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
            print(dst.address, flush=True)
            result = dst.receive()
            print("received", result.regions["ram"].size, flush=True)
""")


def _read_line(proc: subprocess.Popen, timeout: float = 30) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the program said nothing within {timeout} s"
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("handling", ["reload", "default"])
def test_a_group_hangup_leaves_fastmfd_s_processes_to_their_owner(handling):
    region = make_region("ram", 64 * PAGE, seed=7)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _DESTINATION, handling], env=env,
                            stdout=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True)
    group: set[int] = set()

    def hang_up() -> None:
        """After SETUP, before any page went: the destination's processes are up."""
        group.update(process_group(proc.pid))
        # The program, its forkserver, resource tracker, workers, reassembly process
        assert len(group) >= 4 and any(creator_pid(name) in group
                                       for name in list_segments()), group
        os.killpg(proc.pid, signal.SIGHUP)
        if handling == "reload":
            assert _read_line(proc) == "reloaded"
            time.sleep(0.2)         # a process killed by the signal is gone by now
            assert {pid for pid in group if not alive(pid)} == set()
        else:
            assert proc.wait(30) == -signal.SIGHUP

    try:
        address = _read_line(proc)
        with fastmfd.Source(address) as source:
            source.add_region(region)
            # ~1 s of device state: the session is still going after the hangup.
            source.add_device(fastmfd.SyntheticDevice("nic0", 0, 4 << 20,
                                                      read_rate=4 << 20))
            if handling == "reload":
                source.migrate(live=False, on_stop=hang_up)
                assert _read_line(proc) == f"received {64 * PAGE}"
                assert proc.wait(30) == 0
            else:
                with pytest.raises(fastmfd.MigrationError):
                    source.migrate(live=False, on_stop=hang_up)
        assert left_by(group, BOUND) == (set(), set())
    finally:
        region.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_the_programs_own_forkserver_children_keep_its_settings(tmp_path):
    """multiprocessing has one forkserver per program, and fastmfd started it: the
    program's own processes of the "forkserver" context (a Pool's; Python 3.14's
    default on Linux) came from it with fastmfd's settings, not the program's: SIGHUP
    and Ctrl-C ignored (and, while the forkserver set them, one BLAS thread in their
    environment)."""
    assert _in_a_forkserver_child(tmp_path, """
        def in_the_child(queue):
            queue.put([os.environ.get("OPENBLAS_NUM_THREADS"),
                       os.environ.get("OMP_NUM_THREADS"),
                       signal.getsignal(signal.SIGHUP) is signal.SIG_DFL,
                       signal.getsignal(signal.SIGINT) is signal.default_int_handler])
    """) == "[None, None, True, True]\n"


def test_a_fork_child_of_the_programs_forkserver_child_keeps_its_parents_settings(tmp_path):
    """The forkserver's after-fork hook, which gives the program's children its
    SIGINT and SIGHUP back, is inherited by each process below it and ran again in
    a "fork" child of one: there it reset what the parent had set (ignored) to the
    program's start-up settings, where a fork keeps the parent's (a review, D2)."""
    assert _in_a_forkserver_child(tmp_path, """
        def report(queue):
            queue.put([signal.getsignal(sig) is signal.SIG_IGN
                       for sig in (signal.SIGHUP, signal.SIGINT)])

        def in_the_child(queue):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            forked = multiprocessing.get_context("fork").Process(target=report, args=(queue,))
            forked.start()
            forked.join(30)
    """) == "[True, True]\n"


_THE_PROGRAM = """
import multiprocessing, os, signal
import fastmfd
{functions}
if __name__ == "__main__":
    with fastmfd.Destination("tcp:127.0.0.1:0"):
        pass                            # fastmfd started the program's forkserver
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    child = ctx.Process(target=in_the_child, args=(queue,))
    child.start()
    print(queue.get(timeout=30))
    child.join(30)
"""


def _in_a_forkserver_child(tmp_path, functions: str) -> str:
    """What a program printed that runs ``functions``' in_the_child(queue) in a
    "forkserver" child of its own, the queue's one item, once fastmfd started the
    forkserver. Run as a file (its children import its functions), with this
    fastmfd and without a BLAS thread count set."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    program = tmp_path / "program.py"
    program.write_text(_THE_PROGRAM.format(functions=textwrap.dedent(functions)))
    done = subprocess.run([sys.executable, str(program)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout
