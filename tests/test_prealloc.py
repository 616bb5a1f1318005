"""prealloc: the destination faults its regions in, in its receive workers, before
the source may send (issue #12, "warm destinations")."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

import fastmfd
from fastmfd import _core
from fastmfd._engine.prealloc import plan_shares
from fastmfd.protocol.main_channel import Msg, encode_message
from fastmfd.tools import warm_files
from fastmfd.tools.outputs import OutputDir
from fastmfd.tools.warm_files import FILLING, PREFIX, WarmFiles
from migration_support import Migration, first_difference, make_region
from listen_support import Listener, run_cli
from test_shm_limits import needs_namespace, run_with_small_shm

MIB = 1 << 20


def _resident_pages(region: fastmfd.Region) -> int:
    """Pages of ``region`` resident in memory now (mincore of its mapping)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    npages = region.size // os.sysconf("SC_PAGESIZE")
    vec = (ctypes.c_ubyte * npages)()
    anchor = ctypes.c_char.from_buffer(region.buffer)
    try:
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                          ctypes.c_size_t(region.size), vec)
    finally:
        del anchor
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


def _resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:      # the session killed it
            pass


def test_shares_cover_every_byte_once_in_aligned_runs():
    sizes = [12 * MIB, 4096, 7 * MIB + 8192]
    for parts in (1, 2, 3, 8):
        shares = plan_shares(sizes, parts, align=2 * MIB)
        assert len(shares) == parts
        covered = [np.zeros(size, dtype=np.uint8) for size in sizes]
        for share in shares:
            for index, offset, length in share:
                covered[index][offset:offset + length] += 1
        assert all((c == 1).all() for c in covered), parts
        base = np.cumsum([0] + sizes)
        starts = [base[i] + off for share in shares[1:] for i, off, _ in share[:1]]
        assert all(s % (2 * MIB) == 0 for s in starts), starts


@pytest.mark.parametrize("channels", [1, 2])
def test_a_preallocated_destination_receives_the_image(leaks, channels):
    image = make_region("ram", 16 * MIB, seed=1)
    try:
        with Migration(fastmfd.MigrationConfig(channels=channels), prealloc=True,
                       workers=1) as m:
            m.source.add_region(image)
            _, result = m.run().ok()
            got = result.regions["ram"]
            assert np.array_equal(got.array, image.array), first_difference(got.array,
                                                                            image.array)
            assert result.stats.prealloc_time_s is not None
            assert result.stats.prealloc_time_s > 0
            del got
    finally:
        image.close()


def _minor_faults(pids: list[int]) -> dict[int, int]:
    """Each process's minor page faults so far (/proc/PID/stat field 10)."""
    out = {}
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            out[pid] = int(stat.read().rsplit(")", 1)[1].split()[7])
    return out


def test_a_preallocated_region_is_received_into_with_few_page_faults(leaks):
    """Prealloc faults each page of the new region in (a fault each); receiving,
    the workers then map those pages on tmpfs by a read's fault-around, sixteen
    at a time. They populated them for writing, a fault a page: twice the
    region's pages in all. (The region is fresh, and only the files of memory
    not fresh were opened in the workers, which is how they learn tmpfs.)"""
    pages = 32 * MIB // os.sysconf("SC_PAGESIZE")
    image = make_region("ram", 32 * MIB, seed=4, zero=0.0, text=0.0)
    try:
        with Migration(fastmfd.MigrationConfig(channels=2), prealloc=True, workers=2) as m:
            m.source.add_region(image)
            before = _minor_faults(m.destination.worker_pids())
            _, result = m.run().ok()
            assert np.array_equal(result.regions["ram"].array, image.array)
            after = _minor_faults(list(before))
    finally:
        image.close()
    faults = sum(after.values()) - sum(before.values())
    assert pages <= faults < 1.5 * pages, f"{faults} page faults for {pages} pages"


def test_without_prealloc_there_is_no_prealloc_time(leaks):
    image = make_region("ram", 4 * MIB, seed=2)
    try:
        with Migration(fastmfd.MigrationConfig(channels=1)) as m:
            m.source.add_region(image)
            _, result = m.run().ok()
            assert result.stats.prealloc_time_s is None
    finally:
        image.close()


