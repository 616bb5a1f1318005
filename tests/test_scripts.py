"""Workers never import the caller's ``__main__`` (issue #11): a script without
an ``if __name__ == "__main__":`` guard and one piped to ``python -`` migrate;
a loader class defined in a (guarded) script still reaches the reassembly
process; every worker is named in ``ps``.

multiprocessing's children re-import the main module; through fastmfd's
forkserver that re-ran an unguarded script inside every worker, and failed
on ``python -`` (``<stdin>`` is no file). Each script runs in a real
subprocess here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fastmfd
from fastmfd._engine.processes import process_title

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


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)


def _assert_migrated_once(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["script", "ran", "migrated"], proc.stdout + proc.stderr


def test_script_without_main_guard_migrates(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED)
    _assert_migrated_once(_run([str(script)]))


def test_script_piped_to_python_stdin_migrates():
    _assert_migrated_once(_run(["-"], stdin=_UNGUARDED))


def test_loader_class_defined_in_the_script_reaches_the_reassembly_process(tmp_path):
    # The one thing a worker needs from __main__: it is imported when unpickled.
    script = tmp_path / "own_loader.py"
    script.write_text(textwrap.dedent("""
        import threading
        import fastmfd

        class Upper:
            def __init__(self, path):
                self.path, self.parts = path, []
            def load_state_buffer(self, data):
                self.parts.append(bytes(data).upper())
            def load_finish(self):
                with open(self.path, "wb") as f:
                    f.write(b"".join(self.parts))

        if __name__ == "__main__":
            import sys
            with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
                dst.add_loader("dev", 0, Upper(sys.argv[1]))
                thread = threading.Thread(target=dst.receive)
                thread.start()
                with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
                    src.add_device(fastmfd.BytesDevice("dev", 0, b"abc" * 100))
                    src.migrate(live=False)
                thread.join()
    """))
    out = tmp_path / "loaded"
    proc = _run([str(script), str(out)])
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == b"ABC" * 100


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
