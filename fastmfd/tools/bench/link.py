"""An emulated network link for ``fastmfd bench --link RATE[/DELAY]``.

Loopback moves bytes as fast as memory does, so it cannot show how a
setting behaves on a real network. ``EmulatedLink`` gives the destination a
network namespace of its own, joined to this one by a veth pair whose two
ends each send through a tc qdisc: a token bucket (``tbf``) at RATE, behind
``netem`` holding every packet DELAY when a delay is given. Both directions
are shaped alike, so the round trip is twice DELAY::

    this namespace (sources)                     namespace fastmfd-link-PID (destinations)
      fmfdPIDs  10.254.X.1/30  ── veth ──  fmfdPIDd  10.254.X.2/30
        egress: [netem DELAY] -> tbf RATE            egress: [netem DELAY] -> tbf RATE

A destination listens in the namespace: :meth:`EmulatedLink.listen` makes
its listening socket there (the socket keeps its namespace, and so does every
connection it accepts, whichever process then owns it); a QEMU destination
runs under :meth:`EmulatedLink.command` (``ip netns exec``). Sources stay in
this namespace and connect to :attr:`EmulatedLink.destination_host`, so
every byte crosses the shaped veth. Only the socket is made inside the
namespace, in a thread of its own: no fastmfd process starts there, so a
source's worker can never reach a destination without crossing the link.

Creating namespaces and qdiscs needs CAP_NET_ADMIN (root) and iproute2;
:func:`check_can_emulate` says why not before any work is done, as it does for
a delay where the kernel has no netem. A link tc cannot emulate exactly is
refused as it is parsed: tbf shapes whole bytes per second, and the delay is
given to netem in microseconds. Everything
is removed by :meth:`EmulatedLink.close`: deleting the namespace deletes its
veth end, which deletes the other.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from fractions import Fraction

from ...errors import ConfigError
from ...threads import start_thread
from ..whole import clean_up_whole, run_whole

__all__ = ["LinkSpec", "parse_link", "same_link", "check_can_emulate", "enter_namespace",
           "EmulatedLink", "transfer_timeout"]

# ASCII: with Unicode rules, "1gbit/1\u017f" (a long s) matched 's' and raised KeyError as its
# unit was looked up, and other scripts' digits were taken.
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$", re.IGNORECASE | re.ASCII)
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$", re.IGNORECASE | re.ASCII)
_RATE_SCALE = {None: 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}
_DELAY_US = {"us": 1, "ms": 10 ** 3, "s": 10 ** 6}
# A link's one spelling (LinkSpec.same): each value in the largest unit holding it whole.
_RATE_UNITS = (("g", 10 ** 9), ("m", 10 ** 6), ("k", 10 ** 3), ("", 1))
_DELAY_UNITS = (("s", 10 ** 6), ("ms", 10 ** 3), ("us", 1))
CLONE_NEWNET = 0x40000000
_MAX_DIGITS = 40                # characters of a number: 100gbit is 12, 1s 7 in us
COMMAND_TIMEOUT = 10.0          # seconds any one ip/tc command may take


@dataclass(frozen=True)
class LinkSpec:
    """A link to emulate: ``rate_bits`` per second each way, ``delay_s`` each way."""
    rate_bits: int
    delay_s: float
    text: str                   # as the user wrote it, for tables

    @property
    def rate_bytes(self) -> float:
        return self.rate_bits / 8

    @property
    def same(self) -> str:
        """The link in one spelling whatever the one typed: 1000mbit/1000us, 1Gbit/1ms
        and 1gbit/1ms are one link, "1gbit/1ms" (what a benchmark's conditions record,
        and --compare pairs: one typed 1gbit and one typed 1000mbit were not compared)."""
        rate = next(f"{self.rate_bits // scale}{unit}bit" for unit, scale in _RATE_UNITS
                    if self.rate_bits % scale == 0)
        delay_us = round(self.delay_s * 1e6)
        return rate + next((f"/{delay_us // scale}{unit}" for unit, scale in _DELAY_UNITS
                            if delay_us and delay_us % scale == 0), "")


def parse_link(text: str) -> LinkSpec:
    """``1gbit``, ``10gbit/1ms``, ``500mbit/200us`` -> a LinkSpec (tc's units:
    kbit, mbit, gbit are decimal bits per second; DELAY is one way)."""
    rate_text, _, delay_text = text.strip().partition("/")
    rate = _RATE.match(rate_text)
    delay = _DELAY.match(delay_text) if delay_text else None
    if rate is None or (delay_text and delay is None):
        raise ConfigError(f"link {text!r}: expected RATE[/DELAY], e.g. 1gbit, 10gbit/1ms, "
                          f"500mbit/200us")
    if max(len(rate.group(1)), len(delay.group(1)) if delay else 0) > _MAX_DIGITS:
        # (Fraction refuses numbers of over 4300 digits with a ValueError)
        raise ConfigError(f"link {text!r}: a number of more than {_MAX_DIGITS} characters")
    # Exact (Fraction): int() made 2.3mbit 2299999 bit/s, and float() made 400 nines
    # infinity (round() raised OverflowError) and 27.42ms a delay that was not 27420us.
    rate_bits = round(Fraction(rate.group(1)) * _RATE_SCALE[(rate.group(2) or "").lower()
                                                              or None])
    delay_us = Fraction(delay.group(1)) * _DELAY_US[delay.group(2).lower()] if delay else 0
    if not 10 ** 6 <= rate_bits <= 100 * 10 ** 9:
        raise ConfigError(f"link {text!r}: the rate must be between 1mbit and 100gbit")
    if rate_bits % 8:
        # tbf keeps its rate in bytes per second: 1000001bit was shaped at 1000000.
        raise ConfigError(f"link {text!r}: tc's tbf shapes whole bytes per second, and "
                          f"{rate_bits} bit/s is not a multiple of 8: give {rate_bits // 8 * 8}"
                          f"bit or {rate_bits // 8 * 8 + 8}bit")
    if delay_us > 10 ** 6:
        raise ConfigError(f"link {text!r}: the delay must be at most 1s")
    if delay_us % 1:
        raise ConfigError(f"link {text!r}: the delay is given to netem in whole microseconds")
    # In whole microseconds, as LinkSpec.same spells it: the two are one delay.
    return LinkSpec(rate_bits, int(delay_us) / 1e6, text.strip())


def same_link(recorded: object) -> object:
    """A link as a condition recorded it, in its one spelling (:attr:`LinkSpec.same`);
    anything that is no link as it is (a saved file may hold anything)."""
    if isinstance(recorded, str):
        try:
            return parse_link(recorded).same
        except ConfigError:
            pass
    return recorded


# What building a link takes: network configuration, and (for `ip netns add`,
# which bind-mounts the namespace under /run/netns) mounting.
NEEDED_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def transfer_timeout(base: float, size: int, link: EmulatedLink | None) -> float:
    """Seconds a peer's transfer of ``size`` bytes may take: ``base``, and twice what
    the bytes take at an emulated link's rate (a fixed deadline failed a slow link's:
    8 MiB over 1mbit took 67 s)."""
    return base + (2 * size / link.spec.rate_bytes if link is not None else 0.0)


def _missing_capabilities() -> list[str]:
    """The NEEDED_CAPABILITIES not in this process's effective set."""
    effective = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    return [name for name, bit in NEEDED_CAPABILITIES.items() if not effective >> bit & 1]


