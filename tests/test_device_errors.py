"""Every device-state error of issue #4 item 5 fails the session on both sides
within 5 s with a MigrationError naming the device (and the chunk idx), with no
hang and no leak.

Wire-level faults a real Source never makes (a duplicate idx, an unknown device,
...) are made by a proxy that rewrites the device's packets on every channel,
re-encoding them with the core encoders.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastmfd
from fastmfd import _core
from device_support import (BlockedDevice, BrokenDevice, BrokenLoader, ChunkRewriter,
                            FinishingLoader, HangingDevice, HangingLoader, KeepingLoader,
                            LockedLoader,
                            MiscountingDevice,
                            HoldFirstChunks, OddDevice, StallingDevice, at_idx)
from fastmfd._engine.reassembly import plan_pool, pool_bytes
from fastmfd.protocol.main_channel import Msg
from proc_scan import process_tree
from migration_support import (Delay, Migration, OnMessage, Outcome, Proxy, Trigger,
                               channel_memory, make_region, reporting_destination,
                               worker_memory)

CONFIG = fastmfd.MigrationConfig(channels=2, device_chunk_size=4096)
DEVICE = ("dev", 0)
CHUNKS = 16                 # data chunks of DEVICE; chunk idx 16 is the last (empty)


def migrate(config=CONFIG, proxy=None, devices=None, loaders=None, timeout=60.0,
            **destination_options) -> Outcome:
    region = make_region("ram", 1 << 20, seed=5)
    before = region.array.copy()
    try:
        with Migration(config, proxy=proxy, **destination_options) as m:
            m.source.add_region(region)
            for device in devices or [
                    fastmfd.BytesDevice(*DEVICE, np.random.default_rng(1).bytes(CHUNKS * 4096)),
                    fastmfd.BytesDevice("bystander", 0, b"x" * 50_000)]:
                m.source.add_device(device)
            for key, loader in (loaders or {}).items():
                m.destination.add_loader(*key, loader)
            return m.run(timeout=timeout)
    finally:
        assert np.array_equal(region.array, before), "the source region changed"
        region.close()


def rewritten(rewrite) -> Proxy:
    """A proxy that passes DEVICE's packets on every RAM channel through ``rewrite``."""
    faults = {ch: ChunkRewriter(CONFIG, DEVICE, rewrite) for ch in range(CONFIG.channels)}
    return Proxy(faults)


def fired(proxy: Proxy, outcome: Outcome) -> float:
    times = [link.fault.fired_at for link in proxy.links if link.fault.fired_at is not None]
    assert times, (f"the fault never struck: {[(l.name, l.offset) for l in proxy.links]}; "
                   f"source: {outcome.source_error!r}, destination: {outcome.dest_error!r}")
    return min(times)


def check_fault(outcome: Outcome, proxy: Proxy, pattern: str) -> None:
    """check() from the moment ``proxy``'s fault struck."""
    check(outcome, fired(proxy, outcome), pattern)


def check(outcome: Outcome, since: float, pattern: str) -> None:
    """Both sides failed in time, naming ``pattern``; the source hears it from the
    destination (or the other way round)."""
    src, dst = outcome.failed_both(since)
    for side, error in (("source", src), ("destination", dst)):
        assert re.search(pattern, str(error)), f"{side}: {pattern!r} not in {str(error)!r}"


# ---------------------------------------------------------------- wire-level faults

def test_duplicate_idx(leaks):
    proxy = rewritten(at_idx(2, idx=1))
    check_fault(migrate(proxy=proxy), proxy, r"dev/0: duplicate chunk idx 1 \(from channel \d\)")


def test_missing_last_chunk(leaks):
    proxy = rewritten(lambda packet: None if packet.chunk[1] & _core.CHUNK_FLAG_LAST
                      else packet.raw)
    check_fault(migrate(proxy=proxy), proxy, rf"dev/0: missing chunk idx {CHUNKS}")


