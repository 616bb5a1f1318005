"""fastmfd.shm.SharedMemory: named segments with one owner who unlinks."""

import os

import numpy as np
import pytest

from fastmfd.errors import ConfigError
from fastmfd.shm import SEGMENT_PREFIX, SHM_DIR, SharedMemory, creator_pid, list_segments


@pytest.fixture
def segment():
    segment = SharedMemory.create(10000, tag="test")
    yield segment
    segment.close()


def test_create(segment):
    assert segment.name.startswith(f"{SEGMENT_PREFIX}test-")
    assert segment.owner and not segment.closed and segment.size == 10000
    assert os.stat(os.path.join(SHM_DIR, segment.name)).st_size == 10000
    assert segment.name in list_segments()
    assert len(segment.buf) == 10000 and bytes(segment.buf) == bytes(10000)


def test_tag_is_made_safe_for_a_file_name():
    segment = SharedMemory.create(64, tag="a/b c:d" + "x" * 100)
    try:
        assert "/" not in segment.name[len(SEGMENT_PREFIX):]
        assert segment.name.startswith(f"{SEGMENT_PREFIX}a_b_c_d")
        SharedMemory.attach(segment.name).close()
    finally:
        segment.close()


def test_tag_is_ascii_whatever_the_region_name():
    """The resource tracker refuses non-ASCII names: such a segment would leak."""
    segment = SharedMemory.create(64, tag="mémoire-π")
    try:
        assert segment.name.isascii()
        assert segment.name.startswith(f"{SEGMENT_PREFIX}m_moire-_-")
    finally:
        segment.close()


@pytest.mark.parametrize("tag", ["test", "dirty-0", "", "x-12-abcdef012345"])
def test_a_name_says_which_process_created_it(tag):
    """Several fastmfd runs share /dev/shm: a leak check (or a user) tells theirs apart."""
    segment = SharedMemory.create(64, tag=tag)
    try:
        assert creator_pid(segment.name) == os.getpid()
    finally:
        segment.close()


@pytest.mark.parametrize("name", ["fastmfd-test-scratch-dir", "fastmfd-test-123",
                                  "fastmfd-region-ram-abcdef012345", "pc.ram-12-abcdef012345"])
def test_a_name_not_made_by_create_has_no_creator(name):
    assert creator_pid(name) is None


def test_names_are_unique():
    segments = [SharedMemory.create(64, tag="same") for _ in range(20)]
    try:
        assert len({s.name for s in segments}) == 20
    finally:
        for s in segments:
            s.close()


def test_list_segments_is_sorted(segment):
    names = list_segments()
    assert names == sorted(names) and all(n.startswith(SEGMENT_PREFIX) for n in names)


def test_list_segments_lists_only_segment_files():
    path = os.path.join(SHM_DIR, f"{SEGMENT_PREFIX}test-scratch-dir")
    os.mkdir(path)
    try:
        assert os.path.basename(path) not in list_segments()
    finally:
        os.rmdir(path)


def test_attacher_shares_the_bytes_and_never_unlinks(segment):
    other = SharedMemory.attach(segment.name, 10000)
    assert not other.owner and other.size == 10000
    other.buf[:3] = b"abc"
    segment.buf[9997:] = b"xyz"
    assert bytes(segment.buf[:3]) == b"abc" and bytes(other.buf[9997:]) == b"xyz"
    with pytest.raises(ValueError, match="only its owner unlinks"):
        other.unlink()
    other.close()           # an attacher's close never unlinks
    assert other.closed and segment.name in list_segments()


def test_owner_close_unlinks_and_unmaps(segment):
    name = segment.name
    segment.close()
    assert segment.closed and not segment.owner and name not in list_segments()
    with pytest.raises(ValueError, match="closed"):
        segment.buf
    segment.close()         # idempotent
    with pytest.raises(ConfigError, match="does not exist"):
        SharedMemory.attach(name)


def test_unlink_keeps_the_mapping_until_close(segment):
    segment.buf[0] = 42
    segment.unlink()
    assert segment.name not in list_segments()
    assert segment.buf[0] == 42
    segment.close()


@pytest.mark.parametrize("name", ["pc.ram", "fastmfd-a/b", "/fastmfd-x", ""])
def test_attach_refuses_foreign_names(name):
    with pytest.raises(ConfigError, match="not a fastmfd segment name"):
        SharedMemory.attach(name)


def test_attach_checks_the_size(segment):
    with pytest.raises(ConfigError, match="has 10000 bytes, expected 4096"):
        SharedMemory.attach(segment.name, 4096)


@pytest.mark.parametrize("size", [-1, 0])
def test_size_must_be_positive(size):
    before = set(list_segments())
    with pytest.raises(ConfigError, match="at least 1 byte"):
        SharedMemory.create(size, tag="empty")
    assert not {n for n in set(list_segments()) - before if "-empty-" in n}


def test_attach_refuses_an_empty_segment():
    path = os.path.join(SHM_DIR, f"{SEGMENT_PREFIX}test-empty-by-hand")
    open(path, "wb").close()
    try:
        with pytest.raises(ConfigError, match="is empty"):
            SharedMemory.attach(os.path.basename(path))
    finally:
        os.unlink(path)


def test_full_shm_is_a_config_error_and_leaves_nothing():
    before = set(list_segments())
    with pytest.raises(ConfigError, match="cannot allocate"):
        SharedMemory.create(1 << 50, tag="huge")
    assert not {n for n in set(list_segments()) - before if "-huge-" in n}


def test_a_sparse_segment_larger_than_memory_maps():
    """A sparse segment takes memory only as it is written, so one larger than RAM and
    swap must map (a destination's device-state pool for many devices is sized to what
    /dev/shm has free, which may be more): the range reserved for it was a writable
    shared anonymous mapping, charged against the commit limit, and the kernel
    refused it ("cannot allocate ... Cannot allocate memory")."""
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "2":
            pytest.skip("strict overcommit charges every writable shared mapping")
    with open("/proc/meminfo") as f:
        meminfo = {key: int(value.split()[0]) * 1024
                   for key, value in (line.split(":") for line in f)}
    size = meminfo["MemTotal"] + meminfo["SwapTotal"] + (1 << 30)
    segment = SharedMemory.create(size, tag="test", allocate=False)
    try:
        assert len(segment.buf) == size
    finally:
        segment.close()


@pytest.mark.parametrize("export", [
    pytest.param(lambda buf: np.frombuffer(buf, dtype=np.uint8), id="numpy"),
    pytest.param(lambda buf: buf[10:20], id="slice"),
])
def test_close_waits_for_exported_views(segment, export):
    view = export(segment.buf)
    with pytest.raises(BufferError):
        segment.close()
    assert not segment.closed
    assert segment.name not in list_segments(), "the owner unlinks before unmapping"
    view[0] = 1                       # still mapped
    assert segment.buf[10] == 1 or segment.buf[0] == 1
    del view
    segment.close()
    assert segment.closed


def test_a_gone_resource_tracker_leaves_no_segment_of_a_region(monkeypatch):
    """A resource tracker that died (or never started: a BrokenPipe on every
    message) must not stop a region's close half way: both its segments (data
    and dirty bitmap) are unlinked all the same."""
    from multiprocessing import resource_tracker
    from fastmfd.regions import Region

    region = Region.create("ram0", 1 << 20)
    names = {region.handle.location, region.handle.dirty}
    assert names <= set(list_segments())

    def tracker_gone(name, rtype):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(resource_tracker, "unregister", tracker_gone)
    region.close()
    assert not names & set(list_segments())
