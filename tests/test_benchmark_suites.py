"""The pytest-benchmark suites (``pytest benchmarks``) as a user runs them: what each
benchmark's statistics are of, and ``--benchmark-autosave`` then
``--benchmark-compare``: a saved benchmark is compared only with the same one
measured alike (pytest-benchmark pairs tests by full name alone; a migration of
16 MiB was shown, and judged by --benchmark-compare-fail, beside the same test
moving 64 MiB). Real pytest runs of the suites, tiny sizes; timings are never
asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from proc_scan import made_by_this_run

from fastmfd.tools import images
from listen_support import REPO

MIGRATE = ["benchmarks/test_migrate_throughput.py", "-k", "random-none-1ch",
           "--migrate-rounds", "1"]
BITMAP = ["benchmarks/test_bench_dirty_bitmap.py", "-k", "sparse"]


def _pytest(storage: Path, *args: str, status: int = 0) -> str:
    # Not PYTEST_XDIST_WORKER & co.: in a worker of this run's -n 2, pytest-benchmark
    # read them as its own run's and timed nothing (no JSON saved: a full run failed).
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("CI", None)                         # --sizes and --migrate-size say the sizes
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "default", f"--benchmark-storage={storage}", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == status, output[-4000:]
    return output


def _saved(storage: Path) -> list[dict]:
    (path,) = storage.glob("*/0001_*.json")
    return json.loads(path.read_text())["benchmarks"]


def test_a_migration_of_another_size_is_not_compared(tmp_path):
    _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-autosave")
    (saved,) = _saved(tmp_path)
    assert saved["extra_info"]["conditions"] == {"image_bytes": 1 << 20, "prealloc": False,
                                                 "link": None}
    output = _pytest(tmp_path, *MIGRATE, "--migrate-size", "2M", "--benchmark-compare",
                     "--benchmark-compare-fail=min:1%")
    assert "(0001_" not in output and "Performance has regressed" not in output, output
    assert ("test_migrate[random-none-1ch]: not compared with the saved run: image_bytes: "
            "1.00 MiB before, 2.00 MiB now") in output, output
    # Measured alike, it still compares.
    output = _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-compare")
    assert "test_migrate[random-none-1ch] (0001_" in output, output
    assert "not compared" not in output, output


def test_a_migration_into_preallocated_memory_is_not_compared_with_fresh(tmp_path):
    _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-autosave")
    output = _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--migrate-prealloc",
                     "--benchmark-compare")
    assert "(0001_" not in output, output
    assert "prealloc: no before, yes now" in output, output


def test_core_benchmarks_of_other_sizes_are_not_compared(tmp_path):
    _pytest(tmp_path, *BITMAP, "--sizes", "ci", "--benchmark-autosave")
    (saved,) = _saved(tmp_path)
    assert saved["extra_info"]["conditions"] == {"bitmap_pages": (64 << 20) // 4096}
    output = _pytest(tmp_path, *BITMAP, "--sizes", "full", "--benchmark-compare")
    assert "(0001_" not in output, output
    assert "bitmap_pages: 16384 before, 262144 now" in output, output


def test_a_saved_run_without_conditions_is_not_compared_but_one_that_needs_none_is(tmp_path):
    # A run saved before conditions were recorded: the migration may have moved any size.
    # The RAM-header codec's timing depends on no option: it compares whatever the file.
    header = ["benchmarks/test_bench_ram_header.py", "-k", "cython-validate"]
    _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-autosave")
    _pytest(tmp_path, *header, "--benchmark-autosave")
    for path in tmp_path.glob("*/*.json"):
        doc = json.loads(path.read_text())
        for bench in doc["benchmarks"]:
            del bench["extra_info"]["conditions"]
        path.write_text(json.dumps(doc))
    output = _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-compare=0001")
    assert "(0001_" not in output, output
    assert "its conditions were not recorded (now: image_bytes 1.00 MiB, prealloc no, " \
           "link none)" in output, output
    output = _pytest(tmp_path, *header, "--benchmark-compare=0002")
    assert "[cython-validate] (0002_" in output, output


def test_a_saved_run_of_odd_shape_is_left_out_saying_why_not_an_internal_error(tmp_path):
    # Another tool's file, or one edited: extra_info a list raised AttributeError in the
    # compare hook, an image_bytes past a float's range OverflowError in format_bytes,
    # each pytest's INTERNALERROR (exit 3) before any test ran.
    _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-autosave")
    (path,) = tmp_path.glob("*/0001_*.json")
    doc = json.loads(path.read_text())
    (saved,) = doc["benchmarks"]
    listed = {**saved, "extra_info": []}
    huge = {**saved, "extra_info": {"conditions": {**saved["extra_info"]["conditions"],
                                                   "image_bytes": 10**400}}}
    for shape in (listed, huge):
        doc["benchmarks"] = [shape]
        path.write_text(json.dumps(doc))
        output = _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--benchmark-compare")
        assert "(0001_" not in output and "INTERNALERROR" not in output, output
        assert "test_migrate[random-none-1ch]: not compared with the saved run: " + (
            "its conditions were not recorded" if shape is listed else
            f"image_bytes: {str(10**400)[:57]}... before, 1.00 MiB now") in output, output


def test_the_downtime_benchmarks_statistics_are_of_the_downtime(tmp_path):
    # They were of the whole migration: precopy + ack's live rounds made it the slowest
    # in pytest-benchmark's table though its downtime was a fifth of all-at-stop's.
    out = tmp_path / "downtime.json"
    _pytest(tmp_path, "benchmarks/test_downtime.py", "-k", "1dev-precopy or precopy_downtime",
            "--sizes", "ci", "--migrate-rounds", "2", f"--benchmark-json={out}")
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert {b["name"] for b in benchmarks} == {
        "test_downtime[1dev-precopy+ack]", "test_precopy_downtime[all at stop]",
        "test_precopy_downtime[precopy+ack]"}
    for bench in benchmarks:
        runs, stats = bench["extra_info"]["runs"], bench["stats"]
        assert stats["data"] == [run["downtime_s"] for run in runs], bench["name"]
        assert stats["min"] == bench["extra_info"]["downtime_s"] == min(stats["data"])
        # the whole migrations are still there: precopy's live rounds come first
        assert all(run["seconds"] > run["downtime_s"] for run in runs)
        assert bench["extra_info"]["conditions"] == {"sizes": "ci", "timed": "downtime_s"}


def test_every_migration_run_has_its_cpu_and_the_load_beside_it(tmp_path):
    # QEMU's runs (timed by run_once) had cpu_s and foreign_cores; fastmfd's and
    # sendall's, timed by the suite itself, had neither: none was ever flagged.
    out = tmp_path / "migrate.json"
    output = _pytest(tmp_path, "benchmarks/test_migrate_throughput.py", "-k",
                     "random-none-1ch or random-sendall", "--migrate-size", "1M",
                     "--migrate-rounds", "2", f"--benchmark-json={out}")
    assert "* a run beside more than 0.25 cores of other load" in output, output
    benchmarks = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    sides = {"test_migrate[random-none-1ch]": {"source", "destination", "main"},
             "test_migrate[random-sendall]": {"source", "destination"}}
    assert set(benchmarks) == set(sides)
    for name, info in benchmarks.items():
        assert len(info["runs"]) == 2
        for run in info["runs"]:
            assert set(run["cpu_s"]) == sides[name], run
            assert all(seconds >= 0 for seconds in run["cpu_s"].values())
            assert run["foreign_cores"] >= 0


def _scratch() -> set[str]:
    return {n for n in os.listdir(images.scratch_parent()) if n.startswith("fastmfd-bench-")}


@pytest.mark.parametrize("option, value, said", [
    ("--migrate-size", "1000", "'1000' is not a whole number of 4 KiB pages"),
    ("--migrate-size", "abc", "'abc' is not a size"),
    ("--migrate-rounds", "0", "'0' is not a whole number >= 1"),        # it ran 1 round
    ("--migrate-link", "bogus", "link 'bogus': expected RATE[/DELAY]"),
])
def test_a_migration_option_mistake_is_a_usage_error_before_any_work(tmp_path, option, value,
                                                                     said):
    # Each was a traceback in every test (or, for the rounds, no error at all).
    before = _scratch()
    output = _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", option, value, status=4)
    assert f"error: argument {option}: {said}" in output, output
    assert "Traceback" not in output and "passed" not in output, output
    assert made_by_this_run(_scratch() - before) == set()


def test_an_image_that_cannot_fit_is_refused_in_one_line_and_never_made(tmp_path):
    # It was made until /dev/shm was full, or, past the memory, tried in every test.
    before = _scratch()
    output = _pytest(tmp_path, "benchmarks/test_migrate_throughput.py", "-k",
                     "random-none-1ch or random-none-2ch", "--migrate-size", "100T", status=1)
    assert output.count("a 100 TiB random image and a destination's copy need 200 TiB; "
                        f"{images.scratch_parent()} has ") == 2, output
    assert "cannot map" not in output and "Traceback" not in output, output
    assert "2 failed" in output, output
    assert made_by_this_run(_scratch() - before) == set()


def _warm_destinations():
    """benchmarks/warm_destinations.py as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "warm_destinations", REPO / "benchmarks" / "warm_destinations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, said", [
    (["--modes", "plain,pooled"], "argument --modes: pooled: choose from plain, prealloc, pool"),
    (["--rounds", "0"], "argument --rounds: '0' is not a whole number >= 1"),
    (["--size", "1000"], "argument --size: '1000' is not a whole number of 4 KiB pages"),
    (["--compression", "lz4"], "argument --compression: invalid choice: 'lz4'"),
])
def test_warm_destinations_refuses_a_mistake_before_any_work(args, said):
    # --modes pooled ran prealloc and printed it as "pooled"; --rounds 0 was a traceback
    # after the image was made.
    before = _scratch()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "warm_destinations.py"),
                           "--size", "1M", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    assert made_by_this_run(_scratch() - before) == set()