def test_idx_after_the_last(leaks):
    proxy = rewritten(at_idx(5, flags=_core.CHUNK_FLAG_LAST))
    check_fault(migrate(proxy=proxy), proxy,
          r"dev/0: chunk idx \d+ after the last chunk \(idx 5\)")


def test_chunk_for_an_unknown_device(leaks):
    proxy = rewritten(at_idx(3, idstr="ghost"))
    check_fault(migrate(proxy=proxy), proxy,
          r"receive channel \d: ProtocolError: device state packet for unknown device "
          r"'ghost' instance 0")


def test_empty_chunk(leaks):
    proxy = rewritten(at_idx(4, data=b""))
    check_fault(migrate(proxy=proxy), proxy,
          r"dev/0: empty chunk idx 4: only the last chunk may carry no data")


def test_out_of_order_bytes_over_the_cap(leaks):
    """Chunk 0 is held back on its channel; the chunks behind it on the other channel
    pile up at the destination until they pass max_queued_bytes."""
    config = CONFIG.replace(max_queued_bytes=4 * 4096)
    log: list = []
    proxy = Proxy({ch: HoldFirstChunks(config, 3.0, ch, log) for ch in range(config.channels)})
    outcome = migrate(config, proxy=proxy,
                      devices=[fastmfd.BytesDevice(*DEVICE, bytes(64 * 4096))])
    check_fault(outcome, proxy,
          r"dev/0: 5 chunks queued out of order would hold 20480 bytes of buffer, more than "
          r"max_queued_bytes \(16384\); waiting for chunk idx 0")


def test_a_cap_cut_to_fit_the_memory_left_says_so(leaks):
    """The session's max_queued_bytes (256 MiB by default) is cut where the pool would
    not fit the memory left (max_memory here; a container's small /dev/shm alike). The
    error named a max_queued_bytes nobody had set (the demo's device-state experiment
    in a 64 MiB /dev/shm: "more than max_queued_bytes (2097152)")."""
    left = 64 * 1024            # for the pool, beside the 1 MiB region
    cap, _ = plan_pool(1, CONFIG.max_queued_bytes, CONFIG.device_chunk_size,
                       CONFIG.channels, left)
    assert 4096 <= cap < 32 * 4096
    channels = (channel_memory(CONFIG, 1 << 20, devices=True)   # migrate()'s 1 MiB region
                + worker_memory(CONFIG, spares=False))      # (spares: from what the pool leaves)
    log: list = []
    proxy = Proxy({ch: HoldFirstChunks(CONFIG, 3.0, ch, log) for ch in range(CONFIG.channels)})
    outcome = migrate(CONFIG, proxy=proxy, max_memory=(1 << 20) + channels + left,
                      devices=[fastmfd.BytesDevice(*DEVICE, bytes(64 * 4096))])
    check_fault(outcome, proxy,
          rf"dev/0: \d+ chunks queued out of order would hold \d+ bytes of buffer, more than "
          rf"max_queued_bytes \({cap}, cut from {CONFIG.max_queued_bytes} to what the memory "
          rf"left for device-state buffers holds: max_memory, or what /dev/shm has free, "
          rf"within what this process's memory cgroup has left\)")


def test_the_default_loaders_keep_what_max_memory_leaves(leaks):
    """CollectLoader, the loader of every device the destination gave none, kept
    what the source sent, of any size, outside max_memory. Under max_memory the ones
    the destination makes share what its regions, channels and device-state buffers
    leave."""
    cap = 32 * 4096             # (more than the stream: channels reorder it)
    _, slots = plan_pool(1, cap, CONFIG.device_chunk_size, CONFIG.channels, 1 << 30)
    left = 40_000
    budget = ((1 << 20) + channel_memory(CONFIG, 1 << 20, devices=True) + worker_memory(CONFIG)
              + pool_bytes(slots, CONFIG.device_chunk_size) + left)
    outcome = migrate(max_memory=budget, max_queued_bytes=cap,
                      devices=[fastmfd.BytesDevice(*DEVICE, bytes(left + 1))])
    check(outcome, outcome.started,
          rf"dev/0: CollectLoader: the device state goes past {left} bytes, what max_memory "
          rf"\({budget}\) leaves after the regions, the receive channels \(their buffers and "
          rf"worker processes\), the device-state buffers and the greeting spares")
    _, result = migrate(max_memory=budget, max_queued_bytes=cap,
                        devices=[fastmfd.BytesDevice(*DEVICE, bytes(left))]).ok()
    assert result.devices[DEVICE] == bytes(left)


