"""Device state end to end (issue #4): every device's stream reaches its loader
byte-exact and in order — over mixed or dedicated channels or the main channel
(the old way), compressed or not, in chunks of 1 byte to more than a RAM packet,
whatever order the chunks arrive in."""

from __future__ import annotations

import numpy as np
import pytest

import fastmfd
from fastmfd._engine.loading import DeviceLoading
from device_support import HoldFirstChunks, OddDevice, migrate_devices
from migration_support import Migration, Proxy

MIB = 1 << 20
WAYS = {
    "old": dict(channel_header=False),
    "mixed": dict(),
    "dedicated": dict(device_state_channels=2),
    "checksummed": dict(device_state_channels=1, checksum=True),
    "old checksummed": dict(channel_header=False, checksum=True),
}


def _random(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("way", WAYS)
def test_devices_load_exactly(way, compression):
    # Packets of 16 pages (64 KiB) and chunks of up to 1 MiB: a chunk outgrows a
    # RAM packet. The odd device's reads return 1 byte, 7, 4095, 4097, a whole
    # chunk...
    config = fastmfd.MigrationConfig(channels=2, compression=compression, packet_pages=16,
                                     **WAYS[way])
    odd = _random(3 * MIB + 4099, 1)
    plain = _random(200_000, 2)
    synthetic = 2 * MIB + 5
    devices = [
        OddDevice("odd", 0, odd, [1, 7, 4095, 4097, config.device_chunk_size, 1, 65536]),
        fastmfd.BytesDevice("plain", 1, plain, config=b"config bytes"),
        fastmfd.BytesDevice("empty", 0, b""),
        fastmfd.SyntheticDevice("synthetic", 7, synthetic, seed=9),
    ]
    stats, result = migrate_devices(config, devices,
                                    {("synthetic", 7): fastmfd.VerifyLoader(synthetic, seed=9)})
    assert result.devices == {("odd", 0): odd, ("plain", 1): plain + b"config bytes",
                              ("empty", 0): b"", ("synthetic", 7): synthetic}
    assert stats.device_chunks == result.stats.device_chunks
    assert stats.device_bytes == result.stats.device_bytes
    # Every chunk has a 12-byte header; the last carries the config bytes (or nothing).
    data = len(odd) + len(plain) + len(b"config bytes") + synthetic
    assert stats.device_bytes == data + 12 * stats.device_chunks
    carried = {c.kind: 0 for c in stats.channels}
    for channel in stats.channels:
        carried[channel.kind] += channel.device_packets
    if way.startswith("old"):
        assert sum(carried.values()) == 0, "the old way sends device state on the main channel"
    elif way in ("dedicated", "checksummed"):
        assert carried == {"ram": 0, "device": stats.device_chunks}
    else:
        assert carried == {"ram": stats.device_chunks}


def test_many_devices():
    config = fastmfd.MigrationConfig(channels=4, device_chunk_size=4096)
    rng = np.random.default_rng(4)
    contents = {(f"dev{i}", i % 3): _random(int(rng.integers(0, 40_000)), i) for i in range(20)}
    contents[("dev0", 0)] = b""
    devices = [fastmfd.BytesDevice(idstr, inst, data) for (idstr, inst), data in contents.items()]
    stats, result = migrate_devices(config, devices)
    assert result.devices == contents



def test_thousands_of_devices_are_watched_once_a_tick(monkeypatch):
    """The destination looked at its deadlines after every report, and a look reads
    every slot of the device-state pool: 4096 devices, each loaded with a report,
    kept its main thread looking for 12 s (its pool sized to a 24 GB /dev/shm), and
    a source with stall_timeout=10 heard nothing from it. Counted here with a spy on
    the look at the pool: a tick is 1 s, the migration takes a few."""
    looks = []
    look = DeviceLoading.signature
    monkeypatch.setattr(DeviceLoading, "signature", lambda self: looks.append(1) or look(self))
    contents = {(f"d{i}", i): b"%d" % i * 10 for i in range(1000)}
    devices = [fastmfd.BytesDevice(idstr, inst, data) for (idstr, inst), data in contents.items()]
    with Migration(fastmfd.MigrationConfig(channels=2, device_chunk_size=4096,
                                           stall_timeout=60), max_memory=256 * MIB) as m:
        for device in devices:
            m.source.add_device(device)
        stats, result = m.run(timeout=120).ok()
    assert result.devices == contents
    assert len(looks) < 100, f"{len(looks)} looks at the pool for {len(devices)} devices"


def test_a_cap_of_one_chunk_lets_one_chunk_wait():
    """max_queued_bytes = device_chunk_size holds one chunk out of order: chunk 1 (the
    last) waits while chunk 0 is held back."""
    config = fastmfd.MigrationConfig(channels=2, device_chunk_size=4096,
                                     max_queued_bytes=4096)
    log: list = []
    proxy = Proxy({ch: HoldFirstChunks(config, 0.3, ch, log) for ch in range(2)})
    data = _random(4096, 5)
    with Migration(config, proxy=proxy) as m:
        m.source.add_device(fastmfd.BytesDevice("one", 0, data))
        stats, result = m.run().ok()
        assert result.devices == {("one", 0): data}


@pytest.mark.parametrize("way", ["mixed", "dedicated"])
def test_chunks_arriving_out_of_order_load_in_order(way):
    """Each device's first chunk is held back while the chunks after it arrive: they
    wait, and every loader still gets its stream in order."""
    channels = 3
    config = fastmfd.MigrationConfig(channels=channels, device_chunk_size=4096, **WAYS[way])
    data_channels = range(channels) if way == "mixed" else \
        range(channels, channels + config.device_state_channels)
    log: list = []
    proxy = Proxy({ch: HoldFirstChunks(config, 0.3, ch, log) for ch in data_channels})
    contents = {(f"dev{i}", 0): _random(64 * 4096 + 100 * i, 10 + i) for i in range(4)}
    devices = [fastmfd.BytesDevice(idstr, inst, data) for (idstr, inst), data in contents.items()]
    stats, result = migrate_devices(config, devices, proxy=proxy)
    assert result.devices == contents
    assert {name for _, name, idx, _ in log if idx == 0} == {idstr for idstr, _ in contents}
