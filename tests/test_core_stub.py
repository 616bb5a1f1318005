"""``fastmfd/_core.pyi`` describes the Cython core exactly: every public name the
compiled module defines is in the stub and every name of the stub is in the module,
and each function and method the stub types takes the parameters the core does
(names, and which are keyword-only), so a keyword argument mypy accepts works.

The core's ``__init__`` methods (``__cinit__`` underneath) show no signature at run
time; everything else does (Cython's ``binding=True``)."""

from __future__ import annotations

import ast
import re
import inspect
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from fastmfd import _core

STUB = ast.parse((Path(_core.__file__).parent / "_core.pyi").read_text())


def _stub_names() -> set[str]:
    names = set()
    for node in STUB.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def _defined_by_the_core(name: str) -> bool:
    """Not a module or a class/function the core imported from fastmfd or numpy."""
    value = getattr(_core, name)
    return (not isinstance(value, types.ModuleType)
            and getattr(value, "__module__", _core.__name__) == _core.__name__)


def test_the_stub_names_exactly_the_public_names_of_the_core():
    module = {name for name in dir(_core) if not name.startswith("_")
              and _defined_by_the_core(name)}
    stub = _stub_names()
    assert not module - stub, f"in _core, missing from _core.pyi: {sorted(module - stub)}"
    assert not stub - module, f"in _core.pyi, not in _core: {sorted(stub - module)}"


def _typed_callables():
    """(where, the stub's def, the core's callable) for every def of the stub whose
    runtime signature is known; classmethods and staticmethods as bound to the class."""
    for node in STUB.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node, getattr(_core, node.name), False
        elif isinstance(node, ast.ClassDef):
            cls = getattr(_core, node.name)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                decorators = {ast.unparse(d) for d in item.decorator_list}
                if "property" in decorators or item.name == "__init__":
                    continue            # attributes; __init__ shows no signature
                bound = bool(decorators & {"classmethod"})
                yield f"{node.name}.{item.name}", item, getattr(cls, item.name), bound


def _stub_parameters(node: ast.FunctionDef, bound: bool) -> tuple[list[str], list[str]]:
    positional = [a.arg for a in node.args.posonlyargs + node.args.args]
    return positional[1:] if bound else positional, [a.arg for a in node.args.kwonlyargs]


def _core_parameters(obj: Callable[..., object]) -> tuple[list[str], list[str]]:
    parameters = inspect.signature(obj).parameters.values()
    return ([p.name for p in parameters
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)],
            [p.name for p in parameters if p.kind is p.KEYWORD_ONLY])


@pytest.mark.parametrize("where, node, obj, bound",
                         [pytest.param(*case, id=case[0]) for case in _typed_callables()])
def test_the_stub_takes_the_parameters_the_core_takes(where, node, obj, bound):
    assert _stub_parameters(node, bound) == _core_parameters(obj), where


def test_the_signature_check_reads_real_signatures():
    """What the test above compares: without these it could pass on nothing."""
    checked = {where for where, *_ in _typed_callables()}
    assert {"decode_init_packet", "Counters.read", "BufferPool.create",
            "TLSChannel.connect"} <= checked
    assert _core_parameters(_core.Counters.read) == (["self", "r"], [])
    assert _core_parameters(_core.TLSChannel.connect)[1] == ["cert", "key", "ca", "hostname",
                                                             "ciphers", "timeout"]


# ---------------------------------------------------------------- __cinit__
# A cdef class's arguments go to its __cinit__, whose signature Cython does not
# show at run time (stubtest allowlists those __init__s): read it in the source.
CORE_SOURCES = sorted((Path(__file__).resolve().parents[1] / "fastmfd").glob("_*.p[yx][xi]"))
CINIT = re.compile(r"^cdef class (\w+)\b.*?^    def __cinit__\(self,?(.*?)\):", re.M | re.S)


def _cinit_parameters() -> dict[str, list[str]]:
    """Each cdef class's __cinit__ parameter names (a Cython parameter is
    ``[type] name[=default]``; the library's defaults hold no comma)."""
    found = {}
    for source in CORE_SOURCES:
        for chunk in re.split(r"(?=^cdef class )", source.read_text(), flags=re.M):
            match = CINIT.match(chunk)
            if match:
                found[match[1]] = [p.split("=")[0].split()[-1]
                                   for p in match[2].split(",") if p.strip()]
    return found


def _stub_inits() -> dict[str, list[str]]:
    return {node.name: [a.arg for a in item.args.args[1:] + item.args.kwonlyargs]
            for node in STUB.body if isinstance(node, ast.ClassDef)
            for item in node.body
            if isinstance(item, ast.FunctionDef) and item.name == "__init__"}


def test_each_stub_init_takes_the_parameters_of_the_cores_cinit():
    """_RegionTable's stub had 3 of its __cinit__'s 7 parameters (sparse,
    page_size, place_fds and hole_fds were missing)."""
    cinit = _cinit_parameters()
    assert {"RamPacketCodec", "RecvEngine", "_RegionTable", "TLSChannel"} <= set(cinit), \
        f"__cinit__ not found in {[str(p) for p in CORE_SOURCES]}"
    stub = _stub_inits()
    for name, parameters in cinit.items():      # a class with no stub __init__ takes none
        assert stub.get(name, []) == parameters, name
    # An __init__ of a class without __cinit__ is a Python one: stubtest checks it.
