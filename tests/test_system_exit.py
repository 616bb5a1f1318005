"""What stops the program while ``migrate()`` or ``receive()`` runs is no error of the
migration: a service's SIGTERM handler calling ``sys.exit(143)``, or another
BaseException that is not an Exception (a GeneratorExit, a user's own). The
session fails on both sides, the peer hears why, and the call raises it as
itself, not as a MigrationError (which a caller's ``except MigrationError`` took
for a failed migration, and the program did not exit). Real processes, sockets
and signals; the leakcheck plugin checks nothing is left."""

from __future__ import annotations

import os
import signal
import threading

import pytest

import fastmfd
from migration_support import Migration, Proxy, Trigger, make_region

MIB = 1 << 20
CONFIG = fastmfd.MigrationConfig(channels=2, max_bandwidth=64 * MIB, job_packets=1)


@pytest.fixture
def image():
    region = make_region("ram", 16 * MIB, seed=7)
    yield region
    region.close()


@pytest.mark.parametrize("side", ["source", "destination"])
def test_sys_exit_in_a_sigterm_handler_propagates(image, leaks, exits_on_sigterm, side):
    """SIGTERM once 1 MiB went through a data channel, to this process: its handler
    raises SystemExit(143) in the main thread, which runs ``side``'s call."""
    sigterm = Trigger(MIB, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with Migration(CONFIG, proxy=Proxy({1: sigterm})) as m:
        m.source.add_region(image)
        calls = {"source": lambda: m.source.migrate(live=False),
                 "destination": m.destination.receive}
        peer = "destination" if side == "source" else "source"
        ended: dict = {}

        def other() -> None:
            try:
                calls[peer]()
            except BaseException as exc:
                ended["error"] = exc

        thread = threading.Thread(target=other, daemon=True, name=f"test {peer}")
        thread.start()
        with pytest.raises(SystemExit) as raised:
            calls[side]()
        thread.join(20)
    assert raised.value.code == 143
    error = ended.get("error")
    assert isinstance(error, fastmfd.MigrationError), f"the {peer} ended with {error!r}"
    said = f"main channel: the {side} failed: the {side} process is exiting (SystemExit 143)"
    assert said in str(error), error
    leaks.assert_clean(keep=[image])


class Stop(BaseException):
    """A user's own: not an Exception, so no error of the migration."""


@pytest.mark.parametrize("stop", [GeneratorExit(), Stop("the user's own")],
                         ids=["GeneratorExit", "BaseException"])
def test_another_base_exception_from_a_hook_propagates(image, leaks, stop):
    def on_stop():
        raise stop

    with Migration(CONFIG) as m:
        m.source.add_region(image)
        outcome = m.run(on_stop=on_stop)
    assert outcome.source_error is stop, f"migrate() raised {outcome.source_error!r}"
    words = f"{type(stop).__name__}: {stop}" if str(stop) else type(stop).__name__
    said = f"main channel: the source failed: the source was stopped by {words}"
    assert isinstance(outcome.dest_error, fastmfd.MigrationError), outcome.dest_error
    assert said in str(outcome.dest_error), outcome.dest_error
    leaks.assert_clean(keep=[image])
