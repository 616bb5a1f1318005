"""The files that decide who may connect — the shared key, TLS certificates, keys and
CA bundles — are taken only where no other user can change them (ssh's
``StrictModes``, the rule ``--dir`` follows): each file and every directory above it
is the user's or root's, and no other may write it (a sticky directory, as /tmp,
lets no one replace another's file). Another user who could add their CA to a
listener's bundle was an accepted source, their image written (a review).

Real TLS (trustme) and real users: files are given to ``nobody`` only as root (the
tests that need it are skipped otherwise); a mode others may write needs no root.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import stat
import struct
import tempfile
import time

import pytest
import trustme

import fastmfd
from fastmfd.ownership import check_trusted_file
from fastmfd.protocol import handshake
from fastmfd.protocol.security import read_key_file
from listen_support import Listener, run_cli

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0,
                               reason="only root can give a file to another user")


def _pem(path, blob, mode=0o600) -> str:
    blob.write_to_path(str(path))
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def credentials(tmp_path):
    """A destination's certificate, key and CA bundle, each in a directory of its own
    (so that one directory can be opened to others): {name: path}."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    for name in ("cert", "key", "ca"):
        (tmp_path / name).mkdir()
    return {"cert": _pem(tmp_path / "cert" / "server.pem", server.cert_chain_pems[0], 0o644),
            "key": _pem(tmp_path / "key" / "server-key.pem", server.private_key_pem),
            "ca": _pem(tmp_path / "ca" / "ca.pem", ca.cert_pem, 0o644)}


@pytest.fixture
def readable_dir():
    """A directory of this user's under /tmp that others may read (pytest's are 0700)."""
    path = tempfile.mkdtemp(prefix="fastmfd-trusted-", dir="/tmp")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


def _key_file(directory, mode: int = 0o600) -> str:
    path = os.path.join(directory, "key")
    with open(path, "wb") as f:
        f.write(b"k" * 32)
    os.chmod(path, mode)
    return path


@ROOT_ONLY
def test_a_key_file_another_user_owns_is_refused(tmp_path):
    """Mode 0600 is private to its owner: another user who owns the key file can
    rewrite it, and then prove it."""
    key = _key_file(tmp_path)
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(fastmfd.ConfigError, match=f"the key file {key}: {key} belongs to "
                                                  f"another user \\(uid {NOBODY}\\), who "
                                                  f"could change what it says"):
        read_key_file(key)


def test_a_key_file_in_a_directory_others_may_write_is_refused(tmp_path):
    """Anyone may rename the key away and put theirs in its place: refused, with
    what to do; in a sticky directory (as /tmp) no one may, and it is taken."""
    key = _key_file(tmp_path)
    os.chmod(tmp_path, 0o777)
    with pytest.raises(fastmfd.ConfigError, match=f"the key file {key}: others may write in "
                                                  f"{tmp_path} \\(mode 0777\\) and replace "
                                                  f"the files there; chmod go-w {tmp_path}$"):
        read_key_file(key)
    os.chmod(tmp_path, 0o1777)
    assert read_key_file(key) == b"k" * 32


@pytest.mark.parametrize("name", ["cert", "key", "ca"])
def test_a_tls_file_in_a_directory_others_may_write_is_refused(credentials, name):
    directory = os.path.dirname(credentials[name])
    os.chmod(directory, 0o777)
    with pytest.raises(fastmfd.ConfigError, match=f"TLSConfig.{name} {credentials[name]}: "
                                                  f"others may write in {directory} "
                                                  f"\\(mode 0777\\)"):
        fastmfd.TLSConfig(**credentials)
    os.chmod(directory, 0o1777)
    assert fastmfd.TLSConfig(**credentials).ca == credentials["ca"]


@pytest.mark.parametrize("name", ["cert", "ca"])
def test_a_certificate_or_ca_bundle_others_may_write_is_refused(credentials, name):
    """A CA bundle others may write lets them add their CA: the file itself."""
    os.chmod(credentials[name], 0o666)
    with pytest.raises(fastmfd.ConfigError, match=f"TLSConfig.{name} {credentials[name]}: "
                                                  f"others may write to {credentials[name]} "
                                                  f"\\(mode 0666\\) and change what it says; "
                                                  f"chmod go-w {credentials[name]}$"):
        fastmfd.TLSConfig(**credentials)