def check_can_emulate(spec: LinkSpec | None = None) -> None:
    """Raise ConfigError saying why this process cannot build a link (``spec``: that
    one), if it cannot: before any namespace is made (a delay without netem was said
    only once the link's namespace and veth were made)."""
    missing = _missing_capabilities()
    if missing:
        raise ConfigError(f"--link needs root ({' and '.join(missing)}): it creates a "
                          f"network namespace, a veth pair and tc qdiscs (run as root, or "
                          f"drop --link to use loopback)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"--link needs iproute2's {' and '.join(missing)} "
                          f"(Debian: apt-get install iproute2)")
    if spec is not None and spec.delay_s and not _qdisc_known("netem", "delay", "1ms"):
        raise ConfigError(f"link {spec.text}: this kernel has no netem qdisc "
                          f"(CONFIG_NET_SCH_NETEM), so a delay cannot be emulated here; "
                          f"give the rate alone")


def _qdisc_known(kind: str, *options: str) -> bool:
    """Whether this kernel has the qdisc ``kind``: one is added (with ``options``) on
    the loopback of a network namespace of a thread's own, which goes with the thread,
    so nothing of this host's is touched or left. A failure other than an unknown kind
    says nothing of it: True (making the link will say what failed)."""
    outcome: dict[str, object] = {}

    def probe() -> None:    # a thread of its own: unshare changes only this thread
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            outcome["done"] = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", kind,
                                              *options], capture_output=True, text=True,
                                             timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            pass                # says nothing of the kind

    start_thread(threading.Thread(target=probe, name="fastmfd qdisc probe")).join()
    done = outcome.get("done")
    return not (isinstance(done, subprocess.CompletedProcess) and done.returncode != 0
                and "unknown" in done.stderr)


