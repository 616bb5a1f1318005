"""fastmfd in a real QEMU migration: the cells QEMU -> fastmfd and fastmfd -> QEMU.

Each is compared with :class:`~.peers.QemuTrial` (QEMU -> QEMU) on the same
image, channels and compression::

    QemuToFastmfdTrial   QEMU source (paused guest on the image) ── migrate ──▶
                         fastmfd.qemu.receive into a directory (its worker
                         started before timing); timed from ``migrate`` until
                         receive() returns: the stream ended, every file fsynced
    FastmfdToQemuTrial   untimed: the image saved by receive() from a QEMU
                         source; then fastmfd.qemu.send of that directory ──▶
                         QEMU destination (-incoming defer, a fresh RAM file);
                         timed from send() until the destination says completed
                         (its event's timestamp); send() returns about then
                         (``send_s``), its workers' teardown comes after

``finish()`` compares the RAM file the destination wrote with the image.
On an emulated link (``bench --link``) the destination of the timed part is
on the link's far side; FastmfdToQemuTrial's untimed save stays on loopback.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
import time
from typing import cast

from ... import qemu
from ...errors import MigrationError
from ...protocol.security import TLSConfig
from ...protocol.sockets import Listener, listen, parse_address
from ...threads import start_thread
from ..warm_files import WarmFiles
from .link import transfer_timeout
from .peers import LOOPBACK_HOST, QMP, STEP_TIMEOUT, QemuPeer, destination_loaded
from .trial import Measurement

__all__ = ["QemuToFastmfdTrial", "FastmfdToQemuTrial"]

RAM_BLOCK = "mem"           # the memory-backend's id: the guest RAM's RAMBlock


class _Receiver:
    """A :class:`~fastmfd.qemu.QemuReceiver` receiving in a thread: listening, its
    workers up, once constructed; on loopback, or on ``listener``, a socket
    listening already (the caller's to close)."""

    def __init__(self, directory: str, workers: int,
                 listener: Listener | None = None, tls: TLSConfig | None = None,
                 warm: WarmFiles | None = None) -> None:
        self._outcome: dict[str, qemu.QemuReceived | BaseException] = {}
        self._shut = self._closed = False
        self._own_listener = listener is None
        self._listener = listener if listener is not None else listen(
            parse_address(f"tcp:{LOOPBACK_HOST}:0"))
        self._ended_r, self._ended_w = os.pipe()
        try:
            self._receiver = qemu.QemuReceiver(self._listener, directory,
                                               timeout=STEP_TIMEOUT * 10, workers=workers,
                                               tls=tls, warm=warm)
        except BaseException:
            self._close_own()
            raise
        self.address = self._receiver.address
        thread = threading.Thread(target=self._run, name="fastmfd qemu receive", daemon=True)
        try:
            self._thread = start_thread(thread)
        except BaseException:
            self._receiver.close()          # (which its thread would have done)
            self._close_own()
            raise

    def _run(self) -> None:
        try:
            self._outcome["result"] = self._receiver.receive()
        except BaseException as exc:        # handed to the thread that waits
            self._outcome["error"] = exc
        finally:
            os.write(self._ended_w, b"!")   # the time receive() took ends here
            self._receiver.close()

    def worker_pids(self) -> list[int]:
        return self._receiver.worker_pids()

    def result(self, timeout: float, source: QMP) -> qemu.QemuReceived:
        """What receive() returned, or raised; or, if ``source``'s migration fails
        first, QEMU's error, the receiver stopped: a QEMU that never connected
        (a wrong address, a link that drops it) would leave it waiting for its
        whole connect timeout."""
        deadline = time.monotonic() + timeout
        while "result" not in self._outcome and "error" not in self._outcome:
            source.take_events()
            failure = source.migration_failure()
            if failure is not None:
                self._stop()
                raise MigrationError(f"QEMU migration failed: {failure}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"fastmfd's QEMU receiver did not finish within "
                                     f"{timeout:g} s")
            select.select([self._ended_r, source.sock.fileno()], [], [], left)
        error = self._outcome.get("error")
        if isinstance(error, BaseException):
            raise error
        result = self._outcome["result"]
        assert isinstance(result, qemu.QemuReceived), "no error: a result"
        return result

    def close(self) -> None:
        """Stop the receiver if it still waits for QEMU, wait for its thread's
        cleanup, and free what this made (idempotent)."""
        self._stop()
        if not self._thread.is_alive() and not self._closed:   # else it may still write its pipe
            self._closed = True
            self._close_own()

    def _stop(self) -> None:
        if self._thread.is_alive() and not self._outcome and not self._shut:
            self._shut = True
            self._listener.shutdown(socket.SHUT_RDWR)   # its accept fails: it ends
        self._thread.join(STEP_TIMEOUT)

    def _close_own(self) -> None:
        os.close(self._ended_r)
        os.close(self._ended_w)
        if self._own_listener:
            self._listener.close()


class QemuToFastmfdTrial(QemuPeer):
    """A real QEMU migrates the image into ``fastmfd listen --qemu``.

    With ``prealloc``, the guest RAM's file is made and faulted in before
    timing, and the receiver makes its RAMBlock's file of it (a warm file, as
    ``listen --prealloc`` keeps between sessions), as the QEMU destination's
    ``prealloc=on`` faults its RAM in at its start: otherwise the cell paid for
    fresh memory that QEMU -> QEMU, its "vs QEMU", did not."""
    _received_name = "fastmfd: the RAMBlock file listen --qemu wrote"

    _listener: Listener | None = None     # on an emulated link: where it listens
    _receiver: _Receiver | None = None
    _warm: WarmFiles | None = None
    _warm_file: tuple[int, int] | None = None  # the preallocated file's (device, inode)

    def _prepare(self) -> None:
        self._dir = self._new_file("qemu-saved")
        if self._prealloc:
            self._preallocate()
        if self._link is not None:
            self._listener = self._link.listen()
        self.src = self._start(self.image.path, incoming=False, tls=True)
        self.multifd(self.src, self.channels, self.compression, self.level)
        self.secure(self.src, "client")
        # Its workers ready before timing, as the QEMU destination's threads are.
        self._receiver = _Receiver(self._dir, self.channels, self._listener,
                                   tls=self._tls["server"], warm=self._warm)

    def _preallocate(self) -> None:
        """The guest RAM's file, faulted in, for the receiver to take (see the class)."""
        self._warm = WarmFiles(self._new_file("qemu-warm"))
        self._warm.refill([(self.image.size, self.image.region.page_size)])
        self._warm.wait()
        made = os.listdir(self._warm.path)
        if self._warm.held_bytes != self.image.size or len(made) != 1:
            raise MigrationError(f"could not preallocate the {self.image.size}-byte RAM file "
                                 f"of listen --qemu (see the log)")
        made_stat = os.stat(os.path.join(self._warm.path, made[0]))
        self._warm_file = (made_stat.st_dev, made_stat.st_ino)

    def pids(self) -> dict[str, list[int]]:
        assert self._receiver is not None, "made by _prepare"
        return {"source": [self._procs[0].pid], "destination": self._receiver.worker_pids(),
                "main": [os.getpid()]}

    def close(self) -> None:
        # QEMU first: a receiver still receiving then sees its connections end.
        self._kill()
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        if self._warm is not None:
            self._warm.close()
            self._warm = None
        super().close()
        if self._listener is not None:
            self._listener.close()

    def run(self) -> Measurement:
        assert self._receiver is not None, "made by _prepare"
        started = time.perf_counter()
        self.src.command("migrate", uri=self._receiver.address)
        received = self._receiver.result(
            transfer_timeout(STEP_TIMEOUT * 10, self.image.size, self._link), self.src)
        seconds = time.perf_counter() - started
        if self.src.wait_migration(STEP_TIMEOUT) != "completed":
            raise MigrationError(f"QEMU source: {self.src.command('query-migrate')}")
        self._received = received.files.regions[RAM_BLOCK]
        self._check_preallocated()
        channels = received.channels
        return Measurement(seconds, self.image.size,
                           sum(c["wire_bytes"] for c in channels) + received.facts.ram_bytes
                           + received.facts.vmstate_bytes, {
                               "normal_pages": sum(c["normal_pages"] for c in channels),
                               "zero_pages": received.facts.zero_pages,
                               "receive_s": received.seconds,
                               "qemu_tls_creds": self.tls_creds(self.src),
                               "destination_preallocated": self._warm is not None})

    def _check_preallocated(self) -> None:
        """With prealloc, the RAMBlock was received into the file faulted in for it:
        a block of another size (or page size) would have got a fresh one, and the
        cell's time would not be comparable with QEMU's prealloc=on."""
        if self._warm_file is None:
            return
        got = os.stat(self._received)
        if (got.st_dev, got.st_ino) != self._warm_file:
            raise MigrationError(f"listen --qemu did not receive RAMBlock {RAM_BLOCK!r} into "
                                 f"its preallocated file")


class FastmfdToQemuTrial(QemuPeer):
    """``fastmfd send --qemu`` migrates the image, saved from a QEMU, into a real QEMU."""
    _received_name = "QEMU: the destination's RAM file"

    _sender: qemu.QemuSender | None = None

    def _prepare(self) -> None:
        self._dir = self._saved_directory()
        self._received = self._new_file("qemu-dst-ram")
        self.dst = self._start(self._received, incoming=True, tls=True)
        self.multifd(self.dst, self.channels, self.compression, self.level)
        self.secure(self.dst, "server")
        self._uri = self.listening_uri(self.dst)
        # Its workers ready before timing, as fastmfd's own Source's are (QEMU's
        # source starts threads inside its migration: microseconds each).
        self._sender = qemu.QemuSender(self._dir, channels=self.channels,
                                       compression=cast(qemu.QemuCompression, self.compression),
                                       level=self.level,
                                       stall_timeout=STEP_TIMEOUT, tls=self._tls["client"])

    def _saved_directory(self) -> str:
        """The image saved from this QEMU by ``listen --qemu``, made by the cell's
        first run and kept in the image's directory for the others (removed with
        it). Made before each run, its fresh gigabyte took the memory the run
        before had just freed, and left this run's QEMU destination memory its
        host had taken back meanwhile, which costs up to 10x more to clear on
        first touch (this VM reports free memory to its host after about 2 s:
        virtio-balloon free page reporting); QEMU -> QEMU's destination gets the
        freed memory (measured: the destination's clear_page 6 % of all samples
        here against 0.5 % there, its CPU 1.86 s against 0.79)."""
        saved = os.path.join(self.image.directory,
                             f"qemu-saved-{self._binary_key()}")
        if not os.path.exists(os.path.join(saved, "manifest.json")):
            source = self._start(self.image.path, incoming=False)
            self.multifd(source, 2, "none", 1)
            receiver = _Receiver(saved, 2)
            try:
                source.command("migrate", uri=receiver.address)
                receiver.result(STEP_TIMEOUT * 10, source)
            finally:
                receiver.close()
            self._stop()            # the source's QEMU: nothing of it beside the timed run
        return saved

    def _binary_key(self) -> str:
        """A name for the QEMU binary this peer runs (7.2 and 10 save different streams)."""
        return hashlib.sha1(os.path.realpath(self._binary).encode()).hexdigest()[:12]

    def pids(self) -> dict[str, list[int]]:
        assert self._sender is not None, "made by _prepare"
        return {"source": self._sender.worker_pids(), "destination": [self._procs[-1].pid],
                "main": [os.getpid()]}

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        super().close()

    def run(self) -> Measurement:
        assert self._sender is not None, "made by _prepare"
        started = time.time()
        sent = self._sender.send(self._uri)
        send_s = time.time() - started
        status = self.dst.wait_migration(STEP_TIMEOUT)
        # The workers' teardown once the destination is done, as QEMU's source
        # cleans up after it: not the migration's to wait for.
        self._sender.close()
        if status != "completed":
            raise MigrationError(f"QEMU destination {status}: "
                                 f"{self.dst.command('query-migrate')}")
        seconds = destination_loaded(self.dst, started)
        return Measurement(seconds, self.image.size, sum(c["wire_bytes"] for c in sent), {
            "normal_pages": sum(c["normal_pages"] for c in sent), "send_s": send_s})
