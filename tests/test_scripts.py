"""Workers never import the caller's ``__main__`` (issue #11): a script without
an ``if __name__ == "__main__":`` guard and one piped to ``python -`` migrate;
a loader class defined in the script reaches the reassembly process whichever
way it runs; every worker is named in ``ps``.

multiprocessing's children re-import the main module; through fastmfd's
forkserver that re-ran an unguarded script inside every worker, and failed
on ``python -`` (``<stdin>`` is no file). Each script runs in a real
subprocess here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trustme

import fastmfd
from fastmfd._engine.processes import process_title
from listen_support import listens_at
from readme_examples import readme_python_blocks

TIMEOUT = 120

# No guard: every statement runs at import, as a user's first script would.
_UNGUARDED = textwrap.dedent("""
    import threading
    import fastmfd

    print("script ran", flush=True)          # counted: once, never in a worker
    ram = fastmfd.Region.create("ram", 1 << 20)
    ram.array[:] = 7
    received = {}
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
        thread = threading.Thread(target=lambda: received.update(r=dst.receive()))
        thread.start()
        with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
            src.add_region(ram)
            src.add_device(fastmfd.BytesDevice("nic0", 0, b"state" * 1000))
            src.migrate(live=False)
        thread.join()
        result = received["r"]
        assert (result.regions["ram"].array == 7).all()
        assert result.devices[("nic0", 0)] == b"state" * 1000
    ram.close()
    print("migrated", flush=True)
""")


def _run(args: list[str], stdin: str | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, cwd=cwd)


def _assert_migrated_once(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["script", "ran", "migrated"], proc.stdout + proc.stderr


def test_script_without_main_guard_migrates(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED)
    _assert_migrated_once(_run([str(script)]))


def test_script_piped_to_python_stdin_migrates():
    _assert_migrated_once(_run(["-"], stdin=_UNGUARDED))


# A loader, what it returns and a device, all defined in the user's __main__.
_OWN_CLASSES = textwrap.dedent("""
    import threading
    import fastmfd

    class Tally:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    class CountingLoader:
        def __init__(self):
            self.nbytes = 0
        def load_state_buffer(self, data):
            self.nbytes += len(data)
        def load_finish(self):
            return Tally(self.nbytes)

    class ZerosDevice:
        idstr, instance_id = "nic0", 0
        def __init__(self, size):
            self.left = size
        def read_state(self, buf):
            n = min(len(buf), self.left)
            buf[:n] = bytes(n)
            self.left -= n
            return n
""")
_MIGRATE_OWN = textwrap.dedent("""
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
        dst.add_loader("nic0", 0, CountingLoader())
        received = {}
        thread = threading.Thread(target=lambda: received.update(r=dst.receive()))
        thread.start()
        with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
            src.add_device(ZerosDevice(3 << 20))
            src.migrate(live=False)
        thread.join()
    tally = received["r"].devices[("nic0", 0)]
    print(type(tally) is Tally, tally.nbytes, flush=True)
""")


@pytest.mark.parametrize("way", ["guarded script", "unguarded script", "python -"])
def test_classes_defined_in_main_reach_the_reassembly_process(tmp_path, way):
    # The reassembly process cannot import a __main__ piped to `python -`, and
    # importing an unguarded one re-ran the migration in it: the loader's class
    # travels by value, and what it returns comes back as the caller's own class.
    if way == "guarded script":
        text = (_OWN_CLASSES + 'if __name__ == "__main__":\n'
                + textwrap.indent(_MIGRATE_OWN, "    "))
    else:
        text = _OWN_CLASSES + _MIGRATE_OWN
    script = tmp_path / "own_classes.py"
    script.write_text(text)
    proc = _run(["-"], stdin=text) if way == "python -" else _run([str(script)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(3 << 20)], proc.stdout + proc.stderr


# A loader whose methods use a module-level lock (by value, its globals would go
# too, and a lock does not pickle) and that reports to the script over a pipe (the
# child gets a descriptor of its own).
_LOCKED_LOADER = textwrap.dedent("""
    import multiprocessing
    import threading
    import fastmfd

    _lock = threading.Lock()

    class ReportingLoader:
        def __init__(self, conn):
            self.conn, self.nbytes = conn, 0
        def load_state_buffer(self, data):
            with _lock:
                self.nbytes += len(data)
            self.conn.send(len(data))
        def load_finish(self):
            self.conn.send(None)
            return self.nbytes
