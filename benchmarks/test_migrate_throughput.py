"""``migrate(live=False)`` of a whole image: fastmfd cell by cell, against its peers.

One question per group, "migrate <size> <image> <compression>": how long does each
channel count take to move the image, and how does that compare with a real
QEMU multifd migration of the same bytes (``--qemu``, timed beside it) and
with one plain socket (``sendall``)?

Images (:mod:`fastmfd.tools.images`): ``random`` (incompressible) and ``halftext``
(issue #3's "mixed": half zero pages, half English-like text), 1 GiB (16 MiB
when CI=true; ``--migrate-size``).
Every run, timed or not, checks that the destination holds the image.

    PYTHONPATH=. python3 -m pytest benchmarks/test_migrate_throughput.py --qemu
    (add --migrate-prealloc to time the transport without fresh destination memory,
    --migrate-link 1gbit to put every destination behind an emulated link)

With --qemu, QEMU runs round by round beside fastmfd in each cell, alternating
which goes first (see _migration.time_trials).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from _migration import report, time_trials
from fastmfd.tools.bench.matrix import Setting, make_trial, run_once
from fastmfd.tools.bench.trial import Measurement
from fastmfd.units import format_bytes

IMAGES = ("random", "halftext")
COMPRESSIONS = ("none", "zlib", "zstd", "auto")     # auto: fastmfd only, QEMU has none
CHANNELS = (1, 2, 4, 8)
LEVEL = 1                   # the reference QEMU numbers are zlib-1 and zstd-1


def _cells():
    """Every (image, setting): fastmfd's channel counts per compression, and one
    plain socket (sendall) per image. With --qemu, each fastmfd cell also times
    QEMU on the same setting, round by round beside it."""
    for image in IMAGES:
        yield pytest.param(image, Setting("sendall"), id=f"{image}-sendall")
        for compression in COMPRESSIONS:
            for channels in CHANNELS:
                setting = Setting("fastmfd", channels, compression, LEVEL)
                yield pytest.param(image, setting,
                                   id=f"{image}-{setting.compression_label}-{channels}ch")


@pytest.mark.parametrize("image_kind, setting", list(_cells()))
def test_migrate(benchmark, images, migrate_size, migrate_rounds, migrate_prealloc,
                 migrate_link, qemu_peer, image_kind, setting):
    image = images(image_kind, migrate_size)
    where = [" (destination preallocated)"] if migrate_prealloc else []
    if migrate_link is not None:
        where.append(f" (link {migrate_link.spec.text})")
    benchmark.group = (f"migrate {format_bytes(migrate_size)} {image_kind} "
                       f"{setting.compression}" + "".join(where))
    options = dict(prealloc=migrate_prealloc, link=migrate_link)

    qemu_setting = replace(setting, method="qemu")

    def time_qemu() -> Measurement:
        return run_once(qemu_setting, image, qemu_binary=qemu_peer, **options)

    peer = time_qemu if (qemu_peer is not None and setting.method == "fastmfd"
                         and setting.compression != "auto") else None

    measurements, qemu_runs = time_trials(
        benchmark, lambda: make_trial(setting, image, **options), rounds=migrate_rounds,
        peer=peer)

    channels = None if setting.method == "sendall" else setting.channels
    report(benchmark, measurements, table="migrate",
           row=(image_kind, setting.compression_label, channels),
           column=setting.method, details=("zero_pages",),
           peers={"qemu": qemu_runs} if peer is not None else None)
