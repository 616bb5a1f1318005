"""What fastmfd is measured against: trials of the same image moved by peers.

Both follow the trial steps of :mod:`.trial` (prepare in ``__init__``,
``run()`` timed, ``finish()`` checks the destination equals the image and
frees everything, ``close()`` frees without checking).

``SendallTrial`` — the plain baseline: one TCP socket, two processes::

    sender process                                  receiver process
      maps the image file                             maps a fresh file (tmpfs) of the size
      connect ──────────────────────────────────────▶ accept
      "go" ─▶ sock.sendall(whole image) ──── TCP ───▶ recv_into(view[pos:]) until full
                                                      "done" ─▶ timed part ends

``QemuTrial`` — a real QEMU multifd migration (DESIGN §8): a paused TCG guest
(``-S``, machine ``pc``: the binary's current i440fx machine type) whose RAM
is a ``memory-backend-file`` (``share=on``) on the image,
migrated over loopback TCP to a second QEMU started with ``-incoming defer``
whose RAM is a fresh file; both get the multifd capability, channel count
and compression over QMP. The timed part runs from ``migrate`` until the
destination reports ``completed``, by that event's own timestamp
(:func:`destination_loaded`; a QEMU 7.2 source without return path may
finish before its destination has loaded everything; fastmfd's time always
includes the destination's LOADED). QEMU's own ``total-time`` is kept in
the details. The destination's RAM file is then compared with the image.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..._engine.processes import Child, ChildPipe, ChildSet, run_child
from ..._engine.session import Closable
from ...protocol.control import Done, Go
from ...protocol.sockets import bound_address, connect, host_port, listen, parse_address
from ...errors import ConfigError, MigrationError
from ..images import Image
from ..loopback import NO_SECURITY, LoopbackSecurity
from .link import EmulatedLink, enter_namespace, transfer_timeout
from .trial import Measurement, wait_until_idle


def _pid(child: Child) -> list[int]:
    """A started child's pid, as a list for Trial.pids."""
    return [child.process.pid] if child.process.pid is not None else []

__all__ = ["SendallTrial", "QemuPeer", "QemuTrial", "find_qemu", "check_qemu",
           "check_guest_size", "QMP",
           "destination_loaded", "dying_with_this_thread"]

STEP_TIMEOUT = 60.0             # seconds any one step (start, connect, transfer) may take
# The sendall sender's connect, lookup included: fastmfd's default, within STEP_TIMEOUT.
CONNECT_TIMEOUT = 30.0
VERSION_TIMEOUT = 10.0          # seconds `qemu -version` may take (check_qemu)
LOOPBACK_HOST = "127.0.0.1"


class _PeerTrial:
    """What the peers' trials share: :meth:`finish` checks the file their destination wrote."""
    pids_complete = True
    image: Image
    _received: str          # the destination's copy of the image
    _received_name: str     # what errors call it

    def _stop(self) -> None:
        """End the peer's processes, as a finished transfer does (``close`` kills them)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free everything the trial holds (idempotent)."""
        raise NotImplementedError

    def finish(self) -> None:
        try:
            self._stop()
            if not self.image.matches(self._received):
                raise MigrationError(f"{self._received_name} differs from the image")
        finally:
            self.close()


# ------------------------------------------------------------------ sendall

@dataclass(frozen=True)
class _ReceiverParams:
    path: str
    size: int
    prealloc: bool
    host: str                   # where to listen
    namespace: str | None       # the network namespace to listen in (None: this one)


@dataclass(frozen=True)
class _SenderParams:
    path: str
    size: int
    host: str
    port: int


@dataclass(frozen=True)
class _Listening:
    """The receiver listens on ``port``."""
    port: int


@dataclass(frozen=True)
class _Connected:
    """The sender is connected and waits for Go."""


