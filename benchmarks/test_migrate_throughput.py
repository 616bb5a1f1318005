"""``migrate(live=False)`` of a whole image: fastmfd cell by cell, against its peers.

One question per group, "migrate <image> <compression>": how long does each
channel count take to move the image, and how does that compare with a real
QEMU 7.2 multifd migration of the same bytes (``--qemu``) and, in the
``none`` groups, with one plain socket (``sendall``)?

Images (:mod:`fastmfd.tools.images`): ``random`` (incompressible) and ``halftext``
(issue #3's "mixed": half zero pages, half English-like text), 1 GiB (16 MiB
when CI=true; ``--migrate-size``).
Every run, timed or not, checks that the destination holds the image.

    PYTHONPATH=. python3 -m pytest benchmarks/test_migrate_throughput.py --qemu
    (add --migrate-prealloc to time the transport without fresh destination memory)
"""

from __future__ import annotations

import pytest

from _migration import report, time_trials
from fastmfd.tools.bench.matrix import Setting, make_trial

IMAGES = ("random", "halftext")
COMPRESSIONS = ("none", "zlib", "zstd")
CHANNELS = (1, 2, 4, 8)
LEVEL = 1                   # the reference QEMU numbers are zlib-1 and zstd-1


def _cells():
    """Every (image, setting), a cell's fastmfd and QEMU runs next to each other
    so that a change in machine load hits both alike."""
    for image in IMAGES:
        for compression in COMPRESSIONS:
            if compression == "none":
                yield pytest.param(image, Setting("sendall"), id=f"{image}-sendall")
            for channels in CHANNELS:
                for method in ("fastmfd", "qemu"):
                    setting = Setting(method, channels, compression, LEVEL)
                    yield pytest.param(image, setting, id=f"{image}-{setting.compression_label}"
                                                          f"-{channels}ch-{method}")


@pytest.mark.parametrize("image_kind, setting", list(_cells()))
def test_migrate(benchmark, request, images, migrate_size, migrate_rounds, migrate_prealloc,
                 image_kind, setting):
    qemu = request.getfixturevalue("qemu_binary") if setting.method == "qemu" else None
    image = images(image_kind, migrate_size)
    benchmark.group = f"migrate {image_kind} {setting.compression}" + \
        (" (destination preallocated)" if migrate_prealloc else "")

    def trial():
        return make_trial(setting, image, qemu_binary=qemu, prealloc=migrate_prealloc)

    measurements = time_trials(benchmark, trial, rounds=migrate_rounds)

    channels = None if setting.method == "sendall" else setting.channels
    report(benchmark, measurements, table="migrate",
           row=(image_kind, setting.compression_label, channels),
           column=setting.method,
           details=("zero_pages", "qemu_total_time_s", "source_done_s"))
