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
import threading

import fastmfd

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


def _receive(dst: fastmfd.Destination, got: dict[str, BaseException]) -> None:
    try:
        dst.receive()
    except fastmfd.MigrationError as exc:
        got["error"] = exc


def _source(address: str, limit: int | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", _SOURCE, address, str(CHANNELS),
                           str(limit or 0)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_source_with_more_channels_than_its_open_file_limit_is_refused_naming_it():
    with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
        got: dict[str, BaseException] = {}
        thread = threading.Thread(target=lambda: _receive(dst, got))
        thread.start()
        try:
            said = _source(dst.address, LIMIT)
        finally:
            dst.cancel("the source is over")        # refused before contacting it: it waits
            thread.join()
    assert said.startswith("ConfigError: 60 channels need about "), said
    assert f"its limit (RLIMIT_NOFILE, ulimit -n) is {LIMIT}" in said, said


def test_destination_refuses_a_setup_with_more_channels_than_it_may_open_files():
    dst = subprocess.Popen([sys.executable, "-c", _DESTINATION, str(LIMIT)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = dst.stdout.readline().strip()
        said = _source(address)
        out, err = dst.communicate(timeout=60)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    naming = "60 channels need about"
    assert naming in said and "this destination's process" in said, said
    assert f"ulimit -n) is {LIMIT}" in said, said
    assert naming in out, out + err[-3000:]
