"""Take part in a real QEMU migration: be its destination, into files.

``receive(address, directory)`` listens at ``address`` for a QEMU source
(7.2, or 10.x with any machine type) migrating with the ``multifd``
capability (``migrate`` to ``tcp:HOST:PORT`` or ``unix:PATH``) and writes:

- one file per RAMBlock, ``<idstr>.img`` (sparse: zero pages are holes;
  an idstr such as ``/rom@etc/acpi/tables`` becomes a safe, distinct name,
  see :func:`fastmfd.tools.outputs.output_name`);
- ``vmstate.bin``: the rest of the main channel as QEMU sent it, from its
  first device section to its end (QEMU_VM_EOF and the VM description);
- ``manifest.json``: the stream's version, machine, page size, capabilities,
  UUID, channel count and compression (both learnt from the stream, never
  asked of the user), its flavour (where its multifd SYNCs sit,
  ``multifd_sync``, and where its zero pages went, ``zero_page_detection``),
  the COMMAND sections of the stream outside its device sections and where
  each sat (``commands``: QEMU 10's SWITCHOVER_START, before the RAM END
  section), and each block's idstr, size and file.

``send(address, directory)`` plays such a directory back into a QEMU
started with ``-incoming defer`` on the same machine configuration (the
machine type the manifest names, and the same ``-uuid``, if any), whose
multifd capability and parameters match ``channels`` and ``compression``:
the saved configuration, the block list, the pages over the multifd channels
(fastmfd's send workers), then the saved device sections, in the saved
stream's flavour: a QEMU 7.2 stream (or a later QEMU's with a machine type
<= 8.0) syncs at every section end and has its zero pages as ZERO records on
the main channel (7.2's packet layout); a QEMU 10 stream with its current
machine type syncs per round (MULTIFD_FLUSH) and lists its zero pages in the
multifd packets (the current layout); the saved COMMAND sections go where
the source put them. The destination resumes (or stays
paused) with the saved RAM and device state; one that is not the saved
stream's QEMU and machine type drops the migration, and the error says what
the saved stream needs. ``QemuSender(directory)`` does the same in two
steps: it opens the directory and starts the workers, then ``send(address)``;
``QemuReceiver(address, directory)`` is ``receive`` in two steps likewise.
``send(..., tls=TLSConfig(...))`` migrates in TLS, every connection, into a
QEMU whose ``tls-creds`` (a ``tls-creds-x509`` object, ``endpoint=server``)
accept this side's certificate, as a QEMU source with ``tls-creds`` does;
``receive(..., tls=TLSConfig(cert, key, ca))`` takes one in TLS, from a QEMU
source whose ``tls-creds`` (``endpoint=client``) hold a certificate ``ca``
issued (QEMU's ``verify-peer``, always on here), each connection greeted by a
receive worker (:mod:`fastmfd._engine.qemu_tls`).

Files are written as ``.part`` and renamed once the stream reached its end
and everything is on disk (:mod:`fastmfd.tools.outputs`); a truncated,
corrupt or unsupported stream (postcopy, dirty-bitmaps, x-ignore-shared,
xbzrle, compress threads) raises one exception naming what and where, and
leaves no file that looks complete. A source with the capability
``return-path`` is told (SHUT) once the files are committed, and reports
``completed`` only then; ``send`` always opens one, and succeeds only when the
destination says it loaded the whole stream. The multifd channels run in
fastmfd's receive worker processes (one per channel, QEMU 7.2's packet
layout); the main channel is decoded in the calling process
(:mod:`fastmfd._engine.qemu_receiving`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ._engine.cancelling import WatchCancel
from ._engine.qemu_receiving import MAX_WORKERS, QemuReceiving, QemuStreamFacts
from ._engine.qemu_sending import QemuSending
from ._engine.qemu_stream import QemuStream
from ._engine.session import Owner
from .arguments import (BOOL, INT, PATH, POSITIVE, STR, TIMEOUT, UNSIGNED, Kind,
                        check_types, instance_of, optional, up_to)
from .config import paced_channel_rate
from .errors import ConfigError
from .protocol.qemu import QEMU_PACKET_BYTES
from .protocol.security import ChannelSecurity, TLSConfig
from .protocol.setup import COMPRESSION_LEVELS, STALL_TIMEOUT, level_rule
from .protocol.sockets import (LISTENERS, Listener, Listening, bound_address, listen,
                               listening_address, listening_on, parse_address)
from .regions import Region
from .reprs import fields_repr
from .tools.outputs import OutputDir, SavedFiles
from .tools.qemu_manifest import MAX_MANIFEST_BYTES, check_size, open_inside, read_manifest
from .tools.unfinished import warn_of_unfinished_receives
from .tools.warm_files import WarmFiles

__all__ = ["receive", "send", "QemuReceived", "QemuReceiver", "QemuSender", "QemuStreamFacts",
           "QemuCompression", "MAX_MANIFEST_BYTES"]

DEFAULT_STALL_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 30.0
QemuCompression = Literal["none", "zlib", "zstd"]      # QEMU's multifd-compression
_WORKERS = up_to(MAX_WORKERS, "a migration uses one per QEMU channel and one per connection "
                 "greeted in TLS at most")


@dataclass
class QemuReceived:
    """What :func:`receive` wrote and measured:

    facts -- what QEMU's stream said (:class:`QemuStreamFacts`)
    files -- the files written: ``.regions`` by RAMBlock idstr, ``.streams["vmstate"]``,
        ``.manifest``
    manifest -- what manifest.json holds
    seconds -- from the main channel's arrival to the commit
    channels -- per multifd channel: packets, pages and bytes received
    """
    facts: QemuStreamFacts
    files: SavedFiles
    manifest: dict[str, Any]
    seconds: float
    channels: list[dict[str, int]]

    def __repr__(self) -> str:
        return fields_repr(self)    # bounded: 8 blocks or channels, then a count


def receive(address: str | socket.socket, directory: str | os.PathLike[str], *,
            timeout: float = 3600.0, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
            force: bool = False, keep_partial: bool = False, max_size: int | None = None,
            workers: int = 2, on_listening: Callable[[str], object] | None = None,
            tls: TLSConfig | None = None, max_memory: int | None = None) -> QemuReceived:
    """Receive one migration from QEMU into ``directory`` (see the module docstring).

    ``timeout``: seconds to wait for QEMU to connect (at most a week,
    ``MAX_TIMEOUT_SECONDS``); ``stall_timeout``: any wait for QEMU's next bytes,
    SYNCs or the end of its channels, 0.1..86400 s (as a Destination's). ``force``
    replaces files of the same names, and removes the other files an earlier
    save's manifest lists (see :mod:`.tools.earlier_save`); ``keep_partial``
    keeps what arrived of a failed migration as ``.part`` files. ``max_size``:
    the most bytes of RAM blocks QEMU may announce (default: the directory's
    free space; the block files are sparse and fill as pages arrive, so a
    larger guest is refused before any is written: disk, or memory where the
    directory is a tmpfs).
    ``max_memory``: the most memory QEMU's channels may make this process hold
    beside the block files: each channel's buffers (counted with a zstd window
    of 32 MiB: the method is learnt from its first page) and the worker
    processes, 16 MiB each; checked as each channel connects, a channel that
    does not fit fails the migration (default: no bound). In TLS a connection
    is greeted only where the bound holds it as a channel (strangers wait, or
    are refused, rather than take the room of QEMU's); a bound short of QEMU's
    channels fails once nothing being greeted may end to make room (within a
    second, not at ``timeout``). ``workers``: receive
    worker processes started before QEMU connects (default 2, QEMU's default
    multifd-channels; a channel beyond them gets its worker as it connects; at
    most 288, QEMU's 256 channels and 32 TLS greetings).
    ``on_listening(address)`` is called with the bound address (``tcp:...:0``
    picks a port) before any wait. ``address`` may be a socket listening
    already (the caller's to close). ``tls``: every connection in TLS (QEMU's
    ``tls-creds``): ``cert``/``key`` this side's, ``ca`` the CA that issued
    the source QEMU's certificate (required: a source is told by it),
    ``authz`` the identities accepted."""
    return _ReceiveCall(address, directory, timeout=timeout, stall_timeout=stall_timeout,
                        force=force, keep_partial=keep_partial, max_size=max_size,
                        workers=workers, tls=tls, max_memory=max_memory).run(on_listening)


class QemuReceiver(Owner):
    """:func:`receive` in two steps: made, it has checked the directory, bound
    the address (:attr:`address`, where QEMU is to ``migrate``) and started the
    first workers; :meth:`receive` then takes the migration, once; :meth:`close`
    (or the end of a ``with`` block) frees it all. The parameters are
    :func:`receive`'s, and ``warm``: faulted-in spare files (the caller's
    :class:`~fastmfd.tools.warm_files.WarmFiles`, on the directory's file
    system), one of which becomes a RAMBlock's file when its size and page size
    match: its memory is allocated before QEMU connects, as a QEMU destination's
    with ``prealloc=on`` (``fastmfd bench --prealloc``).

    As a Source or Destination (:class:`~fastmfd._engine.session.Owner`):
    :meth:`cancel` and :meth:`close` work from any thread, the latter cancelling
    a running :meth:`receive` and waiting for it to leave; in a child forked
    from its maker's process, :meth:`close` frees nothing of it and the rest is
    a ConfigError; dropped unclosed, it is freed when collected, with a
    ResourceWarning."""

    _call = "QemuReceiver"      # what a wrong argument's TypeError names (see _ReceiveCall)
    _cli = False                # its errors name these parameters, not listen --qemu's flags

    def __init__(self, address: str | Listener, directory: str | os.PathLike[str], *,
                 timeout: float = 3600.0, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                 force: bool = False, keep_partial: bool = False, max_size: int | None = None,
                 workers: int = 2, tls: TLSConfig | None = None,
                 max_memory: int | None = None, warm: WarmFiles | None = None) -> None:
        check_types(self._call, warm=(warm, optional(instance_of(WarmFiles, "a WarmFiles"))),
                    address=(address, Kind("a str or a listening socket",
                                           lambda a: isinstance(a, (str, *LISTENERS)))),
                    directory=(directory, PATH), force=(force, BOOL),
                    keep_partial=(keep_partial, BOOL),
                    tls=(tls, optional(instance_of(TLSConfig, "a fastmfd.TLSConfig"))))
        if tls is not None:
            tls.check_server()
            if tls.ca is None:
                raise ConfigError("listen --qemu in TLS tells QEMU's connections by their "
                                  "certificate: TLSConfig(ca=...) must name the CA that issued "
                                  "the source QEMU's tls-creds certificate")
        timeout, stall_timeout, max_size, workers, max_memory = check_types(
            self._call, timeout=(timeout, TIMEOUT), stall_timeout=(stall_timeout, STALL_TIMEOUT),
            max_size=(max_size, optional(UNSIGNED)), workers=(workers, _WORKERS),
            max_memory=(max_memory, optional(UNSIGNED)))
        super().__init__()
        requested = (listening_address(address) if isinstance(address, LISTENERS)
                     else parse_address(address))
        own = self._resources.own
        # Closed last: never used, or its receive() failed, nothing of it is left.
        self._output = own(_Output(OutputDir(directory, force=force, keep_partial=keep_partial,
                                             max_bytes=max_size, warm=warm, cli=self._cli)))
        self._out = self._output.out
        warn_of_unfinished_receives(os.fspath(directory))   # what a killed listener left
        self._session: QemuReceiving | None = None
        self._cancelling: WatchCancel | None = None
        try:
            listener = address if isinstance(address, LISTENERS) else None
            if listener is None:
                listener = own(Listening(listen(requested), requested.path)).sock
            self._session = own(_Receiving(listener, self._out, timeout=timeout,
                                           stall_timeout=stall_timeout, workers=workers,
                                           security=ChannelSecurity(tls=tls),
                                           max_memory=max_memory))
            self._cancelling = own(WatchCancel(self._session.watch))
            self.address = str(bound_address(listener, requested))
            # For people: each address a name's listener bound, where it left one out.
            self.listening_on = listening_on(listener, bound_address(listener, requested))
        except BaseException:
            self.close()
            raise

    def _described(self) -> str:
        return f"at {self.address}, into {self._out.path}"

    def worker_pids(self) -> list[int]:
        """The process ids of the receive workers (empty once closed): what a
        benchmark measures the CPU time of, beside this process's."""
        workers = self._session.workers if self._session is not None else None
        return workers.pids() if workers is not None else []

    def receive(self) -> QemuReceived:
        """Take QEMU's migration; returns once every file is written and fsynced."""
        with self._running("a QemuReceiver receives once: make another"):
            return self._receive()

    def _receive(self) -> QemuReceived:
        session, output, cancelling = self._session, self._output, self._cancelling
        out = output.out
        assert session is not None and cancelling is not None, "open: _running() checked"
        try:
            facts = session.run(cancelling.check)
            manifest = _manifest(facts, out)
            # The last look: a cancel from now on finds the files committed, complete.
            cancelling.check()
            out.commit(manifest)
            session.answers.confirm()       # a source with a return path completes now
            return QemuReceived(facts, out.files(), manifest,
                                time.monotonic() - session.connections.main_at,
                                session.channel_stats())
        except BaseException as exc:
            # Recorded first: a cancel during the clean-up below came after the failure.
            first = cancelling.first(exc) if isinstance(exc, Exception) else exc
            session.close()         # nothing writes any more
            output.abort()
            if first is not exc:    # cancelled before it failed: (most likely) the cause
                raise first from exc
            raise

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail :meth:`receive` from any thread, at once, even while it waits for
        QEMU to connect (or as it starts): it raises MigrationError(``reason``),
        QEMU's migration fails with its connections, and the directory is left
        as a failed receive leaves it."""
        check_types("cancel", reason=(reason, STR))
        self._check_own_process()
        if self._cancelling is not None:
            self._cancelling.cancel(reason)

    def _release(self) -> None:
        """Stop the workers, close the listener, free the directory (idempotent, see
        close()); never used, the directories it made are removed again."""
        self._session = self._cancelling = None
        self._resources.stop()
        self._resources.release()


class _Receiving(QemuReceiving):
    """The receiver's session, closed by one thread at a time: a receive() failing
    closes it, and so may the receiver's release meanwhile (a receive() in a daemon
    thread as the interpreter's exit frees its receiver: the second close() took the
    workers, regions and counters from under the first); the second finds it closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closing = threading.Lock()
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        with self._closing:
            super().close()


