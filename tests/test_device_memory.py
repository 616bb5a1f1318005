"""What device state costs the source's memory at the limits it accepts.

The old way gave every device a chunk buffer of its own, made before a byte was
sent: 4096 devices (MAX_DEVICES) of the default 1 MiB chunk took 4 GiB of the
source's memory for 100 bytes of state each, and 64 devices of 64 MiB chunks as
much. The old way saves one device at a time, so one buffer serves them all.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import fastmfd

CHUNK = 64 << 20
DEVICES = 16

# The source in a process of its own, so that its peak RSS is its own.
_SOURCE = textwrap.dedent("""
    import resource, sys
    import fastmfd

    if __name__ == "__main__":
        cfg = fastmfd.MigrationConfig(channels=1, channel_header=False,
                                      device_chunk_size=int(sys.argv[2]),
                                      max_queued_bytes=int(sys.argv[2]))
        with fastmfd.Source(sys.argv[1], cfg) as src:
            for i in range(int(sys.argv[3])):
                src.add_device(fastmfd.BytesDevice(f"dev{i}", 0, b"s" * 100))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            src.migrate(live=False)
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grew << 10)
""")


def test_old_way_devices_share_one_chunk_buffer():
    with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
        got = {}
        thread = threading.Thread(target=lambda: got.update(result=dst.receive()))
        thread.start()
        done = subprocess.run([sys.executable, "-c", _SOURCE, dst.address, str(CHUNK),
                               str(DEVICES)], capture_output=True, text=True, timeout=60)
        thread.join()
    assert done.returncode == 0, done.stderr[-3000:]
    assert got["result"].devices == {(f"dev{i}", 0): b"s" * 100 for i in range(DEVICES)}
    grew = int(done.stdout)
    # One 64 MiB buffer, and some; a buffer per device is 1 GiB.
    assert grew < 4 * CHUNK, f"the source's RSS grew by {grew >> 20} MiB in migrate()"
