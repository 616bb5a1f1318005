"""The files ``fastmfd listen`` writes into its directory, and how it keeps them safe.

::

    OutputDir(D)   D opened once; every name below is relative to that descriptor
    SETUP          plan(): the regions must fit in ``max_bytes`` (default: D's free space);
                   one file name per region, device and the manifest (injective,
                   within NAME_MAX); an existing final name is refused unless ``force``
                   (a symbolic link there is replaced as a link, never followed), before
                   anything is written; NAME.part created O_CREAT|O_EXCL|O_NOFOLLOW
                   (listen --prealloc of several sessions: a warm file renamed to it,
                   see :mod:`.warm_files`)
    receiving      regions: their .part files, mapped (the Destination msyncs them
                   before LOADED); devices: a FileLoader each (fsync in load_finish,
                   before LOADED)
    on_resume      commit(): manifest.json.part written and fsynced; with ``force``, the
                   manifest.json of the save being replaced removed and D fsynced first,
                   then the files it listed that this save does not write
                   (:mod:`.earlier_save`);
                   every .part renamed to its final name (the manifest last), D fsynced;
                   only then does the source hear RESUMED and its migrate() return
    any failure    abort(): the manifest first, then the .part files removed (kept,
                   still named .part, with ``keep_partial``); names already renamed
                   are taken back (each found by its file's identity); a
                   session's own directory removed if this made it

A migration from QEMU (:mod:`fastmfd.qemu`) plans with plan_qemu(): one
``<idstr>.img`` per RAMBlock (region() maps it), ``vmstate.bin`` for the
rest of the main channel (stream(): its .part file, written in order) and a
manifest the caller composes (commit(document)).

So a final name in D always holds complete, durable data, and a ``manifest.json``
there says the migration it lists finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from ..devices import FileLoader, WriteBudget
from ..errors import ConfigError, OutputError
from ..protocol.setup import Setup
from ..regions import Region, check_huge_pages
from ..shm import file_identity
from ..units import format_bytes
from .new_files import (make_directories, make_new_directory, remove_directories_made,
                        rename_without_replacing, try_making_a_file, write_durably)
from ..ownership import check_only_yours
from .warm_files import WarmFiles
from .earlier_save import listed_files, remove_files

__all__ = ["OutputDir", "SavedFiles", "output_name", "check_writable",
           "MANIFEST", "VMSTATE"]

log = logging.getLogger("fastmfd")


@dataclass(frozen=True)
class SavedFiles:
    """Where a save's files are, by what each holds. Kept apart by kind: a region
    (or QEMU RAMBlock) may be named ``manifest``, ``vmstate`` or ``nic0/1``."""
    regions: dict[str, str]                 # region name (QEMU: RAMBlock idstr) -> path
    devices: dict[tuple[str, int], str]     # (idstr, instance_id) -> path
    streams: dict[str, str]                 # QEMU: "vmstate" -> path
    manifest: str
    # Path -> bytes, as committed: a consumer may take a save away once its
    # manifest is there, before a listener reports it (a --forever one died of it).
    sizes: dict[str, int]

    def listed(self) -> list[tuple[str, str]]:
        """(what, path) for each file, in the order a person reads them."""
        return [*((f"region {name}", p) for name, p in self.regions.items()),
                *((f"device {idstr}/{instance}", p)
                  for (idstr, instance), p in self.devices.items()),
                *self.streams.items(), ("manifest", self.manifest)]

    def as_json(self) -> dict[str, Any]:
        """For ``--json``: regions and devices (as ``idstr/instance``) in maps of
        their own, each stream and the manifest by its key."""
        return {"regions": self.regions,
                "devices": {f"{idstr}/{instance}": p
                            for (idstr, instance), p in self.devices.items()},
                **self.streams, "manifest": self.manifest}

MANIFEST = "manifest.json"
VMSTATE = "vmstate.bin"
PART = ".part"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")
# Longest stem kept whole: with ".4294967295.state.part" (22 bytes) a name stays
# well within NAME_MAX (255 bytes).
STEM_MAX = 200
_DIGEST = 12        # hex digits of SHA-256 that tell changed names apart


def output_name(name: str) -> str:
    """The file stem for a region or device name.

    A name made of ``A-Za-z0-9._@+-`` that does not start with a dot and has at
    most STEM_MAX characters is its own stem. Any other name keeps its safe
    characters (the others become ``_``, leading dots go), cut short, plus ``~``
    and 12 hex digits of its SHA-256: ``~`` is never in a name kept whole, so
    two different names never share a stem (``a/b`` -> ``a_b~…``, ``a_b`` -> ``a_b``).
    """
    safe = _UNSAFE.sub("_", name).lstrip(".")
    if safe == name and len(name) <= STEM_MAX:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST]
    return f"{safe[:STEM_MAX - _DIGEST - 1]}~{digest}"


@dataclass
class _Output:
    """One file of the migration: what the manifest says of it, its names, and
    the identity of the .part file this listener created (None until then)."""
    entry: dict[str, Any]
    final: str
    identity: tuple[int, int] | None = None
    size: int = 0                           # its bytes, as committed

    @property
    def part(self) -> str:
        return self.final + PART


def check_writable(path: str) -> None:
    """ConfigError unless files can be made in ``path``, or, where it does not exist
    yet, in the nearest directory above it (where it would be made), tried with a
    file made and removed there: a listener finds out before it waits for a
    sender, not at the sender's SETUP."""
    named = os.path.abspath(path)
    while not os.path.lexists(named):
        named = os.path.dirname(named)
    if not os.path.exists(named):
        raise ConfigError(f"output directory {path}: {named} is a symbolic link to nothing")
    existing = os.path.realpath(path)       # as the kernel walks it: a link, then ".."
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"output directory {path}: {existing} exists and is not a "
                          f"directory")
    try:
        try_making_a_file(existing, "fastmfd-probe")
    except OSError as exc:
        raise ConfigError(f"output directory {path}: cannot make files in {existing} "
                          f"({exc.strerror or exc})") from None