class _Output:
    """A QemuReceiver's directory, freed with it: what it made for a migration
    that did not commit (none came, or it failed) is removed (OutputDir.abort).
    A failing receive() aborts it too, maybe as its receiver is freed (a daemon
    thread's, at the interpreter's exit): one at a time, and not once closed (its
    abort raised ValueError from an fsync of the closed directory's fd, -1, in
    place of the receive's failure)."""

    def __init__(self, out: OutputDir) -> None:
        self.out = out
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            if self.out.fd >= 0:        # (not closed)
                self.out.abort()

    def close(self) -> None:
        with self._lock:
            if self.out.fd >= 0:
                self.out.abort()        # (committed: nothing)
                self.out.close()


class _ReceiveCall(QemuReceiver):
    """The QemuReceiver :func:`receive` makes: a wrong argument is the user's
    ``qemu.receive(...)``, and its TypeError says so, not a class never called."""
    _call = "qemu.receive"

    def run(self, on_listening: Callable[[str], object] | None) -> QemuReceived:
        """:func:`receive`: ``on_listening(address)``, the migration, then close()."""
        with self:
            if on_listening is not None:
                on_listening(self.listening_on if self._cli else self.address)
            return self.receive()


class _ListenCommand(_ReceiveCall):
    """``fastmfd listen --qemu``'s: its errors name the command's options
    (``--force``, ``--max-size``), not the library's parameters."""
    _cli = True


