"""The directories and files commands make for their users (fastmfd.tools.new_files):
made as ``os.makedirs`` makes them, durable, and nothing left behind by a failure."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from fastmfd.errors import OutputError
from fastmfd.tools import new_files
from fastmfd.tools.new_files import make_directories, write_new_file
from fastmfd.tools.outputs import OutputDir


def test_make_directories_walks_the_path_as_the_kernel_does(tmp_path):
    """``link/../out`` is ``out`` beside the link's target: the walk went by the
    text and made a stray ``out`` beside the link instead (found in review)."""
    (tmp_path / "elsewhere" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "inner")
    made = make_directories(str(tmp_path / "link" / ".." / "out"))
    assert (tmp_path / "elsewhere" / "out").is_dir() and not (tmp_path / "out").exists()
    assert len(made) == 1


def test_make_directories_takes_one_made_meanwhile(tmp_path, monkeypatch):
    """Another listener makes the same directory between the look and the mkdir:
    it was refused as "exists and is not a directory"."""
    real_mkdir = os.mkdir

    def beaten(path, *args, **kwargs):
        real_mkdir(path)            # the other one, first
        real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", beaten)
    assert make_directories(str(tmp_path / "a" / "b")) == []
    assert (tmp_path / "a" / "b").is_dir()


def test_make_directories_makes_again_a_parent_removed_meanwhile(tmp_path, monkeypatch):
    """Listener A made P for P/a and fails, removing P, empty for that instant,
    just as listener B, which found P there, makes P/b: B failed with "No such
    file or directory" (found in review; the interleaving forced here)."""
    first = OutputDir(str(tmp_path / "P" / "a"))
    real_mkdir = os.mkdir

    def after_a_failed(path, *args, **kwargs):
        if path == str(tmp_path / "P" / "b") and first.fd >= 0:
            first.abort()
            first.close()
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(new_files.os, "mkdir", after_a_failed)
    second = OutputDir(str(tmp_path / "P" / "b"))
    try:
        assert (tmp_path / "P" / "b").is_dir() and first.fd < 0
    finally:
        second.close()


def test_make_directories_fsyncs_each_parent(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(
        f"/proc/self/fd/{fd}")), real_fsync(fd)))
    assert make_directories(str(tmp_path / "a" / "b")) == [str(tmp_path / "a"),
                                                           str(tmp_path / "a" / "b")]
    assert synced == [str(tmp_path), str(tmp_path / "a")]


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(new_files.os, "fsync", full)
    with pytest.raises(OutputError, match=r"bench\.json: not written: No space left"):
        write_new_file(str(tmp_path / "bench.json"), b"{}")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_an_error_naming_the_file(small_disk):
    """It was the errno alone, "fastmfd bench: [Errno 28] No space left on device", after
    a bench that may have run an hour: not which file, nor that it was not written (a
    review)."""
    path = small_disk / "results.json"
    with pytest.raises(OutputError, match=rf"^{path}: not written: No space left on device$"):
        write_new_file(str(path), bytes(2 << 20))
    assert os.listdir(small_disk) == []


def test_a_file_system_with_no_inode_left_is_an_error_naming_the_file(small_disk):
    """Making its temporary file failed with the errno and the temporary's name
    ("[Errno 28] No space left on device: '.results.json.1a2b3c4d.part'"), not the
    file asked for, nor that it was not written (a review)."""
    remount = subprocess.run(["mount", "-o", "remount,nr_inodes=2", str(small_disk)],
                             capture_output=True, text=True)
    assert remount.returncode == 0, remount.stderr
    (small_disk / "filler").touch()         # the last inode (the root holds the other)
    path = small_disk / "results.json"
    with pytest.raises(OutputError, match=rf"^{path}: not written: No space left on device$"):
        write_new_file(str(path), b"{}")
    assert os.listdir(small_disk) == ["filler"]



def test_an_absolute_directory_is_taken_where_the_working_directory_was_removed(
        tmp_path, monkeypatch):
    """Whose it is was walked from the working directory, absolute or not: one removed
    (a shell left in a deleted directory) refused it as "replaced as it was opened"
    (a review)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    out = OutputDir(str(tmp_path / "out"))
    try:
        assert out.real == str(tmp_path / "out")
    finally:
        out.abort()
        out.close()