def test_prealloc_faults_the_whole_region_in_before_setup_ack(leaks):
    # With live=False the source calls on_stop after SETUP_ACK and before it
    # sends a page: by then every page of the destination's region must be
    # resident. The image is all zero pages, which a fresh region never has
    # written, so nothing but prealloc can have faulted them in.
    image = make_region("ram", 32 * MIB, seed=3, zero=1.0, text=0.0)
    try:
        with Migration(fastmfd.MigrationConfig(channels=2), prealloc=True) as m:
            m.source.add_region(image)
            resident = {}

            def on_stop() -> None:
                region = m.destination._session.regions[0]
                resident["pages"] = _resident_pages(region)

            _, result = m.run(on_stop=on_stop).ok()
            assert resident["pages"] == 32 * MIB // os.sysconf("SC_PAGESIZE")
            assert not result.regions["ram"].array.any()
    finally:
        image.close()


def test_a_slow_prealloc_keeps_the_source_waiting_past_its_handshake_deadline(leaks):
    # The destination's workers are stopped for longer than the source's
    # handshake deadline (timeout=1 s): the KEEPALIVEs the destination sends
    # while it waits for them keep the source's wait for SETUP_ACK alive.
    image = make_region("ram", 8 * MIB, seed=4)
    try:
        config = fastmfd.MigrationConfig(channels=2, timeout=1.0, stall_timeout=10.0)
        with Migration(config, prealloc=True, workers=2) as m:
            m.source.add_region(image)
            pids = m.destination.worker_pids()[:2]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            timer = threading.Timer(2.5, lambda: [os.kill(p, signal.SIGCONT) for p in pids])
            timer.start()
            try:
                _, result = m.run(timeout=60).ok()
            finally:
                timer.cancel()
                _resume(pids)
            assert np.array_equal(result.regions["ram"].array, image.array)
            assert result.stats.prealloc_time_s is not None
    finally:
        image.close()


def test_a_stuck_prealloc_fails_both_sides_within_the_stall_deadline(leaks):
    image = make_region("ram", 8 * MIB, seed=5)
    try:
        config = fastmfd.MigrationConfig(channels=1, stall_timeout=1.0)
        with Migration(config, prealloc=True, workers=1) as m:
            m.source.add_region(image)
            pid = m.destination.worker_pids()[0]
            os.kill(pid, signal.SIGSTOP)
            try:
                outcome = m.run(timeout=30)
            finally:
                _resume([pid])
        assert isinstance(outcome.dest_error, fastmfd.MigrationError), outcome.dest_error
        assert "no progress for 1 s (its process is stopped)" in str(outcome.dest_error)
        assert isinstance(outcome.source_error, fastmfd.MigrationError), outcome.source_error
        assert "no progress" in str(outcome.source_error)
    finally:
        image.close()


def test_max_memory_refuses_a_preallocating_setup_before_faulting_in(leaks):
    image = make_region("ram", 4 * MIB, seed=6)
    try:
        with Migration(fastmfd.MigrationConfig(channels=1), max_memory=MIB,
                       prealloc=True) as m:
            m.source.add_region(image)
            outcome = m.run(timeout=30)
            assert m.destination._session.regions == []
            assert m.destination._session.prealloc_seconds is None
        for error in (outcome.source_error, outcome.dest_error):
            assert "it holds at most 1048576 (max_memory" in str(error), repr(error)
    finally:
        image.close()


