"""Another user of the same host can neither read nor alter what fastmfd moves, nor
make it write where it should not.

Real users: run as root, the tests play the other user (``nobody``) with
``setpriv``, and where the listener itself must not be root (root may remove any
file in a sticky directory) run it as an unprivileged user of no account (UID).
Directories those users must reach are made in /tmp (pytest's are root's, 0700)
and removed after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as other users")

NOBODY = 65534
UID = 4242              # the listener, where it must not be root


def as_user(uid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture
def shared_dir():
    """A directory under /tmp that every user may write, sticky, as /tmp is."""
    path = tempfile.mkdtemp(prefix="fastmfd-users-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


_OPEN_OUTPUT_DIR = textwrap.dedent("""
    import os, sys
    from fastmfd.errors import ConfigError
    from fastmfd.tools.outputs import OutputDir
    before = set(os.listdir("/proc/self/fd"))
    try:
        OutputDir(sys.argv[1], force=True)
    except ConfigError as exc:
        print("ConfigError:", exc)
    print("left open:", len(set(os.listdir("/proc/self/fd")) - before))
""")


def test_a_part_file_of_another_user_is_refused_cleanly(shared_dir):
    """--force removes a .part left behind; one another user put in a sticky
    directory cannot be: the refusal is a ConfigError naming it, and the
    directory's descriptor is closed (it leaked, with a bare PermissionError)."""
    part = os.path.join(shared_dir, "manifest.json.part")
    assert as_user(NOBODY, "touch", part).returncode == 0
    done = as_user(UID, sys.executable, "-c", _OPEN_OUTPUT_DIR, shared_dir)
    assert done.returncode == 0, done.stderr
    assert f"ConfigError: {part} exists (a file) and cannot be removed: Operation not " \
           f"permitted" in done.stdout
    assert "left open: 0" in done.stdout
