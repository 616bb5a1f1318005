"""``fastmfd listen --dir D`` writes only what it must, only where it must, and
a sender's success means the files are complete, durable and in place.

Each test runs a real ``fastmfd listen`` process (a real directory, real
sockets); the sender is ``fastmfd send`` or a Source in this process when the
test needs a device that fails. Every output is written as ``NAME.part``
(``O_EXCL|O_NOFOLLOW``) and renamed after everything was loaded and fsynced;
a failed receive leaves no final name behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import fastmfd
from device_support import BrokenDevice
from fastmfd.tools.outputs import STEM_MAX, OutputDir, output_name
from listen_support import Listener, run_cli
from migration_support import make_region, setup_message

PAGE = 4096
LONG_IDSTR = "vfio-" + "x" * 250           # 255 bytes: the longest legal idstr


def files_in(directory) -> set[str]:
    return set(os.listdir(directory))


def send(listener: Listener, *args: str) -> subprocess.CompletedProcess:
    return run_cli("send", listener.address, *args, "--quiet")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "ram.img"
    path.write_bytes(os.urandom(8 * PAGE) + bytes(8 * PAGE))
    return path


# ---------------------------------------------------------------- names

def test_names_map_to_files_injectively_within_name_max():
    assert output_name("pc.ram") == "pc.ram"                 # a plain name is kept
    assert output_name("a_b") == "a_b"
    alike = ["a/b", "a_b", "a:b", ".a_b", "a_b~", "/rom@etc/acpi/tables", ".", ".."]
    stems = [output_name(n) for n in alike]
    assert len(set(stems)) == len(alike), dict(zip(alike, stems))
    assert all("/" not in s and not s.startswith(".") and s for s in stems)
    longs = [LONG_IDSTR, LONG_IDSTR[:-1] + "y", "z" * (STEM_MAX + 1)]
    stems = [output_name(n) for n in longs]
    assert len(set(stems)) == 3
    for stem in stems:
        assert len(f"{stem}.4294967295.state.part".encode()) <= 255


def test_devices_named_alike_and_a_long_idstr_get_files_of_their_own(tmp_path, image):
    states = {"a/b": b"slash" * 999, "a_b": b"underscore" * 777, LONG_IDSTR: b"long" * 5000}
    args = []
    for i, (idstr, data) in enumerate(states.items()):
        (tmp_path / f"s{i}").write_bytes(data)
        args += ["--state", f"{idstr}={tmp_path / f's{i}'}"]
    out = tmp_path / "out"
    with Listener(out) as listener:
        done = send(listener, str(image), *args)
        status, err = listener.finish()
    assert done.returncode == 0, done.stderr
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["regions"] == [{"name": "ram", "size": 16 * PAGE, "file": "ram.img"}]
    assert (out / "ram.img").read_bytes() == image.read_bytes()
    got = {d["idstr"]: d for d in manifest["devices"]}
    assert set(got) == set(states)
    for idstr, data in states.items():
        assert got[idstr]["instance_id"] == 0 and got[idstr]["size"] == len(data)
        assert (out / got[idstr]["file"]).read_bytes() == data
    assert files_in(out) == {"manifest.json", "ram.img"} | {d["file"] for d in got.values()}


# ---------------------------------------------------------------- existing files, links

def test_an_existing_file_is_refused_before_anything_is_written(tmp_path, image):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ram.img").write_bytes(b"precious")
    with Listener(out) as listener:
        done = send(listener, str(image))
        status, err = listener.finish()
    assert done.returncode == 1 and status == 1
    for text in (done.stderr, err):
        assert f"{out / 'ram.img'} exists" in text and "--force" in text, text
    assert (out / "ram.img").read_bytes() == b"precious"
    assert files_in(out) == {"ram.img"}


@pytest.mark.parametrize("qemu", [False, True], ids=["listen", "listen-qemu"])
def test_a_save_already_there_is_refused_before_listening(tmp_path, qemu):
    # It was refused only once a migration came for the directory: the source
    # (a QEMU) had started migrating, and failed (from the durability audit).
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"precious": true}')
    sock = tmp_path / "sock"
    done = run_cli("listen", *(["--qemu"] if qemu else []), f"unix:{sock}", "--dir", str(out),
                   "--timeout", "60", timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"{out / 'manifest.json'} exists (a file): not replacing it without --force" \
        in done.stderr
    assert not sock.exists()
    assert files_in(out) == {"manifest.json"}
    assert (out / "manifest.json").read_text() == '{"precious": true}'


def test_force_replaces_an_existing_file(tmp_path, image):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ram.img").write_bytes(b"old")
    (out / "manifest.json").write_text("{}")
    with Listener(out, "--force") as listener:
        done = send(listener, str(image))
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, done.stderr + err
    assert (out / "ram.img").read_bytes() == image.read_bytes()
    assert files_in(out) == {"ram.img", "manifest.json"}


# ``python -c`` this, then listen's arguments: the CLI, killed (SIGKILL) as it
# renames manifest.json.part into place, every other file renamed already.
KILLED_AT_THE_MANIFEST = """
import os, runpy, signal, sys
rename = os.rename
def kill_at_the_manifest(src, dst, **kwargs):
    if src == "manifest.json.part":
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, **kwargs)
os.rename = kill_at_the_manifest
sys.argv[0] = "fastmfd"
runpy.run_module("fastmfd", run_name="__main__")
"""


def test_force_killed_while_renaming_leaves_no_manifest_of_the_old_save(tmp_path, image):
    """--force over a save, killed after its region file replaced the old one but
    before its manifest was in place: the old manifest.json stayed, listing the
    new ram.img as its own, a directory that said it held a complete save and
    mixed two. Now the old manifest goes, durably, before any file is replaced."""
    out = tmp_path / "out"
    old = tmp_path / "old" / "ram.img"
    old.parent.mkdir()
    old.write_bytes(os.urandom(16 * PAGE))
    with Listener(out) as listener:
        assert send(listener, str(old)).returncode == 0
        assert listener.finish()[0] == 0
    with Listener(out, "--force", program=("-c", KILLED_AT_THE_MANIFEST)) as listener:
        send(listener, str(image), "--stall-timeout", "2")
        status, err = listener.finish()
    assert status == -9, err
    assert (out / "ram.img").read_bytes() == image.read_bytes()       # renamed already
    assert files_in(out) == {"ram.img", "manifest.json.part"}


def test_force_removes_the_earlier_saves_files_the_new_one_does_not_write(tmp_path, image):
    """--force over a save of two regions and a device, by one of a region: the
    old manifest went, but b.img and the device's file stayed beside the new save,
    listed by no manifest, removed by nothing (qemuuser review, defect 1: a
    guest's NUMA blocks m0.img, m1.img under a listen --qemu --force)."""
    out = tmp_path / "out"
    (tmp_path / "state").write_bytes(b"device" * 100)
    with Listener(out) as listener:
        done = send(listener, f"a={image}", f"b={image}", "--state", f"nic={tmp_path / 'state'}")
        assert done.returncode == 0 and listener.finish()[0] == 0, done.stderr
    assert files_in(out) == {"a.img", "b.img", "nic.0.state", "manifest.json"}
    with Listener(out, "--force") as listener:
        done = send(listener, f"a={image}")
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, done.stderr + err
    assert files_in(out) == {"a.img", "manifest.json"}
    assert [r["file"] for r in json.loads((out / "manifest.json").read_text())["regions"]] \
        == ["a.img"]
    assert "WARNING" not in err, err


def test_force_leaves_what_the_earlier_manifest_lists_but_is_no_regular_file(tmp_path, image):
    """Of the earlier save's files, only regular ones go: a link it lists is left
    (its target untouched), and a directory; both named in one warning line."""
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious"
    target.write_bytes(b"precious")
    (out / "link.img").symlink_to(target)
    (out / "dir.img").mkdir()
    (out / "old.img").write_bytes(b"old")
    (out / "manifest.json").write_text(json.dumps({"regions": [
        {"name": n, "size": 4096, "file": f"{n}.img"} for n in ("link", "dir", "old")],
        "devices": []}))
    with Listener(out, "--force") as listener:
        done = send(listener, str(image))
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, done.stderr + err
    assert files_in(out) == {"ram.img", "manifest.json", "link.img", "dir.img"}
    assert target.read_bytes() == b"precious"
    assert f"{out}: files of the earlier save left (only the regular files its manifest " \
        f"lists are removed): link.img (not a regular file), dir.img (not a regular file)" \
        in err, err


@pytest.mark.parametrize("manifest", ['{"regions": [{"file": "../x.img"}], "devices": []}',
                                      '{"files": ["old.img"]}', "not json"],
                         ids=["a-path", "another-program's", "not-json"])
def test_force_over_a_foreign_manifest_removes_nothing_it_lists(tmp_path, image, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.img").write_bytes(b"old")
    (out / "manifest.json").write_text(manifest)
    with Listener(out, "--force") as listener:
        done = send(listener, str(image))
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, done.stderr + err
    assert files_in(out) == {"ram.img", "manifest.json", "old.img"}
    assert f"{out / 'manifest.json'}: " in err and "replacing it removes nothing it lists " \
        "(the earlier save's files are left as they are)" in err, err


# ``python -c`` this, then listen's arguments: the CLI, sent SIGTERM as soon as it
# renamed manifest.json.part into place (its handler raises at the next
# statement: what a signal arriving during the rename itself does).
TERMINATED_AT_THE_MANIFEST = """
import os, runpy, signal, sys
import fastmfd.tools.outputs as outputs
rename = outputs.rename_without_replacing
def terminate_at_the_manifest(src, dst, dir_fd):
    rename(src, dst, dir_fd)
    if src == "manifest.json.part":
        os.kill(os.getpid(), signal.SIGTERM)
outputs.rename_without_replacing = terminate_at_the_manifest
sys.argv[0] = "fastmfd"
runpy.run_module("fastmfd", run_name="__main__")
"""


def test_terminated_as_the_manifest_is_renamed_leaves_no_manifest(tmp_path, image):
    """abort() knew a file was renamed by a flag set after the rename, which the
    SIGTERM's exception skipped: the manifest stayed, its region file removed,
    after a receive that failed (143). Now nothing stays."""
    out = tmp_path / "out"
    with Listener(out, program=("-c", TERMINATED_AT_THE_MANIFEST)) as listener:
        done = send(listener, str(image))
        status, err = listener.finish()
    assert status == 143 and done.returncode == 1, err
    assert not out.exists()       # the listener made it: gone with what it held


@pytest.mark.parametrize("force", [False, True], ids=["refused", "force-replaces-the-link"])
@pytest.mark.parametrize("link", ["ram.img", "ram.img.part", "nic0.0.state.part"])
def test_a_symbolic_link_is_never_followed(tmp_path, image, link, force):
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"outside the directory")
    os.symlink(victim, out / link)
    (tmp_path / "nic").write_bytes(b"state" * 100)
    with Listener(out, *(["--force"] if force else [])) as listener:
        done = send(listener, str(image), "--state", f"nic0={tmp_path / 'nic'}")
        status, err = listener.finish()
    assert victim.read_bytes() == b"outside the directory"
    if not force:
        assert done.returncode == 1 and status == 1
        assert f"{out / link} exists (a symbolic link)" in err
        assert files_in(out) == {link}
        return
    assert done.returncode == 0 and status == 0, done.stderr + err
    assert files_in(out) == {"ram.img", "nic0.0.state", "manifest.json"}
    assert not (out / "ram.img").is_symlink()
    assert (out / "ram.img").read_bytes() == image.read_bytes()
    assert (out / "nic0.0.state").read_bytes() == b"state" * 100


# ---------------------------------------------------------------- failures

@pytest.mark.parametrize("keep", [False, True], ids=["removed", "keep-partial"])
def test_a_failed_receive_leaves_no_final_name(tmp_path, keep):
    out = tmp_path / "out"
    region = make_region("ram", 64 * PAGE, seed=2)
    try:
        with Listener(out, *(["--keep-partial"] if keep else [])) as listener:
            with fastmfd.Source(listener.address) as source:
                source.add_region(region)
                source.add_device(fastmfd.BytesDevice("good", 0, b"g" * 5000))
                source.add_device(BrokenDevice("broken", 0, good=3))
                with pytest.raises(fastmfd.MigrationError, match="data fd failed"):
                    source.migrate(live=False)
            status, err = listener.finish()
    finally:
        region.close()
    assert status == 1 and "data fd failed" in err
    if keep:
        assert files_in(out) == {"ram.img.part", "good.0.state.part", "broken.0.state.part"}
        assert (out / "ram.img.part").stat().st_size == 64 * PAGE
        # Where they are, said (the failure alone named what failed; a review).
        kept = re.search(r"^kept the failed receive's partial files: (.*)$", err, re.M)
        assert kept and set(kept[1].split(", ")) == {
            f"{out}/{name}" for name in files_in(out)}, err
    else:
        assert not out.exists()       # the listener made it: gone with what it held


def _fail_mid_transfer(out, on_stop, match: str, device: bool = False) -> tuple[int, str]:
    """A Source migrates a region (and a device) into ``listen --dir out``, whose
    files ``on_stop`` meddles with; its migrate() must fail with ``match``.
    Returns the listener's exit status and stderr."""
    region = make_region("ram", 16 * PAGE, seed=6)
    try:
        with Listener(out) as listener:
            with fastmfd.Source(listener.address) as source:
                source.add_region(region)
                if device:
                    source.add_device(fastmfd.BytesDevice("nic0", 0, b"n" * 5000))
                with pytest.raises(fastmfd.MigrationError, match=match):
                    source.migrate(live=False, on_stop=on_stop)
            return listener.finish()
    finally:
        region.close()


def test_a_rename_that_fails_at_the_end_takes_back_the_names_already_made(tmp_path):
    """The region's file is renamed first; the device's rename then fails (a directory
    took its name mid-transfer): the sender fails and the region's final name goes too."""
    out = tmp_path / "out"
    status, err = _fail_mid_transfer(out, lambda: (out / "nic0.0.state").mkdir(),
                                     "nic0.0.state", device=True)
    assert status == 1 and "nic0.0.state appeared while the migration was received" in err, err
    assert files_in(out) == {"nic0.0.state"} and not os.listdir(out / "nic0.0.state")


def test_a_file_put_at_a_final_name_mid_transfer_is_not_replaced(tmp_path):
    """The names are claimed at SETUP; a user's file written at one afterwards
    was replaced by the rename at the end, silently. Now the migration fails and
    the file stays as the user wrote it."""
    out = tmp_path / "out"
    status, err = _fail_mid_transfer(out, lambda: (out / "ram.img").write_text("mine"),
                                     "ram.img appeared")
    assert status == 1, err
    assert files_in(out) == {"ram.img"} and (out / "ram.img").read_text() == "mine"


def test_a_part_file_made_by_another_after_the_claim_is_named(tmp_path):
    # Two listeners on one DIR: the second one's region file appeared between the
    # claim of its name and its creation, a bare "[Errno 17] File exists: 'ram.img.part'"
    # (from the durability audit). It is the other's file: left alone.
    out = OutputDir(str(tmp_path / "out"))
    try:
        out.plan_qemu({"ram": 64 * PAGE}, PAGE)
        (tmp_path / "out" / "ram.img.part").write_text("the other listener's")
        with pytest.raises(fastmfd.OutputError, match=r"ram\.img\.part appeared after its "
                           r"name was claimed \(another listener writing into .*\?\)"):
            out.region("ram", 64 * PAGE, PAGE)
    finally:
        out.abort()
        out.close()
    assert (tmp_path / "out" / "ram.img.part").read_text() == "the other listener's"


def test_a_save_committed_is_kept_whatever_fails_after(tmp_path):
    """Once the source is told the migration succeeded, the save stands: a SIGTERM
    reaching the listener as it stopped its workers, after the commit, made it
    abort, which removed every file of the committed save, manifest.json first
    (a review: 4 runs of 4)."""
    region = make_region("ram", 256 * PAGE, seed=1)
    try:
        with Listener(tmp_path / "out") as listener:
            with fastmfd.Source(listener.address) as source:
                source.add_region(region)
                source.add_device(fastmfd.BytesDevice("nic0", 0, b"n" * 5000))
                source.migrate(live=False,
                               on_resume=lambda: os.kill(listener.proc.pid, signal.SIGTERM))
            listener.finish()
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert {r["file"] for r in manifest["regions"]} == {"ram.img"}
        assert (tmp_path / "out" / "ram.img").read_bytes() == region.array.tobytes()
        assert (tmp_path / "out" / "nic0.0.state").read_bytes() == b"n" * 5000
    finally:
        region.close()


def test_abort_after_the_commit_keeps_the_save(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    try:
        out.plan_qemu({"ram": 4 * PAGE}, PAGE)
        out.region("ram", 4 * PAGE, PAGE).close()
        os.close(out.stream("vmstate"))
        out.commit({"blocks": []})
        out.abort()
    finally:
        out.close()
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "ram.img", "vmstate.bin"]


def test_keep_partial_keeps_no_directory_it_made_with_nothing_in_it(tmp_path):
    """It kept the directories it made whenever --keep-partial was given: one refused
    before anything was written (its address in use) left an empty DIR behind."""
    out = OutputDir(str(tmp_path / "new" / "out"), keep_partial=True)
    out.abort()
    out.close()
    assert not (tmp_path / "new").exists()


def test_a_device_state_file_replaced_mid_transfer_is_refused(tmp_path):
    """The loader runs in another process, which opens the device's .part file by
    path: it was created and truncated anew there (through a hard link swapped
    in, into someone else's file). Now it must be the file the listener made."""
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_text("the user's")

    def swap():
        os.unlink(out / "nic0.0.state.part")
        os.link(victim, out / "nic0.0.state.part")
    _fail_mid_transfer(out, swap, "is not the file made for this device's state", device=True)
    assert victim.read_text() == "the user's"


def test_outputs_are_private(tmp_path, image):
    """Memory images and device state are the user's alone (0600, as QEMU's dumps;
    they were 0644)."""
    out = tmp_path / "new" / "out"
    with Listener(out) as listener:
        done = send(listener, str(image), "--state", f"nic0={image}")
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, (done.stderr, err)
    for name in files_in(out):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name


def test_a_missing_state_file_fails_before_anything_is_sent(tmp_path, image):
    out = tmp_path / "out"
    with Listener(out) as listener:
        done = send(listener, str(image), "--state", f"nic0={tmp_path / 'missing'}")
        assert done.returncode == 2         # a usage mistake
        assert f"cannot read state file {tmp_path / 'missing'}" in done.stderr
        listener.proc.terminate()
        listener.finish()
    assert not out.exists()       # the listener made it: gone with what it held


def test_zero_pages_stay_holes_unread(tmpfs_path, image):
    """The region file is sparse: the zero pages sent for it stay holes, and are
    not read (on tmpfs, where this one is, a read allocates the page, and on a
    full disk that is a SIGBUS)."""
    out = tmpfs_path / "out"
    with Listener(out) as listener:
        done = send(listener, str(image))
        status, err = listener.finish()
    assert done.returncode == 0 and status == 0, (done.stderr, err)
    ram = out / "ram.img"
    assert ram.read_bytes() == image.read_bytes()
    assert ram.stat().st_blocks * 512 == 8 * PAGE          # its 8 pages of data, no more


def test_a_region_file_is_new_zero_memory_to_the_destination(tmp_path):
    """A region's .part file is created empty, so the destination takes it as
    its own new memory (``Region.zero_filled``): zero pages sent for it are not
    looked at, and its pages are placed into it."""
    out = OutputDir(str(tmp_path / "out"))
    try:
        out.plan_qemu({"ram": 64 * PAGE}, PAGE)
        with out.region("ram", 64 * PAGE, PAGE) as region:
            assert region.zero_filled and not region.faulted_in
    finally:
        out.abort()
        out.close()


def test_a_full_disk_fails_the_sender_and_leaves_no_final_name(tmp_path, image, small_disk):
    """1 MiB of room, a 2 MiB state file: the disk fills before LOADED, so the
    sender is told the migration failed. What hits the full disk first is a
    race: the loader writing the state, or a page of the (sparse) region file."""
    (tmp_path / "big.state").write_bytes(os.urandom(2 << 20))
    with Listener(small_disk) as listener:
        done = send(listener, str(image), "--state", f"big={tmp_path / 'big.state'}")
        status, err = listener.finish()
    full = re.compile(rf"big/0: .*{os.strerror(errno.ENOSPC)}|region ram: no memory to "
                      rf"write into: the file system that holds it is full")
    assert done.returncode == 1, done.stderr
    assert full.search(done.stderr), done.stderr
    assert status == 1 and full.search(err), err
    assert files_in(small_disk) == set()


# ---------------------------------------------------------------- room

def test_regions_larger_than_the_disk_are_refused_at_setup(tmp_path, small_disk):
    """Region files are sparse: without this check a sender could announce more
    than the disk holds and fill it. 2 MiB of regions for 1 MiB of room: refused
    before a byte is written."""
    big = tmp_path / "big.img"
    big.write_bytes(bytes(2 << 20))
    with Listener(small_disk) as listener:
        done = send(listener, str(big))
        status, err = listener.finish()
    expected = f"the source sends 2.00 MiB of regions; {small_disk} has"
    assert done.returncode == 1 and expected in done.stderr, done.stderr
    assert status == 1 and expected in err, err
    assert files_in(small_disk) == set()


def test_max_size_and_max_memory_bound_what_a_sender_may_ask(tmp_path, image):
    out = tmp_path / "out"
    with Listener(out, "--max-size", "32K") as listener:
        done = send(listener, str(image))           # 64 KiB of region
        status, _ = listener.finish()
    assert done.returncode == 1 and status == 1
    assert "the source sends 64.0 KiB of regions; --max-size allows 32.0 KiB" in done.stderr
    (tmp_path / "nic.state").write_bytes(b"state" * 1000)
    with Listener(out, "--max-memory", "4K") as listener:
        done = send(listener, str(image), "--state", f"nic={tmp_path / 'nic.state'}")
        status, _ = listener.finish()
    assert done.returncode == 1 and status == 1
    # max_memory holds the receive channels' buffers first
    assert re.search(r"channel\(s\) need \d+ bytes of receive buffers .* holds at most 4096 "
                     r"\(max_memory\)", done.stderr), done.stderr
    assert not out.exists()       # the listener made it: gone with what it held


# ---------------------------------------------------------------- successive sessions

def test_max_sessions_serves_migrations_one_after_another(tmp_path, image):
    """Three sessions on one socket, each into DIR/<uuid>/; the failed second one
    costs only itself (no directory left: an empty one was) and the exit status."""
    out = tmp_path / "out"
    region = make_region("ram", 64 * PAGE, seed=2)
    try:
        with Listener(out, "--max-sessions", "3") as listener:
            assert send(listener, str(image)).returncode == 0
            with fastmfd.Source(listener.address) as source:
                source.add_region(region)
                source.add_device(BrokenDevice("broken", 0, good=3))
                with pytest.raises(fastmfd.MigrationError, match="data fd failed"):
                    source.migrate(live=False)
            assert send(listener, str(image)).returncode == 0
            status, err = listener.finish()
    finally:
        region.close()
    assert status == 1, err
    assert err.count("session failed:") == 1 and "data fd failed" in err
    sessions = {path.name: files_in(path) for path in out.iterdir()}
    assert len(sessions) == 2 and all(len(name) == 32 for name in sessions), sessions
    for name in sessions:
        assert sessions[name] == {"ram.img", "manifest.json"}
        assert (out / name / "ram.img").read_bytes() == image.read_bytes()


def test_listen_json_prints_a_line_for_every_session_failed_ones_too(tmp_path, image):
    """With --json and several sessions, a failed session printed no line, only
    "session failed" on stderr: a program reading the lines could not see or
    count it (a review). Each has its line: {"failed", "session", "refused_connections"}."""
    from fastmfd import _core
    from fastmfd.protocol.main_channel import MESSAGE_HEADER, Msg, encode_preamble
    header = bytearray(_core.CHANNEL_HEADER_SIZE)
    _core.encode_channel_header(header, _core.CHANNEL_MAIN)
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(4 * PAGE))
    with Listener(tmp_path / "out", "--max-sessions", "3", "--max-size", "32K",
                  "--json") as listener:
        path = listener.address[len("unix:"):]
        with socket.socket(socket.AF_UNIX) as stranger:
            stranger.connect(path)
            stranger.sendall(bytes(64))
            stranger.settimeout(30)
            while stranger.recv(4096):               # refused (told why), counted, closed
                pass
        with socket.socket(socket.AF_UNIX) as source:    # greeted, then gone before SETUP
            source.connect(path)
            source.sendall(bytes(header) + encode_preamble()
                           + MESSAGE_HEADER.pack(int(Msg.SETUP), 100))
        assert send(listener, str(image)).returncode == 1      # 64 KiB > --max-size
        assert send(listener, str(small)).returncode == 0
        status, err = listener.finish()
    assert status == 1 and err.count("session failed:") == 2, err
    lines = [json.loads(line) for line in listener.out.splitlines()]
    assert len(lines) == 3, listener.out
    unnamed, refused, received = lines
    assert set(unnamed) == {"failed", "session", "refused_connections"}, unnamed
    assert "SETUP" in unnamed["failed"] and unnamed["session"] is None, unnamed
    assert unnamed["refused_connections"] == 1, unnamed
    assert refused["failed"] == ("the source sends 64.0 KiB of regions; --max-size allows "
                                 "32.0 KiB"), refused
    assert re.fullmatch("[0-9a-f]{32}", refused["session"]) and \
        refused["refused_connections"] == 0, refused
    assert set(received) == {"files", "sizes", "stats"}, received


