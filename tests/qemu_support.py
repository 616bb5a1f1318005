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
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

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

    def set_multifd(self, channels: int, compression: str) -> None:
        self.qmp.command("migrate-set-capabilities", capabilities=[
            {"capability": "multifd", "state": True}, {"capability": "events", "state": True}])
        self.qmp.command("migrate-set-parameters", **{
            "multifd-channels": channels, "multifd-compression": compression,
            "max-bandwidth": 100 << 30})

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
