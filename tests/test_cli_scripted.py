"""The ``fastmfd`` command run as a script, a CI job or a service runs it: no terminal,
its output in a pipe that a reader may close early, file names that are not what a
region can map. Real processes, real pipes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from listen_support import REPO, Listener

PAGE = 4096


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def test_an_image_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO for reading waits for a writer: `send FIFO` hung there, before
    any timeout runs (`/dev/zero` or a directory was refused at once)."""
    fifo = tmp_path / "ram.img"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "fastmfd", "send",
                           f"unix:{tmp_path}/nobody", str(fifo)], env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"fastmfd send: region 'ram': {fifo} is not a regular file: " \
                          "a region maps a file\n"


def test_a_status_reader_that_stops_reading_gets_no_traceback(tmp_path):
    """`send --status-json | head -1`: the status thread's write failed (EPIPE) and
    the thread died with a traceback on stderr while the migration went on. Now the
    lines stop, the migration completes, and the command ends as any whose output
    could not be written: status 1, nothing said."""
    image = tmp_path / "ram.img"
    image.write_bytes(os.urandom(2048 * PAGE))
    with Listener(tmp_path / "out", "-q") as listener:
        read_end, write_end = os.pipe()
        sender = subprocess.Popen(
            [sys.executable, "-m", "fastmfd", "send", listener.address, str(image),
             "--max-bandwidth", "4M", "--status-json", "0.05"], env=_env(),
            stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, text=True)
        os.close(write_end)
        with os.fdopen(read_end) as lines:
            assert '"record": "status"' in lines.readline()       # then the reader goes
        _, err = sender.communicate(timeout=120)
        status, listen_err = listener.finish(timeout=60)
    assert "Traceback" not in err and err == "", err
    assert sender.returncode == 1
    assert status == 0, listen_err          # the migration itself was not cut short
    assert (tmp_path / "out" / "ram.img").read_bytes() == image.read_bytes()


_TWICE = """
import os, signal, sys, time
from fastmfd.tools import cli
if len(sys.argv) > 1:                                      # the same-stop window
    import fastmfd.tools.stop_signals as stop_signals
    stop_signals.SAME_STOP_WITHIN = float(sys.argv[1])
signal.signal(signal.SIGTERM, cli._on_stop_signal)         # as the command does
try:
    os.kill(os.getpid(), signal.SIGTERM)                   # timeout(1) to the command
    time.sleep(5)
except KeyboardInterrupt as stop:                          # Terminated: the cleanup runs
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)                   # ... and to its process group
    time.sleep(0.05)
    print("cleaned up", stop.status)
    sys.exit(stop.status)
"""


def test_a_stop_signal_sent_twice_at_once_is_one_stop():
    """`timeout` sends SIGTERM to its command, then to the command's process group:
    twice. The first one's handler made the next one kill the process outright, and
    where the handler ran between the two (1 run in 12 of `timeout 1.5 fastmfd
    listen`), the command died by the signal before its cleanup: nothing said, its
    socket file, directory and .part files left, its peer told nothing."""
    done = subprocess.run([sys.executable, "-c", _TWICE], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (143, "cleaned up 143\n"), done.stderr


def test_a_later_second_sigterm_still_ends_the_command_at_once():
    """A SIGTERM after the same-stop window is another stop: the process ends by it,
    its cleanup cut short (as it was for every second SIGTERM)."""
    done = subprocess.run([sys.executable, "-c", _TWICE, "0"], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and done.stdout == "", done.stderr


def test_timeout_stops_a_listener_cleanly(tmp_path):
    """`timeout 2 fastmfd listen` as a CI job runs it: signalled as timeout(1) does
    (the command, then its process group), it says so, exits 143 and leaves nothing:
    no socket file, no directory it made."""
    for run in range(3):
        with Listener(tmp_path / f"out{run}", "--json") as listener:
            assert listener.proc is not None
            os.kill(listener.proc.pid, signal.SIGTERM)
            os.kill(listener.proc.pid, signal.SIGTERM)
            status, err = listener.finish(timeout=60)
            assert status == 143 and err.endswith("fastmfd listen: terminated (SIGTERM)\n"), err
            assert listener.out == "" and not (tmp_path / f"out{run}").exists()
            assert not os.path.exists(listener.address[5:])


def test_an_image_path_with_an_equals_sign_is_a_path(tmp_path):
    """`send ADDRESS runs/id=3/ram.img` was split as NAME=PATH: region 'runs/id' from the
    file `3/ram.img`, which did not exist (exit 2), or was another file, sent in its
    place. A whole text that is a file, its part after `=` not, is that file."""
    run = tmp_path / "id=3"
    run.mkdir()
    image = run / "ram.img"
    image.write_bytes(os.urandom(8 * PAGE))
    with Listener(tmp_path / "out", "-q") as listener:
        sent = subprocess.run([sys.executable, "-m", "fastmfd", "send", listener.address,
                               str(image), "-q"], env=_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0 and sent.stderr == "", sent.stderr
        status, err = listener.finish(timeout=60)
    assert status == 0, err
    assert (tmp_path / "out" / "ram.img").read_bytes() == image.read_bytes()
    (tmp_path / "3").mkdir()                    # both readings name a file: which, is asked
    (tmp_path / "3" / "ram.img").write_bytes(bytes(PAGE))
    both = subprocess.run([sys.executable, "-m", "fastmfd", "send", "unix:nobody",
                           "id=3/ram.img"], env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert both.returncode == 2 and "give NAME=PATH to say which (e.g. ram=id=3/ram.img)" \
        in both.stderr, both.stderr


def test_an_image_whose_file_name_is_no_region_name_says_so(tmp_path):
    """A bare PATH names its region after the file: one whose name is no UTF-8 was
    refused as "region name 'im\\udce9g' must be ...", a name the user never typed."""
    image = os.path.join(os.fsencode(tmp_path), b"im\xe9g.img")
    with open(image, "wb") as f:
        f.write(bytes(PAGE))
    sent = subprocess.run([os.fsencode(sys.executable), b"-m", b"fastmfd", b"send",
                           b"unix:nobody", image], env=_env(), capture_output=True,
                          timeout=120)
    assert sent.returncode == 2, sent.stderr
    assert b"its file name gives the region name 'im\\udce9g'" in sent.stderr, sent.stderr
    assert b"give NAME=PATH" in sent.stderr, sent.stderr