def test_a_wait_no_source_came_in_is_no_session(tmp_path, image):
    """With several sessions, each --timeout that passed with no source counted
    as a failed session: an idle --forever listener said "session failed" each
    hour, and used up --max-sessions with exit status 1 (a review)."""
    out = tmp_path / "out"
    with Listener(out, "--max-sessions", "2", "--timeout", "0.3") as listener:
        time.sleep(1.5)                     # five waits, no source
        for _ in range(2):
            assert send(listener, str(image)).returncode == 0
        status, err = listener.finish()
    assert status == 0 and "session failed" not in err, err
    assert len(os.listdir(out)) == 2


def test_max_size_bounds_the_device_state_too(tmp_path):
    """--max-size held the regions (checked at SETUP) and nothing else: a source
    sent 48 MiB of device state past --max-size 4M into DIR (a review). Their
    files may now take what the regions leave, together."""
    image, state = tmp_path / "ram.img", tmp_path / "nic.state"
    image.write_bytes(os.urandom(8 * PAGE))
    state.write_bytes(os.urandom(6 * PAGE))     # each fits in what the region leaves, not both
    out = tmp_path / "out"
    with Listener(out, "--max-size", "64K") as listener:
        done = send(listener, str(image), "--state", f"nic0:0={state}", "--state",
                    f"nic1:0={state}")
        status, err = listener.finish()
    assert status == 1 and done.returncode == 1, err
    assert re.search(r"nic[01]\.0\.state\.part: the device state goes past --max-size "
                     r"\(64\.0 KiB, or the free space if less, less the regions'\)", err), err
    assert not out.exists() or files_in(out) == set()