def test_tiny_chunks_out_of_order_hit_the_cap_not_a_full_pool(leaks):
    """A queued chunk holds a whole buffer slot: 1-byte chunks piling up behind a held
    chunk 0 must trip the cap before they take every slot of the destination's pool
    (which would leave the chunk 0 waiting for a slot forever)."""
    config = CONFIG.replace(max_queued_bytes=4 * 4096)
    log: list = []
    proxy = Proxy({ch: HoldFirstChunks(config, 3.0, ch, log) for ch in range(config.channels)})
    outcome = migrate(config, proxy=proxy, devices=[OddDevice(*DEVICE, bytes(2000), [1])],
                      timeout=20)
    check_fault(outcome, proxy, r"dev/0: 5 chunks queued out of order would hold")


def test_destination_cap_below_one_chunk_is_refused_at_setup(leaks):
    """A destination's own max_queued_bytes must hold one of the source's chunks, or
    any reordering would fail the session: SETUP is refused instead."""
    region = make_region("ram", 1 << 20, seed=5)
    try:
        with Migration(CONFIG.replace(device_chunk_size=8192),
                       max_queued_bytes=8191) as m:
            m.source.add_region(region)
            m.source.add_device(fastmfd.BytesDevice(*DEVICE, b"state"))
            outcome = m.run()
    finally:
        region.close()
    check(outcome, outcome.started,
          r"this destination's max_queued_bytes \(8191\) cannot hold one "
          r"device chunk of the source's device_chunk_size \(8192\)")


def test_reassembly_process_sigkilled(leaks):
    """The process that feeds the loaders dies while device state streams in."""
    size = 16 << 20

    def kill_reassembly():
        os.kill(migration.destination._reassembly[0].process.pid, signal.SIGKILL)

    proxy = Proxy({0: Trigger(1 << 20, kill_reassembly)})
    region = make_region("ram", 1 << 20, seed=5)
    try:
        with Migration(CONFIG, proxy=proxy) as migration:
            migration.source.add_region(region)
            migration.source.add_device(fastmfd.SyntheticDevice(*DEVICE, size))
            migration.destination.add_loader(*DEVICE, fastmfd.VerifyLoader(size,
                                                                           write_rate=64 << 20))
            outcome = migration.run()
    finally:
        region.close()
    # A receive worker writing to the dead process's pipe may report first.
    check_fault(outcome, proxy, r"reassembly: the worker process was killed by SIGKILL"
                                 r"|receive channel \d: .*reassembly pipe.* \(EPIPE\)")


def test_failure_while_devices_save_stops_their_threads_first(leaks):
    """The session fails during the final round's RAM while a device is still saving:
    its thread uses the Source's pool, selector and pipes, so it may not outlive
    migrate() — once the Source closes, such a thread touches unmapped memory."""
    def kill_receiver():
        os.kill(migration.destination._workers[1].process.pid, signal.SIGKILL)

    config = CONFIG.replace(max_bandwidth=64 << 20, job_packets=1)
    proxy = Proxy({1: Trigger(1 << 20, kill_receiver)})
    region = make_region("ram", 32 << 20, seed=5)
    try:
        with Migration(config, proxy=proxy) as migration:
            migration.source.add_region(region)
            migration.source.add_device(StallingDevice("slow", 0, chunks=3, stall=1.0))
            outcome = migration.run()
            saving = [t for t in threading.enumerate() if t.name.startswith("fastmfd save")]
            for thread in saving:       # before the Source frees what they use
                thread.join(10)
            assert not saving, f"{[t.name for t in saving]} outlived migrate()"
    finally:
        region.close()
    check_fault(outcome, proxy, r"receive channel 1: the worker process was killed by SIGKILL")