@ROOT_ONLY
@pytest.mark.parametrize("name", ["cert", "key", "ca"])
def test_a_tls_file_another_user_owns_is_refused(credentials, name):
    os.chown(credentials[name], NOBODY, NOBODY)
    with pytest.raises(fastmfd.ConfigError, match=f"TLSConfig.{name} {credentials[name]}: "
                                                  f"{credentials[name]} belongs to another "
                                                  f"user \\(uid {NOBODY}\\)"):
        fastmfd.TLSConfig(**credentials)


@ROOT_ONLY
def test_root_s_files_are_anyone_s_to_trust_another_user_s_are_not(readable_dir):
    """Run as another user (a fork as ``nobody``), a root-owned file in root's
    directories (a system CA bundle in /etc) is taken, and one of a third user
    refused: the same rule whoever runs it."""
    system = _pem(readable_dir / "system-ca.pem", trustme.CA().cert_pem, 0o644)
    theirs = _pem(readable_dir / "theirs-ca.pem", trustme.CA().cert_pem, 0o644)
    os.chown(theirs, 4242, 4242)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                        # (the child: it only ever leaves by _exit)
        said = []
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            for path in (system, theirs):
                try:
                    check_trusted_file(path, "CA")
                    said.append("taken")
                except fastmfd.ConfigError as exc:
                    said.append(str(exc))
        finally:
            os.write(write_end, "\n".join(said).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as there:
        said = there.read().split("\n")
    os.waitpid(pid, 0)
    assert said == ["taken", f"CA {theirs}: {theirs} belongs to another user (uid 4242), who "
                             f"could change what it says; use a file of your own, in "
                             f"directories only you or root may change"]


def test_each_load_checks_again(credentials):
    """The files are loaded by path on each connection (the main channel's context,
    each channel's TLS in the core, on either side): one opened to others after
    the listener started is refused there, before it is read, not trusted."""
    tls = fastmfd.TLSConfig(**credentials)
    os.chmod(credentials["ca"], 0o666)
    refused = f"TLSConfig.ca {credentials['ca']}: others may write to"
    with pytest.raises(fastmfd.ConfigError, match=refused):
        tls.server_context()
    with pytest.raises(fastmfd.ConfigError, match=refused):
        tls.client_context("localhost")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(fastmfd.ConfigError, match=refused):
            handshake.tls_accept(ours, tls, time.monotonic() + 5, "channel 0")
        with pytest.raises(fastmfd.ConfigError, match=refused):
            handshake._tls_connect(ours, tls, "localhost", time.monotonic() + 5, "channel 0")


def test_a_ca_another_user_adds_to_a_listener_s_bundle_is_not_trusted(tmp_path, credentials):
    """End to end: the listener's CA bundle is opened to others (0666) after it
    started, and another party appends its own CA and sends with a certificate of
    it: refused at the greeting, the reason in the listener's log, nothing
    written. Without the check it was accepted and its image written into DIR."""
    evil = trustme.CA()
    intruder = evil.issue_cert("intruder")
    cert = _pem(tmp_path / "intruder.pem", intruder.cert_chain_pems[0], 0o644)
    key = _pem(tmp_path / "intruder-key.pem", intruder.private_key_pem)
    their_view = tmp_path / "their-ca.pem"          # the listener's CA, as the intruder has it
    their_view.write_bytes(open(credentials["ca"], "rb").read())
    image = tmp_path / "stolen.img"
    image.write_bytes(os.urandom(1 << 16))
    out = tmp_path / "out"
    with Listener(out, "--tls-cert", credentials["cert"], "--tls-key", credentials["key"],
                  "--tls-ca", credentials["ca"]) as listener:
        os.chmod(credentials["ca"], 0o666)
        with open(credentials["ca"], "ab") as bundle:
            bundle.write(evil.cert_pem.bytes())
        sent = run_cli("send", listener.address, str(image), "--tls-cert", cert,
                       "--tls-key", key, "--tls-ca", str(their_view), timeout=60)
        listener.proc.terminate()
        status, log = listener.finish()
    assert sent.returncode != 0, sent.stderr
    assert not out.exists() or os.listdir(out) == []
    assert (f"refused a connection from a local process: ConfigError: TLSConfig.ca "
            f"{credentials['ca']}: others may write to {credentials['ca']} (mode 0666)"
            in log), log


def _give_acl(path: str, uid: int | None, perms: int) -> None:
    """``setfacl -m u:UID:PERMS PATH`` (perms: 4 read, 2 write; no UID: the mask entry
    alone, as ``setfacl -x`` of the last named entry leaves it), by writing the
    extended attribute the kernel reads; the test is skipped on a file system without
    ACLs."""
    mode = os.stat(path).st_mode
    anyone = 0xffffffff                 # (ACL_UNDEFINED_ID: the entries that name no one)
    named = [] if uid is None else [(0x02, perms, uid)]                 # user:UID:
    entries = [(0x01, mode >> 6 & 7, anyone), *named,                   # user::
               (0x04, mode >> 3 & 7, anyone),                           # group::
               (0x10, (mode >> 3 & 7) | perms, anyone), (0x20, mode & 7, anyone)]  # mask, o
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", blob)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this file system: {exc}")


