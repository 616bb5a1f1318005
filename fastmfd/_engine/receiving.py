"""One migration from the destination's side: :class:`Receiving`, the state of
the session a :class:`~fastmfd.Destination` (the owner of the listener and the
processes) receives once.

::

    Receiving.run()                                       receive workers (1 process / channel)
      AWAITING_SOURCE: accept the main channel (its greeting:
        TLS, preamble, shared-key proof; strangers refused)
      SETUP: check SETUP; regions, pool, counters; prealloc: the
        workers fault the regions in (KEEPALIVE meanwhile); SETUP_ACK
      RECEIVING: each new connection to a free worker ──▶  greets it: TLS, init packet of this
        ◀── Greeted(ch): its RecvParams ──────────────▶    session, proof (or Refused)
                                                          RecvEngine.run(): pages into regions
        main channel: ROUND_END(n), DEVICE_STATE (old way)  Synced(n) at each SYNC, then waits
        PRECOPY_SENT(counts) -> reassembly; its
          PrecopyLoaded -> SWITCHOVER_ACK ──▶ source
        RAM barrier: round n released (Go) once every RAM
          channel reached SYNC n and ROUND_END(n) arrived ──▶ Go(n)
        reassembly process: DeviceLoaded, Drained
        workers: Eof when a channel is drained; deaths
      SWITCHOVER: SWITCHOVER_START (the source stopped)
      COMPLETE: the source's totals; every RAM channel drained and the last round
        released (config_after_ram: RamLoaded -> reassembly), every channel drained,
        every device loaded -> totals checked -> LOADED
      RESUMING: on_resume(); DONE: RESUMED (or ERROR if on_resume raised)

A connection that fails its greeting (TLS, magic, version, another
session's UUID, the shared-key proof) is refused: dropped, counted in
``Destination.refused`` and logged, while the session goes on waiting for its
real source. A channel that passed its greeting and then breaks the session's
rules (id out of range, a duplicate, the wrong type) fails the session, before
any byte of it reaches a region: state FAILED, the source is sent ERROR.
"""

from __future__ import annotations

import enum
import time
from typing import Callable

from .. import _core
from ..devices import Loader
from ..errors import ConfigError, MigrationError, ProtocolError, SecurityError
from ..protocol import handshake
from ..protocol.control import Drained, Eof, Go, Greeted, Refused, RecvParams, Synced
from ..protocol.main_channel import (MAIN, Complete, Loaded, MainChannel, Msg,
                                     PrecopySent, RoundAck, RoundEnd, SetupAck, check_round,
                                     decode_message_header, decode_payload,
                                     old_way_message_size, peer_failed, read_from_source)
from ..protocol.security import ChannelSecurity
from ..protocol.setup import Setup
from ..protocol.sockets import Listener, recv_exact, tune_data_socket, tune_main_socket
from ..region_pool import RegionPool
from ..regions import Region
from ..stats import ChannelStats, ReceiveStats
from .admission import Admission, ChannelDoor, DoorWorkers, Refusals
from .liveness import Heartbeat, Progress, Steps, process_stopped, stall_error
from .loading import DeviceLoading, check_chunk_counts, old_way_not_here
from .open_files import DESTINATION_PER_CHANNEL, check_session_files, check_worker_files
from .prealloc import preallocate
from .processes import Child, ChildSet, Watch, kill_all
from .session import SessionFailure, SessionResources, break_session, call_user
from .session_regions import RegionFactory, finish_regions, make_session_regions, places_pages
from .workers import recv_worker_main

__all__ = ["Receiving", "ReceivingState", "DestinationParts"]

# How long a channel's end waits for the source's ERROR that explains it.
SOURCE_WORD_GRACE = 0.5


class ReceivingState(enum.Enum):
    AWAITING_SOURCE = "awaiting the source"
    SETUP = "setting up"
    RECEIVING = "receiving"
    SWITCHOVER = "receiving device state"   # the source stopped
    COMPLETE = "completing"                 # the source sent everything; checking, loading
    RESUMING = "resuming"                   # LOADED sent; on_resume runs
    DONE = "done"
    FAILED = "failed"


