"""How a session call (``migrate()``, ``receive()``) ends on what its thread raised.

An error (an ``Exception``) fails the session and is raised as its
MigrationError. Anything else is no error of the migration but the program
being stopped: Ctrl-C's KeyboardInterrupt, the SystemExit of ``sys.exit()`` (a
service's SIGTERM handler), a GeneratorExit. That fails the session too, so
the peer hears why, and then propagates as itself: made a MigrationError, a
``sys.exit(143)`` did not exit, and a caller's ``except MigrationError`` carried
on as if the migration had merely failed.
"""

from __future__ import annotations

from typing import NoReturn

from ..errors import MigrationError
from .session import SessionFailure

__all__ = ["end_call", "stop_reason"]


def stop_reason(exc: BaseException, side: str) -> str:
    """What the peer is told when ``exc``, no error, stops ``side``'s session."""
    if isinstance(exc, KeyboardInterrupt):
        # Ctrl-C's has no text; the CLI's SIGTERM says "terminated by SIGTERM".
        return str(exc) or "interrupted by the user"
    if isinstance(exc, SystemExit):
        return f"the {side} process is exiting (SystemExit {exc.code!r})"
    said = f": {exc}" if str(exc) else ""
    return f"the {side} was stopped by {type(exc).__name__}{said}"


def end_call(failure: SessionFailure, exc: BaseException) -> NoReturn:
    """Fail the session with ``exc``, caught by the session call, and raise: the
    session's MigrationError for an error, ``exc`` itself for anything else."""
    if isinstance(exc, Exception):
        failure.raise_for(exc)
    failure.fail(MigrationError(stop_reason(exc, failure.side)))
    raise exc
