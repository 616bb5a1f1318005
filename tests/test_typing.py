"""The typed API (issue #11): ``mypy --strict`` passes the fastmfd package and
every Python example of the README clean, and on a user's script catches the
mistakes people make with fastmfd — a wrong type, a compression method that
does not exist, something that is not a Device or Loader, a misspelled
attribute. And ``help()`` says what each public name is.

mypy reads fastmfd's sources (``py.typed``, ``_core.pyi``) from where it is
imported, which also works for an editable install. In a user's script,
errors inside fastmfd are not the user's and are not reported
(``--follow-imports=silent``). One mypy cache, in a temporary directory, serves
the module: numpy and the standard library are analysed once, ~20 s of CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

import fastmfd
import fastmfd.qemu
from fastmfd.devices import PrecopyDevice
from readme_examples import readme_python_blocks

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed")

SOURCE_TREE = Path(__file__).resolve().parents[1]     # the checkout or unpacked sdist
PACKAGE_ROOT = Path(fastmfd.__file__).resolve().parents[1]     # where mypy finds fastmfd


def _installed() -> bool:
    """fastmfd is installed (mypy finds it by itself), not imported from a checkout
    only through PYTHONPATH (then mypy needs MYPYPATH; an installed one's
    site-packages in MYPYPATH is an error to mypy)."""
    try:
        importlib.metadata.distribution("fastmfd")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _mypy_path() -> dict[str, str]:
    return {} if _installed() else {"MYPYPATH": str(PACKAGE_ROOT)}


# Each mistake's line ends with "# MISTAKE: <what mypy must say>".
PLANTED = textwrap.dedent("""
    from dataclasses import dataclass
    from pathlib import Path

    import fastmfd
    import fastmfd.qemu

    def on_setup(setup: fastmfd.Setup) -> None:           # the names to annotate with
        print([region.name for region in setup.regions])

    def refusals(dst: fastmfd.Destination) -> list[fastmfd.Refusal]:
        return dst.refused

    METHODS: list[fastmfd.Compression] = ["zstd", "auto"]

    @dataclass(frozen=True)
    class FrozenDevice:                                     # a Device: its ids are only read
        idstr: str
        instance_id: int

        def read_state(self, buf: memoryview) -> int:
            return 0

    class PropertyDevice:                                   # and so are properties
        @property
        def idstr(self) -> str:
            return "nic1"

        @property
        def instance_id(self) -> int:
            return 0

        def read_state(self, buf: memoryview) -> int:
            return 0

    class SubclassedDevice(fastmfd.Device):                 # a subclass declares them
        idstr: str = "nic2"
        instance_id: int = 0

        def read_state(self, buf: memoryview) -> int:
            return 0

    def main() -> None:
        cfg = fastmfd.MigrationConfig(channels="4")         # MISTAKE: incompatible type "str"
        cfg.replace(chanels=4)                              # MISTAKE: argument "chanels"
        cfg.replace(channels="4")                           # MISTAKE: incompatible type "str"
        cfg = cfg.replace(channels=4, compression="zstd")
        fastmfd.MigrationConfig(compression="lz4")          # MISTAKE: "Literal['none', 'zlib', 'zstd', 'auto']"
        ram = fastmfd.Region.create("ram", "1G")            # MISTAKE: incompatible type "str"
        with fastmfd.Destination("tcp:127.0.0.1:0") as dst:
            dst.add_loader("nic0", 0, object())             # MISTAKE: expected "Loader"
            with fastmfd.Source(dst.address, cfg) as src:
                src.add_device(42)                          # MISTAKE: expected "Device"
                src.add_device(FrozenDevice("nic0", 0))
                src.add_device(PropertyDevice())
                src.add_device(SubclassedDevice())
                src.add_device(fastmfd.BytesDevice("nic3", 0, b"s", config=bytearray(b"c")))
                src.add_region(ram)
                stats = src.migrate(live=False)
                print(stats.total_time)                     # MISTAKE: no attribute "total_time"
            result = dst.receive(on_setup=on_setup)
            print(result.regions["ram"].arrayy)             # MISTAKE: no attribute "arrayy"

    def paths(saved: Path) -> None:                         # a Path where a path goes: fine
        tls = fastmfd.TLSConfig(cert=Path("c.pem"), key=Path("k.pem"), ca=Path("ca.pem"))
        fastmfd.qemu.receive("tcp:127.0.0.1:0", saved, tls=tls)
        print(fastmfd.read_key_file(Path("key")))
        fastmfd.qemu.send("tcp:127.0.0.1:1", saved, compression="lz4")  # MISTAKE: "Literal['none', 'zlib', 'zstd']"
""")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> Path:
    """One cache for the module: the second run does not analyse numpy again."""
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(tmp_path: Path, monkeypatch, source: str, cache: Path) -> list[str]:
    """mypy --strict's errors in ``source`` (a script of its own)."""
    script = tmp_path / "user_script.py"
    script.write_text(source)
    for name, value in _mypy_path().items():
        monkeypatch.setenv(name, value)
    out, err, _ = mypy_api.run(["--strict", "--follow-imports=silent", "--no-error-summary",
                                "--cache-dir", str(cache), str(script)])
    assert not err, err
    return [line for line in out.splitlines() if ": error: " in line]


