"""Device precopy, switchover-ack and the config chunk (issue #13): a device's
live chunks travel while the workload runs, in one idx space with its stop-copy
chunks; the convergence test counts what devices still want to send; with
``switchover_ack`` the source stops only once the destination loaded every
live chunk; loaders get the config chunk through ``load_config``, once, last —
after all RAM with ``config_after_ram``."""

from __future__ import annotations

import functools
import os
import re
import time

import numpy as np
import pytest

import fastmfd
from device_support import (ChurningDevice, ConfigRecorder, HoldFirstChunks, StampingLoader,
                            migrate_devices, read_stamps)
from migration_support import Delay, Migration, Proxy, make_region

MIB = 1 << 20
WAYS = {
    "old": dict(channel_header=False),
    "mixed": dict(),
    "dedicated": dict(device_state_channels=2),
}


_run = functools.partial(migrate_devices, live=True)     # precopy needs a live migration


@pytest.mark.parametrize("way", WAYS)
def test_live_and_stop_copy_chunks_load_as_one_stream(way):
    """Two devices with 1 MiB of initial data each and more left at the stop: the
    live chunks and the stop-copy chunks reach each loader in one order."""
    config = fastmfd.MigrationConfig(channels=2, device_chunk_size=64 << 10, **WAYS[way])
    size, precopy = 3 * MIB + 5, MIB
    devices = [fastmfd.SyntheticDevice(f"vfio{i}", 0, size, seed=i, precopy_size=precopy)
               for i in range(2)]
    loaders = {(f"vfio{i}", 0): fastmfd.VerifyLoader(size, seed=i, precopy_size=precopy)
               for i in range(2)}
    stats, result = _run(config, devices, loaders)
    assert result.devices == {("vfio0", 0): size, ("vfio1", 0): size}
    # 16 live chunks of 64 KiB per device, each with its 12-byte header.
    assert stats.device_live_bytes == 2 * (precopy + 16 * 12)
    assert stats.device_chunks == result.stats.device_chunks
    assert stats.device_bytes == result.stats.device_bytes == 2 * size + 12 * stats.device_chunks


def test_without_live_rounds_everything_goes_at_the_stop():
    config = fastmfd.MigrationConfig(channels=2)
    device = fastmfd.SyntheticDevice("vfio", 0, 2 * MIB, precopy_size=MIB)
    stats, result = _run(config, [device], {("vfio", 0): fastmfd.VerifyLoader(2 * MIB)},
                         live=False)
    assert result.devices == {("vfio", 0): 2 * MIB}
    assert stats.device_live_bytes == 0


@pytest.mark.parametrize("way", ["mixed", "dedicated"])
def test_live_chunks_overtaken_by_stop_copy_chunks_still_load_in_order(way):
    """Chunk idx 0 (a live chunk) is held back while the rest of the live chunks and
    the stop-copy chunks arrive first: the loader still gets idx 0, 1, 2, ..."""
    config = fastmfd.MigrationConfig(channels=2, device_chunk_size=4096, **WAYS[way])
    data_channels = range(config.total_channels) if way == "mixed" else \
        range(config.channels, config.total_channels)
    log: list = []
    proxy = Proxy({ch: HoldFirstChunks(config, 0.5, ch, log) for ch in data_channels})
    size, precopy = 40 * 4096, 8 * 4096
    device = fastmfd.SyntheticDevice("vfio", 0, size, seed=4, precopy_size=precopy)
    stats, result = _run(config, [device],
                         {("vfio", 0): fastmfd.VerifyLoader(size, seed=4)}, proxy=proxy)
    assert result.devices == {("vfio", 0): size}
    assert stats.device_live_bytes == precopy + 8 * 12
    # What the test is about happened: a stop-copy chunk was passed on to the
    # destination before chunk 0 was (chunk 0 may even reach the proxy last).
    chunk0_released = min(released for _, _, idx, released in log if idx == 0)
    assert any(idx >= 8 and released < chunk0_released for _, _, idx, released in log), \
        "no stop-copy chunk reached the destination before chunk 0"


def test_convergence_counts_what_devices_still_want_to_send():
    """Idle RAM converges at once, but a device that always has state pending keeps
    the rounds going until max_rounds."""
    config = fastmfd.MigrationConfig(channels=2, max_rounds=3)
    stats, result = _run(config, [ChurningDevice("busy", 0, claimed=1 << 40)])
    assert stats.rounds == 4                    # 3 live rounds, then the stop
    assert result.devices[("busy", 0)] == b"chunk 0;chunk 1;chunk 2;"
    idle, _ = _run(config, [fastmfd.SyntheticDevice("idle", 0, 4096)])
    assert idle.rounds == 2


