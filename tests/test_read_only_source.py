"""A source reads its image: it needs no write access to it, and cannot write it.

``Region.from_file(..., read_only=True)`` (what ``fastmfd send`` and ``send
--qemu`` use) opens the file for reading and maps it read-only in every process
that maps it; an image on a read-only file system is sent (it was refused:
"Read-only file system"), and nothing in fastmfd could write into it by mistake.
The images here are on a small tmpfs remounted read-only (mounting takes root).
"""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest

import fastmfd
from listen_support import Listener, run_cli
from migration_support import Migration

PAGE = 4096


@pytest.fixture
def read_only_image(small_disk):
    """A 64-page image, half data and half holes, on a file system mounted read-only."""
    path = small_disk / "ram.img"
    with open(path, "wb") as file:
        file.write(np.random.default_rng(3).bytes(32 * PAGE))
        file.truncate(64 * PAGE)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_image_on_a_read_only_file_system_is_sent(read_only_image):
    before = _digest(read_only_image)
    with pytest.raises(fastmfd.ConfigError, match="Read-only file system"):
        fastmfd.Region.from_file("ram", read_only_image)
    region = fastmfd.Region.from_file("ram", read_only_image, read_only=True)
    try:
        assert region.read_only and region.buffer.readonly
        assert not region.array.flags.writeable
        with pytest.raises(TypeError):
            region.buffer[0:1] = b"x"
        config = fastmfd.MigrationConfig(channels=2, compression="zstd", checksum=True)
        with Migration(config) as m:
            m.source.add_region(region)
            stats, result = m.run().ok()
            assert result.regions["ram"].buffer == read_only_image.read_bytes()
        assert stats.zero_pages == 32
    finally:
        region.close()
    assert _digest(read_only_image) == before


def test_send_reads_an_image_it_cannot_write(read_only_image, tmp_path):
    out = tmp_path / "out"
    with Listener(out) as listener:
        done = run_cli("send", listener.address, str(read_only_image), "--quiet")
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, (done.stderr, err)
    assert (out / "ram.img").read_bytes() == read_only_image.read_bytes()


def test_a_destination_refuses_a_read_only_region_when_it_is_added(read_only_image):
    """At add_region, a ConfigError: it was taken, and refused only at the
    source's SETUP, failing the source's migration too (found by a README audit)."""
    target = fastmfd.Region.from_file("ram", read_only_image, read_only=True)
    try:
        with fastmfd.Destination("tcp:127.0.0.1:0") as destination:
            with pytest.raises(fastmfd.ConfigError, match=r"^add_region\(region\): region "
                               r"'ram' is read-only \(Region.read_only\): a destination "
                               r"writes into its regions$"):
                destination.add_region(target)
    finally:
        target.close()


def test_a_destination_refuses_a_read_only_region_its_factory_made(read_only_image):
    target = fastmfd.Region.from_file("ram", read_only_image, read_only=True)
    source = fastmfd.Region.create("ram", target.size)
    try:
        with Migration(fastmfd.MigrationConfig(channels=1),
                       region_factory=lambda name, size, page_size: target) as m:
            m.source.add_region(source)
            outcome = m.run()
        assert "at SETUP: region 'ram' is read-only (Region.read_only): a destination " \
               "writes into its regions" in str(outcome.dest_error)
    finally:
        source.close()
        target.close()


def test_a_read_only_file_is_taken_as_it_is(tmp_path):
    with pytest.raises(fastmfd.ConfigError, match="a read-only file is taken as it is"):
        fastmfd.Region.from_file("ram", tmp_path / "new.img", size=PAGE, read_only=True)