def test_a_device_whose_read_never_returns(leaks):
    """A device's read_state() is its own code, like a loader: one that never
    returns (a data fd nobody answers) left the source waiting for its save thread
    forever, with keepalives flowing both ways, so neither side ever failed. Now
    a read must return within stall_timeout, and after the failure the thread is
    left behind rather than waited for."""
    blocked = BlockedDevice("blocked", 0)
    try:
        outcome = migrate(CONFIG.replace(stall_timeout=1.0), devices=[blocked], timeout=30)
        assert_stall_named(outcome, blocked.blocked_at,
                           r"blocked/0: read_state\(\) made no progress for 1 s")
    finally:
        blocked.release.set()


def assert_stall_named(outcome: Outcome, since: float, pattern: str) -> None:
    """Both sides failed within the bound of ``since``, naming the stalled call
    (``pattern``); the destination as the source's failure."""
    src, dst = outcome.failed_both(since=since)
    assert re.search(pattern, str(src)), str(src)
    assert re.search(pattern, str(dst)) and "the source failed" in str(dst), str(dst)


@pytest.mark.parametrize("way", ["new", "old"])
@pytest.mark.parametrize("hook", ["save_setup", "state_pending", "save_live_iterate",
                                  "read_state", "config_state"])
def test_a_device_hook_that_never_returns(leaks, hook, way):
    """Only read_state() and save_live_iterate() in the new way's save threads were
    held to the deadline (and both were called read_state()): a device's
    save_setup(), config_state() or state_pending() (called for the convergence test
    in migrate()'s own thread), or any hook in the old way, where every call ran in
    migrate()'s thread, that never returned hung both sides for ever, keepalives
    flowing. Now no device code runs in migrate()'s thread and every call is held
    to stall_timeout."""
    device = HangingDevice("hang", 0, hook)
    try:
        with Migration(CONFIG.replace(stall_timeout=1.0, channel_header=way == "new")) as m:
            m.source.add_device(device)
            outcome = m.run(live=True, timeout=30)
        assert device.blocked_at is not None, "the hook was never called"
        assert_stall_named(outcome, device.blocked_at,
                           rf"hang/0: {hook}\(\) made no progress for 1 s \(stall timeout\)")
    finally:
        device.release.set()


@pytest.mark.parametrize("hook, call", [
    ("load_state_buffer", r"load_state_buffer\(\) of chunk 2"),
    ("load_config", r"load_config\(\) of chunk 16"),
    ("precopy_loaded", r"precopy_loaded\(\)"),
    ("load_finish", r"load_finish\(\)")])
def test_a_loader_hook_that_never_returns_is_named(leaks, hook, call):
    """A loader that hangs left the reassembly process without progress, and both
    sides said only "reassembly: no progress for 1 s": not which device's loader,
    nor in which call. The reassembly process now reports a call that has run for
    half the deadline, and the error names it."""
    config = CONFIG.replace(stall_timeout=1.0, switchover_ack=True)
    with Migration(config) as m:
        m.source.add_device(fastmfd.SyntheticDevice(*DEVICE, 16 * 4096,
                                                    precopy_size=8 * 4096))
        m.destination.add_loader(*DEVICE, HangingLoader(hook))
        outcome = m.run(live=True, timeout=30)
    check(outcome, outcome.started,
          rf"reassembly: no progress for 1 s \(dev/0: {call} has not "
          rf"returned\)")


