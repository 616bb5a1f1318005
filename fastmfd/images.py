"""Synthetic memory images for benchmarks and demos: :class:`Image`.

An image is a file on tmpfs mapped as a :class:`~fastmfd.Region`, so the same
bytes can be migrated by fastmfd, sent by a plain socket, and used as a real
QEMU guest's RAM (``memory-backend-file``) without copying::

    Image.create("mixed", 1 << 30)
      <tmpfs>/fastmfd-bench-XXXX/image-mixed.img ── Region.from_file ──▶ .region
                                                 └─ path ─▶ QEMU mem-path, sendall peer

Kinds (deterministic, so every run moves the same bytes):

- ``random``: incompressible (a splitmix64 stream): compression only costs.
- ``mixed``: half the pages zero, at pseudo-random places, the other half
  English-like text (compresses about 2-3x with zlib/zstd level 1).
- ``zero``: every page zero (a freshly booted guest's idle RAM).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile

import numpy as np

from . import _core
from .errors import ConfigError
from .regions import Region

__all__ = ["Image", "IMAGE_KINDS", "fill_image", "scratch_dir", "scratch_parent"]

IMAGE_KINDS = ("random", "mixed", "zero")
PAGE_SIZE = 4096
_TEXT_CORPUS_BYTES = 16 << 20     # text pages cycle over this much distinct text
_FILL_BATCH_PAGES = 4096          # pages copied per numpy assignment (bounds temporaries)


def scratch_parent() -> str:
    """Where scratch directories go: tmpfs (``/dev/shm``) when there is one.

    Images and destination files live in memory, as guest RAM does: a disk
    file would add writeback to every measurement.
    """
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def scratch_dir(tag: str = "bench") -> str:
    """A new private directory in :func:`scratch_parent`; the ``fastmfd-`` prefix
    makes a leaked one easy to find beside leaked segments."""
    return tempfile.mkdtemp(prefix=f"fastmfd-{tag}-", dir=scratch_parent())


def fill_image(array: np.ndarray, kind: str, *, seed: int = 0) -> None:
    """Write image ``kind`` into ``array`` (uint8, a whole number of pages, zero-filled)."""
    if kind not in IMAGE_KINDS:
        raise ConfigError(f"unknown image {kind!r}; choose one of {', '.join(IMAGE_KINDS)}")
    if array.size % PAGE_SIZE:
        raise ConfigError(f"an image is whole {PAGE_SIZE}-byte pages, not {array.size} bytes")
    if kind == "random":
        _core.fill_pattern(array, seed, 0)
    elif kind == "mixed":
        _fill_mixed(array.reshape(-1, PAGE_SIZE), seed)
    # "zero": the array already is.


def _fill_mixed(pages: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    npages = len(pages)
    # Scattered rather than in one block: every packet then carries both
    # kinds, as in a real guest, and page runs are not trivially contiguous.
    text_pages = np.sort(rng.permutation(npages)[: npages - npages // 2])
    corpus = english_like_text(min(_TEXT_CORPUS_BYTES, len(text_pages) * PAGE_SIZE),
                               seed).reshape(-1, PAGE_SIZE)
    for start in range(0, len(text_pages), _FILL_BATCH_PAGES):
        batch = text_pages[start:start + _FILL_BATCH_PAGES]
        pages[batch] = corpus[np.arange(start, start + len(batch)) % len(corpus)]


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


class Image:
    """An image file in a private tmpfs directory, mapped as region ``name``.

    The Image owns the directory: :meth:`close` unmaps the region and removes
    the directory with everything benchmarks put in it (destination files).
    """

    def __init__(self, kind: str, size: int, directory: str, region: Region) -> None:
        self.kind = kind
        self.size = size
        self.directory = directory
        self.region = region

    @property
    def path(self) -> str:
        return os.path.join(self.directory, f"image-{self.kind}.img")

    @classmethod
    def create(cls, kind: str, size: int, *, name: str = "pc.ram", seed: int = 0) -> "Image":
        if kind not in IMAGE_KINDS:
            raise ConfigError(f"unknown image {kind!r}; choose one of {', '.join(IMAGE_KINDS)}")
        if size <= 0 or size % PAGE_SIZE:
            raise ConfigError(f"image size must be a positive multiple of {PAGE_SIZE}, "
                              f"not {size}")
        directory = scratch_dir()
        region = None
        try:
            region = Region.from_file(name, os.path.join(directory, f"image-{kind}.img"),
                                      size=size)
            fill_image(region.array, kind, seed=seed)
            return cls(kind, size, directory, region)
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

    def matches(self, data) -> bool:
        """True when ``data`` (a buffer, array or file path) holds exactly the image's bytes."""
        if isinstance(data, (str, os.PathLike)):
            if os.path.getsize(data) != self.size:
                return False
            with open(data, "rb") as file, \
                    mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                other = np.frombuffer(mapped, dtype=np.uint8)
                try:
                    return bool(np.array_equal(other, self.region.array))
                finally:
                    del other
        return bool(np.array_equal(np.frombuffer(data, dtype=np.uint8), self.region.array))

    def close(self) -> None:
        self.region.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