def test_a_listener_of_several_sessions_keeps_its_own_stall_timeout(tmp_path):
    """A listener takes the source's stall_timeout, up to a day: with several
    sessions, one source stopped after SETUP_ACK held every later one that long (a
    review). Without --stall-timeout such a listener keeps the default, 30 s, and
    says it is alive at least every quarter of it (not of the source's hour)."""
    from fastmfd import _core
    from fastmfd.protocol.main_channel import Msg, encode_message, encode_preamble, read_message
    setup = setup_message(fastmfd.MigrationConfig(stall_timeout=3600.0), bytes(range(16)),
                          {"ram": 16 * PAGE})
    header = bytearray(_core.CHANNEL_HEADER_SIZE)
    _core.encode_channel_header(header, _core.CHANNEL_MAIN)
    with Listener(tmp_path / "out", "--max-sessions", "2") as listener, \
            socket.socket(socket.AF_UNIX) as source:
        source.connect(listener.address[len("unix:"):])
        source.sendall(bytes(header) + encode_preamble() + encode_message(Msg.SETUP, setup))
        assert read_message(source, 0, time.monotonic() + 30)[0] is Msg.SETUP_ACK
        heard = read_message(source, 0, time.monotonic() + 15, seconds=15)[0]
        assert heard is Msg.KEEPALIVE           # within 7.5 s and a look, not 900 s


