"""The typed API (issue #11): ``mypy --strict`` on a user's script catches the
mistakes people make with fastmfd — a wrong type, a compression method that
does not exist, something that is not a Device or Loader, a misspelled
attribute — and passes the README's example clean.

mypy reads fastmfd's sources (``py.typed``, ``_core.pyi``) from where it is
imported, which also works for an editable install; errors inside fastmfd
itself are not the user's and are not reported (``--follow-imports=silent``).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import fastmfd

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed")

README = Path(__file__).resolve().parents[1] / "README.md"

# Each mistake's line ends with "# MISTAKE: <what mypy must say>".
PLANTED = textwrap.dedent("""
    import fastmfd

    def main() -> None:
        cfg = fastmfd.MigrationConfig(channels="4")         # MISTAKE: incompatible type "str"
        fastmfd.MigrationConfig(compression="lz4")          # MISTAKE: "Literal['none', 'zlib', 'zstd', 'auto']"
        ram = fastmfd.Region.create("ram", "1G")            # MISTAKE: incompatible type "str"
        with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
            dst.add_loader("nic0", 0, object())             # MISTAKE: expected "Loader"
            with fastmfd.Source(dst.address, cfg) as src:
                src.add_device(42)                          # MISTAKE: expected "Device"
                src.add_region(ram)
                stats = src.migrate(live=False)
                print(stats.total_time)                     # MISTAKE: no attribute "total_time"
            result = dst.receive()
            print(result.regions["ram"].arrayy)             # MISTAKE: no attribute "arrayy"
""")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> Path:
    """One cache for the module: the second run does not analyse numpy again."""
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(tmp_path: Path, monkeypatch, source: str, cache: Path) -> list[str]:
    """mypy --strict's errors in ``source`` (a script of its own)."""
    script = tmp_path / "user_script.py"
    script.write_text(source)
    monkeypatch.setenv("MYPYPATH", str(Path(fastmfd.__file__).resolve().parents[1]))
    out, err, _ = mypy_api.run(["--strict", "--follow-imports=silent", "--no-error-summary",
                                "--cache-dir", str(cache), str(script)])
    assert not err, err
    return [line for line in out.splitlines() if ": error: " in line]


def test_mypy_strict_catches_every_planted_mistake(tmp_path, monkeypatch, mypy_cache):
    errors = _mypy(tmp_path, monkeypatch, PLANTED, mypy_cache)
    planted = {number: line.split("# MISTAKE: ")[1]
               for number, line in enumerate(PLANTED.splitlines(), 1) if "# MISTAKE" in line}
    reported = {}
    for error in errors:
        number = int(re.match(r".*?:(\d+): error", error).group(1))
        reported.setdefault(number, []).append(error)
    assert set(reported) == set(planted), "\n".join(errors)
    for number, says in planted.items():
        assert any(says in error for error in reported[number]), (says, reported[number])


def test_mypy_strict_passes_the_readme_example(tmp_path, monkeypatch, mypy_cache):
    example = re.search(r"```python\n(import threading\nimport fastmfd\n.*?)```",
                        README.read_text(), re.S).group(1)
    assert _mypy(tmp_path, monkeypatch, example, mypy_cache) == []