def _manifest(facts: QemuStreamFacts, out: OutputDir) -> dict[str, Any]:
    return {
        "format": "qemu-migration",
        "stream_version": facts.version,
        "machine": facts.machine,
        "page_size": facts.page_size,
        "capabilities": ["multifd", *facts.capabilities],
        "uuid": facts.uuid.hex() if facts.uuid is not None else None,
        "channels": facts.channels,
        "compression": facts.compression,
        "blocks": [{"idstr": name, "size": size, "file": out.regions[name].final}
                   for name, size in facts.blocks.items()],
        "vmstate": {"file": out.streams["vmstate"].final, "size": facts.vmstate_bytes,
                    "stream_offset": facts.ram_bytes, "devices": facts.vm_devices},
        # What a stream replaying this directory starts with (send()).
        "configuration": facts.configuration.hex(),
        "commands": [{"before": place, "section": raw.hex()} for place, raw in facts.commands],
        "ram_section_id": facts.ram_section_id,
        "section_footers": facts.section_footers,
        "ram_section_ends": facts.ram_section_ends,
        "main_channel_zero_pages": facts.zero_pages,
        # The stream's flavour, which a replay keeps (send()): the destination's
        # machine type expects its SYNCs where the source's put them.
        "multifd_sync": facts.multifd_sync,
        "syncs": facts.syncs,
        "zero_page_detection": _zero_page_detection(facts),
        "multifd_zero_pages": facts.multifd_zero_pages,
    }


