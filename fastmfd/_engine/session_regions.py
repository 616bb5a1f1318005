"""The regions a destination receives one session into, made at SETUP: the
user's own, a factory's, the pool's or new shared memory, each checked against
what the source announces, and the new ones against the memory bound first.

A region is *fresh* when it is new zero memory made for this session (or a
factory's that says it is, ``Region.zero_filled``): there a zero page needs no
write (the receive workers skip them); a user's, another factory's or a pooled
region holds earlier bytes, and its zero pages are cleared where they hold data.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from .. import _core
from ..errors import ConfigError, MigrationError, ProtocolError
from ..protocol.security import ChannelSecurity
from ..protocol.setup import RegionSpec, Setup
from ..region_pool import RegionPool
from ..regions import Region, closed_regions_named, region_to_add
from ..shm import SHM_DIR, cgroup_room, free_bytes
from .admission import GREETING_SPARES, DoorWorkers
from .memory_bound import WORKER_BYTES, MemoryBudget
from .processes import ChildSet
from .session import SessionResources, call_user

__all__ = ["RegionFactory", "RegionParts", "SessionRegions", "make_session_regions",
           "places_pages", "check_writable", "check_every_page_came", "finish_regions",
           "channel_bytes"]

log = logging.getLogger("fastmfd")

RegionFactory = Callable[[str, int, int], Region]


class RegionParts(Protocol):
    """What of the destination's parts the regions come from."""
    user_regions: dict[str, Region]
    region_factory: RegionFactory | None
    region_pool: RegionPool | None
    huge_pages: bool
    prealloc: bool
    max_memory: int | None
    workers: ChildSet       # the receive workers started so far
    resources: SessionResources
    security: ChannelSecurity


class SessionRegions:
    """SETUP's regions in its order, whether each is fresh, what is left of the
    memory bound for the device-state pool (then the greeting spares), and the
    receive workers the session may run."""

    def __init__(self, regions: list[Region], fresh: list[bool], memory_left: int,
                 door: DoorWorkers) -> None:
        self.regions, self.fresh, self.memory_left = regions, fresh, memory_left
        self.door = door


def make_session_regions(setup: Setup, parts: RegionParts) -> SessionRegions:
    """Check SETUP's regions against the memory bound, then make or find each."""
    to_create = _specs_to_create(setup, parts)
    if parts.region_pool is not None:
        parts.region_pool.prune(to_create, setup.page_size, parts.huge_pages)
    door = DoorWorkers(setup.total_channels, len(parts.workers), parts.max_memory is not None)
    left = _memory_left(parts, setup, to_create, door)
    if not setup.devices:       # else DeviceLoading fits them in what its pool leaves
        door.fit(left)
    regions, fresh = [], []
    for spec in setup.regions:
        region, is_fresh = _region(parts, spec.name, spec.size, setup.page_size)
        if not is_fresh:
            # From now on, the pages this session sent (check_every_page_came): what a
            # user's own code, or an earlier session, marked would hide one never sent.
            region.dirty.collect()
        regions.append(region)
        fresh.append(is_fresh)
    return SessionRegions(regions, fresh, left, door)


def places_pages(region: Region, fresh: bool) -> bool:
    """Whether the receive workers place ``region``'s pages (RecvEngine's
    ``place_fds``: the kernel allocates each page as it copies into it, with
    no page fault and no clearing first) rather than write them through their
    mapping: where its memory is not allocated yet. Not memory faulted in
    already (prealloc, a warm file), where the mapping is one copy with
    nothing to fault, nor huge pages, which only a mapping that asks for
    them gets."""
    return fresh and not region.faulted_in and not region.huge_pages


def _specs_to_create(setup: Setup, parts: RegionParts) -> list[RegionSpec]:
    """The regions of SETUP this destination makes in shared memory itself."""
    if parts.region_factory is not None:
        return []
    return [spec for spec in setup.regions if spec.name not in parts.user_regions]


