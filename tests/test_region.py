"""fastmfd.regions.Region: named page-aligned memory in shared memory or a MAP_SHARED file."""

import gc
import os
import sys

import numpy as np
import pytest

import fastmfd
import fastmfd.source
from fastmfd.errors import ConfigError
from fastmfd.regions import Region
from fastmfd.shm import SHM_DIR, list_segments

SIZE = 64 * 4096


@pytest.fixture
def region():
    with Region.create("pc.ram", SIZE) as region:
        yield region


def region_segments(region):
    handle = region.handle
    return {handle.location, handle.dirty} if handle.kind == "shm" else {handle.dirty}


def test_create(region):
    assert (region.name, region.size, region.page_size, region.npages) == \
        ("pc.ram", SIZE, 4096, 64)
    array = region.array
    assert array.dtype == np.uint8 and array.shape == (SIZE,) and not array.any()
    assert array.flags.writeable
    assert region_segments(region) <= set(list_segments())
    assert region.dirty.npages == 64


def test_array_and_buffer_share_memory(region):
    region.array[100] = 7
    assert region.buffer[100] == 7
    region.buffer[200] = 9
    assert region.array[200] == 9
    assert region.array is region.array


def fill_from_child(handle, value):
    region = Region.attach(handle)
    assert region.array[0] == 1, "the owner's write must be visible"
    region.array[4096:8192] = value
    region.mark_dirty(4096, 4096)
    region.close()


def test_another_process_attaches_by_handle(region, processes):
    region.array[0] = 1
    processes.join(processes.start(fill_from_child, region.handle, 0x5A))
    assert (region.array[4096:8192] == 0x5A).all()
    assert region.dirty.collect().tolist() == [1]


def test_owner_close_unlinks_everything(region):
    names = region_segments(region)
    region.close()
    assert region.closed and not names & set(list_segments())
    with pytest.raises(ValueError, match="closed"):
        region.buffer
    region.close()      # idempotent


def test_attacher_close_unlinks_nothing(region):
    other = Region.attach(region.handle)
    other.close()
    assert region_segments(region) <= set(list_segments())
    region.array[0] = 3


@pytest.mark.parametrize("offset, length, pages", [
    (0, 1, [0]), (4095, 2, [0, 1]), (4096, 4096, [1]), (100, 3 * 4096, [0, 1, 2, 3]),
    (SIZE - 1, 1, [63]), (0, SIZE, list(range(64))), (500, 0, []),
])
def test_mark_dirty_marks_every_page_touched(region, offset, length, pages):
    region.mark_dirty(offset, length)
    assert region.dirty.collect().tolist() == pages


@pytest.mark.parametrize("offset, length", [(-1, 2), (SIZE, 1), (SIZE - 1, 2)])
def test_mark_dirty_outside_the_region(region, offset, length):
    # It was an IndexError, not the ConfigError the README promises for a value that cannot
    # work.
    with pytest.raises(fastmfd.ConfigError,
                       match=rf"^mark_dirty\({offset}, {length}\): bytes {offset}\.\."
                             rf"{offset + length} outside region '{region.name}' of {SIZE} "
                             rf"bytes$"):
        region.mark_dirty(offset, length)


def test_mark_dirty_of_a_negative_length_is_refused(region):
    # It was taken as nothing to mark: a caller's bug, silently.
    with pytest.raises(fastmfd.ConfigError, match="negative length"):
        region.mark_dirty(4096, -1)
    assert region.dirty.collect().tolist() == []


def test_mark_dirty_on_a_closed_region_names_the_region():
    # It said "DirtyBitmap is closed": a type of the core's, not the region.
    region = fastmfd.Region.create("pc.ram", 8192)
    region.close()
    with pytest.raises(ValueError, match=r"^region 'pc\.ram' is closed$"):
        region.mark_dirty(0, 10)


@pytest.mark.parametrize("offset, length, parameter, given", [
    ("0", 4096, "offset", "str"), (0, "4096", "length", "str"),
    (0.0, 4096, "offset", "float"), (True, 4096, "offset", "bool"), (0, 4096.0, "length", "float"),
])
def test_mark_dirty_of_a_wrong_type_is_a_type_error_naming_it(region, offset, length,
                                                              parameter, given):
    """Not a comparison's TypeError from inside ("'<' not supported between 'str' and
    'int'"), nor a float offset taken."""
    with pytest.raises(TypeError, match=rf"^mark_dirty\({parameter}\) must be an int, not "
                                        rf"{given}$"):
        region.mark_dirty(offset, length)
    assert region.dirty.collect().tolist() == []


def test_mark_dirty_takes_numpy_integers(region):
    """Offsets computed with numpy (a workload's page indices) are integers too."""
    region.mark_dirty(np.int64(4096), np.uint32(1))
    assert region.dirty.collect().tolist() == [1]


@pytest.mark.parametrize("name", ["", "x" * 256, "a\0b"])
def test_bad_names(name):
    with pytest.raises(ConfigError, match="region name"):
        Region.create(name, SIZE)


