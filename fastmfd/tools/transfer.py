"""``fastmfd send`` and ``fastmfd listen``: memory images and state files
across hosts.

The sender maps each image file as a region (``Region.from_file``, nothing
is read into memory first) and each state file as a device; the listener
maps one output file per region the source announces and writes each
device's state to a file (:mod:`.outputs` keeps those files safe). Neither
side needs the other's parameters: the listener learns everything from SETUP.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import MigrationConfig
from ..destination import Destination, DestinationResult
from ..devices import FileDevice
from ..errors import ConfigError, FastMFDError, NoSourceError
from ..ownership import check_only_yours
from ..protocol.security import TLSConfig
from ..protocol.setup import NAME_RULE, Invalid, Setup, check_name
from ..protocol.sockets import (Listener, bound_address, listen, listening_on, parse_address,
                                remove_socket_file)
from ..regions import Region, check_huge_pages
from ..shm import check_usable
from ..source import Source
from ..stats import MigrationStats
from ..threads import start_thread
from ..units import format_bytes
from .new_files import make_directories, remove_directories_made
from .outputs import OutputDir, SavedFiles, check_writable
from .unfinished import warn_of_unfinished_receives
from .warm_files import WarmFiles

log = logging.getLogger("fastmfd")

__all__ = ["ImageSpec", "StateSpec", "send_images", "listen_once", "listen_sessions",
           "FailedSession"]


@dataclass(frozen=True)
class ImageSpec:
    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "ImageSpec":
        """``NAME=PATH``, or ``PATH`` (the name is the file name without its extension).
        A PATH with ``=`` in it (``runs/id=3/ram.img``) is one where the whole text is
        a file and the part after ``=`` is not: it was split, and another file, or none,
        was sent in its place; where both are files, the name must be given."""
        name, sep, path = text.partition("=")
        if sep and os.path.lexists(text):
            if os.path.lexists(path):
                whole = os.path.splitext(os.path.basename(text))[0]
                raise ConfigError(f"image {text!r}: both {text} and {path} exist; give "
                                  f"NAME=PATH to say which (e.g. {whole}={text})")
            sep = ""
        if not sep:
            path = text
            name = os.path.splitext(os.path.basename(text))[0]
            try:
                check_name(name, "region name")
            except Invalid:     # (it named a region the user never typed)
                raise ConfigError(f"image {text!r}: its file name gives the region name "
                                  f"{name!r}, which is not {NAME_RULE}; give NAME=PATH "
                                  f"(e.g. ram={text})") from None
        if not name or not path:
            raise ConfigError(f"bad image {text!r}: expected PATH or NAME=PATH")
        return cls(name, path)


@dataclass(frozen=True)
class StateSpec:
    idstr: str
    instance_id: int
    path: str

    @classmethod
    def parse(cls, text: str) -> "StateSpec":
        """``IDSTR=PATH`` or ``IDSTR:INSTANCE=PATH``."""
        ident, sep, path = text.partition("=")
        idstr, colon, instance = ident.rpartition(":")
        if not colon:
            idstr, instance = ident, "0"
        if not sep or not idstr or not path or not instance.isdigit():
            raise ConfigError(f"bad state {text!r}: expected IDSTR=PATH or IDSTR:INSTANCE=PATH")
        return cls(idstr, int(instance), path)


def send_images(address: str, config: MigrationConfig, images: Sequence[ImageSpec],
                states: Sequence[StateSpec] = (), *, progress: bool = False,
                on_status: Callable[[dict[str, Any]], object] | None = None,
                status_interval: float = 0.5) -> MigrationStats:
    """Send image files (and state files) to a listening destination. Every file is
    opened before the destination is contacted: one that cannot be is refused.
    ``on_status(dict)`` gets :meth:`Source.status` every ``status_interval`` seconds
    while it runs, and once more at the end (success or not)."""
    source = Source(address, config)        # checks the address before files are opened
    regions: list[Region] = []
    devices: list[FileDevice] = []
    try:
        for image in images:
            regions.append(Region.from_file(image.name, image.path, page_size=config.page_size,
                                            read_only=True))
        for state in states:
            devices.append(FileDevice(state.idstr, state.instance_id, state.path))
        with source as src:
            for region in regions:
                src.add_region(region)
            for device in devices:
                src.add_device(device)
            if on_status is None:
                stats = src.migrate(live=False, progress=progress)
            else:
                with _StatusStream(src, on_status, status_interval):
                    stats = src.migrate(live=False, progress=progress)
    finally:
        closing: list[Region | FileDevice] = [*regions, *devices]
        for resource in closing:
            resource.close()
    log.info("sent %s in %.3f s", format_bytes(stats.ram_bytes), stats.total_time_s)
    return stats


class _StatusStream:
    """Reports a Source's status from a thread while the block runs, then its last."""

    def __init__(self, source: Source, on_status: Callable[[dict[str, Any]], object],
                 interval: float) -> None:
        self._source, self._on_status, self._interval = source, on_status, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastmfd status", daemon=True)
        self._failed: OSError | None = None     # a status line could not be written

    def __enter__(self) -> "_StatusStream":
        start_thread(self._thread)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if self._failed is None:
            self._on_status(self._source.status())
        elif exc_type is None:          # the migration's own error goes first
            raise self._failed

    def _run(self) -> None:
        # A reader that went away (`| head -1`: EPIPE) or a full disk stops the lines,
        # not the migration; the command then ends as its output could not be written
        # (the thread died with a traceback on stderr, the migration running on).
        try:
            while not self._done.wait(self._interval):
                self._on_status(self._source.status())
        except OSError as exc:
            self._failed = exc


