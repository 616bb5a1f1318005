"""``fastmfd bench [--size] [--channels] [--compression] [--image] [--repeat] [--peer] [--json]``.

Tiny images, real migrations: the command must verify every transfer, print
its table and chart, and refuse bad arguments with a clear message. Timings
are printed, never asserted.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from leakcheck import leaks  # noqa: F401
from filesystems import put_in_the_way
from proc_scan import alive, made_by_this_run

from fastmfd.errors import ConfigError, MigrationError
from fastmfd.tools import images
from fastmfd.tools.bench.output import BAR_WIDTH
from fastmfd.tools.bench.peers import QemuTrial
from fastmfd.tools.bench.qemu_cells import QemuToFastmfdTrial
from fastmfd.tools.bench.trial import WARM_MARGIN, warm_free_memory
from fastmfd.tools.cli import main
from fastmfd.tools.new_files import check_new_file, write_new_file
from listen_support import REPO, run_cli


@pytest.fixture(autouse=True)
def no_scratch_left():
    """Images live in private tmpfs directories; none may outlive the command.
    Only this run's count: other runs on the machine make their own."""
    def scratch() -> set[str]:
        return {n for n in os.listdir(images.scratch_parent()) if n.startswith("fastmfd-bench-")}

    before = scratch()
    yield
    assert made_by_this_run(scratch() - before) == set()


def test_matrix_with_peer_verifies_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "1M", "--channels", "1,2", "--compression", "none,zstd",
                 "--image", "halftext", "--peer", "sendall", "--repeat", "2",
                 "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    labels = ["sendall (1 socket)", "fastmfd 1ch none", "fastmfd 2ch none",
              "fastmfd 1ch zstd-1", "fastmfd 2ch zstd-1"]
    table, chart = printed.out.split("throughput (median), halftext image")
    assert "vs sendall" in table and "vs:" in table
    rows = chart.splitlines()
    for label in labels:
        assert label in table
        assert any(line.strip().startswith(label) for line in rows)
    # The fastest row's bar is full, the others drawn to its scale: one 40 times
    # slower (a 1 MiB migration beside sendall's, on a loaded machine) is no block
    # at all: a "█" in every row failed the test 1 run in 4 under load (slowed polls).
    assert "█" * BAR_WIDTH in chart
    assert "median of 2" in table and "vs sendall" in table
    # Progress goes to stderr, one verified line per run; the second repeat runs
    # the settings in reverse, so no side always runs first.
    runs = [line for line in printed.err.splitlines() if "verified" in line]
    assert len(runs) == 2 * len(labels)
    order = [next(label for label in labels if label in line) for line in runs]
    assert order == labels + labels[::-1]

    doc = json.loads(out.read_text())
    # pytest-benchmark's layout: where, when, from which code, then the results.
    assert doc["machine_info"]["cpu_count"] == os.cpu_count()
    assert doc["machine_info"]["python_version"] == platform.python_version()
    assert set(doc["commit_info"]) >= {"id", "dirty", "branch"}
    assert datetime.datetime.fromisoformat(doc["datetime"]).tzinfo is not None
    results = doc["benchmarks"]
    assert [r["name"] for r in results] == [f"halftext {label}" for label in labels]
    for r in results:
        extra, stats = r["extra_info"], r["stats"]
        assert extra["image"] == "halftext" and extra["image_bytes"] == 1 << 20
        assert extra["link"] == "loopback TCP" and extra["tls"] is None
        assert extra["warm_memory"] is True and extra["prealloc"] is False
        assert stats["rounds"] == 2 and stats["data"] == [run["seconds"] for run in extra["runs"]]
        assert stats["min"] == min(stats["data"]) and stats["max"] == max(stats["data"])
        assert stats["min"] <= stats["median"] <= stats["max"] and stats["stddev"] >= 0
        assert extra["first_s"] == stats["data"][0] and extra["spread"] >= 1
        assert all(run["foreign_cores"] >= 0 for run in extra["runs"])
    assert [(r["extra_info"]["peer"], r["extra_info"]["channels"],
             r["extra_info"]["compression"]) for r in results] == \
        [("sendall", 1, "none"), ("fastmfd", 1, "none"), ("fastmfd", 2, "none"),
         ("fastmfd", 1, "zstd-1"), ("fastmfd", 2, "zstd-1")]
    fastmfd = [r["extra_info"] for r in results if r["extra_info"]["peer"] == "fastmfd"]
    # Half the pages are zero: fastmfd sends them as offsets only.
    assert all(run["zero_pages"] == 128 for r in fastmfd for run in r["runs"])
    assert all(r["wire_bytes"] < (1 << 20) for r in fastmfd)
    # Each side's processes were measured (CPU seconds can round to 0 at 1 MiB).
    assert all(set(run["cpu_s"]) == {"source", "destination", "main"}
               for r in fastmfd for run in r["runs"])


def test_json_is_read_by_pytest_benchmarks_own_compare(tmp_path, capsys):
    # It lacked iqr, q1, q3, outliers, ...: `pytest-benchmark compare` failed with
    # KeyError 'iqr'. Three runs: an odd count takes pytest-benchmark's other quartiles.
    from pytest_benchmark.stats import Stats
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "1M", "--channels", "1", "--compression", "none",
                 "--repeat", "3", "--json", str(out)]) == 0, capsys.readouterr().err
    for bench in json.loads(out.read_text())["benchmarks"]:
        theirs = Stats()
        for seconds in bench["stats"]["data"]:
            theirs.update(seconds)
        stats = bench["stats"]
        assert stats.pop("data") == theirs.data and stats.pop("iterations") == 1
        assert stats == pytest.approx(theirs.as_dict())
    compare = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(out)],
                             capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare.stderr
    assert "random fastmfd 1ch none" in compare.stdout and "IQR" in compare.stdout


