"""First error wins and everything stops (DESIGN §3, issue #3 item 9).

Each fault — a SIGKILLed send or receive worker, a connection reset, a
truncated packet, a corrupted byte, an exception in a user hook — must fail
the session on both sides within 5 s with a MigrationError naming the channel
(or hook) and the cause, leave the source region as it was, and leak nothing.
Faults strike mid-transfer: the source is capped at 64 MiB/s, so 16 MiB take
a quarter of a second and the proxy fires after the first MiB of a channel.
Jobs of one packet (512 KiB) spread the pages over both channels, so each
carries well over that MiB whatever channels the selector picks.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time

import numpy as np
import pytest

import fastmfd
from fastmfd import _core
from fastmfd.protocol.main_channel import Msg
from fastmfd._engine.processes import RemoteTraceback
from fastmfd._engine.session import call_hook
from migration_support import (AtMessage, Corrupt, EditMessage, FlipInMessage, Migration,
                               Outcome, Packets, Proxy, Reset, RewriteHello, Trigger, Truncate,
                               make_region)

CONFIG = fastmfd.MigrationConfig(channels=2, max_bandwidth=64 << 20, job_packets=1)
MIB = 1 << 20


@pytest.fixture
def image():
    """The source region, and a copy to check it was left alone."""
    region = make_region("ram", 16 * MIB, seed=1)
    before = region.array.copy()
    yield region
    unchanged = np.array_equal(region.array, before)
    region.close()
    assert unchanged, "the failed migration changed the source region"


def migrate(image, faults=None, config=CONFIG, on_enter=None, **hooks) -> Outcome:
    """Migrate ``image`` through a proxy with ``faults``; the Source and Destination
    are closed when this returns. ``on_enter(migration)`` runs before the start."""
    proxy = (Proxy(faults, channel_header=config.channel_header)
             if faults is not None else None)
    with Migration(config, proxy=proxy) as m:
        m.source.add_region(image)
        if on_enter is not None:
            on_enter(m)
        outcome = m.run(**hooks)
    return outcome


def assert_names(error: BaseException, *patterns: str) -> None:
    for pattern in patterns:
        assert re.search(pattern, str(error)), f"{pattern!r} not in {str(error)!r}"


def assert_failed_at(side: str, src: BaseException, dst: BaseException, expected: str) -> None:
    """The ``side`` that failed names ``expected``; its peer heard it, as "the
    <side> failed: ..."."""
    failed, told = (dst, src) if side == "destination" else (src, dst)
    assert_names(failed, expected)
    assert_names(told, f"the {side} failed: " + expected)


# ---------------------------------------------------------------- processes killed

class Kill:
    """SIGKILL the worker of ``channel`` on ``side`` ("source" or "destination")."""

    def __init__(self, side: str, channel: int) -> None:
        self.side, self.channel = side, channel
        self.migration: Migration | None = None

    def __call__(self) -> None:
        owner = getattr(self.migration, self.side)
        os.kill(owner._workers[self.channel].process.pid, signal.SIGKILL)

    def attach(self, migration: Migration) -> None:
        self.migration = migration

    def join(self) -> None:
        getattr(self.migration, self.side)._workers[self.channel].process.join(5)


def test_sigkilled_send_worker(image, leaks):
    kill = Kill("source", 1)
    trigger = Trigger(MIB, kill)
    outcome = migrate(image, {1: trigger}, on_enter=kill.attach)
    src, dst = outcome.failed_both(since=trigger.fired_at)
    assert_names(src, r"send channel 1: the worker process was killed by SIGKILL")
    # The destination hears it from the source, or sees the channel end mid-packet first.
    assert_names(dst, r"channel 1: (.*killed by SIGKILL|the connection from \S+ closed after)")
    leaks.assert_clean(keep=[image])


def test_a_dead_worker_is_named_even_before_the_monitor_sees_it(image, leaks, monkeypatch):
    """The main thread can write the next command to a worker that has just died,
    before the monitor thread has noticed: the write's broken pipe must wait for
    the monitor's word (the worker's death), not become the session's error."""
    from fastmfd._engine import processes
    real_poll = processes.Watch.poll

    def lagging_poll(self, timeout):
        time.sleep(0.05)
        real_poll(self, timeout)
    monkeypatch.setattr(processes.Watch, "poll", lagging_poll)
    kill = Kill("source", 1)
    trigger = Trigger(MIB, kill)
    outcome = migrate(image, {1: trigger}, on_enter=kill.attach)
    src, _ = outcome.failed_both(since=trigger.fired_at)
    assert_names(src, r"send channel 1: the worker process was killed by SIGKILL")
    leaks.assert_clean(keep=[image])