def listen_once(address: str | Listener, directory: str, *, per_session: bool = False,
                timeout: float = 3600.0, stall_timeout: float | None = None,
                on_listening: Callable[[str], object] | None = None,
                force: bool = False, keep_partial: bool = False, tls: TLSConfig | None = None,
                auth_key: bytes | None = None, max_size: int | None = None,
                max_memory: int | None = None, prealloc: bool = False,
                huge_pages: bool = False, warm: WarmFiles | None = None,
                on_destination: Callable[[Destination], object] | None = None,
                on_session: Callable[[Setup], object] | None = None
                ) -> tuple[DestinationResult, SavedFiles]:
    """Receive one migration into ``directory``: ``<region>.img`` files mapped
    while they are written, ``<idstr>.<instance>.state`` for each device and
    ``manifest.json`` (names: :func:`~.outputs.output_name`). Files are written
    as ``.part`` and renamed once everything is loaded and on disk; a failure
    removes them (``keep_partial``: keeps them as ``.part``); an existing file is
    replaced only with ``force`` (see :mod:`.outputs`); what a listener killed
    outright left there is named first (:mod:`.unfinished`). Returns the result
    and the files written (:class:`~.outputs.SavedFiles`).
    ``per_session``: into ``directory/<session uuid>/`` instead, made when SETUP
    names the session. ``max_size``: most bytes of regions a source may announce
    (default: what the directory has free); ``max_memory``: the Destination's
    memory bound (device state in flight, the receive channels' buffers);
    ``prealloc``: each region's file faulted in before the source sends (the
    Destination's); ``huge_pages``:
    the region files ask for transparent huge pages (ConfigError where the
    directory's file system gives none); ``warm``:
    where faulted-in files may come from; ``on_destination(dst)``: called with the
    :class:`Destination` once it listens; ``on_session(setup)``: with the source's
    SETUP as it comes, before anything is planned for it. ``address`` may be a
    socket already listening (see :func:`listen_sessions`)."""
    def output_dir(path: str, new: bool = False) -> OutputDir:
        return OutputDir(path, force=force, keep_partial=keep_partial, max_bytes=max_size,
                         warm=warm, huge_pages=huge_pages, new=new, cli=True)

    out = None if per_session else output_dir(directory)
    if out is not None:
        warn_of_unfinished_receives(directory)      # (listen_sessions' said them)

    def made() -> OutputDir:
        """``out``, made by now: it is made at SETUP at the latest."""
        assert out is not None, "made before the regions and the end"
        return out

    try:
        with Destination(address, timeout=timeout, region_factory=lambda *region:
                         made().region(*region), tls=tls, auth_key=auth_key,
                         stall_timeout=stall_timeout, max_memory=max_memory,
                         prealloc=prealloc) as dst:
            if on_listening is not None:
                on_listening(dst.listening_on)
            if on_destination is not None:
                on_destination(dst)

            def on_setup(setup: Setup) -> None:
                nonlocal out
                log.info("the source's SETUP: %d region(s) (%s), %d device(s), %d channel(s), "
                         "compression %s", len(setup.regions),
                         format_bytes(sum(r.size for r in setup.regions)), len(setup.devices),
                         setup.channels, setup.compression)
                if on_session is not None:
                    on_session(setup)
                if out is None:
                    out = output_dir(os.path.join(directory, setup.uuid.hex()), new=True)
                out.plan(setup)
                for device in setup.devices:
                    dst.add_loader(*device.key, out.loader(device.key))

            result = dst.receive(on_setup=on_setup, on_resume=lambda: made().commit())
    except BaseException:
        if out is not None:
            out.abort()     # after the Destination stopped: nothing writes any more
        raise
    finally:
        if out is not None:
            out.close()
    return result, made().files()


