"""Starting a thread: where the kernel refuses one, an error that names the limits.

Every thread counts against the process limit (cgroup pids.max, RLIMIT_NPROC), which
is not checked ahead (others' processes count too), and its stack against the address
space. CPython's refusal says only "can't start new thread"; every thread fastmfd
starts (a child's watchdog, the source's monitor, the destination's greeters, device
savers and loaders, a name's lookup, the progress bar, the command's helpers: its
status reports, warm files, a loopback destination, the bench's meters, bench --link's
ip and tc commands) goes through :func:`start_thread` or :func:`starting_thread`,
which say which thread could not start and why (:data:`THREAD_LIMIT`), where a bare
"can't start new thread" was said, or nothing and a listener went deaf. A module of
the bottom layer: :mod:`.protocol` starts threads too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .errors import MigrationError

__all__ = ["start_thread", "starting_thread", "THREAD_LIMIT"]

# A thread counts against the process limit, and its stack against the address-space
# limit: the kernel's refusal does not say which (nor the system's threads-max).
THREAD_LIMIT = ("this process may start no more threads (its process limit: cgroup pids.max, "
                "ulimit -u; its address space for their stacks: ulimit -v; kernel.threads-max)")
NO_THREAD = "can't start new thread"    # what CPython raises when the kernel refuses one


def start_thread(thread: threading.Thread, where: str | None = None) -> threading.Thread:
    """``thread.start()``; where the kernel refuses the thread (the process limit:
    CPython raises a bare RuntimeError), a MigrationError naming the limit, the
    thread and ``where`` (a channel, a process). Started, or not at all: nothing
    waits for a thread that never ran ("cannot join thread before it is started"):
    returns ``thread``, to be kept once it runs."""
    with starting_thread(thread.name, where):
        thread.start()
    return thread


@contextlib.contextmanager
def starting_thread(name: str, where: str | None = None) -> Iterator[None]:
    """Where a thread ``name`` starts out of sight (another library's: rich's refresh
    thread), the kernel's refusal is :func:`start_thread`'s MigrationError."""
    try:
        yield
    except RuntimeError as exc:
        if NO_THREAD not in str(exc):
            raise
        raise MigrationError(f"cannot start a thread ({name}): {THREAD_LIMIT}",
                             channel=where) from None