def test_sigkilled_receive_worker(image, leaks):
    kill = Kill("destination", 1)
    trigger = Trigger(MIB, kill)
    outcome = migrate(image, {1: trigger}, on_enter=kill.attach)
    src, dst = outcome.failed_both(since=trigger.fired_at)
    assert_names(dst, r"receive channel 1: the worker process was killed by SIGKILL")
    assert_names(src, r"the destination failed: receive channel 1: .*killed by SIGKILL")
    leaks.assert_clean(keep=[image])


@pytest.mark.parametrize("side,name", [("source", "send"), ("destination", "receive")])
def test_worker_killed_before_the_session(image, leaks, side, name):
    """A worker that died while idle (started with the Source/Destination, killed
    before migrate) is reported as such, not as a broken pipe."""
    kill = Kill(side, 1)
    started = []

    def kill_first(migration):
        kill.attach(migration)
        kill()
        kill.join()
        started.append(time.monotonic())

    outcome = migrate(image, on_enter=kill_first)
    src, dst = outcome.failed_both(since=started[0])
    for error in (src, dst):
        assert_names(error, rf"{name} channel 1: the worker process was killed by SIGKILL")
    leaks.assert_clean(keep=[image])


def test_a_region_file_replaced_before_the_migration(tmp_path, leaks):
    """A program that renames a new image over the one being sent: the workers
    open the file again by its path, and would send half of each; they refuse it."""
    path = tmp_path / "ram.img"
    (tmp_path / "new.img").write_bytes(bytes(range(256)) * 4096)
    started = []

    def replace(migration):
        os.rename(tmp_path / "new.img", path)
        started.append(time.monotonic())

    with fastmfd.Region.from_file("ram", path, size=1 * MIB) as region:
        outcome = migrate(region, on_enter=replace)
    src, dst = outcome.failed_both(since=started[0])
    expected = (rf"send channel \d: ConfigError: region file {re.escape(str(path))} was "
                rf"replaced by another file since the region was made")
    assert_failed_at("source", src, dst, expected)
    leaks.assert_clean()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_an_image_cut_short_while_it_is_sent_is_named(tmp_path, leaks, compression):
    """Reading what was cut off is an EFAULT from the socket (raw pages) or a SIGBUS
    (compressed): the error said only that, now it says what happened to the file."""
    path = tmp_path / "ram.img"
    path.write_bytes(os.urandom(16 * MIB))
    config = CONFIG.replace(compression=compression, zero_page_detection=False,
                            max_bandwidth=16 * MIB)
    started = []

    def cut_short_soon():
        def cut():
            os.truncate(path, 4096)
            started.append(time.monotonic())
        threading.Timer(0.2, cut).start()       # while the channels read it

    with fastmfd.Region.from_file("ram", path, read_only=True) as region:
        outcome = migrate(region, config=config, live=False, on_stop=cut_short_soon)
    src, dst = outcome.failed_both(since=started[0])
    expected = (rf"send channel \d: (send: Bad address \(EFAULT\)|the worker process was "
                rf"killed by SIGBUS) \(region file {re.escape(str(path))} shrank below "
                rf"{16 * MIB} bytes\)")
    assert_failed_at("source", src, dst, expected)
    leaks.assert_clean()


def test_ctrl_c_during_migrate(image, leaks, ctrl_c):
    """SIGINT while migrate() runs in the main thread: KeyboardInterrupt reaches the
    caller, the destination hears "interrupted by the user", nothing is left."""
    interrupt = Trigger(MIB, lambda: os.kill(os.getpid(), signal.SIGINT))
    with Migration(CONFIG, proxy=Proxy({1: interrupt})) as m:
        m.source.add_region(image)
        received: dict = {}

        def receive():
            try:
                m.destination.receive()
            except BaseException as exc:
                received["error"], received["end"] = exc, time.monotonic()

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        with pytest.raises(KeyboardInterrupt):
            m.source.migrate(live=False)
        interrupted = time.monotonic()
        receiver.join(10)
    assert interrupted - interrupt.fired_at < 5
    assert isinstance(received["error"], fastmfd.MigrationError)
    assert_names(received["error"], r"main channel: the source failed: interrupted by the user")
    assert received["end"] - interrupt.fired_at < 5
    leaks.assert_clean(keep=[image])


