"""``@pytest.mark.alone(why)``: a test that must not run beside the suite's other tests.

The suite runs in pytest-xdist's workers (``-n`` in pyproject's addopts): most of
its time is spent waiting (deadlines, grace periods, commands starting), so two
workers take about half as long. A few tests judge the machine itself, and
another worker's test beside them is the load they must not see (whether a
small bench run is flagged as beside other load, on an idle machine). Marked
``alone``, such a test waits for the other workers' current tests to end, and
they start no other until it is done.

The workers take turns through two ``flock`` files in a directory the controller
makes for the run (passed in ``workerinput``): every test holds ``room`` shared
while it runs (its setup and teardown too), an ``alone`` one exclusive; ``gate``
is taken on the way in, and held by an ``alone`` test until it has the room, so
a stream of other tests cannot keep it waiting. A lock goes with its process, so
a worker that dies holds up nobody. Without workers (``-n 0``) it does nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

import pytest

_DIR_KEY = "fastmfd_turns_dir"


def pytest_configure(config):
    config.addinivalue_line("markers", "alone(why): run with no other test beside it "
                                       "(tests/alone.py)")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and _DIR_KEY in workerinput:
        config.stash[_TURNS] = _Turns(workerinput[_DIR_KEY])
    elif workerinput is None and config.getoption("dist", "no") != "no" \
            and config.getoption("tx", None):      # the controller of xdist's workers
        config.stash[_DIR] = tempfile.mkdtemp(prefix="fastmfd-test-turns-")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(pytest-xdist, in the controller) Each worker learns where the turns are."""
    node.workerinput[_DIR_KEY] = node.config.stash[_DIR]


def pytest_unconfigure(config):
    if _DIR in config.stash:
        shutil.rmtree(config.stash[_DIR], ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    turns = item.config.stash.get(_TURNS, None)
    if turns is None:
        return (yield)
    turns.enter(alone=item.get_closest_marker("alone") is not None)
    try:
        return (yield)
    finally:
        turns.leave()


class _Turns:
    def __init__(self, directory: str) -> None:
        self._gate = os.open(os.path.join(directory, "gate"), os.O_RDWR | os.O_CREAT, 0o600)
        self._room = os.open(os.path.join(directory, "room"), os.O_RDWR | os.O_CREAT, 0o600)

    def enter(self, alone: bool) -> None:
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        fcntl.flock(self._room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    def leave(self) -> None:
        fcntl.flock(self._room, fcntl.LOCK_UN)


_TURNS = pytest.StashKey[_Turns]()
_DIR = pytest.StashKey[str]()
