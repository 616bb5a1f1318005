"""``fastmfd bench [--size] [--channels] [--compression] [--image] [--repeat] [--peer] [--json]``.

Tiny images, real migrations: the command must verify every transfer, print
its table and chart, and refuse bad arguments with a clear message. Timings
are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from leakcheck import leaks  # noqa: F401

from fastmfd.tools import images
from fastmfd.tools.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_scratch_left():
    """Images live in private tmpfs directories; none may outlive the command."""
    def scratch() -> set[str]:
        return {n for n in os.listdir(images.scratch_parent()) if n.startswith("fastmfd-bench-")}

    before = scratch()
    yield
    assert scratch() - before == set()


def test_matrix_with_peer_verifies_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "1M", "--channels", "1,2", "--compression", "none,zstd",
                 "--image", "halftext", "--peer", "sendall", "--repeat", "2",
                 "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    labels = ["sendall (1 socket)", "fastmfd 1ch none", "fastmfd 2ch none",
              "fastmfd 1ch zstd-1", "fastmfd 2ch zstd-1"]
    table, chart = printed.out.split("throughput, halftext image")
    for label in labels:
        assert label in table
        assert any(label in line and "█" in line for line in chart.splitlines())
    assert "best of 2" in table and "speed vs sendall" in table
    # Progress goes to stderr, one verified line per run.
    assert printed.err.count("verified") == 2 * len(labels)

    results = json.loads(out.read_text())
    assert [r["label"] for r in results] == labels
    for r in results:
        assert r["image"] == "halftext" and r["image_bytes"] == 1 << 20
        assert len(r["runs_s"]) == 2 and r["best_s"] == min(r["runs_s"])
    fastmfd = [r for r in results if r["method"] == "fastmfd"]
    # Half the pages are zero: fastmfd sends them as offsets only.
    assert all(r["details"]["zero_pages"] == 128 for r in fastmfd)
    assert all(r["wire_bytes"] < (1 << 20) for r in fastmfd)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_qemu_peer_migrates_the_same_image(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "16M", "--channels", "2", "--compression", "none,zlib",
                 "--image", "halftext", "--peer", "qemu", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "speed vs QEMU" in printed.out
    results = {r["label"]: r for r in json.loads(out.read_text())}
    assert set(results) == {f"{method} 2ch {comp}" for comp in ("none", "zlib-1")
                            for method in ("fastmfd", "qemu", "qemu-to-fastmfd",
                                           "fastmfd-to-qemu")}
    qemu = results["qemu 2ch zlib-1"]
    # QEMU's own view of the run: the image's pages (plus its ROMs) went over.
    assert qemu["details"]["normal_pages"] >= (16 << 20) // 4096 // 2
    assert qemu["details"]["qemu_total_time_s"] >= 0       # whole ms: may round to 0
    # fastmfd as either end of a QEMU migration moved the same non-zero pages.
    for method in ("qemu-to-fastmfd", "fastmfd-to-qemu"):
        assert results[f"{method} 2ch zlib-1"]["details"]["normal_pages"] >= \
            (16 << 20) // 4096 // 2
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                text=True).stdout.splitlines()
                if line.startswith("qemu-system") and "fastmfd-bench-" in line]


def test_command_line_entry_point():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, "-m", "fastmfd", "bench", "--size", "256K",
                           "--channels", "2", "--compression", "zlib", "--image", "random"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fastmfd 2ch zlib-1" in done.stdout and "verified" in done.stderr


def test_a_destination_that_differs_fails_the_command(monkeypatch, capsys):
    monkeypatch.setattr(images.Image, "matches", lambda self, data: False)
    code = main(["bench", "--size", "256K", "--channels", "1", "--compression", "none"])
    assert code == 1
    assert "differs from the random image" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--size", "12X"], "argument --size: '12X' is not a size"),
    (["--size", "1000"], "not a whole number of 4 KiB pages"),
    (["--size", "0"], "argument --size: '0' is not a positive size"),
    (["--channels", "0,2"], "channel counts must be >= 1"),
    (["--channels", "two"], "is not a comma-separated list"),
    (["--compression", "none,lz4"], "lz4: choose from none, zlib, zstd"),
    (["--image", "noise"], "noise: choose from random, text, mixed, halftext, zero"),
    (["--repeat", "0"], "argument --repeat: '0' is not a positive whole number"),
    (["--peer", "scp"], "argument --peer: invalid choice: 'scp'"),
])
def test_bad_arguments_exit_2_naming_the_problem(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "fastmfd bench: error:" in err and message in err


@pytest.mark.parametrize("args, message", [
    (["--compression", "zstd", "--level", "42"], "compression_level must be in 1..20 for zstd, not 42"),
    (["--peer", "qemu", "--qemu-binary", "/nonexistent/qemu"], "/nonexistent/qemu not found"),
])
def test_settings_that_cannot_run_exit_1_before_any_work(args, message, capsys):
    assert main(["bench", "--size", "256K", *args]) == 1
    printed = capsys.readouterr()
    assert printed.err.startswith(f"fastmfd bench: {message}")
    assert "making" not in printed.err
