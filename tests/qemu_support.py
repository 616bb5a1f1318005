"""A real QEMU guest for the tests that migrate with QEMU (skipped without one).

The guest is paused (-S) TCG ``pc`` with no devices, its RAM a
``memory-backend-file`` holding a known pattern: page i is the 8-byte
little-endian integer i + seed repeated, except every page with i % 4 == 0,
which is zero (so a 7.2 main channel carries ZERO records and the multifd
channels data, as spec §4.4 says; QEMU 10 lists the zero pages in its packets).

Two QEMUs: ``qemu-system-x86_64`` on the path ($FASTMFD_QEMU), Debian's 7.2 in
CI, and a QEMU 10 given by $FASTMFD_QEMU10 (its ``pc`` is then
``pc-i440fx-10.0``: QEMU 10's own stream). ``QEMUS`` parametrizes a test over
both, each skipped, saying why, where it is absent.

Around them, what the QEMU tests share: ``Receiver`` (``qemu.receive`` in a
thread), ``Background`` (any call in a thread, with a deadline for its
return), ``listening_command`` (``fastmfd listen --qemu`` as a subprocess),
``saved_guest`` (a real guest's migration saved by ``qemu.receive``; ``save_ram``
the same of any RAM), ``incoming_guest`` (a QEMU waiting with ``-incoming
defer``), ``assert_loaded`` (it completed, with the RAM expected) and
``wait_until_filled`` (until pages have landed in files).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest

from fastmfd import qemu
from fastmfd.tools.bench.peers import QMP, dying_with_this_thread

QEMU = os.environ.get("FASTMFD_QEMU") or "qemu-system-x86_64"
QEMU10 = os.environ.get("FASTMFD_QEMU10") or ""
PAGE = 4096

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None,
                                reason=f"{QEMU} is not installed (Debian: apt-get install "
                                       "qemu-system-x86)")
needs_qemu10 = pytest.mark.skipif(
    not QEMU10 or shutil.which(QEMU10) is None,
    reason="no QEMU 10: set FASTMFD_QEMU10 to its qemu-system-x86_64 (shared/tools/"
           "build-qemu10.sh builds one)" if not QEMU10 else f"{QEMU10} is not executable")
# The QEMU binaries a real-QEMU test runs with: ``@pytest.mark.parametrize("qemu_binary", QEMUS)``.
QEMUS = [pytest.param(QEMU, id="qemu", marks=needs_qemu),
         pytest.param(QEMU10, id="qemu10", marks=needs_qemu10)]


def pattern(mib: int, seed: int = 0) -> np.ndarray:
    pages = (mib << 20) // PAGE
    words = np.repeat(np.arange(pages, dtype="<u8") + seed, PAGE // 8).reshape(pages, -1)
    words[::4] = 0
    return words.view(np.uint8).reshape(-1)


class Guest:
    """One QEMU process and its QMP socket; ``close()`` kills it whatever happened."""

    def __init__(self, tmp_path, ram_path: str, mib: int, *, incoming: bool = False,
                 name: str = "src", binary: str = QEMU, machine: str = "pc",
                 options: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.qmp_path = str(tmp_path / f"qmp-{name}.sock")
        self.log_path = str(tmp_path / f"qemu-{name}.log")
        command = [
            binary, "-machine", f"{machine},accel=tcg,memory-backend=mem", "-nodefaults",
            "-display", "none", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=mem,size={mib}M,mem-path={ram_path},share=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-S"]
        if incoming:
            command += ["-incoming", "defer"]
        command += options
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(dying_with_this_thread(command),
                                            stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log)
        self.process.log_path = self.log_path
        try:
            self.qmp = QMP(self.qmp_path, self.process)
        except BaseException:
            self.close()
            raise

    def set_multifd(self, channels: int, compression: str,
                    max_bandwidth: int = 100 << 30) -> None:
        """The multifd capability and parameters; ``max_bandwidth``: bytes/s a
        source sends (QEMU's default, 128 MiB/s, is lifted)."""
        self.qmp.command("migrate-set-capabilities", capabilities=[
            {"capability": "multifd", "state": True}, {"capability": "events", "state": True}])
        self.qmp.command("migrate-set-parameters", **{
            "multifd-channels": channels, "multifd-compression": compression,
            "max-bandwidth": max_bandwidth})

    def migrate(self, uri: str) -> None:
        self.qmp.command("migrate", uri=uri)

    def wait(self, timeout: float = 60.0) -> str:
        return self.qmp.wait_migration(timeout)

    def close(self) -> None:
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            qmp.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# ---------------------------------------------------------------- around a QEMU

class Background:
    """``call()`` in a thread; :meth:`result` returns what it returned, or raises
    what it raised, and fails the test if it has not returned by then (a hang).
    ``then()`` runs in the thread once ``call`` is done, whatever happened."""

    def __init__(self, what: str, call: Callable[[], Any],
                 then: Callable[[], object] | None = None) -> None:
        self.what = what
        self.outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                self.outcome["result"] = call()
            except BaseException as exc:        # handed to the test thread
                self.outcome["error"] = exc
            if then is not None:
                then()

        self.thread = threading.Thread(target=run, name=what)
        self.thread.start()

    def result(self, timeout: float = 60.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.what} did not return within {timeout:g} s"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]


class Receiver:
    """``qemu.receive`` in a thread: ``address`` once it listens, then ``result()``."""

    def __init__(self, directory, **kwargs) -> None:
        self.listening = threading.Event()
        kwargs.setdefault("stall_timeout", 10.0)
        kwargs.setdefault("timeout", 30.0)
        self.call = Background("receive()", lambda: qemu.receive(
            "tcp:127.0.0.1:0", str(directory), on_listening=self._listening, **kwargs),
            then=self.listening.set)
        assert self.listening.wait(30), "receive() never listened"
        if "error" in self.call.outcome:
            raise self.call.outcome["error"]

    def _listening(self, address: str) -> None:
        self.address = address
        self.listening.set()

    def result(self, timeout: float = 60.0) -> qemu.QemuReceived:
        received: qemu.QemuReceived = self.call.result(timeout)
        return received


def assert_nothing_complete(directory) -> None:
    """A failed receive leaves no file, not even a .part one, nor the directory
    it made for them."""
    assert not os.path.exists(directory)


@contextlib.contextmanager
def listening_command(out: Path, *options: str, at: str | None = None
                      ) -> Iterator[tuple[subprocess.Popen, str]]:
    """``fastmfd listen --qemu`` into ``out`` at ``at`` (default: a free port of
    127.0.0.1), as a subprocess (stdout and stderr piped, text), once it said it
    listens: (it, the address it said). Killed at the end if it still runs."""
    if at is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            at = f"tcp:127.0.0.1:{probe.getsockname()[1]}"
    listen = subprocess.Popen(
        [sys.executable, "-m", "fastmfd", "listen", "--qemu", at, "--dir", str(out),
         *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listen.stderr is not None
        for line in listen.stderr:
            if "listening on" in line:
                break
        else:
            raise AssertionError(f"listen --qemu never listened (status {listen.wait()})")
        yield listen, line.split()[2]
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()


_SAVES: dict[tuple, tuple[Path, np.ndarray]] = {}     # arguments -> the run's save of them


def saved_guest(tmp_path, channels: int, compression: str, binary: str = QEMU,
                machine: str = "pc", mib: int = 64,
                options: tuple[str, ...] = ()) -> tuple[Path, np.ndarray]:
    """A real guest's migration saved by ``qemu.receive``: (directory, its RAM);
    ``options``: more of the source QEMU's command line.

    Saved once a run for the same arguments (a QEMU and a migration each: some 20
    tests ask for one alike), the directory ``tmp_path / "saved"`` a copy of the
    test's own (tests change or replace its files): the same contents and modes."""
    key = (channels, compression, binary, machine, mib, tuple(options))
    if key not in _SAVES:
        made = Path(tempfile.mkdtemp(prefix="fmfd-saved-"))
        atexit.register(shutil.rmtree, made, True)
        _SAVES[key] = _save_guest(made, channels, compression, binary, machine, mib, options)
    saved, ram = _SAVES[key]
    subprocess.run(["cp", "-a", str(saved), str(tmp_path / "saved")],
                   check=True)
    return tmp_path / "saved", ram.copy()


def _save_guest(tmp_path: Path, channels: int, compression: str, binary: str, machine: str,
                mib: int, options: tuple[str, ...]) -> tuple[Path, np.ndarray]:
    ram = pattern(mib, seed=3)
    return save_ram(tmp_path, ram, channels, compression, binary, machine, options), ram


def save_ram(tmp_path: Path, ram: np.ndarray, channels: int, compression: str,
             binary: str = QEMU, machine: str = "pc", options: tuple[str, ...] = ()) -> Path:
    """A guest whose RAM holds ``ram`` migrated into ``qemu.receive``: the directory
    saved, ``tmp_path / "saved"`` (made anew: ``saved_guest`` keeps its own)."""
    ram_path = tmp_path / "src-ram.img"
    ram.tofile(ram_path)
    source = Guest(tmp_path, str(ram_path), len(ram) >> 20, binary=binary, machine=machine,
                   options=options)
    try:
        source.set_multifd(channels, compression)
        receiver = Receiver(tmp_path / "saved")
        source.migrate(receiver.address)
        assert source.wait() == "completed"
        receiver.result()
    finally:
        source.close()
    ram_path.unlink()
    return tmp_path / "saved"


def incoming_guest(tmp_path, channels: int, compression: str, binary: str = QEMU,
                   machine: str = "pc", mib: int = 64, options: tuple[str, ...] = (),
                   parameters: dict[str, Any] | None = None) -> tuple[Guest, Path, str]:
    """A fresh QEMU waiting for a migration: (guest, its RAM file, address). It
    traces each COMMAND section it loads into its log (``loaded_commands`` in
    test_qemu_send); ``options``: more of its command line, ``parameters``:
    more migration parameters (e.g. its ``tls-creds``)."""
    ram_path = tmp_path / "dst-ram.img"
    with open(ram_path, "wb") as f:
        f.truncate(mib << 20)
    guest = Guest(tmp_path, str(ram_path), mib, incoming=True, name="dst", binary=binary,
                  machine=machine, options=("-trace", "loadvm_process_command", *options))
    try:
        guest.set_multifd(channels, compression)
        if parameters:
            guest.qmp.command("migrate-set-parameters", **parameters)
        guest.qmp.command("migrate-incoming", uri="tcp:127.0.0.1:0")
        socket_address = guest.qmp.command("query-migrate")["socket-address"][0]
    except BaseException:
        guest.close()
        raise
    return guest, ram_path, f"tcp:{socket_address['host']}:{socket_address['port']}"


def assert_loaded(guest: Guest, ram_path: Path, ram: np.ndarray) -> None:
    """The destination ``guest`` completed its migration, its RAM file holding ``ram``."""
    assert guest.wait() == "completed"
    assert np.array_equal(np.fromfile(ram_path, dtype=np.uint8), ram)


def wait_until_filled(paths: Callable[[], Iterable[Path]], at_least: int,
                      timeout: float = 20.0) -> None:
    """Until the files ``paths()`` names (looked up anew each time) hold
    ``at_least`` bytes of data (allocated blocks: they are sparse, and fill as
    pages land): a migration under way."""
    deadline = time.monotonic() + timeout
    while True:
        held = 0
        for path in paths():
            with contextlib.suppress(FileNotFoundError):
                held += path.stat().st_blocks * 512
        if held >= at_least:
            return
        assert time.monotonic() < deadline, f"only {held} bytes landed in {timeout:g} s"
        time.sleep(0.02)
