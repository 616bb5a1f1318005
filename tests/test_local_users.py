"""Another user of the same host can neither read nor alter what fastmfd moves, nor
make it write where it should not.

Real users: run as root, the tests play the other user (``nobody``) with
``setpriv``, and where the listener itself must not be root (root may remove any
file in a sticky directory) run it as an unprivileged user of no account (UID).
Directories those users must reach are made in /tmp (pytest's are root's, 0700)
and removed after.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

import pytest

import fastmfd
from fastmfd import qemu
from fastmfd.errors import ConfigError
from fastmfd.shm import SEGMENT_PREFIX, SHM_DIR, SharedMemory
from fastmfd.tools.outputs import OutputDir

from listen_support import Listener, run_cli
from test_qemu_receive import capture_bytes, receive_replay

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as other users")

NOBODY = 65534
UID = 4242              # the listener, where it must not be root
PAGE = 4096


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


def in_a_fork_as(uid: int, call: Callable[[], str]) -> tuple[int, str]:
    """``call()`` in a fork of this process run as user ``uid``: (its exit status, what
    it returned or raised). fastmfd is imported already: the other user need not be
    able to read the tree it came from (a CI's clone may be 0700)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                            # (the child: it only ever leaves by _exit)
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            said, status = call(), 0
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, said.encode())
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as said_there:
        said = said_there.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), said


def test_a_part_file_of_another_user_is_refused_cleanly(shared_dir):
    """--force removes a .part left behind; one another user put in a sticky
    directory cannot be: the refusal is a ConfigError naming it, and the
    directory's descriptor is closed (it leaked, with a bare PermissionError)."""
    part = os.path.join(shared_dir, "manifest.json.part")
    assert as_user(NOBODY, "touch", part).returncode == 0

    def open_output_dir() -> str:
        before = set(os.listdir("/proc/self/fd"))
        try:
            OutputDir(shared_dir, force=True)
            said = "opened"
        except ConfigError as exc:
            said = f"ConfigError: {exc}"
        return f"{said}\nleft open: {len(set(os.listdir('/proc/self/fd')) - before)}"
    status, said = in_a_fork_as(UID, open_output_dir)
    assert status == 0, said
    assert f"ConfigError: {part} exists (a file) and cannot be removed: Operation not " \
           f"permitted" in said, said
    assert "left open: 0" in said, said


def _image(directory: str) -> str:
    path = os.path.join(directory, "ram.img")
    with open(path, "wb") as f:
        f.write(b"a secret page".ljust(PAGE, b"."))
    return path


@pytest.mark.parametrize("other", ["owner", "writer"])
def test_a_directory_another_user_can_change_is_refused(shared_dir, tmp_path, other):
    """Another user made the directory (in /tmp, under a name they guessed), or may
    write in it: they could swap the saved memory for theirs once it is written.
    The listener refuses it before it listens, and writes nothing there."""
    out = os.path.join(shared_dir, "vm1")
    if other == "owner":
        assert as_user(NOBODY, "mkdir", "-m", "0755", out).returncode == 0
        why = f"{out} belongs to another user (uid {NOBODY})"
    else:
        os.mkdir(out)
        os.chmod(out, 0o777)
        why = f"others may write in {out} (mode 0777)"
    for sessions in ([], ["--max-sessions", "2", "--prealloc"]):
        done = run_cli("listen", f"unix:{tmp_path}/sock", "--dir", out, *sessions)
        assert done.returncode != 0 and why in done.stderr, done.stderr
        assert os.listdir(out) == []


def test_a_directory_above_that_another_user_owns_is_refused(shared_dir, tmp_path):
    """Its owner could rename the directory away and put another in its place."""
    theirs = os.path.join(shared_dir, "theirs")
    assert as_user(NOBODY, "mkdir", "-m", "0777", theirs).returncode == 0
    out = os.path.join(theirs, "vm1")
    done = run_cli("listen", f"unix:{tmp_path}/sock", "--dir", out)
    assert done.returncode != 0, done.stderr
    assert f"{theirs} belongs to another user (uid {NOBODY})" in done.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize("options", [["--force"], ["--force", "--max-sessions", "2"]])
