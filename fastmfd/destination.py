"""The destination side of a migration: :class:`Destination`.

::

    Destination.receive()                                  receive workers (1 process / channel)
      accept main channel; SETUP -> regions, pool, counters
      SETUP_ACK
      accept channels: channel header + init packet checked here,
        then the socket goes to a worker ──────────────▶  RecvEngine.run(): pages into the region
      event loop:                                          ("sync", n) at each SYNC, then waits
        main channel: ROUND_END(n), DEVICE_STATE (old way),
          SWITCHOVER_START, COMPLETE
        RAM barrier: round n released ("go") once every RAM
          channel reached SYNC n and ROUND_END(n) arrived ───▶ ("go", n)
        reassembly process: ("loaded", device), errors
        workers: ("eof") when a channel is drained; deaths
      all channels drained + last round released + every device loaded
      -> LOADED; on_resume(); RESUMED (or ERROR if on_resume raised)

The destination needs no parameters: SETUP carries them all. A channel that
fails its checks (UUID, magic, version, type, id, duplicate) is refused
before any byte of it reaches a region, and fails the session.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing import connection

from . import _core
from .protocol.channels import (MAIN, ChannelHello, bound_address, expect_message, listen, parse_address,
                       read_hello, read_message, recv_exact, tune_data_socket,
                       tune_main_socket)
from .config import MigrationConfig
from .devices import CollectLoader, OLD_WAY_PREFIX, device_key
from .errors import ConfigError, FastMFDError, MigrationError, ProtocolError
from ._engine.reassembly import pool_slots_for, reassembly_main
from .regions import Region, validate_region_name
from ._engine.session import MainChannel, SessionFailure, SessionResources, call_hook, main_first
from .stats import ChannelStats, ReceiveStats
from .protocol.main_channel import MAIN_VERSION, Msg, decode_control
from ._engine.workers import WorkerSet, recv_worker_main

__all__ = ["Destination", "DestinationResult"]

HELLO_TIMEOUT = 5.0     # seconds a new connection may take to say what it is


@dataclass
class DestinationResult:
    """What :meth:`Destination.receive` returns."""
    regions: dict[str, Region]
    """Region name -> Region holding the received bytes (open until the Destination closes)."""
    devices: dict[tuple[str, int], object]
    """(idstr, instance_id) -> what the device's loader returned (bytes for CollectLoader)."""
    stats: ReceiveStats
    setup: dict = field(default_factory=dict)
    """The source's SETUP message: every session parameter."""