def test_pytest_benchmarks_compare_groups_only_results_measured_alike(tmp_path, capsys):
    # Every result's group was its image alone: `pytest-benchmark compare` rated a 16 MiB
    # run 3.29x faster than the same setting moving 128 MiB, in one table.
    small, large = tmp_path / "small.json", tmp_path / "large.json"
    common = ["bench", "--channels", "1", "--compression", "none"]
    assert main([*common, "--size", "1M", "--json", str(small)]) == 0
    assert main([*common, "--size", "2M", "--prealloc", "--json", str(large)]) == 0
    capsys.readouterr()
    groups = [json.loads(path.read_text())["benchmarks"][0]["group"] for path in (small, large)]
    assert groups == ["random 1.00 MiB", "random 2.00 MiB, destination preallocated"]
    compare = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(small),
                              str(large)], capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare.stderr
    assert "benchmark 'random 1.00 MiB': 1 tests" in compare.stdout, compare.stdout
    assert "benchmark 'random 2.00 MiB, destination preallocated': 1 tests" in compare.stdout


def test_a_results_group_holds_its_own_conditions():
    """A group says what RunConditions.of says of its cell: a sendall cell of a TLS
    run has no TLS (its extra_info says none), so its group is a plain run's; a QEMU
    cell's names the QEMU (of() does), a fastmfd cell's does not."""
    from fastmfd.tools.bench.document import RunConditions
    from fastmfd.tools.bench.matrix import Setting
    run = RunConditions(tls="TLS 1.3", qemu="QEMU emulator version 7.2.22")
    assert run.group(Setting("sendall"), "random", 1 << 20) == "random 1.00 MiB"
    assert run.group(Setting("fastmfd"), "random", 1 << 20) == "random 1.00 MiB, TLS 1.3"
    assert run.group(Setting("qemu"), "random", 1 << 20) == (
        "random 1.00 MiB, TLS 1.3, QEMU emulator version 7.2.22")


def _memory_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def test_warming_free_memory_touches_a_little_more_than_the_image_and_frees_it():
    size = 64 << 20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")                    # the peak resident size starts again from now
    resident = _memory_kib("VmRSS")
    warm_free_memory(size)
    peak, after = _memory_kib("VmHWM"), _memory_kib("VmRSS")
    # The kernel's resident counts are per-CPU estimates: within a MiB here.
    assert (peak - resident) << 10 >= size + size // WARM_MARGIN - (1 << 20)    # all in
    assert (after - resident) << 10 < 8 << 20                                   # and out


def test_cold_memory_is_said_in_the_table_and_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "1M", "--channels", "1", "--compression", "none",
                 "--cold-memory", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "free memory not warmed" in printed
    assert "vs:" not in printed     # no peer, no "vs" column to explain (a review)
    assert json.loads(out.read_text())["benchmarks"][0]["extra_info"]["warm_memory"] is False


def test_a_value_named_twice_runs_once(tmp_path, capsys):
    # Each ran twice per repeat and both runs went into its one row: 2ch's a median of 2
    # beside 1ch's 1 (rounds 2 in the JSON), two random images made and merged.
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "1M", "--channels", "1,2,2,1", "--compression", "none,none",
                 "--image", "random,random", "--repeat", "1", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("making a") == 1
    assert [line.split("run 1:")[0].split() for line in err.splitlines() if "verified" in line] \
        == [["random", "fastmfd", "1ch", "none"], ["random", "fastmfd", "2ch", "none"]]
    assert [(b["name"], b["stats"]["rounds"]) for b in json.loads(out.read_text())["benchmarks"]] \
        == [("random fastmfd 1ch none", 1), ("random fastmfd 2ch none", 1)]