def test_longest_and_non_ascii_names():
    for name in ("r" * 255, "mémoire"):
        with Region.create(name, 4096) as region:
            assert region.name == name


@pytest.mark.parametrize("size, page_size, match", [
    (0, 4096, "positive multiple"), (-4096, 4096, "positive multiple"),
    (4095, 4096, "positive multiple"), (4097, 4096, "positive multiple"),
    (8192, 3000, "not a power of two"), (8192, 0, "not a power of two"),
])
def test_bad_sizes(size, page_size, match):
    with pytest.raises(ConfigError, match=match):
        Region.create("pc.ram", size, page_size=page_size)


def test_other_page_sizes():
    with Region.create("huge", 4 << 20, page_size=2 << 20) as region:
        assert region.npages == 2 and region.dirty.npages == 2


# ---------------------------------------------------------------- from_file

def test_from_file_creates_and_maps_shared(tmp_path):
    path = tmp_path / "ram.img"
    with Region.from_file("pc.ram", path, size=SIZE) as region:
        assert path.stat().st_size == SIZE and region.handle.kind == "file"
        assert region.handle.location == str(path)
        region.array[5000:5004] = [1, 2, 3, 4]
        # MAP_SHARED: the write is in the file at once, through the page cache.
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4, 5000) == b"\x01\x02\x03\x04"
        finally:
            os.close(fd)
        # And a write to the file is in the mapping.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"file", 100)
        finally:
            os.close(fd)
        assert bytes(region.array[100:104]) == b"file"
        assert repr(region) == f"<Region 'pc.ram' {SIZE} bytes ({path})>"
    assert path.read_bytes()[5000:5004] == b"\x01\x02\x03\x04", "closing keeps the file"


def test_from_file_takes_the_file_size(tmp_path):
    path = tmp_path / "ram.img"
    path.write_bytes(bytes(range(256)) * 64)         # 16 KiB
    with Region.from_file("pc.ram", path) as region:
        assert region.size == 16384 and region.npages == 4
        assert bytes(region.array[:4]) == b"\x00\x01\x02\x03"


def test_from_file_extends_a_short_file(tmp_path):
    path = tmp_path / "ram.img"
    path.write_bytes(b"\xff" * 4096)
    with Region.from_file("pc.ram", path, size=3 * 4096) as region:
        assert path.stat().st_size == 3 * 4096
        assert (region.array[:4096] == 0xFF).all() and not region.array[4096:].any()


def touch_file_region(handle):
    region = Region.attach(handle)
    region.array[:5] = np.frombuffer(b"child", dtype=np.uint8)
    region.close()


def test_file_region_attached_from_another_process(tmp_path, processes):
    path = tmp_path / "ram.img"
    with Region.from_file("pc.ram", path, size=SIZE) as region:
        processes.join(processes.start(touch_file_region, region.handle))
        assert bytes(region.array[:5]) == b"child"
    assert path.read_bytes()[:5] == b"child"


@pytest.mark.parametrize("content, size, match", [
    (None, None, "cannot open"),            # missing, and no size to create it with
    (b"x" * 5000, None, "positive multiple"),
    (b"", None, "positive multiple"),
])
def test_from_file_refuses(tmp_path, content, size, match):
    path = tmp_path / "ram.img"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        Region.from_file("pc.ram", path, size=size)


@pytest.mark.parametrize("size, page_size", [(5000, 4096), (0, 4096), (8192, 1000)])
def test_from_file_refusing_a_size_creates_no_file(tmp_path, size, page_size):
    path = tmp_path / "ram.img"
    with pytest.raises(ConfigError):
        Region.from_file("pc.ram", path, size=size, page_size=page_size)
    assert not path.exists()


def test_from_file_exclusive_creates_a_new_file_only(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "taken").write_bytes(b"mine")
    os.symlink(victim, tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("taken", "link", "dangling"):
        with pytest.raises(ConfigError, match="cannot open"):
            Region.from_file("pc.ram", tmp_path / name, size=SIZE, exclusive=True)
    assert victim.read_bytes() == b"keep" and (tmp_path / "taken").read_bytes() == b"mine"
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ConfigError, match="needs a size"):
        Region.from_file("pc.ram", tmp_path / "new", exclusive=True)


def test_from_file_exclusive_leaves_no_file_when_mapping_fails(tmp_path, monkeypatch):
    """The file it created is removed when what follows fails (found in review:
    a full /dev/shm failing the mapping or the page map left it behind)."""
    import fastmfd.regions

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(fastmfd.regions, "map_file", no_memory)
    with pytest.raises(ConfigError, match="'pc.ram': cannot map .* Cannot allocate memory"):
        Region.from_file("pc.ram", tmp_path / "new.img", size=SIZE, exclusive=True)
    assert os.listdir(tmp_path) == []


