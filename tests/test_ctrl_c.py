"""Ctrl-C reaches every process of the group (a terminal sends SIGINT to all of
them): only the main process reports it, once, whenever it lands: while it reads
its command line, while it hands a child its start data. A test runs a script in
a process of its own (its stderr read) and sends SIGINT at a point the script
marks, so the moment is not a matter of timing. Real processes, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from fastmfd.regions import Region
from fastmfd.tools.demo import Workload
from proc_scan import process_group

WORKTREE = Path(__file__).resolve().parents[1]

# Imported by the scripts below: a pause at a point of a process's work.
PROBE = '''
import os, time

def pause(mark):
    """Mark that this process reached the point, then give the test time to signal it."""
    with open(mark, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1.0)

class PausePickled:
    """Pickled, pauses: the main process packing a child's start data stops here."""
    def __init__(self, mark):
        self.mark = mark
    def __reduce__(self):
        pause(self.mark)
        return str, ()
'''


def run_script(tmp_path: Path, script: str, mark: Path, sig: int = signal.SIGINT,
               **env: str) -> tuple[int, str, str]:
    """Run ``script``; send ``sig`` to the process that writes its pid to ``mark``,
    once it does."""
    (tmp_path / "ctrl_c_probe.py").write_text(PROBE)
    path = os.pathsep.join([str(tmp_path), str(WORKTREE), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=path, MARK=str(mark), **env),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (mark.exists() and mark.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        os.kill(int(mark.read_text()), sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda sig: sig.name)
def test_ctrl_c_while_a_child_starts_is_raised_once_it_started(tmp_path, sig):
    """SIGINT (or the SIGTERM, SIGHUP the CLI raises as an exception) to the main process as
    it packs a child's start data: it was raised there, the child left without its
    pid known (nothing to kill before the main process exits) or with its start
    data cut short (EOFError: Ran out of input, printed by the child)."""
    mark = tmp_path / "main.pid"
    status, out, err = run_script(tmp_path, """
        import os, signal
        from ctrl_c_probe import PausePickled
        from fastmfd._engine.forkserver_start import ForkServerChild, mp_context
        from fastmfd.tools.cli import _on_stop_signal
        signal.signal(signal.SIGTERM, _on_stop_signal)      # as the CLI does
        signal.signal(signal.SIGHUP, _on_stop_signal)
        mp_context()
        probe = ForkServerChild(target=os.getpid, name="probe", daemon=True)
        probe.pause = PausePickled(os.environ["MARK"])
        try:
            probe.start()
        except KeyboardInterrupt:
            print("interrupted; started:", probe.pid is not None)
            if probe.pid is not None:
                probe.join(30)
                print("exit", probe.exitcode)
    """, mark, sig)
    assert err == ""
    assert (status, out.splitlines()) == (0, ["interrupted; started: True", "exit 0"])


def test_the_demo_workload_is_set_up_as_every_child():
    """The demo's workload process took no title and did not ignore Ctrl-C
    (it never ran child_setup)."""
    region = Region.create("ram", 64 * 4096)
    workload = Workload(region)
    try:
        pid = workload._process.pid
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{pid}/cmdline").read_text().startswith("fastmfd: demo workload"):
            assert time.monotonic() < deadline, Path(f"/proc/{pid}/cmdline").read_text()
            time.sleep(0.01)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        assert workload._process.is_alive()
        workload.stop()
        assert workload._process.exitcode == 0
    finally:
        workload.close()
        region.close()


def test_ctrl_c_while_the_arguments_are_parsed_is_one_line():
    """argparse parses a command's arguments (parse_intermixed_args) by changing its
    actions and putting them back in a ``finally``: a Ctrl-C before the change broke
    the putting back (AttributeError: 'save_nargs'), a traceback and status 1. The
    signal is sent where argparse formats the usage, first thing in that ``try``."""
    script = """
        import argparse, os, signal, sys
        from fastmfd.tools import cli
        usage = argparse.ArgumentParser.format_usage
        def format_usage_interrupted(self):
            argparse.ArgumentParser.format_usage = usage        # once
            os.kill(os.getpid(), signal.SIGINT)
            return usage(self)
        argparse.ArgumentParser.format_usage = format_usage_interrupted
        sys.exit(cli.main(["listen", "unix:/nonexistent/s"]))
    """
    path = os.pathsep.join([str(WORKTREE), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=path))
    assert (done.returncode, done.stderr) == (130, "fastmfd: interrupted\n")


@pytest.mark.parametrize("module", ["fastmfd", "fastmfd.tools.cli"])
def test_ctrl_c_inside_an_exec_leaves_python_m_fastmfd_with_130(tmp_path, module):
    """A Ctrl-C that lands in an exec() of a string (dataclasses make their methods
    so, and building the parser imports many) stays noted by the interpreter as
    unhandled, though main() handles it: ``python -m fastmfd`` then died by SIGINT
    (-2) after its one line, not with 130 (a script, the console script, exits at
    once with its status). The command runs here as ``python -m`` runs it, either
    module a user may name (the exec was first in ``fastmfd/__main__`` only)."""
    (tmp_path / "interrupted_in_exec.py").write_text(textwrap.dedent("""
        import argparse, runpy
        # The module run anew as __main__ has its own functions: the parser's first
        # construction, in argparse, is where the interrupt lands.
        init, fired = argparse.ArgumentParser.__init__, []
        def init_interrupted(self, *args, **kwargs):
            if not fired:
                fired.append(True)
                exec("import os, signal; os.kill(os.getpid(), signal.SIGINT)")
            init(self, *args, **kwargs)
        argparse.ArgumentParser.__init__ = init_interrupted
        runpy.run_module("{module}", run_name="__main__")
    """).replace("{module}", module))
    path = os.pathsep.join([str(tmp_path), str(WORKTREE), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "interrupted_in_exec", "listen",
                           "unix:/nonexistent/s"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=path))
    assert (done.returncode, done.stderr) == (130, "fastmfd: interrupted\n")


@pytest.mark.parametrize("sig, status, said", [
    (signal.SIGINT, 130, "fastmfd: interrupted\n"),
    (signal.SIGTERM, 143, "fastmfd: terminated (SIGTERM)\n"),
    (signal.SIGHUP, 129, "fastmfd: hung up (SIGHUP)\n")], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_the_command_line_is_read_is_one_line(sig, status, said):
    """Ctrl-C or SIGTERM while main() builds its parser (which imports the commands'
    modules, 0.1 s): Python's traceback and a death by the signal (-2, -15).
    The signal is sent where the parser's build starts, as the imports would meet it."""
    script = f"""
        import os, sys
        from fastmfd.tools import cli
        build = cli._build_parser
        def signalled_build():
            os.kill(os.getpid(), {int(sig)})
            return build()
        cli._build_parser = signalled_build
        sys.exit(cli.main(["listen", "unix:/nonexistent/s"]))
    """
    path = os.pathsep.join([str(WORKTREE), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=path))
    assert (done.returncode, done.stderr) == (status, said)


def _console_script() -> list[str]:
    """The ``fastmfd`` script as pip writes it from pyproject.toml (the one installed
    may be an older checkout's)."""
    entry = tomllib.loads((WORKTREE / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = entry["fastmfd"].split(":")
    return [sys.executable, "-c",
            f"import sys\nfrom {module} import {function}\nsys.exit({function}())"]


ENTRIES = {"python -m fastmfd": [sys.executable, "-m", "fastmfd"],
           "the console script": _console_script()}
FORKSERVER = "from multiprocessing.forkserver import main"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:         # its process ended meanwhile
        return ""


def _children(pid: int) -> list[int]:
    return [int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in _read(f"/proc/{pid}/task/{task}/children").split()]


def _interrupt_a_listen(command: list[str], who: str, after: float) -> tuple[int, str, str]:
    """``command listen``, as a terminal's foreground job, and a Ctrl-C to the whole
    group ``after`` seconds after ``who`` ("the command", or "the forkserver", as it
    imports its preloads) began to import numpy: within fastmfd's import, whatever
    the host's speed. Returns its exit status, its stderr and what its group left
    running."""
    tmp = tempfile.mkdtemp(prefix="fmfd-int-")      # short: a Unix socket path is too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKTREE),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([*command, "listen", f"unix:{tmp}/s", "--dir", f"{tmp}/out"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)

    def importing() -> bool:
        # Its first extension module mapped: the import has begun, and Python's own
        # start (where a Ctrl-C is Python's to handle) is over.
        pids = [proc.pid] if who == "the command" else [
            pid for pid in _children(proc.pid) if FORKSERVER in _read(f"/proc/{pid}/cmdline")]
        return any("numpy" in _read(f"/proc/{pid}/maps") for pid in pids)
    try:
        deadline = time.monotonic() + 30
        while not importing():
            assert time.monotonic() < deadline and proc.poll() is None, f"{who}: no numpy"
            time.sleep(0.005)
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)   # until every holder of its stderr ended
        deadline = time.monotonic() + 10
        while process_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return proc.returncode, err, "; ".join(process_group(proc.pid).values())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("entry", ENTRIES)
def test_ctrl_c_from_a_command_s_first_moment_is_one_line(entry):
    """Ctrl-C while the command imports fastmfd (numpy, the core: 0.2 s), before its
    main() handles it, or while the forkserver imports its preloads (a terminal
    signals the group's every process): Python's traceback, from either. Whenever
    it lands, the command says one line and exits with 130, and leaves no process."""
    for who, after in [("the command", after) for after in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4)] \
            + [("the forkserver", after) for after in (0.0, 0.1)]:
        status, err, left = _interrupt_a_listen(ENTRIES[entry], who, after)
        said = [line for line in err.splitlines() if not line.startswith("listening on ")]
        assert "Traceback" not in err and not left, (who, after, err, left)
        assert status == 130 and said in (["fastmfd: interrupted"],
                                          ["fastmfd listen: interrupted"]), (who, after, err)