@pytest.mark.parametrize("where", ["missing-dir/bench.json", "."])
def test_json_to_an_unwritable_path_fails_before_the_run(tmp_path, capsys, where):
    path = tmp_path / where
    code = main(["bench", "--size", "1M", "--channels", "1", "--compression", "none",
                 "--json", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--json {path}" in err and "making a" not in err      # no image was made
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compare_with_an_earlier_run_and_draw_an_svg_chart(tmp_path, capsys):
    # A bracket in its name: rich's markup took '[f]' for a tag ('compared with bere.json').
    before, chart = tmp_path / "be[f]ore.json", tmp_path / "chart.svg"
    args = ["bench", "--size", "1M", "--channels", "1", "--compression", "none,zstd"]
    assert main([*args, "--json", str(before)]) == 0
    capsys.readouterr()
    assert main([*args, "--compare", str(before), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    compared = out.split("compared with be[f]ore.json")[1]
    for name in ("random fastmfd 1ch none", "random fastmfd 1ch zstd-1"):
        row = next(line for line in compared.splitlines() if name in line)
        assert re.search(r"\d+ ms .* \d+ ms .* \d+\.\d\dx", row), row
    svg = chart.read_text()
    text = re.sub(r"<[^>]*>", "", svg).replace("&#160;", " ")      # what it shows
    assert svg.startswith("<svg") and "random image" in text
    assert "fastmfd 1ch zstd-1" in text and "█" in text


def test_compare_pairs_only_results_measured_alike(tmp_path, capsys):
    # Paired by name alone, a result in TLS was shown with a speed-up over the same one
    # without: sendall has no TLS, so its row pairs and fastmfd's does not.
    before = tmp_path / "before.json"
    args = ["bench", "--size", "1M", "--channels", "1", "--compression", "none",
            "--peer", "sendall"]
    assert main([*args, "--json", str(before)]) == 0
    capsys.readouterr()
    assert main([*args, "--tls", "--compare", str(before)]) == 0
    compared = capsys.readouterr().out.split("compared with before.json")[1]
    rows = {name: next(line for line in compared.splitlines() if name in line)
            for name in ("random sendall (1 socket)", "random fastmfd 1ch none")}
    assert re.search(r"\d+ ms .* \d+ ms .* \d+\.\d\dx", rows["random sendall (1 socket)"])
    assert re.search(r"\d+ ms .* \d+ ms .* — .* not comparable: TLS: none before, TLS now",
                     rows["random fastmfd 1ch none"]), rows


def test_compare_says_when_two_bests_are_of_unlike_run_counts(tmp_path, capsys):
    # A best of 1 run beside a best of 3 showed a plain speed-up: the best of more runs
    # is lower by chance alone.
    before = tmp_path / "before.json"
    args = ["bench", "--size", "1M", "--channels", "1", "--compression", "none"]
    assert main([*args, "--repeat", "3", "--json", str(before)]) == 0
    capsys.readouterr()
    assert main([*args, "--compare", str(before)]) == 0
    compared = capsys.readouterr().out.split("compared with before.json")[1]
    row = " ".join(next(line for line in compared.splitlines()
                        if "random fastmfd 1ch none" in line).split())
    assert re.search(r"\d+\.\d\dx", row) and "best of 3 before, of 1 now" in row, row
    assert main([*args, "--repeat", "3", "--compare", str(before)]) == 0
    compared = capsys.readouterr().out.split("compared with before.json")[1]
    assert "best of" not in compared and "note" not in compared, compared


def _edited(path: Path, extra_info: dict | None) -> Path:
    """A copy of ``path``'s results with these extra_info fields (None: with no extra_info,
    as a pytest-benchmark file)."""
    doc = json.loads(path.read_text())
    for bench in doc["benchmarks"]:
        if extra_info is None:
            del bench["extra_info"]
        else:
            bench["extra_info"].update(extra_info)
    edited = path.with_name("edited.json")
    edited.write_text(json.dumps(doc))
    return edited


@pytest.mark.parametrize("edit, args, why", [
    # a 64 MiB run beside a 1 GiB one showed a tenfold "speed-up" by times
    ({}, ["--size", "2M"], "image: 1.00 MiB before, 2.00 MiB now"),
    ({"image_bytes": 1 << 30}, [], "image: 1.00 GiB before, 1.00 MiB now"),
    # (an int past a float's range: format_bytes raised OverflowError, a traceback)
    ({"image_bytes": 10**400}, [], f"image: {str(10**400)[:57]}... before, 1.00 MiB now"),
    ({}, ["--prealloc"], "destination preallocated: no before, yes now"),
    ({}, ["--cold-memory"], "free memory warmed: yes before, no now"),
    ({"link": "emulated 1gbit (veth, tc)"}, [],
     "link: emulated 1gbit (veth, tc) before, loopback TCP now"),
    (None, [], "not recorded before: image, link, TLS, destination "
                               "preallocated, free memory warmed"),
])
def test_compare_with_nothing_measured_alike_exits_2_before_the_run(tmp_path, capsys, edit,
                                                                     args, why):
    before = tmp_path / "before.json"
    common = ["bench", "--channels", "1", "--compression", "none"]
    assert main([*common, "--size", "1M", "--json", str(before)]) == 0
    capsys.readouterr()
    old = _edited(before, edit)
    code = main([*common, "--size", "1M", *args, "--compare", str(old)])
    err = capsys.readouterr().err
    assert code == 2 and "making a" not in err, err
    assert err == f"fastmfd bench: --compare {old}: no result in it was measured like this " \
                  f"run's: 'random fastmfd 1ch none': {why}\n"


def test_compare_with_no_result_of_the_same_name_exits_2_before_the_run(tmp_path, capsys):
    # It printed a table of "-" after the whole run.
    before = tmp_path / "before.json"
    common = ["bench", "--size", "1M", "--compression", "none"]
    assert main([*common, "--channels", "1", "--json", str(before)]) == 0
    capsys.readouterr()
    assert main([*common, "--channels", "2", "--compare", str(before)]) == 2
    assert capsys.readouterr().err == \
        f"fastmfd bench: --compare {before}: no result in it has the name (image and " \
        f"setting) of one of this run's, e.g. 'random fastmfd 2ch none'\n"


@pytest.mark.parametrize("args, message", [
    (["--compare", "/nonexistent/old.json"], "--compare /nonexistent/old.json: No such file"),
    (["--chart", "chart.png"], "name a .svg file"),
])
def test_compare_and_chart_mistakes_fail_before_the_run(args, message, capsys):
    try:
        code = main(["bench", "--size", "1M", "--channels", "1", "--compression", "none", *args])
    except SystemExit as exited:        # argparse's own checks
        code = exited.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "making a" not in err


NOT_RESULTS = {
    "fifo": "a FIFO, not a regular file",
    "link to /dev/zero": "a character device, not a regular file",
    "65 MiB": "larger than 64 MiB",
    "nested 200000 deep": "not a results file written by `fastmfd bench --json` (RecursionError",
    "extra_info a list": "not a results file written by `fastmfd bench --json` (TypeError: "
                         "extra_info of 'x' is not an object)",
    # A best time past a float's range was an OverflowError traceback; NaN, a negative
    # one and a string were taken: "nan ms", "-52.88x" in the table after the run.
    "min 10**400": "not a results file written by `fastmfd bench --json` (OverflowError: "
                   "int too large to convert to float)",
    "min NaN": "not a results file written by `fastmfd bench --json` (ValueError: the best "
               "time of 'x' is nan, not seconds)",
    "min -1": "not a results file written by `fastmfd bench --json` (ValueError: the best "
              "time of 'x' is -1, not seconds)",
    "min \"0.5\"": "not a results file written by `fastmfd bench --json` (ValueError: the "
                  "best time of 'x' is '0.5', not seconds)",
    "min \"\\n\"": "not a results file written by `fastmfd bench --json` (ValueError: the "
                   "best time of 'x' is '\\n', not seconds)",
}


@pytest.mark.parametrize("kind", NOT_RESULTS)
def test_a_compare_file_that_cannot_be_results_fails_before_the_run(tmp_path, kind):
    """A FIFO hung the command, /dev/zero was read until memory ran out, deep
    nesting was a RecursionError traceback: each in a child that may allocate
    256 MiB, given 20 s."""
    path = tmp_path / "old.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "65 MiB":
        with open(path, "wb") as f:
            f.truncate(65 << 20)
    elif kind == "extra_info a list":
        path.write_text('{"benchmarks": [{"name": "x", "stats": {"min": 1}, "extra_info": []}]}')
    elif kind.startswith("min "):
        best = kind[4:].replace("10**400", str(10**400))
        path.write_text('{"benchmarks": [{"name": "x", "stats": {"min": %s}}]}' % best)
    else:
        path.write_text("[" * 200_000)
    done = run_bench("--size", "1M", "--channels", "1", "--compression", "none",
                     "--compare", str(path), timeout=20, max_data=256 << 20)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"fastmfd bench: --compare {path}: {NOT_RESULTS[kind]}"), \
        done.stderr


def test_json_and_chart_naming_one_file_fail_before_the_run(tmp_path, capsys):
    # Each passed its check alone: the whole bench ran, then the second write failed.
    chart = tmp_path / "out.svg"
    code = main(["bench", "--size", "1M", "--channels", "1", "--compression", "none",
                 "--json", str(chart), "--chart", f"{tmp_path}/./out.svg"])
    err = capsys.readouterr().err
    assert code == 2 and "making a" not in err, err
    assert err == f"fastmfd bench: --json and --chart both name {tmp_path}/./out.svg: give " \
                  f"each its own file\n"
    assert os.listdir(tmp_path) == []


def test_an_interrupt_while_an_image_is_removed_removes_it_all(monkeypatch):
    """Ctrl-C landing in Image.close's rmtree (bench's last step) left the image
    directory, with what the trials put in it, in /dev/shm (found in review)."""
    image = images.Image.create("zero", 1 << 20)
    for name in ("received.img", "vmstate.bin", "manifest.json"):
        Path(image.directory, name).write_bytes(b"x")
    real_unlink = os.unlink
    pending = [True]

    def unlink_then_interrupt(*args, **kwargs):
        real_unlink(*args, **kwargs)
        if pending[0] and kwargs.get("dir_fd") is not None:      # rmtree's, in the tree
            pending[0] = False
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", unlink_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            image.close()
        assert not pending[0] and not os.path.exists(image.directory)
    finally:
        shutil.rmtree(image.directory, ignore_errors=True)


def test_output_checks_leave_no_file_behind(tmp_path):
    check_new_file(str(tmp_path / "new.json"), "--json")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option", ["--json", "--chart"])
@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
def test_an_output_that_exists_is_refused_before_the_run(tmp_path, capsys, option, kind):
    """A user's file is not replaced, a link not followed (its target was
    overwritten), a FIFO not opened (the check hung on it)."""
    path, victim = tmp_path / "out.svg", tmp_path / "victim"
    victim.write_text("the user's")
    put_in_the_way(path, kind, victim)
    code = main(["bench", "--size", "1M", "--channels", "1", "--compression", "none",
                 option, str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{option} {path}: exists" in err and "making a" not in err
    assert victim.read_text() == "the user's"
    if kind == "file":
        assert path.read_text() == "the user's"


def test_write_new_file_never_replaces_what_appeared_meanwhile(tmp_path):
    path = tmp_path / "bench.json"
    write_new_file(str(path), b"first")
    with pytest.raises(ConfigError, match="appeared meanwhile: not replacing it; the data "
                                          "is in ") as refused:
        write_new_file(str(path), b"second")
    assert path.read_bytes() == b"first"
    kept = str(refused.value).rsplit(" ", 1)[1]             # the second run's data, kept
    assert open(kept, "rb").read() == b"second"


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_qemu_peer_migrates_the_same_image(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "16M", "--channels", "2", "--compression", "none,zlib",
                 "--image", "halftext", "--peer", "qemu", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "vs QEMU" in printed.out
    results = {r["name"]: r["extra_info"] for r in json.loads(out.read_text())["benchmarks"]}
    assert set(results) == {f"halftext {method} 2ch {comp}" for comp in ("none", "zlib-1")
                            for method in ("fastmfd", "qemu", "qemu-to-fastmfd",
                                           "fastmfd-to-qemu")}
    qemu = results["halftext qemu 2ch zlib-1"]
    # QEMU's own view of the run: the image's pages (plus its ROMs) went over.
    assert qemu["runs"][0]["normal_pages"] >= (16 << 20) // 4096 // 2
    assert qemu["runs"][0]["qemu_total_time_s"] >= 0     # whole ms: a small run may show 0
    assert qemu["runs"][0]["seconds"] > 0
    assert set(qemu["runs"][0]["cpu_s"]) == {"source", "destination"}
    # fastmfd's workers at either end are measured too, so the machine's other load is known.
    for method in ("qemu-to-fastmfd", "fastmfd-to-qemu"):
        run = results[f"halftext {method} 2ch zlib-1"]["runs"][0]
        assert set(run["cpu_s"]) == {"source", "destination", "main"}
        assert "foreign_cores" in run
    # fastmfd as either end of a QEMU migration moved the same non-zero pages.
    for method in ("qemu-to-fastmfd", "fastmfd-to-qemu"):
        assert results[f"halftext {method} 2ch zlib-1"]["runs"][0]["normal_pages"] >= \
            (16 << 20) // 4096 // 2
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                text=True).stdout.splitlines()
                if line.startswith("qemu-system") and "fastmfd-bench-" in line]


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_compare_pairs_qemu_cells_only_with_the_same_qemu(tmp_path, capsys):
    # The JSON did not say which QEMU ran: --compare paired a QEMU 7.2 cell with the same
    # cell of a run against QEMU 10 as measured alike.
    version = subprocess.run(["qemu-system-x86_64", "-version"], capture_output=True,
                             text=True, timeout=30).stdout.splitlines()[0]
    before = tmp_path / "before.json"
    args = ["bench", "--size", "16M", "--channels", "1", "--compression", "none",
            "--peer", "qemu"]
    assert main([*args, "--json", str(before)]) == 0
    assert f"random image, 16.0 MiB, {version}" in capsys.readouterr().out
    results = {r["name"]: r["extra_info"] for r in json.loads(before.read_text())["benchmarks"]}
    assert "qemu" not in results["random fastmfd 1ch none"]
    for method in ("qemu", "qemu-to-fastmfd", "fastmfd-to-qemu"):
        assert results[f"random {method} 1ch none"]["qemu"] == version
    # pytest-benchmark compare too: a QEMU cell's group names its QEMU (it was the image
    # and size alone, and a QEMU 7.2 cell shared a table with the same one of QEMU 10).
    groups = {r["name"]: r["group"] for r in json.loads(before.read_text())["benchmarks"]}
    assert groups == {"random fastmfd 1ch none": "random 16.0 MiB",
                      **{f"random {method} 1ch none": f"random 16.0 MiB, {version}"
                         for method in ("qemu", "qemu-to-fastmfd", "fastmfd-to-qemu")}}
    doc = json.loads(before.read_text())
    for bench in doc["benchmarks"]:
        if "qemu" in bench["extra_info"]:
            bench["extra_info"]["qemu"] = "QEMU emulator version 10.0.13"
    other = tmp_path / "qemu10.json"
    other.write_text(json.dumps(doc))
    assert main([*args, "--compare", str(other)]) == 0
    compared = capsys.readouterr().out.split("compared with qemu10.json")[1]
    rows = {name: " ".join(next(line for line in compared.splitlines() if name in line
                                ).split())
            for name in (f"random {method} 1ch none" for method in
                         ("fastmfd", "qemu", "qemu-to-fastmfd", "fastmfd-to-qemu"))}
    assert re.search(r"\d+ ms .* \d+ ms .* \d+\.\d\dx", rows["random fastmfd 1ch none"]), rows
    for method in ("qemu", "qemu-to-fastmfd", "fastmfd-to-qemu"):
        assert re.search(r"\d+ ms .* \d+ ms .* — .* not comparable: QEMU: QEMU emulator",
                         rows[f"random {method} 1ch none"]), rows


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_qemu_peer_in_tls(tmp_path, capsys):
    """--tls puts QEMU's connections in TLS too, from the same throwaway files,
    with fastmfd at either end of QEMU's migration."""
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "16M", "--channels", "2", "--compression", "none",
                 "--image", "halftext", "--peer", "qemu", "--tls", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "QEMU in TLS (its tls-creds)" in printed.out
    results = {r["name"]: r["extra_info"] for r in json.loads(out.read_text())["benchmarks"]}
    assert set(results) == {f"halftext {method} 2ch none"
                            for method in ("fastmfd", "qemu", "qemu-to-fastmfd",
                                           "fastmfd-to-qemu")}
    assert {r["tls"] for r in results.values()} == {"TLS"}
    for method in ("qemu", "qemu-to-fastmfd"):
        assert results[f"halftext {method} 2ch none"]["runs"][0]["qemu_tls_creds"] == "tls0"


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_a_failed_qemu_migration_says_what_qemu_said():
    """A QEMU -> QEMU trial whose destination is gone fails with the source's own
    error, not with the destination's missing completion time."""
    with images.Image.create("random", 4 << 20) as image:
        trial = QemuTrial(image, 2, "none")
        try:
            destination = trial._procs[1]
            destination.kill()
            destination.wait()
            with pytest.raises(MigrationError, match=r"QEMU migration failed: \S"):
                trial.run()
        finally:
            trial.close()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_a_qemu_that_never_reaches_listen_qemu_fails_the_trial_at_once():
    """QEMU -> listen --qemu whose QEMU cannot connect (told a port nothing listens
    on) fails with QEMU's error once QEMU says it, its receiver stopped: before,
    the trial waited for that receiver's connect timeout, ten minutes."""
    with images.Image.create("random", 4 << 20) as image:
        trial = QemuToFastmfdTrial(image, 2, "none")
        try:
            workers = trial.pids()["destination"]
            assert workers, "the receiver's workers are up before the run"
            with socket.socket() as nothing_listens:
                nothing_listens.bind(("127.0.0.1", 0))
                port = nothing_listens.getsockname()[1]
            trial._receiver.address = f"tcp:127.0.0.1:{port}"
            since = time.monotonic()
            with pytest.raises(MigrationError, match=r"QEMU migration failed: \S"):
                trial.run()
            took = time.monotonic() - since
        finally:
            trial.close()
    assert took < 30, f"the trial failed {took:.1f} s after migrate"
    assert not [pid for pid in workers if alive(pid)]


def _allocated_beside(image: images.Image) -> int:
    """Bytes of memory (tmpfs blocks) held by the files in the image's directory
    but the image's own: what a trial made there."""
    held = 0
    for top, _, names in os.walk(image.directory):
        for name in names:
            path = os.path.join(top, name)
            if path != image.path and not os.path.islink(path):
                held += os.lstat(path).st_blocks * 512
    return held


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed")
def test_prealloc_preallocates_listen_qemus_destination_too():
    """bench --prealloc: QEMU -> listen --qemu receives into memory faulted in
    before timing, as the QEMU -> QEMU it is compared with does (prealloc=on);
    its receiver wrote fresh files inside the timed part before."""
    from fastmfd.tools.bench.matrix import Setting, make_trial
    size = 16 << 20
    with images.Image.create("random", size) as image:
        trial = make_trial(Setting("qemu-to-fastmfd", 2, "none"), image, prealloc=True)
        try:
            before_timing = _allocated_beside(image)
            measurement = trial.run()
        except BaseException:
            trial.close()
            raise
        trial.finish()          # the received RAM is the image
        assert _allocated_beside(image) == 0
    assert before_timing >= size, f"{before_timing} bytes held before the timed part"
    assert measurement.details["destination_preallocated"] is True


def _user_cpu_ns(skip: set[int]) -> dict[int, int]:
    """CPU nanoseconds of every user-space process but ``skip``'s: the truth a
    run's "other load" is checked against."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[6]) & 0x00200000:
                    continue                    # a kernel thread
            found[int(name)] = time.clock_gettime_ns(((~int(name)) << 3) | 2)
        except (OSError, ValueError):
            continue
    return found


def _metered_runs(count: int, extra_pid: int | None = None,
                  cpu: list[dict[str, float]] | None = None) -> list[tuple[float, float, float]]:
    """``count`` small fastmfd runs metered as the bench meters them: for each, the
    load it says, the other user processes' real load (cores, ns-precise), and
    ``extra_pid``'s (cores); each run's CPU seconds by side appended to ``cpu``."""
    from fastmfd.tools.bench.matrix import Setting, make_trial
    from fastmfd.tools.bench.trial import CpuMeter
    runs = []
    with images.Image.create("random", 16 << 20) as image:
        for _ in range(count):
            trial = make_trial(Setting("fastmfd", 2, "none"), image)
            try:
                pids = trial.pids()
                mine = {pid for side in pids.values() for pid in side} | {os.getpid()}
                before, started = _user_cpu_ns(mine), time.monotonic()
                meter = CpuMeter(pids, trial.pids_complete)
                trial.run()
                details = meter.stop()
                said = details["foreign_cores"]
                if cpu is not None:
                    cpu.append(details["cpu_s"])
                after, wall = _user_cpu_ns(mine), time.monotonic() - started
            except BaseException:
                trial.close()
                raise
            trial.finish()
            others = sum(after[p] - before[p] for p in after if p in before) / 1e9 / wall
            extra = ((after[extra_pid] - before[extra_pid]) / 1e9 / wall
                     if extra_pid in after and extra_pid in before else 0.0)
            runs.append((said, others, extra))
            time.sleep(0.1)
    return runs


@pytest.mark.alone("judges an idle machine: another worker's test is load (it skips)")
def test_short_runs_on_an_idle_machine_are_not_flagged_as_beside_other_load():
    """A 16 MiB run (~30 ms) was flagged `*` on an idle machine: its processes'
    CPU counted in whole ticks, the machine's busy time with the trial's own
    softirq. Judged against the other processes' ns-precise CPU time, as the
    machine is shared: runs beside real load (> 0.1 core) are not counted."""
    from fastmfd.tools.bench.trial import FOREIGN_LOAD_FLAG
    cpu: list[dict[str, float]] = []
    runs = _metered_runs(8, cpu=cpu)
    # Each side moved 16 MiB: never 0 CPU seconds (whole ticks, truncated, often said so).
    assert all(seconds > 0 for sides in cpu for seconds in sides.values()), cpu
    idle = [said for said, others, _ in runs if others < 0.05]
    if len(idle) < 3:
        pytest.skip(f"the machine is busy: other processes used {[r[1] for r in runs]} cores")
    # One may be flagged rightly: processes that came and went within a run (a shell's
    # commands beside it), which the machine's busy time counts and the sums of the
    # processes alive before and after, here, miss (CI: 0.49 cores said, 0.03 seen
    # here). Before the fix, 6 to 8 runs in 8 were flagged.
    assert len([said for said in idle if said > FOREIGN_LOAD_FLAG]) <= 1, runs


@pytest.mark.alone("its burner must get half a core: beside other workers' tests on 2 cores "
                   "it got 0.16-0.39 of one in 9 tries (-n 3)")
def test_a_run_beside_a_busy_process_is_still_flagged():
    """A process burning a core during small runs makes them suspect (`*`)."""
    from fastmfd.tools.bench.trial import FOREIGN_LOAD_FLAG
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    runs: list[tuple[float, float, float]] = []
    try:
        time.sleep(0.2)             # up and spinning
        # Beside other busy runs on these 2 cores the burner may get little of one:
        # more runs until it has burned (9 at most), as the premise needs.
        while len(runs) < 9 and not any(extra > 2 * FOREIGN_LOAD_FLAG for *_, extra in runs):
            runs += _metered_runs(3, burner.pid)
    finally:
        burner.kill()
        burner.wait()
    busy = [(said, extra) for said, _, extra in runs if extra > 2 * FOREIGN_LOAD_FLAG]
    assert busy, f"the burner never got half a core: {runs}"
    assert all(said > FOREIGN_LOAD_FLAG for said, _ in busy), runs


KILLED_WITH_ITS_QEMUS = """
import os, signal
from fastmfd.tools.images import Image
from fastmfd.tools.bench.peers import QemuTrial
from fastmfd.tools.bench.trial import WARM_MARGIN, warm_free_memory
image = Image.create("random", 4 << 20)
trial = QemuTrial(image, 2, "none")
print(os.path.dirname(image.path), *[process.pid for process in trial._procs], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("setpriv") is None,
                    reason="needs qemu-system-x86_64, and setpriv to tie QEMU to the bench")
def test_a_bench_killed_takes_its_qemus_with_it():
    """A bench that dies without cleaning up (SIGKILL, a crash) leaves no paused
    QEMU holding its guest's RAM (found when a crashed bench left nine)."""
    done = subprocess.run([sys.executable, "-c", KILLED_WITH_ITS_QEMUS],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    scratch, *pids = done.stdout.split()
    try:
        assert len(pids) == 2
        deadline = time.monotonic() + 10
        while any(alive(int(pid)) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if alive(int(pid))]
    finally:
        shutil.rmtree(scratch)


def run_bench(*args: str, **options) -> subprocess.CompletedProcess:
    """``python -m fastmfd bench ARGS``, as a user runs it (listen_support.run_cli)."""
    return run_cli("bench", *args, **options)


def test_command_line_entry_point():
    done = run_bench("--size", "256K", "--channels", "2", "--compression", "zlib",
                     "--image", "random")
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
    (["--repeat", "0"], "argument --repeat: '0' is not a whole number >= 1"),
    (["--peer", "scp"], "argument --peer: invalid choice: 'scp'"),
])
def test_bad_arguments_exit_2_naming_the_problem(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmfd bench: ") and message in err
    assert err.endswith("(see fastmfd bench --help)\n") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--compression", "zstd", "--level", "42"], "--level 42: must be in 1..20 for zstd"),
    (["--peer", "qemu", "--qemu-binary", "/nonexistent/qemu"], "/nonexistent/qemu not found"),
])
def test_settings_that_cannot_run_exit_2_before_any_work(args, message, capsys):
    assert main(["bench", "--size", "256K", *args]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith(f"fastmfd bench: {message}")
    assert "making" not in printed.err



def test_bench_takes_the_levels_send_takes():
    """One range per method: bench --level was "a whole number >= 1", so zlib's level 0,
    which send takes, was refused; zstd's -5 is refused naming zstd's range."""
    from fastmfd.tools.bench.command import settings_from_args
    from fastmfd.tools.cli import _build_parser
    parse = _build_parser().parse_command_line
    settings = settings_from_args(parse(["bench", "--compression", "zlib", "--level", "0"]))
    assert [s.level for s in settings] == [0, 0, 0]
    with pytest.raises(ConfigError, match="in 1..20 for zstd, not -5"):
        settings_from_args(parse(["bench", "--compression", "zstd", "--level", "-5"]))


NEEDS_QEMU = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")


def _no_image(*args, **kwargs):
    raise AssertionError("an image was made")


# It failed only once it made the image, after filling /dev/shm.
@pytest.mark.parametrize("args, free, memory, message", [
    (["--size", "100T"], None, None,
     "--size 100 TiB: 1 image and a destination's copy need 200 TiB; /dev/shm has "),
    (["--size", "1M", "--image", "random,text"], 2 << 20, None,
     "--size 1.00 MiB: 2 images and a destination's copy need 3.00 MiB; /dev/shm has 2.00 MiB "
     "free and the machine "),
    pytest.param(["--size", "1M", "--peer", "qemu"], 64 << 20, 2 << 20,
                 "--size 1.00 MiB: 1 image, QEMU's saved copy of each and a destination's copy "
                 "need 3.00 MiB; /dev/shm has 64.0 MiB free and the machine 2.00 MiB of memory "
                 "available", marks=NEEDS_QEMU),
], ids=["100T", "no-room-in-shm", "no-memory-with-qemu"])
def test_images_that_do_not_fit_exit_2_before_any_work(monkeypatch, capsys, args, free,
                                                       memory, message):
    if images.scratch_parent() != "/dev/shm":
        pytest.skip("no /dev/shm")
    monkeypatch.setattr(images.Image, "create", _no_image)
    if free is not None:
        monkeypatch.setattr(images, "free_bytes", lambda path: free, raising=False)
    if memory is not None:
        monkeypatch.setattr(images, "proc_kib", lambda path, field: memory)
    assert main(["bench", "--channels", "1", "--compression", "none", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastmfd bench: {message}") and err.count("\n") == 1, err
    assert "making" not in err


# A file that is there but cannot run was "not found"; one that runs but is no QEMU
# (or fails at once) was found only after fastmfd's timed runs, as a failed trial.
@pytest.mark.parametrize("script, mode, message", [
    ("#!/bin/sh\nexit 0\n", 0o644, "{path} is not executable"),
    (None, 0o755, "{path} is a directory"),
    ("#!/bin/sh\necho 'qemu: could not load PC BIOS'\necho ' bios.bin' >&2\nexit 1\n", 0o755,
     "{path} is not a QEMU that runs: `{path} -version` exited with status 1, printing "
     "'qemu: could not load PC BIOS bios.bin'"),
    ("#!/bin/sh\nexit 1\n", 0o755, "exited with status 1, printing nothing"),
    ("#!/bin/sh\necho 'Python 3.11'\n", 0o755, "exited with status 0, printing 'Python 3.11'"),
    ("#!/bin/sh\nexec sleep 30\n", 0o755, "`{path} -version` did not end within 0.5 s"),
    ("not a script\n", 0o755, "{path} does not run: Exec format error"),
], ids=["not-executable", "directory", "fails-at-once", "fails-silently", "not-qemu",
        "hangs", "not-a-program"])
def test_a_qemu_binary_that_cannot_run_exits_2_before_any_work(tmp_path, monkeypatch, capsys,
                                                               script, mode, message):
    monkeypatch.setattr("fastmfd.tools.bench.peers.VERSION_TIMEOUT", 0.5, raising=False)
    path = tmp_path / "qemu"
    if script is None:
        path.mkdir()
    else:
        path.write_text(script)
    path.chmod(mode)
    code = main(["bench", "--size", "1M", "--channels", "1", "--compression", "none",
                 "--peer", "qemu", "--qemu-binary", str(path)])
    printed = capsys.readouterr()
    assert code == 2, printed.err
    assert printed.err.startswith("fastmfd bench: ") and printed.err.count("\n") == 1
    assert message.format(path=path) in printed.err
    assert "making" not in printed.err


@NEEDS_QEMU
def test_a_size_qemu_cannot_take_exits_2_before_any_work(monkeypatch, capsys):
    # --size 256K with --peer qemu failed once fastmfd's timed runs were done.
    monkeypatch.setattr(images.Image, "create", _no_image)
    assert main(["bench", "--size", "256K", "--channels", "1", "--compression", "none",
                 "--peer", "qemu"]) == 2
    err = capsys.readouterr().err
    assert err == "fastmfd bench: QEMU guest RAM is whole MiB; the image is 262144 bytes\n"


def test_the_sendall_senders_connect_ends_at_its_deadline_naming_the_address(monkeypatch,
                                                                              tmp_path):
    """The sendall pair's own connection (not fastmfd's) had no deadline
    (socket.create_connection without a timeout): a destination that drops SYNs (here
    a listener whose accept queue is full) held the sender for the kernel's SYN
    retries, ~127 s, and the bench said only "no _Connected report within 60 s". It
    connects as fastmfd does, within CONNECT_TIMEOUT, and says where and why."""
    import threading
    from fastmfd.tools.bench import peers
    monkeypatch.setattr(peers, "CONNECT_TIMEOUT", 1.0, raising=False)
    image = tmp_path / "image"
    image.write_bytes(b"x" * 4096)

    class Pipe:                     # the parent's end: told Connected, never Go
        def send(self, report): sent.append(report)
        def recv(self): return None
    sent: list[object] = []
    outcome: list[BaseException] = []
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        port = hole.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):     # the queue is full
            def send() -> None:
                try:
                    peers._sendall_sender(Pipe(), peers._SenderParams(
                        str(image), 4096, "127.0.0.1", port), [])
                except BaseException as exc:
                    outcome.append(exc)
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sender.join(15)
    # (unfixed, closing the listener ends the connect: refused at its next SYN)
    assert not sender.is_alive() and sent == [], "still connecting after 15 s"
    assert str(outcome[0]) == f"cannot connect to tcp:127.0.0.1:{port}: timed out"
