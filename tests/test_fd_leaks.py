"""File descriptors: a migration leaves none behind, and a region holds none.

Issue #9: each migration left 4 pipe descriptors per worker that only the
cyclic garbage collector freed (11 -> 39 open over 20 migrations), and each
region cost 2 descriptors (CPython's mmap keeps a duplicate of the file's),
so ~500 regions reached the usual limit of 1024 open files.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import fastmfd
from migration_support import Migration, make_region


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1     # the listing's own descriptor


def _migrate_once(devices: bool) -> None:
    region = make_region("ram", 1 << 20, seed=1)
    try:
        with Migration(fastmfd.MigrationConfig(channels=2)) as m:
            m.source.add_region(region)
            if devices:
                m.source.add_device(fastmfd.BytesDevice("nic", 0, b"abcd"))
            m.run().ok()
    finally:
        region.close()


def test_migrations_leave_no_descriptor_behind():
    _migrate_once(True)             # first use: the forkserver, the resource tracker
    gc.disable()                    # what only the cyclic collector frees is a leak
    try:
        counts = []
        for i in range(20):
            _migrate_once(devices=bool(i % 2))
            counts.append(open_fds())
    finally:
        gc.enable()
    assert max(counts) == min(counts), f"open descriptors after each migration: {counts}"


_MANY_REGIONS = textwrap.dedent("""
    import resource, threading
    import numpy as np
    import fastmfd

    if __name__ == "__main__":
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        regions = [fastmfd.Region.create(f"r{i}", 4096) for i in range(600)]
        for i, region in enumerate(regions):
            region.array[:] = i % 251
        with fastmfd.Destination("tcp:127.0.0.1:0", workers=1) as dst:
            got = {}
            thread = threading.Thread(target=lambda: got.update(r=dst.receive()))
            thread.start()
            with fastmfd.Source(dst.address, fastmfd.MigrationConfig(channels=1)) as src:
                for region in regions:
                    src.add_region(region)
                src.migrate(live=False)
            thread.join()
            received = got["r"].regions
            assert all(np.array_equal(received[r.name].array, r.array) for r in regions)
        for region in regions:
            region.close()
        print("ok")
""")


def test_six_hundred_regions_fit_in_1024_descriptors():
    done = subprocess.run([sys.executable, "-c", _MANY_REGIONS], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
