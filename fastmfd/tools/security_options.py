"""How the commands get their security settings: the ``--tls-*`` and
``--auth-key-file`` options, and throwaway TLS credentials for migrations on
this machine (``demo --tls``, ``bench --tls``).

Throwaway credentials come from `trustme <https://trustme.readthedocs.io>`_
(``pip install fastmfd[tls-demo]``): a CA, a destination certificate for
``localhost``, ``127.0.0.1`` and ``::1``, and a client certificate for the
source, written to a private temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator, Literal

from ..errors import ConfigError
from ..protocol.security import MIN_AUTH_KEY_BYTES, TLSConfig, read_key_file
from .loopback import LoopbackSecurity

__all__ = ["add_arguments", "given", "tls_config", "auth_key", "LocalCredentials",
           "local_credentials", "loopback_security"]

LOCAL_CLIENT = "fastmfd-source"      # the client identity of throwaway credentials


def add_arguments(parser: argparse.ArgumentParser, *,
                  side: Literal["send", "listen", "both"]) -> None:
    """The security options of a command that runs ``side``: ``both`` ends (demo,
    bench) take every option. A sender has no clients to authorize and a listener
    no name to check: each is offered only its own, so that ``--tls-authz`` given
    to ``send`` is refused, not ignored (it was, and a sender's user could believe
    it named the listeners it would trust)."""
    loopback = side == "both"
    group = parser.add_argument_group(
        "security", "TLS for every connection, and/or a shared key every connection proves")
    if loopback:
        group.add_argument("--tls", action="store_true",
                           help="TLS with throwaway certificates made for this run (mutual "
                                "TLS; needs trustme)")
    group.add_argument("--tls-cert", metavar="PEM", help="this side's certificate chain")
    group.add_argument("--tls-key", metavar="PEM", help="this side's private key")
    group.add_argument("--tls-ca", metavar="PEM",
                       help="CA bundle the peer's certificate must chain to (on a listener: "
                            "require client certificates)")
    if side != "listen":
        group.add_argument("--tls-hostname", metavar="NAME",
                           help="name the destination's certificate must carry (default: "
                                "the address's host)")
    if side != "send":
        group.add_argument("--tls-authz", action="append", metavar="IDENTITY",
                           help="a client identity (certificate CN or subjectAltName) a "
                                "listener accepts; repeatable (default: any the CA signed)")
    group.add_argument("--auth-key-file", metavar="FILE",
                       help="a file holding the shared key (>= 16 bytes; a final newline is "
                            "ignored); authenticates every connection, does not encrypt")


_TLS_FIELDS = ("cert", "key", "ca", "hostname", "authz")     # --tls-<field>, TLSConfig's


def _tls_values(args: argparse.Namespace) -> dict[str, object]:
    """The ``--tls-*`` options given (none is loaded or read)."""
    return {name: value for name in _TLS_FIELDS
            if (value := getattr(args, f"tls_{name}", None)) is not None}


def tls_given(args: argparse.Namespace) -> bool:
    """TLS is asked for: ``--tls`` or ``--tls-*`` files (none is loaded or read)."""
    return bool(_tls_values(args)) or getattr(args, "tls", False)


def given(args: argparse.Namespace) -> bool:
    """Any of the security options is given (none is loaded or read)."""
    return tls_given(args) or getattr(args, "auth_key_file", None) is not None


def tls_config(args: argparse.Namespace, *, listener: bool = False) -> TLSConfig | None:
    """The TLSConfig the ``--tls-*`` options describe, or None. A ``listener``'s
    mistakes are said in its options' words (TLSConfig's own errors name the
    library's fields, which a command's user never wrote)."""
    values = _tls_values(args)
    if not values:
        return None
    if ("cert" in values) != ("key" in values):
        raise ConfigError("--tls-cert and --tls-key go together: this side's certificate "
                          "chain and its private key")
    if listener and "cert" not in values:
        raise ConfigError("a TLS listener needs its own certificate: give --tls-cert and "
                          "--tls-key with --tls-ca or --tls-authz")
    if listener and "authz" in values and "ca" not in values:
        raise ConfigError("--tls-authz needs --tls-ca: a client's identity is known only "
                          "from a certificate that chains to it")
    tls = TLSConfig(**values)  # type: ignore[arg-type]  # each option's type is its field's
    tls.check_dates()       # a certificate out of its dates: the option's mistake, found now
    return tls


def auth_key(args: argparse.Namespace) -> bytes | None:
    """The ``--auth-key-file`` key, checked now (a short one fails before any work)."""
    path = getattr(args, "auth_key_file", None)
    if path is None:
        return None
    key = read_key_file(path)
    if len(key) < MIN_AUTH_KEY_BYTES:
        raise ConfigError(f"--auth-key-file {path}: the key has {len(key)} bytes, at least "
                          f"{MIN_AUTH_KEY_BYTES} are needed")
    return key


@dataclass(frozen=True)
class LocalCredentials:
    """Both ends' TLS settings for a migration on this machine."""
    source: TLSConfig
    destination: TLSConfig