class _CommandFailed(ConfigError):
    """An ip or tc command ran to its end and failed: it changed nothing."""


def _run(*command: str) -> str:
    """Run an ip or tc command; its output. Whole (:func:`..whole.run_whole`): when an
    interrupt goes on, the command never ran or has ended, so what it made is there
    for close() to see."""
    try:
        done = run_whole(lambda: subprocess.run(command, capture_output=True, text=True,
                                                timeout=COMMAND_TIMEOUT))
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{' '.join(command)} did not finish within "
                          f"{COMMAND_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise _CommandFailed(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def enter_namespace(name: str) -> None:
    """Move the calling thread (only it: namespaces are per thread) into network
    namespace ``name``. Python 3.11 has no os.setns."""
    with open(f"/run/netns/{name}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")


def _free_subnet(pid: int) -> int:
    """The base of a /30 of 10.254.0.0/24 no address on this host is in (another
    bench's link), tried from one the pid picks."""
    taken = set(re.findall(r"inet 10\.254\.0\.(\d+)/", _run("ip", "-o", "-4", "addr", "show")))
    for step in range(64):
        base = (pid + step) % 64 * 4
        if not {str(base + 1), str(base + 2)} & taken:
            return base
    raise ConfigError("no free /30 in 10.254.0.0/24 for an emulated link (64 benches running?)")


