"""Open files at the limits SETUP accepts (:mod:`fastmfd._engine.open_files`).

Each channel costs the main process about 5 descriptors at the source and 4 at
the destination: 255 channels (the most SETUP allows) went past the usual
``ulimit -n`` of 1024, and the session died halfway with a bare 'Too many open
files'. Now a session that cannot fit is refused before it starts, naming the
limit. Each side runs in a process of its own with a low limit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import fastmfd
from migration_support import destination_process, receiving

LIMIT = 256
CHANNELS = 60           # ~300 descriptors at the source, ~240 at the destination

_SOURCE = textwrap.dedent("""
    import resource, sys
    import fastmfd

    if __name__ == "__main__":
        if int(sys.argv[3]):
            resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[3]),
                               resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        region = fastmfd.Region.create("ram", 1 << 16)
        try:
            with fastmfd.Source(sys.argv[1], fastmfd.MigrationConfig(
                    channels=int(sys.argv[2]), timeout=5)) as src:
                src.add_region(region)
                src.migrate(live=False)
        except fastmfd.FastMFDError as exc:
            print(f"{type(exc).__name__}: {exc}")
        finally:
            region.close()
""")

_DESTINATION = textwrap.dedent("""
    import resource, sys
    import fastmfd

    if __name__ == "__main__":
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        with fastmfd.Destination("tcp:127.0.0.1:0", timeout=20) as dst:
            print(dst.address, flush=True)
            try:
                dst.receive()
            except fastmfd.FastMFDError as exc:
                print(f"{type(exc).__name__}: {exc}")
""")


def _source(address: str, limit: int | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", _SOURCE, address, str(CHANNELS),
                           str(limit or 0)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_source_with_more_channels_than_its_open_file_limit_is_refused_naming_it():
    with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
        thread, _ = receiving(dst)
        try:
            said = _source(dst.address, LIMIT)
        finally:
            dst.cancel("the source is over")        # refused before contacting it: it waits
            thread.join()
    assert said.startswith("ConfigError: 60 channels need about "), said
    assert f"its limit (RLIMIT_NOFILE, ulimit -n) is {LIMIT}" in said, said


def test_destination_refuses_a_setup_with_more_channels_than_it_may_open_files():
    with destination_process(_DESTINATION, str(LIMIT)) as (dst, address):
        said = _source(address)
        out, err = dst.communicate(timeout=60)
    naming = "60 channels need about"
    assert naming in said and "this destination's process" in said, said
    assert f"ulimit -n) is {LIMIT}" in said, said
    assert naming in out, out + err[-3000:]


# Each channel worker holds a file per region (the source learns holes from it,
# the destination places pages): 4096 regions (the most SETUP allows) went past
# the limit in every worker. The workers raise their soft limit, within the hard.
_REGIONS = textwrap.dedent("""
    import resource, sys, threading
    import fastmfd

    if __name__ == "__main__":
        soft, hard = int(sys.argv[1]), int(sys.argv[2]) or resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        regions = [fastmfd.Region.create(f"r{i}", 4096) for i in range(int(sys.argv[3]))]
        for i, region in enumerate(regions):
            region.array[:] = i % 251
        try:
            with fastmfd.Destination("tcp:127.0.0.1:0", workers=1, timeout=20) as dst:
                got = {}
                thread = threading.Thread(target=lambda: got.update(r=dst.receive()))
                thread.start()
                try:
                    with fastmfd.Source(dst.address, fastmfd.MigrationConfig(
                            channels=1, timeout=20)) as src:
                        for region in regions:
                            src.add_region(region)
                        src.migrate(live=False)
                finally:
                    dst.cancel("the source is over")
                    thread.join()
                received = got["r"].regions
                assert all((received[r.name].array == r.array).all() for r in regions)
            print("ok")
        except fastmfd.FastMFDError as exc:
            print(f"{type(exc).__name__}: {exc}")
        finally:
            for region in regions:
                region.close()
""")
REGIONS = 400


def _regions(soft: int, hard: int) -> str:
    done = subprocess.run([sys.executable, "-c", _REGIONS, str(soft), str(hard), str(REGIONS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_channel_workers_raise_their_soft_limit_for_a_file_per_region():
    assert _regions(LIMIT, 0) == "ok"


def test_more_regions_than_a_worker_may_ever_open_files_for_are_refused_naming_the_limit():
    said = _regions(LIMIT, LIMIT)
    assert said.startswith(f"ConfigError: {REGIONS} regions need about "), said
    assert f"(RLIMIT_NOFILE, ulimit -Hn) is {LIMIT}" in said, said


_CHILDREN = textwrap.dedent("""
    import os, resource
    from fastmfd._engine.processes import ChildSet
    from fastmfd._engine.reassembly import reassembly_main
    from fastmfd.errors import MigrationError

    if __name__ == "__main__":
        children = ChildSet(reassembly_main, ["first"])     # the forkserver runs
        soft = len(os.listdir("/proc/self/fd")) + 20
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            for n in range(20):
                children.spawn(reassembly_main, f"worker {n}")
        except MigrationError as exc:
            print(f"refused at {len(children)}: {exc}")
        finally:
            children.stop()
""")


def test_a_child_this_process_has_no_files_left_for_is_refused_before_its_start():
    """listen --qemu starts a worker per channel as QEMU's connect: at 255 channels
    under ulimit -n 1024 the forkserver, given a start this process could not finish,
    died with a traceback of its own and the session failed with 'Too many open
    files'. Now the child is refused before its start, naming the limit."""
    done = subprocess.run([sys.executable, "-c", _CHILDREN], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cannot start the process: this process has" in done.stdout, done.stdout
    assert "its limit (RLIMIT_NOFILE, ulimit -n) is" in done.stdout
    assert "refused at 1:" not in done.stdout       # some started before the limit
    assert "Traceback" not in done.stderr, done.stderr