@needs_namespace
def test_a_shm_too_small_to_preallocate_into_is_a_clean_error_on_both_sides():
    # The regions are files on a /dev/shm with 16 MiB left (as `listen --dir
    # /dev/shm/...` would map them): faulting 24 MiB in must fail
    # cleanly in the worker, before the source sends a page, never a SIGBUS.
    done = run_with_small_shm("""
        import os, fastmfd
        from migration_support import Migration, make_region
        if __name__ == "__main__":
            image = make_region("ram", 24 << 20, seed=7, zero=0.0)   # the source's
            fd = os.open("/dev/shm/filler", os.O_RDWR | os.O_CREAT, 0o600)
            os.posix_fallocate(fd, 0, 24 << 20)         # 16 MiB left
            factory = lambda name, size, page_size: fastmfd.Region.from_file(
                name, "/dev/shm/ram.img", size=size, page_size=page_size)
            with Migration(fastmfd.MigrationConfig(channels=2), prealloc=True,
                           region_factory=factory) as m:
                m.source.add_region(image)
                outcome = m.run(timeout=30)
                print("source:", outcome.source_error)
                print("destination:", outcome.dest_error)
                print("pages received:", m.source._parts.counters.total("normal_pages"))
            image.close()
    """, shm="64m")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert "region ram: no memory to write into" in lines["destination"], done.stdout
    assert "region ram: no memory to write into" in lines["source"], done.stdout
    assert lines["pages received"] == "0", done.stdout
    assert "SIGBUS" not in done.stdout and "Bad address" not in done.stdout


def test_listen_prealloc_writes_the_image_and_reports_the_prealloc_time(tmp_path):
    image = tmp_path / "ram.img"
    data = os.urandom(256 * 4096) + bytes(256 * 4096)
    image.write_bytes(data)
    out = tmp_path / "out"
    with Listener(out, "--prealloc", "--json") as listener:
        sent = run_cli("send", listener.address, str(image), "--channels", "2", "--quiet")
        status, err = listener.finish()
    assert sent.returncode == 0 and status == 0, (sent.stderr, err)
    assert (out / "ram.img").read_bytes() == data
    report = json.loads(listener.out)
    assert report["stats"]["prealloc_time_s"] > 0, report


def _wait_for_a_warm_file(directory: Path, within: float = 30.0) -> None:
    """Until the listener's hidden directory holds a file faulted in whole."""
    deadline = time.monotonic() + within
    while not [f for d in directory.glob(".fastmfd-warm-*") for f in d.iterdir()
               if not f.name.endswith(FILLING)]:
        assert time.monotonic() < deadline, "no warm file was made"
        time.sleep(0.05)


def test_listen_prealloc_lands_the_next_session_in_a_warm_file(tmp_path):
    # Two sessions of one geometry: the second gets a file faulted in between
    # them (new, so none of the first session's bytes), renamed to its name.
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    old = os.urandom(128 * 4096) + bytes(128 * 4096)
    new = bytes(128 * 4096) + os.urandom(128 * 4096)
    first.write_bytes(old)
    second.write_bytes(new)
    out = tmp_path / "out"
    with Listener(out, "--prealloc", "--max-sessions", "2", "--json", "-v") as listener:
        sent = run_cli("send", listener.address, f"ram={first}", "--quiet")
        assert sent.returncode == 0, sent.stderr
        _wait_for_a_warm_file(out)
        sent = run_cli("send", listener.address, f"ram={second}", "--quiet")
        assert sent.returncode == 0, sent.stderr
        status, err = listener.finish()
    assert status == 0, err
    reports = [json.loads(line) for line in listener.out.splitlines()]
    assert [Path(r["files"]["regions"]["ram"]).read_bytes() for r in reports] == [old, new]
    assert err.count("region ram: into a warm file") == 1, err
    assert sorted(os.listdir(out)) == sorted(Path(r["files"]["regions"]["ram"]).parent.name
                                             for r in reports)      # no warm file left


def _settle(warm: WarmFiles) -> None:
    if warm._thread is not None:
        warm._thread.join(30)


def test_warm_files_of_a_killed_listener_are_removed_by_the_next(tmp_path):
    """A listener killed between sessions left its faulted-in warm files in DIR, up to
    --max-memory of them, for good (a review): the next one there removes the
    directory of a listener whose pid is gone, and keeps a live one's."""
    dead = subprocess.Popen(["true"])             # a pid that has exited
    dead.wait()
    orphan = tmp_path / f"{PREFIX}{dead.pid}-abc123"
    orphan.mkdir()
    (orphan / "1048576.4096").write_bytes(b"\xaa" * 4096)
    alive = tmp_path / f"{PREFIX}{os.getpid()}-def456"
    alive.mkdir()
    warm = WarmFiles(str(tmp_path))
    try:
        assert not orphan.exists() and alive.exists()
    finally:
        warm.close()
        alive.rmdir()