def test_mypy_finds_the_installed_package_without_help(tmp_path, mypy_cache):
    """As a user runs it: no MYPYPATH, from elsewhere. An editable install that
    hid the checkout behind setuptools' import hook left mypy with "Cannot find
    implementation or library stub" and every use of fastmfd unchecked."""
    if not _installed():
        pytest.skip("fastmfd is imported from a checkout, not installed: mypy finds it "
                    "only through MYPYPATH")
    script = tmp_path / "user_script.py"
    script.write_text('import fastmfd\nram: int = fastmfd.Region.create("ram", 4096)\n')
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                           "--cache-dir", str(mypy_cache), str(script)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.stdout.splitlines() == [
        f'{script.name}:2: error: Incompatible types in assignment (expression has type "Region", '
        f'variable has type "int")  [assignment]'], done.stdout + done.stderr


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


def test_mypy_strict_passes_the_package_and_the_readme_examples(tmp_path, mypy_cache):
    """``python -m mypy --strict`` on fastmfd's source and on each README example (a
    module of its own), as a developer runs it: any error fails, with mypy's output."""
    examples = readme_python_blocks()
    assert len(examples) >= 2, "the README's examples were not found"
    paths = []
    for number, example in enumerate(examples, 1):
        path = tmp_path / f"readme_example_{number}.py"
        path.write_text(example)
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(mypy_cache),
         str(SOURCE_TREE / "fastmfd"), *paths],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, **_mypy_path()})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout, proc.stdout


def test_help_describes_every_public_method_and_statistic():
    """help() showed nothing for Region.npages, MigrationStats.as_dict, ... and the
    statistics' fields were described in source comments only. A method of a
    Device or Loader protocol may leave its description to the protocol's."""
    protocols = [fastmfd.Device, fastmfd.Loader, PrecopyDevice]
    missing = []
    for name in fastmfd.__all__:
        cls = getattr(fastmfd, name)
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        for attr, value in vars(cls).items():
            if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(
                    value, (property, classmethod, staticmethod))):
                continue
            described = [getattr(owner, attr) for owner in [cls, *protocols]
                         if attr in vars(owner)]
            if not any(inspect.getdoc(method) for method in described):
                missing.append(f"{name}.{attr}")
        if dataclasses.is_dataclass(cls) and name.endswith("Stats"):
            missing += [f"{name}.{field.name} (field)" for field in dataclasses.fields(cls)
                        if f"\n{field.name} -- " not in inspect.cleandoc(cls.__doc__ or "")]
    assert not missing, missing


def test_config_replace_takes_the_fields_of_the_config():
    """MigrationConfig.replace's keywords (ConfigChanges) are the config's fields, each of
    the field's type: the type checker holds replace() to what the constructor takes."""
    from fastmfd.config import ConfigChanges
    fields = {field.name: str(field.type) for field in dataclasses.fields(fastmfd.MigrationConfig)}
    changes = {name: kind.__forward_arg__
               for name, kind in ConfigChanges.__annotations__.items()}
    assert changes == fields
    assert not ConfigChanges.__required_keys__


def test_protocol_methods_take_their_arguments_by_position():
    """fastmfd calls a device's and a loader's methods with positional arguments
    (``getattr(device, hook)(*args)`` in _engine/saving.py and reassembly.py), so their
    names are the user's: the protocols said ``buf`` and ``data`` by keyword too, and
    pyright refused a device whose read_state named its buffer ``out`` ("Parameter name
    mismatch: "buf" versus "out"")."""
    named = []
    for protocol in (fastmfd.Device, PrecopyDevice, fastmfd.Loader):
        for name, member in vars(protocol).items():
            if inspect.isfunction(member) and not name.startswith("_"):
                parameters = list(inspect.signature(member).parameters.values())[1:]
                named += [f"{protocol.__name__}.{name}({parameter.name})"
                          for parameter in parameters
                          if parameter.kind is not inspect.Parameter.POSITIONAL_ONLY]
    assert not named, named


def _public_callables() -> dict[str, object]:
    """Every public function, class and method of fastmfd and fastmfd.qemu, by name."""
    found: dict[str, object] = {}
    for module in (fastmfd, fastmfd.qemu):
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isfunction(value):
                found[name] = value
            elif inspect.isclass(value):
                found[name] = value
                for attr, member in vars(value).items():
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    elif isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member) and (attr == "__init__"
                                                       or not attr.startswith("_")):
                        found[f"{name}.{attr}"] = member
    return found


def test_public_annotations_resolve_at_run_time():
    """typing.get_type_hints() (what typeguard, pydantic and inspect.signature(eval_str=True)
    read) on every public function, class and method: BytesDevice's ``Buffer`` was
    imported for type checkers only, a NameError at run time."""
    unresolved = []
    for name, value in _public_callables().items():
        try:
            typing.get_type_hints(value)
            if not inspect.isclass(value):
                inspect.signature(value, eval_str=True)
        except NameError as exc:
            unresolved.append(f"{name}: {exc}")
    assert not unresolved, unresolved


ALLOWLIST = Path(__file__).with_name("stubtest_allowlist.txt")


def _stubtest(module: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m mypy.stubtest`` on ``module`` as imported here, with the allowlist of
    what it cannot see in Cython (each entry says why), and the project's mypy settings."""
    return subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", module, "--allowlist", str(ALLOWLIST),
         "--mypy-config-file", str(SOURCE_TREE / "pyproject.toml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, **_mypy_path(), "PYTHONPATH": os.pathsep.join(
            [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})


def test_stubtest_finds_the_core_stub_true_to_the_compiled_module(tmp_path):
    """mypy's stubtest imports fastmfd._core and compares it with _core.pyi: a name
    missing on either side, a parameter of another name or kind, a default, a
    constant's or property's type. _RegionTable's __init__ lacked 4 parameters,
    and the cdef classes were not marked @disjoint_base (a class cannot derive from
    two of them: their C layouts clash). Nothing left unused in the allowlist either."""
    done = _stubtest("fastmfd._core", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 1 module" in done.stdout, done.stdout
