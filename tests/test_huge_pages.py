"""Huge pages for regions (issue #12): used where the system allows them, and a
clear ConfigError saying why not (and what would allow them) where it does not.

The migrations run in a mount namespace of their own whose /dev/shm is a tmpfs
mounted huge=advise (or huge=never), so nothing of the machine changes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastmfd
from fastmfd.huge_pages import why_no_huge_pages
from test_shm_limits import needs_namespace, run_with_small_shm

_PMD_MAPPED = """
    import ctypes

    def pmd_mapped_kb(region):
        # Huge pages mapping the region in this process (its VMA in smaps).
        anchor = ctypes.c_char.from_buffer(region.buffer)
        start = format(ctypes.addressof(anchor), "x")
        del anchor
        lines = open("/proc/self/smaps").read().splitlines()
        for i, line in enumerate(lines):
            if "-" in line.split()[0] and line.split("-")[0] == start:
                return next(int(l.split()[1]) for l in lines[i + 1:]
                            if l.startswith("ShmemPmdMapped:"))
        raise AssertionError("the region's mapping is not in smaps")
"""

_CHECK = _PMD_MAPPED + """
    import numpy as np, fastmfd
    from migration_support import Migration, make_region

    if __name__ == "__main__":
        image = make_region("ram", 16 << 20, seed=1)
        with Migration(fastmfd.MigrationConfig(channels=2), prealloc={prealloc},
                       huge_pages=True) as m:
            m.source.add_region(image)
            _, result = m.run().ok()
            got = result.regions["ram"]
            assert got.huge_pages and got.handle.huge_pages
            assert np.array_equal(got.array, image.array)     # reads: maps it here
            print("pmd mapped kB:", pmd_mapped_kb(got))
            del got
        image.close()
"""


@needs_namespace
@pytest.mark.parametrize("prealloc", [False, True])
def test_a_huge_pages_destination_receives_into_huge_pages(prealloc):
    done = run_with_small_shm(_CHECK.replace("{prealloc}", str(prealloc)),
                              shm="256m,huge=advise")
    assert done.returncode == 0, done.stderr[-3000:]
    kb = int(done.stdout.split("pmd mapped kB:")[1])
    assert kb == 16 << 10, done.stdout          # all 16 MiB, in 2 MiB pages


_WARM = _PMD_MAPPED + """
    import os, tempfile, fastmfd
    from fastmfd.tools.warm_files import WarmFiles

    if __name__ == "__main__":
        directory = tempfile.mkdtemp(dir="/dev/shm")
        with WarmFiles(directory, huge_pages=True) as warm:
            warm.refill([(8 << 20, 4096)])
            warm._thread.join(30)
            path = warm.take(8 << 20, 4096)
            with fastmfd.Region.from_file("ram", path, huge_pages=True) as region:
                region.array[::4096].sum()          # map every page here
                print("pmd mapped kB:", pmd_mapped_kb(region))
            os.unlink(path)
"""


@needs_namespace
def test_warm_files_for_huge_page_regions_are_faulted_in_as_huge_pages():
    """listen --prealloc --huge-pages: the spare files were faulted in as 4 KiB pages,
    so from the second session on the regions had none (found in review)."""
    done = run_with_small_shm(_WARM, shm="64m,huge=advise")
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split("pmd mapped kB:")[1]) == 8 << 10, done.stdout


@needs_namespace
def test_without_huge_pages_allowed_the_destination_says_why_and_what_would_allow_them():
    done = run_with_small_shm("""
        import fastmfd
        try:
            fastmfd.Destination("tcp:127.0.0.1:0", huge_pages=True)
        except fastmfd.ConfigError as exc:
            print(exc)
    """, shm="64m")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "huge pages are not available: the tmpfs at /dev/shm is mounted huge=never" \
        in done.stdout, done.stdout
    assert "mount -o remount,huge=advise /dev/shm" in done.stdout


@pytest.mark.parametrize("sessions", [[], ["--forever"]])
def test_listen_huge_pages_refuses_a_directory_that_cannot_have_them(tmp_path, sessions):
    """... and leaves no directory it made for --dir (it left them, empty)."""
    if why_no_huge_pages(str(tmp_path)) is None:
        pytest.skip(f"{tmp_path} allows huge pages here")
    directory = tmp_path / "new" / "dir"
    done = subprocess.run([sys.executable, "-m", "fastmfd", "listen", "unix:/nonexistent/x",
                           "--dir", str(directory), "--huge-pages", "--timeout", "1",
                           *sessions], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "huge pages are not available: " in done.stderr, done.stderr
    assert "Linux gives writable file mappings huge pages only on tmpfs" in done.stderr \
        or "huge=" in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


def test_a_region_file_outside_tmpfs_is_named_as_the_reason(tmp_path):
    reason = why_no_huge_pages("/proc")
    assert reason is not None and "/proc is on proc" in reason
    with pytest.raises(fastmfd.ConfigError, match="huge pages are not available"):
        fastmfd.regions.check_huge_pages("/proc")
