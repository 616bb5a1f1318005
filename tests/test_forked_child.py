"""A child forked from a process that uses fastmfd (``os.fork()``, multiprocessing's
'fork' Process) leaves the parent's workers alone, and can use fastmfd itself.

Each test runs a script in a fresh interpreter, so its fork copies no pytest state
and its child exits the ordinary way (atexit handlers and all). The script prints
one JSON object: how its migrations ended and the pids of every process it knew
of (workers, the parent's forkserver and the child's); the test checks them all
gone once the script exits, and the ``leaks`` fixture that no /dev/shm segment
it made is left.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from proc_scan import alive

WAIT = 15.0

COMMON = """
    import json
    import multiprocessing
    import os
    import signal
    import sys
    import threading
    import time
    from multiprocessing import forkserver

    import fastmfd

    MiB = 1 << 20


    def forkserver_pid():
        return forkserver._forkserver._forkserver_pid


    def wait_gone(pid):
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)


    def migrate(dst, src, name):
        # One migration between an open Destination and Source: "ok" or what failed.
        ram = fastmfd.Region.create(name, MiB)
        ram.array[::4096] = 3
        got = {}

        def receive():
            try:
                got["ram"] = bytes(dst.receive().regions[name].array)
            except BaseException as exc:
                got["error"] = f"{type(exc).__name__}: {exc}"
        thread = threading.Thread(target=receive)
        thread.start()
        try:
            src.add_region(ram)
            src.migrate(live=False)
            said = "ok"
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        thread.join(20)
        if "error" in got:
            said += f"; destination: {got['error']}"
        elif got.get("ram") != bytes(ram.array):
            said += "; destination: other bytes"
        ram.close()
        return said


    def migrate_anew(name):
        with fastmfd.Destination("tcp:127.0.0.1:0", workers=2) as dst:
            with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=2)) as src:
                return migrate(dst, src, name), dst.worker_pids() + src.worker_pids()
"""

# The parent forks while a Destination and a Source are open; the child exits
# normally, leaving their `with` (close() runs in it) or out of any (only atexit
# runs: the owners were entered without one).
CHILD_EXITS = COMMON + """
    import contextlib

    report = {}
    stack = contextlib.ExitStack()
    enter = stack.enter_context if sys.argv[1] == "leaving-with" else lambda o: o.__enter__()
    with stack:
        dst = enter(fastmfd.Destination("tcp:127.0.0.1:0", workers=2))
        src = enter(fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=2)))
        report["pids"] = dst.worker_pids() + src.worker_pids() + [forkserver_pid()]
        child = os.fork()
        if child == 0:
            if sys.argv[1] == "cancelling":     # refused, the parent's sockets untouched
                refused = 0
                for owner in (dst, src):
                    try:
                        owner.cancel("from the child")
                    except fastmfd.ConfigError as exc:
                        refused += "which this process was forked from" in str(exc)
                sys.exit(0 if refused == 2 else 3)
            sys.exit(0)
        _, status = os.waitpid(child, 0)
        report["child status"] = os.waitstatus_to_exitcode(status)
        report["alive after"] = [pid for pid in report["pids"]
                                 if os.path.exists(f"/proc/{pid}")]
        report["migration"] = migrate(dst, src, "ram")
    src.close()
    dst.close()
    print(json.dumps(report), flush=True)
"""

# The parent has used fastmfd (its forkserver runs); its forked child migrates
# with a forkserver of its own, and the parent migrates again once it is gone.
CHILD_USES = COMMON + """
    def child_migrates(answer, inherited):
        said = {"migration": None, "pids": []}
        try:
            inherited.receive()
        except fastmfd.FastMFDError as exc:
            said["inherited"] = str(exc)
        try:
            said["migration"], said["pids"] = migrate_anew("child-ram")
        except BaseException as exc:
            said["migration"] = f"{type(exc).__name__}: {exc}"
        said["forkserver"] = forkserver_pid()
        answer(json.dumps(said))


    report = {}
    # timeout: the child's receive() would wait that long for a source if it ran.
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=2, timeout=1) as inherited:
        report["migration"], report["pids"] = migrate_anew("ram")
        report["forkserver"] = forkserver_pid()
        if sys.argv[1] == "os.fork":
            r, w = os.pipe()
            # Held at the fork, as by a thread starting a worker: the child has it held.
            forkserver._forkserver._lock.acquire()
            child = os.fork()
            if child == 0:
                os.close(r)
                child_migrates(lambda text: os.write(w, text.encode()), inherited)
                sys.exit(0)
            forkserver._forkserver._lock.release()
            os.close(w)
            with open(r) as pipe:
                said = json.loads(pipe.read())
            os.waitpid(child, 0)
        else:
            queue = multiprocessing.get_context("fork").SimpleQueue()
            child = multiprocessing.get_context("fork").Process(
                target=child_migrates, args=(queue.put, inherited))
            child.start()
            said = json.loads(queue.get())
            child.join()
    report["child"] = said
    report["pids"] += [report["forkserver"], *said["pids"], said["forkserver"]]
    # The child's forkserver ends after the child: whatever it removes then, the
    # parent's next workers still start.
    wait_gone(said["forkserver"])
    report["migration after"], pids = migrate_anew("ram-after")
    report["pids"] += pids
    print(json.dumps(report), flush=True)