class Destination:
    """Receives one migration on ``address`` (``tcp:HOST:PORT``, port 0 picks one, or
    ``unix:PATH``).

    Use it as a context manager: entering starts ``workers`` receive worker
    processes and the reassembly process ahead of time (more workers are
    started if the source asks for more channels); leaving stops them and
    frees the regions it created and every shared-memory segment.
    """

    def __init__(self, address: str, *, workers: int = 4, timeout: float = 30.0,
                 max_queued_bytes: int | None = None, region_factory=None) -> None:
        requested = parse_address(address)
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, not {workers}")
        self._listener = listen(requested)
        self.address = str(bound_address(self._listener, requested))
        self._unix_path = requested.target if requested.family == socket.AF_UNIX else None
        self._prespawn = workers
        self.timeout = timeout
        self._queued_cap = max_queued_bytes
        self._region_factory = region_factory
        self._user_regions: dict[str, Region] = {}
        self._loaders: dict[tuple[str, int], object] = {}
        self._workers: WorkerSet | None = None
        self._reassembly: WorkerSet | None = None
        self._resources = SessionResources()
        self._main: MainChannel | None = None
        self._failure = SessionFailure("destination")
        self._used = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Destination":
        try:
            names = [f"receive channel {i}" for i in range(self._prespawn)]
            self._workers = WorkerSet(recv_worker_main, names)
            self._reassembly = WorkerSet(reassembly_main, ["reassembly"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_region(self, region: Region) -> None:
        """Receive into ``region`` (it must match the source's size) instead of a new one.

        Regions the source sends that were not added are created in shared
        memory, or by ``region_factory(name, size, page_size)`` when the
        Destination was given one (``fastmfd listen`` maps files that way).
        """
        if region.name in self._user_regions:
            raise ConfigError(f"two regions named {region.name!r}")
        self._user_regions[region.name] = region

    def add_loader(self, idstr: str, instance_id: int, loader) -> None:
        """Load device ``idstr``/``instance_id`` with ``loader`` (default: CollectLoader)."""
        for method in ("load_state_buffer", "load_finish"):
            if not callable(getattr(loader, method, None)):
                raise ConfigError(f"loader for {idstr!r} has no {method}() method")
        self._loaders[(idstr, instance_id)] = loader

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail the session from another thread: ``receive()`` raises MigrationError
        promptly, even while it still waits for the source to connect."""
        self._failure.fail(MigrationError(reason))
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)   # wakes a blocked accept()
            except OSError:
                pass

    def close(self) -> None:
        """Stop every process and free every resource (idempotent)."""
        self._resources.shutdown_sockets()
        for group in (self._workers, self._reassembly):
            if group is not None:
                group.stop()
        self._workers = self._reassembly = None
        if self._main is not None:
            self._main.sock.close()
            self._main = None
        self._resources.release()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._unix_path and os.path.exists(self._unix_path):
                os.unlink(self._unix_path)

    # ------------------------------------------------------------ receive
    def receive(self, *, on_resume=None) -> DestinationResult:
        """Accept one migration and apply it; returns a :class:`DestinationResult`.

        ``on_resume()`` runs after everything is loaded and LOADED was sent; the source
        learns that it ran (or what it raised) before its ``migrate()`` returns.
        """
        if self._workers is None:
            raise ConfigError("use the Destination as a context manager")
        if self._used:
            raise ConfigError("a Destination receives one migration; make a new one")
        self._used = True
        try:
            self._accept_main()
            started = time.monotonic()
            self._run()
            total = time.monotonic() - started
            call_hook("on_resume", on_resume)
            self._main.send(Msg.RESUMED)
        except KeyboardInterrupt:
            self._failure.fail(MigrationError("interrupted by the user"))
            raise
        except BaseException as exc:
            self._failure.raise_for(exc)
        return self._result(total)

    # ------------------------------------------------------------ setup
    def _accept_main(self) -> None:
        sock = self._accept("the main channel")
        tune_main_socket(sock)
        self._main = MainChannel(sock)
        self._failure.on_failure(self._teardown)
        try:
            hello = read_hello(sock, None, None, None)
            if hello.kind != _core.CHANNEL_MAIN:
                raise ProtocolError("the first connection is a multifd channel, expected the "
                                    "main channel", field="channel_type",
                                    received=hello.kind, expected=_core.CHANNEL_MAIN)
            version = struct.unpack(">I", recv_exact(sock, 4, "version", MAIN))[0]
            if version != MAIN_VERSION:
                raise ProtocolError(f"main channel field 'version': received {version}, "
                                    f"expected {MAIN_VERSION}", field="version",
                                    received=version, expected=MAIN_VERSION)
            self._setup(expect_message(sock, Msg.SETUP))
        except FastMFDError as exc:
            self._main.send_error(exc)
            raise
        self._main.send(Msg.SETUP_ACK)
        sock.settimeout(None)

    def _accept(self, what: str) -> socket.socket:
        self._listener.settimeout(self.timeout)
        try:
            sock, _ = self._listener.accept()
        except socket.timeout:
            raise MigrationError(f"no connection for {what} within {self.timeout:g} s") from None
        # A source writes its hello at once; a silent connection must not hold
        # the event loop (which also serves the other channels) for long.
        sock.settimeout(min(self.timeout, HELLO_TIMEOUT))
        return sock

    def _setup(self, setup: dict) -> None:
        """Validate SETUP and prepare regions, counters, pool and reassembly."""
        self.setup = setup
        try:
            self.session_uuid = bytes.fromhex(setup["uuid"])
            if len(self.session_uuid) != 16:
                raise ValueError("uuid is not 16 bytes")
            cfg = MigrationConfig(
                channels=setup["channels"],
                device_state_channels=setup["device_state_channels"],
                compression=setup["compression"],
                compression_level=setup["compression_level"],
                zero_page_detection=setup["zero_page_detection"],
                channel_header=setup["channel_header"], packet_pages=setup["packet_pages"],
                page_size=setup["page_size"], checksum=setup["checksum"],
                device_chunk_size=setup["chunk_size"],
                max_queued_bytes=setup["max_queued_bytes"])
            regions = [(validate_region_name(r["name"]), int(r["size"]))
                       for r in setup["regions"]]
            devices = [(str(d["idstr"]), int(d["instance_id"])) for d in setup["devices"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"SETUP is malformed: {exc!r}", field="SETUP",
                                received=str(exc), expected="a fastmfd SETUP") from None
        self.cfg = cfg
        names = [name for name, _ in regions]
        if len(set(names)) != len(names):
            raise ConfigError("SETUP names a region twice")
        if len(set(devices)) != len(devices):
            raise ConfigError("SETUP names a device twice")
        for name in self._user_regions:
            if name not in names:
                raise ConfigError(f"region {name!r} was added at the destination but the "
                                  f"source does not send it")
        for key in self._loaders:
            if key not in devices:
                raise ConfigError(f"a loader was added for device {key[0]!r} instance "
                                  f"{key[1]} but the source does not send it")
        self.regions: list[Region] = []
        self._fresh: list[bool] = []
        for name, size in regions:
            region = self._user_regions.get(name)
            if region is None and self._region_factory is not None:
                region = self._resources.own(self._region_factory(name, size, cfg.page_size))
                self._user_regions[name] = region
            elif region is None:
                region = self._resources.own(Region.create(name, size, page_size=cfg.page_size))
            elif region.size != size or region.page_size != cfg.page_size:
                raise ConfigError(f"region {name!r}: the source sends {size} bytes in "
                                  f"{cfg.page_size}-byte pages, the destination's region has "
                                  f"{region.size} bytes in {region.page_size}-byte pages")
            self.regions.append(region)
            self._fresh.append(name not in self._user_regions)
        self.devices = devices
        self._counters = self._resources.own(_core.Counters.create(cfg.total_channels))
        self._pool = None
        self._desc_w = -1
        if devices:
            self._start_reassembly(cfg, devices)

    def _start_reassembly(self, cfg: MigrationConfig, devices: list) -> None:
        cap = cfg.max_queued_bytes
        if self._queued_cap is not None:
            cap = min(cap, self._queued_cap)
            if cap < cfg.device_chunk_size:
                raise ConfigError(f"this destination's max_queued_bytes ({cap}) cannot hold one "
                                  f"device chunk of the source's device_chunk_size "
                                  f"({cfg.device_chunk_size})")
        slot_size = cfg.device_chunk_size + _core.CHUNK_HEADER_SIZE
        nslots = pool_slots_for(len(devices), cap, cfg.device_chunk_size, cfg.total_channels)
        # Slots are touched only as chunks arrive, so the pool is not allocated up front.
        self._pool = self._resources.own(_core.BufferPool.create(nslots, slot_size, tag="dest-pool"))
        desc_r, self._desc_w = os.pipe()
        self._resources.fds.append(self._desc_w)
        loaders = [(device_key(idstr, inst), self._loaders.get((idstr, inst), CollectLoader()))
                   for idstr, inst in devices]
        try:
            self._reassembly[0].start_session(
                {"pool": self._pool.name, "max_queued_bytes": cap, "loaders": loaders},
                [desc_r])
        finally:
            os.close(desc_r)

    # ------------------------------------------------------------ the session
    def _run(self) -> None:
        cfg = self.cfg
        total = cfg.total_channels
        self._assigned: dict[int, object] = {}          # channel id -> Worker
        self._drained: set[int] = set()
        self._sync_count: dict[int, int] = {}
        self._round_end = 0
        self._released = 0
        self._complete: dict | None = None
        self._device_results: dict[int, object] = {}
        self._device_chunks: dict[int, int] = {}
        self._reassembly_drained = False
        self._load_seconds: dict[int, float] = {}
        self._old_way_chunks = self._old_way_bytes = 0
        reassembly = self._reassembly[0] if self.devices else None
        waiting = [self._listener, self._main.sock]
        if reassembly is not None:
            waiting += [reassembly.conn, reassembly.sentinel]
        while not self._done():
            self._failure.check()
            ready = connection.wait(waiting, timeout=1.0)
            for item in main_first(ready, self._main.sock):
                if item is self._listener:
                    worker = self._accept_channel()
                    waiting += [worker.conn, worker.sentinel]
                    if len(self._assigned) == total:
                        waiting.remove(self._listener)
                elif item is self._main.sock:
                    self._on_main_message()
                elif reassembly is not None and item in (reassembly.conn, reassembly.sentinel):
                    if not self._on_reassembly(reassembly):
                        waiting.remove(reassembly.conn)
                        waiting.remove(reassembly.sentinel)
                else:
                    self._on_worker(item, waiting)
        self._finish()

    def _done(self) -> bool:
        return (self._complete is not None
                and len(self._drained) == self.cfg.total_channels
                and self._released == self._round_end
                and len(self._device_results) == len(self.devices)
                and (self._reassembly_drained or not self.devices))

    def _accept_channel(self):
        cfg = self.cfg
        sock = self._accept("a multifd channel")
        self._resources.sockets.append(sock)
        hello: ChannelHello = read_hello(sock, cfg.channel_header, self.session_uuid,
                                         cfg.total_channels)
        ch = hello.channel_id
        if hello.kind == _core.CHANNEL_MAIN:
            raise ProtocolError("a second main channel connected", field="channel_type",
                                received=0, expected="2 (multifd) or 3 (device state)")
        if ch in self._assigned:
            raise ProtocolError(f"init packet field 'id': received {ch}, which is already "
                                f"set up", field="id", received=ch, expected="an unused id")
        ram = ch < cfg.channels
        expected_kind = _core.CHANNEL_MULTIFD if ram else _core.CHANNEL_DEVICE_STATE
        if cfg.channel_header and hello.kind != expected_kind:
            raise ProtocolError(f"channel {ch}: channel header type {hello.kind}, expected "
                                f"{expected_kind}", field="channel_type", received=hello.kind,
                                expected=expected_kind)
        sock.settimeout(None)
        tune_data_socket(sock)
        while len(self._workers) <= ch:
            self._workers.add(recv_worker_main, f"receive channel {len(self._workers)}")
        worker = self._workers[ch]
        session = {
            "channel": ch, "ram": ram,
            "page_size": cfg.page_size, "packet_pages": cfg.packet_pages,
            "checksum": cfg.checksum, "chunk_size": cfg.device_chunk_size,
            "compression": cfg.compression,
            "regions": [r.handle for r in self.regions],
            "received": [r.dirty.name for r in self.regions],
            "fresh": self._fresh,
            "counters": self._counters.name,
            "pool": self._pool.name if self._pool is not None else None,
            "devices": self.devices,
        }
        fds = [sock.fileno()] + ([self._desc_w] if self._pool is not None else [])
        worker.start_session(session, fds)
        self._assigned[ch] = worker
        return worker

    def _on_worker(self, item, waiting: list) -> None:
        for ch, worker in self._assigned.items():
            if item is worker.conn:
                if not self._on_worker_message(ch, worker):
                    waiting.remove(item)
                return
            if item == worker.sentinel:
                waiting.remove(item)
                while self._on_worker_message(ch, worker):
                    pass
                if ch not in self._drained:
                    raise worker.death_error()
                return

    def _on_worker_message(self, ch: int, worker) -> bool:
        message = worker.next_report()
        if message is None:
            return False
        kind = message[0]
        if kind == "error":
            raise worker.error_from(message)
        if kind == "sync":
            n = message[1]
            self._sync_count[n] = self._sync_count.get(n, 0) + 1
            self._release_rounds()
        elif kind == "eof":
            self._drained.add(ch)
            if len(self._drained) == self.cfg.total_channels and self.devices:
                self._reassembly[0].conn.send(("drained",))
        return True

    def _release_rounds(self) -> None:
        """RAM barrier: let every RAM channel past round n once all reached it."""
        n_ram = self.cfg.channels
        while (self._released < self._round_end
               and self._sync_count.get(self._released + 1, 0) == n_ram):
            self._released += 1
            for ch in range(n_ram):
                self._assigned[ch].conn.send(("go", self._released))
            self._main.send(Msg.ROUND_ACK, {"round": self._released})

    def _on_main_message(self) -> None:
        kind, body = read_message(self._main.sock,
                                  OLD_WAY_PREFIX.size + _core.CHUNK_HEADER_SIZE
                                  + self.cfg.device_chunk_size)
        if kind is Msg.DEVICE_STATE:
            self._on_old_way_chunk(body)
            return
        info = decode_control(kind, body)
        if kind is Msg.ROUND_END:
            n = info.get("round")
            if n != self._round_end + 1:
                raise ProtocolError(f"ROUND_END for round {n}, expected {self._round_end + 1}",
                                    field="round", received=n, expected=self._round_end + 1)
            self._round_end = n
            self._release_rounds()
        elif kind is Msg.SWITCHOVER_START:
            pass    # loaders already start as chunks arrive: nothing waits for it
        elif kind is Msg.COMPLETE:
            self._complete = info
        elif kind is Msg.ERROR:
            raise MigrationError(f"the source failed: {info.get('error')}",
                                 channel=MAIN, side="source")
        else:
            raise ProtocolError(f"main channel: unexpected {kind.name} from the source",
                                field="type", received=kind.name, expected="a source message")

    def _on_old_way_chunk(self, body: bytes) -> None:
        if self._pool is None or self.cfg.channel_header:
            raise ProtocolError("DEVICE_STATE on the main channel, but device state travels "
                                "on the multifd channels in this session",
                                field="type", received="DEVICE_STATE", expected="not here")
        if len(body) < OLD_WAY_PREFIX.size + _core.CHUNK_HEADER_SIZE:
            raise ProtocolError(f"DEVICE_STATE of {len(body)} bytes is shorter than its "
                                f"headers", field="length", received=len(body),
                                expected=OLD_WAY_PREFIX.size + _core.CHUNK_HEADER_SIZE)
        device = OLD_WAY_PREFIX.unpack_from(body)[0]
        if device >= len(self.devices):
            raise ProtocolError(f"DEVICE_STATE for device number {device}, the session has "
                                f"{len(self.devices)}", field="device", received=device,
                                expected=f"< {len(self.devices)}")
        chunk = memoryview(body)[OLD_WAY_PREFIX.size:]
        idx, flags = _core.decode_chunk_header(chunk)
        slot = self._acquire_slot()
        with self._pool.view(slot) as view:
            view[:len(chunk)] = chunk
        os.write(self._desc_w, _core.pack_descriptor(device, idx, flags, slot, len(chunk), 0))
        self._old_way_chunks += 1
        self._old_way_bytes += len(chunk)

    def _acquire_slot(self) -> int:
        while True:
            slot = self._pool.acquire(timeout=0.5)
            if slot is not None:
                return slot
            self._failure.check()
            if not self._reassembly[0].process.is_alive():
                raise self._reassembly[0].death_error()

    def _on_reassembly(self, reassembly) -> bool:
        got = False
        while (message := reassembly.next_report()) is not None:
            got = True
            if message[0] == "error":
                raise reassembly.error_from(message)
            if message[0] == "loaded":
                _, index, result, seconds, chunks = message
                self._device_results[index] = result
                self._load_seconds[index] = seconds
                self._device_chunks[index] = chunks
            elif message[0] == "drained":
                self._reassembly_drained = True
        if not got and not reassembly.process.is_alive():
            raise reassembly.death_error()
        return True

    def _finish(self) -> None:
        """Everything is applied: check the source's totals, then send LOADED."""
        counts = self._complete.get("device_chunks") or []
        for i, name in enumerate(self.devices):
            theirs = counts[i] if i < len(counts) else None
            if theirs != self._device_chunks.get(i):
                raise ProtocolError(f"device {device_key(*name)}: the source sent {theirs} "
                                    f"chunks, {self._device_chunks.get(i)} were loaded",
                                    field="device_chunks", received=self._device_chunks.get(i),
                                    expected=theirs)
        sent = self._complete.get("channels") or []
        for ch in range(self.cfg.total_channels):
            mine = self._counters.read(ch)
            theirs = sent[ch] if ch < len(sent) else {}
            for key in ("packets", "normal_pages", "zero_pages", "device_packets"):
                if theirs.get(key) != mine[key]:
                    raise ProtocolError(f"channel {ch}: the source sent {theirs.get(key)} "
                                        f"{key.replace('_', ' ')}, {mine[key]} arrived",
                                        field=key, received=mine[key], expected=theirs.get(key))
        self._main.send(Msg.LOADED, {
            "rounds": self._round_end,
            "load_seconds": {device_key(*self.devices[i]): s
                             for i, s in self._load_seconds.items()},
        })

    def _teardown(self, error: MigrationError) -> None:
        if self._pool is not None:
            self._pool.abort()
        if self._main is not None and error.side != "source":
            self._main.send_error(error)
        self._resources.shutdown_sockets()
        if self._main is not None:
            self._main.shutdown()
        for group in (self._workers, self._reassembly):
            if group is not None:
                group.kill()

    def _result(self, total: float) -> DestinationResult:
        cfg = self.cfg
        channels = tuple(
            ChannelStats.from_counters(ch, "ram" if ch < cfg.channels else "device",
                                       self._counters.read(ch))
            for ch in range(cfg.total_channels))
        stats = ReceiveStats(
            total_time_s=total, rounds=self._round_end,
            normal_pages=sum(c.normal_pages for c in channels),
            zero_pages=sum(c.zero_pages for c in channels),
            wire_bytes=sum(c.wire_bytes for c in channels),
            device_bytes=self._counters.total("device_bytes") + self._old_way_bytes,
            device_chunks=self._counters.total("device_packets") + self._old_way_chunks,
            load_time_s={device_key(*self.devices[i]): s for i, s in self._load_seconds.items()},
            channels=channels)
        devices = {self.devices[i]: result for i, result in self._device_results.items()}
        return DestinationResult({r.name: r for r in self.regions}, devices, stats,
                                 dict(self.setup))

