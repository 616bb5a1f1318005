"""Segments of an owner dead with its resource tracker (a process group SIGKILLed as a
whole: ``kill -9 -PGID``, systemd's final SIGKILL, an OOM kill of the group) go with
the next fastmfd process's first segment; an owner alive by its lock keeps its
segments, whatever became of its pid; another user's files, links and what is not
a regular file are left alone. Real processes, real /dev/shm."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from fastmfd import shm_owners
from fastmfd.shm import SHM_DIR, SharedMemory, creator_pid, list_segments
from listen_support import Listener, slow_send, wait_for
from proc_scan import alive, process_group


# A process that creates its first segment (and so sweeps), then exits.
FIRST_SEGMENT = "from fastmfd.shm import SharedMemory; SharedMemory.create(64).close()"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, check=True)


def in_shm() -> set[str]:
    """Every name in /dev/shm: list_segments leaves out a live owner's file."""
    return set(os.listdir(SHM_DIR))


def made_by(pids: set[int]) -> set[str]:
    """The segments and owner files (alive or not) of processes ``pids``."""
    return {name for name in in_shm() if creator_pid(name) in pids}


def test_a_sender_killed_with_its_group_leaves_segments_the_next_process_removes(tmp_path):
    """Its resource tracker died in the same kill: its segments stayed for good."""
    with Listener(tmp_path / "out") as listener:
        sender, writer = slow_send(listener, tmp_path, 64, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        group: set[int] = set()
        try:
            def segments_made() -> bool:
                group.update(process_group(sender.pid))
                # counters, mailbox, selector, the region's dirty bitmap
                return len({n for n in made_by(group) if not shm_owners.is_owner_file(n)}) >= 4
            wait_for(segments_made, "the sender's segments")
            # More than a pipe holds: back once the sender reads the state, mid-transfer
            # (its segments are made before it connects: killed then, it left the
            # listener waiting for a source, and finish() timed out, in CI).
            data = memoryview(b"s" * (256 << 10))
            while data:
                data = data[os.write(writer, data):]
            left = made_by(group)
            os.killpg(sender.pid, signal.SIGKILL)
            sender.wait(30)
            wait_for(lambda: not any(alive(pid) for pid in group), "the group's end")
        finally:
            os.close(writer)
        listener.finish()
    time.sleep(0.5)         # a tracker that survived would unlink them now
    # Nobody was left to remove them; another run's first segment beside this one may
    # have swept them already (it failed 4 runs in 5 beside a full suite, a reread).
    assert made_by(group) <= left
    run_python(FIRST_SEGMENT)
    assert made_by(group) == set()


# An owner that forks a child (holding its lock, as a worker would) and reports its
# pid, its tracker's and its child's, and its segments.
FORKING_OWNER = """
import os, sys, time
from multiprocessing import resource_tracker
from fastmfd.shm import SharedMemory
segments = [SharedMemory.create(4096, tag="live") for _ in range(2)]
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(os.getpid(), resource_tracker._resource_tracker._pid, child,
      *(s.name for s in segments), flush=True)
time.sleep(120)
"""


def test_an_owner_alive_by_its_lock_keeps_its_segments_whatever_its_pid_says():
    """The owner and its tracker SIGKILLed, its pid gone: a forked child still holds its
    lock (and may use the segments), so a sweep leaves them; once that child is gone
    too, the next first segment removes them."""
    owner = subprocess.Popen([sys.executable, "-c", FORKING_OWNER], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        pid, tracker, child, *segments = owner.stdout.readline().split()
        pid, tracker, child = int(pid), int(tracker), int(child)
        names = set(segments) | {n for n in in_shm()
                                 if shm_owners.is_owner_file(n) and creator_pid(n) == pid}
        assert len(names) == 3, names
        for victim in (pid, tracker):
            os.kill(victim, signal.SIGKILL)
        owner.wait(30)
        wait_for(lambda: not alive(tracker), "the tracker's end")
        assert not alive(pid) and alive(child)
        run_python(FIRST_SEGMENT)
        assert names <= in_shm()
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: not alive(child), "the child's end")
        run_python(FIRST_SEGMENT)
        assert not names & in_shm()
    finally:
        with contextlib.suppress(ProcessLookupError):      # its whole group may be gone
            os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(30)


# An owner that makes a segment, reports its name and pid and its tracker's, and
# waits; the test attaches the segment meanwhile.
WAITING_OWNER = """
import os, time
from multiprocessing import resource_tracker
from fastmfd.shm import SharedMemory
segment = SharedMemory.create(4096, tag="attached")
print(os.getpid(), resource_tracker._resource_tracker._pid, segment.name, flush=True)
time.sleep(120)
"""


def test_an_attached_segment_keeps_its_name_until_let_go_whatever_became_of_its_owner():
    """A process attached to a segment holds its owner's lock: a sweep unlinked the
    names of a killed owner whose spawned or forkserver child still used them, which
    then failed to attach them again ("does not exist"; a reread). Once let go, the
    next first segment removes them."""
    owner = subprocess.Popen([sys.executable, "-c", WAITING_OWNER], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        pid, tracker, name = owner.stdout.readline().split()
        attached = SharedMemory.attach(name)
        try:
            for victim in (int(pid), int(tracker)):
                os.kill(victim, signal.SIGKILL)
            owner.wait(30)
            wait_for(lambda: not alive(int(tracker)), "the tracker's end")
            run_python(FIRST_SEGMENT)
            assert name in in_shm()
            SharedMemory.attach(name).close()       # attached again: still named
            assert name in in_shm()
        finally:
            attached.close()
        run_python(FIRST_SEGMENT)
        assert name not in in_shm()
        assert not [n for n in in_shm() if creator_pid(n) == int(pid)]
    finally:
        with contextlib.suppress(ProcessLookupError):      # its whole group may be gone
            os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(30)


SPAWNED_USER = """
import multiprocessing, os, sys, time
from fastmfd.shm import SharedMemory


def use(name, flags):
    first = SharedMemory.attach(name)
    open(os.path.join(flags, "attached"), "w").close()
    while not os.path.exists(os.path.join(flags, "go")):
        time.sleep(0.02)
    try:
        SharedMemory.attach(name).close()
        said = "attached again"
    except Exception as exc:
        said = f"{type(exc).__name__}: {exc}"
    first.close()
    with open(os.path.join(flags, "said.part"), "w") as f:
        f.write(said)
    os.rename(os.path.join(flags, "said.part"), os.path.join(flags, "said"))


if __name__ == "__main__":
    flags = sys.argv[1]
    segment = SharedMemory.create(4096, tag="spawned")
    child = multiprocessing.get_context("spawn").Process(target=use, args=(segment.name, flags))
    child.start()
    while not os.path.exists(os.path.join(flags, "attached")):
        time.sleep(0.02)
    print(segment.name, flush=True)
    time.sleep(120)
"""


def test_a_spawned_child_of_a_killed_owner_attaches_its_segment_again(tmp_path):
    """The owner alone SIGKILLed (its tracker lives: the child holds it), a sweep by
    another process: the child, attached, keeps the name, and attaches it again."""
    script = tmp_path / "owner.py"
    script.write_text(SPAWNED_USER)
    owner = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        name = owner.stdout.readline().strip()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
        run_python(FIRST_SEGMENT)
        (tmp_path / "go").touch()
        wait_for((tmp_path / "said").exists, "the child's word")
        assert (tmp_path / "said").read_text() == "attached again"
        # the child gone, its tree's tracker unlinks what is left
        wait_for(lambda: name not in in_shm(), "the segment's removal")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owner.pid, signal.SIGKILL)


# Attaches and closes another owner's segment, over and over, while the cyclic
# collector (run often) finalizes objects whose __del__ closes an attachment.
FINALIZED_IN_AN_ATTACH = """
import faulthandler, gc, sys
from fastmfd.shm import SharedMemory
first, second = sys.argv[1:3]


class Consumer:
    def __init__(self):
        self.segment = SharedMemory.attach(first)
        self.me = self                  # a cycle: freed by the cyclic collector

    def __del__(self):
        self.segment.close()


faulthandler.dump_traceback_later(20, exit=True)    # a hang: its stacks, then exit 1
gc.set_threshold(10)
for _ in range(3000):
    Consumer()
    SharedMemory.attach(second).close()
faulthandler.cancel_dump_traceback_later()
"""


def test_a_finalizer_closing_a_segment_during_an_attach_does_not_hang():
    """The attach held its guard while it opened and locked the owner's file; a
    collection there ran a __del__ that closed a segment, which waited on that guard
    in the same thread for ever (a reread)."""
    owners = [subprocess.Popen([sys.executable, "-c", WAITING_OWNER], stdout=subprocess.PIPE,
                               text=True, start_new_session=True) for _ in range(2)]
    try:
        names = [owner.stdout.readline().split()[2] for owner in owners]
        done = subprocess.run([sys.executable, "-c", FINALIZED_IN_AN_ATTACH, *names],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        for owner in owners:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(owner.pid, signal.SIGKILL)    # its tracker with it
            owner.wait(30)
        run_python(FIRST_SEGMENT)                       # which sweeps what they left


def report_a_segment(queue) -> None:
    segment = SharedMemory.create(64, tag="child")
    queue.put(segment.name)
    segment.close()


def test_a_forked_child_owns_its_segments_under_a_lock_of_its_own():
    """A child forked after its parent's first segment gets its own owner file (the
    parent's may go before the child's segments do), removed as the child exits."""
    first = SharedMemory.create(64, tag="parent")
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=report_a_segment, args=(queue,))
        child.start()
        child_segment = queue.get(timeout=30)
        child.join(30)
        assert child.exitcode == 0
        parent_owner = shm_owners.owner_of(first.name)
        child_owner = shm_owners.owner_of(child_segment)
        assert child_owner is not None and child_owner[0] == child.pid
        assert parent_owner is not None and child_owner[1] != parent_owner[1]
        assert f"fastmfd-owner-{os.getpid()}-{parent_owner[1]}" in in_shm()
        assert not [n for n in list_segments() if creator_pid(n) == child.pid]
    finally:
        first.close()


@pytest.mark.alone("the other worker's first segment would sweep the dead owner's files it checks")
def test_a_live_owner_file_is_no_leak_and_a_dead_ones_is():
    """list_segments (what leak checks read) leaves out an owner file whose process
    lives, this one's too: a program that made a segment and closed it listed its
    owner file as left (QemuSender's test of a failed start, in the full suite)."""
    SharedMemory.create(64, tag="mine").close()
    mine = [n for n in in_shm() if shm_owners.is_owner_file(n) and creator_pid(n) == os.getpid()]
    assert mine and not set(mine) & set(list_segments())
    # A dead owner's file: the lock of an owner SIGKILLed with its tracker is free.
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal; from multiprocessing import resource_tracker;"
         + FIRST_SEGMENT + "; print(os.getpid(), flush=True);"
         " os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL);"
         " os.kill(os.getpid(), signal.SIGKILL)"], capture_output=True, text=True, timeout=60)
    pid = int(killed.stdout)
    dead = [n for n in in_shm() if shm_owners.is_owner_file(n) and creator_pid(n) == pid]
    try:
        assert dead and set(dead) <= set(list_segments())
    finally:
        for name in dead:
            os.unlink(os.path.join(SHM_DIR, name))


