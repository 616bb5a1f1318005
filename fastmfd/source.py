"""The source side of a migration: :class:`Source`.

::

    Source.migrate()                                   send workers (1 process / channel)
      connect main channel, SETUP ──▶ SETUP_ACK
      connect channels (header + init packet) ──fds──▶ SendEngine.run(cmd pipe)
      round 1: every page      ─┐  select idle channel (atomic selector)
      rounds 2..k: dirty pages  ├▶ page indices -> mailbox, RAM command -> pipe
      (live, until converged)  ─┘  SYNC command on every RAM channel; ROUND_END on main
      on_stop(); final dirty pages; device save threads ─▶ pool slots ─▶ DEVICE commands
      final SYNC, QUIT; COMPLETE ─────────────────────▶ destination
      ◀── LOADED: downtime ends
      ◀── RESUMED (the destination's on_resume ran): on_resume()

A monitor thread watches the workers (their reports and their process
sentinels) and the main channel's return path (ROUND_ACK, LOADED, RESUMED, ERROR);
any failure fails the session once (fastmfd.session.SessionFailure), which
aborts every wait and shuts the sockets down.
"""

from __future__ import annotations

import os
import threading
import time
import uuid as uuid_module
from multiprocessing import connection

import numpy as np

from . import _core
from .protocol.channels import MAIN, connect, expect_message, parse_address, read_message, send_all, \
    tune_data_socket, tune_main_socket
from .config import MigrationConfig
from .devices import DeviceSaver, save_old_way
from .errors import ConfigError, MigrationError, ProtocolError
from ._engine.progress import RoundProgress
from .regions import Region
from ._engine.session import MainChannel, SessionFailure, SessionResources, call_hook, main_first
from .shm import SharedMemory
from .stats import ChannelStats, MigrationStats, RoundStats
from .protocol.main_channel import Msg, decode_control, encode_preamble
from ._engine.workers import WorkerSet, send_worker_main

__all__ = ["Source"]