""")
_MIGRATE_LOCKED = textwrap.dedent("""
    print("script ran", flush=True)
    reports, mine = multiprocessing.Pipe(duplex=False)
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
        dst.add_loader("nic0", 0, ReportingLoader(mine))
        received = {}
        thread = threading.Thread(target=lambda: received.update(r=dst.receive()))
        thread.start()
        with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
            src.add_device(fastmfd.BytesDevice("nic0", 0, bytes(300000)))
            src.migrate(live=False)
        thread.join()
    reported = 0
    while (n := reports.recv()) is not None:
        reported += n
    print(reported, received["r"].devices[("nic0", 0)], flush=True)
""")


def test_a_loader_with_a_pipe_and_a_lock_in_its_globals(tmp_path):
    """A guarded script's: it goes by reference, the worker imports the script.
    Both broke when loaders went by value alone: the pipe's descriptor number
    named nothing in the child (EBADF), and the lock refused to pickle."""
    script = tmp_path / "locked_and_piped.py"
    script.write_text(_LOCKED_LOADER + 'if __name__ == "__main__":\n'
                      + textwrap.indent(_MIGRATE_LOCKED, "    "))
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["script", "ran", "300000", "300000"], proc.stdout


def test_an_unguarded_script_whose_loader_cannot_go_by_value_is_told_why(tmp_path):
    """Unguarded, the script cannot be imported by a worker (it would run again
    there, migration and all): the lock in its loader's globals is refused in
    the script itself, saying what to do."""
    script = tmp_path / "unguarded_locked.py"
    script.write_text(_LOCKED_LOADER + _MIGRATE_LOCKED)
    proc = _run([str(script)])
    assert proc.returncode == 1 and proc.stdout.split() == ["script", "ran"], proc.stdout
    assert "cannot pickle '_thread.lock' object (a loader goes to fastmfd's workers " \
           "pickled, and what __main__ defines by value" in proc.stderr, proc.stderr
    assert f"guard the entry of your script {script} with if __name__ == '__main__':" \
        in proc.stderr, proc.stderr


def test_a_package_main_whose_loader_cannot_go_by_value_is_told_why(tmp_path):
    """``python -m pkg``: multiprocessing never imports a package's ``__main__`` in
    a worker, guarded or not, so by reference the worker could not find the class
    ("Can't get attribute 'ReportingLoader'"); the script is told instead."""
    package = tmp_path / "lockpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(_LOCKED_LOADER + 'if __name__ == "__main__":\n'
                                         + textwrap.indent(_MIGRATE_LOCKED, "    "))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    proc = subprocess.run([sys.executable, "-m", "lockpkg"], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    assert proc.returncode == 1 and proc.stdout.split() == ["script", "ran"], proc.stdout
    assert "cannot pickle '_thread.lock' object (a loader goes to fastmfd's workers " \
           "pickled" in proc.stderr, proc.stderr
    assert "define its class in a module, and keep" in proc.stderr, proc.stderr  # no guard helps


def test_run_from_a_directory_holding_an_unbuilt_source_tree(tmp_path):
    """An unpacked sdist or a checkout not built in place, as the current
    directory of a program using the installed fastmfd: Python 3.11's forkserver
    has the current directory first on its path, and preloaded that tree's
    fastmfd, whose core is not compiled; every worker failed to import it."""
    tree = tmp_path / "fastmfd-0.1.0"
    shutil.copytree(os.path.dirname(fastmfd.__file__), tree / "fastmfd",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = tmp_path / "elsewhere" / "migrate.py"
    script.parent.mkdir()
    script.write_text(_UNGUARDED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=tree)
    _assert_migrated_once(proc)


_PLANT = "import os\nopen(os.path.join({marks!r}, {name!r}), 'w').close()\n"


def test_run_from_a_directory_others_can_write(tmp_path):
    """Nothing in the current directory is imported by fastmfd's helper processes.
    multiprocessing starts its forkserver and resource tracker with ``python -c``,
    which put the current directory first on their path: a ``_fastmfd_forkserver.py``
    or a ``multiprocessing`` package left in a shared directory the program ran from
    ran as its user, in the forkserver and every worker."""
    planted, marks = tmp_path / "shared", tmp_path / "marks"
    (planted / "multiprocessing").mkdir(parents=True)
    marks.mkdir()
    (planted / "_fastmfd_forkserver.py").write_text(
        _PLANT.format(marks=str(marks), name="_fastmfd_forkserver"))
    (planted / "multiprocessing" / "__init__.py").write_text(
        _PLANT.format(marks=str(marks), name="multiprocessing") + "raise ImportError\n")
    script = tmp_path / "elsewhere" / "migrate.py"
    script.parent.mkdir()
    script.write_text(_UNGUARDED + "import os\nprint(os.environ.get('PYTHONSAFEPATH'))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=planted)
    assert sorted(os.listdir(marks)) == [], proc.stderr
    assert proc.returncode == 0, proc.stderr
    # The setting is the helpers' alone: the program's environment is as it was.
    assert proc.stdout.split() == ["script", "ran", "migrated", "None"], proc.stdout


def _children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def test_workers_are_named_in_ps():
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=2):
        # The workers are the forkserver's children; it is this process's child.
        titles, names = set(), set()
        for server in _children_of(os.getpid()):
            for child in _children_of(server):
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    titles.add(f.read().split(b"\0")[0].decode())
                with open(f"/proc/{child}/comm") as f:
                    names.add(f.read().strip())
    expected = [process_title(name) for name in
                ("receive channel 0", "receive channel 1", "reassembly")]
    assert {title for title, _ in expected} <= titles
    assert {short for _, short in expected} <= names
    assert ("fastmfd: receive channel 1", "fastmfd recv 1") == expected[1]


# ---------------------------------------------------------------- the README's examples

def _readme_example(number: int, *changes: tuple[str, str]) -> str:
    """The README's ``python`` block ``number`` (from 0), each (text, by) of ``changes``
    made; the text must be there, or the test no longer runs what the README says."""
    example = readme_python_blocks()[number]
    for text, by in changes:
        assert text in example, f"README example {number} no longer has {text!r}"
        example = example.replace(text, by)
    return example


def test_the_readmes_library_example_runs_as_written(tmp_path):
    """Its region of 1 GiB made 16 MiB (tests keep images small): it migrates, asserts
    the destination's copy itself, prints the time, the throughput and the zero pages,
    and closes all it made (an object left to the collector says ResourceWarning)."""
    script = tmp_path / "library.py"
    script.write_text(_readme_example(0, ("1 << 30", "16 << 20")))
    proc = _run(["-W", "always::ResourceWarning", str(script)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seconds, throughput, zero_pages = proc.stdout.split()
    assert float(seconds) > 0 and float(throughput) > 0
    assert int(zero_pages) == (16 << 20) // 4096 - 1, "all but the page of 7s"
    assert "Warning" not in proc.stderr, proc.stderr


def test_the_readmes_secure_channels_example_runs_as_written(tmp_path):
    """With the key file and the certificates it names (trustme's, private as keys
    must be), on a free port: it makes its TLS and shared-key settings and its
    Destination, and closes what it made (it left its Destination to the collector,
    a ResourceWarning, as no user's program should)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for side, identity in (("src", "src.example"), ("dst", "dst.example")):
        cert = ca.issue_cert(identity)
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{side}.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{side}-key.pem"))
        os.chmod(tmp_path / f"{side}-key.pem", 0o600)
    (tmp_path / "key").write_bytes(os.urandom(32))
    os.chmod(tmp_path / "key", 0o600)
    script = tmp_path / "secure.py"
    script.write_text(_readme_example(1, ("tcp:0.0.0.0:4444", "tcp:127.0.0.1:0")))
    proc = _run(["-W", "always::ResourceWarning", str(script)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


def test_the_package_docstrings_example_runs_in_two_processes(tmp_path):
    """``help(fastmfd)``'s example: a Destination in one process, a Source of a region in
    another (its 1 GiB made 16 MiB; its port a Unix socket here, as no port is sure to be
    free): the region arrives whole, and neither leaves anything to the collector."""
    code = textwrap.dedent(fastmfd.__doc__.split("::\n", 1)[1])
    destination, source = (f"import fastmfd\n{part}\n" for part in code.split("\n\n", 1))
    address, sock = "tcp:127.0.0.1:4444", tmp_path / "dst.sock"
    assert destination.count(address) == source.count(address) == 1, code
    destination = destination.replace(address, f"unix:{sock}")
    destination += "print(result.regions['pc.ram'].size)\n"
    source = source.replace(address, f"unix:{sock}").replace("1 << 30", "16 << 20")
    source += "print(stats.ram_bytes)\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with subprocess.Popen([sys.executable, "-W", "always::ResourceWarning", "-c", destination],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as receiving:
        try:
            deadline = time.monotonic() + TIMEOUT
            while not listens_at(sock) and receiving.poll() is None:
                assert time.monotonic() < deadline, "the destination never listened"
                time.sleep(0.05)
            sent = _run(["-W", "always::ResourceWarning", "-c", source])
            received, errors = receiving.communicate(timeout=TIMEOUT)
        finally:
            receiving.kill()
    assert sent.returncode == 0 and sent.stdout.split() == [str(16 << 20)], sent.stderr
    assert receiving.returncode == 0 and received.split() == [str(16 << 20)], errors
    assert "Warning" not in sent.stderr + errors, sent.stderr + errors