def test_a_session_never_takes_a_directory_of_its_uuid_that_exists(tmp_path):
    """A session's directory is its uuid, which the source picks: a second source
    sending the first one's uuid wrote into its directory, and with --force
    replaced its save (a review). Now a session's directory must be new."""
    out = tmp_path / "out"
    first, second = make_region("ram", 16 * PAGE, seed=3), make_region("ram", 16 * PAGE, seed=4)
    try:
        with Listener(out, "--max-sessions", "2", "--force") as listener:
            for region in (first, second):
                source = fastmfd.Source(listener.address)
                source.uuid = bytes(range(16))      # (before it starts)
                with source:
                    source.add_region(region)
                    if region is second:
                        with pytest.raises(fastmfd.MigrationError, match=re.escape(
                                f"session directory {out / bytes(range(16)).hex()}: exists "
                                f"already")):
                            source.migrate(live=False)
                    else:
                        source.migrate(live=False)
            status, err = listener.finish()
        saved = (out / bytes(range(16)).hex() / "ram.img").read_bytes()
        assert status == 1 and err.count("session failed:") == 1, err
        assert saved == first.buffer.tobytes()
    finally:
        first.close()
        second.close()


def test_a_region_file_whose_mapping_fails_is_removed_by_abort(tmp_path, monkeypatch):
    """The .part file is the listener's from the moment it is created: when mapping
    it fails (a full /dev/shm), abort() removes it (found in review: its identity
    was taken after the mapping, so abort() did not know it)."""
    import fastmfd.regions

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")
    out = OutputDir(str(tmp_path / "out"))
    try:
        out.plan_qemu({"ram": 1 << 20}, 4096)
        monkeypatch.setattr(fastmfd.regions, "map_file", no_memory)
        with pytest.raises(fastmfd.ConfigError, match="cannot map .* Cannot allocate memory"):
            out.region("ram", 1 << 20, 4096)
        assert files_in(tmp_path / "out") == {out.regions["ram"].part}
    finally:
        out.abort()
        out.close()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside, sessions", [("", "1"), ("", "2"), ("new/out", "1")])
