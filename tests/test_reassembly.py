"""The reassembly process, driven directly: descriptors in, reports out."""

from __future__ import annotations

import os
import threading
import time

import fastmfd
from fastmfd import _core
from fastmfd._engine.reassembly import plan_pool, reassembly_main
from fastmfd._engine.processes import ChildSet
from fastmfd.protocol.control import DeviceLoaded, Failed, ReassemblyParams, Stop
from fastmfd.shm import SHM_DIR
from device_support import BigResultLoader

CHUNK = 4096


def test_an_error_report_never_cuts_into_a_loaded_report(tmp_path):
    """The reader thread reports an error while a loader thread is writing a long
    ("loaded", result) report on the same connection: both must arrive whole."""
    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    pool = _core.BufferPool.create(16, CHUNK + _core.CHUNK_HEADER_SIZE, tag="test-pool")
    workers = ChildSet(reassembly_main, ["reassembly"])
    desc_r, desc_w = os.pipe()
    try:
        worker = workers[0]
        worker.start_session(ReassemblyParams(pool.name, 1 << 20, (
            ("big/0", BigResultLoader(gate, 32 << 20)), ("dup/0", fastmfd.CollectLoader()))),
            [desc_r])

        def chunk(device: int, idx: int, flags: int, length: int) -> None:
            slot = pool.acquire(timeout=5)
            os.write(desc_w, _core.pack_descriptor(device, idx, flags, slot, length, 0))

        chunk(0, 0, _core.CHUNK_FLAG_LAST, _core.CHUNK_HEADER_SIZE)
        with open(gate, "wb") as fifo:         # big/0's result goes out now...
            fifo.write(b"x")
        assert worker.conn.poll(10), "no report from the loader"
        chunk(1, 0, 0, 100)                    # ...while dup/0 breaks a rule
        chunk(1, 0, 0, 100)
        time.sleep(0.3)     # nothing to await: give the reader time to report its error
        reports: list = []

        def read_two():
            try:
                reports.extend(worker.conn.recv() for _ in range(2))
            except Exception as exc:
                reports.append(exc)

        reader = threading.Thread(target=read_two, daemon=True)
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), "the reports' framing is broken: recv() hangs"
        assert [type(r) for r in reports] == [DeviceLoaded, Failed], reports
        assert (reports[0].device, reports[0].result) == (0, bytes(32 << 20))
        assert "dup/0: duplicate chunk idx 0" in reports[1].text
    finally:
        os.close(desc_r)
        os.close(desc_w)
        workers.stop()
        pool.close()


def test_a_planned_pool_fits_its_budget():
    """plan_pool() sized a pool to ``budget`` counting its slots only: the pool's
    bookkeeping (8 bytes a slot) and header made it larger than the budget (max_memory,
    or what /dev/shm has free), by 48 MB for thousands of devices."""
    for ndevices, budget in ((1, 1 << 20), (2000, 64 << 20), (4096, 1 << 30), (3, 10 << 20)):
        _, nslots = plan_pool(ndevices, 256 << 20, CHUNK, 4, budget)
        pool = _core.BufferPool.create(nslots, CHUNK + _core.CHUNK_HEADER_SIZE,
                                       tag="test-pool", sparse=True)
        try:
            size = os.stat(os.path.join(SHM_DIR, pool.name)).st_size
        finally:
            pool.close()
        assert size <= budget, f"{ndevices} devices: a pool of {size} bytes for {budget}"


def test_a_loader_waiting_for_its_next_chunk_is_woken_by_the_stop(monkeypatch):
    """An idle loader sleeps until a chunk comes or the session stops, not in
    0.5 s polls (4096 idle loaders cost 0.4 CPU-s a second): the main process's Stop
    wakes it, long before its wait's deadline (the test called the stream's wake()
    itself, so a Stop that only set the event passed it)."""
    from fastmfd._engine import reassembly
    monkeypatch.setattr(reassembly, "IDLE_WAKE", 3600.0)
    stream = reassembly._DeviceStream(0, "dev/0", fastmfd.CollectLoader(), 1 << 20, 4096)
    stop = threading.Event()
    taken: list = []
    loader = threading.Thread(target=lambda: taken.append(stream.take(stop)), daemon=True)
    loader.start()
    while not stream.cond._waiters:     # (in its wait: the stop comes while it sleeps)
        time.sleep(0.01)
    reassembler = object.__new__(reassembly._Reassembler)     # (only what a Stop touches)
    reassembler.stop, reassembler.devices = stop, [stream]
    reassembler._on_message(Stop())     # the main process's, as the session ends
    loader.join(timeout=60)
    assert not loader.is_alive() and taken == [None]
