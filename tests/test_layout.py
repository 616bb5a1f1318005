"""The package's layers (README "Layout"): imports only go down, never in a circle,
and no module grows past what a reader can hold.

    errors < shm < _core < protocol/ < config, regions, devices, stats
           < _engine/ < source, destination < fastmfd < tools/ < __main__

Imports inside functions count too: hiding one there does not make a circle go away.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastmfd

PACKAGE = Path(fastmfd.__file__).parent
LAYERS = [
    ["fastmfd.errors", "fastmfd.units", "fastmfd.arguments", "fastmfd.reprs"],
    ["fastmfd.shm", "fastmfd.shm_owners", "fastmfd.huge_pages", "fastmfd.safe_path",
     "fastmfd.threads", "fastmfd.ownership"],
    ["fastmfd._core"],
    ["fastmfd.protocol"],
    ["fastmfd.config", "fastmfd.regions", "fastmfd.region_pool", "fastmfd.devices",
     "fastmfd.stats"],
    ["fastmfd._engine"],
    ["fastmfd.source", "fastmfd.destination"],
    ["fastmfd"],
    ["fastmfd.tools", "fastmfd.qemu"],     # fastmfd.qemu: QEMU's migrations to and from files
    ["fastmfd.__main__"],
]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


COMPILED = {"fastmfd._core"}         # the Cython core: imported, imports nothing of ours


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The fastmfd modules ``name`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # "from . import x" imports a module when x is one, else a name of the package.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES.keys() | COMPILED
                       else prefix for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "fastmfd" or t.startswith("fastmfd."))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS and the README"
    return best[0]


def test_every_import_goes_down_or_sideways():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in GRAPH.items() for target in targets
              if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target == module or target not in GRAPH:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_relative_and_compiled_imports():
    """What the two tests above read: without these edges they could not fail."""
    assert _layer("fastmfd.tools.cli") > _layer("fastmfd.protocol.setup")
    assert "fastmfd.protocol.setup" in GRAPH["fastmfd.config"]
    assert "fastmfd._core" in GRAPH["fastmfd.protocol.handshake"]   # "from .. import _core"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_600_lines(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by concept"


def test_the_readme_layout_names_every_module():
    # Three modules were missing from the table a newcomer reads to find a part.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    missing = []
    for name, path in MODULES.items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        # The tools' own packages (bench/, inspect/) are named as a whole.
        whole = path.parent.parent.name == "tools" and f"`{path.parent.name}/`" in table
        if f"`{path.name}`" not in table and not whole:
            missing.append(name)
    assert not missing, f"the README's Layout table does not name {missing}"
