"""Work that an interrupt must not cut in two: :func:`run_whole`, :func:`clean_up_whole`.

Python raises Ctrl-C's KeyboardInterrupt (and the CLI's SIGTERM) in the main
thread, between any two bytecodes. Cleanup that must know what a step did
cannot tell from a step cut short: ``subprocess.run`` interrupted after its
fork leaves the command running, unknown to anyone, and the namespace it
makes appears after the cleanup looked (``bench --link``, found in review).

``run_whole(step)`` runs ``step`` in a thread of its own, where no signal
handler raises. An interrupt landing in the caller meanwhile is held until
the step is either over or sure never to begin, then goes on::

    caller:  start thread ─ wait ─ interrupt ─┬─ not begun: it never will ── raise
                                              └─ begun: wait for its end ─── raise
    thread:  begin (unless cancelled) ─ step ─ finished
"""

from __future__ import annotations

import _thread
from collections.abc import Callable
from typing import Generic, TypeVar

from ..threads import starting_thread

__all__ = ["run_whole", "clean_up_whole"]

T = TypeVar("T")


class _Step(Generic[T]):
    """One call of ``step`` in its thread: it runs to its end once begun, or never.

    Only ``_thread``'s bare locks: an interrupt inside ``threading``'s Event.wait
    (or Thread.start, which waits on one) can land after its Condition's lock was
    taken, in Python code before the ``with`` that would release it, and every
    later wait on it hangs (the likely cause of one hang in 800 interrupted links
    made with an Event)."""

    def __init__(self, step: Callable[[], T]) -> None:
        self._step = step
        self._deciding = _thread.allocate_lock()    # orders run()'s begin against cancel
        self._state = "new"                         # then "begun" or "cancelled"
        self._ended = _thread.allocate_lock()       # held until the step has ended
        self._ended.acquire()
        self.ended = False                          # set before _ended is released
        self.returned: list[T] = []                 # the step's value, once it returned
        self.error: BaseException | None = None

    def run(self) -> None:
        with self._deciding:
            if self._state == "cancelled":
                return
            self._state = "begun"
        try:
            self.returned.append(self._step())
        except BaseException as exc:        # handed to the caller's thread
            self.error = exc
        finally:
            self.ended = True
            self._ended.release()

    def wait(self) -> None:
        self._ended.acquire()

    def cancel_or_wait(self) -> None:
        """When this returns, the step never began or has ended."""
        with self._deciding:
            if self._state == "new":
                self._state = "cancelled"
                return
        if not self.ended:          # else wait() had returned when the interrupt came
            self._ended.acquire()


def run_whole(step: Callable[[], T]) -> T:
    """``step()``, run whole or not at all though the caller is interrupted (see
    the module docstring). A second interrupt while the first waits for the step
    gives up waiting."""
    call = _Step(step)
    try:
        with starting_thread("fastmfd uninterruptible step"):   # refused: the step never runs
            _thread.start_new_thread(call.run, ())
        call.wait()
    except BaseException:
        call.cancel_or_wait()
        raise
    if call.error is not None:
        raise call.error
    return call.returned[0]


def clean_up_whole(clean_up: Callable[[], None]) -> None:
    """Run ``clean_up``, which finishes what an earlier run of it left when run
    again: an interrupt (one Ctrl-C) stops it once, the rest is done, then the
    interrupt goes on. A second interrupt stops it."""
    try:
        clean_up()
    except KeyboardInterrupt:
        clean_up()
        raise