def test_switchover_waits_for_the_destination_to_load_the_live_chunks(tmp_path):
    """A loader that takes half a second over its 4 MiB of initial data: with
    switchover_ack the source stops only after the destination approved, which
    it does only after the initial data is loaded; without it the source stops
    while the loader is still at it."""
    size, precopy = 5 * MIB, 4 * MIB
    order = {}
    for ack in (True, False):
        log = str(tmp_path / f"stamps-{ack}")
        config = fastmfd.MigrationConfig(channels=2, switchover_ack=ack)
        device = fastmfd.SyntheticDevice("vfio", 0, size, precopy_size=precopy)
        loader = StampingLoader(log, size, write_rate=8 * MIB, precopy_size=precopy)
        stopped = []
        _run(config, [device], {("vfio", 0): loader},
             on_stop=lambda: stopped.append(time.monotonic()))
        stamps = read_stamps(log)
        order[ack] = sorted([("stop", stopped[0])] + list(stamps.items()), key=lambda e: e[1])
    events = [event for event, _ in order[True]]
    assert events == ["initial", "approved", "stop", "config", "finish"], order[True]
    events = [event for event, _ in order[False]]
    assert "approved" not in events and events.index("stop") < events.index("initial"), \
        order[False]


def test_a_session_without_devices_is_acked_at_once():
    config = fastmfd.MigrationConfig(channels=2, switchover_ack=True)
    stats, _ = _run(config, [])
    assert stats.rounds == 2


def test_the_config_chunk_goes_to_load_config_once_last():
    config = fastmfd.MigrationConfig(channels=2, device_chunk_size=4096)
    data = os.urandom(3 * 4096 + 17)
    device = fastmfd.BytesDevice("nic", 0, data, config=b"the config")
    stats, result = _run(config, [device], {("nic", 0): ConfigRecorder()})
    calls = result.devices[("nic", 0)]
    assert calls[-2:] == [("config", b"the config"), ("finish",)]
    assert b"".join(d for kind, d, *_ in calls[:-2] if kind == "data") == data
    assert [c[0] for c in calls].count("config") == 1
    # A loader without load_config still gets the config bytes as data.
    _, result = _run(config, [fastmfd.BytesDevice("nic", 0, data, config=b"cfg")])
    assert result.devices[("nic", 0)] == data + b"cfg"


@pytest.mark.parametrize("after_ram", [True, False])
def test_config_after_ram_waits_for_every_page(tmp_path, after_ram):
    """RAM channels delayed by 0.4 s, device state on a dedicated channel: the
    config chunk arrives long before the pages. With config_after_ram its loader
    sees the whole region; without, a part of it."""
    config = fastmfd.MigrationConfig(channels=2, device_state_channels=1,
                                     config_after_ram=after_ram)
    proxy = Proxy({ch: Delay(0.4) for ch in range(config.channels)})
    log = str(tmp_path / "stamps")
    source = make_region("ram", 4 * MIB, seed=5)
    target = fastmfd.Region.create("ram", 4 * MIB)
    try:
        loader = StampingLoader(log, 4096, region=target.handle, source_region=source.handle)
        with Migration(config, proxy=proxy) as m:
            m.source.add_region(source)
            m.destination.add_region(target)
            m.source.add_device(fastmfd.SyntheticDevice("vfio", 0, 4096))
            m.destination.add_loader("vfio", 0, loader)
            m.run(live=False).ok()
        assert np.array_equal(target.array, source.array)
    finally:
        source.close()
        target.close()
    seen = "config-ram-whole" if after_ram else "config-ram-partial"
    assert seen in read_stamps(log)


class _BadPending:
    def __init__(self, pending) -> None:
        self.idstr, self.instance_id, self.pending = "bad", 0, pending

    def state_pending(self):
        if isinstance(self.pending, BaseException):
            raise self.pending
        return self.pending

    def save_live_iterate(self, buf) -> int:
        return 0

    def read_state(self, buf) -> int:
        return 0


@pytest.mark.parametrize("pending, words", [
    (OSError("the device's fd failed"), "OSError: the device's fd failed"),
    (-1, "state_pending returned -1"),
])
def test_a_device_failing_its_estimate_fails_the_migration_naming_it(pending, words):
    region = make_region("ram", MIB, seed=3)
    try:
        with Migration(fastmfd.MigrationConfig(channels=2)) as m:
            m.source.add_region(region)
            m.source.add_device(_BadPending(pending))
            outcome = m.run(live=True)
    finally:
        region.close()
    assert isinstance(outcome.source_error, fastmfd.MigrationError)
    assert isinstance(outcome.dest_error, fastmfd.MigrationError)
    assert "bad/0" in str(outcome.source_error) and words in str(outcome.source_error)


