"""The package people pick up (issue #11): a license in the metadata and the
files; an sdist whose tests can run (conftest.py and every support module go
with them); a build that says what to install when zlib's header is missing."""

from __future__ import annotations

import os
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