"""

# The parent has used fastmfd and exits; its forked child lives on (until killed).
CHILD_OUTLIVES = COMMON + """
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=2):
        pass
    child = os.fork()
    if child == 0:
        with open(os.devnull, "w") as null:     # not holding the test's pipes
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        signal.pause()
        os._exit(0)
    print(json.dumps({"forkserver": forkserver_pid(), "child": child}), flush=True)
"""


@pytest.fixture
def run_script(tmp_path):
    """Run ``source`` with ``arg`` in a new session: its JSON report, its stderr and
    where multiprocessing's temporary directories went. Its whole tree is killed
    at the end, in case a process of it was left running."""
    started = []

    def run(source, arg):
        script = tmp_path / "script.py"
        script.write_text(textwrap.dedent(source))
        # TMPDIR: multiprocessing's directories (pymp-*) go with the test's.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   TMPDIR=str(tmp_path))
        # stderr to a file, the report read as a line: a child the script left running
        # shares multiprocessing's resource tracker, which holds both until its end.
        with open(tmp_path / "stderr", "w+") as stderr:
            proc = subprocess.Popen([sys.executable, str(script), arg], stdout=subprocess.PIPE,
                                    stderr=stderr, text=True, env=env, start_new_session=True)
            started.append(proc)
            out = proc.stdout.readline()
            proc.wait(60)
            stderr.seek(0)
            err = stderr.read()
        assert proc.returncode == 0, err
        return json.loads(out), err, tmp_path

    yield run
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def gone(pids):
    """Whether every process of ``pids`` ends within WAIT once its tree's root did."""
    deadline = time.monotonic() + WAIT
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)] == []


@pytest.mark.parametrize("how", ["leaving-with", "atexit-only", "cancelling"])
def test_a_forked_child_exiting_leaves_the_parents_workers_alone(run_script, how):
    # multiprocessing's exit handler in the child SIGTERMed the parent's workers,
    # which it had inherited as its daemonic children; and the child's close(),
    # leaving the `with` it inherited, stopped them and freed the parent's segments.
    # A cancel() there shut the parent's listener down: refused now.
    report, err, tmp_path = run_script(CHILD_EXITS, how)
    assert report["child status"] == 0
    assert report["alive after"] == report["pids"], err
    assert report["migration"] == "ok", err
    assert gone(report["pids"])
    assert list(tmp_path.glob("pymp-*")) == []


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing-fork"])
def test_a_forked_child_uses_fastmfd_with_a_forkserver_of_its_own(run_script, how):
    # The child waited on the parent's forkserver as if its own: ChildProcessError.
    # Its own goes in a temporary directory of its own: in the parent's, which it
    # removed at its end, the parent could start no worker after. The owner it
    # inherited is refused, not run on the parent's workers.
    report, err, tmp_path = run_script(CHILD_USES, how)
    assert report["migration"] == "ok", err
    child = report["child"]
    assert child["migration"] == "ok", err
    assert child["forkserver"] != report["forkserver"]
    assert "which this process was forked from" in child["inherited"]
    assert report["migration after"] == "ok", err
    assert gone(report["pids"])
    assert list(tmp_path.glob("pymp-*")) == []


def test_a_forked_child_does_not_keep_the_parents_forkserver_running(run_script):
    # It held the forkserver's "alive" pipe, inherited: the forkserver ran on after
    # the parent's exit, for as long as the child lived.
    report, err, tmp_path = run_script(CHILD_OUTLIVES, "")
    try:
        assert gone([report["forkserver"]]) and alive(report["child"]), err
    finally:
        os.kill(report["child"], signal.SIGKILL)
    assert gone([report["child"]])
