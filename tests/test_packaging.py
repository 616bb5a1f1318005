"""The package people pick up (issue #11): a license in the metadata and the
files; an sdist whose tests can run (conftest.py and every support module go
with them); a build that says what to install when zlib's header is missing; a
source tree imported unbuilt that says what to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(),
                                reason="needs the source tree (setup.py), not an installed copy")


@pytest.fixture
def setup_py_runs() -> None:
    """setup.py needs what the build does (pip installs those only while it builds)."""
    pytest.importorskip("Cython", reason="running setup.py needs Cython")
    pytest.importorskip("setuptools", minversion="77",
                        reason="running setup.py needs setuptools >= 77 (SPDX license)")


def test_license_is_an_spdx_expression_with_its_file():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_sdist_ships_every_test_module_and_the_core_sources(tmp_path, setup_py_runs):
    # egg_info writes SOURCES.txt, the list an sdist is made of, without building.
    done = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    sources = set((tmp_path / "fastmfd.egg-info" / "SOURCES.txt").read_text().split())
    tests = {f"tests/{p.name}" for p in TESTS.glob("*.py")}
    assert {"tests/conftest.py", "tests/leakcheck.py", "tests/inspect_support.py"} <= tests
    assert tests <= sources, sorted(tests - sources)
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "fastmfd/_core.pyx",
            "fastmfd/_core.pxd", "fastmfd/includes/zstd_stable.h", "fastmfd/py.typed",
            "benchmarks/conftest.py"} <= sources
    assert not [s for s in sources if s.endswith((".so", ".c"))]


def test_build_without_zlib_header_says_what_to_install(setup_py_runs):
    # -nostdinc hides every system header from the compiler, zlib.h among them.
    env = dict(os.environ, CFLAGS="-nostdinc")
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "fastmfd needs zlib.h to build" in done.stderr
    assert "zlib1g-dev" in done.stderr and "Traceback" not in done.stderr


def test_an_unbuilt_source_tree_says_what_to_run(tmp_path):
    """``python -m pytest`` from a fresh checkout or an unpacked sdist imports the
    tree there, before any installed fastmfd: unbuilt, that was "cannot import name
    '_core' from partially initialized module 'fastmfd' (most likely due to a
    circular import)". Now one line says what to run."""
    tree = tmp_path / "fastmfd-0.1.0"
    shutil.copytree(ROOT / "fastmfd", tree / "fastmfd",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    shutil.copytree(TESTS, tree / "tests", ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    expected = (f"ImportError: fastmfd is imported from the source tree {tree}, whose compiled "
                "core (fastmfd._core) is not built: run `pip install -e .[test]` (or `python "
                f"setup.py build_ext --inplace`) in {tree}")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}

    imported = subprocess.run([sys.executable, "-c", "import fastmfd"], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 1
    assert imported.stderr.splitlines()[-1] == expected, imported.stderr

    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_layout.py"], cwd=tree, env=env, capture_output=True,
                            text=True, timeout=120)
    output = tested.stdout + tested.stderr
    assert tested.returncode != 0
    assert f"E   {expected}" in output.splitlines(), output
    assert "partially initialized" not in output
