"""Signals aimed at the main thread, to interrupt what the core is blocked in.

Python installs its handlers without SA_RESTART, so a signal makes the main
thread's blocked system call fail with EINTR: the core must resume the call
(I/O loops) or let the handler run and propagate what it raises (waits).
The signals come from helper threads with SIGUSR1, because pytest-timeout
owns SIGALRM and its interval timer.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(Exception):
    """What the handler of ``interrupt_once`` raises."""


@contextlib.contextmanager
def interrupted(every=0.002):
    """Signal the main thread every ``every`` s; yields the count of signals handled."""
    fired = [0]
    previous = signal.signal(signal.SIGUSR1, lambda *_: fired.__setitem__(0, fired[0] + 1))
    stop = threading.Event()
    main = threading.main_thread().ident

    def pester():
        while not stop.wait(every):
            signal.pthread_kill(main, signal.SIGUSR1)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        yield fired
    finally:
        stop.set()
        thread.join()       # the main thread waits here: any signal sent is delivered
        signal.signal(signal.SIGUSR1, previous)


@contextlib.contextmanager
def interrupt_once(after: float):
    """Signal the main thread once, ``after`` seconds in; the handler raises Interrupted."""
    def handler(*_):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(after, signal.pthread_kill,
                            (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)