def channel_bytes(setup: Setup, tls: bool) -> int:
    """What the session's receive channels allocate, together: each one's packet
    buffers (sized by SETUP's packet_pages and page_size, cut to the pages of its
    largest region) and, where it compresses with zstd, the largest window a
    peer can make its decoder hold (_core.receive_channel_bytes)."""
    largest = max((spec.size for spec in setup.regions), default=0)
    each = _core.receive_channel_bytes(setup.packet_pages, setup.page_size, largest,
                                       setup.chunk_size or 0, bool(setup.devices),
                                       setup.compression, tls)
    return int(each) * setup.total_channels


def _memory_left(parts: RegionParts, setup: Setup, to_create: list[RegionSpec],
                 door: DoorWorkers) -> int:
    """What SETUP asks this destination to hold, checked before anything is
    allocated: the regions it creates must fit in ``max_memory`` (default: what
    /dev/shm has free) and, with ``max_memory``, the receive channels' buffers
    (channel_bytes) and the worker processes the session needs (``door``'s
    needed, and the reassembly process; memory_bound) too: private memory, not
    /dev/shm's, so not counted against it; and in what this process's memory
    cgroup has left where every page will be written (_cgroup_left); returns
    what is left for the device-state pool, then the greeting spares
    (DoorWorkers.fit). Regions are sparse and filled as data arrives, so this
    bounds, it does not commit."""
    pool = parts.region_pool
    held = pool.held_bytes if pool is not None else 0   # allocated already, of use now
    created = sum(spec.size for spec in to_create)
    budget = parts.max_memory
    if budget is None:
        budget = free_bytes() + held
    if created > budget:
        raise ConfigError(f"the source sends {created} bytes of regions for this "
                          f"destination to hold; it holds at most {budget} (max_memory, "
                          f"or what {SHM_DIR} has free)")
    cgroup_left = _cgroup_left(parts, setup, created, held)
    if parts.max_memory is None:        # the pool: within the cgroup's room too (SHM_LEFT)
        left = budget - created
        return left if cgroup_left is None else min(left, cgroup_left)
    memory = MemoryBudget(budget, "this destination", [(created, "regions")])
    n = setup.total_channels
    channels = channel_bytes(setup, parts.security.tls is not None)
    memory.spend(channels, "receive buffers", (
        f"the source's {n} channel(s) need {channels} bytes of receive buffers (packet_pages "
        f"{setup.packet_pages} x page_size {setup.page_size}, at most the largest region's "
        f"pages, compression {setup.compression})"))
    # A receive worker per channel, or those started ahead if more, and the reassembly
    # process; the greeting spares only where what is left holds them, counted last.
    receivers = ("a receive worker per channel" if n >= len(parts.workers) else
                 f"the {len(parts.workers)} receive workers started ahead (workers=)")
    workers = door.needed + 1
    memory.spend(workers * WORKER_BYTES, "worker processes", (
        f"the source's {n} channel(s) need {workers} worker processes ({receivers}, and "
        f"the reassembly process; up to {GREETING_SPARES} more greet connections where "
        f"max_memory has room), {WORKER_BYTES >> 20} MiB each: {workers * WORKER_BYTES} "
        f"bytes"))
    return memory.left


def _cgroup_left(parts: RegionParts, setup: Setup, created: int, held: int) -> int | None:
    """What this process's memory cgroup has left once the pages of the ``created``
    regions that will be written are, or None where no cgroup limits it. Only
    written pages are charged (tmpfs), and a fresh region's zero pages are not
    written: where the regions' pages will all be (prealloc faults them in, or
    the source lists no zero page), ConfigError unless they fit, else the OOM
    killer ended the session midway; otherwise they may well fit, as mostly
    empty guest RAM does, so only a warning where their full size would not."""
    room = cgroup_room()
    if room is None:
        return None
    left, limit = room[0] + held, room[1]
    written = ("prealloc" if parts.prealloc else
               None if setup.zero_page_detection else "the source detects no zero page")
    if written is not None and created > left:
        raise ConfigError(f"the source sends {created} bytes of regions for this "
                          f"destination to hold, every page of them written ({written}); it "
                          f"holds at most {left} (what this process's memory cgroup has "
                          f"left: {limit}; past it the kernel's out-of-memory killer would "
                          f"end the session)")
    if created > left:
        log.warning("the source sends %d bytes of regions for this destination to hold, and "
                    "this process's memory cgroup has %d bytes left (%s): enough while no "
                    "more than that of them holds data (zero pages are not written); past "
                    "it the kernel's out-of-memory killer ends the session",
                    created, left, limit)
    return left - created if written is not None else left


