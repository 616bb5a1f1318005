"""Warm regions kept between migrations: :class:`RegionPool`.

A destination that serves one migration after another (``fastmfd listen
--forever``, a service) pays each time for fresh memory: every page of a new
region is allocated and cleared on first touch, which costs more than the
transfer itself when the host must find the memory again. A pool keeps the
shared-memory regions of a finished session, so the next session of the same
geometry lands in memory that is already there::

    Destination(region_pool=pool)   at SETUP: pool.prune(SETUP's regions) frees what this
                                    session cannot use; each region it would create is
                                    pool.take(name, size, page_size), or a new one
    leaving the Destination         each of them goes back (pool.give_back): kept while
                                    the pool holds at most max_bytes, freed otherwise
    pool.close()                    frees every region it holds: no /dev/shm segment
                                    outlives it

A region that comes back holds the last session's bytes; the next session
receives into it as into any region it did not create empty: round 1 brings
every page, as data or as a zero page, and the receive engine clears a zero
page wherever the region holds anything else. So nothing of the last session
survives (tests/test_region_pool.py proves it with an image of the same
geometry whose zero pages were data before).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from .arguments import BOOL, STR, UNSIGNED, check_types
from .protocol.setup import RegionSpec
from .regions import Region

__all__ = ["RegionPool", "Loan"]

Geometry = tuple[str, int, int, bool]   # region name, size, page size, huge pages


class RegionPool:
    """Shared-memory regions kept for the next migration of the same geometry,
    at most ``max_bytes`` of them. Thread-safe; use it as a context manager
    (or call :meth:`close`) so its regions are freed."""

    def __init__(self, max_bytes: int) -> None:
        (max_bytes,) = check_types("RegionPool", max_bytes=(max_bytes, UNSIGNED))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._regions: list[Region] = []
        self._closed = False

    @property
    def held_bytes(self) -> int:
        """Bytes of the regions the pool holds now (not those on loan)."""
        with self._lock:
            return sum(region.size for region in self._regions)

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    def take(self, name: str, size: int, page_size: int, huge_pages: bool = False
             ) -> Region | None:
        """A held region of this geometry (its dirty bitmap cleared), or None."""
        # (one of another type matched none: None, as if none were held)
        name, size, page_size, huge_pages = check_types(
            "RegionPool.take", name=(name, STR), size=(size, UNSIGNED),
            page_size=(page_size, UNSIGNED), huge_pages=(huge_pages, BOOL))
        with self._lock:
            for region in self._regions:
                if _geometry(region) == (name, size, page_size, huge_pages):
                    self._regions.remove(region)
                    break
            else:
                return None
        region.dirty.collect()          # the last session's received pages
        return region

    def prune(self, wanted: Iterable[RegionSpec], page_size: int, huge_pages: bool = False
              ) -> None:
        """Free every held region a session of ``wanted`` regions cannot take
        (another geometry, or more of one than it has), so that its memory is
        free for the regions that session creates."""
        needed: dict[Geometry, int] = {}
        for spec in wanted:
            key = (spec.name, spec.size, page_size, huge_pages)
            needed[key] = needed.get(key, 0) + 1
        with self._lock:
            kept, freed = [], []
            for region in self._regions:
                key = _geometry(region)
                if needed.get(key, 0) > 0:
                    needed[key] -= 1
                    kept.append(region)
                else:
                    freed.append(region)
            self._regions = kept
        for region in freed:
            region.close()

    def give_back(self, region: Region) -> None:
        """Keep ``region`` for a later session if the pool has room (and is open),
        else free it."""
        with self._lock:
            keep = (not self._closed and region.owner and not region.closed
                    and sum(r.size for r in self._regions) + region.size <= self.max_bytes)
            if keep:
                self._regions.append(region)
        if not keep:
            region.close()

    def loan(self, region: Region) -> "Loan":
        """What a session owns for ``region``: closing it gives the region back."""
        return Loan(self, region)

    def close(self) -> None:
        """Free every held region (idempotent); regions on loan are freed when they
        come back."""
        with self._lock:
            self._closed = True
            regions, self._regions = self._regions, []
        for region in regions:
            region.close()

    def __enter__(self) -> "RegionPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RegionPool {len(self)} region(s), {self.held_bytes} of {self.max_bytes} bytes>"


class Loan:
    """A region a session uses; ``close()`` gives it back to its pool (once)."""

    def __init__(self, pool: RegionPool, region: Region) -> None:
        self.pool, self.region = pool, region
        self._returned = False

    def close(self) -> None:
        if not self._returned:
            self._returned = True
            self.pool.give_back(self.region)


def _geometry(region: Region) -> Geometry:
    return region.name, region.size, region.page_size, region.huge_pages
