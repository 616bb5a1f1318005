"""The README's Python examples, for the tests that hold them to the truth:
test_typing (each passes ``mypy --strict``) and test_scripts (each runs)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"    # the checkout or unpacked sdist


def readme_python_blocks() -> list[str]:
    """The README's fenced ``python`` blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
