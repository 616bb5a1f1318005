"""Synthetic memory images for demos, benchmarks and tests.

Each fills a region in place, fast (numpy and the core's pattern generator,
never a Python loop over pages), deterministically from a seed:

- ``random``: incompressible bytes in every page;
- ``text``: English-like text in every page (:func:`english_like_text`);
- ``mixed``: half zero pages; the other half alternates text and random
  pages (the demo's image);
- ``halftext``: every other page zero, the others text — the benchmarks'
  image of issue #3, "half zero pages, half text";
- ``zero``: all zero pages.

:class:`Image` keeps one in a file on tmpfs mapped as a region, so fastmfd,
a plain socket and a real QEMU guest (``memory-backend-file``) can all move
the same bytes without copying them::

    Image.create("halftext", 1 << 30)
      <tmpfs>/fastmfd-bench-PID-RANDOM/image-halftext.img ── Region.from_file ──▶ .region
                                                    └─ .path ──▶ QEMU mem-path, sendall peer
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from .. import _core
from ..errors import ConfigError
from ..regions import Region
from ..shm import SHM_DIR, free_bytes, new_name, proc_kib
from ..units import format_bytes
from .whole import clean_up_whole

if TYPE_CHECKING:
    from typing_extensions import Buffer     # collections.abc.Buffer from Python 3.12

__all__ = ["IMAGE_KINDS", "Image", "fill_image", "english_like_text", "scratch_dir",
           "scratch_parent", "check_scratch_room"]

IMAGE_KINDS = ("random", "text", "mixed", "halftext", "zero")
# Text pages cycle over this much distinct text: far beyond what zlib (32 KiB)
# or zstd level 1 (512 KiB) look back, so the repetition cannot be exploited.
_TEXT_CORPUS_BYTES = 4 << 20
_COMPARE_CHUNK = 64 << 20         # bytes compared at a time (bounds the temporaries)


class Fillable(Protocol):
    """What :func:`fill_image` fills: a Region, or anything with its ``array`` and ``page_size``."""
    @property
    def array(self) -> npt.NDArray[np.uint8]: ...
    @property
    def page_size(self) -> int: ...


def fill_image(region: Fillable, kind: str, seed: int = 0) -> None:
    """Fill ``region`` (a Region or anything with ``.array`` and ``.page_size``)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; choose one of {IMAGE_KINDS}")
    page_size = region.page_size
    pages = region.array.reshape(-1, page_size)
    # Every page is written below: allocated first, so that a /dev/shm too full for
    # them is a clean error here, not a SIGBUS halfway through.
    _core.populate(region.array.reshape(-1), "the image")
    if kind == "zero":
        pages[:] = 0
        return
    # Random content from the core's generator: seeded, a few GB/s, no temporaries.
    _core.fill_pattern(region.array, seed, 0)
    if kind == "random":
        return
    rows = {"text": np.arange(len(pages)), "mixed": np.arange(1, len(pages), 4),
            "halftext": np.arange(1, len(pages), 2)}[kind]
    if kind != "text":
        pages[0::2] = 0                              # half zero pages
    corpus_bytes = min(_TEXT_CORPUS_BYTES, len(rows) * page_size)
    corpus = english_like_text(corpus_bytes, seed).reshape(-1, page_size)
    for start in range(0, len(rows), len(corpus)):   # one corpus-sized batch at a time
        batch = rows[start:start + len(corpus)]
        pages[batch] = corpus[:len(batch)]


def file_holds(file: io.RawIOBase, expected: npt.NDArray[np.uint8]) -> bool:
    """True when ``file`` holds exactly ``expected``'s bytes, read from where it is.

    Read, not mapped: a hole of a sparse file on tmpfs (a destination's zero page)
    reads as zeros and takes no memory, where a read through a mapping allocates the
    page, and is a SIGBUS where /dev/shm is full."""
    chunk = np.empty(min(_COMPARE_CHUNK, max(1, len(expected))), dtype=np.uint8)
    at = 0
    while at < len(expected):
        got = file.readinto(chunk.data[:len(expected) - at])
        if not got or not np.array_equal(chunk[:got], expected[at:at + got]):
            return False
        at += got
    return not file.read(1)


def region_holds(region: Region, expected: npt.NDArray[np.uint8]) -> bool:
    """:func:`file_holds` of ``region``'s file."""
    with region.open_file() as file:
        return file_holds(file, expected)