def test_from_file_relative_to_a_directory_descriptor(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Region.from_file("pc.ram", "new.img", size=SIZE, exclusive=True,
                              dir_fd=fd) as region:
            region.array[:4] = 7
            region.flush()
            assert region.handle.location == str(tmp_path / "new.img")
    finally:
        os.close(fd)
    assert (tmp_path / "new.img").read_bytes()[:5] == b"\x07" * 4 + b"\0"
    with pytest.raises(ValueError, match="closed"):
        region.flush()


def test_attach_never_follows_a_link_put_at_the_location(tmp_path):
    path, victim = tmp_path / "ram.img", tmp_path / "victim"
    victim.write_bytes(bytes(SIZE))
    with Region.from_file("pc.ram", path, size=SIZE) as region:
        os.unlink(path)
        os.symlink(victim, path)
        with pytest.raises(ConfigError, match=f"region 'pc.ram': cannot open {path}: a "
                                              f"symbolic link was put there, which is never "
                                              f"followed"):
            Region.attach(region.handle)


def test_attach_refuses_a_file_renamed_over_the_location(tmp_path):
    """A program that rewrites its image and renames the new one into place while
    it is sent: the workers would map the new file, the main process the old,
    and the migration would carry half of each."""
    path, other = tmp_path / "ram.img", tmp_path / "ram.img.new"
    other.write_bytes(bytes(SIZE))
    with Region.from_file("pc.ram", path, size=SIZE) as region:
        os.rename(other, path)
        with pytest.raises(ConfigError, match=f"region file {path} was replaced by another "
                                              f"file since the region was made"):
            Region.attach(region.handle)
        with pytest.raises(ConfigError, match="was replaced"):
            region.open_file()


def test_attach_refuses_a_segment_put_in_place_of_the_regions():
    with Region.create("pc.ram", SIZE) as region:
        path = os.path.join(SHM_DIR, region.handle.location)
        kept = path + "-kept"
        os.rename(path, kept)
        try:
            with open(path, "xb") as impostor:
                impostor.truncate(SIZE)
            with pytest.raises(ConfigError, match=f"shared memory segment "
                                                  f"{region.handle.location} was replaced by "
                                                  f"another file since the region was made"):
                Region.attach(region.handle)
        finally:
            os.replace(kept, path)


def test_attach_a_file_that_shrank(tmp_path):
    path = tmp_path / "ram.img"
    with Region.from_file("pc.ram", path, size=SIZE) as region:
        os.truncate(path, 4096)
        with pytest.raises(ConfigError, match="shrank"):
            Region.attach(region.handle)


@pytest.fixture(params=["shm", "file"])
def any_region(request, tmp_path):
    if request.param == "shm":
        region = Region.create("pc.ram", SIZE)
    else:
        region = Region.from_file("pc.ram", tmp_path / "ram.img", size=SIZE)
    yield region
    region.close()


def _mapped(name):
    """Whether this process maps a file whose path contains ``name``."""
    with open("/proc/self/maps") as maps:
        return any(name in line for line in maps)


@pytest.mark.parametrize("export", [
    pytest.param(lambda region: region.array, id="array"),
    pytest.param(lambda region: region.buffer[10:20], id="slice"),
])
def test_close_with_a_live_view_closes_and_unmaps_with_the_last_view(any_region, export,
                                                                      monkeypatch):
    region = any_region
    handle, names = region.handle, region_segments(region)
    view = export(region)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    region.close()
    assert region.closed
    assert not names & set(list_segments()), "the owner's segments must be gone"
    assert not _mapped(handle.dirty), "nothing holds the dirty bitmap"
    view[0] = 1                         # the view holds its memory until it goes
    assert view[0] == 1 and _mapped(handle.location)
    del view
    gc.collect()
    assert not _mapped(handle.location), "the last view took the mapping with it"
    assert unraisable == []
    region.close()                      # closed already: nothing to do


def test_a_closed_region_cannot_be_used(any_region):
    region = any_region
    region.close()
    for use in (lambda: region.buffer, lambda: region.array, lambda: region.handle,
                region.flush, lambda: region.mark_dirty(0, 1)):
        with pytest.raises(ValueError, match="closed"):
            use()
    source = fastmfd.Source("tcp:127.0.0.1:1")
    destination = fastmfd.Destination("tcp:127.0.0.1:0", workers=0)
    try:
        for owner in (source, destination):
            with pytest.raises(ConfigError, match=r"add_region\(region\): region 'pc.ram' is "
                                                  r"closed"):
                owner.add_region(region)
    finally:
        destination.close()


def test_one_region_too_many_is_refused_when_added(monkeypatch, leaks):
    # As a device too many (test_device_errors): migrate() found out only once it
    # had connected, leaving the destination waiting for a greeting.
    monkeypatch.setattr(fastmfd.source, "MAX_REGIONS", 2)
    regions = [Region.create(f"r{i}", 4096) for i in range(3)]
    try:
        source = fastmfd.Source("tcp:127.0.0.1:1")
        source.add_region(regions[0])
        source.add_region(regions[1])
        with pytest.raises(fastmfd.ConfigError, match="at most 2 regions: a migration's "
                                                      "SETUP carries no more"):
            source.add_region(regions[2])
    finally:
        for region in regions:
            region.close()