# ---------------------------------------------------------------- the wire

def test_connection_reset(image, leaks):
    reset = Reset(after=MIB)
    outcome = migrate(image, {1: reset})
    src, dst = outcome.failed_both(since=reset.fired_at)
    # Both ends of channel 1 are reset: either may report first, in words (it
    # said "ConnectionResetError: [Errno 104] send: Connection reset by peer"), and
    # the source's word is not held back: a source that waited for the destination's
    # ERROR while the destination waited for its own said the destination failed.
    for error in (src, dst):
        assert_names(error, r"(send|receive) channel 1: \w+: (Connection reset by peer "
                            r"\(ECONNRESET\)|Broken pipe \(EPIPE\))$")
    assert not str(src).startswith("main channel: the destination failed"), src
    leaks.assert_clean(keep=[image])


def test_truncated_packet(image, leaks):
    # The stream to the destination ends 100 bytes into a packet header; the
    # proxy swallows what the source sends after, so only the destination knows.
    cut = Truncate(after=_core.RamPacketCodec(CONFIG.packet_pages).header_size + 100)
    outcome = migrate(image, {1: cut})
    src, dst = outcome.failed_both(since=cut.fired_at)
    # Named as the main channel's end is: whose connection ended (the proxy's, here).
    expected = (r"receive channel 1: the connection from 127\.0\.0\.1:\d+ closed after \d+ "
                r"of \d+ bytes of RAM \w+$")
    assert_failed_at("destination", src, dst, expected)
    leaks.assert_clean(keep=[image])


def test_corrupted_packet_header(image, leaks):
    flip = Corrupt(at=0, mask=0xFF)           # the first packet's magic
    outcome = migrate(image, {1: flip})
    src, dst = outcome.failed_both(since=flip.fired_at)
    expected = (r"receive channel 1: ProtocolError: RAM packet field 'magic': "
                r"received 0xee223344, expected 0x11223344")
    assert_failed_at("destination", src, dst, expected)
    # The receive worker's traceback crossed the process boundary as the cause.
    assert isinstance(dst.__cause__, RemoteTraceback)
    assert "fastmfd.errors.ProtocolError: RAM packet field 'magic'" in dst.__cause__.text
    leaks.assert_clean(keep=[image])


def _offsets_at(config) -> int:
    """Where a RAM packet's offsets start on the wire (they count after the hello)."""
    return _core.RamPacketCodec(config.packet_pages).header_size - 8 * config.packet_pages


def test_a_channel_refused_for_its_damaged_hello_is_named_in_the_failure(image, leaks):
    """A channel whose init packet comes damaged (a proxy, a bad link) is refused as a
    stranger, and the session fails waiting for it: its error, on both sides, names
    that refusal. It said only "channel 1: not connected 1 s after SETUP_ACK" (or "main
    channel: nothing from the source"), the refusal in the destination's log alone (a
    fuzz review)."""
    uuid_at = _core.CHANNEL_HEADER_SIZE + 8     # the init packet: magic, version, uuid

    def damaged(hello: bytes) -> bytes:
        return hello[:uuid_at] + bytes([hello[uuid_at] ^ 0xFF]) + hello[uuid_at + 1:]

    damage = RewriteHello(damaged)
    config = fastmfd.MigrationConfig(channels=2, max_bandwidth=64 << 20, job_packets=1,
                                     stall_timeout=1.0)
    src, dst = migrate(image, {1: damage}, config=config).failed_both(since=damage.fired_at)
    refusal = (r"; refused 1 connection meanwhile \(127\.0\.0\.1:\d+: init packet field "
               r"'uuid': received [0-9a-f]{32}, expected [0-9a-f]{32} \(the session's\)\)$")
    assert_names(dst, refusal)
    assert_names(src, r"the destination failed: .*" + refusal)
    leaks.assert_clean(keep=[image])


