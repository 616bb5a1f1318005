"""The ``fastmfd`` command run as a script, a CI job or a service runs it: no terminal,
its output in a pipe that a reader may close early, file names that are not what a
region can map. Real processes, real pipes."""

from __future__ import annotations

import os
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
