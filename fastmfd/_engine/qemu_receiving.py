"""One migration from a real QEMU (7.2 or later), received into files: the
destination's side of QEMU's own protocol, with fastmfd's receive workers.

::

    QemuReceiving.run()                                   receive workers (1 process / channel)
      listener (qemu_channels.QemuConnections): each connection
        told apart by its first bytes, as they come:
        "QEVM" -> the main channel; 0x11223344 -> a multifd
        channel: its init packet read here (id, uuid), a worker
        set aside for it ─────────── socket ──────────────▶  (waits for its RecvParams)
        (anything else is not QEMU's: dropped if it came
        before the main channel, else the migration fails)
      main channel, decoded as it arrives (QevmDecoder):
        block list -> one sparse .part file per RAMBlock
        ZERO / PAGE records -> written here (a zero page only
          where this migration wrote data before: cleared)
        barrier 1 (the setup section's end): QEMU synced every
          channel before it, so all have connected; QEMU's are
          chosen (qemu_channels), RecvParams (qemu-7.2 layout,
          compression learnt) ─────────────────────────────▶  RecvEngine: pages (and the
                                                                 zero pages QEMU >= 9.0
                                                                 lists) into the files
        barrier k (a section's EOS, or a MULTIFD_FLUSH record
          when the machine type syncs per round) -> every
          channel's SYNC k, then Go(k) ◀─────────── Synced(k) ─▶ Go(k)
        first device section -> the rest of the stream, as
          QEMU sent it, into vmstate.bin
      end of the stream: QEMU_VM_EOF and the VM description      (each Synced carries the
        (where QEMU's destination stops too; QEMU closes the        compression learnt)
        connections later, in its cleanup); every channel sent
        k SYNCs, one compression; each channel shut for
        reading ──────────────────────────────────────────▶  reads to its end: Eof
        (no page after its last SYNC); files flushed and     (then holds until close)
        fsynced -> manifest, renames -> SHUT 0 to a source with a return path (its
        PINGs answered as they come: qemu_return_path)
Any failure closes every connection (the source fails its migration) and
removes the .part files.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import time
from typing import Callable, Protocol

import numpy as np

from .. import _core
from ..errors import ConfigError, FastMFDError, MigrationError, ProtocolError
from ..protocol.bytereader import ByteReader, StreamReader
from ..protocol.control import Eof, Go, Ready, RecvParams, Synced
from ..protocol.qemu import QEMU_PACKET_BYTES, SYNC_PER_SECTION, check_stream_end
from ..protocol.security import ChannelSecurity
from ..protocol.sockets import Listener, tune_data_socket
from ..regions import Region
from .memory_bound import check_qemu_channels, qemu_greeting_refusal
from .processes import Child, ChildSet, Watch
from .qemu_channels import (QemuChannel, QemuConnections, choose_channels, late_sync_error,
                            migration_uuid, stopped_note)
from .qemu_live_decoder import LiveDecoder, QemuStreamFacts
from .qemu_return_path import SOURCE_NOT_TOLD, ReturnPathAnswers
from .qemu_tls import MAX_GREETINGS, PlainGreeter, TLSGreeter
from .session import shutdown_quietly
from .session_regions import places_pages
from .workers import qemu_recv_worker_main

__all__ = ["QemuReceiving", "QemuStreamFacts", "QemuOutput", "MAX_WORKERS"]

log = logging.getLogger("fastmfd")

MAIN = "main channel"
MAX_CHANNELS = 256                  # the ids a uint8 holds (init packet); multifd-channels: 1..255
# The most receive workers a migration uses: one per channel, and in TLS one per
# connection greeted meanwhile.
MAX_WORKERS = MAX_CHANNELS + MAX_GREETINGS
COPY_CHUNK = 1 << 20
JSON_END = ord("}")                 # the VM description's closing brace: a stream's last byte


# Why a channel's worker failed once the stream ended (_end_channels): past its last
# SYNC it only reads to the end, so it was cut short there, or read on (a SYNC early).
STILL_SENDING = ("the stream had ended and every channel had sent its last SYNC, but this "
                 "one went on sending, and was shut for reading here")
# Why a stream is cut short by its connection's end: the source went away mid-migration.
SOURCE_GONE = "(its migration failed or was cancelled, or it exited)"


def closed_early(exc: ProtocolError) -> MigrationError:
    """``exc``, the main channel's stream cut short by the connection's end, as
    what it is: the source gone (a QEMU killed mid-migration), a session failure
    like any dropped connection (the README's "Fails cleanly": one
    MigrationError, as when a channel's worker sees the end first), not bad bytes."""
    return MigrationError(f"the source closed it before the stream's end {SOURCE_GONE}: "
                          f"{exc.detail}", channel=exc.where or MAIN)


class QemuOutput(Protocol):
    """Where a QEMU migration's files go (tools.outputs.OutputDir): it names,
    creates and keeps them; the caller commits or aborts it."""

    def plan_qemu(self, blocks: dict[str, int], page_size: int) -> None: ...
    def region(self, name: str, size: int, page_size: int) -> Region: ...
    def stream(self, key: str) -> int: ...
    def fsync_part(self, name: str) -> None: ...


class QemuReceiving:
    """The state of one migration from QEMU (see the module docstring)."""

    def __init__(self, listener: Listener, out: QemuOutput, *, timeout: float,
                 stall_timeout: float, workers: int = 2,
                 security: ChannelSecurity | None = None, max_memory: int | None = None) -> None:
        """``out`` names, creates and keeps the files (a tools.outputs.OutputDir);
        the caller commits or aborts it, and then confirms on ``answers``.
        ``workers``: receive workers started now, before QEMU connects;
        ``security`` with ``tls``: every connection in TLS (:mod:`.qemu_tls`);
        ``max_memory``: what QEMU's channels may make this process hold
        (:meth:`_check_memory`)."""
        self.out, self.max_memory = out, max_memory
        self.timeout, self.stall = timeout, stall_timeout
        self.facts = QemuStreamFacts()
        self.channels: dict[int, QemuChannel] = {}     # QEMU's, chosen at barrier 1
        self.regions: dict[str, Region] = {}
        self.counters: _core.Counters | None = None
        self.watch = Watch()
        self.answers = ReturnPathAnswers()
        self._main_readable = False
        self._check_cancel: Callable[[], None] = lambda: None     # run()'s
        self.stream_ended = False                   # its VM description came: no SYNC more
        # Workers started ahead (at least one: it starts multiprocessing's forkserver);
        # more start as their channels connect, all at once, reporting Ready.
        self.workers: ChildSet | None = ChildSet(qemu_recv_worker_main, ["receive worker"] * max(1, workers))
        self.spares = list(self.workers)
        self.greeter = (TLSGreeter(security, self.watch, self._take_worker, self.spares.append,
                                   self._no_room)
                        if security is not None and security.tls is not None else
                        PlainGreeter(self.watch, self.spares.append))
        self.connections = QemuConnections(listener, self.watch, self._set_aside, self.greeter)

    # ------------------------------------------------------------ the session
    def run(self, check_cancel: Callable[[], None]) -> QemuStreamFacts:
        """The migration, to its files flushed (``check_cancel()`` raises a cancel
        before each read of the main channel and between the flush's steps; every
        wait before the flush raises one at once)."""
        self._check_cancel = check_cancel
        deadline = time.monotonic() + self.timeout
        while self.connections.main is None:
            left = deadline - time.monotonic()
            if left <= 0:
                failed = self.connections.failed_handshakes
                raise MigrationError(f"no QEMU connected within {self.timeout:g} s"
                                     + (f" ({failed})" if failed.count else "")
                                     + self.connections.room_note(), channel=MAIN)
            self.watch.poll(min(left, 1.0))
        self.watch.main = self.connections.main
        decoder = LiveDecoder(StreamReader(MAIN, self._recv_main), self)
        try:
            decoder.decode_ram()
        except ProtocolError as exc:
            if decoder.r.truncated:
                raise self._closed_early(exc) from exc
            raise
        facts = self.facts
        facts.machine, facts.page_size = decoder.out.machine, decoder.out.page_size
        facts.capabilities = list(decoder.out.capabilities)
        facts.ram_bytes = decoder.out.ram_bytes
        facts.configuration = decoder.out.configuration
        facts.commands = decoder.out.command_sections
        facts.ram_section_id = decoder.out.ram_section_id
        facts.section_footers = decoder.out.section_footers
        facts.multifd_sync = decoder.out.multifd_sync or SYNC_PER_SECTION
        facts.ram_section_ends = decoder.out.ram_section_ends
        self._save_vmstate(decoder.r)
        self._end_channels()
        # No block list, no counters: no channel carried a page.
        facts.multifd_zero_pages = (self.counters.total("zero_pages")
                                    if self.counters is not None else 0)
        self._flush(check_cancel)
        return facts

    def _closed_early(self, exc: ProtocolError) -> FastMFDError:
        """The main channel's end mid-stream: in TLS, its relay's failure if it
        failed (its end of the pair closes as it does), else the source gone."""
        if self.connections.main is not None:
            shutdown_quietly(self.connections.main)     # (TLS) the relay ends once it is shut
            failure = self.greeter.relay_failure()
            if failure is not None:
                return failure
        return closed_early(exc)

    def _recv_main(self, n: int) -> bytes:
        """Up to ``n`` bytes of the main channel, serving everything else while none
        come; b"" at its end; none for ``stall`` seconds fails. Watched only here: its
        unread bytes would end every other wait at once (a barrier's wait for SYNCs spun,
        taking a core from its channels); nor does a wait see a cancel while they wait:
        checked here, once a read (3.5 MiB of records held one for 2.8 s)."""
        self._check_cancel()
        deadline = time.monotonic() + self.stall
        main = self.connections.main
        assert main is not None, "run() waited for it"
        while True:
            try:
                return main.recv(n, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise MigrationError(f"reading failed: {exc.strerror or exc}",
                                     channel=MAIN) from None
            self._main_readable = False
            self.watch.add(main, self._on_main_readable)
            try:
                while not self._main_readable:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise MigrationError(f"no data for {self.stall:g} s" + stopped_note(
                            self.channels.values()), channel=MAIN)
                    self.watch.poll(left)
            finally:
                self.watch.remove(main)

    def _on_main_readable(self) -> None:
        self._main_readable = True

    # ------------------------------------------------------------ connections
    def _take_worker(self) -> Child:
        """A spare receive worker, or one started now (its first report: Ready)."""
        if self.spares:
            return self.spares.pop()
        assert self.workers is not None, "open until close()"
        return self.workers.spawn(qemu_recv_worker_main, "receive worker")

    def _set_aside(self, channel: QemuChannel) -> None:
        """A worker for a connection that sent a good init packet (in TLS, the
        one that greeted it holds it already), reporting to the channel."""
        self._check_memory(channel)
        if channel.worker is None:
            channel.ready = bool(self.spares)
            channel.worker = self._take_worker()
        worker = channel.worker
        self.watch.add_child(worker, lambda report: self._on_report(channel, report))

    def _check_memory(self, channel: QemuChannel) -> None:
        """Under max_memory, QEMU's channels so far (this one's init packet read) and
        the worker processes alive, before its worker starts (in TLS, the one that
        greeted it is counted, as it was to greet it: :meth:`_no_room`); a refusal
        fails the migration, as blocks that do not fit do."""
        if self.max_memory is None or self.workers is None:
            return
        workers = self._alive() + (channel.worker is None and not self.spares)
        try:
            check_qemu_channels(self.max_memory, len(self.connections.candidates), workers,
                                QEMU_PACKET_BYTES, self.facts.page_size, self.greeter.tls)
        except ConfigError as exc:
            raise MigrationError(str(exc), channel=f"multifd channel {channel.id}") from exc

    def _alive(self) -> int:
        """The receive workers alive: started, and not dismissed (in TLS)."""
        assert self.workers is not None, "open until close()"
        return len(self.workers) - self.greeter.released

    def _no_room(self, greeting: int) -> str | None:
        """In TLS under max_memory, why one connection more may not be greeted beside
        the ``greeting`` being greeted (memory_bound.qemu_greeting_refusal; None: it
        may): until the main channel is told apart, one of them is counted as it (QEMU
        connects it first), a worker with no buffers; idle workers beyond one are let
        go while it does not fit (one greets with no new process)."""
        while self.max_memory is not None:
            channels = (len(self.channels) + len(self.connections.candidates) + greeting + 1
                        - (self.connections.main is None))
            why = qemu_greeting_refusal(self.max_memory, channels,
                                        self._alive() + (not self.spares), QEMU_PACKET_BYTES,
                                        self.facts.page_size)
            if why is None or len(self.spares) < 2:
                return why
            self.greeter.dismiss(self.spares.pop())
        return None

    def _close_door(self, uuid: bytes | None) -> None:
        """The setup section ended: every channel QEMU opened has connected and sent
        its init packet (its setup SYNC came before the EOS). Choose them, count
        them and start them; ``uuid``: the main channel's, if its configuration said."""
        connections = self.connections
        connections.count()
        uuid = self.facts.uuid = migration_uuid(connections.candidates,
                                                connections.main_arrival, uuid)
        self.channels, strangers = choose_channels(connections.candidates,
                                                   connections.main_arrival, uuid)
        for channel, why in strangers:
            self._drop(channel, why)
        connections.candidates = []
        connections.uuid = uuid
        n = len(self.channels)
        if n == 0:
            raise ProtocolError("no multifd channel connected before the RAM setup section "
                                "ended: the source needs the multifd capability",
                                field="channels", received=0, expected=">= 1", where=MAIN)
        if sorted(self.channels) != list(range(n)):
            raise ProtocolError(f"multifd channel ids {sorted(self.channels)}, expected 0..{n - 1}",
                                field="id", received=sorted(self.channels),
                                expected=list(range(n)), where=MAIN)
        self.facts.channels = n
        log.info("%d multifd channels counted at the setup section's end (uuid %s)", n,
                 uuid.hex() if uuid is not None else "none")
        for channel in self.channels.values():
            tune_data_socket(channel.sock)
            assert channel.worker is not None, "set aside with its channel"
            channel.worker.name = f"multifd channel {channel.id}"
            self._start_channel(channel)

    def _drop(self, channel: QemuChannel, why: str) -> None:
        """A connection that sent a good init packet before the main channel came,
        but is not one of QEMU's."""
        log.warning("a connection sent the init packet of multifd channel %d (uuid %s) before "
                    "the main channel came, but %s: not QEMU's, dropped", channel.id,
                    channel.uuid.hex(), why)
        channel.sock.close()
        assert channel.worker is not None, "set aside with its channel"
        self.greeter.dismiss(channel.worker)

    # ------------------------------------------------------------ RAM
    def on_blocks(self, blocks: dict[str, int], page_size: int) -> None:
        """The block list: one sparse .part file each, then every channel may start."""
        self.facts.blocks = dict(blocks)
        self.facts.page_size = page_size
        try:
            self.out.plan_qemu(blocks, page_size)
            for name, size in blocks.items():
                self.regions[name] = self.out.region(name, size, page_size)
            self.counters = _core.Counters.create(MAX_CHANNELS, tag="qemu-counters")
        except ConfigError as exc:
            # Blocks this side refuses or cannot hold (no room, a name taken, no
            # shared memory) fail the migration, as a SETUP fastmfd's own listener
            # refuses does: a session tried, not a mistake in the command (exit 1).
            raise MigrationError(str(exc), channel=MAIN) from exc

    def _start_channel(self, channel: QemuChannel) -> None:
        if not channel.ready:
            channel.starting = True         # its Ready will start it (_on_report)
            return
        regions = list(self.regions.values())
        page_size = self.facts.page_size
        assert self.counters is not None, "made with the block list, before any start"
        params = RecvParams(
            channel=channel.id, page_size=page_size,
            packet_pages=QEMU_PACKET_BYTES // page_size, checksum=False, chunk_size=0,
            compression="none", regions=tuple(r.handle for r in regions), devices=(),
            counters=self.counters.name, pool=None, ram=True,
            received=tuple(r.dirty.name for r in regions), fresh=tuple(True for _ in regions),
            layout=_core.LAYOUT_QEMU72, learn_compression=True,
            sparse=tuple(self._sparse(r) for r in regions),
            place=tuple(places_pages(r, True) for r in regions))
        assert channel.worker is not None, "started with its channel"
        self.greeter.start(channel.worker, params, channel.sock)

    def on_page(self, block: str, offset: int, page: memoryview) -> None:
        """A PAGE record, or a ZERO record of a fill byte other than 0."""
        region = self.regions[block]
        self.facts.main_pages += 1
        # The block file is sparse: where its disk is full, a plain write into
        # the mapping would be a SIGBUS; populating says so first (on Linux >=
        # 5.14; older kernels have no MADV_POPULATE_WRITE). Released at once:
        # an error's traceback would keep the view, and the file mapped.
        with region.buffer[offset:offset + len(page)] as target:
            _core.populate(target, f"block {block}")
            target[:] = page
        region.dirty.mark(offset // region.page_size)

    def on_zero_pages(self, block: str, offsets: np.ndarray) -> None:
        """ZERO records. A zero page stays a hole unless this migration wrote data
        there before (a page re-sent as zero in a later round): then it is made
        one again, as the receive workers do with the pages QEMU >= 9.0 lists."""
        region = self.regions[block]
        self.facts.zero_pages += len(offsets)
        pages = region.dirty.marked(offsets // np.uint64(region.page_size))
        if len(pages):
            _core.clear_pages(region.buffer, pages * np.uint64(region.page_size),
                              region.page_size, self._sparse(region), region.dirty,
                              f"block {block}")

    @staticmethod
    def _sparse(region: Region) -> bool:
        """A block file whose cleared pages become holes: not a warm file (faulted
        in, its blocks allocated on purpose) nor one of huge pages (a hole would
        split one)."""
        return not region.faulted_in and not region.huge_pages

    def on_sync(self, uuid: bytes | None) -> None:
        """RAM barrier: every channel sent its SYNC for it; let them on. ``uuid``:
        what the main channel's configuration said, if it did."""
        facts = self.facts
        if not self.regions:
            raise ProtocolError("main channel: a SYNC barrier (EOS or MULTIFD_FLUSH) before "
                                "the block list (MEM_SIZE)", field="flags", received="EOS",
                                expected="MEM_SIZE first", where=MAIN)
        facts.syncs += 1
        if facts.syncs == 1:
            self._close_door(uuid)
        k = facts.syncs
        deadline = time.monotonic() + self.stall
        while late := [c for c in self.channels.values() if c.synced < k]:
            ended = [c.id for c in late if c.ended]
            if ended:
                raise MigrationError(f"the source closed it before its SYNC for barrier {k} "
                                     f"{SOURCE_GONE}", channel=f"multifd channel {ended[0]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise late_sync_error(late, k, self.stall)
            self.watch.poll(left)
        for channel in self.channels.values():
            # Held at its SYNC until Go: no page moves its count meanwhile.
            channel.pages_at_sync = self._pages(channel)
            assert channel.worker is not None, "started with its channel"
            channel.worker.send(Go(k))

    def _on_report(self, channel: QemuChannel, report: object) -> None:
        if isinstance(report, Ready):
            channel.ready = True
            if channel.starting:
                self._start_channel(channel)
        elif isinstance(report, Synced):
            if self.stream_ended:
                raise ProtocolError(f"SYNC {report.round} after the stream's end (its last "
                                    f"barrier: {self.facts.syncs})", field="SYNC",
                                    received=report.round, expected="no more",
                                    where=f"multifd channel {channel.id}")
            if report.round > self.facts.syncs + 1:
                raise ProtocolError(f"SYNC {report.round} before the main channel's barrier "
                                    f"{self.facts.syncs + 1}", field="SYNC",
                                    received=report.round, expected=self.facts.syncs + 1,
                                    where=f"multifd channel {channel.id}")
            channel.synced = report.round
            channel.compression = report.compression
        elif isinstance(report, Eof):
            channel.ended = True

    # ------------------------------------------------------------ the end
    def _save_vmstate(self, reader: StreamReader) -> None:
        """The rest of the main channel, from its first device section to its end,
        into vmstate.bin, checked to end as a QEMU stream ends.

        Its end is the VM description's last byte, where QEMU's destination
        completes, not the connection's end (QEMU's source closes it in its
        cleanup: waiting took 4.5-23.3 ms of each 1 GiB migration, 8 channels).
        A chunk ending as the stream may (``}``) is checked as the end; so is
        the connection's end."""
        fd = self.out.stream("vmstate")
        try:
            chunk: bytes | memoryview = reader.since(self.facts.ram_bytes)
            total = 0
            while chunk:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                total += len(chunk)
                if chunk[-1] == JSON_END and self._check_end(fd, total, final=False):
                    break
                chunk = self._recv_main(COPY_CHUNK)
            else:               # the connection ended
                try:
                    if not total:
                        raise ProtocolError("main channel ended after the RAM section "
                                            "(truncated?)", field="QEMU_VM_EOF",
                                            received="end of stream",
                                            expected="device sections", where=MAIN)
                    self._check_end(fd, total, final=True)
                except ProtocolError as exc:
                    if exc.field != "QEMU_VM_EOF":
                        raise       # the end is there, what stands in it is wrong
                    raise self._closed_early(exc) from exc
            os.fsync(fd)
            self.facts.vmstate_bytes = total
        except OSError as exc:      # a full disk: as a block file's (_flush)
            raise MigrationError(f"the device state (vmstate.bin): writing it to disk failed: "
                                 f"{exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    def _check_end(self, fd: int, size: int, final: bool) -> bool:
        """Whether the ``size`` bytes of vmstate.bin (``fd``) end as a QEMU stream
        ends, with a VM description of this stream's page size (kept in the
        facts); ``final``: they must, or the error says why not."""
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
            tail = ByteReader(f"{MAIN} (device sections from byte {self.facts.ram_bytes})",
                              data)
            try:
                self.facts.vm_devices = check_stream_end(tail, 0, self.facts.page_size)
                return True
            except ProtocolError:
                if final:
                    raise
                return False
            finally:
                tail.view.release()

    def _end_channels(self) -> None:
        """The stream has ended: every channel sent one SYNC per barrier (the main
        channel waited for each) and nothing after its last, with one
        compression method. QEMU closes the channels later, in its cleanup, so
        each is shut for reading here: its worker, past its last SYNC, reads
        what has come and ends (Eof). Once all have, nothing writes into the
        files any more: only then may they be committed. The workers then hold
        until close(): their teardown (unmapping, exiting), when they were let
        go here, held up the files' fsync by up to 7 ms (8 channels, 2 cores).
        (A 7.2 source may write an empty packet after a SYNC, racing its main
        channel's end; one only partly here when the channel is shut would
        fail the migration. It follows the SYNC at once, the main channel's
        end comes after the device state: not seen in any run.)"""
        self.stream_ended = True
        self._check_syncs()
        for channel in self.channels.values():
            assert channel.worker is not None, "started with its channel"
            channel.worker.explain_failure = lambda: STILL_SENDING
            shutdown_quietly(channel.sock, socket.SHUT_RD)
        deadline = time.monotonic() + self.stall
        while running := [c for c in self.channels.values() if not c.ended]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"its worker did not end within {self.stall:g} s of "
                                     "the stream's end",
                                     channel=f"multifd channel {running[0].id}")
            self.watch.poll(left)
        for channel in self.channels.values():
            # QEMU 7.2 may send an empty packet after a SYNC (spec 2.6), never a page.
            after = self._pages(channel) - channel.pages_at_sync
            if after:
                raise ProtocolError(f"{after} pages after its last SYNC (the stream had "
                                    "ended)", field="SYNC", received=after, expected=0,
                                    where=f"multifd channel {channel.id}")

    def _pages(self, channel: QemuChannel) -> int:
        assert self.counters is not None, "channels start with the block list"
        counts = self.counters.read(channel.id)
        return int(counts["normal_pages"] + counts["zero_pages"])

    def _check_syncs(self) -> None:
        """One SYNC per barrier from every channel (a SYNC after the stream's end
        fails as it is reported), and one compression method (the facts')."""
        for channel in self.channels.values():
            if channel.synced != self.facts.syncs:
                raise ProtocolError(f"{channel.synced} SYNC packets, expected "
                                    f"{self.facts.syncs}: one per barrier of the main channel",
                                    field="SYNC", received=channel.synced,
                                    expected=self.facts.syncs,
                                    where=f"multifd channel {channel.id}")
        methods = {c.compression for c in self.channels.values() if c.compression}
        if len(methods) > 1:
            raise ProtocolError(f"channels used different compression: {sorted(methods)}",
                                field="flags", received=sorted(methods),
                                expected="one method")
        self.facts.compression = methods.pop() if methods else None

    def _flush(self, check_cancel: Callable[[], None]) -> None:
        for name, region in self.regions.items():
            try:
                region.flush(between=check_cancel)      # (a large file, a slow disk)
                self.out.fsync_part(name)
            except OSError as exc:
                raise MigrationError(f"RAMBlock {name!r}: writing it to disk failed: "
                                     f"{exc.strerror or exc}") from exc

    def channel_stats(self) -> list[dict[str, int]]:
        assert self.counters is not None, "after the block list"
        return [{"channel": ch, **self.counters.read(ch)} for ch in sorted(self.channels)]

    def close(self) -> None:
        """Stop everything and free it (every exit path; idempotent)."""
        self.answers.refuse()                       # (after confirm(): nothing)
        socks = [*self.connections.sockets(), *(c.sock for c in self.channels.values())]
        for sock in socks:
            shutdown_quietly(sock)
        try:
            if not self.greeter.drain() and self.answers.confirmed:
                log.warning("the SHUT 0 said may not have reached the source: %s",
                            SOURCE_NOT_TOLD)
        finally:
            if self.workers is not None:
                self.workers.kill()
                self.workers.stop(0)
                self.workers = None
        for sock in socks:
            sock.close()
        self.connections.forget()
        for region in self.regions.values():
            region.close()
        self.regions = {}
        if self.counters is not None:
            self.counters.close()
            self.counters = None