def _region(parts: RegionParts, name: str, size: int, page_size: int) -> tuple[Region, bool]:
    """The region ``name`` receives into, and whether it is fresh."""
    region = parts.user_regions.get(name)
    fresh = region is None
    if region is None and parts.region_factory is not None:
        made = call_user(f"region_factory({name!r}, {size}, {page_size})",
                         parts.region_factory, name, size, page_size)
        # Checked before it is owned: what is not a Region cannot be closed at the end.
        region = parts.resources.own(region_to_add(
            made, f"region_factory({name!r}, {size}, {page_size})'s result"))
        parts.user_regions[name] = region
        fresh, region.zero_filled = region.zero_filled, False     # written from now on
        _check_geometry(region, name, size, page_size)
    elif region is None and parts.region_pool is not None:
        # A region from the pool holds the last session's bytes: not fresh.
        region = parts.region_pool.take(name, size, page_size, parts.huge_pages)
        fresh = region is None
        if region is None:
            region = Region.create(name, size, page_size=page_size,
                                   huge_pages=parts.huge_pages)
        parts.resources.own(parts.region_pool.loan(region))
    elif region is None:
        region = parts.resources.own(Region.create(name, size, page_size=page_size,
                                                  huge_pages=parts.huge_pages))
    else:
        _check_geometry(region, name, size, page_size)
    return region, fresh


def _check_geometry(region: Region, name: str, size: int, page_size: int) -> None:
    """A region the user gave (or their factory made) matches what the source sends,
    and can be written."""
    check_writable(region, "at SETUP")
    if region.size != size or region.page_size != page_size:
        raise ConfigError(f"region {name!r}: the source sends {size} bytes in "
                          f"{page_size}-byte pages, the destination's region has "
                          f"{region.size} bytes in {region.page_size}-byte pages")


def check_writable(region: Region, where: str) -> None:
    """A destination writes into its regions: a read-only one is refused, the
    error saying ``where`` it was met (``add_region(region)``, or at SETUP)."""
    if region.read_only:
        raise ConfigError(f"{where}: region {region.name!r} is read-only (Region.read_only): "
                          f"a destination writes into its regions")


def check_every_page_came(regions: list[Region], fresh: list[bool]) -> None:
    """A region that held bytes before this session (the pool's, the user's) must
    have been sent every page: round 1 brings each, as data or as a zero page
    (cleared where it held data), and a page never sent keeps what it held:
    another session's bytes, from a pooled region, which a source that left
    pages out made the next one's result (a review). The receive workers mark
    each page sent into such a region, zero ones too: the bits say it, no page
    is read (a hole read on a full /dev/shm is a SIGBUS)."""
    for region, new in zip(regions, fresh):
        if new:
            continue                    # created empty: a page never sent is zero
        count, first = region.dirty.unmarked()
        if count:
            raise ProtocolError(f"region {region.name!r}: {count} page(s) never sent (the "
                                f"first: page {first}), which would keep what the region "
                                f"held before this session", field="pages", received=count,
                                expected="every page sent in round 1")


def finish_regions(regions: list[Region], fresh: list[bool],
                   flushed: Callable[[str], object]) -> None:
    """The session's regions at its end, before LOADED: every page came
    (check_every_page_came), then each is made durable (``Region.flush``: success
    means the files are written), ``flushed(name)`` after each (a flush may take
    a while). A region the user closed meanwhile (one added, or made by their
    region_factory) fails the session naming it, as on the source: a fresh one,
    whose pages are not checked, was met by its flush, and the session failed
    with "ValueError: region 'ram' is closed"."""
    with closed_regions_named(regions):     # (a closed region's flush: ValueError)
        check_every_page_came(regions, fresh)
        for region in regions:
            try:
                region.flush()
            except OSError as exc:
                raise MigrationError(f"region {region.name!r}: writing it to disk failed: "
                                     f"{exc.strerror or exc}") from exc
            flushed(region.name)
