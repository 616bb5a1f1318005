"""Closing a BufferPool, ChannelSelector or DirtyBitmap: unmapped means unusable, not a crash.

Every method reads the structure through pointers into the mapping; after
close() they dangle, so each method must refuse with ValueError instead of
touching unmapped memory (a segfault). Owners unlink on close, attachers
do not, and close() with a view still alive fails without closing anything.
"""

import numpy as np
import pytest

from fastmfd._core import BufferPool, ChannelSelector, DirtyBitmap
from fastmfd.shm import list_segments

STRUCTURES = {
    "pool": (lambda: BufferPool.create(2, 64), BufferPool.attach, [
        lambda s: s.nslots, lambda s: s.slot_size, lambda s: s.free_count,
        lambda s: s.acquire(timeout=0), lambda s: s.acquire(), lambda s: s.release(0),
        lambda s: s.is_held(0), lambda s: s.view(0), lambda s: s.abort(),
    ]),
    "selector": (lambda: ChannelSelector.create(2), ChannelSelector.attach, [
        lambda s: s.nchannels, lambda s: s.select(), lambda s: s.select(timeout=None),
        lambda s: s.release(0), lambda s: s.is_busy(0), lambda s: s.abort(),
    ]),
    "bitmap": (lambda: DirtyBitmap.create(100), DirtyBitmap.attach, [
        lambda s: s.npages, lambda s: s.mark(1), lambda s: s.mark_pages([1]),
        lambda s: s.count(), lambda s: s.collect(),
    ]),
}


@pytest.fixture(params=sorted(STRUCTURES))
def kind(request):
    return STRUCTURES[request.param]


@pytest.mark.parametrize("role", ["owner", "attacher"])
def test_every_method_refuses_after_close(kind, role):
    create, attach, methods = kind
    owner = create()
    try:
        structure = owner if role == "owner" else attach(owner.name)
        structure.close()
        for method in methods:
            with pytest.raises(ValueError, match="is closed"):
                method(structure)
        structure.close()           # idempotent
    finally:
        owner.close()


def test_owner_unlinks_attacher_does_not(kind):
    create, attach, _ = kind
    with create() as owner:
        attach(owner.name).close()
        assert owner.name in list_segments()
    assert owner.name not in list_segments()


def test_close_with_a_live_view_keeps_the_pool_usable():
    pool = BufferPool.create(2, 64)
    view = np.frombuffer(pool.view(1), dtype=np.uint8)
    with pytest.raises(BufferError):
        pool.close()
    # Unlinked already, but still mapped and working.
    assert pool.name not in list_segments()
    assert pool.acquire(timeout=0) == 0
    view[0] = 5
    assert pool.view(1)[0] == 5
    del view
    pool.close()
    with pytest.raises(ValueError, match="is closed"):
        pool.acquire(timeout=0)