def _sendall_sender(pipe: ChildPipe, params: _SenderParams, stack: list[Closable]) -> None:
    with open(params.path, "rb") as file, \
            mmap.mmap(file.fileno(), params.size, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            # fastmfd's connect: its lookup and connect bounded (create_connection had
            # neither: a destination dropping SYNs held it for the kernel's ~127 s).
            address = parse_address(f"tcp:{host_port(params.host, params.port)}")
            with connect(address, CONNECT_TIMEOUT) as sock:
                pipe.send(_Connected())
                if isinstance(pipe.recv(), Go):
                    sock.sendall(view)
        finally:
            view.release()


def _sendall_receiver(pipe: ChildPipe, params: _ReceiverParams,
                      stack: list[Closable]) -> None:
    # A new file on tmpfs, as a destination guest's RAM: pages are allocated as
    # they arrive, unless preallocated (written once) before timing.
    size = params.size
    fd = os.open(params.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if params.prealloc:
        for offset in range(0, size, mmap.PAGESIZE):
            mapped[offset] = 0
    if params.namespace is not None:
        enter_namespace(params.namespace)       # this thread, which makes the server
    # fastmfd's listen: a name looked up within its deadline, bound at each address.
    address = parse_address(f"tcp:{host_port(params.host, 0)}")
    with contextlib.closing(listen(address)) as server:
        port = bound_address(server, address).target[1]
        pipe.send(_Listening(int(port)))
        sock, _ = server.accept()
    with sock, mapped:
        view = memoryview(mapped)
        try:
            done = 0
            while done < size:
                n = sock.recv_into(view[done:])
                if n == 0:
                    raise EOFError(f"the sender closed after {done} of {size} bytes")
                done += n
        finally:
            view.release()
    pipe.send(Done())


def sendall_sender(conn: Connection) -> None:
    run_child(conn, _sendall_sender)


def sendall_receiver(conn: Connection) -> None:
    run_child(conn, _sendall_receiver)


class SendallTrial(_PeerTrial):
    """The image through one plain ``socket.sendall`` / ``recv_into`` pair of processes."""
    _received_name = "sendall: the received file"

    def __init__(self, image: Image, *, prealloc: bool = False,
                 link: EmulatedLink | None = None) -> None:
        self.image = image
        self._received = image.new_path("sendall-dst")
        self._transfer_timeout = transfer_timeout(STEP_TIMEOUT, image.size, link)
        host = link.destination_host if link is not None else LOOPBACK_HOST
        self._peers = ChildSet(sendall_receiver, ["sendall receiver"])
        try:
            self._receiver = self._peers[0]
            self._receiver.start_session(
                _ReceiverParams(self._received, image.size, prealloc, host,
                                link.namespace if link is not None else None), [])
            port = self._receiver.expect(_Listening, STEP_TIMEOUT).port
            self._sender = self._peers.add(sendall_sender, "sendall sender")
            self._sender.start_session(_SenderParams(image.path, image.size, host, port), [])
            self._sender.expect(_Connected, STEP_TIMEOUT)
            wait_until_idle(self._peers.pids())
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, list[int]]:
        return {"source": _pid(self._sender), "destination": _pid(self._receiver)}

    def run(self) -> Measurement:
        started = time.perf_counter()
        self._sender.send(Go(1))
        self._receiver.expect(Done, self._transfer_timeout)
        seconds = time.perf_counter() - started
        return Measurement(seconds, self.image.size, self.image.size)

    def _stop(self) -> None:
        self._peers.stop(STEP_TIMEOUT)

    def close(self) -> None:
        self._peers.stop(timeout=0)
        if os.path.exists(self._received):
            os.unlink(self._received)


# ------------------------------------------------------------------ QEMU

def find_qemu(binary: str | None = None) -> str:
    """The QEMU to run: ``binary``, $FASTMFD_QEMU, or qemu-system-x86_64 on PATH."""
    name = binary or os.environ.get("FASTMFD_QEMU") or "qemu-system-x86_64"
    path = shutil.which(name)
    if path is None and os.path.dirname(name) and os.path.exists(name):
        what = "a directory" if os.path.isdir(name) else "not executable"
        raise ConfigError(f"{name} is {what}: name QEMU's binary (qemu-system-x86_64)")
    if path is None:
        raise ConfigError(f"{name} not found: install QEMU (Debian: apt-get install "
                          f"qemu-system-x86) or name the binary")
    return path


def check_guest_size(size: int) -> None:
    """ConfigError unless an image of ``size`` bytes can be a QEMU guest's RAM."""
    if size % (1 << 20):
        raise ConfigError(f"QEMU guest RAM is whole MiB; the image is {size} bytes")


def check_qemu(path: str) -> str:
    """ConfigError unless ``path -version`` names QEMU within VERSION_TIMEOUT: a binary
    that is none, or fails at once, was found only after fastmfd's timed runs. Returns
    the first line it printed (``QEMU emulator version 7.2.22 (Debian ...)``): which
    QEMU the bench's results are of."""
    try:
        done = subprocess.run([path, "-version"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=VERSION_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`{path} -version` did not end within {VERSION_TIMEOUT:g} s: "
                          f"is it QEMU?") from None
    except OSError as exc:
        raise ConfigError(f"{path} does not run: {exc.strerror or exc}") from None
    printed = done.stdout.decode(errors="replace")
    said = " ".join(printed.split())      # on one line
    if done.returncode != 0 or "QEMU" not in said:
        ended = (f"exited with status {done.returncode}" if done.returncode >= 0
                 else f"was killed by signal {-done.returncode}")
        raise ConfigError(f"{path} is not a QEMU that runs: `{path} -version` {ended}, "
                          + (f"printing {said[:200]!r}" if said else "printing nothing"))
    return next(line.strip() for line in printed.splitlines() if line.strip())


class QMP:
    """A minimal QMP client on a Unix socket: commands, and events kept for waiting."""

    def __init__(self, path: str, process: QemuProcess, timeout: float = STEP_TIMEOUT) -> None:
        self.process = process
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if process.poll() is not None or time.monotonic() > deadline:
                    raise MigrationError(f"QEMU's QMP socket {path} never opened "
                                         f"(QEMU {_exit_text(process)})") from None
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self._unread = b""          # what was received past the last whole line
        self.events: list[dict[str, Any]] = []
        # When the last final MIGRATION event happened (QEMU's time.time() of it).
        self.final_at: float | None = None
        self._read()                                    # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._unread:
            received = self.sock.recv(65536)
            if not received:
                raise MigrationError(f"QEMU closed its QMP socket "
                                     f"(QEMU {_exit_text(self.process)})")
            self._unread += received
        line, _, self._unread = self._unread.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)     # QMP sends one JSON object a line
        return reply

    def take_events(self) -> None:
        """Keep the events QEMU has sent by now, without waiting for more."""
        while b"\n" in self._unread or select.select([self.sock], [], [], 0)[0]:
            message = self._read()
            if "event" in message:
                self.events.append(message)

    def migration_failure(self) -> str | None:
        """QEMU's error if a MIGRATION event (of those taken) said it failed."""
        if not any(event["event"] == "MIGRATION"
                   and event.get("data", {}).get("status") == "failed"
                   for event in self.events):
            return None
        info = self.command("query-migrate")
        return str(info.get("error-desc", info))

    def command(self, name: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise MigrationError(f"QEMU {name}: {reply['error'].get('desc', reply)}")
            elif "return" in reply:
                return reply["return"]

    def wait_migration(self, timeout: float) -> str:
        """Wait for a MIGRATION event with a final status; returns the status and
        keeps when QEMU reached it in ``final_at``."""
        final = ("completed", "failed", "cancelled")
        self.sock.settimeout(timeout)
        while True:
            for event in self.events:
                status = event.get("data", {}).get("status")
                if event["event"] == "MIGRATION" and status in final:
                    self.events.clear()
                    # QMP stamps each event with the host's wall-clock time.
                    stamp = event.get("timestamp", {})
                    self.final_at = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
                    return str(status)
            self.events.clear()
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        self.sock.close()


def destination_loaded(dst: QMP, started: float) -> float:
    """Seconds from ``started`` (``time.time()``) until the destination QEMU said
    its migration completed: the moment it has loaded everything, by its own
    event's timestamp (neither the delay in reading the event nor the source's
    cleanup after it counts, for QEMU's source or fastmfd's). Call it once
    ``dst.wait_migration`` said "completed"."""
    assert dst.final_at is not None, "set by wait_migration"
    return dst.final_at - started


def dying_with_this_thread(command: list[str]) -> list[str]:
    """``command``, killed by the kernel when the thread that starts it ends
    (``setpriv --pdeathsig``, kept across exec, where util-linux has it): a
    bench killed or crashed would otherwise leave its paused QEMUs running,
    each holding its guest's RAM. Start it from a thread that outlives it."""
    if shutil.which("setpriv") is None:
        return command
    return ["setpriv", "--pdeathsig", "SIGKILL", "--", *command]


class QemuProcess(subprocess.Popen[bytes]):
    """A QEMU process, with the file its stderr goes to (its last words, in errors)."""
    log_path = ""


def _exit_text(process: QemuProcess) -> str:
    """How a QEMU process is doing, with what it wrote to stderr."""
    code = process.poll()
    text = "is running" if code is None else f"exited with status {code}"
    try:
        with open(process.log_path, errors="replace") as log:
            said = log.read()[-500:].strip()
    except (AttributeError, OSError):
        said = ""
    return f"{text}: {said}" if said else text


class QemuPeer(_PeerTrial):
    """What the trials with a real QEMU share: QEMU processes on the image (or a
    fresh file), their QMP sockets, and their files, all freed by ``close``.
    Each trial starts its processes in :meth:`_prepare`; once they are idle the
    trial is ready to time (anything that fails on the way frees all)."""

    def __init__(self, image: Image, channels: int, compression: str, level: int = 1,
                 binary: str | None = None, *, prealloc: bool = False,
                 link: EmulatedLink | None = None,
                 security: LoopbackSecurity = NO_SECURITY) -> None:
        """``security``: with its TLS, QEMU's connections in TLS too (its
        ``tls-creds``, made of the same files); its shared key is fastmfd's alone."""
        check_guest_size(image.size)
        self._tls = {"server": security.destination_tls, "client": security.source_tls}
        if security.source_tls is not None and security.source_tls.ca is None:
            raise ConfigError("a QEMU in TLS checks its peer against a CA: give --tls-ca")
        self.image = image
        self.channels, self.compression, self.level = channels, compression, level
        self._binary = find_qemu(binary)
        self._files: list[str] = []
        self._procs: list[QemuProcess] = []
        self._qmp: list[QMP] = []
        self._prealloc = prealloc
        self._link = link
        self._destination_host = link.destination_host if link is not None else LOOPBACK_HOST
        try:
            self._prepare()
            wait_until_idle([p.pid for p in self._procs])
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        """Start the trial's processes and connections (not timed)."""
        raise NotImplementedError

    @staticmethod
    def multifd(qmp: QMP, channels: int, compression: str, level: int) -> None:
        """The multifd capability and parameters, and migration events."""
        params = {"multifd-channels": channels, "multifd-compression": compression,
                  # QEMU's default cap is 128 MiB/s; lift it as the captures did.
                  "max-bandwidth": 100 << 30}
        if compression != "none":
            params[f"multifd-{compression}-level"] = level
        qmp.command("migrate-set-capabilities", capabilities=[
            {"capability": "multifd", "state": True}, {"capability": "events", "state": True}])
        qmp.command("migrate-set-parameters", **params)

    def listening_uri(self, dst: QMP) -> str:
        """Where a destination told ``migrate-incoming tcp:HOST:0`` listens (HOST:
        loopback, or the far side of the link)."""
        dst.command("migrate-incoming", uri=f"tcp:{self._destination_host}:0")
        listening = dst.command("query-migrate")["socket-address"][0]
        return f"tcp:{listening['host']}:{listening['port']}"

    def _new_file(self, stem: str) -> str:
        path = self.image.new_path(stem)
        self._files.append(path)
        return path

    def _tls_creds(self, endpoint: str) -> list[str]:
        """The ``-object`` of a QEMU's ``tls-creds`` (``endpoint`` server or client):
        a directory of the names QEMU reads, linked to the bench's TLS files."""
        tls = self._tls[endpoint]
        assert tls is not None and tls.ca is not None, "only with TLS (checked: a CA)"
        directory = self._new_file(f"qemu-tls-{endpoint}")
        os.mkdir(directory, 0o700)
        for name, path in (("ca-cert.pem", tls.ca), (f"{endpoint}-cert.pem", tls.cert),
                           (f"{endpoint}-key.pem", tls.key)):
            if path is not None:
                os.symlink(os.path.abspath(path), os.path.join(directory, name))
        # A server verifies its clients (verify-peer) where the bench's destination does.
        verify = "on" if endpoint == "client" or tls.ca is not None else "off"
        return ["-object", f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint},"
                           f"verify-peer={verify}"]

    def secure(self, qmp: QMP, endpoint: str) -> None:
        """Migrate in TLS (``tls-creds``; a client checks ``tls-hostname`` where the
        bench's source names one); nothing without TLS. Call after :meth:`_start`
        with ``tls``."""
        tls = self._tls[endpoint]
        if tls is None:
            return
        params = {"tls-creds": "tls0"}
        if endpoint == "client" and tls.hostname is not None:
            params["tls-hostname"] = tls.hostname
        qmp.command("migrate-set-parameters", **params)

    @staticmethod
    def tls_creds(qmp: QMP) -> str:
        """QEMU's own word on its TLS: its ``tls-creds`` parameter ("" without)."""
        creds: str = qmp.command("query-migrate-parameters").get("tls-creds", "")
        return creds

    def _start(self, ram_path: str, *, incoming: bool, tls: bool = False) -> QMP:
        """A QEMU on ``ram_path``, its migration's destination if ``incoming``;
        ``tls``: with the ``tls-creds`` of its end, where the bench has TLS."""
        mib = self.image.size >> 20
        qmp_path = self._new_file("qmp-dst" if incoming else "qmp-src")
        command = [
            # The binary's own pc: QEMU 7.2's stream from 7.2, QEMU 10's from 10.
            self._binary, "-machine", "pc,accel=tcg,memory-backend=mem",
            "-display", "none", "-nodefaults", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=mem,size={mib}M,mem-path={ram_path},share=on"
                       + (",prealloc=on" if incoming and self._prealloc else ""),
            "-qmp", f"unix:{qmp_path},server=on,wait=off", "-S"]
        endpoint = "server" if incoming else "client"
        if tls and self._tls[endpoint] is not None:
            command += self._tls_creds(endpoint)
        if incoming:
            command += ["-incoming", "defer"]
            if self._link is not None:
                command = self._link.command(command)
        command = dying_with_this_thread(command)
        log_path = self._new_file("qemu-dst-log" if incoming else "qemu-src-log")
        with open(log_path, "wb") as log:
            process = QemuProcess(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=log)
        process.log_path = log_path
        self._procs.append(process)
        qmp = QMP(qmp_path, process)
        self._qmp.append(qmp)
        return qmp

    def _kill(self) -> None:
        """Kill every QEMU now (idempotent)."""
        for qmp in self._qmp:
            qmp.close()
        self._qmp = []
        for process in self._procs:
            if process.poll() is None:
                process.kill()
            process.wait()
        self._procs = []

    def _stop(self) -> None:
        """Ask every QEMU to quit; kill those that do not within a few seconds."""
        for qmp in self._qmp:
            try:
                qmp.command("quit")
            except (OSError, MigrationError):
                pass
            qmp.close()
        self._qmp = []
        for process in self._procs:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self._kill()
        for path in self._files:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
        self._files = []


class QemuTrial(QemuPeer):
    """The image migrated by two real QEMU processes (see the module docstring)."""
    _received_name = "QEMU: the destination's RAM file"

    def _prepare(self) -> None:
        self._received = self._new_file("qemu-dst-ram")
        self.src = self._start(self.image.path, incoming=False, tls=True)
        self.dst = self._start(self._received, incoming=True, tls=True)
        for qmp, endpoint in ((self.src, "client"), (self.dst, "server")):
            self.multifd(qmp, self.channels, self.compression, self.level)
            self.secure(qmp, endpoint)
        self._uri = self.listening_uri(self.dst)

    def pids(self) -> dict[str, list[int]]:
        source, destination = self._procs
        return {"source": [source.pid], "destination": [destination.pid]}

    def run(self) -> Measurement:
        started = time.time()
        self.src.command("migrate", uri=self._uri)
        status = self.src.wait_migration(transfer_timeout(STEP_TIMEOUT * 10, self.image.size,
                                                          self._link))
        source_done = time.time() - started
        if status == "completed":
            status = self.dst.wait_migration(STEP_TIMEOUT)
        info = self.src.command("query-migrate")
        if status != "completed":
            raise MigrationError(f"QEMU migration {status}: {info.get('error-desc', info)}")
        seconds = destination_loaded(self.dst, started)
        ram = info["ram"]
        # QEMU 7.2 counts pages at their raw size when it queues them, before
        # compression, so it cannot tell the bytes that went on the wire.
        return Measurement(seconds, self.image.size, None, {
            "qemu_total_time_s": info["total-time"] / 1000,
            "qemu_transferred": ram["transferred"],
            "qemu_downtime_s": info.get("downtime", 0) / 1000,
            "source_done_s": source_done,
            "normal_pages": ram["normal"], "zero_pages": ram["duplicate"],
            "multifd_bytes": ram.get("multifd-bytes"),
            "qemu_tls_creds": self.tls_creds(self.src)})
