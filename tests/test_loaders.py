"""The ready-made file device and loader: FileDevice refuses a state file it
cannot read before any migration starts; FileLoader writes its stream in order,
fsyncs it before the destination may send LOADED, never follows a symbolic link,
and a write that fails (a full disk) fails the migration on both sides. A
destination's on_setup may refuse the session, or add regions and loaders, which
the session takes then: not later."""

from __future__ import annotations

import errno
import os
import pickle
import time
import tracemalloc

import pytest

import fastmfd
from migration_support import Migration, make_region


def test_file_device_refuses_a_state_file_it_cannot_read(tmp_path):
    for path in (tmp_path / "missing", tmp_path):          # nothing there; a directory
        with pytest.raises(fastmfd.ConfigError, match=f"cannot read state file {path}"):
            fastmfd.FileDevice("nic0", 0, path)


def test_file_loader_writes_the_stream_in_order(tmp_path):
    path = tmp_path / "nic0.state"
    path.write_bytes(b"an older, longer state file")
    loader = pickle.loads(pickle.dumps(fastmfd.FileLoader(path)))   # as a loader travels
    for piece in (b"one ", memoryview(b"two "), bytearray(b"three")):
        loader.load_state_buffer(piece)
    assert loader.load_finish() == str(path)
    assert path.read_bytes() == b"one two three"
    empty = fastmfd.FileLoader(tmp_path / "empty")
    assert empty.load_finish() == str(tmp_path / "empty")
    assert (tmp_path / "empty").read_bytes() == b""


def test_collect_loader_keeps_at_most_its_limit():
    loader = pickle.loads(pickle.dumps(fastmfd.CollectLoader(10)))   # as a loader travels
    loader.load_state_buffer(memoryview(b"0123456789"))
    with pytest.raises(fastmfd.MigrationError, match=r"^CollectLoader: the device state goes "
                                                     r"past its limit \(10 bytes\)$"):
        loader.load_state_buffer(b"x")
    assert loader.load_finish() == b"0123456789"


def test_collect_loader_returns_its_bytes_without_copying_them():
    """load_finish() copied the stream (bytes(bytearray)) while the loader kept the
    original: twice a device's state, then a third time pickled to the main process."""
    loader = fastmfd.CollectLoader()
    tracemalloc.start()
    try:
        for _ in range(64):
            loader.load_state_buffer(memoryview(bytes(64 << 10)))
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        state = loader.load_finish()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert type(state) is bytes and state == bytes(4 << 20)
    assert peak < 1 << 20, f"load_finish() took {peak} more bytes for a 4 MiB stream"


def test_file_loader_never_follows_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(OSError) as raised:
        fastmfd.FileLoader(tmp_path / "link").load_state_buffer(b"overwritten")
    assert raised.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"keep"


def test_file_loader_exclusive_refuses_an_existing_file(tmp_path):
    (tmp_path / "taken").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        fastmfd.FileLoader(tmp_path / "taken", exclusive=True).load_state_buffer(b"x")
    assert (tmp_path / "taken").read_bytes() == b"keep"


def test_a_loader_that_cannot_write_fails_both_sides():
    with Migration() as m, make_region("ram", 16 * 4096, seed=1) as region:
        m.source.add_region(region)
        m.source.add_device(fastmfd.BytesDevice("nic0", 0, b"n" * 10000))
        m.destination.add_loader("nic0", 0, fastmfd.FileLoader("/dev/full"))
        since = time.monotonic()
        src, dst = m.run().failed_both(since)
    for error in (src, dst):
        assert "nic0" in str(error) and os.strerror(errno.ENOSPC) in str(error), \
            f"source: {src!r}; destination: {dst!r}"


def test_on_setup_refuses_a_session_before_anything_is_committed():
    def refuse(setup):
        assert [r.name for r in setup.regions] == ["ram"]
        assert [d.key for d in setup.devices] == [("nic0", 3)]
        raise fastmfd.ConfigError("not this one")

    with Migration() as m, make_region("ram", 16 * 4096) as region:
        m.source.add_region(region)
        m.source.add_device(fastmfd.BytesDevice("nic0", 3, b"n"))
        since = time.monotonic()
        src, dst = m.run(dst_on_setup=refuse).failed_both(since)
    for error in (src, dst):
        assert "not this one" in str(error)


def test_regions_and_loaders_are_added_until_the_session_takes_them():
    """on_setup may add them (README); once the session took them at the source's
    SETUP, one more would be ignored: a ConfigError, during the session and after."""
    refused = []

    def add_more():
        for call in (lambda: m.destination.add_region(other),
                     lambda: m.destination.add_loader("nic1", 0, fastmfd.CollectLoader())):
            with pytest.raises(fastmfd.ConfigError) as error:
                call()
            refused.append(str(error.value))

    def on_setup(setup):
        m.destination.add_region(mine)
        m.destination.add_loader("nic0", 0, fastmfd.CollectLoader())

    with Migration() as m, make_region("ram", 16 * 4096, seed=1) as region, \
            make_region("ram", 16 * 4096) as mine, make_region("other", 4096) as other:
        m.source.add_region(region)
        m.source.add_device(fastmfd.BytesDevice("nic0", 0, b"state"))
        _, result = m.run(dst_on_setup=on_setup, dst_on_resume=add_more).ok()
        assert result.regions["ram"] is mine and (mine.array == region.array).all()
        assert result.devices[("nic0", 0)] == b"state"
        add_more()
    assert refused == [
        f"{call}() after the session took its regions and loaders (at the source's SETUP): "
        f"add them before receive(), or in its on_setup"
        for call in ("add_region", "add_loader") * 2]


def test_a_second_loader_for_a_device_is_refused():
    # It replaced the first silently, where add_region and add_device refuse a duplicate.
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=0) as dst:
        first = fastmfd.VerifyLoader(4096)
        dst.add_loader("nic0", 0, first)
        with pytest.raises(fastmfd.ConfigError, match="two loaders for device 'nic0' instance 0"):
            dst.add_loader("nic0", 0, fastmfd.CollectLoader())
        dst.add_loader("nic0", 1, fastmfd.CollectLoader())     # another instance is another
        assert dst._loaders[("nic0", 0)] is first


def test_nothing_is_added_after_a_session_that_failed_before_its_setup():
    with fastmfd.Destination("tcp:127.0.0.1:0", workers=0, timeout=0.2) as dst, \
            make_region("ram", 4096) as region:
        with pytest.raises(fastmfd.MigrationError, match="main channel"):
            dst.receive()
        # No SETUP came: the refusal says what did happen.
        with pytest.raises(fastmfd.ConfigError, match=r"^add_region\(\) after its receive\(\) "
                                                      r"failed \(a Destination receives once\)"):
            dst.add_region(region)