def test_a_hung_loader_that_fills_every_old_way_buffer_is_named(leaks):
    """The old way: DEVICE_STATE messages on the main channel go into the pool's
    slots as they come. A loader hung at its third chunk frees none, so with a
    pool of a few slots the main loop's wait for a free one is what stalls:
    both sides fail after stall_timeout, naming that (untested until now) and
    the loader's call (that wait held the loop that reads the report naming it)."""
    config = CONFIG.replace(stall_timeout=1.0, channel_header=False,
                            max_queued_bytes=2 * 4096)
    with Migration(config) as m:
        m.source.add_device(fastmfd.SyntheticDevice(*DEVICE, 64 * 4096))
        m.destination.add_loader(*DEVICE, HangingLoader("load_state_buffer"))
        outcome = m.run(timeout=30)
    check(outcome, outcome.started,
          r"reassembly: no progress for 1 s \(no device-state buffer came free; dev/0: "
          r"load_state_buffer\(\) of chunk 2 has not returned\)")


def test_a_precopy_loaded_that_never_returns_is_named_when_it_runs_last(leaks):
    """precopy_loaded() runs in the reassembly process's main loop when PRECOPY_SENT
    comes after the chunks it names are loaded (held back here, as a busy main
    channel may): hanging there, it stopped that loop, which was also the one
    that reports a slow loader, and the error named none (1 run in 3 of the
    test above)."""
    config = CONFIG.replace(stall_timeout=1.0, switchover_ack=True)
    proxy = Proxy({"main": OnMessage(Msg.PRECOPY_SENT, lambda: None, delay=0.5)})
    with Migration(config, proxy=proxy) as m:
        m.source.add_device(fastmfd.SyntheticDevice(*DEVICE, 16 * 4096,
                                                    precopy_size=8 * 4096))
        m.destination.add_loader(*DEVICE, HangingLoader("precopy_loaded"))
        outcome = m.run(live=True, timeout=30)
    check(outcome, outcome.started,
          r"reassembly: no progress for 1 s \(dev/0: precopy_loaded\(\) "
          r"has not returned\)")


# ---------------------------------------------------------------- user code raising

@pytest.mark.parametrize("way", ["new", "old"])
def test_device_raising(leaks, way):
    broken = BrokenDevice("broken", 3, good=2)
    outcome = migrate(CONFIG.replace(channel_header=way == "new"), devices=[broken])
    check(outcome, broken.raised_at,
          r"broken/3: saving chunk 2 failed: OSError: the device's data fd failed")


@pytest.mark.parametrize("way", ["new", "old"])
def test_device_raising_with_the_sources_word_late(leaks, way):
    """The source's ERROR reaches the destination 0.15 s after its channels broke
    (its main channel is slow): the destination still names the cause, not a
    channel cut short, its consequence (about 1 run in 13 of the test above,
    when a packet was in flight)."""
    broken = BrokenDevice("broken", 3, good=2)
    proxy = Proxy({"main": Delay(0.15)}, channel_header=way == "new")
    outcome = migrate(CONFIG.replace(channel_header=way == "new"), proxy=proxy,
                      devices=[broken])
    check(outcome, broken.raised_at,
          r"broken/3: saving chunk 2 failed: OSError: the device's data fd failed")


@pytest.mark.parametrize("way", ["new", "old"])
def test_loader_raising(leaks, way):
    outcome = migrate(CONFIG.replace(channel_header=way == "new"),
                      loaders={DEVICE: BrokenLoader(good=3)})
    check(outcome, outcome.started,
          r"dev/0: loading chunk 3 failed: ValueError: the device rejected its state")
    # the destination's error names the device as a field too (it was in its text only:
    # the loader ran in the reassembly process, whose failure crossed as text)
    assert outcome.failed_both(outcome.started)[1].device == "dev/0"


@pytest.mark.parametrize("way", ["new", "old"])
def test_load_finish_raising_is_named(leaks, way):
    """A loader's load_finish() that raises is named as such, not as the loading of
    the last chunk (the error said "loading chunk 16 failed", sending its user to
    look at a chunk)."""
    outcome = migrate(CONFIG.replace(channel_header=way == "new"),
                      loaders={DEVICE: FinishingLoader()})
    check(outcome, outcome.started,
          r"dev/0: load_finish\(\) failed: OSError: the device would not resume")