@pytest.mark.parametrize("where, mask", [
    # A flipped payload bit.
    (lambda config: _core.RamPacketCodec(config.packet_pages).header_size + 5000, 0x01),
    # The CRC covers the header too: byte 6 of the first big-endian u64 offset,
    # bit 4, moves the offset by one page, and intact pages would land one page off.
    (lambda config: _offsets_at(config) + 6, 0x10),
], ids=["payload", "offset"])
def test_a_corrupted_packet_fails_its_checksum(image, leaks, where, mask):
    config = CONFIG.replace(checksum=True, zero_page_detection=False)
    flip = Corrupt(at=where(config), mask=mask)
    outcome = migrate(image, {1: flip}, config=config)
    src, dst = outcome.failed_both(since=flip.fired_at)
    expected = r"receive channel 1: ProtocolError: RAM packet field 'checksum'"
    assert_failed_at("destination", src, dst, expected)
    leaks.assert_clean(keep=[image])


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_packets_swapped_within_a_channel_fail_its_checksum(image, leaks, compression):
    """A compressed channel is one stream: two of its packets swapped, each intact,
    inflate against the wrong history into wrong pages with no error from the
    decompressor. The CRCs chain through the channel, so the swap fails (found by
    a fuzzing helper: the pages were loaded)."""
    config = CONFIG.replace(checksum=True, compression=compression)
    held = []

    def swap_second_and_third(link, packet):
        if len(held) < 3 and not packet.flags & _core.FLAG_SYNC:
            held.append(packet)
            if len(held) == 1:
                link.send(packet.raw)
            elif len(held) == 3:
                swap.fire()
                link.send(held[2].raw + held[1].raw)
        else:
            link.send(packet.raw)

    swap = Packets(config, swap_second_and_third)
    outcome = migrate(image, {1: swap}, config=config)
    src, dst = outcome.failed_both(since=swap.fired_at)
    expected = (r"receive channel 1: ProtocolError: RAM packet field 'checksum': .* "
                r"chained through the channel's packets")
    assert_failed_at("destination", src, dst, expected)
    leaks.assert_clean(keep=[image])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_corrupted_device_state_fails_its_checksum(image, leaks, compression):
    """Device state is checksummed like RAM: one flipped bit in a chunk, and the
    loader would get another device's bytes than the source sent."""
    config = CONFIG.replace(checksum=True, device_state_channels=1, compression=compression)
    flip = Corrupt(at=_core.DEVICE_HEADER_SIZE + 1000, mask=0x01)
    device = fastmfd.SyntheticDevice("nic", 0, 4 * MIB, seed=5)
    outcome = migrate(image, {2: flip}, config=config,
                      on_enter=lambda m: m.source.add_device(device))
    src, dst = outcome.failed_both(since=flip.fired_at)
    expected = r"receive channel 2: ProtocolError: device state packet field 'checksum'"
    assert_failed_at("destination", src, dst, expected)
    leaks.assert_clean(keep=[image])


def test_corrupted_old_way_device_state_fails_its_checksum(image, leaks):
    """The old way's DEVICE_STATE messages carry the CRC-32 too (found by a
    fuzzing helper: a flipped bit in one was loaded)."""
    config = CONFIG.replace(checksum=True, channel_header=False)
    flip = FlipInMessage(Msg.DEVICE_STATE, at=1000, mask=0x01)
    device = fastmfd.SyntheticDevice("nic", 0, 4 * MIB, seed=5)
    outcome = migrate(image, {"main": flip}, config=config,
                      on_enter=lambda m: m.source.add_device(device))
    src, dst = outcome.failed_both(since=flip.fired_at)
    expected = r"DEVICE_STATE field 'checksum': received [0-9a-f]{16}, expected [0-9a-f]{16}"
    assert_names(dst, expected)
    assert_names(src, expected)
    leaks.assert_clean(keep=[image])


def test_corrupted_main_channel_message(image, leaks):
    # Byte 8 after the main channel's header is the type of SETUP, the first message.
    flip = Corrupt(at=8, mask=0x70)
    outcome = migrate(image, {"main": flip})
    src, dst = outcome.failed_both(since=flip.fired_at)
    expected = r"main channel field 'type': received \d+, expected one of"
    assert_names(dst, expected)
    # SETUP is refused while the source greets: its error names the address too.
    assert_names(src, r"main channel to tcp:127\.0\.0\.1:\d+: the peer failed: " + expected)
    leaks.assert_clean(keep=[image])


@pytest.mark.parametrize("then,cause", [
    ("reset", r"main channel: connection lost reading message: Connection reset by peer"),
    # Its end without an ERROR names who ended it (the proxy's address, here).
    ("cut", r"main channel \(from 127\.0\.0\.1:\d+\): the source closed the connection "
            r"after 3 of 8 bytes of message$")], ids=["reset", "truncated"])