def test_precopy_sizes_are_checked():
    with pytest.raises(fastmfd.ConfigError, match="precopy_size 5 is not in 0..size"):
        fastmfd.SyntheticDevice("d", 0, 4, precopy_size=5)
    with pytest.raises(fastmfd.ConfigError, match="precopy_size -1"):
        fastmfd.VerifyLoader(4, precopy_size=-1)
    loader = fastmfd.VerifyLoader(8192, precopy_size=4096)
    data = bytearray(4095)
    fastmfd._core.fill_pattern(data, 0, 0)
    loader.load_state_buffer(data)
    with pytest.raises(ValueError, match="after 4095 of the 4096 bytes of initial data"):
        loader.precopy_loaded()


def test_the_seeds_channel_arithmetic_is_accepted():
    """The RFC counts device-state channels within ``channels``; fastmfd adds them."""
    seed = fastmfd.MigrationConfig(channels=15, device_state_channels=4,
                                   device_channels_within=True)
    assert (seed.channels, seed.device_state_channels, seed.total_channels) == (11, 4, 15)
    assert seed.replace(compression="zstd").channels == 11      # normalized once
    assert fastmfd.MigrationConfig(channels=11, device_state_channels=4).total_channels == 15
    with pytest.raises(fastmfd.ConfigError, match="must count every channel with "
                       "device_channels_within: more than device_state_channels \\(4\\), not 4"):
        fastmfd.MigrationConfig(channels=4, device_state_channels=4, device_channels_within=True)


def _hand_driven_destination(devices, steps, *, loader=None, stall=30.0):
    """A destination (``loader`` the loader of device dev/0), and a source driven by
    hand: SETUP with ``devices``, channel 0 connected, then ``steps`` in turn, each a
    (Msg, payload) for the main channel, bytes for channel 0, or a call (a wait);
    then KEEPALIVEs, as a live source sends, until the destination ends (within
    twice ``stall`` and 5 s), its ERROR included. Returns (the kinds of the
    destination's messages after SETUP_ACK, KEEPALIVEs and LOADINGs, its word while
    SWITCHOVER_ACK is owed, aside; its error)."""
    import select
    from fastmfd.protocol.main_channel import Msg, encode_message
    from migration_support import FakeSource, hello, receiving, setup_message
    config = fastmfd.MigrationConfig(channels=1, device_chunk_size=4096, stall_timeout=stall)
    uuid = os.urandom(16)
    replies = []
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
        if loader is not None:
            dst.add_loader("dev", 0, loader)
        thread, done = receiving(dst)
        source = FakeSource(dst.address, setup_message(config, uuid, {"ram": 4096}, devices))
        try:
            assert source.open_main()[0] is Msg.SETUP_ACK
            channel = source.connect(hello(0, uuid))
            for step in steps:
                if isinstance(step, bytes):
                    channel.sendall(step)
                elif callable(step):
                    step()
                else:
                    source.main.sendall(encode_message(*step))
            deadline = time.monotonic() + 2 * stall + 5
            while replies[-1:] != [Msg.ERROR] and time.monotonic() < deadline:
                if select.select([source.main], [], [], 0.2)[0]:
                    replies.append(source.reply()[0])
                else:
                    source.main.sendall(encode_message(Msg.KEEPALIVE))
        finally:
            source.close()
            if thread.is_alive():
                dst.cancel("the test is over")
            thread.join(10)
    return ([kind for kind in replies if kind not in (Msg.KEEPALIVE, Msg.LOADING)],
            done.get("error"))


@pytest.mark.parametrize("message", ["PRECOPY_SENT", "COMPLETE"])
@pytest.mark.parametrize("devices, counts", [([("nic", 0)], [1, 2]), ([("nic", 0)], []),
                                             ([], [3])], ids=["more", "fewer", "no-devices"])
def test_a_destination_refuses_chunk_counts_for_other_devices(message, devices, counts):
    """A source's chunk counts name every device of the session and no other: a
    COMPLETE with fewer failed as "the source sent None chunks", with more or
    without devices it passed (found by a fuzzing helper)."""
    from fastmfd.protocol.main_channel import Complete, Msg, PrecopySent
    payload = (PrecopySent(counts) if message == "PRECOPY_SENT"
               else Complete([dict.fromkeys(Complete.COUNTED, 0)], counts))
    replies, error = _hand_driven_destination(devices, [(Msg[message], payload)])
    assert isinstance(error, fastmfd.MigrationError)
    assert isinstance(error.__cause__, fastmfd.ProtocolError)
    assert (f"main channel: {message} counts chunks of {len(counts)} devices, the session "
            f"has {len(devices)}") in str(error)
    assert replies[-1] is Msg.ERROR