@pytest.mark.parametrize("way", ["new", "old"])
def test_a_loader_that_keeps_its_data_fails_loudly(leaks, way):
    """``data`` is a view of a buffer slot that holds other chunks once the call
    returns: a loader that kept the views it was given (not copies) joined other
    chunks' bytes at load_finish(), and the session succeeded with that stream."""
    outcome = migrate(CONFIG.replace(channel_header=way == "new"),
                      loaders={DEVICE: KeepingLoader()})
    check(outcome, outcome.started, r"dev/0: load_finish\(\) failed: ValueError: "
                                    r"operation forbidden on released memoryview object")


def test_a_loader_that_keeps_a_buffer_of_its_data_is_told_to_copy(leaks):
    """A buffer held of ``data`` (numpy.frombuffer(data)) keeps it from being taken
    back: the session fails, naming the call and what to do."""
    outcome = migrate(loaders={DEVICE: KeepingLoader(export=True)})
    check(outcome, outcome.started,
          r"dev/0: load_state_buffer\(\) of chunk 0 kept a buffer of its data, which is "
          r"valid only during the call .*: a loader must copy what it keeps, e\.g\. bytes\(data\)")


# ---------------------------------------------------------------- user code returning nonsense

@pytest.mark.parametrize("way", ["new", "old"])
def test_device_returning_a_float(leaks, way):
    """read_state() wrote 10 bytes and said 9.9: the new way sent a 9-byte chunk on
    (the core truncated the length), and the loader got a byte less than the device
    wrote, with no error anywhere."""
    outcome = migrate(CONFIG.replace(channel_header=way == "new"),
                      devices=[MiscountingDevice("odd", 2, 9.9)])
    check(outcome, outcome.started,
          r"odd/2: saving chunk 0 failed: ValueError: read_state returned "
          r"9\.9 for a 4096-byte buffer, not a byte count")


@pytest.mark.parametrize("way", ["new", "old"])
def test_device_returning_a_bool(leaks, way):
    """read_state() wrote 10 bytes and said True ("I wrote something"): a bool is an
    int to Python, so one byte of them went on as the device's state, and the
    session succeeded with it. A bool is no byte count (DESIGN §7: the bytes written)."""
    outcome = migrate(CONFIG.replace(channel_header=way == "new"),
                      devices=[MiscountingDevice("flag", 2, True)])
    check(outcome, outcome.started,
          r"flag/2: saving chunk 0 failed: ValueError: read_state returned "
          r"True for a 4096-byte buffer, not a byte count")


def test_device_counting_in_numpy_integers(leaks):
    """state_pending() and read_state() may answer with numpy's integers (any integer
    is a byte count, as everywhere in the API): state_pending's np.int64 was refused
    as 'not a byte count'."""
    device = MiscountingDevice("np", 0, np.int64(10), pending=np.int64(10))
    with Migration(CONFIG) as m:
        m.source.add_device(device)
        stats, result = m.run(live=True).ok()
    assert result.devices[("np", 0)] == b"0123456789"
    assert stats.device_live_bytes > 0, "the state went after the stop, not live"


def test_loader_finish_returning_what_cannot_be_pickled(leaks):
    """What load_finish() returns goes to the destination's main process: one that does
    not pickle was reported as 'loading chunk N failed', with advice about pickling
    loaders (the loader had pickled)."""
    outcome = migrate(loaders={DEVICE: FinishingLoader(result=threading.Lock)})
    check(outcome, outcome.started,
          r"dev/0: load_finish\(\) returned 'lock', which cannot be "
          r"pickled to the destination's main process: cannot pickle "
          r"'_thread.lock' object$")


def test_one_device_too_many_is_refused_when_added(leaks):
    """The 4097th device went into the Source, and migrate() connected to the
    destination before it found that SETUP cannot carry it ('Invalid: devices:
    4097, ...'), leaving the destination waiting for a greeting that never came."""
    source = fastmfd.Source("tcp:127.0.0.1:1")
    for i in range(4096):
        source.add_device(fastmfd.BytesDevice("dev", i, b""))
    with pytest.raises(fastmfd.ConfigError, match="at most 4096 devices"):
        source.add_device(fastmfd.BytesDevice("dev", 4096, b""))


