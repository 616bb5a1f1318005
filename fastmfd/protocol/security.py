"""Who may talk to whom: TLS settings and the shared-key proof (DESIGN §4.7).

Two independent protections, usable together:

- **TLS** (:class:`TLSConfig`): every connection of a session — the main
  channel and each multifd channel — is a TLS 1.2+ connection (1.3 preferred).
  The source verifies the destination's certificate against ``ca`` and
  ``hostname``; a destination given ``ca`` requires and verifies a client
  certificate (QEMU's ``verify-peer=on``) and may restrict the accepted
  identities (``authz``, QEMU's ``tls-authz``). The main channel uses Python's
  :mod:`ssl`; each channel's worker process runs its own handshake in the
  Cython core (an ``SSLContext`` cannot cross a process boundary, so the
  config holds paths and plain values).
- **auth_key**: every connection proves knowledge of a shared key with an
  HMAC-SHA256 challenge-response bound to the session UUID and the channel
  (:func:`prove_key` / :func:`check_key_proof`); a recorded exchange cannot be
  replayed into another connection, session or channel, because each side's
  proof covers a fresh nonce of the other. It authenticates; it does not
  encrypt.

::

    client                                       server
      nonce_c (32 bytes)                 ──▶
                                         ◀──     nonce_s, HMAC(key, "server" | uuid | channel | nonce_c | nonce_s)
      HMAC(key, "client" | uuid | channel | nonce_s | nonce_c)  ──▶
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import os
import select
import socket
import stat
import ssl
import time
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..arguments import BYTES, PATH, STR, check_types, optional, type_error
from ..errors import ConfigError, SecurityError
from ..ownership import READ, check_trusted_file, refuse_acl

__all__ = ["TLSConfig", "ChannelSecurity", "AuthKey", "MIN_AUTH_KEY_BYTES", "NONCE_SIZE",
           "PROOF_SIZE", "MAIN_CHANNEL_ID", "hidden_key", "check_auth_key", "read_key_file",
           "identities_of",
           "check_authz", "tls_handshake", "is_tls_record", "Stream", "prove_key",
           "check_key_proof", "default_hostname"]

MIN_AUTH_KEY_BYTES = 16
NONCE_SIZE = 32
PROOF_SIZE = hashlib.sha256().digest_size
MAIN_CHANNEL_ID = 0xFFFFFFFF        # the channel number a main-channel proof is bound to
TLS_HANDSHAKE_RECORD = 0x16         # the first byte of every TLS connection


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings for one side: file paths and plain values, so every worker
    process can build its own context from them.

    ``cert``/``key``: this side's certificate chain and private key (PEM);
    required on a destination, and on a source whose destination verifies
    clients. ``ca``: the CA bundle the peer's certificate must chain to (a
    source without it uses the system's trust store; a destination with it
    requires client certificates). ``hostname``: the name (or IP address) the
    destination's certificate must carry; default: the host of the address
    (no check on a Unix socket unless given). ``authz``: on a destination, the
    client identities accepted (subject CN or a subjectAltName). ``ciphers``:
    an OpenSSL cipher list for TLS 1.2 and/or TLS 1.3 suite names (``TLS_*``);
    a list of one kind only turns the other version off. On the main channel
    TLS 1.3 uses OpenSSL's default suites (Python's :mod:`ssl` cannot choose
    them); the channels use the suites named.
    """

    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    ca: str | os.PathLike[str] | None = None
    hostname: str | None = None
    authz: Sequence[str] | None = None      # kept as a tuple
    ciphers: str | None = None

    def __post_init__(self) -> None:
        check_types("TLSConfig", cert=(self.cert, optional(PATH)), key=(self.key, optional(PATH)),
                    ca=(self.ca, optional(PATH)), hostname=(self.hostname, optional(STR)),
                    ciphers=(self.ciphers, optional(STR)))
        if self.authz is not None:
            # Taken once: an iterator checked, then kept, was kept empty (every client
            # refused); something that is no iterable a TypeError naming it, as a str is.
            try:
                names = None if isinstance(self.authz, str) else tuple(self.authz)
            except TypeError:
                names = None
            if names is None or not all(isinstance(a, str) for a in names):
                raise type_error("TLSConfig(authz)", "a list of identity strings", self.authz)
            object.__setattr__(self, "authz", names)
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLSConfig needs both cert and key, or neither")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None:
                object.__setattr__(self, name, os.fspath(path))     # kept as a str
                _check_readable(path, f"TLSConfig.{name}", parameter=name)
        # Loaded once now, as a destination's context loads them (no system CA store):
        # a file that does not load fails here, named, not at the first connection.
        self._context(ssl.Purpose.CLIENT_AUTH)

    def check_dates(self) -> None:
        """ConfigError if ``cert`` is out of its dates (expired, not yet valid), or every
        CA certificate of ``ca`` is: such files load, and the peer (or this side) refuses
        them at each handshake. The commands check before any connection; the library
        leaves it to the handshake, as OpenSSL does (a certificate may expire while a
        listener runs, and the clocks of the two hosts may differ)."""
        if self.cert is not None:
            _check_dates(os.fspath(self.cert))
        if self.ca is not None:
            _check_ca_dates(os.fspath(self.ca))

    def check_files(self) -> None:
        """ConfigError unless only this user or root can change the files that say whom
        this side trusts and who it is (:func:`check_trusted_file`), and the key is
        private. Each is checked before every load: they are loaded by path, once
        per connection (here and in each channel's worker), so a file opened to
        others after this side started is refused then, not trusted."""
        if self.key is not None:
            _check_private(self.key)
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None:
                check_trusted_file(path, f"TLSConfig.{name}")

    def check_server(self) -> None:
        """ConfigError unless it can be a destination's: that needs ``cert`` and ``key``,
        and takes no ``hostname`` (a source's check, which would be ignored here)."""
        if self.cert is None:
            raise ConfigError("a TLS destination needs its own certificate: TLSConfig(cert=..., "
                              "key=...)")
        if self.hostname is not None:
            raise ConfigError("TLSConfig.hostname is the name a source checks in its "
                              "destination's certificate; a destination checks its sources "
                              "with authz=")

    def check_client(self) -> None:
        """ConfigError if it holds what only a destination uses: ``authz``, which a
        source would ignore (it checks its destination by ``hostname``)."""
        if self.authz is not None:
            raise ConfigError("TLSConfig.authz names the sources a destination accepts; a "
                              "source checks its destination's certificate with hostname=")

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        self.check_files()
        server = purpose is ssl.Purpose.CLIENT_AUTH
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None:
            assert self.key is not None, "checked: both or neither"
            _load_chain(ctx, self.cert, self.key)
        if self.ca is not None:
            _load_ca(ctx, self.ca)
        what = ""
        try:
            if self.ca is None and not server:
                what = "system's CA certificates"
                ctx.load_default_certs(purpose)
            if self.ciphers is not None:
                what = f"ciphers {self.ciphers!r}"
                _restrict_ciphers(ctx, self.ciphers)
        except (ssl.SSLError, OSError) as exc:
            # (set_ciphers' SSLError says its one argument as a tuple: "('No cipher can
            # be selected.',)")
            said = exc.args[0] if len(exc.args) == 1 else exc.strerror or exc
            message = f"TLS configuration: cannot load the {what}: {said}"
            if what.startswith("ciphers"):
                raise ConfigError(message, parameter="ciphers",
                                  problem=f"OpenSSL cannot use it: {said}") from None
            raise ConfigError(message) from None
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.ca is not None else ssl.CERT_NONE
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """The destination's context for its main channel."""
        self.check_server()
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self, hostname: str | None) -> ssl.SSLContext:
        """The source's context for its main channel (``hostname`` None: no name check)."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = hostname is not None
        return ctx


# What a TLS file's problem is said as (ConfigError.problem: in words that name no
# option, which a command says of its --tls-* option).
NO_CERTIFICATE = "no certificate in the file (PEM: -----BEGIN CERTIFICATE-----)"


def _file_error(name: str, path: str | os.PathLike[str], problem: str) -> ConfigError:
    return ConfigError(f"TLSConfig.{name}: {os.fspath(path)}: {problem}", parameter=name,
                       problem=problem)


def _no_passphrase() -> bytes:
    """load_cert_chain's password callback: without one, OpenSSL asked for an encrypted
    key's passphrase on the terminal (and each channel's worker could not)."""
    raise ConfigError("encrypted", parameter="key",
                      problem="the private key is encrypted: give one without a passphrase")


def _holds_a_certificate(path: str | os.PathLike[str]) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except ssl.SSLError:
        return False
    return True


def _load_chain(ctx: ssl.SSLContext, cert: str | os.PathLike[str],
                key: str | os.PathLike[str]) -> None:
    """``cert`` and ``key`` into ``ctx``; a ConfigError naming the one that is wrong and
    why (OpenSSL said "[SSL] PEM lib" of either, a missing certificate or key alike)."""
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ConfigError as exc:
        raise _file_error("key", key, exc.problem) from None
    except (ssl.SSLError, OSError) as exc:
        if not _holds_a_certificate(cert):
            raise _file_error("cert", cert, NO_CERTIFICATE) from None
        reason = getattr(exc, "reason", None)
        if reason == "KEY_VALUES_MISMATCH":
            raise _file_error("key", key, "not the private key of the certificate given "
                                          "with it") from None
        if reason is not None:      # the certificate refused, for OpenSSL's own reason
            said = str(exc).split(" (_ssl.c:")[0]       # ("ee key too small": its key's size)
            raise _file_error("cert", cert, f"OpenSSL refuses the certificate: {said}") from None
        # (a key file that holds no key that loads: OpenSSL gives no reason, "PEM lib")
        raise _file_error("key", key, "no private key in the file (PEM: -----BEGIN ... "
                                      "PRIVATE KEY-----)") from None


def _load_ca(ctx: ssl.SSLContext, ca: str | os.PathLike[str]) -> None:
    try:
        ctx.load_verify_locations(ca)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None)
        raise _file_error("ca", ca, NO_CERTIFICATE if reason == "NO_CERTIFICATE_OR_CRL_FOUND"
                          else f"not a PEM CA bundle that loads ({reason or exc})") from None


def _out_of_dates(not_before: str, not_after: str) -> str | None:
    """Why a certificate valid from ``not_before`` to ``not_after`` (OpenSSL's text) is
    not valid now; None if it is."""
    now = time.time()
    try:
        after, before = (ssl.cert_time_to_seconds(when) for when in (not_after, not_before))
    except (ValueError, OverflowError):
        # A date OpenSSL loads but prints otherwise ('Jan  1 00:00:00.5 2027 GMT':
        # fractional seconds, which its verification refuses: 'format error in
        # certificate's notBefore field'), or cannot print ('Bad time value'): this
        # raised ValueError, a traceback out of send and listen.
        return f"has a date that cannot be read (from {not_before!r} to {not_after!r})"
    if after < now:
        return f"expired on {not_after}"
    if before > now:
        return f"is not valid until {not_before}"
    return None


def _check_dates(cert: str) -> None:
    """ConfigError unless the certificate (the chain's first) is valid now: it loads, and
    the peer refused it at the handshake ("certificate expired"), on its side only."""
    # CPython's decoder (its tests'; ssl has no public one for a file): None elsewhere.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return
    decoded = decode(cert)
    why = _out_of_dates(str(decoded["notBefore"]), str(decoded["notAfter"]))
    if why is not None:
        raise _file_error("cert", cert, f"the certificate {why}")


def _check_ca_dates(ca: str) -> None:
    """ConfigError if every certificate of ``ca`` is a CA certificate out of its dates: no
    peer's certificate can chain to it now (a bundle with one still valid is taken, and
    one with a certificate that is no CA's, which get_ca_certs leaves out: OpenSSL trusts
    a self-signed one there as it is, a pinned peer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    found = ctx.get_ca_certs()
    whys = [_out_of_dates(str(each["notBefore"]), str(each["notAfter"])) for each in found]
    if found and all(whys) and len(found) == ctx.cert_store_stats()["x509"]:
        raise _file_error("ca", ca, f"the CA certificate {whys[0]}" if len(whys) == 1 else
                          f"each of its {len(whys)} CA certificates is out of its dates")


def _restrict_ciphers(ctx: ssl.SSLContext, ciphers: str) -> None:
    """``ciphers`` on a main-channel context, as the core's TLSChannel applies it to
    the channels: ``TLS_*`` names are TLS 1.3 suites, the others TLS 1.2 ciphers,
    and a list of one kind only turns the other version off. Handed whole to
    set_ciphers (TLS 1.2 only), a list of TLS 1.2 ciphers still let the main
    channel negotiate TLS 1.3 with a suite not named, and one of TLS 1.3 suites
    was refused."""
    names = [name for name in ciphers.split(":") if name]
    legacy = [name for name in names if not name.startswith("TLS_")]
    if not names:
        raise ssl.SSLError("an empty list")
    if not legacy:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return
    ctx.set_ciphers(":".join(legacy))
    if len(legacy) == len(names):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class ChannelSecurity:
    """What a channel worker needs to open its connection safely (picklable)."""
    tls: TLSConfig | None = None
    hostname: str | None = None     # the source's resolved check (None on a destination)
    auth_key: bytes | None = field(default=None, repr=False)
    timeout: float = 10.0           # the whole handshake's deadline, in seconds

    @classmethod
    def of_source(cls, tls: TLSConfig | None, target: tuple[str, int] | str, family: int, *,
                  auth_key: bytes | None = None, timeout: float = 10.0) -> ChannelSecurity:
        """A source's, for a destination at ``target``: the name its certificate
        must carry resolved (:func:`default_hostname`)."""
        hostname = (default_hostname(target, family, tls.hostname)
                    if tls is not None else None)
        return cls(tls=tls, hostname=hostname, auth_key=auth_key, timeout=timeout)


class AuthKey(bytes):
    """A shared key: bytes whose repr and str never show them (``<auth_key: hidden>``),
    so that it is not printed where its holder is: ``vars()`` of a config, the
    locals a traceback shows of each frame (``pytest -l``, an error tracker's
    report of a failed proof). ``bytes(key)`` or ``key.hex()`` are the bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<auth_key: hidden>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[AuthKey], tuple[bytes]]:
        return AuthKey, (bytes(self),)


def hidden_key(key: bytes | None) -> bytes | None:
    """``key`` as an :class:`AuthKey` if it is bytes (anything else as it is, for
    :func:`check_auth_key` to judge): what a constructor does first, so that no local
    or ``self`` a traceback shows of a later check's failure holds the bytes."""
    return AuthKey(key) if isinstance(key, (bytes, bytearray)) else key


def check_auth_key(key: bytes | None, owner: str) -> AuthKey | None:
    check_types(owner, auth_key=(key, optional(BYTES)))
    if key is None:
        return None
    if len(key) < MIN_AUTH_KEY_BYTES:
        problem = f"must be at least {MIN_AUTH_KEY_BYTES} bytes, not {len(key)}"
        raise ConfigError(f"{owner} auth_key {problem}", parameter="auth_key", problem=problem)
    return AuthKey(key)


def _check_private(key: str | os.PathLike[str]) -> None:
    """ConfigError if any user of the host may read the private key file ``key``, or
    anyone but its owner write it (whose it and its directories are:
    :func:`check_trusted_file`). Its group may read it: a service's group often
    does (``ssl-cert``, libvirt's ``qemu``), which the shared key's rule refuses; not
    with an ACL, whose mask those bits then are (:func:`refuse_acl`)."""
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(f"TLSConfig.key: {key} is open to others (mode {mode:04o}): make "
                          f"it private (chmod 600 {key}; 640 to share it with its group)")
    if mode & stat.S_IRGRP:         # (the group bits may be an ACL's mask)
        refuse_acl(os.fspath(key), "TLSConfig.key", READ)


MAX_KEY_FILE_BYTES = 1 << 16


def _check_readable(path: str | os.PathLike[str], what: str,
                    parameter: str | None = None) -> None:
    """ConfigError, with the OS's reason, unless ``path`` opens for reading (a typo's
    "No such file or directory": os.access said only "cannot read", and for root
    passed every file there is) and is a regular file: the load that follows reads
    it blocking, and a FIFO no one writes held it for ever (a reread). Opened
    non-blocking, so this look does not wait on one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}", parameter=parameter,
                          problem=f"cannot read the file: {exc.strerror}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not regular:
        raise ConfigError(f"{what}: {path} is not a regular file", parameter=parameter,
                          problem="not a regular file")


def read_key_file(path: str | os.PathLike[str]) -> AuthKey:
    """A key file's bytes, without the one line end an editor or ``echo`` adds (an
    :class:`AuthKey`: bytes that no repr shows).

    Refused, as ssh refuses a private key file: one that others may read or
    anyone but its owner write (mode & 0o077: a key others read proves nothing),
    one another user could change or replace (:func:`check_trusted_file`: they
    would then know it), one that is not a regular file (a FIFO would wait for a
    writer), and one longer than MAX_KEY_FILE_BYTES (it was cut there silently)."""
    check_types("read_key_file", path=(path, PATH))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"the key file {path} is open to others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): make it private "
                              f"(chmod 600 {path})")
        check_trusted_file(os.fspath(path), "the key file", fd)
        try:
            key = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    if len(key) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"the key file {path} is longer than {MAX_KEY_FILE_BYTES} bytes: "
                          f"not a key")
    for line_end in (b"\r\n", b"\n"):
        if key.endswith(line_end):
            return AuthKey(key[:-len(line_end)])
    return AuthKey(key)


# ---------------------------------------------------------------- identities

def identities_of(cert: Mapping[str, Any]) -> list[str]:
    """The identities of a peer certificate as ``ssl`` decodes it: its subject's
    CN, then its subjectAltName values (DNS names, emails, IP addresses)."""
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "IP Address":
            value = str(ipaddress.ip_address(value.strip()))
        names.append(value)
    return names


def check_authz(identities: list[str], authz: Sequence[str] | None) -> None:
    """Refuse a client whose certificate names none of the ``authz`` identities."""
    if authz is not None and not set(identities) & set(authz):
        raise SecurityError(f"the client certificate ({', '.join(identities) or 'no name'}) "
                            f"is not in authz")


def is_tls_record(first_byte: bytes) -> bool:
    return first_byte[:1] == bytes([TLS_HANDSHAKE_RECORD])


def tls_handshake(tls: ssl.SSLSocket, deadline: float, seconds: float,
                  where: str | None = None) -> None:
    """Finish ``tls``'s handshake by ``deadline`` (time.monotonic()) — a whole
    deadline, not one per read, so a peer trickling bytes cannot stretch it.
    ``seconds``: the wait the deadline ends, said when it passes (as the core's
    handshake says its own); ``where`` names the connection in its errors."""
    tls.setblocking(False)
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                ready = select.select([tls], [], [], max(0.0, left))[0]
            except ssl.SSLWantWriteError:
                ready = select.select([], [tls], [], max(0.0, left))[1]
            except ssl.SSLCertVerificationError as exc:
                failure = SecurityError(f"TLS handshake failed: certificate verify failed "
                                        f"({exc.verify_message})", channel=where)
                failure.unverified = True
                raise failure from None
            except ssl.SSLError as exc:
                # OpenSSL's reason codes (PEER_DID_NOT_RETURN_A_CERTIFICATE) made readable.
                reason = exc.reason.lower().replace("_", " ") if exc.reason else str(exc)
                raise SecurityError(f"TLS handshake failed: {reason}", channel=where) from None
            except OSError as exc:
                raise SecurityError(_handshake_lost(exc), channel=where) from None
            if not ready:
                raise SecurityError(f"TLS handshake: no answer within {seconds:g} s",
                                    channel=where)
    finally:
        tls.setblocking(True)


def tls_connect(sock: socket.socket, security: ChannelSecurity, deadline: float,
                seconds: float, where: str | None = None) -> ssl.SSLSocket:
    """A source's connection ``sock`` in its TLS (``security.tls``), the handshake
    done by ``deadline`` (the end of a wait of ``seconds``, said when it passes);
    the destination's certificate checked against ``security.hostname`` (none: no
    name check). On failure the connection is closed (``sock`` is detached from it
    either way)."""
    assert security.tls is not None, "only with TLS"
    hostname = security.hostname
    tls = security.tls.client_context(hostname).wrap_socket(
        sock, server_hostname=hostname, do_handshake_on_connect=False)
    try:
        tls_handshake(tls, deadline, seconds, where)
    except BaseException:
        tls.close()
        raise
    return tls


def _handshake_lost(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLEOFError) or exc.errno in (None, 0, errno.ECONNRESET,
                                                         errno.EPIPE):
        return "the peer closed the connection during the TLS handshake (does it use TLS?)"
    return f"connection lost during the TLS handshake: {exc.strerror or exc}"


# ---------------------------------------------------------------- the shared-key proof

class Stream(Protocol):
    """A connection as the proof sees it (a socket or a TLS channel, see
    :mod:`.handshake`); ``what`` names the bytes in errors."""
    def send_all(self, data: bytes, what: str = ...) -> None: ...
    def recv_exact(self, size: int, what: str = ...) -> bytes: ...


# What a failed proof tells either side: the keys differ, not which one is wrong.
_KEYS_DIFFER = ("the two sides' auth_keys differ (either may be the wrong one; both must hold "
               "the same key)")


def _proof(key: bytes, role: bytes, uuid: bytes, channel: int, theirs: bytes,
           mine: bytes) -> bytes:
    message = b"fastmfd-auth " + role + b"\0" + uuid + channel.to_bytes(4, "big") + theirs + mine
    return hmac.new(key, message, hashlib.sha256).digest()


def prove_key(stream: Stream, key: bytes, uuid: bytes, channel: int,
              where: str | None = None) -> None:
    """The client's side: prove ``key``, and check that the server knows it too
    (``where`` names the connection in the error)."""
    mine = os.urandom(NONCE_SIZE)
    stream.send_all(mine, "the auth_key proof")
    # (Named: a destination that never answers was "timed out waiting for handshake".)
    answer = stream.recv_exact(NONCE_SIZE + PROOF_SIZE, "the destination's auth_key proof")
    theirs, their_proof = answer[:NONCE_SIZE], answer[NONCE_SIZE:]
    # Our proof goes out first, even to a server whose proof is wrong: it tells a
    # real server at once that the keys differ, and it covers the server's fresh
    # nonce, so an impostor cannot replay it anywhere.
    stream.send_all(_proof(key, b"client", uuid, channel, theirs, mine), "the auth_key proof")
    if not hmac.compare_digest(their_proof, _proof(key, b"server", uuid, channel, mine, theirs)):
        # Neither side can tell whose key is the wrong one (an old key file, a typo):
        # blaming the destination sent users to mend the side that was right.
        raise SecurityError(f"the destination's auth_key proof does not match this source's "
                            f"key: {_KEYS_DIFFER}, or this is not the destination meant",
                            channel=where)


def check_key_proof(stream: Stream, key: bytes, uuid: bytes, channel: int) -> None:
    """The server's side: the client must prove ``key`` for this session and channel."""
    theirs = stream.recv_exact(NONCE_SIZE, "the source's auth_key proof")
    mine = os.urandom(NONCE_SIZE)
    stream.send_all(mine + _proof(key, b"server", uuid, channel, theirs, mine),
                    "the auth_key proof")
    if not hmac.compare_digest(stream.recv_exact(PROOF_SIZE, "the source's auth_key proof"),
                               _proof(key, b"client", uuid, channel, mine, theirs)):
        raise SecurityError(f"wrong auth_key proof: the source's proof does not match this "
                            f"destination's key for this session and channel: {_KEYS_DIFFER}")


def default_hostname(target: tuple[str, int] | str, family: int,
                     configured: str | None) -> str | None:
    """The name the destination's certificate must carry."""
    if configured is not None:
        return configured
    return None if family == socket.AF_UNIX else target[0]