def test_a_destination_acks_once_and_refuses_a_second_precopy_sent():
    from fastmfd.protocol.main_channel import Msg, PrecopySent
    replies, error = _hand_driven_destination(
        [], [(Msg.PRECOPY_SENT, PrecopySent([])), (Msg.PRECOPY_SENT, PrecopySent([]))])
    assert replies == [Msg.SWITCHOVER_ACK, Msg.ERROR]
    assert "unexpected PRECOPY_SENT" in str(error)


@pytest.mark.parametrize("live, total, words", [
    (5, 2, "device dev/0: PRECOPY_SENT counted 5 chunks sent live, COMPLETE 2 in all"),
    (1, 2, "main channel: COMPLETE while SWITCHOVER_ACK is owed")], ids=["beyond", "unacked"])
def test_a_destination_refuses_a_complete_short_of_what_precopy_sent_counted(live, total, words):
    """PRECOPY_SENT counts the chunks a device sent live; the source stops, and sends
    the last chunk, only once SWITCHOVER_ACK came: so COMPLETE counts more, and
    never comes while the ack is owed. One counting fewer (PRECOPY_SENT 5, then 2
    chunks in all) was taken: the destination succeeded, never acked, its loader's
    precopy_loaded() never called (found in review)."""
    from fastmfd.protocol.main_channel import Complete, Msg, PrecopySent
    replies, error = _hand_driven_destination([("dev", 0)], [
        (Msg.PRECOPY_SENT, PrecopySent([live])),
        (Msg.COMPLETE, Complete([dict.fromkeys(Complete.COUNTED, 0)], [total]))],
        stall=2.0)
    assert isinstance(error, fastmfd.MigrationError)
    assert isinstance(error.__cause__, fastmfd.ProtocolError)
    assert words in str(error)
    assert replies == [Msg.ERROR]


@pytest.mark.parametrize("when", ["after", "with"])
def test_a_destination_refuses_a_precopy_sent_that_counts_the_last_chunk(tmp_path, when):
    """A device's last chunk (its config) goes once the source stopped, after
    SWITCHOVER_ACK: a PRECOPY_SENT after it was taken, the loader's precopy_loaded()
    called after its load_finish(), and the switchover acked (found in review).
    Sent together ("with"), either may reach the reassembly process first: each
    order is refused."""
    from fastmfd.protocol.main_channel import Msg, PrecopySent
    from migration_support import device_packet
    log = str(tmp_path / "stamps")

    def stamps():
        return read_stamps(log) if os.path.exists(log) else {}

    def finished():             # the last chunk is loaded: PRECOPY_SENT comes after it
        deadline = time.monotonic() + 10
        while "finish" not in stamps():
            assert time.monotonic() < deadline, "the last chunk was not loaded"
            time.sleep(0.05)
    last = device_packet("dev", 0, 0, b"", last=True)
    precopy = (Msg.PRECOPY_SENT, PrecopySent([1]))
    steps = [last, finished, precopy] if when == "after" else [precopy, last]
    replies, error = _hand_driven_destination([("dev", 0)], steps,
                                              loader=StampingLoader(log, 0), stall=2.0)
    after = r"PRECOPY_SENT \(counting 1 chunks sent live\) came after the last chunk, idx 0"
    owed = (r"last chunk idx 0 while SWITCHOVER_ACK is owed \(PRECOPY_SENT counted 1 "
            r"chunks sent live\)")
    said = [after] if when == "after" else [after, owed]
    assert any(re.search(f"reassembly: dev/0: {words}", str(error)) for words in said), error
    assert replies == [Msg.ERROR]
    assert "approved" not in stamps()


def test_a_precopy_sent_counting_chunks_that_never_come_names_the_one_awaited():
    """PRECOPY_SENT counts 5 chunks of dev/0, 1 came: the switchover waits for its
    loader, which waits for chunk 1, until the deadline; the error said only
    "reassembly: no progress for 2 s" (found in review)."""
    from fastmfd.protocol.main_channel import Msg, PrecopySent
    from migration_support import device_packet
    replies, error = _hand_driven_destination([("dev", 0)], [
        device_packet("dev", 0, 0, b"live"), (Msg.PRECOPY_SENT, PrecopySent([5]))], stall=2.0)
    assert ("reassembly: no progress for 2 s (dev/0: waiting for chunk 1 of the 5 "
            "PRECOPY_SENT counted)") in str(error), error
    assert replies == [Msg.ERROR]
