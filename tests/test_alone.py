"""tests/alone.py: in pytest-xdist's workers, a test marked ``alone`` runs with no
other test beside it, and the others still run beside each other."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Each test writes when it began and ended; two of them marked alone.
_TESTS = textwrap.dedent("""
    import os, time
    import pytest

    def _spell(name, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        with open(os.environ["SPELLS"], "a") as spells:
            spells.write(f"{name} {start} {time.monotonic()}\\n")

    @pytest.mark.parametrize("n", range(8))
    def test_beside(n):
        _spell(f"beside{n}", 0.3)

    @pytest.mark.alone("the test of tests/alone.py")
    @pytest.mark.parametrize("n", range(2))
    def test_alone(n):
        _spell(f"alone{n}", 0.3)
""")


def test_a_test_marked_alone_runs_beside_no_other(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["alone"]\n')
    (tmp_path / "test_turns.py").write_text(_TESTS)
    spells = tmp_path / "spells"
    env = {**os.environ, "SPELLS": str(spells),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-n", "2", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = [(name, float(start), float(end)) for name, start, end
           in (line.split() for line in Path(spells).read_text().splitlines())]
    assert len(ran) == 10, ran

    def overlap(a, b):
        return a[1] < b[2] and b[1] < a[2]
    for one in (r for r in ran if r[0].startswith("alone")):
        assert not [r for r in ran if r is not one and overlap(one, r)], ran
    # The others did run two at a time: the turns hold only the alone ones apart.
    beside = [r for r in ran if r[0].startswith("beside")]
    assert any(overlap(a, b) for a in beside for b in beside if a is not b), ran
