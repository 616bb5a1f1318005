"""How the messages of a worker's control pipe are pickled (parameters once, a
report per session or round: never per packet).

A child runs only fastmfd's code and never imports the caller's ``__main__`` by
itself (:mod:`.processes`). What ``__main__`` defines (a loader class in a
script, one piped to ``python -``, a REPL or a notebook) therefore goes by
value, with cloudpickle: the child needs no ``__main__`` to unpickle it, and a
loader's result of such a class comes back as that class. multiprocessing's
reducers still apply, so a pipe end or socket a loader holds reaches the child
as a descriptor of its own, as ``Connection.send`` would send it.

By value, a class takes the globals its methods use along: one of them may not
pickle (a module-level lock). Where ``__main__`` is a guarded script or module
the child can import, such a message goes by reference instead, as
multiprocessing sends it, and the child imports the caller's ``__main__`` (as
``__mp_main__``) the first time a message names it, as multiprocessing's
children do at start. Elsewhere the pickling error is raised, saying what to do.
"""

from __future__ import annotations

import ast
import io
import multiprocessing
import os
import pickle
import sys
from collections import ChainMap
from multiprocessing import reduction, spawn
from typing import Any

# cloudpickle ships no type information (no py.typed, no stubs).
import cloudpickle  # type: ignore[import-untyped]

__all__ = ["dumps", "loads", "MAIN_KEYS"]

MAIN_KEYS = ("init_main_from_name", "init_main_from_path")
"""Where multiprocessing's preparation data says the caller's ``__main__`` is:
kept on the child's process object (``callers_main``), not imported at start."""


class _ByValuePickler(cloudpickle.Pickler):  # type: ignore[misc]
    # multiprocessing's reducers (Connection, socket, ...) before cloudpickle's own
    # (_extra_reducers is CPython's, private, so not in typeshed).
    _mp_reducers = reduction.ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    dispatch_table = ChainMap(_mp_reducers, cloudpickle.Pickler.dispatch_table)


def dumps(message: Any) -> bytes:
    """``message`` pickled for the other end of a control pipe."""
    out = io.BytesIO()
    try:
        _ByValuePickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    except (TypeError, pickle.PicklingError) as exc:
        script = _main_script()
        if script is None or not _is_guarded(script):
            raise TypeError(f"{exc} (a loader goes to fastmfd's workers pickled, and what "
                            f"__main__ defines by value, with the globals its methods use: "
                            f"{_what_to_do(script)}, and keep what it holds picklable)"
                            ) from exc
        return bytes(reduction.ForkingPickler.dumps(message, pickle.HIGHEST_PROTOCOL))
    return out.getvalue()


def _what_to_do(script: str | None) -> str:
    """How a class of ``__main__`` that does not pickle by value could reach a worker."""
    if script is None:
        return "define its class in a module"
    return (f"guard the entry of your script {script} with if __name__ == '__main__': "
            f"(a worker then imports it and takes the class from there), or define the "
            f"class in a module")


def loads(data: bytes | bytearray | memoryview) -> Any:
    """A message :func:`dumps` pickled."""
    return _MainOnDemandUnpickler(io.BytesIO(data)).load()


def _main_script() -> str | None:
    """The file of ``__main__`` if a child could import it: a script file or a module
    (``python -m``), not ``<stdin>``, a REPL or a notebook, nor a package's
    ``__main__`` (multiprocessing never imports one in a child). Only a guarded one
    may be imported (:func:`_is_guarded`): an unguarded one would run the caller's
    program again."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.rpartition(".")[2] == "__main__":
        return None
    path = spec.origin if spec is not None else getattr(main, "__file__", None)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _is_guarded(path: str) -> bool:
    """The script's top level has an ``if __name__ == "__main__":`` block."""
    try:
        with open(path, "rb") as source:
            tree = ast.parse(source.read(), path)
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
               and any(isinstance(c, ast.Constant) and c.value == "__main__"
                       for c in node.test.comparators)
               for node in tree.body)


class _MainOnDemandUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__":
            _import_callers_main()
        return super().find_class(module, name)


def _import_callers_main() -> None:
    """Import the caller's main module as multiprocessing would have at start
    (as ``__mp_main__``), the first time a message refers to it."""
    callers_main = getattr(multiprocessing.current_process(), "callers_main", {})
    if callers_main and getattr(sys.modules.get("__main__"), "__name__", "") != "__mp_main__":
        spawn.prepare(callers_main)