def test_a_directory_it_cannot_write_in_is_refused_before_listening(small_disk, inside,
                                                                     sessions):
    """A read-only DIR (or the directory above a DIR to be made) is a mistake in
    the command: exit 2 before it listens (found at the sender's SETUP, it was a
    failed session, after the sender had connected)."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    target = small_disk / inside
    done = run_cli("listen", "tcp:127.0.0.1:0", "--dir", str(target), "--timeout", "30",
                   "--max-sessions", sessions)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"fastmfd listen: output directory {target}: cannot make files in "
                           f"{small_disk} (Read-only file system)\n")


@pytest.mark.parametrize("sessions", ["1", "2"])
def test_a_directory_that_is_a_file_is_refused_before_listening(tmp_path, sessions):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    for target, words in ((tmp_path / "afile", "exists and is not a directory"),
                          (tmp_path / "afile" / "out", "exists and is not a directory"),
                          (tmp_path / "dangling", "is a symbolic link to nothing"),
                          (tmp_path / "dangling" / "out", "is a symbolic link to nothing")):
        done = run_cli("listen", "tcp:127.0.0.1:0", "--dir", str(target), "--timeout", "30",
                       "--max-sessions", sessions)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert words in done.stderr, done.stderr
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["afile", "dangling"]


def test_sessions_that_all_failed_leave_no_directory_made_for_them(tmp_path, image):
    """--prealloc's warm files went into DIR, made for them and left behind."""
    target = tmp_path / "new" / "out"
    with Listener(target, "--max-sessions", "2", "--prealloc", "--max-size", "4K") as listener:
        for _ in range(2):                  # each larger than --max-size: refused at SETUP
            assert send(listener, str(image)).returncode == 1
        status, err = listener.finish()
    assert status == 1 and err.count("session failed") == 2, err
    assert os.listdir(tmp_path) == [image.name]


