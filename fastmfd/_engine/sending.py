"""One migration from the source's side: :class:`Sending`, the state of a
session that a :class:`~fastmfd.Source` (the owner of the processes and shared
structures) runs once.

::

    Sending.run()                                      send workers (1 process / channel)
      CONNECTING: main channel, SETUP ──▶ SETUP_ACK
        channels (header + init packet) ──fds──▶       SendEngine.run(command pipe)
      LIVE: round 1 every page, rounds 2..k dirty       select an idle channel (atomic
        pages, until converged: page indices ->          selector); SYNC on every RAM
        mailbox, RAM command -> pipe; devices'           channel at each round's end
        precopy chunks -> pool slots -> DEVICE
        commands; ROUND_END
        (switchover_ack: PRECOPY_SENT ──▶, rounds go on
         until ◀── SWITCHOVER_ACK, ◀── LOADING meanwhile)
      STOPPED: on_stop(); final dirty pages; device
        save threads -> pool slots -> DEVICE commands;
        QUIT, the workers' Done
      COMPLETING: COMPLETE ──▶ destination
      RESUMING: ◀── LOADED (downtime ends)
      DONE: ◀── RESUMED (the destination's on_resume ran); on_resume()

A monitor thread watches the workers (reports and exits) and the main
channel's return path (ROUND_ACK, LOADED, RESUMED, ERROR); any failure
fails the session once (:class:`~fastmfd._engine.session.SessionFailure`),
which aborts every wait and shuts the sockets down: state FAILED.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core
from ..config import MigrationConfig
from ..devices import Device, wire_ids
from ..errors import MigrationError, ProtocolError
from ..protocol import handshake
from ..protocol.control import Done, SendParams
from ..protocol.main_channel import (MAIN, Complete, Loaded, Loading, MainChannel, Msg,
                                     PrecopySent, RoundAck, RoundEnd, check_round,
                                     decode_payload, peer_failed, read_message)
from ..protocol.security import ChannelSecurity
from ..protocol.setup import DeviceSpec, RegionSpec, Setup
from ..protocol.sockets import (Address, ConnectionClosed, connect, peer_address,
                                tune_data_socket, tune_main_socket)
from ..regions import Region, closed_regions_named, first_file_changed
from ..shm import SharedMemory
from ..stats import MigrationStats, RoundStats
from ..threads import start_thread
from .liveness import (AwaitingDestination, Heartbeat, Progress, bytes_waiting,
                       process_stopped, set_stall_timeout, stall_error)
from .processes import ChildSet, Watch
from .progress import RoundProgress
from .saving import DeviceSaver, DeviceStream, OldWaySaver, make_saver
from .session import Hook, SessionFailure, SessionResources, break_session, call_hook
from .status import StatusBoard
from .stopping import end_call

__all__ = ["Sending", "SendingState", "SourceParts"]

# How long a write to a dead worker's command pipe waits for the monitor to say why
# the worker ended (it watches every worker's exit, so this is only ever a moment).
WORKER_EXIT_GRACE = 2.0
# How long a channel the destination closed waits for its ERROR, which says why:
# not at all, the ERROR is read only if already here (queued while this side was
# stopped). A reset on the way breaks both ends at once, and the destination then
# waits SOURCE_WORD_GRACE for this side's ERROR: waiting here too held both sides
# for its length, and the destination's error, its own reset, came to be named as
# the source's cause (a reread).
DESTINATION_WORD_GRACE = 0.0


class SendingState(enum.Enum):
    CONNECTING = "connecting"
    LIVE = "live"                   # rounds while the workload runs
    STOPPED = "stopped"             # on_stop ran: the final round and device state
    COMPLETING = "completing"       # every worker done; COMPLETE sent, LOADED awaited
    RESUMING = "resuming"           # LOADED arrived (downtime is over); waiting for RESUMED
    DONE = "done"
    FAILED = "failed"


@dataclass
class SourceParts:
    """What a Source owns and a session uses: made before the timed migration."""
    address: Address
    config: MigrationConfig
    uuid: bytes
    regions: list[Region]
    devices: list[Device]
    workers: ChildSet
    counters: "_core.Counters"
    ram_selector: "_core.ChannelSelector"
    device_selector: "_core.ChannelSelector"
    mailbox_shm: SharedMemory
    job_pages: int
    resources: SessionResources


class Sending:
    """The state of one migration at the source."""

    def __init__(self, parts: SourceParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.state = SendingState.CONNECTING
        self.failure = SessionFailure("source")
        self.failure.on_failure(self._teardown)
        for worker in parts.workers:        # a read that failed: did an image change?
            worker.explain_failure = lambda: first_file_changed(parts.regions)
        self.main: MainChannel | None = None
        self._mailbox: npt.NDArray[np.uint64] | None = np.frombuffer(
            parts.mailbox_shm.buf, dtype=np.uint64).reshape(self.config.total_channels,
                                                            parts.job_pages)
        self._cmd_fds: list[int] = []           # one command pipe per worker (also in resources)
        self._pool: _core.BufferPool | None = None
        self._monitor: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._loaded = threading.Event()
        self._resumed = threading.Event()
        self._workers_done = threading.Event()
        self._streams = [DeviceStream(d) for d in parts.devices]   # each device's save state
        self._saver: DeviceSaver | OldWaySaver | None = None    # made once connected
        self._loaded_report: Loaded | None = None
        self._awaiting = AwaitingDestination(self.config.stall_timeout)
        self._rounds_ended = 0                  # ROUND_ENDs sent
        self._rounds_acked = 0                  # ROUND_ACKs received (one per round, in order)
        self._heartbeat: Heartbeat | None = None
        self._destination_stall = self.config.stall_timeout    # SETUP_ACK says it
        self.board = StatusBoard()              # what status() reports while it runs
        self._rounds_started = time.monotonic() # when round 1 began (bandwidth's clock)
        self._ack_waited = 0.0                  # seconds spent waiting for SWITCHOVER_ACK
        self.stats: MigrationStats | None = None
        self._last_report: dict[str, Any] | None = None  # the report once the session is over

    # ------------------------------------------------------------ the session
    def run(self, live: bool, on_stop: Hook | None, on_resume: Hook | None,
            progress: bool) -> MigrationStats:
        board = self.board
        board.started_at = time.monotonic()
        try:
            self.failure.check()
            self._connect()
            board.setup_s = time.monotonic() - board.started_at
            with RoundProgress(enabled=progress, regions=self.parts.regions,
                               pages_done=self._pages_done) as bar:
                with closed_regions_named(self.parts.regions):
                    self._run_rounds(live, on_stop, bar)
                self._wait_for(self._loaded)
            end = time.monotonic()
            # A destination that cannot resume fails the migration: wait for its word.
            # Once it is heard the destination runs: nothing after it is a failure.
            while not self._resumed.wait(0.5):
                self.failure.check()
        except BaseException as exc:         # Ctrl-C or sys.exit() too: see end_call
            end_call(self.failure, exc)
        finally:
            # The device save threads use the pool, the selector and the command
            # pipes, which close() frees: they must be over first. After a failure
            # they end soon (it aborted their waits).
            if self._saver is not None:
                self._saver.wait()
            if self.failure.error is not None:
                self._last_report = self._report()
        assert self._loaded_report is not None and self.main is not None, "after LOADED"
        self.stats = board.final(end, self.config, self.parts.counters, self._streams,
                                 self._old_way_bytes, self.main.bytes_sent, self._loaded_report)
        self.state = SendingState.DONE
        self._last_report = self._report()      # the owner frees the counters next
        call_hook("on_resume", on_resume)
        return self.stats

    def close(self) -> None:
        """Stop the monitor and let go of the main channel (the owner frees the rest)."""
        if self._monitor is not None:
            self._stop_monitor()
        if self.main is not None:
            self.main.close()
            self.main = None
        self._mailbox = None            # a view of a segment the owner closes

    # ------------------------------------------------------------ setup
    def _setup(self) -> Setup:
        return Setup(uuid=self.parts.uuid, **self.config.session_values(),
                     regions=tuple(RegionSpec(r.name, r.size) for r in self.parts.regions),
                     devices=tuple(DeviceSpec(*wire_ids(d)) for d in self.parts.devices))

    def _connect(self) -> None:
        cfg, parts, setup = self.config, self.parts, self._setup()
        sock = connect(parts.address, cfg.timeout)
        # cancel()/close() break the handshake through the dup (TLS detaches ``sock``).
        parts.resources.sockets += [sock, sock.dup()]
        self.failure.check()                # a cancel while connecting found none
        tune_main_socket(sock)
        sock, ack = handshake.open_main_channel(sock, self._security, setup,
                                                cfg.channel_header, str(parts.address),
                                                opened=self._opened)
        self._destination_stall = ack.stall_timeout     # its KEEPALIVE watch (_watch)
        assert self.main is not None and self.main.sock is sock, "opened with SETUP"
        self._saver, self._pool = make_saver(self._streams, cfg, self.main,
                                             parts.device_selector, self._device_command,
                                             self.failure, parts.resources.own)
        # The channels connect within one timeout together (each had its own: a slow
        # destination stretched it to channels x that), where the main channel went.
        connected_by = time.monotonic() + cfg.timeout
        reached = peer_address(sock, parts.address)
        for ch, worker in enumerate(parts.workers):
            try:    # KEEPALIVE as due: a short stall timeout is no time for 8 connects
                self.main.keep_alive(min(cfg.stall_timeout, ack.stall_timeout) / 4)
                data = connect(reached, connected_by - time.monotonic())
            except MigrationError as exc:   # a destination that failed has said why
                raise handshake.error_left(sock, MAIN, "the destination failed") or exc
            parts.resources.sockets.append(data)
            tune_data_socket(data)
            set_stall_timeout(data, cfg.stall_timeout)
            cmd_r, cmd_w = os.pipe()
            self._cmd_fds.append(cmd_w)
            parts.resources.fds.append(cmd_w)
            try:
                worker.start_session(self._params(ch, setup), [data.fileno(), cmd_r])
            finally:
                os.close(cmd_r)
        # A message that starts must end within the deadline, and so must a send.
        sock.settimeout(cfg.stall_timeout)
        self._wake_r, self._wake_w = os.pipe()      # wakes the monitor thread to stop it
        parts.resources.fds += [self._wake_r, self._wake_w]
        self._monitor = start_thread(threading.Thread(  # kept once it runs: joined then only
            target=self._watch, name="fastmfd source monitor", daemon=True), MAIN)
        self.state = SendingState.LIVE

    def _opened(self, main: MainChannel) -> None:
        self.main = main        # a failure from here on tells the destination why (_teardown)

    @property
    def _security(self) -> ChannelSecurity:
        cfg, address = self.config, self.parts.address
        return ChannelSecurity.of_source(cfg.tls, address.target, address.family,
                                         auth_key=cfg.auth_key, timeout=cfg.timeout)

    def _params(self, ch: int, setup: Setup) -> SendParams:
        cfg, parts = self.config, self.parts
        ram = ch < cfg.channels
        return SendParams(
            channel=ch, page_size=cfg.page_size, packet_pages=cfg.packet_pages,
            checksum=cfg.checksum, chunk_size=cfg.device_chunk_size,
            compression=cfg.compression, regions=tuple(r.handle for r in parts.regions),
            devices=tuple(wire_ids(d) for d in parts.devices),
            counters=parts.counters.name,
            pool=self._pool.name if self._pool is not None else None,
            compression_level=cfg.compression_level,
            zero_page_detection=cfg.zero_page_detection, mailbox=parts.mailbox_shm.name,
            mailbox_row=ch, job_pages=parts.job_pages,
            selector=(parts.ram_selector if ram else parts.device_selector).name,
            selector_index=ch if ram else ch - cfg.channels,
            hello=handshake.channel_start(setup, ch), uuid=setup.uuid, security=self._security,
            rate=cfg.channel_rate)

    # ------------------------------------------------------------ rounds
    def _run_rounds(self, live: bool, on_stop: Hook | None, bar: RoundProgress) -> None:
        """Send every round (the board keeps their stats, and the stop time)."""
        cfg, regions = self.config, self.parts.regions
        rounds = self.board.rounds
        stop_time = None
        if not live:
            stop_time = self._stop(on_stop)
        for region in regions:
            region.dirty.collect()          # forget writes before the migration began
        pages = [np.arange(r.npages, dtype=np.uint64) for r in regions]
        self._rounds_started = collected = time.monotonic()
        while True:
            final = stop_time is not None
            rounds.append(self._send_round(len(rounds) + 1, pages, not final, bar,
                                           devices=final))
            if stop_time is not None:       # final
                break
            # Converged when what is left — dirty pages and what devices still
            # want to send live — fits the downtime limit (QEMU's pending estimate).
            devices = self.board.device_pending = sum(s.still_pending for s in self._streams)
            pending = sum(r.dirty.count() for r in regions) * cfg.page_size + devices
            if (pending <= self._bandwidth() * cfg.downtime_limit
                    or len(rounds) >= cfg.max_rounds) and self._switchover_acked():
                stop_time = self._stop(on_stop)
            pages = [r.dirty.collect() for r in regions]
            now = time.monotonic()
            self.board.dirty_rate = sum(len(p) for p in pages) / max(now - collected, 1e-6)
            collected = now
        self._finish()

    def _switchover_acked(self) -> bool:
        """With switchover_ack, the source may stop only once the destination has
        loaded every chunk sent live (QEMU's switchover-ack over the return path):
        the first time it is ready, it says how many chunks each device sent
        (PRECOPY_SENT) and waits a moment for SWITCHOVER_ACK; without it, the rounds
        go on (sending what the workload dirties meanwhile) and it asks again, as long
        as the destination's LOADING says its loaders move on (AwaitingDestination)."""
        awaiting = self._awaiting
        if not self.config.switchover_ack or awaiting.acked.is_set():
            return True
        if awaiting.ack_asked is None:
            counts = [s.next_idx for s in self._streams]
            awaiting.ack_requested([s.name for s in self._streams], counts)
            self._tell(Msg.PRECOPY_SENT, PrecopySent(counts))
        started = time.monotonic()
        acked = awaiting.acked.wait(self.config.downtime_limit)
        self._ack_waited += time.monotonic() - started
        self.failure.check()            # a failure wakes the wait too
        return acked

    def _stop(self, on_stop: Hook | None) -> float:
        stop_time = self.board.stopped_at = time.monotonic()
        call_hook("on_stop", on_stop)
        self.state = SendingState.STOPPED
        return stop_time

    def _bandwidth(self) -> float:
        """Bytes of pages and device chunks the workers have cleared per second since
        round 1 began.

        Counted from what the workers finished, not what was handed to them:
        a round smaller than the channels' jobs is handed out in no time; and
        over the time spent sending, not waiting for SWITCHOVER_ACK."""
        elapsed = time.monotonic() - self._rounds_started - self._ack_waited
        return (self._pages_done() * self.config.page_size
                + self.parts.counters.total("device_bytes")) / max(elapsed, 1e-6)

    def _pages_done(self) -> int:
        """Pages the workers have sent whole (zero pages included) so far."""
        counters = self.parts.counters
        return counters.total("normal_pages") + counters.total("zero_pages")

    def _send_round(self, number: int, pages: list[npt.NDArray[np.uint64]], live: bool,
                    bar: RoundProgress, devices: bool) -> RoundStats:
        started = time.monotonic()
        total = int(sum(len(p) for p in pages))
        self.board.round_base = self._pages_done()
        self.board.round_pages = total
        bar.start_round(number, total, live)
        saver = self._saver
        if saver is not None:
            if devices:
                self._tell(Msg.SWITCHOVER_START)
            # Live: each device's precopy for this round; stopped: the stop-copy.
            saver.start(live=not devices)
        for index, region_pages in enumerate(pages):
            self._dispatch_region(index, region_pages)
        if saver is not None:
            saver.join()
        for ch in range(self.config.channels):
            self._command(ch, _core.pack_command(_core.CMD_SYNC, round=number))
        self._rounds_ended = number         # before: its ROUND_ACK may beat _tell's return
        self._tell(Msg.ROUND_END, RoundEnd(number))
        return RoundStats(number, total, time.monotonic() - started, live)

    def _dispatch_region(self, index: int, pages: npt.NDArray[np.uint64]) -> None:
        job = self.parts.job_pages
        assert self._mailbox is not None, "open until close()"
        for start in range(0, len(pages), job):
            count = min(job, len(pages) - start)
            ch = self.parts.ram_selector.select(timeout=None)
            self._mailbox[ch, :count] = pages[start:start + count]
            self._command(ch, _core.pack_command(_core.CMD_RAM, index, count))

    def _command(self, ch: int, record: bytes) -> None:
        try:
            os.write(self._cmd_fds[ch], record)
        except OSError as exc:
            # A worker closes its command pipe only by exiting: the monitor is about
            # to report why (its traceback or its death), which is the real cause.
            self.failure.event.wait(WORKER_EXIT_GRACE)
            self.failure.check()
            raise MigrationError(f"cannot hand work to its worker: {exc.strerror}",
                                 channel=f"send channel {ch}") from None

    def _tell(self, kind: Msg, payload: object = None) -> None:
        """Send to the destination. One that failed sent ERROR before it closed the
        main channel: when the send breaks, the monitor is about to read that ERROR,
        which is the real cause."""
        assert self.main is not None, "connected"
        try:
            self.main.send(kind, payload)
        except MigrationError:
            self.failure.event.wait(WORKER_EXIT_GRACE)
            self.failure.check()
            raise

    def _device_command(self, ch: int, device: int, slot: int, length: int) -> None:
        self._command(self.config.channels + ch if self.config.device_state_channels else ch,
                      _core.pack_command(_core.CMD_DEVICE, device, length, slot))

    def _finish(self) -> None:
        """Every command is queued: let the workers drain and half-close, then COMPLETE
        with the totals they sent, which the destination checks against its own."""
        for ch in range(self.config.total_channels):
            self._command(ch, _core.pack_command(_core.CMD_QUIT))
        self._wait_for(self._workers_done)
        counters = self.parts.counters
        # LOADED is taken from now on (set first: it may come before _tell returns).
        self.state = SendingState.COMPLETING
        self._tell(Msg.COMPLETE, Complete(
            channels=[counters.read(ch) for ch in range(self.config.total_channels)],
            device_chunks=[stream.next_idx for stream in self._streams]))

    def _wait_for(self, event: threading.Event) -> None:
        while not event.wait(0.5):
            self.failure.check()
        self.failure.check()

    # ------------------------------------------------------------ monitor
    def _watch(self) -> None:
        """Monitor thread: worker reports and deaths, the return path, and deadlines."""
        assert self.main is not None, "connected"
        main = self.main
        watch = Watch(main.sock)
        for worker in self.parts.workers:
            watch.add_child(worker, self._on_worker_report)
        watch.add(main.sock, lambda: self._on_main_message(watch))
        watch.add(self._wake_r, self._stop_watching)
        stall = self.config.stall_timeout
        self._heartbeat = Heartbeat(main, stall, "destination", self._destination_stall)
        progress = Progress(stall)
        while self.failure.error is None:
            try:
                watch.poll(self._heartbeat.pace)
                self._check_liveness(progress)
            except _StopWatching:
                return
            except OSError:
                return                      # closed under us: the session is over
            except BaseException as exc:
                self.failure.fail(self._cause_of(exc))
                return

    def _cause_of(self, exc: BaseException) -> BaseException:
        """A send worker whose connection the destination closed (EPIPE, ECONNRESET)
        failed as the destination did: its ERROR, perhaps behind KEEPALIVEs it sent
        while this side was stopped, is the cause (a broken pipe was said instead)."""
        closed = {worker.name for worker in self.parts.workers if worker.peer_closed}
        if not isinstance(exc, MigrationError) or exc.channel not in closed:
            return exc
        assert self._heartbeat is not None, "made by _watch() first"
        return self._heartbeat.peer_failure_first(exc, DESTINATION_WORD_GRACE)

    def _stop_watching(self) -> None:
        raise _StopWatching()

    def _check_liveness(self, progress: Progress) -> None:
        """The destination must be heard from, and each send worker with work (a job,
        a command in its pipe) or stopped must finish a packet within the deadline."""
        if self._resumed.is_set():
            return
        assert self._heartbeat is not None, "made by _watch() first"
        self._heartbeat.beat()
        cfg, parts = self.config, self.parts
        self._awaiting.check(self.state is SendingState.COMPLETING, self._heartbeat)
        for ch, worker in enumerate(parts.workers):
            if worker.finished:
                continue
            pid = worker.process.pid
            selector, index = ((parts.ram_selector, ch) if ch < cfg.channels
                               else (parts.device_selector, ch - cfg.channels))
            expected = (selector.is_busy(index) or bytes_waiting(self._cmd_fds[ch]) > 0
                        or process_stopped(pid))
            # Packets, not bytes: a path that lets a zero-window probe through now
            # and then moves bytes, but nothing a destination could use.
            signature = tuple(parts.counters.read(ch).values())
            if progress.stalled(ch, expected, signature):
                raise stall_error(worker.name, cfg.stall_timeout, pid)

    def _on_worker_report(self, report: object) -> None:
        if isinstance(report, Done) and all(w.finished for w in self.parts.workers):
            self._workers_done.set()

    def _on_main_message(self, watch: Watch) -> None:
        """Handle one message from the destination."""
        assert self.main is not None and self._heartbeat is not None, "made by _watch()"
        try:
            # Whole in time: a trickled message held this thread and its deadlines.
            kind, body = read_message(self.main.sock, 0, time.monotonic()
                                      + self.config.stall_timeout, sender="destination")
        except (ConnectionClosed, MigrationError) as exc:   # closed, reset or too slow
            if self._resumed.is_set():
                watch.remove(self.main.sock)        # the destination is done and gone
                return
            if isinstance(exc, ConnectionClosed):
                raise MigrationError(f"the destination closed the main channel "
                                     f"({exc.detail})", channel=MAIN) from None
            raise
        self._heartbeat.received()
        if kind is Msg.KEEPALIVE:
            # It carries nothing: decoded all the same, so that another message a bit
            # flip made a KEEPALIVE (ROUND_END 3 ^ 8 = 11) fails instead of being lost.
            decode_payload(kind, body)
            return
        expected = {SendingState.COMPLETING: (Msg.LOADED, Msg.LOADING, Msg.ROUND_ACK),
                    SendingState.RESUMING: (Msg.RESUMED,)}.get(self.state, (Msg.ROUND_ACK,))
        if self._awaiting.ack_owed:
            expected += (Msg.SWITCHOVER_ACK, Msg.LOADING)
        # Judged before its payload is: an answer out of turn is refused by its type, not
        # its fields (a source's own messages, SETUP or COMPLETE, read_message refused).
        if kind not in (*expected, Msg.ERROR):
            raise ProtocolError(f"main channel: unexpected {kind.name} from the destination "
                                f"while {self.state.value}", field="type", received=kind.name,
                                expected=" or ".join(m.name for m in expected))
        if kind is Msg.ERROR:
            raise peer_failed(body, "destination")
        payload = decode_payload(kind, body)
        if isinstance(payload, Loaded):
            payload.check(self._rounds_ended, self._rounds_acked,
                          [stream.name for stream in self._streams])
            self._loaded_report = payload
            self._awaiting.loaded()
            self.state = SendingState.RESUMING
            self._loaded.set()
        elif isinstance(payload, Loading):
            self._awaiting.loading(payload.steps, payload.stall_timeout)
        elif kind is Msg.RESUMED:
            # The destination runs: the migration is over, whatever it sends next
            # (an ERROR read after it failed a migrate() whose guest ran there).
            watch.remove(self.main.sock)
            self._resumed.set()
        elif kind is Msg.SWITCHOVER_ACK:
            self._awaiting.acked.set()
        else:
            assert isinstance(payload, RoundAck)
            # One per round ended, in order (not rounds never sent, none missed).
            check_round("ROUND_ACK", payload.round, self._rounds_acked + 1)
            if payload.round > self._rounds_ended:
                raise ProtocolError(f"main channel: ROUND_ACK of round {payload.round}, not "
                                    f"ended", field="round", received=payload.round)
            self._rounds_acked = payload.round

    def _stop_monitor(self) -> None:
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5)
        self._monitor = None

    def _teardown(self, error: MigrationError) -> None:
        """First failure: wake every waiter, tell the destination, break blocked I/O."""
        self.state = SendingState.FAILED
        self._awaiting.acked.set()              # wakes a wait for it (which then checks)
        self.parts.ram_selector.abort()
        self.parts.device_selector.abort()
        if self._pool is not None:
            self._pool.abort()
        break_session(error, "destination", self.main, self.parts.resources)
        self.parts.workers.kill()

    # ------------------------------------------------------------ results
    @property
    def _old_way_bytes(self) -> int:
        """Device state sent on the main channel (without device-state channels)."""
        return self._saver.bytes_sent if isinstance(self._saver, OldWaySaver) else 0

    def status(self, cancelled: bool = False) -> dict[str, Any]:
        """What QEMU's ``query-migrate`` says, now (any thread): see Source.status."""
        report = self._last_report or self._report()
        if report["status"] == "failed" and cancelled:
            report = {**report, "status": "cancelled"}
        return report

    def freeze_status(self) -> None:
        """The owner is about to free the counters: keep the last report."""
        if self._last_report is None:
            self._last_report = self._report()

    def _report(self) -> dict[str, Any]:
        state = _STATUS[self.state]
        return self.board.report(
            state, self.config, self.parts.counters, self.parts.regions,
            running=self.stats is None and self.state is not SendingState.FAILED,
            bandwidth=self._bandwidth() if self.state is not SendingState.CONNECTING else 0.0,
            main_bytes=self.main.bytes_sent if self.main is not None else 0,
            old_way_bytes=self._old_way_bytes, streams=self._streams,
            switchover_ack=None if not self.config.switchover_ack else (
                "acked" if self._awaiting.acked.is_set() and self.state is not SendingState.FAILED
                else "requested" if self._awaiting.ack_asked is not None else "pending"),
            final=self.stats)


# QEMU's MigrationStatus names for each state ("device": the stop-and-copy).
_STATUS = {SendingState.CONNECTING: "setup", SendingState.LIVE: "active",
           SendingState.STOPPED: "device", SendingState.COMPLETING: "device",
           SendingState.RESUMING: "device", SendingState.DONE: "completed",
           SendingState.FAILED: "failed"}


class _StopWatching(BaseException):
    """The wake-up pipe: the monitor thread ends (not an Exception: no handler
    may turn it into the session's failure)."""