def _zero_page_detection(facts: QemuStreamFacts) -> str:
    """QEMU's parameter of the same name as the stream shows it: "multifd" when
    the multifd packets listed zero pages (QEMU >= 9.0 with a >= 9.0 machine
    type), else "legacy" (zero pages as ZERO records, which every QEMU reads)."""
    return "multifd" if facts.multifd_zero_pages else "legacy"


def send(address: str, directory: str | os.PathLike[str], *, channels: int = 2,
         compression: QemuCompression = "none", level: int = 1,
         stall_timeout: float = DEFAULT_STALL_TIMEOUT,
         timeout: float = DEFAULT_CONNECT_TIMEOUT, max_bandwidth: float | None = None,
         tls: TLSConfig | None = None) -> list[dict[str, int]]:
    """Migrate ``directory``, which :func:`receive` wrote, into the QEMU listening
    at ``address`` (see the module docstring); returns per-channel counters.
    ``channels`` and ``compression`` must be the destination's
    ``multifd-channels`` and ``multifd-compression`` (QEMU negotiates nothing);
    ``level``: the zlib (0..9) or zstd (1..20) level (QEMU's
    ``multifd-zlib-level``/``multifd-zstd-level``). ``stall_timeout``: seconds a
    channel, a send worker or the destination QEMU may make no progress (take no
    bytes, send no answer) before the migration fails, 0.1..86400.
    ``timeout``: seconds each connection may take (at most a week); ``max_bandwidth``: bytes/s
    the multifd channels may send in all (QEMU's ``max-bandwidth``; default no
    cap); ``tls``: every connection in TLS (QEMU's ``tls-creds``): ``ca`` the
    destination's certificate must chain to, ``hostname`` the name it must
    carry (default: the address's host), ``cert``/``key`` this side's, for a
    destination with ``verify-peer=on``. A :class:`QemuSender` made and used at once."""
    check_types(_SendCall._call, address=(address, STR))
    parse_address(address)                  # a wrong address fails before anything starts
    with _SendCall(directory, channels=channels, compression=compression, level=level,
                   stall_timeout=stall_timeout, timeout=timeout,
                   max_bandwidth=max_bandwidth, tls=tls) as sender:
        return sender.send(address)


