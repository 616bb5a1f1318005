"""``help()`` and pydoc show what every public field and parameter means.

A dataclass field documented by a string after it (an attribute docstring) is
documented nowhere at run time: Python drops the string, and
``help(fastmfd.MigrationConfig)`` showed none of its 22 fields (a review). Each
field is said in its class's docstring instead, as ``name -- meaning``."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc
import re
from pathlib import Path

import pytest

import fastmfd
import fastmfd.errors
import fastmfd.qemu

PUBLIC = [getattr(module, name) for module in (fastmfd, fastmfd.qemu)
          for name in module.__all__]
DATACLASSES = [obj for obj in PUBLIC if inspect.isclass(obj) and dataclasses.is_dataclass(obj)]


def help_text(obj: object) -> str:
    """What ``help(obj)`` shows, its lines joined (less pydoc's " | " margin)."""
    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    return " ".join(word for word in text.split() if word != "|")


def test_the_dataclasses_are_found():
    names = {cls.__name__ for cls in DATACLASSES}
    assert {"MigrationConfig", "DestinationResult", "Setup", "MigrationStats", "ReceiveStats",
            "QemuReceived", "QemuStreamFacts"} <= names, names


@pytest.mark.parametrize("cls", DATACLASSES, ids=lambda cls: cls.__name__)
def test_help_says_what_every_field_of_a_public_dataclass_is(cls):
    flat = help_text(cls)
    # "name -- meaning", or a list of names that share one: "a, b, c -- meaning"
    said = {name for names in re.findall(r"((?:\w+, )*\w+) --", flat)
            for name in names.split(", ")}
    if cls is fastmfd.TLSConfig or cls is fastmfd.Refusal:    # in prose: ``cert``/``key``
        said = set(re.findall(r"``(\w+)``", inspect.getdoc(cls) or ""))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in said]
    assert not missing, f"help({cls.__name__}) says nothing of {missing}"


def test_help_of_migration_config_gives_each_field_its_meaning_and_unit():
    flat = help_text(fastmfd.MigrationConfig)
    for said in ("downtime_limit -- seconds", "max_bandwidth -- bytes per second",
                 "timeout -- seconds", "stall_timeout -- seconds", "page_size -- bytes",
                 "device_chunk_size -- bytes", "max_queued_bytes -- per device, the bytes",
                 "job_packets -- RAM packets handed to a send worker per job"):
        assert said in flat, said


@pytest.mark.parametrize("call, documented_in", [
    (fastmfd.qemu.send, fastmfd.qemu.send), (fastmfd.qemu.receive, fastmfd.qemu.receive),
    (fastmfd.qemu.QemuSender, fastmfd.qemu.send),
    (fastmfd.qemu.QemuReceiver, fastmfd.qemu.receive),
], ids=["send", "receive", "QemuSender", "QemuReceiver"])
def test_help_says_what_every_qemu_parameter_is(call, documented_in):
    """QemuSender's docstring said nothing of its parameters; send's left out
    ``level`` and ``stall_timeout``. A class points at the function whose
    parameters it takes, and that function names every one."""
    if call is not documented_in:
        assert f":func:`{documented_in.__name__}`'s" in inspect.getdoc(call)
    text = inspect.getdoc(documented_in) + (inspect.getdoc(call) or "")
    parameters = [name for name in inspect.signature(call).parameters if name != "self"]
    missing = [name for name in parameters if not re.search(rf"``{name}\b", text)]
    assert not missing, f"{call.__name__}: {missing}"


def test_every_error_the_readme_names_is_importable_from_fastmfd():
    # NoSourceError, named in the README (a wait no source passed), was only
    # fastmfd.errors.NoSourceError: a program catching it reached into a submodule.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    named = set(re.findall(r"`(?:fastmfd\.)?([A-Za-z]+Error)`", readme))
    errors = {name for name in named if isinstance(getattr(fastmfd.errors, name, None), type)}
    assert "NoSourceError" in errors
    assert errors <= set(fastmfd.__all__), errors - set(fastmfd.__all__)