def _refused_for_an_acl(what: str, path: str, verb: str) -> str:
    return (f"{what}: an ACL lets user {NOBODY} {verb} {path} \\(getfacl {path}\\); "
            f"remove that entry: setfacl -x u:{NOBODY} {path}$")


@ROOT_ONLY
@pytest.mark.parametrize("on", ["file", "directory"])
def test_a_ca_bundle_another_user_may_write_through_an_acl_is_refused(credentials, on):
    """With an ACL the mode's group bits are its mask: 0664 on a file of root's own
    group (no other member: taken) then means a named user may write it. Such a
    CA bundle, or a directory on its way, was taken (a review, D1)."""
    ca = credentials["ca"]
    target = ca if on == "file" else os.path.dirname(ca)
    _give_acl(target, NOBODY, 6 if on == "file" else 7)
    assert os.stat(target).st_mode & 0o020          # (the mask: as the owning group's write)
    with pytest.raises(fastmfd.ConfigError,
                       match=_refused_for_an_acl(f"TLSConfig.ca {ca}", target, "write")):
        fastmfd.TLSConfig(**credentials)


def test_a_private_key_another_user_may_read_through_an_acl_is_refused(credentials):
    """0640 lets a key's group read it; with an ACL those bits are the mask, and
    ``setfacl -m u:nobody:r`` let that user read the key, taken as private."""
    key = credentials["key"]
    _give_acl(key, NOBODY, 4)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o640
    with pytest.raises(fastmfd.ConfigError, match=_refused_for_an_acl("TLSConfig.key", key,
                                                                   "read")):
        fastmfd.TLSConfig(**credentials)


@ROOT_ONLY
@pytest.mark.parametrize("acl", ["a mask alone", "a named user denied", "a read-only share"])
def test_an_acl_that_lets_no_other_user_in_is_taken(credentials, acl):
    """An ACL is refused for the entries that let another user write (read, for the
    key), not for being there: a mask left alone, a user denied everything, a
    directory shared read-only with a service were refused (a review), with advice
    (setfacl -b) that would undo a share."""
    ca, key = credentials["ca"], credentials["key"]
    uid, perms = {"a mask alone": (None, 0), "a named user denied": (NOBODY, 0),
                  "a read-only share": (NOBODY, 5)}[acl]
    os.chmod(os.path.dirname(ca), 0o775)        # its group (root's own) may write: the mask
    _give_acl(os.path.dirname(ca), uid, perms)
    if uid is None or perms & 4 == 0:           # (a share that reads the key is refused)
        os.chmod(key, 0o640)                    # its group may read: the mask, named none
        _give_acl(key, uid, perms)
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o640
    assert os.stat(os.path.dirname(ca)).st_mode & 0o020
    fastmfd.TLSConfig(**credentials)
