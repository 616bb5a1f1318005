"""Synthetic memory images for demos, benchmarks and tests.

Each fills a region in place, fast (numpy and the core's pattern generator,
never a Python loop over pages), deterministically from a seed:

- ``random``: incompressible bytes in every page;
- ``mixed``: half zero pages; the other half alternates text-like pages
  (compressible) and random pages (the demo's and the benchmarks' image);
- ``text``: every page text-like;
- ``zero``: all zero pages.
"""

from __future__ import annotations

import numpy as np

from . import _core

__all__ = ["IMAGE_KINDS", "fill_image", "text_page"]

IMAGE_KINDS = ("random", "mixed", "text", "zero")

_TEXT = (b"fastmfd moves memory images over parallel channels; page %08d of the guest. "
         b"The quick brown fox jumps over the lazy dog. ")


def text_page(index: int, page_size: int) -> bytes:
    line = _TEXT % index
    return (line * (page_size // len(line) + 1))[:page_size]


def fill_image(region, kind: str, seed: int = 0) -> None:
    """Fill ``region`` (a Region or anything with ``.array`` and ``.page_size``)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; choose one of {IMAGE_KINDS}")
    page_size = region.page_size
    pages = region.array.reshape(-1, page_size)
    if kind == "zero":
        pages[:] = 0
        return
    # Random content from the core's generator: seeded, a few GB/s, no temporaries.
    _core.fill_pattern(region.array, seed, 0)
    if kind == "random":
        return
    # Eight distinct text pages, repeated: compressible within and across packets.
    text = np.frombuffer(b"".join(text_page(seed * 8 + i, page_size) for i in range(8)),
                         dtype=np.uint8).reshape(8, page_size)
    if kind == "text":
        pages[:] = text[np.arange(len(pages)) % 8]
        return
    pages[0::2] = 0                                  # half zero pages
    text_rows = np.arange(1, len(pages), 4)          # a quarter text, a quarter random
    pages[text_rows] = text[text_rows % 8]