@dataclass(frozen=True)
class FailedSession:
    """A session of :func:`listen_sessions` that failed (a source had connected)."""
    error: FastMFDError
    session: str | None
    """Its uuid in hex (its directory's name), None if it failed before SETUP named it."""
    refused_connections: int
    """Connections refused while it waited and received (as ReceiveStats counts them)."""

    def as_json(self) -> dict[str, Any]:
        """What ``listen --json`` prints for it, a line as a received session has."""
        return {"failed": str(self.error), "session": self.session,
                "refused_connections": self.refused_connections}


def listen_sessions(address: str, directory: str, *, sessions: int | None = None,
                    on_listening: Callable[[str], object] | None = None,
                    **options: Any
                    ) -> Iterator[tuple[DestinationResult, SavedFiles] | FailedSession]:
    """Receive ``sessions`` migrations (None: until interrupted), one after another
    on one listening socket, each into ``directory/<session uuid>/`` (see
    :func:`listen_once`, which takes ``options``). Yields each one's ``(result,
    files)``, or a :class:`FailedSession` for one that failed, and goes on: a
    failed or hostile session costs only itself. A wait of ``timeout`` no source came in
    is no session: the listener waits again. A failure before any source
    connected is this side's own (its processes or threads cannot start: a
    process limit), which the next session would meet at once: it is raised,
    ending the sessions, and is never counted as one. Without a
    ``stall_timeout`` given, each session's is the default (30 s), not its
    source's: a source may say up to a day, and one stopped would hold every
    later one that long. As it starts, it names (log warnings) the unfinished
    receives a listener killed outright left in ``directory``
    (:mod:`.unfinished`).

    With ``prealloc``, each session's region files are faulted in for the next
    one between sessions (:class:`~.warm_files.WarmFiles`, at most
    ``max_memory`` bytes of them), so a session of the same geometry lands in
    memory that is there."""
    check_writable(directory)           # before any session: not each at its SETUP
    check_usable()
    if options.get("stall_timeout") is None:
        options["stall_timeout"] = MigrationConfig.stall_timeout
    if options.get("huge_pages"):
        check_huge_pages(directory)
    requested = parse_address(address)
    listener = listen(requested)
    warm = None
    made: list[str] = []
    try:
        # The sessions' parent, made now (the warm files go in it too): removed at
        # the end if no session left anything in it.
        try:
            made = make_directories(directory)
        except OSError as exc:
            raise ConfigError(f"output directory {directory}: {exc.strerror or exc}") from None
        check_only_yours(directory)     # the warm files go in it: before they are made
        warn_of_unfinished_receives(directory)      # what a killed listener left
        if options.get("prealloc") and sessions != 1:
            warm = WarmFiles(directory, options.get("max_memory"),
                             huge_pages=bool(options.get("huge_pages")))
        if on_listening is not None:
            on_listening(listening_on(listener, bound_address(listener, requested)))
        served = 0
        while sessions is None or served < sessions:
            listening: list[Destination] = []
            named: list[Setup] = []
            try:
                result, files = listen_once(listener, directory, per_session=True, warm=warm,
                                            on_destination=listening.append,
                                            on_session=named.append, **options)
            except NoSourceError:
                continue        # a wait no source came in is no session: the next begins
            except FastMFDError as exc:
                if not any(dst.source_connected for dst in listening):
                    raise       # retried, it failed again at once, forever (~300 forks/s)
                served += 1
                yield FailedSession(exc, named[0].uuid.hex() if named else None,
                                    sum(dst.refused_total for dst in listening))
                continue
            served += 1
            if warm is not None and served != sessions:
                warm.refill((r.size, r.page_size) for r in result.regions.values())
            yield result, files
    finally:
        if warm is not None:
            warm.close()
        remove_directories_made(made)
        listener.close()
        if requested.path is not None:
            remove_socket_file(requested.path)
