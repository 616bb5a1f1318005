"""A Unix socket path left by a killed listener does not block the next one (issue #9),
and nothing else at that path is ever removed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import fastmfd
from filesystems import put_in_the_way

_LISTENER = textwrap.dedent("""
    import sys, fastmfd
    if __name__ == "__main__":
        with fastmfd.Destination("unix:" + sys.argv[1], workers=0) as dst:
            print("listening", flush=True)
            dst.receive()
""")


def test_a_killed_listeners_socket_is_replaced(tmp_path):
    path = str(tmp_path / "dst.sock")
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER, path], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert os.path.exists(path), "the killed listener's socket should still be there"
    with fastmfd.Destination(f"unix:{path}", workers=0) as dst:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)             # the new listener is the one answering
        probe.close()
        dst.cancel()
    assert not os.path.exists(path)


def test_a_live_listener_is_not_displaced(tmp_path):
    path = str(tmp_path / "dst.sock")
    with fastmfd.Destination(f"unix:{path}", workers=0):
        with pytest.raises(fastmfd.ConfigError, match="another process listens"):
            fastmfd.Destination(f"unix:{path}", workers=0)
        assert os.path.exists(path)


def test_a_closing_listener_removes_only_its_own_socket(tmp_path):
    """What was put at the path after it listened (a user's file) is not its socket
    file: it stays (the listener unlinked whatever was at its path)."""
    path = tmp_path / "dst.sock"
    with fastmfd.Destination(f"unix:{path}", workers=0):
        path.unlink()
        path.write_text("the user's")
    assert path.read_text() == "the user's"


@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
def test_what_is_not_a_socket_is_left_alone(tmp_path, kind):
    path = tmp_path / "dst.sock"
    target = tmp_path / "precious"
    target.write_text("keep me")
    put_in_the_way(path, kind, target)
    with pytest.raises(fastmfd.ConfigError, match="not a socket"):
        fastmfd.Destination(f"unix:{path}", workers=0)
    assert os.path.lexists(path) and target.read_text() == "keep me"
    if kind == "file":
        assert path.read_text() == "the user's"
