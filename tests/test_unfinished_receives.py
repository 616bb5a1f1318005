"""A listener killed outright (SIGKILL to its whole process group: no clean-up runs)
leaves its session's ``DIR/<uuid>/*.part`` files; the next listener into ``DIR``
names each such unfinished receive once as it starts, and never a complete save
(:mod:`fastmfd.tools.unfinished`). Real listeners, real signals."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import fastmfd
from fastmfd import qemu
from fastmfd.tools import unfinished
from fastmfd.tools.unfinished import unfinished_receives
from fastmfd.units import format_bytes
from listen_support import Listener, wait_for
from migration_support import make_region
from proc_scan import left_by, process_group

PAGE = 4096
BOUND = 10.0        # seconds for a killed listener's processes to go, its segments swept
SAID = "an unfinished receive (its listener stopped or failed before it was complete)"


def said_of(session) -> str:
    files = [session / name for name in os.listdir(session) if name.endswith(".part")]
    size = sum(os.lstat(f).st_size for f in files)
    on_disk = sum(os.lstat(f).st_blocks * 512 for f in files)
    return (f"{session}: {SAID}: {len(files)} .part file(s), {format_bytes(size)} "
            f"({format_bytes(on_disk)} on disk); not a save")


@pytest.mark.parametrize("args", [("--forever",), ()], ids=["forever", "single"])
def test_the_next_listener_names_what_a_listener_killed_with_its_group_left(tmp_path, args):
    """``listen --forever`` SIGKILLed with its group mid-session left DIR/<uuid>/*.part
    (a single ``listen --dir``: DIR/*.part), and the next listener into DIR said nothing
    of it: an operator never learnt that a save was lost (the single one refused the
    .part files only at a source's SETUP of the same names). Now it says it once as it
    starts; the save it then completes is never named."""
    out = tmp_path / "out"
    region = make_region("ram", 64 * PAGE, seed=7)
    other = make_region("disk", 16 * PAGE, seed=8)   # another name: no .part refused
    group: set[int] = set()

    def kill_the_group() -> None:
        wait_for(lambda: list(out.glob("**/nic0.0.state.part")), "the session's files")
        group.update(process_group(killed.proc.pid))
        os.killpg(killed.proc.pid, signal.SIGKILL)

    try:
        with Listener(out, *args, preexec_fn=os.setsid) as killed:
            with fastmfd.Source(killed.address) as source:
                source.add_region(region)
                source.add_device(fastmfd.SyntheticDevice("nic0", 0, 4 << 20,
                                                          read_rate=4 << 20))
                with pytest.raises(fastmfd.MigrationError):
                    # on_stop: after SETUP (the .part files exist), before any page went
                    source.migrate(live=False, on_stop=kill_the_group)
            status, err = killed.finish()
        assert status == -signal.SIGKILL, err
        assert left_by(group, BOUND)[0] == set()
        [lost] = out.iterdir() if args else [out]
        assert sorted(os.listdir(lost)) == ["nic0.0.state.part", "ram.img.part"]
        expected = said_of(lost)

        with Listener(out, *args) as listener:
            with fastmfd.Source(listener.address) as source:
                source.add_region(other)
                source.migrate(live=False)
            if args:
                listener.proc.send_signal(signal.SIGTERM)
            status, err = listener.finish()
    finally:
        region.close()
        other.close()
    assert status == (128 + signal.SIGTERM if args else 0), err
    assert [line for line in err.splitlines() if SAID in line] == [expected], err
    [saved] = set(out.iterdir()) - {lost} if args else [out]
    assert (saved / "manifest.json").exists() and (saved / "disk.img").exists()
    assert {"nic0.0.state.part", "ram.img.part"} <= set(os.listdir(lost))      # untouched
    # The complete save is not named (nor, in DIR itself, the .part files beside it).
    assert unfinished_receives(str(out)) == ([expected] if args else [])
    # Its segments: the killed tracker left them; the next listener's first one swept them.
    assert left_by(group, BOUND) == (set(), set())