class EmulatedLink:
    """The namespace, the veth pair and both qdiscs of one ``spec`` (see the module
    docstring); a context manager, removed on exit."""

    def __init__(self, spec: LinkSpec) -> None:
        check_can_emulate(spec)
        self.spec = spec
        pid = os.getpid()
        self.namespace = f"fastmfd-link-{pid}"
        self.source_device, self.destination_device = f"fmfd{pid}s", f"fmfd{pid}d"
        base = _free_subnet(pid)
        self.source_host, self.destination_host = f"10.254.0.{base + 1}", f"10.254.0.{base + 2}"
        # What this link may have made, so close() removes that and nothing else (a
        # namespace or a veth of these names left by a killed bench whose pid was ours
        # is not): "namespace", "veth".
        self._made: set[str] = set()
        try:
            self._create()
        except BaseException as exc:
            try:
                self.close()
            except ConfigError as cleanup:      # the first failure is the one to report
                exc.add_note(f"and removing the link failed: {cleanup}")
            raise

    def _create(self) -> None:
        ns, src, dst = self.namespace, self.source_device, self.destination_device
        self._make("namespace", "ip", "netns", "add", ns)
        self._make("veth", "ip", "link", "add", src, "type", "veth", "peer", "name", dst,
                   "netns", ns)
        _run("ip", "addr", "add", f"{self.source_host}/30", "dev", src)
        _run("ip", "link", "set", src, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.destination_host}/30", "dev", dst)
        _run("ip", "-n", ns, "link", "set", dst, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        for namespace, device in ((None, src), (ns, dst)):
            self._shape(namespace, device)

    def _make(self, part: str, *command: str) -> None:
        """Run ``command``, which makes ``part`` of the link. The part is counted as
        made before the command runs: an interrupt (Ctrl-C) can land once ``ip`` made
        it, before a mark set after it. Only a command that ran and failed made
        nothing (a part of this name that was there is another's)."""
        self._made.add(part)
        try:
            _run(*command)
        except _CommandFailed:
            self._made.discard(part)
            raise

    def _shape(self, namespace: str | None, device: str) -> None:
        """netem (if there is a delay) then tbf at the rate, on ``device``'s egress."""
        tc = ["tc"] + (["-n", namespace] if namespace else [])
        rate = self.spec.rate_bytes
        # The bucket holds a millisecond of the rate, and never less than one
        # 64 KiB GSO packet plus headers (tbf would have to split it); the queue
        # holds the bucket plus the bandwidth-delay product plus 50 ms, so
        # bursts wait instead of being dropped.
        burst = max(int(rate / 1000), 128 << 10)
        limit = burst + int(rate * (2 * self.spec.delay_s + 0.05))
        tbf = ["tbf", "rate", f"{self.spec.rate_bits}bit", "burst", str(burst),
               "limit", str(limit)]
        if self.spec.delay_s:
            # netem's queue is counted in packets: enough for the bytes in flight.
            packets = max(1000, int(rate * 2 * self.spec.delay_s / 1500) * 2)
            _run(*tc, "qdisc", "add", "dev", device, "root", "handle", "1:", "netem",
                 "delay", f"{self.spec.delay_s * 1e6:.0f}us", "limit", str(packets))
            _run(*tc, "qdisc", "add", "dev", device, "parent", "1:", "handle", "2:", *tbf)
        else:
            _run(*tc, "qdisc", "add", "dev", device, "root", *tbf)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the destination's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def listen(self, port: int = 0, backlog: int = 128) -> socket.socket:
        """A TCP socket listening on the destination's side of the link."""
        outcome: dict[str, object] = {}

        def make() -> None:     # a thread of its own: setns changes only this thread
            try:
                enter_namespace(self.namespace)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((self.destination_host, port))
                    sock.listen(backlog)
                except BaseException:
                    sock.close()
                    raise
                outcome["socket"] = sock
            except BaseException as exc:    # handed to the caller's thread
                outcome["error"] = exc

        start_thread(threading.Thread(target=make, name="fastmfd link listen")).join()
        if "error" in outcome:
            raise ConfigError(f"cannot listen in namespace {self.namespace}: "
                              f"{outcome['error']}")
        sock = outcome["socket"]
        assert isinstance(sock, socket.socket)
        return sock

    def sent_bytes(self) -> int:
        """Bytes the source side's rate limiter has let through (every connection)."""
        for qdisc in json.loads(_run("tc", "-s", "-j", "qdisc", "show", "dev",
                                     self.source_device)):
            if qdisc.get("kind") == "tbf":
                return int(qdisc["bytes"])
        raise ConfigError(f"no tbf qdisc on {self.source_device}")

    def close(self) -> None:
        """Remove the veth pair with its qdiscs, and the namespace (idempotent).

        An interrupt (Ctrl-C) stops the removal once: what is left is removed,
        then the interrupt goes on."""
        clean_up_whole(self._remove)

    def _remove(self) -> None:
        # A part stays marked until its removal ran, so a removal interrupted is
        # done again; one that may never have been made (its command interrupted
        # before it ran) is not there to remove.
        # Deleting a namespace frees its devices later, in the background: the veth
        # goes first, at once, so the next link can reuse its names.
        try:
            if "veth" in self._made:
                device = f"/sys/class/net/{self.source_device}"
                try:
                    if os.path.exists(device):
                        _run("ip", "link", "del", self.source_device)
                except _CommandFailed:
                    # Gone meanwhile: the namespace, deleted by a removal interrupted
                    # before this one, took the veth's other end with it, and so this one.
                    if os.path.exists(device):
                        raise
                self._made.discard("veth")
        finally:
            if "namespace" in self._made:
                if os.path.exists(f"/run/netns/{self.namespace}"):
                    _run("ip", "netns", "del", self.namespace)
                self._made.discard("namespace")

    def __enter__(self) -> "EmulatedLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def label(self) -> str:
        return f"link {self.spec.text}"