class QemuSender(Owner):
    """A saved directory made ready to migrate into a QEMU: its manifest read,
    its files opened and mapped, one send worker process per channel started.
    :meth:`send` migrates it, once; :meth:`close` (or the end of a ``with``
    block) frees it all. The parameters are :func:`send`'s (but ``address``, which
    :meth:`send` takes). Made ahead of the migration, as a service that
    migrates on request would, it keeps the workers' start (a process each,
    some milliseconds) out of the migration itself, as fastmfd's own
    ``Source`` does; QEMU starts threads. Its lifecycle is a
    :class:`QemuReceiver`'s: :meth:`cancel` and :meth:`close` from any thread
    (a close cancels a running :meth:`send` and waits for it to leave), nothing
    freed by a forked child, freed when collected unclosed."""

    _call = "QemuSender"        # what a wrong argument's TypeError names (see _SendCall)

    def __init__(self, directory: str | os.PathLike[str], *, channels: int = 2,
                 compression: QemuCompression = "none",
                 level: int = 1, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                 timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 max_bandwidth: float | None = None, tls: TLSConfig | None = None) -> None:
        check_types(self._call, directory=(directory, PATH), compression=(compression, STR),
                    tls=(tls, optional(instance_of(TLSConfig, "a fastmfd.TLSConfig"))))
        channels, level, stall_timeout, timeout, max_bandwidth = check_types(
            self._call, channels=(channels, INT), level=(level, INT),
            stall_timeout=(stall_timeout, STALL_TIMEOUT), timeout=(timeout, TIMEOUT),
            max_bandwidth=(max_bandwidth, optional(POSITIVE)))
        if not 1 <= channels <= 255:
            problem = "QEMU's multifd-channels is 1..255"
            raise ConfigError(f"channels {channels}: {problem}", parameter="channels",
                              problem=problem)
        if compression not in ("none", "zlib", "zstd"):
            problem = "must be none, zlib or zstd (QEMU's multifd-compression)"
            raise ConfigError(f"compression {compression!r}: {problem}",
                              parameter="compression", problem=problem)
        if level not in COMPRESSION_LEVELS[compression]:       # fastmfd's encoders' ranges
            must = f"must be {level_rule(compression)}"
            raise ConfigError(f"{self._call}(level) {must}, not {level}", parameter="level",
                              problem=must)
        if tls is not None:
            tls.check_client()
        # QEMU waits on a channel this side would count as stalled too.
        channel_rate = paced_channel_rate(max_bandwidth, channels, QEMU_PACKET_BYTES,
                                          stall_timeout)
        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        super().__init__()
        self._directory = directory
        regions: list[Region] = []
        fds = self._resources.fds     # each block file's, where its holes are (its zero pages)
        self._session: QemuSending | None = None
        try:
            for block in manifest["blocks"]:
                # One open: the file mapped is the file whose holes are learnt.
                fds.append(open_inside(directory, block["file"], os.O_RDONLY))
                path = check_size(directory, block, fds[-1])
                try:
                    regions.append(self._resources.own(Region.from_fd(
                        block["idstr"], fds[-1], page_size=manifest["page_size"])))
                except ConfigError as exc:      # (its size: not a multiple of a page)
                    raise ConfigError(f"{path}: {exc}") from None
            fds.append(open_inside(directory, manifest["vmstate"]["file"], os.O_RDONLY))
            check_size(directory, manifest["vmstate"], fds[-1])
            stream = QemuStream(bytes.fromhex(manifest["configuration"]),
                                bytes.fromhex(manifest["uuid"] or "00" * 16),
                                manifest["ram_section_id"], manifest["section_footers"],
                                machine=manifest.get("machine", ""),
                                blocks={b["idstr"]: b["size"] for b in manifest["blocks"]},
                                multifd_sync=manifest["multifd_sync"],
                                zero_page_detection=manifest["zero_page_detection"],
                                commands=manifest["commands"])
            self._session = self._resources.own(QemuSending(
                stream, regions, fds[:-1], fds[-1], channels=channels,
                compression=compression, level=level, stall_timeout=stall_timeout,
                connect_timeout=timeout, channel_rate=channel_rate, tls=tls))
        except BaseException:
            self.close()
            raise

    def _described(self) -> str:
        return f"of {self._directory}"

    def send(self, address: str) -> list[dict[str, int]]:
        """Migrate into the QEMU listening at ``address``; per-channel counters."""
        target = parse_address(address)
        with self._running("a QemuSender migrates once: make another"):
            assert self._session is not None, "open: _running() checked"
            self._session.run(target)
            return self._session.channel_stats()

    def worker_pids(self) -> list[int]:
        """The process ids of the send workers (empty once closed): what a
        benchmark measures the CPU time of, beside this process's."""
        session = self._session
        return session.workers.pids() if session is not None else []

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail :meth:`send` from any thread, at once: it raises
        MigrationError(``reason``), and the destination QEMU's migration fails
        with the connections, shut; one failing already raises its failure (the
        first error wins). Once the stream was sent whole, the destination may
        have loaded it and run the guest: the error says so."""
        check_types("cancel", reason=(reason, STR))
        self._check_own_process()
        session = self._session         # (None once a close() from another thread freed it)
        if session is not None:
            session.cancel(reason)

    def _release(self) -> None:
        """Stop the workers and free the files (idempotent, see close())."""
        self._session = None
        self._resources.stop()
        self._resources.release()


class _SendCall(QemuSender):
    """The QemuSender :func:`send` makes: a wrong argument is the user's
    ``qemu.send(...)``, and its TypeError says so, not a class never called."""
    _call = "qemu.send"