def english_like_text(nbytes: int, seed: int = 0) -> np.ndarray:
    """``nbytes`` (a multiple of 8) of lowercase words and punctuation, as a uint8 array.

    Words come from a made-up vocabulary with English letter frequencies and
    a Zipf-like word frequency, which is what makes real text compress as it
    does: frequent short words, a long tail, no long repeats.
    """
    rng = np.random.default_rng(seed + 1)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    letter_freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
                            2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    nwords = 8192
    lengths = rng.integers(1, 11, nwords) + 1                       # word plus its separator
    vocab = rng.choice(letters, size=int(lengths.sum()), p=letter_freq / letter_freq.sum())
    starts = np.cumsum(lengths) - lengths
    vocab[starts + lengths - 1] = ord(" ")
    word_freq = 1.0 / np.arange(1, nwords + 1) ** 1.05
    ntokens = nbytes // 3 + 1024                                    # words average ~6.5 bytes
    tokens = rng.choice(nwords, size=ntokens, p=word_freq / word_freq.sum())
    token_len = lengths[tokens]
    token_start = np.cumsum(token_len) - token_len
    keep = int(np.searchsorted(token_start, nbytes))                # tokens that start in range
    tokens, token_len, token_start = tokens[:keep], token_len[:keep], token_start[:keep]
    within = np.arange(int(token_start[-1] + token_len[-1])) - np.repeat(token_start, token_len)
    text = vocab[np.repeat(starts[tokens], token_len) + within]
    ends = token_start + token_len - 1                               # separators
    punct = rng.random(len(ends))
    text[ends[punct < 0.06]] = ord(",")
    text[ends[punct > 0.95]] = ord(".")
    text[ends[punct > 0.99]] = ord("\n")
    return np.ascontiguousarray(text[:nbytes])


def scratch_parent() -> str:
    """Where scratch directories go: tmpfs (``/dev/shm``) when there is one.

    Images and destination files live in memory, as guest RAM does: a disk
    file would add writeback to every measurement.
    """
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def scratch_dir(tag: str = "bench") -> str:
    """A new private directory in :func:`scratch_parent`, named as segments are
    (``fastmfd-TAG-PID-RANDOM``): a leaked one is easy to find beside leaked
    segments, and says which process left it."""
    while True:
        path = os.path.join(scratch_parent(), new_name(tag))
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:     # 48 random bits: try another
            continue


def check_scratch_room(need: int, what: str) -> None:
    """ConfigError unless :func:`scratch_parent` has room for ``need`` more bytes of
    ``what``: free space in its file system and, on /dev/shm, memory available (an
    image too large failed only once it was made, after filling /dev/shm)."""
    parent = scratch_parent()
    free = free_bytes(parent)
    memory = proc_kib("/proc/meminfo", "MemAvailable") if parent == SHM_DIR else None
    if need > min(free, memory if memory is not None else free):
        raise ConfigError(f"{what} need {format_bytes(need)}; {parent} has "
                          f"{format_bytes(free)} free" + (
                              f" and the machine {format_bytes(memory)} of memory available"
                              if memory is not None else ""))


class Image:
    """An image file in a private tmpfs directory, mapped as region ``name``.

    The Image owns the directory: :meth:`close` unmaps the region and removes
    the directory with everything benchmarks put in it (destination files).
    """

    def __init__(self, kind: str, size: int, directory: str, path: str, region: Region) -> None:
        self.kind = kind
        self.size = size
        self.directory = directory
        self.path = path            # the file the region maps
        self.region = region

    @classmethod
    def create(cls, kind: str, size: int, *, name: str = "pc.ram", seed: int = 0,
               page_size: int = 4096) -> "Image":
        if kind not in IMAGE_KINDS:
            raise ConfigError(f"unknown image {kind!r}; choose one of {', '.join(IMAGE_KINDS)}")
        if size <= 0 or size % page_size:
            raise ConfigError(f"image size must be a positive multiple of {page_size}, "
                              f"not {size}")
        directory = scratch_dir()
        path = os.path.join(directory, f"image-{kind}.img")
        region = None
        try:
            region = Region.from_file(name, path, size=size, page_size=page_size)
            fill_image(region, kind, seed=seed)
            return cls(kind, size, directory, path, region)
        except BaseException:
            if region is not None:
                region.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def new_path(self, stem: str) -> str:
        """A path for a new file in the image's directory (removed by :meth:`close`)."""
        fd, path = tempfile.mkstemp(prefix=f"{stem}-", suffix=".img", dir=self.directory)
        os.close(fd)
        os.unlink(path)
        return path

    def matches(self, data: Buffer | Region | str | os.PathLike[str]) -> bool:
        """True when ``data`` (a buffer, a region, or a file path) holds exactly the
        image's bytes. A region or a file is read, not mapped (see :func:`file_holds`)."""
        if isinstance(data, Region):
            return region_holds(data, self.region.array)
        if isinstance(data, (str, os.PathLike)):
            with open(data, "rb", buffering=0) as file:
                return file_holds(file, self.region.array)
        return self._same(memoryview(data))

    def _same(self, view: memoryview) -> bool:
        mine = self.region.array
        with view:
            if view.nbytes != self.size:
                return False
            theirs = np.frombuffer(view.cast("B"), dtype=np.uint8)
            try:
                return all(np.array_equal(theirs[i:i + _COMPARE_CHUNK],
                                          mine[i:i + _COMPARE_CHUNK])
                           for i in range(0, self.size, _COMPARE_CHUNK))
            finally:
                del theirs          # before the view is released

    def close(self) -> None:
        """Unmap the region and remove the directory (even if views of it are still out).
        An interrupt (Ctrl-C) stops it once: the rest is removed, then the interrupt
        goes on (an interrupted rmtree left the image in /dev/shm)."""
        clean_up_whole(self._remove)

    def _remove(self) -> None:
        try:
            self.region.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