def test_a_directory_through_another_users_link_is_refused(shared_dir, tmp_path, options):
    """A link another user put in /tmp under the name given to --dir, to another save
    of the user's: only the directory it led to was checked (the user's own), so the
    listener wrote there, and with --force replaced that save's files (a review;
    the kernel's fs.protected_symlinks refuses such a link only where it is set)."""
    save = tmp_path / "another-save"
    save.mkdir(mode=0o700)
    (save / "ram.img").write_bytes(b"the user's other save")
    link = os.path.join(shared_dir, "vmsave")
    os.symlink(save, link)
    os.lchown(link, NOBODY, NOBODY)
    done = run_cli("listen", f"unix:{tmp_path}/sock", "--dir", link, *options)
    assert done.returncode == 2, done.stderr
    assert (f"{link} is a symbolic link of another user (uid {NOBODY}), who chose where "
            f"it leads" in done.stderr), done.stderr
    assert os.listdir(save) == ["ram.img"]
    assert (save / "ram.img").read_bytes() == b"the user's other save"


def test_a_directory_through_the_users_own_link_is_taken(shared_dir, tmp_path):
    """The same link, the user's own (the sticky directory keeps others from
    replacing it), and a ".." after it, taken from the link's target as the
    kernel takes it."""
    (tmp_path / "saves" / "inner").mkdir(parents=True)
    link = os.path.join(shared_dir, "vmsave")
    os.symlink(tmp_path / "saves" / "inner", link)
    out = OutputDir(os.path.join(link, "..", "vm1"))
    try:
        assert out.real == str(tmp_path / "saves" / "vm1")
    finally:
        out.abort()
        out.close()
    assert os.listdir(tmp_path / "saves") == ["inner"]


NOGROUP = 65534         # nobody's group: a group of another user


@pytest.mark.parametrize("group", ["own", "another's"])
def test_a_directory_its_users_own_group_may_write_is_taken(tmp_path, group):
    """Where each user has a group of their own, Fedora's and RHEL's umask 002 makes
    every directory they make group-writable by that group, which holds them
    alone: such a directory is taken (it was refused, 'chmod go-w'), as Debian's
    ssh takes it. One another user's group may write is still refused."""
    gid = 0 if group == "own" else NOGROUP
    others = [user.pw_name for user in pwd.getpwall() if user.pw_gid == 0 and user.pw_uid]
    if group == "own" and (others or grp.getgrgid(0).gr_mem):
        pytest.skip("root's group has other members on this host")
    vms = tmp_path / "vms"
    vms.mkdir()
    os.chown(vms, 0, gid)
    os.chmod(vms, 0o775)
    out = os.path.join(vms, "vm1")
    if group == "own":
        taken = OutputDir(out)
        taken.abort()           # (removes vm1, which it made)
        taken.close()
    else:
        with pytest.raises(ConfigError, match=f"others may write in {vms} \\(mode 0775\\)"):
            OutputDir(out)
    assert os.listdir(vms) == []


def test_a_sticky_directory_and_one_made_under_a_lax_umask_are_taken(shared_dir, tmp_path):
    """In a sticky directory (/tmp) nobody renames another's files: the listener
    writes there. A directory it makes is never writable by others, whatever the
    umask (under umask 000 it was 0777: anyone could replace its files)."""
    out = os.path.join(shared_dir, "made", "vm1")
    with Listener(out, preexec_fn=lambda: os.umask(0)) as listener:
        sent = run_cli("send", listener.address, _image(str(tmp_path)), "--quiet")
        assert sent.returncode == 0, sent.stderr
        assert listener.finish()[0] == 0
    for made in (out, os.path.dirname(out)):
        assert os.stat(made).st_mode & 0o7777 == 0o755
    assert sorted(os.listdir(out)) == ["manifest.json", "ram.img"]