class Source:
    """Migrates regions and devices to a :class:`~fastmfd.Destination`.

    Use it as a context manager: entering starts one send worker process per
    channel (outside the timed migration); leaving stops them and frees every
    shared-memory segment. One Source performs one migration.
    """

    def __init__(self, address: str, config: MigrationConfig | None = None) -> None:
        self.address = parse_address(address)
        self.config = config or MigrationConfig()
        self.uuid = uuid_module.uuid4().bytes
        self._regions: list[Region] = []
        self._devices: list = []
        self._workers: WorkerSet | None = None
        self._resources = SessionResources()
        self._cmd_fds: list[int] = []           # one command pipe per worker (also in resources)
        self._main: MainChannel | None = None
        self._monitor: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._loaded = threading.Event()
        self._resumed = threading.Event()
        self._workers_done = threading.Event()
        self._saver: DeviceSaver | None = None   # the device save threads, new way
        self._device_chunks: list[int] = []     # chunks each device sent, in device order
        self._old_way_bytes = 0                 # device bytes sent on the main channel
        self._loaded_report: dict = {}
        self._failure = SessionFailure("source")
        self._used = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Source":
        cfg = self.config
        try:
            names = [f"send channel {i}" for i in range(cfg.total_channels)]
            self._workers = WorkerSet(send_worker_main, names)
            self._counters = self._resources.own(_core.Counters.create(cfg.total_channels))
            self._ram_selector = self._resources.own(_core.ChannelSelector.create(cfg.channels))
            self._device_selector = self._ram_selector
            if cfg.device_state_channels:
                self._device_selector = self._resources.own(
                    _core.ChannelSelector.create(cfg.device_state_channels))
            self._job_pages = cfg.packet_pages * cfg.job_packets
            self._mailbox_shm = self._resources.own(
                SharedMemory.create(cfg.total_channels * self._job_pages * 8, tag="mailbox"))
            self._mailbox = np.frombuffer(self._mailbox_shm.buf, dtype=np.uint64).reshape(
                cfg.total_channels, self._job_pages)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_region(self, region: Region) -> None:
        """Migrate ``region`` (regions are sent in the order they are added)."""
        if region.page_size != self.config.page_size:
            raise ConfigError(f"region {region.name!r} has page size {region.page_size}, the "
                              f"migration {self.config.page_size}")
        if any(r.name == region.name for r in self._regions):
            raise ConfigError(f"two regions named {region.name!r}")
        self._regions.append(region)

    def add_device(self, device) -> None:
        """Migrate ``device``'s state stream (a :class:`fastmfd.devices.Device`)."""
        key = (device.idstr, device.instance_id)
        if any((d.idstr, d.instance_id) == key for d in self._devices):
            raise ConfigError(f"two devices {device.idstr!r} instance {device.instance_id}")
        self._devices.append(device)

    def close(self) -> None:
        """Stop the workers and free every resource (idempotent)."""
        if self._monitor is not None:
            self._stop_monitor()
        self._resources.shutdown_sockets()
        if self._workers is not None:
            self._workers.stop()
            self._workers = None
        if self._main is not None:
            self._main.sock.close()
            self._main = None
        self._cmd_fds = []
        self._mailbox = None            # a view of a segment the resources close
        self._resources.release()

    # ------------------------------------------------------------ migrate
    def migrate(self, *, live: bool = True, on_stop=None, on_resume=None,
                progress: bool = False) -> MigrationStats:
        """Run the migration; returns its :class:`MigrationStats`.

        ``live``: iterate over dirty pages while the workload runs, then stop
        (``on_stop()``) for the final copy; ``live=False`` stops first.
        ``on_resume()`` runs once the destination has loaded everything and run its own
        ``on_resume`` (the migration is over by then: what it raises fails only this
        call, as a MigrationError naming the hook).
        ``progress``: show a live progress display on the terminal.
        """
        if self._workers is None:
            raise ConfigError("use the Source as a context manager: `with Source(...) as src`")
        if self._used:
            raise ConfigError("a Source performs one migration; make a new one")
        if not self._regions and not self._devices:
            raise ConfigError("nothing to migrate: add a region or a device first")
        self._used = True
        t_start = time.monotonic()
        try:
            self._connect()
            t_setup = time.monotonic() - t_start
            with RoundProgress(enabled=progress, regions=self._regions) as bar:
                rounds, stop_time = self._run_rounds(live, on_stop, bar)
            self._wait_for(self._loaded)
            end = time.monotonic()
            # A destination that cannot resume fails the migration: wait for its word.
            self._wait_for(self._resumed)
        except KeyboardInterrupt:
            self._failure.fail(MigrationError("interrupted by the user"))
            raise
        except BaseException as exc:
            self._failure.raise_for(exc)
        finally:
            # The device save threads use the pool, the selector and the command
            # pipes, which close() frees: they must be over first. After a failure
            # they end soon (it aborted their waits).
            if self._saver is not None:
                self._saver.wait()
        call_hook("on_resume", on_resume)
        return self._stats(end - t_start, t_setup, end - stop_time, rounds)

    # ------------------------------------------------------------ setup
    def _connect(self) -> None:
        cfg = self.config
        sock = connect(self.address, cfg.timeout)
        tune_main_socket(sock)
        sock.settimeout(cfg.timeout)
        self._main = MainChannel(sock)
        self._failure.on_failure(self._teardown)
        header = bytearray(_core.CHANNEL_HEADER_SIZE)
        if cfg.channel_header:
            _core.encode_channel_header(header, _core.CHANNEL_MAIN)
            send_all(sock, bytes(header), "channel header", MAIN)
        send_all(sock, encode_preamble(), "preamble", MAIN)
        self._main.send(Msg.SETUP, self._setup_message())
        expect_message(sock, Msg.SETUP_ACK)

        self._pool = None
        if self._devices and cfg.channel_header:
            nslots = max(4, 2 * len(self._devices) + cfg.total_channels)
            self._pool = self._resources.own(_core.BufferPool.create(
                nslots, cfg.device_chunk_size + _core.CHUNK_HEADER_SIZE, tag="source-pool"))
        session = self._worker_session()
        init = bytearray(_core.INIT_PACKET_SIZE)
        for ch, worker in enumerate(self._workers):
            data = connect(self.address, cfg.timeout)
            self._resources.sockets.append(data)
            tune_data_socket(data)
            hello = b""
            if cfg.channel_header:
                kind = _core.CHANNEL_MULTIFD if ch < cfg.channels else _core.CHANNEL_DEVICE_STATE
                _core.encode_channel_header(header, kind)
                hello = bytes(header)
            _core.encode_init_packet(init, self.uuid, ch)
            send_all(data, hello + bytes(init), "handshake", f"channel {ch}")
            cmd_r, cmd_w = os.pipe()
            self._cmd_fds.append(cmd_w)
            self._resources.fds.append(cmd_w)
            try:
                worker.start_session(session | self._channel_session(ch), [data.fileno(), cmd_r])
            finally:
                os.close(cmd_r)
        sock.settimeout(None)
        self._wake_r, self._wake_w = os.pipe()      # wakes the monitor thread to stop it
        self._resources.fds += [self._wake_r, self._wake_w]
        self._monitor = threading.Thread(target=self._watch, name="fastmfd source monitor",
                                         daemon=True)
        self._monitor.start()

    def _setup_message(self) -> dict:
        cfg = self.config
        return {
            "uuid": self.uuid.hex(),
            "page_size": cfg.page_size,
            "packet_pages": cfg.packet_pages,
            "compression": cfg.compression,
            "compression_level": cfg.compression_level,
            "zero_page_detection": cfg.zero_page_detection,
            "channels": cfg.channels,
            "device_state_channels": cfg.device_state_channels,
            "channel_header": cfg.channel_header,
            "checksum": cfg.checksum,
            "chunk_size": cfg.device_chunk_size,
            "max_queued_bytes": cfg.max_queued_bytes,
            "regions": [{"name": r.name, "size": r.size} for r in self._regions],
            "devices": [{"idstr": d.idstr, "instance_id": d.instance_id}
                        for d in self._devices],
        }

    def _worker_session(self) -> dict:
        cfg = self.config
        return {
            "page_size": cfg.page_size,
            "packet_pages": cfg.packet_pages,
            "zero_page_detection": cfg.zero_page_detection,
            "checksum": cfg.checksum,
            "chunk_size": cfg.device_chunk_size,
            "compression": cfg.compression,
            "compression_level": cfg.compression_level,
            "regions": [r.handle for r in self._regions],
            "counters": self._counters.name,
            "mailbox": self._mailbox_shm.name,
            "job_pages": self._job_pages,
            "pool": self._pool.name if self._pool is not None else None,
            "devices": [(d.idstr, d.instance_id) for d in self._devices],
        }

    def _channel_session(self, ch: int) -> dict:
        cfg = self.config
        ram = ch < cfg.channels
        selector = self._ram_selector if ram else self._device_selector
        return {"channel": ch, "mailbox_row": ch, "selector": selector.name,
                "selector_index": ch if ram else ch - cfg.channels}

    # ------------------------------------------------------------ rounds
    def _run_rounds(self, live: bool, on_stop, bar: RoundProgress) -> tuple[list, float]:
        """Send every round; returns the round stats and the stop time."""
        cfg = self.config
        rounds: list[RoundStats] = []
        stop_time = None
        if not live:
            stop_time = self._stop(on_stop)
        for region in self._regions:
            region.dirty.collect()          # forget writes before the migration began
        pages = [np.arange(r.npages, dtype=np.uint64) for r in self._regions]
        self._rounds_started = time.monotonic()
        while True:
            final = stop_time is not None
            rounds.append(self._send_round(len(rounds) + 1, pages, not final, bar,
                                           devices=final))
            if final:
                break
            pending = sum(r.dirty.count() for r in self._regions) * cfg.page_size
            if pending <= self._bandwidth() * cfg.downtime_limit \
                    or len(rounds) >= cfg.max_rounds:
                stop_time = self._stop(on_stop)
            pages = [r.dirty.collect() for r in self._regions]
        self._finish()
        return rounds, stop_time

    def _stop(self, on_stop) -> float:
        stop_time = time.monotonic()
        call_hook("on_stop", on_stop)
        return stop_time

    def _bandwidth(self) -> float:
        """Bytes of pages the workers have cleared per second since round 1 began.

        Counted from what the workers finished, not what was handed to them:
        a round smaller than the channels' jobs is handed out in no time."""
        done = self._counters.total("normal_pages") + self._counters.total("zero_pages")
        elapsed = time.monotonic() - self._rounds_started
        return done * self.config.page_size / max(elapsed, 1e-6)

    def _send_round(self, number: int, pages: list, live: bool, bar: RoundProgress,
                    devices: bool) -> RoundStats:
        started = time.monotonic()
        total = int(sum(len(p) for p in pages))
        bar.start_round(number, total, live)
        if devices and self._devices:
            self._main.send(Msg.SWITCHOVER_START)
            if self.config.channel_header:
                self._saver = DeviceSaver(self._devices, self._pool, self._device_selector,
                                          self._device_command, self._failure,
                                          self.config.device_chunk_size)
        for index, region_pages in enumerate(pages):
            self._dispatch_region(index, region_pages, bar)
        if devices and self._devices:
            if self._saver is not None:
                self._device_chunks = self._saver.join()
            else:
                self._device_chunks, self._old_way_bytes = save_old_way(
                    self._devices, self._main, self.config.device_chunk_size)
        for ch in range(self.config.channels):
            self._command(ch, _core.pack_command(_core.CMD_SYNC, round=number))
        self._main.send(Msg.ROUND_END, {"round": number})
        return RoundStats(number, total, time.monotonic() - started, live)

    def _dispatch_region(self, index: int, pages: np.ndarray, bar: RoundProgress) -> None:
        job = self._job_pages
        limit = self.config.max_bandwidth
        for start in range(0, len(pages), job):
            count = min(job, len(pages) - start)
            if limit is not None:
                self._throttle(limit)
            ch = self._ram_selector.select(timeout=None)
            self._mailbox[ch, :count] = pages[start:start + count]
            self._command(ch, _core.pack_command(_core.CMD_RAM, index, count))
            bar.advance(count)

    def _throttle(self, limit: int) -> None:
        """Sleep while the bytes on the wire run ahead of ``limit`` bytes/s."""
        ahead = self._counters.total("wire_bytes") / limit - (time.monotonic() -
                                                             self._rounds_started)
        if ahead > 0:
            if self._failure.event.wait(ahead):
                self._failure.check()

    def _command(self, ch: int, record: bytes) -> None:
        try:
            os.write(self._cmd_fds[ch], record)
        except OSError as exc:
            self._failure.check()
            raise MigrationError(f"cannot hand work to its worker: {exc.strerror}",
                                 channel=f"send channel {ch}") from None

    def _device_command(self, ch: int, device: int, slot: int, length: int) -> None:
        self._command(self.config.channels + ch if self.config.device_state_channels else ch,
                      _core.pack_command(_core.CMD_DEVICE, device, length, slot))

    def _finish(self) -> None:
        """Every command is queued: let the workers drain and half-close, then COMPLETE
        with the totals they sent, which the destination checks against its own."""
        for ch in range(self.config.total_channels):
            self._command(ch, _core.pack_command(_core.CMD_QUIT))
        self._wait_for(self._workers_done)
        totals = {
            "channels": [self._counters.read(ch) for ch in range(self.config.total_channels)],
            "device_chunks": self._device_chunks,
        }
        self._main.send(Msg.COMPLETE, totals)

    def _wait_for(self, event: threading.Event) -> None:
        while not event.wait(0.5):
            self._failure.check()
        self._failure.check()

    # ------------------------------------------------------------ monitor
    def _watch(self) -> None:
        """Monitor thread: worker reports and deaths, and the return path."""
        workers = {w.conn: w for w in self._workers}
        sentinels = {w.sentinel: w for w in self._workers}
        main = self._main.sock
        waiting = [*workers, *sentinels, main, self._wake_r]
        while self._failure.error is None:
            try:
                ready = connection.wait(waiting)
            except OSError:
                return
            if self._wake_r in ready:
                return
            for item in main_first(ready, main):
                try:
                    if item is main:
                        if not self._on_main_message():
                            waiting.remove(main)
                    elif item in workers:
                        if not self._on_worker_message(workers[item]):
                            waiting.remove(item)
                    elif item in sentinels:
                        waiting.remove(item)
                        self._on_worker_exit(sentinels[item])
                except BaseException as exc:
                    self._failure.fail(exc, MAIN if item is main else None)
                    return

    def _on_worker_exit(self, worker) -> None:
        # The worker's last report may still be unread: read it before judging.
        while not worker.finished and self._on_worker_message(worker):
            pass
        if not worker.finished:
            self._failure.fail(worker.death_error())

    def _on_worker_message(self, worker) -> bool:
        """Handle one report; False once the connection has nothing more to say."""
        message = worker.next_report()
        if message is None:
            return False
        if message[0] == "error":
            self._failure.fail(worker.error_from(message))
        elif message[0] == "done":
            worker.finished = True
            if all(w.finished for w in self._workers):
                self._workers_done.set()
        return True

    def _on_main_message(self) -> bool:
        """Handle one message from the destination; False at the end of the stream."""
        try:
            kind, body = read_message(self._main.sock, 0)
        except ProtocolError as exc:
            if self._resumed.is_set():
                return False
            raise MigrationError(f"the destination closed the main channel ({exc.detail})",
                                 channel=MAIN) from None
        info = decode_control(kind, body)
        if kind is Msg.LOADED:
            self._loaded_report = info
            self._loaded.set()
        elif kind is Msg.RESUMED and self._loaded.is_set():
            self._resumed.set()
        elif kind is Msg.ERROR:
            raise MigrationError(f"the destination failed: {info.get('error')}",
                                 channel=MAIN, side="destination")
        elif kind is not Msg.ROUND_ACK:
            raise ProtocolError(f"main channel: unexpected {kind.name} from the destination",
                                field="type", received=kind.name,
                                expected="ROUND_ACK, LOADED or RESUMED")
        return True

    def _stop_monitor(self) -> None:
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)
        self._monitor = None

    def _teardown(self, error: MigrationError) -> None:
        """First failure: wake every waiter, tell the destination, break blocked I/O."""
        self._ram_selector.abort()
        self._device_selector.abort()
        if getattr(self, "_pool", None) is not None:
            self._pool.abort()
        if self._main is not None and error.side != "destination":
            self._main.send_error(error)
        self._resources.shutdown_sockets()
        if self._main is not None:
            self._main.shutdown()
        if self._workers is not None:
            self._workers.kill()

    # ------------------------------------------------------------ results
    def _stats(self, total: float, setup: float, downtime: float,
               rounds: list[RoundStats]) -> MigrationStats:
        cfg = self.config
        channels = tuple(
            ChannelStats.from_counters(ch, "ram" if ch < cfg.channels else "device",
                                       self._counters.read(ch))
            for ch in range(cfg.total_channels))
        normal = sum(c.normal_pages for c in channels)
        zero = sum(c.zero_pages for c in channels)
        device_bytes = self._counters.total("device_bytes") + self._old_way_bytes
        return MigrationStats(
            total_time_s=total, setup_time_s=setup, downtime_s=downtime, rounds=len(rounds),
            ram_bytes=(normal + zero) * cfg.page_size,
            wire_bytes=sum(c.wire_bytes for c in channels) + self._main.bytes_sent,
            normal_pages=normal, zero_pages=zero, device_bytes=device_bytes,
            device_chunks=sum(self._device_chunks), page_size=cfg.page_size,
            compression=cfg.compression, channels=channels, round_stats=tuple(rounds),
            destination=self._loaded_report)