def test_warm_destinations_warms_free_memory_right_before_every_run(monkeypatch, capsys):
    # It never did: the run after the image was made (always plain's first) met memory
    # the host had taken back, unlike fastmfd bench's and the suites' runs.
    module = _warm_destinations()
    events = []
    monkeypatch.setattr(module, "warm_free_memory", lambda size: events.append(("warm", size)))

    def one_run(image, config, mode, pool, huge_pages):
        events.append(("run", mode))
        return {"seconds": 0.1, "prealloc": 0.0, "dst_cpu": 0.0, "foreign": 0.0}
    monkeypatch.setattr(module, "one_run", one_run)
    assert module.main(["--size", "1M", "--rounds", "2", "--modes", "plain,pool"]) == 0
    warm = ("warm", 1 << 20)
    assert events == [warm, ("run", "plain"), warm, ("run", "pool"),
                      warm, ("run", "pool"), warm, ("run", "plain")]
    assert "pool 2+" in capsys.readouterr().out


NEEDS_QEMU = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")


@pytest.mark.parametrize("qemu", [False, pytest.param(True, marks=NEEDS_QEMU)],
                         ids=["fastmfd", "with-qemu"])
def test_the_profiled_run_is_not_counted_as_a_timed_one(tmp_path, qemu):
    # --benchmark-cprofile runs the target once more under the profiler, outside
    # pytest-benchmark's statistics: it was a third run of two in extra_info and the
    # end-of-run table (spread 2.94), and timed QEMU a third time.
    out = tmp_path / "profiled.json"
    _pytest(tmp_path, *MIGRATE, "--migrate-size", "1M", "--migrate-rounds", "2",
            "--benchmark-cprofile=tottime", f"--benchmark-json={out}",
            *(["--qemu"] if qemu else []))
    (bench,) = json.loads(out.read_text())["benchmarks"]
    assert bench["stats"]["rounds"] == 2 and "cprofile" in bench
    assert len(bench["extra_info"]["runs"]) == 2
    if qemu:
        assert len(bench["extra_info"]["qemu_runs"]) == 2