@contextlib.contextmanager
def local_credentials(server_names: tuple[str, ...] = ()) -> Iterator[LocalCredentials]:
    """Throwaway mutual-TLS credentials, removed when the block ends; the
    destination's certificate names this host and ``server_names``."""
    try:
        import trustme
    except ImportError:
        raise ConfigError("throwaway TLS certificates need trustme: pip install "
                          "'fastmfd[tls-demo]' (or give --tls-cert/--tls-key/--tls-ca)") from None
    ca = trustme.CA(organization_name="fastmfd throwaway CA")
    server = ca.issue_cert("localhost", "127.0.0.1", "::1", *server_names)
    client = ca.issue_cert(LOCAL_CLIENT)
    with tempfile.TemporaryDirectory(prefix="fastmfd-tls-") as directory:
        def write(name: str, blob: trustme.Blob) -> str:
            path = os.path.join(directory, name)
            blob.write_to_path(path)
            os.chmod(path, 0o600)       # a private key others may read is refused
            return path
        ca_path = write("ca.pem", ca.cert_pem)
        server_key, client_key = (write(f"{who}-key.pem", cert.private_key_pem)
                                  for who, cert in (("server", server), ("client", client)))
        server_chain = os.path.join(directory, "server.pem")
        client_chain = os.path.join(directory, "client.pem")
        for path, cert in ((server_chain, server), (client_chain, client)):
            with open(path, "wb") as out:
                for blob in cert.cert_chain_pems:
                    out.write(blob.bytes())
        yield LocalCredentials(
            source=TLSConfig(cert=client_chain, key=client_key, ca=ca_path),
            destination=TLSConfig(cert=server_chain, key=server_key, ca=ca_path,
                                  authz=(LOCAL_CLIENT,)))


@contextlib.contextmanager
def loopback_security(args: argparse.Namespace, server_names: tuple[str, ...] = ()
                      ) -> Iterator[LoopbackSecurity]:
    """The security of a command that runs both ends: throwaway credentials
    with ``--tls`` (the destination's certificate naming this host and
    ``server_names``: where else its destination listens), else the
    ``--tls-*`` files for both ends (the certificate must suit both), else no
    TLS; and the ``--auth-key-file`` key."""
    key = auth_key(args)
    if getattr(args, "tls", False):
        if _tls_values(args):
            raise ConfigError("--tls makes throwaway certificates: give it no --tls-* files "
                              "(or give the files without --tls)")
        with local_credentials(server_names) as credentials:
            yield LoopbackSecurity(credentials.source, credentials.destination, key)
        return
    tls = tls_config(args)
    if tls is None:
        yield LoopbackSecurity(None, None, key)
        return
    # Each end takes its own check: the source --tls-hostname, the destination --tls-authz.
    yield LoopbackSecurity(dataclasses.replace(tls, authz=None),
                           dataclasses.replace(tls, hostname=None), key)
