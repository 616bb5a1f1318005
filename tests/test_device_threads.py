"""How many threads device state takes at the limits fastmfd accepts.

A thread per device was 4096 threads at MAX_DEVICES, all alive at once while
the devices' reads block; where the process may not start that many (ulimit -u,
or its address space, ulimit -v) the migration failed with a bare
"can't start new thread". The devices are now saved by a pool of SAVE_THREADS.

The source runs in a process of its own whose address space holds about 150
more threads (of 256 MiB stacks): its 300 devices each wait, in their first
read, until as many devices are reading as a pool has threads.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import threading

import pytest

import fastmfd
from fastmfd._engine.saving import SAVE_THREADS
from migration_support import destination_process, receiving

DEVICES = 300

_SOURCE = textwrap.dedent("""
    import resource, sys, threading
    import fastmfd

    class Gathering:
        # Its first read waits until ``at_once`` devices are reading (all of them
        # are, if each has a thread: their reads all overlap).
        reading = 0
        lock = threading.Lock()
        go = threading.Event()

        def __init__(self, idstr, at_once):
            self.idstr, self.instance_id, self.at_once = idstr, 0, at_once
            self.sent = False

        def read_state(self, buf):
            if self.sent:
                return 0
            with Gathering.lock:
                Gathering.reading += 1
                if Gathering.reading >= self.at_once:
                    Gathering.go.set()
            Gathering.go.wait(30)
            buf[:4] = b"dev!"
            self.sent = True
            return 4

    if __name__ == "__main__":
        stack = 256 << 20
        threading.stack_size(stack)
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) << 10 for line in status
                        if line.startswith("VmSize:"))
        # The pool's threads, the source's own and its segments fit; 300 threads do not.
        room = size + 150 * stack
        resource.setrlimit(resource.RLIMIT_AS, (room, room))
        cfg = fastmfd.MigrationConfig(channels=2, device_chunk_size=4096,
                                      max_queued_bytes=4096)
        try:
            with fastmfd.Source(sys.argv[1], cfg) as src:
                for i in range(int(sys.argv[2])):
                    src.add_device(Gathering(f"dev{i}", int(sys.argv[3])))
                src.migrate(live=False)
            print("ok")
        except fastmfd.FastMFDError as exc:
            print(f"{type(exc).__name__}: {exc}")
""")


def test_three_hundred_devices_are_saved_by_a_pool_of_threads():
    with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
        thread, got = receiving(dst)
        done = subprocess.run([sys.executable, "-c", _SOURCE, dst.address, str(DEVICES),
                               str(min(SAVE_THREADS, DEVICES))],
                              capture_output=True, text=True, timeout=120)
        thread.join()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok", done.stdout
    devices = got["result"].devices                 # type: ignore[attr-defined]
    assert devices == {(f"dev{i}", 0): b"dev!" for i in range(DEVICES)}


@pytest.mark.parametrize("room", [3, 0])
def test_a_source_that_may_start_fewer_save_threads_than_the_pool_saves_with_those(
        monkeypatch, room):
    """Where even SAVE_THREADS threads cannot start, the pool saves every device with
    those that did (the source failed with a bare "can't start new thread", as with
    a thread per device); where none did, the error names the limit. The process's
    limit is played by Thread.start: under a
    real one (ulimit -v) threads that end at once free their stacks for the next,
    and whether a test meets it would be the scheduler's to say."""
    started = []

    class Limited(threading.Thread):
        def start(self) -> None:
            if self.name.startswith("fastmfd save"):
                if len(started) == room:
                    raise RuntimeError("can't start new thread")
                started.append(self.name)
            super().start()
    monkeypatch.setattr(threading, "Thread", Limited)
    with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
        thread, got = receiving(dst)
        cfg = fastmfd.MigrationConfig(channels=1, device_chunk_size=4096, max_queued_bytes=4096)
        with fastmfd.Source(dst.address, cfg) as src:
            for i in range(100):
                src.add_device(fastmfd.BytesDevice(f"dev{i}", 0, b"dev!"))
            if room:
                src.migrate(live=False)
            else:
                with pytest.raises(fastmfd.MigrationError, match=r"not one thread to save the "
                                   r"devices in: cannot start a thread \(fastmfd save 0\): this "
                                   r"process may start no more threads \(its process limit"):
                    src.migrate(live=False)
        thread.join()
    assert len(started) == room, started
    if not room:
        return
    devices = got["result"].devices                 # type: ignore[attr-defined]
    assert devices == {(f"dev{i}", 0): b"dev!" for i in range(100)}


# The destination's reassembly process starts a loader thread per device (as
# QEMU's destination does); where it cannot, the error names the limit and the
# count, not only "can't start new thread". Its address space here holds about
# 8 threads of 256 MiB stacks.
_DESTINATION = textwrap.dedent("""
    import sys
    import fastmfd

    if __name__ == "__main__":
        with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
            print(dst.address, flush=True)
            try:
                dst.receive()
                print("ok")
            except fastmfd.FastMFDError as exc:
                print(f"{type(exc).__name__}: {exc}")
""")


def _little_room() -> None:
    resource.setrlimit(resource.RLIMIT_STACK, (256 << 20, 256 << 20))
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_a_destination_that_cannot_start_a_loader_thread_per_device_says_so():
    with destination_process(_DESTINATION, preexec_fn=_little_room,
                             env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}) as (dst, address):
        cfg = fastmfd.MigrationConfig(channels=1, device_chunk_size=4096, max_queued_bytes=4096)
        with fastmfd.Source(address, cfg) as src:
            for i in range(40):
                src.add_device(fastmfd.BytesDevice(f"dev{i}", 0, b"dev!"))
            with pytest.raises(fastmfd.MigrationError) as raised:
                src.migrate(live=False)
        out, err = dst.communicate(timeout=60)
    naming = "a loader thread for each of the 40 devices"
    assert naming in str(raised.value), raised.value
    assert naming in out and "(its process limit: cgroup pids.max, ulimit -u; its address space " \
        "for their stacks: ulimit -v; kernel.threads-max)" in out, out + err