def test_a_loader_that_does_not_pickle_is_named(leaks):
    """The loaders go to the reassembly process together: one that did not pickle
    failed the session with the pickler's words alone ("cannot pickle
    '_thread.lock' object"), not saying which of the devices' loaders it was."""
    outcome = migrate(loaders={("bystander", 0): LockedLoader()})
    check(outcome, outcome.started,
          r"TypeError: the loader of device bystander/0: cannot pickle "
          r"'_thread.lock' object")


_STOPPED_WHEN_ITS_LOADER_FAILS = reporting_destination(before="""
    import os
    import signal

    class StopsItsOwnerThenRejects:
        # Stops the destination's main process (SIGSTOP), then rejects its first
        # chunk: the reassembly process reports that and exits while the main
        # process looks at nothing (as a loaded machine may leave it).
        def __init__(self, owner):
            self.owner = owner

        def load_state_buffer(self, data):
            os.kill(self.owner, signal.SIGSTOP)
            raise ValueError("the device rejected its state")

        def load_finish(self):
            return None
""", setup='dst.add_loader("dev", 0, StopsItsOwnerThenRejects(os.getpid()))')


class _TwoChunksApart:
    """Gives one chunk, then a second once ``release`` is set, then ends."""

    def __init__(self) -> None:
        self.idstr, self.instance_id = DEVICE
        self.release = threading.Event()
        self.reads = 0

    def read_state(self, buf) -> int:
        self.reads += 1
        if self.reads == 2:
            self.release.wait(30)
        if self.reads > 2:
            return 0
        buf[:100] = b"d" * 100
        return 100


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _running(pid: int, title: str) -> int:
    """How many processes under ``pid`` have a short title (comm) starting with ``title``."""
    count = 0
    for child in process_tree(pid):
        try:
            with open(f"/proc/{child}/comm") as f:
                count += f.read().startswith(title)
        except FileNotFoundError:
            pass
    return count


@pytest.mark.parametrize("way", ["old", "new"])
def test_a_chunk_for_a_reassembly_process_gone_names_its_failure(leaks, way):
    """The reassembly process reports its loader's error and exits while the
    destination's main process is held up; then the next chunk finds the descriptor
    pipe broken. The session's error is the one the reassembly process reported:
    - old way: the main channel's DEVICE_STATE, read first, said "Broken pipe"
      (test_device_raising_with_the_sources_word_late[old], under load: the grace
      for the source's ERROR applies to the reassembly's failure, not to a bare
      broken pipe);
    - new way: the receive worker that wrote the chunk's descriptor fails too, and
      workers are watched before the reassembly process: its "reassembly pipe:
      Broken pipe" was the session's error."""
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_WHEN_ITS_LOADER_FAILS],
                            stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        device = _TwoChunksApart()
        failed: list = []
        with fastmfd.Source(address, CONFIG.replace(channel_header=way == "new")) as src:
            src.add_device(device)
            thread = threading.Thread(target=lambda: failed.append(
                pytest.raises(fastmfd.MigrationError, src.migrate, live=False)), daemon=True)
            thread.start()
            deadline = time.monotonic() + 30
            while not _stopped(proc.pid) or _running(proc.pid, "fastmfd reasm"):
                assert time.monotonic() < deadline, "the loader did not stop its owner"
                time.sleep(0.01)
            workers = _running(proc.pid, "fastmfd recv")
            device.release.set()        # the second chunk
            while (src.status()["device"]["transferred"] < 200
                   or way == "new" and _running(proc.pid, "fastmfd recv") == workers):
                assert time.monotonic() < deadline, "the second chunk did not break the pipe"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGCONT)
            thread.join(30)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert out.strip() == ("failed: reassembly: dev/0: loading chunk 0 failed: ValueError: "
                           "the device rejected its state"), out
    assert "the device rejected its state" in str(failed[0].value)
