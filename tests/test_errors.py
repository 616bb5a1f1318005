"""fastmfd's exceptions as they cross processes: multiprocessing pickles an
exception a child raises (a user's worker pool, a forkserver's child), and each
must arrive whole: type, message, errno and every attribute."""

from __future__ import annotations

import errno
import pickle

import pytest

import fastmfd
from fastmfd import errors

MADE = [
    errors.FastMFDError("base"),
    errors.ConfigError("stall_timeout 0.001: must be seconds in 0.1..86400",
                       parameter="stall_timeout", problem="must be seconds in 0.1..86400",
                       involves=("channels",)),
    errors.ListenError("cannot listen on tcp:127.0.0.1:1: in use", errno.EADDRINUSE),
    errors.ProtocolError("bad magic", field="magic", received=1, expected=2, where="channel 1"),
    errors.ConnectionClosed("connection closed after 3 of 8 bytes of message",
                            where="main channel"),
    errors.TLSError("TLS handshake failed: certificate verify failed"),
    errors.MigrationError("no progress for 1 s", channel="send channel 1", side="peer"),
    errors.MigrationError("load_finish raised", device="nic0/0"),
    errors.SecurityError("wrong key", channel="main channel"),
    errors.ConnectError("cannot connect to tcp:127.0.0.1:1: refused", errno.ECONNREFUSED),
    errors.NoSourceError("no source came within 1 s", channel="main channel"),
    errors.OutputError("cannot write a.img: disk full", channel="a.img"),
    errors.Aborted("torn down"),
]


def _whole(error: BaseException) -> tuple:
    return (type(error), str(error), error.args, vars(error), getattr(error, "errno", None),
            getattr(error, "strerror", None))


def test_every_public_exception_is_made_here():
    public = {getattr(errors, name) for name in errors.__all__
              if isinstance(getattr(errors, name), type)}
    assert public == {type(error) for error in MADE}
    assert {getattr(fastmfd, name) for name in dir(fastmfd)
            if isinstance(getattr(fastmfd, name), type)
            and issubclass(getattr(fastmfd, name), BaseException)} <= public


@pytest.mark.parametrize("error", MADE, ids=lambda error: type(error).__name__)
def test_an_exception_round_trips_through_pickle(error):
    """With what was set on it since it was made too: ConnectError and ListenError
    (an OSError each, rebuilt from their message and errno) lost it, and a note
    (``add_note``, which a bench failure adds) with it (a fuzzer's find)."""
    error.add_note("a note")
    error.located = "set later"
    assert _whole(pickle.loads(pickle.dumps(error))) == _whole(error)