def test_warm_files_are_new_bounded_and_removed_at_close(tmp_path):
    warm = WarmFiles(str(tmp_path), max_bytes=3 * MIB)
    try:
        warm.refill([(MIB, 4096), (2 * MIB, 4096)])
        _settle(warm)
        assert warm.held_bytes == 3 * MIB
        # A session keeps the files of its regions' sizes (a new geometry cannot use
        # the others: their room is its).
        warm.keep([(MIB, 4096), (MIB, 4096), (4 * MIB, 4096)])
        assert warm.held_bytes == MIB
        path = warm.take(MIB, 4096)
        assert path is not None and Path(path).read_bytes() == bytes(MIB)
        os.unlink(path)
        assert warm.take(MIB, 4096) is None                 # one per size
        warm.refill([(MIB, 4096)])
        _settle(warm)
        warm.refill([(4 * MIB, 4096)])                      # over max_bytes: none made,
        _settle(warm)                                       # the other size freed
        assert warm.held_bytes == 0 and warm.take(4 * MIB, 4096) is None
        warm.refill([(MIB, 8192)])
    finally:
        warm.close()
    assert os.listdir(tmp_path) == []


def test_warm_files_of_other_sizes_make_room_for_a_session(small_disk):
    """A listener's warm files of the last session's sizes left a next session of
    another geometry too little room (found in review): it was refused, though they
    are the listener's own and that session frees them. They count as free room,
    and those of other sizes are removed before the regions are made."""
    free = os.statvfs(small_disk).f_bavail * 4096              # 1 MiB: 256 pages
    with WarmFiles(str(small_disk)) as warm:
        warm.refill([(free // 2, 4096)])
        _settle(warm)
        assert warm.held_bytes == free // 2
        out = OutputDir(str(small_disk / "s2"), warm=warm, new=True)
        try:
            out.plan_qemu({"ram": free * 3 // 4}, 4096)         # fits once they are gone
            assert warm.held_bytes == 0
            with out.region("ram", free * 3 // 4, 4096) as region:
                region.buffer[:] = b"\xaa" * region.size          # its room is there
        finally:
            out.abort()
            out.close()
        warm.refill([(free // 2, 4096)])
        _settle(warm)
        out = OutputDir(str(small_disk / "s3"), warm=warm, new=True)
        try:        # too large even so: the refusal says what the warm files hold
            with pytest.raises(fastmfd.ConfigError, match=r"has 1\.00 MiB free, 512 KiB of it "
                                                          r"the listener's warm files"):
                out.plan_qemu({"ram": free + 4096}, 4096)
            assert warm.held_bytes == free // 2                 # refused: kept
        finally:
            out.abort()
            out.close()


def test_a_refill_still_running_stops_for_the_next_session(small_disk, monkeypatch):
    """The refill after a session, still faulting in a file of its size when the next
    session (another geometry) began, was not seen by that session (a review): its room
    was not counted free (the session, which fitted, was refused: "has 320 KiB free"),
    and, done, a file of a size no session could use was held through it. The session
    stops it, and its half-made file is removed. (Its last slice waits: the session
    begins meanwhile, as when sessions follow each other quickly on a slow disk.)"""
    free = os.statvfs(small_disk).f_bavail * 4096              # 1 MiB: 256 pages
    monkeypatch.setattr(warm_files, "SLICE", 64 << 10)
    last = (free * 3 // 4) // warm_files.SLICE
    started, calls = threading.Event(), []

    def populate(part, what):
        calls.append(what)
        if len(calls) == last:
            started.set()
            threading.Event().wait(0.5)
        return _core.populate(part, what)

    monkeypatch.setattr(warm_files, "_core", types.SimpleNamespace(populate=populate))
    with WarmFiles(str(small_disk)) as warm:
        warm.refill([(free * 3 // 4, 4096)])
        assert started.wait(30)
        out = OutputDir(str(small_disk / "s2"), warm=warm, new=True)
        try:
            out.plan_qemu({"ram": free // 2}, 4096)             # fits once it stops
            _settle(warm)
            assert warm.held_bytes == 0 and os.listdir(warm.path) == []
        finally:
            out.abort()
            out.close()


def test_a_warm_file_never_replaces_a_file_at_its_part_name(tmp_path):
    """A file that appeared at a region's .part name after plan() checked it is kept:
    the warm file is linked there, not renamed over it (found in review); the
    session then gets the cold path's refusal."""
    out_dir, warm_dir = tmp_path / "out", tmp_path / "warm"
    warm_dir.mkdir()
    with WarmFiles(str(warm_dir), max_bytes=MIB) as warm:
        warm.refill([(MIB, 4096)])
        _settle(warm)
        out = OutputDir(str(out_dir), warm=warm)
        try:
            out.plan_qemu({"ram": MIB}, 4096)
            planted = out_dir / out.regions["ram"].part
            planted.write_bytes(b"someone else's")
            with pytest.raises((FileExistsError, fastmfd.FastMFDError)):
                out.region("ram", MIB, 4096)
            assert planted.read_bytes() == b"someone else's"
            assert warm.held_bytes == 0             # the warm file was dropped, not leaked
        finally:
            out.abort()
            out.close()
    assert list(warm_dir.iterdir()) == []


@pytest.mark.parametrize("variant", ["auth_key", "old_way_device", "device_channel"])
def test_prealloc_with_the_other_session_features(leaks, variant):
    # The shared-key proof, device state over the main channel (no channel
    # headers) and a dedicated device-state channel: prealloc sits between
    # SETUP and SETUP_ACK and must leave each of them as it was.
    key = b"k" * 32
    config, options = {
        "auth_key": (fastmfd.MigrationConfig(channels=2, auth_key=key), {"auth_key": key}),
        "old_way_device": (fastmfd.MigrationConfig(channels=2, channel_header=False), {}),
        "device_channel": (fastmfd.MigrationConfig(channels=2, device_state_channels=1), {}),
    }[variant]
    image = make_region("ram", 8 * MIB, seed=8)
    try:
        with Migration(config, prealloc=True, **options) as m:
            m.source.add_region(image)
            if variant != "auth_key":
                m.source.add_device(fastmfd.BytesDevice("nic", 0, b"state" * 1000))
            _, result = m.run().ok()
            assert np.array_equal(result.regions["ram"].array, image.array)
            assert result.stats.prealloc_time_s is not None
            if variant != "auth_key":
                assert result.devices[("nic", 0)] == b"state" * 1000
    finally:
        image.close()


def test_a_destination_that_only_sends_keepalives_fails_the_source(leaks):
    """KEEPALIVEs before SETUP_ACK restart the source's wait (a slow prealloc), but
    only within what faulting in the announced regions can take: a destination
    that never answers but keeps saying it is alive must not hold the source
    forever."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def keepalives_forever() -> None:
        conn, _ = server.accept()
        with conn:
            while not stop.wait(0.1):
                try:
                    conn.sendall(encode_message(Msg.KEEPALIVE))
                except OSError:
                    return              # the source gave up

    thread = threading.Thread(target=keepalives_forever, daemon=True)
    thread.start()
    image = make_region("ram", 64 * 1024, seed=5)
    try:
        config = fastmfd.MigrationConfig(channels=1, timeout=0.5, stall_timeout=1.0)
        address = f"tcp:127.0.0.1:{server.getsockname()[1]}"
        with fastmfd.Source(address, config) as src:
            src.add_region(image)
            with pytest.raises(fastmfd.MigrationError,
                               match=r"still no SETUP_ACK after the peer's KEEPALIVEs ran "
                                     r"past their deadline"):
                src.migrate()
    finally:
        stop.set()
        thread.join(10)
        server.close()
        image.close()