class DestinationParts:
    """What a Destination owns and its session uses."""

    def __init__(self, listener: Listener, timeout: float, security: ChannelSecurity,
                 workers: ChildSet, reassembly: ChildSet, user_regions: dict[str, Region],
                 loaders: dict[tuple[str, int], Loader],
                 region_factory: RegionFactory | None, queued_cap: int | None,
                 resources: SessionResources, failure: SessionFailure,
                 refused: Refusals, stall_timeout: float | None = None,
                 max_memory: int | None = None, *,
                 on_setup: Callable[[Setup], object] | None = None,
                 prealloc: bool = False, region_pool: RegionPool | None = None,
                 huge_pages: bool = False) -> None:
        self.listener, self.timeout, self.security = listener, timeout, security
        self.prealloc, self.region_pool, self.huge_pages = prealloc, region_pool, huge_pages
        self.refused, self.on_setup = refused, on_setup
        self.stall_timeout, self.max_memory = stall_timeout, max_memory
        self.workers, self.reassembly = workers, reassembly
        self.user_regions, self.loaders = user_regions, loaders
        self.region_factory, self.queued_cap = region_factory, queued_cap
        self.resources, self.failure = resources, failure


class Receiving:
    """The state of one migration at the destination."""

    def __init__(self, parts: DestinationParts) -> None:
        self.parts = parts
        self.state = ReceivingState.AWAITING_SOURCE
        self.failure = parts.failure
        self.failure.on_failure(self._teardown)
        self.main: MainChannel | None = None
        self.source_came = False     # a main channel passed its greeting: see Destination's
        self.setup: Setup | None = None
        self.regions: list[Region] = []
        self._fresh: list[bool] = []            # per region: created for this session
        self._prestarted: list[Child] = []      # workers given a Prealloc share
        self.prealloc_seconds: float | None = None  # prealloc: how long faulting in took
        self._counters: _core.Counters | None = None
        self._devices: DeviceLoading | None = None  # the device-state side, if any
        self._assigned: dict[int, Child] = {}   # channel id -> its worker
        self._channel_of: dict[Child, int] = {}  # worker -> its channel id
        self._door: ChannelDoor | None = None   # new connections, after SETUP
        self._door_workers: DoorWorkers | None = None   # how many it may run (SETUP's)
        self._drained: set[int] = set()
        self._sync_count: dict[int, int] = {}
        self._synced: dict[int, int] = {}       # channel id -> the last SYNC it reached
        self._round_end = self._released = 0    # the last ROUND_END heard, round released
        self._precopy_sent = False              # PRECOPY_SENT came (once per session)
        self._complete: Complete | None = None
        self._ram_loaded = False                # every RAM channel drained, last round released
        self._watch: Watch | None = None
        self._admission: Admission | None = None   # while waiting for the source
        self._hearing = False                   # in _hear_the_source
        self._stall = 0.0                       # seconds: the session's stall deadline
        self._heartbeat: Heartbeat | None = None
        self._progress: Progress | None = None
        self._steps = Steps()                   # towards SWITCHOVER_ACK, LOADED: LOADING's

    # ------------------------------------------------------------ setup
    def accept_main(self) -> None:
        """Wait for the source's main channel (strangers are refused meanwhile,
        see :mod:`.admission`), check its SETUP, answer SETUP_ACK."""
        refuse = self.parts.refused.add         # dropped, kept, logged; the wait goes on
        with Admission(self.parts.listener, self.parts.security, refuse,
                       lambda: self.failure.error) as admission:
            self._admission = admission
            self.failure.check()                # cancelled before it started
            try:    # no source came: a wrong key, certificate, uuid? What was refused says
                with self.parts.refused.named_in_failure(self.failure):
                    greeting = admission.wait(self.parts.timeout, "the main channel")
            finally:
                self._admission = None
        self.main, self.source_came = MainChannel(greeting.sock), True  # (closed by close())
        if self.failure.error is not None:  # failed as it was taken: the teardown had no channel
            self.main.send_error(self.failure.error)
        self.failure.check()
        tune_main_socket(greeting.sock)
        self.state = ReceivingState.SETUP
        kind, length = decode_message_header(greeting.first_header, 0, sender="source",
                                             expected=(Msg.SETUP,))
        setup = decode_payload(kind, recv_exact(greeting.sock, length, "SETUP payload", MAIN,
                                                greeting.deadline))
        greeting.sock.settimeout(None)
        if greeting.auth_uuid is not None and setup.uuid != greeting.auth_uuid:
            raise SecurityError("SETUP's uuid is not the one the auth_key proof was bound to",
                                channel=MAIN)
        self._prepare(setup)
        try:
            # A worker a channel up before SETUP_ACK (the door's, ~50 ms each, failed a short
            # stall timeout), KEEPALIVE meanwhile, the first at once as prealloc's: the source
            # waits for SETUP_ACK within its handshake timeout (200 starts took 3 s).
            main, every = self.main, min(self._stall, setup.stall_timeout) / 4
            if len(self.parts.workers) < setup.total_channels:
                main.send(Msg.KEEPALIVE)
            self.parts.workers.grow(recv_worker_main, setup.total_channels, "receive channel",
                                    self._stall, lambda: main.keep_alive(every))
            if self.parts.prealloc:
                self._preallocate()
            self.main.send(Msg.SETUP_ACK, SetupAck(self._stall))
        except MigrationError as exc:   # the source failed meanwhile and left: its ERROR says why
            raise handshake.error_left(self.main.sock, MAIN, "the source failed",
                                       "source") or exc
        self.state = ReceivingState.RECEIVING

    def _prepare(self, setup: Setup) -> None:
        """Check SETUP against what the user added; make regions, counters, pool."""
        self.setup = setup
        parts = self.parts
        # The destination's own deadline if it has one, else the source's; SETUP_ACK
        # tells the source, and each side's keepalives keep to the shorter of the two.
        self._stall = parts.stall_timeout or setup.stall_timeout
        if parts.on_setup is not None:
            # It may add regions and loaders, or refuse (in its own words).
            call_user("the on_setup hook", parts.on_setup, setup)
        names = [r.name for r in setup.regions]
        keys = [d.key for d in setup.devices]
        for name in parts.user_regions:
            if name not in names:
                raise ConfigError(f"region {name!r} was added at the destination but the "
                                  f"source does not send it")
        for key in parts.loaders:
            if key not in keys:
                raise ConfigError(f"a loader was added for device {key[0]!r} instance "
                                  f"{key[1]} but the source does not send it")
        check_session_files(setup.total_channels, DESTINATION_PER_CHANNEL, "this destination")
        check_worker_files(len(setup.regions), "this destination")
        made = make_session_regions(setup, parts)
        self.regions, self._fresh, self._door_workers = made.regions, made.fresh, made.door
        self._counters = parts.resources.own(_core.Counters.create(setup.total_channels))
        if setup.devices:
            self._devices = DeviceLoading(setup, parts, made.memory_left, self._stall, made.door)

    def _preallocate(self) -> None:
        """prealloc: every region faulted in by the workers of the RAM channels,
        before SETUP_ACK lets the source send (see :mod:`.prealloc`), but for
        those faulted in already (a pooled region preallocated before, a warm file)."""
        started = time.monotonic()
        setup, parts = self.setup, self.parts
        assert setup is not None and self.main is not None, "after SETUP"
        cold = [region for region in self.regions if not region.faulted_in]
        self._prestarted = preallocate(
            parts.workers, max(1, setup.channels), cold, self.main, self._stall,
            min(self._stall, setup.stall_timeout) / 4, self.failure)
        for region in cold:
            region.faulted_in = True
        self.prealloc_seconds = time.monotonic() - started

    # ------------------------------------------------------------ the session
    def run(self) -> None:
        """Receive until everything is applied and loaded, then send LOADED."""
        parts, setup = self.parts, self.setup
        assert setup is not None and self.main is not None, "after accept_main()"
        main, stall, door_workers = self.main, self._stall, self._door_workers
        assert door_workers is not None, "after SETUP"
        self.main.sock.settimeout(stall)    # and so must a send
        self._progress = Progress(stall)
        self._heartbeat = Heartbeat(self.main, stall, "source", setup.stall_timeout)
        self._heartbeat.word = lambda: self._steps.word(self._source_waits(), stall)
        self._watch = watch = Watch(self.main.sock)
        self._door = ChannelDoor(parts, setup, door_workers, stall, watch,
                                 self._watch_worker, parts.refused.add, self._prestarted)
        watch.add(self.main.sock, self._on_main_message)
        for worker in parts.workers:
            self._watch_worker(worker)
        if self._devices is not None:
            devices = self._devices
            watch.add_child(parts.reassembly[0], lambda report: devices.on_report(
                report, main))
        self._check_liveness()              # the deadlines start now
        looked = time.monotonic()
        pace = self._heartbeat.pace
        while not self._done():
            self.failure.check()
            try:
                watch.poll(pace)
            except MigrationError as error:
                cause = self._reassembly_failure_first(error)
                self._raise_the_cause_of(cause)
                raise cause
            self._check_ram_loaded()
            # A look reads every channel's counters and every device-pool slot: after each
            # report, thousands of devices' reports kept this thread looking for seconds.
            if time.monotonic() - looked >= pace:
                looked = time.monotonic()
                self._check_liveness()
        self._finish()

    def _done(self) -> bool:
        assert self.setup is not None, "after SETUP"
        return (self._complete is not None
                and len(self._drained) == self.setup.total_channels
                and self._released == self._round_end
                and (self._devices is None or self._devices.all_loaded))

    def _check_ram_loaded(self) -> None:
        """All RAM is in once COMPLETE came, every RAM channel ended and its last
        round is released: then (config_after_ram) the config chunks may load."""
        if self._ram_loaded or self._complete is None or self._released != self._round_end:
            return
        assert self.setup is not None, "after SETUP"
        if all(ch in self._drained for ch in range(self.setup.channels)):
            self._ram_loaded = True
            if self._devices is not None:
                self._devices.ram_loaded()

    def _watch_worker(self, worker: Child) -> None:
        assert self._watch is not None, "in run()"
        self._watch.add_child(worker, lambda report: self._on_worker_report(worker, report))

    def _on_greeted(self, worker: Child, report: Greeted) -> None:
        setup = self.setup
        assert setup is not None and self._door is not None and self._counters is not None
        assert setup.chunk_size is not None, "a session's SETUP is decoded strictly: it has one"
        sock = self._door.greeted(worker)
        ch = handshake.check_channel(handshake.ChannelHello(report.kind, setup.uuid,
                                                            report.channel),
                                     setup, self._assigned)
        tune_data_socket(sock)
        params = RecvParams(
            channel=ch, page_size=setup.page_size, packet_pages=setup.packet_pages,
            checksum=setup.checksum, chunk_size=setup.chunk_size,
            compression=setup.compression, regions=tuple(r.handle for r in self.regions),
            devices=tuple(d.key for d in setup.devices), counters=self._counters.name,
            pool=self._devices.pool.name if self._devices is not None else None,
            ram=ch < setup.channels, received=tuple(r.dirty.name for r in self.regions),
            fresh=tuple(self._fresh),
            place=tuple(places_pages(r, fresh) for r, fresh in zip(self.regions, self._fresh)))
        worker.send(params)
        if self._devices is not None:
            worker.send_fds([self._devices.desc_w])
        worker.name = f"receive channel {ch}"
        self._assigned[ch] = worker
        self._channel_of[worker] = ch
        if len(self._assigned) == setup.total_channels:
            self._door.close()

    def _on_worker_report(self, worker: Child, report: object) -> None:
        assert self.setup is not None and self._door is not None, "in run()"
        if isinstance(report, Greeted):
            self._on_greeted(worker, report)
            return
        if isinstance(report, Refused):
            self._door.refused(worker, report.reason)
            return
        ch = self._channel_of[worker]
        if isinstance(report, Synced):
            self._sync_count[report.round] = self._sync_count.get(report.round, 0) + 1
            self._synced[ch] = report.round
            self._check_no_round_past_the_end()
            self._release_rounds()
        elif isinstance(report, Eof):
            self._drained.add(ch)
            self._check_ended_early()
            if len(self._drained) == self.setup.total_channels and self.setup.devices:
                self.parts.reassembly[0].send(Drained())

    def _check_ended_early(self) -> None:
        """A RAM channel that ended cannot bring a SYNC the source says it sent.

        A source that fails shuts its channels down and then sends its ERROR:
        the ERROR, the cause, is given a moment to arrive and wins over this,
        its consequence."""
        assert self.setup is not None, "after SETUP"
        for ch in self._drained:
            reached = self._synced.get(ch, 0)
            if ch < self.setup.channels and reached < self._round_end:
                self._hear_the_source(SOURCE_WORD_GRACE)
                raise MigrationError(f"the channel ended before the SYNC of round {reached + 1}",
                                     channel=self._assigned[ch].name)

    def _reassembly_failure_first(self, error: MigrationError) -> MigrationError:
        """A receive worker fails writing a descriptor once the reassembly process
        has exited, which it does after reporting its own failure: that report, the
        cause, is in its pipe, and is the error (the workers are watched first, so in
        one wait the worker's broken pipe came before it)."""
        workers = {worker.name for worker in self._assigned.values()}
        if self._devices is None or error.channel not in workers:
            return error
        reported = self.parts.reassembly[0].reported_failure()
        return error if reported is None else reported

    def _raise_the_cause_of(self, error: MigrationError) -> None:
        """A receive channel that broke, or device state that stopped short, is
        most often the consequence of the source's failure: it shuts its
        channels down, then sends its ERROR. If that ERROR comes within
        SOURCE_WORD_GRACE it is raised instead, the cause over its consequence."""
        assert self._heartbeat is not None, "in run()"
        children = [*self._assigned.values(), *self.parts.reassembly]
        if error.channel in {child.name for child in children}:
            cause = self._heartbeat.peer_failure_first(error, SOURCE_WORD_GRACE,
                                                       self._max_message())
            if cause is not error:
                raise cause

    def _max_message(self) -> int:
        """The largest main-channel payload (an old-way device chunk)."""
        assert self.setup is not None and self.setup.chunk_size is not None, "after SETUP"
        return old_way_message_size(self.setup.chunk_size, self.setup.checksum)

    def _hear_the_source(self, wait: float) -> None:
        """Handle what the source sends within ``wait`` seconds (its ERROR raises)."""
        if self._hearing:
            return                      # already inside a main-channel message
        self._hearing = True
        assert self._heartbeat is not None, "in run()"
        try:
            deadline = time.monotonic() + wait
            while self._heartbeat.peer_speaks_by(deadline):  # (KEEPALIVEs go on meanwhile)
                self._on_main_message()
        finally:
            self._hearing = False

    def _check_liveness(self) -> None:
        """The source must be heard from; every channel must connect; a channel owing a
        SYNC (ROUND_END came) or its end (COMPLETE came) must move; once every channel
        ended, COMPLETE must come, and the reassembly process must move until every
        device is loaded; a stopped process fails."""
        setup, stall, progress = self.setup, self._stall, self._progress
        assert setup is not None and progress is not None and self._counters is not None
        assert self._heartbeat is not None and self._door is not None, "in run()"
        self._door.make_room()
        for ch in range(setup.total_channels):
            worker = self._assigned.get(ch)
            if worker is None:
                # (Strangers ahead of it refused: the door works through them.)
                if progress.stalled(("connect", ch), True, self._door.turnover):
                    raise MigrationError(f"not connected {stall:g} s after SETUP_ACK"
                                         + self._door.stopped_greeters(),
                                         channel=f"channel {ch}")
                continue
            if ch in self._drained:
                continue
            pid = worker.process.pid
            reached = self._synced.get(ch, 0) if ch < setup.channels else 0
            # Held at a SYNC the barrier has not released, a channel owes nothing:
            # the channels that have not reached it do.
            owed = reached <= self._released and (self._complete is not None
                                                  or reached < self._round_end)
            signature: tuple[object, ...] = tuple(self._counters.read(ch).values())
            if progress.stalled(ch, owed or process_stopped(pid), signature):
                raise stall_error(worker.name, stall, pid,
                                  f" (it owes the SYNC of round {reached + 1})"
                                  if reached < self._round_end else "")
        ended = len(self._drained) == setup.total_channels
        # Every channel ended: the source owes its COMPLETE (unless its word waits unread:
        # this side was stopped); first, as the reassembly waits for it (config_after_ram).
        if (progress.stalled("complete", ended and self._complete is None, None)
                and not self._heartbeat.peer_spoke()):
            raise MigrationError(f"the source's COMPLETE did not come {stall:g} s after "
                                 f"every channel ended", channel=MAIN)
        if self._devices is not None:
            self._devices.check_progress(progress, ended)
        if self._complete is not None:
            self._steps.see((tuple(tuple(self._counters.read(ch).values())
                                   for ch in range(setup.total_channels)), len(self._drained),
                             self._devices.signature() if self._devices is not None else None))
        elif self._devices is not None and self._devices.precopy_awaited:
            self._steps.see(self._devices.signature())  # (towards the ack only loaders move)
        self._heartbeat.beat(urgent=self._steps.news())

    def _source_waits(self) -> bool:
        """The source waits for this side's word: SWITCHOVER_ACK, or LOADED."""
        return self._complete is not None or (self._devices is not None
                                              and self._devices.precopy_awaited)

    def _check_no_round_past_the_end(self) -> None:
        """After COMPLETE no ROUND_END comes: a RAM channel at the SYNC of a round
        the source did not end would be held there for ever (found by fuzzing)."""
        if self._complete is None:
            return
        for ch, reached in self._synced.items():
            if reached > self._round_end:
                raise ProtocolError(f"receive channel {ch}: SYNC of round {reached}, but "
                                    f"the source ended {self._round_end} round(s) (COMPLETE)",
                                    field="round", received=reached,
                                    expected=f"<= {self._round_end}")

    def _release_rounds(self) -> None:
        """RAM barrier: let every RAM channel past round n once all reached it."""
        assert self.setup is not None and self.main is not None, "after accept_main()"
        n_ram = self.setup.channels
        while (self._released < self._round_end
               and self._sync_count.get(self._released + 1, 0) == n_ram):
            self._released += 1
            for ch in range(n_ram):
                self._assigned[ch].send(Go(self._released))
            self.main.send(Msg.ROUND_ACK, RoundAck(self._released))

    def _on_main_message(self) -> None:
        assert self.setup is not None and self.main is not None and self._heartbeat is not None
        deadline = time.monotonic() + self._stall      # a trickled message fails, whole
        kind, body = read_from_source(self.main, self._max_message(), deadline,
                                      len(self._assigned))
        self._heartbeat.received()
        if kind is Msg.KEEPALIVE:
            # It carries nothing: decoded all the same, so that another message a bit
            # flip made a KEEPALIVE (ROUND_END 3 ^ 8 = 11) fails instead of being lost.
            decode_payload(kind, body)
            return
        expected = {ReceivingState.RECEIVING: (Msg.ROUND_END, Msg.DEVICE_STATE,
                                               Msg.SWITCHOVER_START, Msg.COMPLETE)
                    + (() if self._precopy_sent else (Msg.PRECOPY_SENT,)),
                    ReceivingState.SWITCHOVER: (Msg.ROUND_END, Msg.DEVICE_STATE,
                                                Msg.COMPLETE)}.get(self.state, ())
        if kind is Msg.ERROR:
            raise peer_failed(body, "source")
        if kind not in expected:
            raise ProtocolError(f"main channel: unexpected {kind.name} from the source while "
                                f"{self.state.value}", field="type", received=kind.name,
                                expected=" or ".join(m.name for m in expected) or "nothing")
        if kind is Msg.DEVICE_STATE:
            if self._devices is None:
                raise old_way_not_here()
            self._devices.on_old_way_chunk(body, self.main, self._living,
                                            min(0.5, self._heartbeat.interval))
            return
        payload = decode_payload(kind, body)
        if isinstance(payload, RoundEnd):
            check_round("ROUND_END", payload.round, self._round_end + 1)
            self._round_end = payload.round
            self._check_ended_early()
            self._release_rounds()
        elif isinstance(payload, PrecopySent):
            self._precopy_sent = True
            check_chunk_counts("PRECOPY_SENT", payload.device_chunks, len(self.setup.devices))
            if self._devices is None:
                self.main.send(Msg.SWITCHOVER_ACK)
            else:
                self._devices.on_precopy_sent(payload)
        elif kind is Msg.SWITCHOVER_START:
            # Loaders already start as chunks arrive: nothing waits for it.
            self.state = ReceivingState.SWITCHOVER
        else:
            check_chunk_counts("COMPLETE", payload.device_chunks, len(self.setup.devices))
            if self._devices is not None:
                self._devices.on_complete(payload.device_chunks)
            self._complete = payload
            self.state = ReceivingState.COMPLETE
            self._check_no_round_past_the_end()

    def _living(self) -> None:
        """While a wait goes on: a failure ends it, and the source keeps hearing from us."""
        assert self._heartbeat is not None, "in run()"
        self.failure.check()
        self._heartbeat.beat()

    def _finish(self) -> None:
        """Everything is applied: check the source's totals, then send LOADED."""
        assert self._complete is not None and self.setup is not None and self.main is not None
        assert self._counters is not None and self._heartbeat is not None, "after SETUP"
        if self._devices is not None:
            self._devices.check_totals(self._complete.device_chunks)
        self._complete.check_channels(self._counters.read, self.setup.total_channels)
        heartbeat = self._heartbeat

        def flushed(name: str) -> None:     # (each flush may take a while)
            self._steps.see(name)
            heartbeat.beat()
        finish_regions(self.regions, self._fresh, flushed)  # durable, then LOADED
        self.source_still_there()
        self.main.send(Msg.LOADED, Loaded(rounds=self._round_end,
                                          load_seconds=self._load_seconds_by_name()))
        self.state = ReceivingState.RESUMING

    def source_still_there(self) -> None:
        """Before each step that commits (LOADED, then ``on_resume``), handle what the
        source has already sent: a source that gave up while this side was held up
        (stopped, starved, slow past ``stall_timeout``) sent its ERROR and closed, and
        the session must fail here too, not succeed where the source failed. Only
        what is already waiting is read; a source that gives up later than this is
        the window no two-party protocol closes."""
        self._hear_the_source(0.0)

    def resumed(self) -> None:
        assert self.main is not None, "after accept_main()"
        self.main.send(Msg.RESUMED)
        self.state = ReceivingState.DONE

    def _load_seconds_by_name(self) -> dict[str, float]:
        return self._devices.load_seconds_by_name() if self._devices is not None else {}

    def _teardown(self, error: MigrationError) -> None:
        self.state = ReceivingState.FAILED
        if (admission := self._admission) is not None:     # (read once: another thread's)
            admission.abort(error)
        if self._devices is not None:
            self._devices.pool.abort()
        break_session(error, "source", self.main, self.parts.resources)
        kill_all([self.parts.workers, self.parts.reassembly])

    def close(self) -> None:
        if self.main is not None:
            self.main.close()
            self.main = None

    # ------------------------------------------------------------ results
    def stats(self, total: float) -> ReceiveStats:
        setup, counters, devices = self.setup, self._counters, self._devices
        assert setup is not None and counters is not None, "after SETUP"
        channels = tuple(
            ChannelStats.from_counters(ch, "ram" if ch < setup.channels else "device",
                                       counters.read(ch))
            for ch in range(setup.total_channels))
        return ReceiveStats(
            total_time_s=total, rounds=self._round_end,
            normal_pages=sum(c.normal_pages for c in channels),
            zero_pages=sum(c.zero_pages for c in channels),
            wire_bytes=sum(c.wire_bytes for c in channels),
            device_bytes=counters.total("device_bytes") + (devices.old_way_bytes if devices else 0),
            device_chunks=counters.total("device_packets") + (devices.old_way_chunks if devices
                                                              else 0),
            load_time_s=self._load_seconds_by_name(), channels=channels,
            prealloc_time_s=self.prealloc_seconds)

    def device_results(self) -> dict[tuple[str, int], object]:
        return self._devices.results_by_key() if self._devices is not None else {}