def test_main_channel_lost_mid_session(image, leaks, then, cause):
    """The main channel breaks in the middle of ROUND_END: both sides name it."""
    fault = AtMessage(Msg.ROUND_END, then)
    outcome = migrate(image, {"main": fault})
    src, dst = outcome.failed_both(since=fault.fired_at)
    assert_names(dst, r"^" + cause)
    assert_names(src, r"^main channel: ")
    if then == "cut":       # only the destination saw it: the source hears it from there
        assert_names(src, r"the destination failed: " + cause)
    leaks.assert_clean(keep=[image])


class Retype(EditMessage):
    """On the main channel: the first message of type ``kind`` goes on as ``becomes``
    (one corrupted type field), everything else unchanged."""

    def __init__(self, kind, becomes) -> None:
        super().__init__(kind)
        self.becomes = becomes

    def edit(self, buf: bytearray) -> bool:
        struct.pack_into(">I", buf, 0, self.becomes)
        return True


def test_round_end_corrupted_into_a_keepalive(image, leaks):
    """A bit flip made ROUND_END a KEEPALIVE (found by the soak, benchmarks/soak.py):
    its payload was skipped as a keepalive's, the round's end was lost, and each
    side's keepalives kept the other waiting forever. A KEEPALIVE carries nothing:
    one with a payload is a protocol error."""
    fault = Retype(Msg.ROUND_END, Msg.KEEPALIVE)
    outcome = migrate(image, {"main": fault}, config=CONFIG.replace(stall_timeout=2),
                      timeout=20)
    src, dst = outcome.failed_both(since=fault.fired_at)
    expected = r"main channel KEEPALIVE: expected an empty payload"
    assert_failed_at("destination", src, dst, expected)
    leaks.assert_clean(keep=[image])


# ---------------------------------------------------------------- user hooks

class HookError(Exception):
    pass


def failing_hook(name: str, when: dict):
    def hook():
        when["raised"] = time.monotonic()
        raise HookError(f"{name} broke")
    return hook


@pytest.mark.parametrize("live", [False, True], ids=["stopped", "live"])
def test_on_stop_raising(image, leaks, live):
    when: dict = {}
    outcome = migrate(image, live=live, on_stop=failing_hook("on_stop", when))
    src, dst = outcome.failed_both(since=when["raised"])
    expected = r"the on_stop hook raised HookError: on_stop broke"
    assert_names(src, expected)
    assert_names(dst, "main channel: the source failed: " + expected)
    assert isinstance(src.__cause__, HookError)
    leaks.assert_clean(keep=[image])


def test_destination_on_resume_raising(image, leaks):
    """The destination could not resume: the source must not believe it did."""
    when: dict = {}
    resumed = []
    outcome = migrate(image, dst_on_resume=failing_hook("on_resume", when),
                      on_resume=lambda: resumed.append(True))
    src, dst = outcome.failed_both(since=when["raised"])
    expected = r"the on_resume hook raised HookError: on_resume broke"
    assert_failed_at("destination", src, dst, expected)
    assert not resumed, "the source ran on_resume although the destination did not resume"
    leaks.assert_clean(keep=[image])


def test_source_on_resume_raising(image, leaks):
    """The source's on_resume runs once the destination has resumed: the migration is
    over and the destination keeps its result; the source reports the hook's error."""
    when: dict = {}
    with Migration(CONFIG) as m:
        m.source.add_region(image)
        outcome = m.run(on_resume=failing_hook("on_resume", when))
        assert outcome.dest_error is None
        assert np.array_equal(outcome.result.regions["ram"].array, image.array)
    assert isinstance(outcome.source_error, fastmfd.MigrationError)
    assert_names(outcome.source_error, r"the on_resume hook raised HookError: on_resume broke")
    assert outcome.source_end - when["raised"] < 5
    leaks.assert_clean(keep=[image])


def test_only_a_listener_s_own_output_error_passes_a_hook_unnamed():
    """A listener commits its files in its on_resume hook: its OutputError names the
    file and passes as it is; anything else a hook raises, a MigrationError too,
    is said to come from the hook."""
    def raising(exc: Exception):
        def hook() -> None:
            raise exc
        return hook

    with pytest.raises(fastmfd.OutputError, match=r"^out/ram.img.part: full$"):
        call_hook("on_resume", raising(fastmfd.OutputError("out/ram.img.part: full")))
    with pytest.raises(fastmfd.MigrationError,
                       match=r"^the on_stop hook raised MigrationError: mine$"):
        call_hook("on_stop", raising(fastmfd.MigrationError("mine")))