def test_a_session_directory_another_user_planted_as_a_link_is_not_followed(shared_dir,
                                                                            tmp_path):
    """In a sticky DIR (/tmp) another user may make DIR/<uuid>, the name of the
    directory a session of that uuid (the source's choice) is received into: made
    a link to a directory of the listener's user, the session's files went there
    (a review)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    uuid = bytes(range(16))
    planted = os.path.join(shared_dir, uuid.hex())
    os.symlink(private, planted)
    os.lchown(planted, NOBODY, NOBODY)
    with Listener(shared_dir, "--max-sessions", "2") as listener:
        source = fastmfd.Source(listener.address)
        source.uuid = uuid                  # (before it starts)
        with source, fastmfd.Region.create("ram", 16 * PAGE) as region:
            source.add_region(region)
            with pytest.raises(fastmfd.MigrationError, match="exists already"):
                source.migrate(live=False)
        sent = run_cli("send", listener.address, _image(str(tmp_path)), "--quiet")
        assert sent.returncode == 0, sent.stderr        # the next session goes on
        assert listener.finish()[0] == 1
    assert os.listdir(private) == [] and os.path.islink(planted)


_CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


def test_only_the_listeners_user_may_connect_to_its_unix_socket(shared_dir):
    """Who may connect to a Unix socket is who may write its file. It was made as
    the umask said: under umask 000, 0777, and any user of the host could connect
    first and, without an auth key, be the source. Now it is 0600 whatever the
    umask (the user chmods it for another user, QEMU run as its own, say)."""
    path = os.path.join(shared_dir, "dst.sock")
    previous = os.umask(0)
    try:
        with fastmfd.Destination(f"unix:{path}", workers=0) as dst:
            assert os.stat(path).st_mode & 0o777 == 0o600
            tried = as_user(NOBODY, sys.executable, "-c", _CONNECT, path)
            dst.cancel()
    finally:
        os.umask(previous)
    assert tried.returncode != 0 and "PermissionError" in tried.stderr, tried.stderr


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_segment_another_user_put_under_a_segments_name_is_not_mapped(tmp_path, kind):
    """Segment names are listed in /dev/shm; once the owner unlinked one (a failed
    session), another user could make a file of that name for a late attacher
    (a worker still starting) to map and write into, or a link to a file of this
    user's, to have it written: only this user's own segment is mapped."""
    name = f"{SEGMENT_PREFIX}test-{os.getpid()}"
    path = os.path.join(SHM_DIR, name)
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me".ljust(4096))
    if kind == "file":
        made = as_user(NOBODY, "sh", "-c", f"umask 0 && head -c 4096 /dev/zero > {path}")
        why = f"{name}' belongs to another user \\(uid {NOBODY}\\): not mapping it"
    else:
        made = as_user(NOBODY, "ln", "-s", str(precious), path)
        why = f"{name}': cannot open it: Too many levels of symbolic links"
    try:
        assert made.returncode == 0, made.stderr
        with pytest.raises(ConfigError, match=why):
            SharedMemory.attach(name)
    finally:
        os.unlink(path)
    assert precious.read_bytes() == b"keep me".ljust(4096)


@pytest.mark.parametrize("planted", ["the directory", "a mode 0777 directory",
                                     "files in a sticky directory"])
def test_a_save_another_user_could_have_planted_is_not_sent(shared_dir, qemu72_captures,
                                                            planted):
    """send --qemu reads a directory whose bytes become a guest's memory and
    devices: what listen --qemu would not write there (another user's, or one
    others may write in), it does not read either (both were sent, a review)."""
    saved = os.path.join(shared_dir, "saved")
    receive_replay(saved, capture_bytes(qemu72_captures, "none"))
    files = [os.path.join(saved, name) for name in os.listdir(saved)]
    if planted == "the directory":
        for path in [saved, *files]:
            os.chown(path, NOBODY, NOBODY)
        expected = f"saved directory {saved}: {saved} belongs to another user (uid {NOBODY})"
    elif planted == "a mode 0777 directory":
        os.chmod(saved, 0o777)
        expected = f"others may write in {saved} (mode 0777)"
    else:
        os.chmod(saved, 0o1777)
        for path in files:
            os.chown(path, NOBODY, NOBODY)
        expected = f"{saved}/manifest.json: it belongs to another user (uid {NOBODY})"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        qemu.send("tcp:127.0.0.1:9", saved)