def test_a_process_that_exits_removes_its_owner_file():
    said = run_python(FIRST_SEGMENT + "; import os; print(os.getpid())")
    assert not [n for n in list_segments() if creator_pid(n) == int(said.stdout)]


@pytest.mark.alone("the other worker's first segment would sweep the dead owner's files it checks")
@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files needs root")
def test_another_users_links_and_what_is_not_a_regular_file_are_left_alone(tmp_path):
    """Dead owners' names (no process holds their lock) of every kind: only this user's
    regular files are removed."""
    other = 65534           # nobody
    pid = (1 << 22) + 1 + os.getpid() % 100_000     # above PID_MAX_LIMIT: no process's

    def path(tag: str, token: str, random: str = "") -> str:
        return os.path.join(SHM_DIR, f"fastmfd-{tag}-{pid}-{token}{random}")

    def regular(name: str, uid: int | None = None) -> str:
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        if uid is not None:
            os.chown(name, uid, -1)
        return name

    target = regular(str(tmp_path / "target"))
    swept = [regular(path("owner", "aaaaa1")), regular(path("x", "aaaaa1", "000001"))]
    kept = [
        # another user's owner file, and its segments
        regular(path("owner", "aaaaa2"), other), regular(path("x", "aaaaa2", "000001"), other),
        regular(path("x", "aaaaa2", "000002")),
        # of this user's dead owner: another user's segment, a link, a directory
        regular(path("x", "aaaaa1", "000002"), other), path("x", "aaaaa1", "000003"),
        path("x", "aaaaa1", "000004"),
        # an owner file that is a FIFO, a link, a directory
        path("owner", "aaaaa3"), regular(path("x", "aaaaa3", "000001")),
        path("owner", "aaaaa4"), regular(path("x", "aaaaa4", "000001")),
        path("owner", "aaaaa5"), regular(path("x", "aaaaa5", "000001")),
    ]
    made: list[str] = []
    try:
        os.symlink(target, kept[4])
        os.mkdir(kept[5])
        os.mkfifo(kept[6])
        os.symlink(target, kept[8])
        os.mkdir(kept[10])
        made = swept + kept
        run_python(FIRST_SEGMENT)
        present = set(os.listdir(SHM_DIR))
        assert not {os.path.basename(p) for p in swept} & present
        assert {os.path.basename(p) for p in kept} <= present
        assert os.path.exists(target)
    finally:
        for name in made:
            if os.path.isdir(name) and not os.path.islink(name):
                os.rmdir(name)
            elif os.path.lexists(name):
                os.unlink(name)


def test_where_no_owner_file_can_be_made_a_segment_still_is():
    """No /proc (so no name for the locked file): the segment is made, the tracker's
    alone, rather than the session failing with "/dev/shm: no such directory"."""
    code = ("import os; from fastmfd.shm import SharedMemory; s = SharedMemory.create(64); "
            "print(s.name, sorted(os.listdir('/dev/shm'))); s.close()")
    # A private mount namespace with nothing mounted at /proc but an empty tmpfs.
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs none /proc && exec "$0" -c "$1"', sys.executable,
                          code], capture_output=True, text=True, timeout=60)
    if run.returncode != 0 and "unshare" in run.stderr and "Traceback" not in run.stderr:
        pytest.skip(f"no mount namespace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    name, _ = run.stdout.split(" ", 1)
    assert creator_pid(name) is not None
    assert f"fastmfd-owner-{creator_pid(name)}-" not in run.stdout