def test_a_disk_that_fills_with_the_manifest_fails_naming_it(small_disk, tmp_path):
    """Regions exactly as large as the disk pass the room check; then the manifest
    finds no room. Both sides name the file (it was "the on_resume hook raised
    OSError"), and nothing is left."""
    image = tmp_path / "ram.img"
    room = os.statvfs(small_disk)
    image.write_bytes(np.random.default_rng(1).bytes(room.f_bavail * room.f_frsize))
    with Listener(small_disk) as listener:
        done = send(listener, str(image))
        status, stderr = listener.finish()
    expected = f"{small_disk}/manifest.json.part: writing the manifest failed: No space left"
    assert status == 1 and expected in stderr, stderr
    assert done.returncode == 1 and f"the destination failed: {expected}" in done.stderr
    assert files_in(small_disk) == set()


def test_a_disk_that_fills_with_device_state_fails_naming_its_file(small_disk, tmp_path):
    """SETUP announces no device state sizes, so no room check can come first: the
    write that finds the disk full fails the migration, naming the file."""
    image, state = tmp_path / "ram.img", tmp_path / "nic.bin"
    image.write_bytes(bytes(16 * PAGE))
    state.write_bytes(np.random.default_rng(2).bytes(2 << 20))
    with Listener(small_disk) as listener:
        done = send(listener, str(image), "--state", f"nic={state}")
        status, stderr = listener.finish()
    expected = f"No space left on device: '{small_disk}/nic.0.state.part'"
    assert status == 1 and expected in stderr, stderr
    assert done.returncode == 1 and expected in done.stderr
    assert files_in(small_disk) == set()


def test_a_directory_swapped_as_it_is_opened_is_refused(tmp_path, monkeypatch):
    """The directory is checked (no other user may change it) after it is opened: its
    owner could swap it for a link to a safe one in between, and the check, by its
    path, passed while the files went into theirs (here 0777, as a stranger's is)."""
    unsafe, safe = tmp_path / "vmsave", tmp_path / "safe"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    safe.mkdir()
    readlink = os.readlink

    def swapping(path, *args, **kwargs):      # the stranger wins the race here
        got = readlink(path, *args, **kwargs)
        if str(path).startswith("/proc/self/fd/") and not os.path.islink(unsafe):
            os.rename(unsafe, tmp_path / "moved")
            os.symlink(safe, unsafe)
        return got
    monkeypatch.setattr(os, "readlink", swapping)
    with pytest.raises(fastmfd.ConfigError, match=f"output directory {unsafe}: .* was "
                                                  f"replaced as it was opened"):
        OutputDir(str(unsafe))
    assert os.listdir(tmp_path / "moved") == []