def _tree(top) -> dict[str, tuple[int, int, int]]:
    return {os.path.relpath(os.path.join(d, n), top): (st.st_mode, st.st_size, st.st_mtime_ns)
            for d, dirs, files in os.walk(top) for n in dirs + files
            for st in [os.lstat(os.path.join(d, n))]}


def test_only_fastmfd_s_unfinished_layout_is_named_and_nothing_is_touched(tmp_path):
    """A session directory without a manifest and with .part files is named; a complete
    save (its manifest renamed into place last), a directory not named by a uuid, a
    link (to a directory, or as a .part file), an empty session directory, are not."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "ram.img.part").write_bytes(b"x" * PAGE)
    among_renames = out / ("a" * 32)           # killed among commit()'s renames
    among_renames.mkdir()
    (among_renames / "ram.img").write_bytes(b"r" * PAGE)
    (among_renames / "manifest.json.part").write_text("{}\n")
    complete = out / ("b" * 32)
    complete.mkdir()
    (complete / "ram.img").write_bytes(b"r" * PAGE)
    (complete / "manifest.json").write_text("{}\n")
    (out / ("c" * 32)).symlink_to(elsewhere)               # never followed
    linked_part = out / ("d" * 32)
    linked_part.mkdir()
    (linked_part / "ram.img.part").symlink_to(elsewhere / "ram.img.part")
    (out / ("e" * 32)).mkdir()                               # made, nothing in it yet
    (out / "mine").mkdir()
    (out / "mine" / "notes.part").write_text("the user's\n")
    (out / ("f" * 32 + ".part")).write_text("a file, not a session's directory\n")
    before = _tree(tmp_path)
    assert unfinished_receives(str(out)) == [said_of(among_renames)]
    assert _tree(tmp_path) == before
    assert unfinished_receives(str(tmp_path / "absent")) == []


def _sessions_left(directory: Path, count: int) -> None:
    """``count`` session directories in ``directory``, each with one .part file: 2 names each."""
    for n in range(count):
        session = directory / f"{n:032x}"
        session.mkdir()
        (session / "ram.img.part").write_bytes(b"")


def test_a_directory_of_many_names_is_looked_at_in_part_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(unfinished, "MAX_ENTRIES", 12)
    _sessions_left(tmp_path, 8)
    said = unfinished_receives(str(tmp_path))
    assert said[-1] == f"{tmp_path}: looked for unfinished receives among its first 12 names only"
    assert len(said) == 5       # the 8 directories' names, then 4 of their files: 12


def test_a_directory_of_exactly_as_many_names_as_are_read_is_not_said_to_be_cut(
        tmp_path, monkeypatch):
    """Every name read, the last one the MAX_ENTRIES-th: nothing was left unread, and it
    said it had looked 'among its first 12 names only'."""
    monkeypatch.setattr(unfinished, "MAX_ENTRIES", 12)
    _sessions_left(tmp_path, 6)
    said = unfinished_receives(str(tmp_path))
    assert len(said) == 6 and not [line for line in said if "names only" in line], said


def test_a_qemu_receiver_names_what_a_killed_one_left_in_its_directory(tmp_path, caplog):
    """``listen --qemu`` (fastmfd.qemu.QemuReceiver) writes into DIR itself: a RAMBlock's
    ``<idstr>.img.part`` and ``vmstate.bin.part`` left by one killed are named as the
    next one starts, before QEMU connects (it refused them only once QEMU's migration
    had begun, if its names were the same)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "pc.ram.img.part").write_bytes(os.urandom(PAGE))
    (out / "vmstate.bin.part").write_bytes(b"QEVM")
    with caplog.at_level("WARNING", logger="fastmfd"):
        with qemu.QemuReceiver("tcp:127.0.0.1:0", out, workers=1):
            pass
    assert [r.getMessage() for r in caplog.records if SAID in r.getMessage()] == [said_of(out)]
