"""One migration into a real QEMU destination (7.2, or 10.x with any machine
type) from saved RAM and device state: the source's side of QEMU's own
protocol, with fastmfd's send workers.

::

    QemuSending.run()                                     send workers (1 process / channel)
      main channel: QEVM, the saved CONFIGURATION, the RAM
        section's START and block list (saved COMMAND sections
        go back where they sat: before it, before the END, or
        before the device sections)
      each multifd channel connects after the main one
        (a 7.2 destination takes the first for main) ──▶  init packet (the saved UUID, id)
      SYNC on every channel; [MULTIFD_FLUSH] EOS (setup)   SYNC packet
      RAM END section: the pages in jobs through the
        selector (zero pages: ZERO records here, or ───▶  SendEngine: qemu-7.2 packets, or
        listed by the workers)                              current ones listing zero pages
      SYNC on every channel; [MULTIFD_FLUSH] EOS
      the saved device sections (vmstate.bin), verbatim
      QUIT: every worker drains, half-closes; Done ◀───
      the main channel half-closed: the destination loads and completes

The saved stream's flavour decides the bracketed parts (spec §4.4, §5.3): a
stream that synced per section (7.2; machine types <= 8.0) has no
MULTIFD_FLUSH and its destination waits for the SYNCs at each EOS; one that
synced per round (machine types >= 8.1) has a MULTIFD_FLUSH where its
destination waits. Zero pages go as the source sent them: ZERO records on the
main channel (zero-page-detection "legacy", all a 7.2 destination reads) or
listed in the multifd packets ("multifd", QEMU >= 9.0).

The main channel opens a return path (qemu_return_path), as a QEMU source
with ``return-path`` does: the send is done only at the destination's SHUT 0,
its word that it loaded the whole stream. A destination that is not the saved
stream's QEMU and machine type closes its connections, and the error names
what the saved stream needs.

With ``tls`` (QEMU's ``tls-creds``), every connection is a TLS session of its
own, as a QEMU source makes them: the main channel's, done here before any
multifd channel connects (a destination takes the first handshake to complete
for its main channel), and each multifd channel's in its worker, which ends it
with close_notify at QUIT (QEMU 10 expects one).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time

import numpy as np

from .. import _core
from ..errors import FastMFDError, MigrationError, SecurityError
from ..protocol.control import Done, SendParams
from ..protocol.qemu import QEMU_PACKET_BYTES
from ..protocol.qemu_encoding import (encode_multifd_flush, encode_ram_end_start,
                                      encode_ram_eos, encode_ram_start, encode_stream_start,
                                      encode_zero_records)
from ..protocol.security import ChannelSecurity, TLSConfig, tls_connect
from ..protocol.sockets import Address, connect, decrypted_unread, peer_address, tune_data_socket
from ..regions import Region
from ..shm import SharedMemory
from .cancelling import FirstError
from .liveness import Progress, process_stopped, set_stall_timeout, stall_error, tick
from .processes import Child, ChildSet
from .qemu_return_path import ReturnPathWatch
from .qemu_stream import QemuStream
from .session import Closable, Owned, shutdown_quietly
from .workers import send_worker_main

__all__ = ["QemuSending"]

JOB_PACKETS = 4                     # packets per job handed to a worker
SCAN_PAGES = 1 << 14                # pages scanned for zeros at a time (64 MiB of 4 KiB)
MAIN = "main channel"
# How long a channel's failed connection waits for the main channel's word (a
# SHUT 1 the destination said before it stopped taking connections).
MAIN_WORD_GRACE = 1.0


class Hinted(MigrationError):
    """A failure that says what to check on the destination (_checklist): run() adds none."""


class QemuSending:
    """The state of one migration into QEMU (see the module docstring)."""

    def __init__(self, stream: QemuStream, regions: list[Region],
                 block_fds: list[int], vmstate_fd: int, *, channels: int, compression: str,
                 level: int, stall_timeout: float, connect_timeout: float,
                 channel_rate: float, tls: TLSConfig | None = None) -> None:
        self.stream, self.regions = stream, regions
        self.tls = tls                  # QEMU's tls-creds: each connection in TLS
        self.block_fds = block_fds      # each region's file, read-only: where its holes are
        self.vmstate_fd = vmstate_fd
        self.channels, self.compression, self.level = channels, compression, level
        self.stall, self.connect_timeout = stall_timeout, connect_timeout
        self.channel_rate = channel_rate        # bytes/s each channel may send (0: no cap)
        self.page_size = regions[0].page_size
        self.job_pages = QEMU_PACKET_BYTES // self.page_size * JOB_PACKETS
        self.main: socket.socket | None = None     # an ssl.SSLSocket with TLS
        self.answers: ReturnPathWatch | None = None     # the destination's, on it
        self._order = FirstError()          # of a cancel and a failure: what run() raises
        self._sent_whole = False            # the stream all sent: the destination loads it
        self._connecting: socket.socket | None = None   # a connection being made
        self._progress = Progress(stall_timeout)    # each busy channel's packets
        self._looked = 0.0                  # when the workers were last looked at
        self.data: list[socket.socket] = []
        self.cmd_fds: list[int] = []
        self.owned: list[Closable] = []
        self.workers = ChildSet(send_worker_main,
                                [f"multifd channel {ch}" for ch in range(channels)])
        try:
            self.counters = self._own(_core.Counters.create(channels, tag="qemu-counters"))
            self.selector = self._own(_core.ChannelSelector.create(channels))
            self.mailbox_shm = self._own(SharedMemory.create(channels * self.job_pages * 8,
                                                             tag="mailbox"))
            self.mailbox = np.ndarray((channels, self.job_pages), dtype=np.uint64,
                                      buffer=self.mailbox_shm.buf)
        except BaseException:   # (a full /dev/shm): the workers and segments made so far
            self.close()
            raise

    def _own(self, resource: Owned) -> Owned:
        self.owned.append(resource)
        return resource

    # ------------------------------------------------------------ the session
    def run(self, address: Address) -> None:
        """Migrate into the QEMU listening at ``address`` (once)."""
        try:
            self._run(address)
        except Exception as exc:
            # First error wins, as a Source's SessionFailure orders a cancel and a
            # failure: what failed after the cancel is most likely its consequence
            # (its sockets shut); a cancel that meets the send failing already only
            # ends its waits, and the failure is what the user reads.
            first = self._failing(exc)
            if first is self.cancelled:
                raise self._cancel_error() from (None if exc is first else exc)
            if exc is self.cancelled:       # a step found the cancel, after the failure
                exc = first
            if (not isinstance(exc, MigrationError) or self.main is None
                    or isinstance(exc, Hinted) or self._ours()):
                raise exc       # no QEMU listening at all, a hint is there, or it is ours
            if exc.channel not in (None, MAIN) and self._loaded_regardless():
                raise MigrationError(exc.cause + self._unheard(exc.channel), channel=exc.channel,
                                     device=exc.device, side=exc.side) from exc
            # The destination dropped the stream (it says why only in its own log; a QEMU >= 8.0
            # reads the main channel at once, and may have closed its listener before the multifd
            # channels came): name what the stream needs. Or it died: one killed mid-migration
            # closes its connections too (and was only asked about its kind, as if it could not
            # have gone). (Cancelled since, this side shut the main channel: its end says nothing.)
            hint = self._hint(dropped=self.cancelled is None and self._main_ended() is not None)
            raise MigrationError(exc.cause + hint, channel=exc.channel,
                                 device=exc.device, side=exc.side) from exc

    def cancel(self, reason: str) -> None:
        """Fail run() from another thread, at once: every wait of it ends (its
        sockets shut, which fails the destination's migration; the selector
        aborted), each step checks, and it raises MigrationError(``reason``)."""
        self._order.cancel(reason)
        for sock in [self._connecting, self.main, *self.data]:
            if sock is not None:
                shutdown_quietly(sock)      # (one connecting: its connect() ends)
        try:
            self.selector.abort()
        except ValueError:      # closed: freed by a close() from another thread, unused
            pass

    @property
    def cancelled(self) -> MigrationError | None:
        """cancel()'s error, once cancelled (from another thread)."""
        return self._order.cancelled

    def _failing(self, exc: Exception) -> Exception:
        """Record ``exc`` as the send's failure, unless a cancel or a failure came
        first; the first. A failure's path that waits (for the destination's word,
        a worker's exit) records it before it waits, where a cancel may meet it."""
        return self._order.record(exc)

    def _cancel_error(self) -> MigrationError:
        """What a cancel that came first raises: its reason, and once the stream was
        all sent, that the destination may have loaded it and run the guest."""
        assert self.cancelled is not None, "cancelled"
        if not self._sent_whole:
            return self.cancelled
        return MigrationError(f"{self.cancelled.cause} after the stream was sent whole: whether "
                              "the destination loaded it is unknown (it had not said; it may "
                              "have, and may run the guest: query-migrate on it tells)")

    def _check_cancelled(self) -> None:
        if self.cancelled is not None:
            raise self.cancelled

    def _connecting_now(self, sock: socket.socket) -> None:
        """connect()'s ``connecting``: a cancel shuts it down (its connect(), or the
        TLS handshake after it, ends at once); one before it never connects."""
        self._connecting = sock
        self._check_cancelled()

    def _run(self, address: Address) -> None:
        stream, section = self.stream, self.stream.ram_section_id
        footer = stream.section_footers
        # Where the destination waits for the SYNCs: a MULTIFD_FLUSH, or the EOS.
        barrier = encode_multifd_flush() if stream.per_round else b""
        security = ChannelSecurity.of_source(self.tls, address.target, address.family,
                                             timeout=self.stall)
        self._check_cancelled()             # (a QEMU takes one migration: none is begun)
        self.main = self._connect(address, security)
        reached = peer_address(self.main, address)    # the channels connect there too
        self._check_cancelled()             # (came as it connected: shut after)
        self.main.settimeout(self.stall)
        self.answers = ReturnPathWatch(self.main)
        commands = stream.commands
        self._main(encode_stream_start(stream.configuration) + self.answers.opening()
                   + commands["ram"]
                   + encode_ram_start(section, {r.name: r.size for r in self.regions}))
        for ch, worker in enumerate(self.workers):
            self._open_channel(reached, ch, worker, security)
        self._sync()
        self._main(barrier + encode_ram_eos(section, footer) + commands["ram-end"]
                   + encode_ram_end_start(section))
        for index, region in enumerate(self.regions):
            self._send_region(index, region)
        self._sync()
        self._main(barrier + encode_ram_eos(section, footer) + commands["devices"])
        while chunk := os.read(self.vmstate_fd, 1 << 20):     # the saved device sections
            self._main(chunk)
        self._sent_whole = True
        for ch in range(self.channels):
            self._command(ch, _core.pack_command(_core.CMD_QUIT))
        self._wait_done()
        self._wait_loaded()

    def _connect(self, address: Address, security: ChannelSecurity) -> socket.socket:
        """The main channel's connection: with TLS, its handshake done (QEMU's
        destination takes the first connection whose handshake completes for
        its main channel, spec §7: the multifd channels connect after it)."""
        main = connect(address, self.connect_timeout, self._connecting_now)
        if security.tls is None:
            return main
        # The SSLSocket takes the connection from ``main`` (detached, it can no
        # longer be shut): a cancel shuts this copy of it, kept until close(), which
        # ends the handshake (it waited for the handshake's end, up to the timeout).
        # Checked once it is there: a cancel that took its sockets before saw ``main``.
        try:
            self._connecting_now(self._own(main.dup()))
        except MigrationError:
            main.close()
            raise
        try:
            return tls_connect(main, security, time.monotonic() + self.connect_timeout,
                               self.connect_timeout, MAIN)
        except SecurityError as exc:
            hint = ("its tls-creds' certificate must chain to this side's ca and carry the name "
                    "checked: the address's host, or hostname" if exc.unverified else
                    "has the destination QEMU tls-creds, set with migrate-set-parameters before "
                    "migrate-incoming, whose CA issued this source's certificate?")
            raise SecurityError(f"{exc.cause} ({hint})", channel=MAIN) from None

    def _wait_loaded(self) -> None:
        """End the stream, then wait for the destination's SHUT, or the end of the
        main channel: a QEMU says SHUT 0 once it has loaded the stream, SHUT 1
        (QEMU 10) or nothing (7.2) when it failed to, and closes the connection. One
        that failed midway closes with bytes of the stream unread, which resets
        the connection. Only SHUT 0 is success: a QEMU that failed at the last
        bytes, having read them all, closed as one that had loaded them (the
        send said it succeeded while QEMU exited, "load of migration failed").
        Nothing follows SHUT, so the connection's end is not waited for after it
        (QEMU's source does not wait for it either): fastmfd's QemuReceiver ends
        it only at its close(), and the send failed at its stall timeout though
        the files were committed."""
        assert self.main is not None and self.answers is not None, "connected by run()"
        # One deadline for the whole wait: a peer that sends a byte now and then
        # must not restart it.
        deadline = time.monotonic() + self.stall
        try:
            # The stream's end, for a reader that reads to it: QEMU stops at its
            # VM description. With TLS it is left out: an SSLSocket sends no
            # close_notify alone (unwrap() waits for the peer's, dropping the SHUT).
            if self.tls is None:
                try:
                    self.main.shutdown(socket.SHUT_WR)
                except OSError:     # reset already: what it said first is still to read
                    pass
            while self.answers.said is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.main.settimeout(left)
                if not (data := self.main.recv(1 << 16)):
                    break
                self.answers.feed(data)
        except TimeoutError:
            raise MigrationError(f"the destination did not end the stream within "
                                 f"{self.stall:g} s of its last byte", channel=MAIN) from None
        except OSError as exc:
            if self.answers.said is None:       # a SHUT read before the reset is the cause
                raise MigrationError(f"the destination broke the connection before it read "
                                     f"the whole stream ({exc.strerror or exc}): its load "
                                     "failed", channel=MAIN) from None
        # (What the destination did is said: the hint does not say it again.)
        if self.answers.said is None:
            raise Hinted("the destination closed the connection without saying it had loaded "
                         "the stream (no SHUT on its return path): its load failed"
                         + self._hint(True, said=True), channel=MAIN)
        if self.answers.said:
            raise Hinted(f"the destination said it failed to load the stream (SHUT "
                         f"{self.answers.said} on its return path)"
                         + self._hint(True, said=True), channel=MAIN)

    def _open_channel(self, address: Address, ch: int, worker: Child,
                      security: ChannelSecurity) -> None:
        self._check_cancelled()
        try:
            sock = connect(address, self.connect_timeout, self._connecting_now)
        except MigrationError as exc:
            self._failing(exc)
            self._check_cancelled()
            # A destination that failed at the stream's start says SHUT 1, then takes
            # no more connections (or resets them): its word is the cause.
            self._await_main_word()
            raise
        self.data.append(sock)
        self._check_cancelled()             # (came as it connected: shut after)
        tune_data_socket(sock)
        if security.tls is None:
            sock.settimeout(self.stall)
        else:
            # The worker's OpenSSL writes to the socket as it is: blocking, a write
            # that moves nothing for the stall timeout failing (the kernel's
            # deadline), as on fastmfd's own channels (O_NONBLOCK: at once).
            set_stall_timeout(sock, self.stall)
        hello = bytearray(_core.INIT_PACKET_SIZE)
        _core.encode_init_packet(hello, self.stream.uuid, ch)
        cmd_r, cmd_w = os.pipe()
        self.cmd_fds.append(cmd_w)
        zeros_listed = self.stream.zeros_in_packets
        params = SendParams(
            channel=ch, page_size=self.page_size,
            packet_pages=QEMU_PACKET_BYTES // self.page_size, checksum=False, chunk_size=0,
            compression=self.compression, regions=tuple(r.handle for r in self.regions),
            devices=(), counters=self.counters.name, pool=None, hello=bytes(hello),
            uuid=self.stream.uuid, security=security,
            compression_level=self.level, zero_page_detection=zeros_listed,
            rate=self.channel_rate,
            # A QEMU destination on this host loads the stream in one thread (7.2:
            # each ZERO record in its main thread, after the pages): workers beside
            # it at its own priority held that thread off the CPU until they were done.
            yield_cpu=True,
            holes_listed=True,              # _send_region learns them (FileHoles)
            mailbox=self.mailbox_shm.name, mailbox_row=ch, job_pages=self.job_pages,
            selector=self.selector.name, selector_index=ch,
            layout=_core.LAYOUT_CURRENT if zeros_listed else _core.LAYOUT_QEMU72)
        try:
            worker.start_session(params, [sock.fileno(), cmd_r])
        finally:
            os.close(cmd_r)

    def _sync(self) -> None:
        """One SYNC on every channel, once each is done with its jobs (the EOS
        that follows on the main channel is where QEMU waits for them)."""
        for ch in range(self.channels):
            self._command(ch, _core.pack_command(_core.CMD_SYNC))

    def _send_region(self, index: int, region: Region) -> None:
        """The region's zero pages as ZERO records, the others to the channels; a
        slice at a time, so the channels start while the rest is learnt. With
        zero pages listed in the packets, every page goes to the channels, whose
        workers tell the zero ones apart as they frame them.

        The pages in the holes of the region's file (a saved block file is
        sparse: its zero pages are holes) are zero pages known unread: reading
        them would fault in every one, and on tmpfs allocate it, filling the
        saved file; the workers are told they are zero (KNOWN_ZERO_PAGE). The
        ZERO records are the holes alone: the rest of the file is what the
        saved stream's source sent as pages, and goes as pages again, unread
        here (a 7.2 source finds every zero page itself, so none of it is zero;
        scanning it, through a mapping nothing else reads, made this process
        take 0.21-0.24 CPU-s per GiB against 0.05-0.07 without it)."""
        holes = _core.FileHoles(self.block_fds[index])
        for first in range(0, region.npages, SCAN_PAGES):
            count = min(SCAN_PAGES, region.npages - first)
            pages = np.arange(first, first + count, dtype=np.uint64)
            if self.stream.zeros_in_packets:
                unread = holes.zero_pages(region.buffer, self.page_size, first, count)
                pages[(unread - np.uint64(first)).astype(np.intp)] |= np.uint64(
                    _core.KNOWN_ZERO_PAGE)
                self._dispatch(index, pages)
                continue
            zero = holes.zero_pages(region.buffer, self.page_size, first, count)
            self._main(encode_zero_records(region.name, zero * np.uint64(self.page_size)))
            self._dispatch(index, np.setdiff1d(pages, zero, assume_unique=True))

    def _dispatch(self, index: int, pages: np.ndarray) -> None:
        for start in range(0, len(pages), self.job_pages):
            count = min(self.job_pages, len(pages) - start)
            ch = self._idle_channel()
            self.mailbox[ch, :count] = pages[start:start + count]
            self._command(ch, _core.pack_command(_core.CMD_RAM, index, count))

    def _ours(self) -> bool:
        """Whether a worker of this side was killed (by a signal), failed on an error of
        this host's own (ENOMEM under a memory limit: Failed.local) or is stopped: the
        failure is this side's, and the destination's checklist would only mislead."""
        return any((worker.exitcode or 0) < 0 or worker.failed_locally
                   or process_stopped(worker.process.pid) for worker in self.workers)

    def _check_progress(self) -> float:
        """At most once a tick: a worker that died, or that holds a job without finishing a
        packet for the stall timeout (stopped; else its peer took nothing: said as a wait
        for a channel says it), fails the send now, not once the rest went out through the
        other channels (a review: 11-20 s for 64 MiB). Returns the seconds to the next look."""
        now = time.monotonic()
        if now < self._looked + tick(self.stall):
            return self._looked + tick(self.stall) - now
        self._looked = now
        self._check_workers()
        for ch, worker in enumerate(self.workers):
            pid = worker.process.pid
            busy = self.selector.is_busy(ch) or process_stopped(pid)
            if self._progress.stalled(ch, busy, tuple(self.counters.read(ch).values()), now):
                raise stall_error(worker.name, self.stall, pid, self._stalled_hint(), Hinted)
        return tick(self.stall)

    def _idle_channel(self) -> int:
        """The next channel to take a job, waited for up to the stall timeout, to
        each look at the workers and the main channel (a tick apart): only a worker
        that finishes a job frees one, and a failed one (the destination died) never
        will. (The whole stall timeout at once failed a SIGKILLed destination's send
        only after it, 30 s; a tick at a time, a look skipped as a channel freed came
        a tick late: a stopped worker was seen 1.5 s past its deadline.)"""
        deadline = time.monotonic() + self.stall
        while True:
            look = self._check_progress()
            left = deadline - time.monotonic()
            ch = self.selector.select(timeout=max(0.0, min(left, look)))
            if ch is not None:
                return int(ch)
            self._check_workers()
            self._check_main_open()
            if left <= look:                # (the wait reached the deadline)
                raise Hinted(f"no multifd channel took work for {self.stall:g} s"
                             + self._stalled_hint())

    def _await_main_word(self, shut_only: bool = False) -> None:
        """Give the main channel MAIN_WORD_GRACE seconds to end (SHUT, or its
        connection's end), and raise how it did if it does (``shut_only``: if it
        said a SHUT; its end alone may be the consequence of a failure here)."""
        assert self.main is not None, "connected by run()"
        if not decrypted_unread(self.main):
            select.select([self.main], [], [], MAIN_WORD_GRACE)
        if self.cancelled is not None:
            return          # shut by the cancel: its end would be this side's doing
        if shut_only:
            self._check_shut()
        else:
            self._check_main_open()

    def _check_shut(self) -> None:
        """Raise the SHUT the destination said before the stream's end, if it did."""
        if self.answers is not None and self._main_ended() is not None and self.answers.said:
            self._check_main_open()

    def _check_main_open(self) -> None:
        """Raise if the destination closed or reset the main channel."""
        ended = self._main_ended()
        if ended is not None:
            raise Hinted(ended + self._hint(True, said=True), channel=MAIN)

    def _main_ended(self) -> str | None:
        """How the destination ended the main channel, if it did (ReturnPathWatch.ended)."""
        assert self.answers is not None, "connected by run()"
        return self.answers.ended()

    def _loaded_regardless(self) -> bool:
        """Whether the destination said SHUT 0 (it loaded the stream) though a multifd channel
        failed: given MAIN_WORD_GRACE to say it, once the stream was sent whole."""
        if not self._sent_whole or self.cancelled is not None:
            return False
        assert self.main is not None and self.answers is not None, "connected by run()"
        if self.answers.said is None and not decrypted_unread(self.main):
            select.select([self.main], [], [], MAIN_WORD_GRACE)
        return self._main_ended() is not None and self.answers.said == 0

    def _unheard(self, channel: str) -> str:
        """Why a destination that loaded the stream lost a channel: a QEMU (7.2, 10) ignores
        those beyond its multifd-channels, and what was sent on them, unknowing (a review)."""
        return (f": the destination QEMU reports the stream loaded (SHUT 0), but what was "
                f"sent on {channel} did not reach it: a QEMU ignores the channels beyond its "
                f"multifd-channels (set it to {self.channels} on the destination), losing "
                f"their pages; do not resume that guest")

    def _hint(self, dropped: bool = False, *, said: bool = False) -> str:
        """What to check on the destination. A 7.2 destination reads no main
        channel before all of its channels came, and holds every channel at a
        SYNC until the main channel reaches its EOS; a destination of another
        QEMU or machine type refuses the stream; ``dropped``: it closed the
        connection (refused the stream, or exited), which the error ``said``
        already."""
        check = "is the destination's"
        if dropped:
            check = "did its QEMU exit, or drop the stream (its log says why)? Is its"
            if not said:
                check = "the destination closed the connection: " + check
        return f" ({check}{self._checklist()}"

    def _stalled_hint(self) -> str:
        """What to check where the destination stopped taking data for the stall
        timeout: once pages were written to it, a link gone down or a QEMU stopped before
        its configuration (the checklist alone blamed that for a link blackholed
        mid-migration: a review, in a network-namespace pair)."""
        pages = sum(counts["normal_pages"] + counts["zero_pages"]     # (not the SYNCs' bytes)
                    for counts in map(self.counters.read, range(self.channels)))
        if not pages:
            return self._hint()
        return (f", after {pages} pages were written to its channels (did the link go down, "
                f"or its QEMU stop? If it loaded none: is the destination's{self._checklist()}")

    def _checklist(self) -> str:
        """How every hint ends: what the destination must be for this stream."""
        tls = (", tls-creds whose CA issued this source's certificate" if self.tls is not None
               else ", no tls-creds (this send is in plaintext)")
        return (f" multifd capability on, with multifd-channels {self.channels} and "
                f"multifd-compression {self.compression}{tls}, and is it a QEMU this saved "
                f"stream can go to: {self.stream.describe()}?)")

    def _main(self, data: bytes) -> None:
        assert self.main is not None, "connected by run()"
        self._check_cancelled()     # (a cancel before the connection did not shut it)
        try:
            self.main.sendall(data)
        except TimeoutError:
            self._check_workers()
            raise Hinted(f"the destination took no data for {self.stall:g} s"
                         + self._stalled_hint(), channel=MAIN) from None
        except OSError as exc:
            self._check_workers()
            # (An SSLEOFError's words are OpenSSL's "EOF occurred in violation of protocol".)
            why = ("the connection ended" if isinstance(exc, ssl.SSLEOFError)
                   else exc.strerror or exc)
            raise MigrationError(f"sending failed: {why}", channel=MAIN) from None

    def _command(self, ch: int, record: bytes) -> None:
        try:
            os.write(self.cmd_fds[ch], record)
        except OSError as exc:
            self._failing(exc)
            # Only its worker reads the pipe: broken, the worker is gone, and its
            # exit (which the forkserver reports a moment later) is waited for: the
            # send said "cannot hand work to its worker: Broken pipe" for a killed one.
            self._check_workers()
            raise self.workers[ch].lost(exc) from None

    def _check_workers(self) -> None:
        """Raise what a worker reported (its failure) or how it ended; first, though,
        a SHUT 1 the destination said: a QEMU that failed to load says it, then exits
        with bytes of every connection unread, which resets them, and the workers'
        resets, its consequence, hid it."""
        self._check_shut()
        for worker in self.workers:
            while worker.next_report() is not None:
                pass
            if worker.exitcode not in (None, 0) and not worker.finished:
                raise worker.death_error()

    def _wait_done(self) -> None:
        deadline = time.monotonic() + self.stall
        try:
            for worker in self.workers:
                worker.expect(Done, max(0.0, deadline - time.monotonic()))
        except FastMFDError as exc:
            self._failing(exc)
            # A destination that failed to load resets every connection after its
            # SHUT 1: a worker's reset, its consequence, must not hide it.
            self._await_main_word(shut_only=True)
            raise

    def channel_stats(self) -> list[dict[str, int]]:
        return [{"channel": ch, **self.counters.read(ch)} for ch in range(self.channels)]

    def close(self) -> None:
        socks = [sock for sock in (self.main, *self.data) if sock is not None]
        for sock in socks:
            shutdown_quietly(sock)
        self.workers.stop()
        for sock in socks:
            sock.close()
        self.main, self.data = None, []
        for fd in self.cmd_fds:
            os.close(fd)
        self.cmd_fds = []
        self.__dict__.pop("mailbox", None)     # (a view of mailbox_shm: let go first)
        for resource in reversed(self.owned):
            resource.close()
        self.owned = []