class OutputDir:
    """The files one migration writes into ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False,
                 keep_partial: bool = False, max_bytes: int | None = None,
                 warm: WarmFiles | None = None, huge_pages: bool = False,
                 new: bool = False, cli: bool = False) -> None:
        """``new``: ``path`` must not exist (a session's own directory: one there
        already, another session's of the same uuid or a link another user put
        there, is refused, never written into). ``cli``: the errors name the
        command line's options (``--force``), not the library's (``force=True``)."""
        self.path, self.cli = os.fspath(path), cli
        self.force, self.keep_partial, self.max_bytes = force, keep_partial, max_bytes
        self.committed = False
        self.warm, self.huge_pages = warm, huge_pages
        check_writable(self.path)
        try:
            # What abort() removes again if it is left empty: a failed migration
            # leaves no directory behind that it made (a session's, or --dir's).
            self._made = (make_new_directory if new else make_directories)(self.path)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                              | (os.O_NOFOLLOW if new else 0))
        except (NotADirectoryError, FileExistsError):
            if new:
                raise ConfigError(f"session directory {self.path}: exists already (a "
                                  f"session of this uuid was received before, or another "
                                  f"put it there): refused, not written into") from None
            raise ConfigError(f"output directory {self.path}: exists and is not a "
                              f"directory") from None
        except OSError as exc:
            raise ConfigError(f"output directory {self.path}: {exc.strerror or exc}") from None
        # Loaders run in another process: they get the directory's resolved path.
        self.real = os.readlink(f"/proc/self/fd/{self.fd}")
        self.regions: dict[str, _Output] = {}
        self.devices: dict[tuple[str, int], _Output] = {}
        self.streams: dict[str, _Output] = {}       # files written in order (vmstate)
        self.manifest = _Output({}, MANIFEST)
        self._device_budget: WriteBudget | None = None     # plan(): with --max-size
        try:
            check_only_yours(self.path, self.fd)
            if huge_pages:
                check_huge_pages(self.real)
            # A save already there is refused now, before a migration comes for it
            # (and fails at SETUP), unless ``force``; plan() checks again.
            self._claim(self.manifest)
        except BaseException:
            os.close(self.fd)
            remove_directories_made(self._made)     # refused: leaves nothing
            raise

    # ------------------------------------------------------------ SETUP
    def plan(self, setup: Setup) -> None:
        """Name every file of ``setup``'s regions and devices; refuse, before anything
        is written, a name that is taken (unless ``force``) or that two would share;
        create the devices' .part files."""
        left = self._check_room([(r.size, setup.page_size) for r in setup.regions])
        # (Beyond the free space, a disk that fills fails the write by itself.)
        self._device_budget = None if self.max_bytes is None else WriteBudget(
            left, f"{self._option('max_size')} ({format_bytes(self.max_bytes)}, or the "
                  f"free space if less, less the regions')")
        self.regions = {r.name: _Output({"name": r.name, "size": r.size},
                                        output_name(r.name) + ".img") for r in setup.regions}
        self.devices = {d.key: _Output({"idstr": d.idstr, "instance_id": d.instance_id},
                                       f"{output_name(d.idstr)}.{d.instance_id}.state")
                        for d in setup.devices}
        self._claim_all()
        for out in self.devices.values():
            os.close(self._create(out))

    def plan_qemu(self, blocks: dict[str, int], page_size: int) -> None:
        """Name the files of a QEMU migration: one per RAMBlock (``idstr`` -> size),
        and vmstate.bin; refuse blocks that do not fit and taken names as plan() does."""
        self._check_room([(size, page_size) for size in blocks.values()])
        self.regions = {name: _Output({"idstr": name, "size": size},
                                      output_name(name) + ".img")
                        for name, size in blocks.items()}
        self.streams = {"vmstate": _Output({}, VMSTATE)}
        self._claim_all()

    def stream(self, key: str) -> int:
        """A descriptor open for reading and writing on the new .part file of
        stream ``key`` (the caller checks what it wrote)."""
        return self._create(self.streams[key], os.O_RDWR)

    def _claim_all(self) -> None:
        seen: dict[str, dict[str, Any]] = {}
        for out in self._outputs():
            if out.final in seen:       # only if two SHA-256 prefixes collide
                raise ConfigError(f"{seen[out.final]} and {out.entry} would both be written "
                                  f"to {self._show(out.final)}")
            seen[out.final] = out.entry
        for out in self._outputs():
            self._claim(out)

    def _option(self, name: str, value: str = "") -> str:
        """Option ``name`` as who made this OutputDir calls it: the command line's
        flag (``--max-size``), or the library's parameter (``max_size``, ``force=True``)."""
        if self.cli:
            return "--" + name.replace("_", "-")
        return f"{name}={value}" if value else name

    def _check_room(self, sizes: list[tuple[int, int]]) -> int:
        """Region files are sparse and fill as pages arrive: a sender must not be
        able to fill the disk, so what it announces (``sizes``: each region's size
        and page size) must fit first. Returns what the limit leaves. The warm
        files held count as free: once the sizes fit, those of other sizes are
        removed (the regions take the others' place)."""
        size = sum(region_size for region_size, _ in sizes)
        if self.warm is not None:
            self.warm.stop_refill()     # its half-made file's room is free once it stops
        info = os.statvfs(self.fd)
        warm = self.warm.held_bytes if self.warm is not None else 0
        free = info.f_bavail * info.f_frsize + warm
        limit = free if self.max_bytes is None else min(self.max_bytes, free)
        if size > limit:
            held = f", {format_bytes(warm)} of it the listener's warm files" if warm else ""
            why = (f"{self._option('max_size')} allows {format_bytes(self.max_bytes)}"
                   if limit == self.max_bytes else
                   f"{self.path} has {format_bytes(free)} free{held}")
            raise ConfigError(f"the source sends {format_bytes(size)} of regions; {why}")
        if self.warm is not None:
            self.warm.keep(sizes)
        return limit - size

    def region(self, name: str, size: int, page_size: int) -> Region:
        """The Destination's region factory: ``name`` mapped from its new .part file
        (a warm file moved there, when one of its size is ready)."""
        out = self.regions[name]
        warm = self.warm.take(size, page_size) if self.warm is not None else None
        adopted = warm is not None and self._adopt(warm, out)
        # Opened as the file it is (identity recorded, so abort() removes it if
        # mapping fails), never through a link swapped in since.
        fd = self._open_adopted(out) if adopted else self._create(out, os.O_RDWR)
        try:
            region = Region.from_fd(name, fd, size=size, page_size=page_size,
                                    huge_pages=self.huge_pages)
        finally:
            os.close(fd)
        if adopted:
            region.faulted_in = True
            log.info("region %s: into a warm file (faulted in before the session)", name)
        else:
            region.zero_filled = True       # a file created empty, just now
        return region

    def _open_adopted(self, out: _Output) -> int:
        """``out``'s .part file as _adopt() linked it: the same file, not a link."""
        try:
            fd = os.open(out.part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            raise ConfigError(f"{self._show(out.part)}: cannot open it: {exc.strerror}") from None
        if file_identity(fd) != out.identity:
            os.close(fd)
            raise ConfigError(f"{self._show(out.part)} was replaced while it was being opened")
        return fd

    def _adopt(self, warm: str, out: _Output) -> bool:
        """Move the warm file ``warm`` to ``out``'s .part name, which must be free: a
        link, which never replaces a file that appeared there since plan() (a rename
        would), then the warm name unlinked. False (the warm file dropped) if taken."""
        try:
            os.link(warm, out.part, dst_dir_fd=self.fd, follow_symlinks=False)
        except FileExistsError:
            os.unlink(warm)
            return False
        out.identity = self._identity(out.part)     # abort() removes it from here on
        os.unlink(warm)
        return True

    def loader(self, key: tuple[str, int]) -> FileLoader:
        """The loader writing device ``key`` into its .part file, made by plan(): it
        runs in another process, which opens it by path, and refuses another file
        found there (the directory moved, a link swapped in)."""
        out = self.devices[key]
        return FileLoader(os.path.join(self.real, out.part), file_id=out.identity,
                          budget=self._device_budget)

    def _claim(self, out: _Output) -> None:
        """Refuse a taken final name unless ``force`` (a directory always); a .part
        left behind (``keep_partial``) is refused too, or removed with ``force``."""
        for name in (out.final, out.part):
            st = self._stat(name)
            if st is None:
                continue
            what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                    "a directory" if stat.S_ISDIR(st.st_mode) else "a file")
            if stat.S_ISDIR(st.st_mode) or not self.force:
                raise ConfigError(f"{self._show(name)} exists ({what}): not replacing it"
                                  + ("" if stat.S_ISDIR(st.st_mode)
                                     else f" without {self._option('force', 'True')}"))
            if name == out.part:
                try:
                    os.unlink(name, dir_fd=self.fd)     # the link itself, never its target
                except OSError as exc:      # another user's, in a sticky directory
                    raise ConfigError(f"{self._show(name)} exists ({what}) and cannot be "
                                      f"removed: {exc.strerror or exc}") from None

    def _create(self, out: _Output, access: int = os.O_WRONLY) -> int:
        """Create ``out``'s .part file, new (never through a link); returns its
        descriptor, open for writing (``access``)."""
        # Memory and device state are private, as QEMU's dumps are (0600).
        try:
            fd = os.open(out.part, access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        except FileExistsError:
            raise OutputError(f"{self._show(out.part)} appeared after its name was claimed "
                              f"(another listener writing into {self.path}?): not replacing "
                              f"it") from None
        out.identity = file_identity(fd)
        return fd

    # ------------------------------------------------------------ the end
    def commit(self, document: dict[str, Any] | None = None) -> None:
        """Everything is loaded and on disk: write the manifest (``document``, or
        the regions and devices of plan()), rename every .part to its final name
        (the manifest last), make the renames durable. A final name taken since
        plan() is not replaced (but with ``force``): the migration fails. What
        fails raises an OutputError naming the file."""
        self._write_manifest(document)
        if self.force:
            self._retire_earlier_save()
        for out in self._outputs():
            st = self._stat(out.part)
            if st is None or (st.st_dev, st.st_ino) != out.identity:
                raise OutputError(f"{self._show(out.part)} was replaced while the "
                                  f"migration was received")
            out.size = st.st_size       # (the save may be taken away once committed)
            try:
                if self.force:
                    os.rename(out.part, out.final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                else:
                    rename_without_replacing(out.part, out.final, self.fd)
            except FileExistsError:
                raise OutputError(f"{self._show(out.final)} appeared while the migration was "
                                  f"received: not replacing it without "
                                  f"{self._option('force', 'True')}") from None
            except OSError as exc:
                raise OutputError(f"{self._show(out.part)}: renaming it to {out.final} "
                                  f"failed: {exc.strerror or exc}") from exc
        self._sync("its new names")
        # Complete and durable: the source may be told so now, and nothing after
        # (a signal as the workers stop) takes it back (abort()).
        self.committed = True

    def _sync(self, what: str) -> None:
        """Make ``what`` done in the directory (names made, removed) durable."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: making {what} durable failed: "
                              f"{exc.strerror or exc}") from exc

    def _retire_earlier_save(self) -> None:
        """Remove the manifest of the save ``force`` replaces, durably, before any of
        its files is: a crash among the renames below would otherwise leave that
        manifest listing files that are partly this migration's, a directory that
        says it holds a complete save and mixes two. Then the files it listed that
        this save does not write (see :mod:`.earlier_save`): no manifest lists them
        any more, so they would stay for ever (commit()'s last fsync makes it durable)."""
        listed = listed_files(self.fd, MANIFEST, self._show(MANIFEST))
        try:
            os.unlink(MANIFEST, dir_fd=self.fd)         # a link itself, never its target
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutputError(f"{self._show(MANIFEST)}: removing the manifest of the save "
                              f"being replaced failed: {exc.strerror or exc}") from exc
        self._sync("the old manifest's removal")
        ours = {name for out in self._outputs() for name in (out.final, out.part)}
        remove_files(self.fd, listed or [], ours, self.path)

    def _write_manifest(self, document: dict[str, Any] | None) -> None:
        if document is None:
            regions = [{**out.entry, "file": out.final} for out in self.regions.values()]
            devices = [{**out.entry, "size": os.stat(out.part, dir_fd=self.fd,
                                                     follow_symlinks=False).st_size,
                        "file": out.final} for out in self.devices.values()]
            document = {"regions": regions, "devices": devices}
        data = json.dumps(document, indent=2).encode() + b"\n"
        try:
            fd = self._create(self.manifest)
            try:
                write_durably(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"{self._show(self.manifest.part)}: writing the manifest "
                              f"failed: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        """The migration failed: remove what this listener created (its .part files,
        and final names it already renamed), or with ``keep_partial`` leave it
        all under .part names. Best effort: the failure is what the caller reports.

        The manifest goes first (commit()'s order reversed): a process killed
        meanwhile leaves no manifest listing files that are gone. The name each
        file is under is told by its identity, not by a record commit() keeps:
        an exception from a signal's handler can come between a rename and the
        next statement (a manifest renamed so stayed, its files removed).

        Once commit() is through, the save stands: the source may have been told
        it succeeded (a SIGTERM as the listener stopped its workers removed it)."""
        if self.committed:
            return
        kept = []
        for out in reversed(self._outputs()):
            if out.identity is None:
                continue
            try:
                ours = [name for name in (out.final, out.part)
                        if self._identity(name) == out.identity]
                for name in ours:       # both: a link made, its source not yet unlinked
                    if self.keep_partial and name == out.final and out.part not in ours:
                        os.rename(name, out.part, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                    elif not self.keep_partial or name == out.final:
                        os.unlink(name, dir_fd=self.fd)
                if self.keep_partial and ours:
                    kept.append(self._show(out.part))
            except OSError:
                pass
        if kept:    # the failure says what failed; this, where its files are (a review)
            log.warning("kept the failed receive's partial files: %s", ", ".join(reversed(kept)))
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        remove_directories_made(self._made)     # each only if empty: partial files stay

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------ helpers
    def files(self) -> SavedFiles:
        """The final paths of what this save holds, and their sizes as committed."""
        def path(out: _Output) -> str:
            return os.path.join(self.path, out.final)
        return SavedFiles(regions={name: path(o) for name, o in self.regions.items()},
                          devices={key: path(o) for key, o in self.devices.items()},
                          streams={key: path(o) for key, o in self.streams.items()},
                          manifest=path(self.manifest),
                          sizes={path(o): o.size for o in self._outputs()})

    def _outputs(self) -> list[_Output]:
        return [*self.regions.values(), *self.devices.values(), *self.streams.values(),
                self.manifest]

    def fsync_part(self, name: str) -> None:
        """Make region ``name``'s .part file durable, its size included (a mapped
        region's msync writes its pages, not the file's metadata)."""
        fd = os.open(self.regions[name].part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _stat(self, name: str) -> os.stat_result | None:
        """``name`` in the directory, itself (a link is not followed), or None."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _identity(self, name: str) -> tuple[int, int] | None:
        st = self._stat(name)
        return None if st is None else (st.st_dev, st.st_ino)

    def _show(self, name: str) -> str:
        return os.path.join(self.path, name)
