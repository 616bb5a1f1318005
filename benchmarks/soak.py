"""Fault-injection soak (issue #9): random faults at random moments, many runs.

::

    python benchmarks/soak.py --runs 200 --seed 1 [--size 16M] [--stall 2]
    python benchmarks/soak.py --seed 1 --first 57 --runs 1 -v     # replay run 57 alone

Each run starts a Destination and a Source in processes of their own (so
either can be SIGKILLed or SIGSTOPped as a whole), joined through a TCP proxy
in this process, with a random configuration, and injects ONE fault at a
random moment::

    harness (this process, a child subreaper)
      ├── destination process: Destination(...).receive()   + forkserver, receive
      │                                                        workers, reassembly
      ├── source process: Source(...).migrate()              + forkserver, send workers
      └── proxy thread: source ──▶ proxy ──▶ destination     one Link per connection

    faults: kill / stop (SIGKILL, SIGSTOP) of any process — either main process,
            a send or receive worker, the reassembly process, a forkserver;
            reset (RST both ends), hole (stop forwarding one direction: the
            source's writes block, or its bytes are swallowed, or the
            destination's answers are dropped), truncate (FIN mid-stream),
            corrupt (one byte flipped); or none (control runs)
    moments: a byte offset of one connection, a main-channel message (either
             direction), a byte count over all connections, or a time after start

A stopped main process is resumed (SIGCONT) once the other side has ended and
must then end too; a stopped worker is resumed at the end of the run.

Each run is judged:

- **ok**: both sides succeeded and every destination region and device state
  equals the source's;
- **failed cleanly**: each side raised a MigrationError (or was the process
  killed) within ``stall + 5 s`` of the fault; a destination that finished
  while only the source failed afterwards (the fault came after the
  destination's last word) counts here too when its data is right;
- **hang**: a side still running after that deadline (killed then);
- **leak**: after the run, a child process of this harness (descendants are
  reparented here: it is a subreaper), a ``/dev/shm/fastmfd-*`` segment, or a
  file descriptor of this process more than before the run;
- **false success**: a side reported success while the destination's bytes
  differ from the source's (or the source succeeded and the destination failed).

A summary table goes to stdout (and every run to ``--json``); the exit status is
1 if there was any hang, leak, false success or unexpected error (a side ending
with something other than a MigrationError, or a process dying on its own).
"""

from __future__ import annotations

import argparse
import base64
import collections
import ctypes
import faulthandler
import hashlib
import json
import os
import pickle
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))     # the proxy, the /proc scans
import proc_scan  # noqa: E402
MIB = 1 << 20
MARGIN = 5.0            # seconds past stall_timeout a side may take to fail after a fault
CONTROL_LIMIT = 40.0    # seconds a run whose fault never fired may take
CLOSE_LIMIT = 15.0      # seconds a process may take to exit after its call ended
LEAK_GRACE = 5.0        # seconds leftovers may take to go away on their own
PREFIX = "SOAK "        # children's report lines on stdout


# ======================================================================== children

def _emit(**event) -> None:
    sys.stdout.write(PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _read_spec() -> dict:
    # On a hang the harness asks for every thread's stack (SIGUSR1) before the kill.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return pickle.loads(base64.b64decode(sys.stdin.readline()))


def _wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"soak child: expected 'go', got {line!r}")


def _error_event(exc: BaseException) -> dict:
    import fastmfd
    return {"ok": False, "t": time.monotonic(), "type": type(exc).__name__,
            "migration_error": isinstance(exc, fastmfd.MigrationError),
            "message": str(exc)[:500]}


def _forkserver_pid() -> int | None:
    from multiprocessing import forkserver
    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def _make_device(d: dict):
    import fastmfd
    if d["kind"] == "bytes":
        return fastmfd.BytesDevice(d["idstr"], d["instance"], device_bytes(d, config=False),
                                   config=d["config"])
    return fastmfd.SyntheticDevice(d["idstr"], d["instance"], d["size"], seed=d["seed"],
                                   precopy_size=d.get("precopy", 0))


def device_bytes(d: dict, config: bool = True) -> bytes:
    """What a device of the spec sends (its state, then its config bytes)."""
    if d["kind"] == "bytes":
        data = random.Random(d["seed"]).randbytes(d["size"])
        return data + (d["config"] if config else b"")
    from fastmfd import _core
    buf = bytearray(d["size"])
    if buf:
        _core.fill_pattern(memoryview(buf), d["seed"], 0)
    return bytes(buf)


class _Workload:
    """Live runs: rewrite random pages of the first region and mark them dirty
    until the source stops (on_stop)."""

    def __init__(self, region, seed: int) -> None:
        self.region, self.seed = region, seed
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="soak workload")
        self.thread.start()

    def _run(self) -> None:
        import numpy as np
        pages = self.region.array.reshape(-1, self.region.page_size)
        rng = np.random.default_rng(self.seed)
        block = 8
        try:
            while not self.stop_event.wait(0.003):
                first = int(rng.integers(len(pages) - block + 1))
                if rng.random() < 0.2:
                    pages[first:first + block] = 0
                else:
                    pages[first:first + block] = rng.integers(
                        0, 256, (block, self.region.page_size), dtype=np.uint8)
                self.region.mark_dirty(first * self.region.page_size,
                                       block * self.region.page_size)
        finally:
            del pages

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()


def source_child() -> None:
    spec = _read_spec()
    import fastmfd
    regions = [fastmfd.Region.attach(h) for h in spec["regions"]]
    workload = None
    try:
        with fastmfd.Source(spec["address"], fastmfd.MigrationConfig(**spec["config"])) as src:
            for region in regions:
                src.add_region(region)
            for d in spec["devices"]:
                src.add_device(_make_device(d))
            pids = {c.name: c.process.pid for c in src._workers}
            pids["source forkserver"] = _forkserver_pid()
            _emit(event="ready", pids=pids)
            _wait_go()
            if spec["live"]:
                workload = _Workload(regions[0], spec["seed"])
            try:
                src.migrate(live=spec["live"],
                            on_stop=workload.stop if workload is not None else None)
            except BaseException as exc:
                _emit(event="end", **_error_event(exc))
            else:
                _emit(event="end", ok=True, t=time.monotonic())
            finally:
                if workload is not None:
                    workload.stop()
    finally:
        for region in regions:
            region.close()
    _emit(event="closed", t=time.monotonic())


def destination_child() -> None:
    spec = _read_spec()
    import fastmfd
    user = {h.name: fastmfd.Region.attach(h) for h in spec["user_regions"]}
    try:
        with fastmfd.Destination("tcp:127.0.0.1:0", workers=spec["workers"],
                                 timeout=spec["timeout"],
                                 handshake_timeout=spec["timeout"],
                                 stall_timeout=spec["stall_timeout"],
                                 auth_key=spec["auth_key"], prealloc=spec["prealloc"]) as dst:
            for region in user.values():
                dst.add_region(region)
            for d in spec["devices"]:
                if d["loader"] == "file":
                    dst.add_loader(d["idstr"], d["instance"], fastmfd.FileLoader(d["path"]))
                elif d["loader"] == "verify":
                    dst.add_loader(d["idstr"], d["instance"],
                                   fastmfd.VerifyLoader(d["size"], seed=d["seed"],
                                                        precopy_size=d.get("precopy", 0)))
            pids = {c.name: c.process.pid for c in dst._workers}
            pids["reassembly"] = dst._reassembly[0].process.pid
            pids["destination forkserver"] = _forkserver_pid()
            _emit(event="ready", address=dst.address, pids=pids)
            _wait_go()
            try:
                result = dst.receive()
            except BaseException as exc:
                _emit(event="end", **_error_event(exc))
            else:
                end = time.monotonic()
                regions = {name: hashlib.sha256(r.buffer).hexdigest()
                           for name, r in result.regions.items() if name not in user}
                devices = {}
                for (idstr, instance), value in result.devices.items():
                    key = f"{idstr}#{instance}"
                    devices[key] = (hashlib.sha256(value).hexdigest()
                                    if isinstance(value, bytes) else repr(value))
                _emit(event="end", ok=True, t=end, regions=regions, devices=devices)
    finally:
        for region in user.values():
            region.close()
    _emit(event="closed", t=time.monotonic())


# ======================================================================== the proxy

def _proxy_module():
    import migration_support
    return migration_support


def _main_messages():
    from fastmfd.protocol.main_channel import Msg
    return Msg


class _RecordWalker:
    """Walks a stream record by record, each sized by its own header: ``buf`` holds
    what has come and not been passed, from stream offset ``at``; ``skip`` bytes of
    the current record are still to pass."""

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip
        self.buf = bytearray()
        self.at = 0

    def _passed(self) -> bool:
        """Pass what has come of the current record; False while more is owed."""
        take = min(self.skip, len(self.buf))
        del self.buf[:take]
        self.at += take
        self.skip -= take
        return not self.skip


class MessageParser(_RecordWalker):
    """Splits one direction of the main channel into messages: ``feed(data, offset)``
    returns [(kind, stream offset of the message's first byte)] for those that start.
    ``preamble``: bytes before the first message."""

    def feed(self, data: bytes, offset: int) -> list[tuple[int, int]]:
        found = []
        if not self.buf:
            self.at = offset
        self.buf += data
        while True:
            if self.skip and not self._passed():
                return found
            if len(self.buf) < 8:
                return found
            kind, length = struct.unpack_from(">II", self.buf)
            found.append((kind, self.at))
            self.skip = 8 + length


class Framer(_RecordWalker):
    """Says what a byte of a multifd channel's stream is (RAM or device packet,
    header or payload), from the packets' own sizes."""

    def __init__(self, config: dict) -> None:
        from fastmfd import _core
        super().__init__()
        self.core = _core
        self.ram_header = _core.RamPacketCodec(config["packet_pages"]).header_size
        self.page_size = config.get("page_size", 4096)
        # The checksum extension puts a CRC after every device payload.
        self.device_trailer = _core.DEVICE_CHECKSUM_SIZE if config.get("checksum") else 0
        self.packets: list[tuple[int, int, int, str]] = []   # (start, header, payload, kind)

    def feed(self, data: bytes) -> None:
        core = self.core
        self.buf += data
        while True:
            if self.skip and not self._passed():
                return
            if len(self.buf) < 24:
                return
            flags = struct.unpack_from(">I", self.buf, 8)[0]
            if flags & core.FLAG_DEVICE_STATE:
                header = core.DEVICE_HEADER_SIZE
                if len(self.buf) < header:
                    return
                payload = struct.unpack_from(">I", self.buf, 272)[0] + self.device_trailer
                kind = "device"
            else:
                header = self.ram_header
                normal, size = struct.unpack_from(">II", self.buf, 16)
                compressed = flags & (core.FLAG_ZLIB | core.FLAG_ZSTD)
                payload = (size if compressed else normal * self.page_size) if normal else 0
                kind = "RAM" if normal else ("sync" if flags & core.FLAG_SYNC else "zero-RAM")
            self.packets.append((self.at, header, payload, kind))
            del self.packets[:-4]
            self.skip = header + payload

    def where(self, pos: int) -> str:
        for start, header, payload, kind in self.packets:
            if start <= pos < start + header:
                return f"{kind} header byte {pos - start}"
            if start + header <= pos < start + header + payload:
                return f"{kind} payload"
        if pos >= self.at and not self.skip:
            return "packet header (not yet whole)"
        return "unknown"


def make_proxy_classes(ms):
    """The proxy of tests/migration_support.py, made to survive a dead destination
    and to take faults on the way back (destination to source)."""

    class SoakFault(ms.Fault):
        """One fault on one connection (see Moment): ``mode`` is reset, cut,
        hole, swallow, back-hole, corrupt or signal (``action`` is called)."""

        def __init__(self, plan, config, action=None) -> None:
            self.plan, self.mode, self.action = plan, plan["mode"], action
            self.moment = plan["moment"]
            self.framer = Framer(config) if plan["link"] != "main" else None
            self.parser = MessageParser(8) if plan["link"] == "main" else None
            self.pos = self.moment[1] if self.moment[0] == "offset" else None
            self.where = None

        def data(self, link, data, offset):
            if self.framer is not None:
                self.framer.feed(data)
            if self.parser is not None:
                for kind, start in self.parser.feed(data, offset):
                    if (self.pos is None and self.moment[0] == "message"
                            and self.moment[1] == "out" and _msg_name(kind) == self.moment[2]):
                        self.pos = start + self.plan.get("keep", 0)
            if self.fired_at is not None or self.pos is None \
                    or offset + len(data) <= self.pos or not self.plan["armed"]():
                self._pass(link, data)
                return
            cut = max(0, self.pos - offset)
            self.fire()
            if self.mode != "signal":       # a signal is the fault, once it is delivered
                self.plan["fired"](self.fired_at)
            if self.parser is not None:
                name = self.moment[2] if self.moment[0] == "message" else None
                self.where = f"main channel{' ' + _msg_name(name) if name else ''}"
            else:
                self.where = self.framer.where(self.pos)
            mode = self.mode
            if mode == "corrupt":
                data = bytearray(data)
                data[cut] ^= self.plan["mask"]
                link.send(bytes(data))
            elif mode == "signal":
                link.send(data)
                self.action()
            elif mode == "reset":
                link.send(data[:cut])
                link._flush()
                _abort(link)
            elif mode == "cut":
                link.send(data[:cut])
                link.cut()
            elif mode in ("hole", "swallow"):
                link.send(data[:cut])
                link.stalled = mode == "hole"
                link.holding = True
                self.holding = True
            elif mode == "back-hole":
                link.send(data)
                link.back_hole = True

        def _pass(self, link, data):
            if getattr(self, "holding", False):
                return
            link.send(data)

    def _abort(link) -> None:
        """Reset both connections (RST) without waiting to forward what is held."""
        for sock in (link.client, link.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        link.close()

    class SoakProxy(ms.Proxy):
        def __init__(self, faults, *, channel_header, on_bytes, on_back) -> None:
            super().__init__(faults, channel_header=channel_header)
            self.on_bytes, self.on_back = on_bytes, on_back
            self.bytes_by_link: dict = {}

        def _accept(self, sel) -> None:
            client, _ = self._listener.accept()
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:             # the destination is gone: so is this connection
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                return
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
            link = ms.Link(self, client, upstream)
            link.back_hole = False
            link.back_parser = MessageParser(0)
            link.back_offset = 0
            self.links.append(link)
            sel.register(client, ms.selectors.EVENT_READ, (link, "client"))
            sel.register(upstream, ms.selectors.EVENT_READ, (link, "upstream"))

        def _from_client(self, link, data) -> None:
            self.on_bytes(len(data))
            link.from_client(data)
            self.bytes_by_link[link.name] = link.offset

        def _from_upstream(self, link, data) -> None:
            if link.name == "main":
                for kind, _ in link.back_parser.feed(data, link.back_offset):
                    self.on_back(link, kind)
                link.back_offset += len(data)
            if link.closed or link.back_hole:
                return
            link.client.settimeout(5)
            try:
                link.client.sendall(data)
            except OSError:
                pass
            finally:
                if not link.closed:
                    link.client.setblocking(True)

    return SoakFault, SoakProxy


def _msg_name(kind) -> str:
    try:
        return _main_messages()(kind).name
    except ValueError:
        return str(kind)


# ======================================================================== one run

FAULT_WEIGHTS = {"none": 15, "kill": 22, "stop": 17, "reset": 10, "hole": 12,
                 "truncate": 8, "corrupt": 16}
OUT_MESSAGES = ("SETUP", "ROUND_END", "SWITCHOVER_START", "COMPLETE")
BACK_MESSAGES = ("SETUP_ACK", "ROUND_ACK", "LOADED", "RESUMED")


def choose_run(seed: str, size: int, stall: float) -> dict:
    """Everything about one run, from its seed alone."""
    import fastmfd
    rng = random.Random(seed)
    fault = rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
    channels = rng.randint(1, 4)
    header = rng.random() < 0.8
    config = dict(channels=channels,
                  device_state_channels=rng.choice([0, 0, 1]) if header else 0,
                  compression=rng.choice(["none", "zlib", "zstd", "auto"]),
                  channel_header=header,
                  zero_page_detection=rng.random() < 0.9,
                  packet_pages=rng.choice([32, 128, 128]),
                  job_packets=rng.choice([1, 2, 8]),
                  max_bandwidth=rng.choice([None, None, 32 * MIB, 96 * MIB]),
                  device_chunk_size=rng.choice([64 << 10, 1 << 20]),
                  checksum=rng.random() < (0.7 if fault == "corrupt" else 0.3),
                  max_rounds=rng.randint(2, 6), downtime_limit=0.3,
                  switchover_ack=rng.random() < 0.3, config_after_ram=rng.random() < 0.3,
                  stall_timeout=stall, timeout=stall + 1.0)
    if rng.random() < 0.3:
        config["auth_key"] = rng.randbytes(32)
    fastmfd.MigrationConfig(**config)       # a bad draw fails here, not in a child
    live = rng.random() < 0.4
    pages = size // 4096
    nregions = rng.choice([1, 1, 2])
    first = pages if nregions == 1 else rng.randint(16, pages - 16)
    regions = [("ram", first * 4096)] + ([("rom", (pages - first) * 4096)] if nregions == 2
                                          else [])
    devices = []
    for j in range(rng.choice([0, 1, 1, 2, 3])):
        kind = rng.choice(["bytes", "synthetic"])
        d = {"kind": kind, "idstr": rng.choice([f"dev{j}", f"pci/0000:00:0{j}.0/nic"]),
             "instance": rng.choice([0, j, 7]), "seed": rng.randrange(1 << 30),
             "size": rng.choice([0, 1, 5000, 64 << 10, 300 << 10, 1 << 20]),
             "config": rng.randbytes(rng.choice([0, 17])) if kind == "bytes" else b""}
        if kind == "synthetic" and rng.random() < 0.5:     # initial data sent live
            d["precopy"] = rng.randint(0, d["size"])
        if any((e["idstr"], e["instance"]) == (d["idstr"], d["instance"]) for e in devices):
            continue
        d["loader"] = rng.choice(["collect", "collect", "file"]
                                 + (["verify"] if kind == "synthetic" else []))
        devices.append(d)
    total = config["channels"] + config["device_state_channels"]
    run = {"seed": seed, "fault": fault, "config": config, "live": live, "regions": regions,
           "devices": devices, "image_seed": rng.randrange(1 << 30),
           # fewer than the channels: the destination starts the others after SETUP
           "dst_workers": rng.choice([total, total, total + 1, 1]),
           "dst_stall": rng.choice([stall, None]), "user_regions": rng.random() < 0.5,
           "prealloc": rng.random() < 0.3}
    run["plan"] = _choose_fault(rng, run, size)
    return run


def _estimate(run: dict, size: int) -> dict:
    """Rough bytes each kind of connection carries, to aim offsets into the stream."""
    cfg = run["config"]
    ram = size * (0.72 if cfg["zero_page_detection"] else 1.0)
    # auto compresses only where the link is the limit (max_bandwidth on loopback)
    if cfg["compression"] in ("zlib", "zstd") or (cfg["compression"] == "auto"
                                                  and cfg["max_bandwidth"]):
        ram = size * 0.42
    if run["live"]:
        ram *= 1.3
    dev = sum(d["size"] for d in run["devices"])
    main = 700 + 200 * len(run["devices"])
    if not cfg["channel_header"]:
        main += dev
    elif not cfg["device_state_channels"]:
        ram += dev
    per_ram = ram / cfg["channels"]
    rate = cfg["max_bandwidth"] or 150 * MIB
    return {"ram": per_ram, "device": dev, "main": main, "total": ram + dev,
            "seconds": (ram + dev) / rate + 0.3}


def _choose_fault(rng: random.Random, run: dict, size: int) -> dict:
    fault, cfg = run["fault"], run["config"]
    est = _estimate(run, size)
    links = ["main"] + list(range(cfg["channels"] + cfg["device_state_channels"]))

    def offset_on(link):
        if link == "main":
            return int(rng.uniform(0, est["main"]))
        span = est["device"] if link >= cfg["channels"] else est["ram"]
        return int(rng.uniform(0, 0.9 * span))

    def link_moment(link, back_ok=False):
        if link == "main" and rng.random() < 0.6:
            if back_ok and rng.random() < 0.4:
                return ("message", "back", rng.choice(BACK_MESSAGES))
            return ("message", "out", rng.choice(OUT_MESSAGES))
        return ("offset", offset_on(link))

    if fault == "none":
        return {"mode": "none"}
    if fault in ("kill", "stop"):
        targets = ["source main"] * 2 + ["destination main"] * 2 + ["send"] * 3 \
            + ["receive"] * 3 + ["reassembly"] * 2 + ["source forkserver", "destination forkserver"]
        target = rng.choice(targets)
        if target in ("send", "receive"):
            n = cfg["channels"] + cfg["device_state_channels"]
            if target == "receive":
                n = run["dst_workers"]
            target = f"{target} channel {rng.randrange(n)}"
        how = rng.random()
        if how < 0.3:
            moment = ("time", rng.uniform(0, 0.8 * est["seconds"]))
        elif how < 0.55:
            moment = ("total", int(rng.uniform(0, 0.9 * est["total"])))
        else:
            link = rng.choice(links)
            moment = link_moment(link, back_ok=True)
            if moment[0] == "offset":
                return {"mode": "signal", "signal": fault, "target": target, "link": link,
                        "moment": moment}
            if moment[1] == "out":
                return {"mode": "signal", "signal": fault, "target": target, "link": "main",
                        "moment": moment}
        return {"mode": "signal", "signal": fault, "target": target, "link": None,
                "moment": moment}
    link = rng.choice(links)
    if fault == "reset":
        return {"mode": "reset", "link": link, "moment": link_moment(link, back_ok=True),
                "keep": rng.randint(0, 7)}
    if fault == "truncate":
        return {"mode": "cut", "link": link, "moment": link_moment(link),
                "keep": rng.randint(0, 7)}
    if fault == "hole":
        mode = rng.choice(["hole", "hole", "swallow", "back-hole"])
        if mode == "back-hole":
            link = "main"
            return {"mode": mode, "link": link, "moment": link_moment(link, back_ok=True)}
        return {"mode": mode, "link": link, "moment": link_moment(link)}
    return {"mode": "corrupt", "link": link, "moment": link_moment(link),
            "mask": 1 << rng.randrange(8), "keep": rng.randint(0, 40)}


# ------------------------------------------------------------------ processes

def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return f"{pid} [{state}] {cmd[:100]}"
    except OSError:
        return f"{pid} (gone)"


def _reap_orphans(keep: set[int]) -> None:
    """Reap zombies that were reparented to this subreaper."""
    for pid in proc_scan.os_children() - keep:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _fd_targets() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


class Child:
    """A source or destination process and its reports."""

    def __init__(self, side: str, spec: dict, log) -> None:
        self.side = side
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", side],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, cwd=ROOT, text=True)
        self.events: queue.Queue = queue.Queue()
        self.got: dict[str, dict] = {}
        self.reader = threading.Thread(target=self._read, daemon=True, name=f"soak {side}")
        self.reader.start()
        self.proc.stdin.write(base64.b64encode(pickle.dumps(spec)).decode() + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.events.put(json.loads(line[len(PREFIX):]))
        self.events.put({"event": "eof", "t": time.monotonic()})

    def wait_for(self, name: str, until: float) -> dict | None:
        """The first ``name`` event (or eof) before ``until``; None when time is up."""
        while name not in self.got and "eof" not in self.got:
            left = until - time.monotonic()
            try:
                event = (self.events.get(timeout=left) if left > 0
                         else self.events.get_nowait())
            except queue.Empty:
                return None
            self.got.setdefault(event["event"], event)
        return self.got.get(name) or self.got.get("eof")

    def go(self) -> None:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def finish(self) -> None:
        """Kill what is left of the process, reap it, close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _dump_stacks(child: "Child") -> None:
    """A hung side writes every thread's stack to the run's log (faulthandler)."""
    try:
        os.kill(child.proc.pid, signal.SIGUSR1)
    except ProcessLookupError:
        return
    time.sleep(0.5)


class Signaller:
    """Signals processes by pidfd, so a pid reused after its process ended is never hit."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def watch(self, pid: int) -> None:
        if pid and pid not in self.fds:
            try:
                self.fds[pid] = os.pidfd_open(pid)
            except OSError:
                pass

    def send(self, pid: int, sig: int) -> bool:
        fd = self.fds.get(pid)
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:
            return False

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _first_words(text: str) -> str:
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    text = re.sub(r"0xN?[0-9a-f]*", "0x..", text)
    return " ".join(text.split()[:11])


def run_once(run: dict, size: int, stall: float, logdir: str, verbose: bool) -> dict:
    import fastmfd
    from fastmfd.shm import list_segments
    ms = _proxy_module()
    SoakFault, SoakProxy = make_proxy_classes(ms)
    record = {"seed": run["seed"], "fault": run["fault"], "plan": _plan_text(run["plan"]),
              "config": _config_text(run), "problems": []}
    segments_before = set(list_segments())
    fds_before = _fd_targets()
    children_before = proc_scan.os_children()
    log_path = os.path.join(logdir, "run.log")
    log = open(log_path, "w")
    work = tempfile.mkdtemp(prefix="soak-", dir=logdir)
    signaller = Signaller()
    src_regions, dst_regions = [], []
    proxy = dst = src = timer = None
    lock = threading.Lock()
    state = {"fired": None, "armed": True, "stopped": [], "target_pid": None, "acted": None}
    try:
        for i, (name, rsize) in enumerate(run["regions"]):
            region = fastmfd.Region.create(name, rsize)
            ms.fill_pages(region.array, run["image_seed"] + i)
            src_regions.append(region)
            if run["user_regions"]:
                dst_regions.append(fastmfd.Region.create(name, rsize))
        devices = [dict(d, path=os.path.join(work, f"dev{j}.state"))
                   for j, d in enumerate(run["devices"])]
        dst = Child("destination", {
            "workers": run["dst_workers"], "timeout": stall + 1.0,
            "stall_timeout": run["dst_stall"], "auth_key": run["config"].get("auth_key"),
            "prealloc": run["prealloc"],
            "user_regions": [r.handle for r in dst_regions], "devices": devices}, log)
        ready = dst.wait_for("ready", time.monotonic() + 60)
        if not ready or ready["event"] != "ready":
            raise RuntimeError(f"the destination did not start: {ready}")
        pids = dict(ready["pids"])
        plan = run["plan"]

        def armed() -> bool:
            return state["armed"]

        def fired(at: float) -> None:
            with lock:
                if state["fired"] is None:
                    state["fired"] = at

        def act() -> None:
            """Send the plan's signal to its target (once)."""
            with lock:
                if not state["armed"] or state["acted"] is not None:
                    return
                pid = pids.get(plan["target"])
                sig = signal.SIGKILL if plan["signal"] == "kill" else signal.SIGSTOP
                state["acted"] = time.monotonic()
                state["target_pid"] = pid
                if pid is None or not signaller.send(pid, sig):
                    state["missed"] = f"{plan['target']} not running"
                    return
                if state["fired"] is None:
                    state["fired"] = time.monotonic()
                if sig == signal.SIGSTOP:
                    state["stopped"].append(pid)

        plan = dict(plan, armed=armed, fired=fired)
        faults = {}
        total = [0]
        if plan["mode"] == "signal" and plan["link"] is not None:
            faults[plan["link"]] = SoakFault(plan, run["config"], act)
        elif plan["mode"] not in ("none", "signal"):
            if plan["moment"][0] != "message" or plan["moment"][1] == "out":
                faults[plan["link"]] = SoakFault(plan, run["config"])

        def on_bytes(n: int) -> None:
            total[0] += n
            if plan["mode"] == "signal" and plan["moment"][0] == "total" \
                    and total[0] >= plan["moment"][1]:
                act()

        def on_back(link, kind) -> None:
            moment = plan.get("moment", ("none",))
            if moment[0] != "message" or moment[1] != "back" or _msg_name(kind) != moment[2]:
                return
            if not state["armed"] or state["fired"] is not None:
                return
            if plan["mode"] == "signal":
                act()
            elif plan["mode"] == "back-hole":
                fired(time.monotonic())
                link.back_hole = True
            elif plan["mode"] == "reset":
                fired(time.monotonic())
                for sock in (link.client, link.upstream):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                link.close()

        proxy = SoakProxy(faults, channel_header=run["config"]["channel_header"],
                          on_bytes=on_bytes, on_back=on_back)
        address = proxy.start(ready["address"])
        src = Child("source", {"address": address, "config": run["config"],
                               "regions": [r.handle for r in src_regions],
                               "devices": devices, "live": run["live"],
                               "seed": run["image_seed"]}, log)
        ready = src.wait_for("ready", time.monotonic() + 60)
        if not ready or ready["event"] != "ready":
            raise RuntimeError(f"the source did not start: {ready}")
        pids.update(ready["pids"])
        pids["source main"], pids["destination main"] = src.proc.pid, dst.proc.pid
        for pid in pids.values():
            signaller.watch(pid)
        record["pids"] = pids
        start = time.monotonic()
        dst.go()
        src.go()
        if plan["mode"] == "signal" and plan["moment"][0] == "time":
            timer = threading.Timer(plan["moment"][1], act)
            timer.daemon = True
            timer.start()

        # ---- wait for both sides, each within its deadline
        sides = {"source": src, "destination": dst}
        mains = {"source": "source main", "destination": "destination main"}
        outcome: dict[str, dict] = {}
        done = {"kill": "killed", "stop": "stopped"}

        # Before SETUP_ACK a side waits up to its timeout (stall + 1 s), after it stall_timeout.
        limit = max(stall, run["config"]["timeout"])

        def deadline() -> float:
            fired_at = state["fired"]
            if fired_at is None:
                return start + CONTROL_LIMIT
            return fired_at + limit + MARGIN

        def faulted_main(side: str) -> bool:
            return (plan["mode"] == "signal" and plan["target"] == mains[side]
                    and state["fired"] is not None)

        while len(outcome) < 2:
            for side, child in sides.items():
                if side in outcome:
                    continue
                if faulted_main(side):
                    # Killed: everything it said before is read by its end of file.
                    # Stopped: give what it said a moment to arrive.
                    wait = 5.0 if plan["signal"] == "kill" else 0.2
                    child.wait_for("end", time.monotonic() + wait)
                    ev = child.got.get("end")
                    outcome[side] = (dict(ev, how="end") if ev else
                                     {"how": done[plan["signal"]], "t": state["fired"]})
                    continue
                ev = child.wait_for("end", time.monotonic())
                if ev is not None:
                    outcome[side] = dict(ev, how="end" if ev["event"] == "end" else "died")
            if len(outcome) == 2:
                break
            if time.monotonic() >= deadline():
                for side in sides:
                    if side not in outcome:
                        outcome[side] = {"how": "hang", "t": None}
                        _dump_stacks(sides[side])
                break
            time.sleep(0.02)
        with lock:
            state["armed"] = False
        if timer is not None:
            timer.cancel()

        # ---- a stopped main process is resumed and must end too
        for side, child in sides.items():
            if outcome[side]["how"] == "stopped":
                signaller.send(pids[mains[side]], signal.SIGCONT)
                resumed = time.monotonic()
                ev = child.wait_for("end", resumed + limit + MARGIN)
                if ev is None:
                    outcome[side] = {"how": "hang", "t": None, "after": "SIGCONT"}
                    _dump_stacks(child)
                else:
                    outcome[side] = dict(ev, how="end" if ev["event"] == "end" else "died",
                                         resumed=resumed)
        for pid in state["stopped"]:
            signaller.send(pid, signal.SIGCONT)

        # ---- each process must exit once its call ended
        for side, child in sides.items():
            o = outcome[side]
            if o["how"] == "end":
                closed = child.wait_for("closed", time.monotonic() + CLOSE_LIMIT)
                try:
                    child.proc.wait(max(0.1, CLOSE_LIMIT - 1))
                except subprocess.TimeoutExpired:
                    record["problems"].append(f"hang: the {side} process did not exit after "
                                              f"its call ended ({closed})")
            child.finish()
        record["fired"] = state["fired"] is not None
        if state.get("missed"):
            record["missed"] = state["missed"]
        where = next((f.where for f in faults.values() if getattr(f, "where", None)), None)
        if where:
            record["where"] = where
        record["bytes"] = dict(proxy.bytes_by_link) if proxy else {}
        _judge(record, run, outcome, state, stall, src_regions, dst_regions, devices)
    except Exception as exc:
        record["problems"].append(f"harness error: {type(exc).__name__}: {exc}")
        import traceback
        traceback.print_exc()
    finally:
        for child in (src, dst):
            if child is not None:
                child.finish()
        if timer is not None:
            timer.cancel()
        for pid in state["stopped"]:
            signaller.send(pid, signal.SIGCONT)
        signaller.close()
        if proxy is not None:
            try:
                proxy.close()
            except AssertionError as exc:
                record["problems"].append(f"harness error: {exc}")
        for region in src_regions + dst_regions:
            region.close()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    _check_leaks(record, segments_before, fds_before, children_before)
    bad = [p for p in record["problems"]]
    if bad or verbose:
        with open(log_path) as f:
            record["log"] = f.read()[-30000:]
    return record


def _plan_text(plan: dict) -> str:
    mode = plan["mode"]
    if mode == "none":
        return "none"
    moment = plan["moment"]
    if moment[0] == "offset":
        when = f"at byte {moment[1]} of {_link_name(plan['link'])}"
    elif moment[0] == "message":
        when = f"at {moment[2]} ({'source->dest' if moment[1] == 'out' else 'dest->source'})"
    elif moment[0] == "total":
        when = f"after {moment[1]} bytes in all"
    else:
        when = f"{moment[1]:.3f} s after the start"
    if mode == "signal":
        return f"SIG{plan['signal'].upper()} {plan['target']} {when}"
    what = {"cut": "truncate", "hole": "black-hole (writes block)",
            "swallow": "black-hole (bytes swallowed)", "back-hole": "black-hole dest->source",
            "corrupt": f"flip bit {plan.get('mask', 0).bit_length() - 1}"}.get(mode, mode)
    return f"{what} {_link_name(plan['link'])} {when}"


def _link_name(link) -> str:
    return "main channel" if link == "main" else f"channel {link}"


def _config_text(run: dict) -> str:
    c = run["config"]
    parts = [f"ch={c['channels']}+{c['device_state_channels']}", c["compression"],
             "live" if run["live"] else "stopped",
             f"dev={len(run['devices'])}", f"regions={len(run['regions'])}"]
    if not c["channel_header"]:
        parts.append("no-header")
    if c["checksum"]:
        parts.append("checksum")
    if not c["zero_page_detection"]:
        parts.append("no-zero-detect")
    if c["max_bandwidth"]:
        parts.append(f"bw={c['max_bandwidth'] >> 20}M")
    if c.get("switchover_ack"):
        parts.append("switchover-ack")
    if c.get("config_after_ram"):
        parts.append("config-after-ram")
    if c.get("auth_key"):
        parts.append("auth")
    if run["user_regions"]:
        parts.append("dst-user-regions")
    if run.get("prealloc"):
        parts.append("prealloc")
    return " ".join(parts)


def _judge(record, run, outcome, state, stall, src_regions, dst_regions, devices) -> None:
    fired = state["fired"]
    record["sides"] = {}
    for side, o in outcome.items():
        entry = {"how": o["how"]}
        if o["how"] == "end":
            entry["ok"] = o["ok"]
            if not o["ok"]:
                entry["error"] = o["message"]
                entry["migration_error"] = o["migration_error"]
                entry["type"] = o["type"]
            if fired is not None and o.get("t") is not None:
                entry["after_fault"] = round(o["t"] - fired, 3)
        record["sides"][side] = entry
    problems = record["problems"]
    for side, entry in record["sides"].items():
        if entry["how"] == "hang":
            problems.append(f"hang: the {side} was still running "
                            f"{'after SIGCONT' if outcome[side].get('after') else 'at the deadline'}")
        elif entry["how"] == "died":
            problems.append(f"crash: the {side} process ended without a result")
        elif entry["how"] == "end" and not entry["ok"] and not entry["migration_error"]:
            problems.append(f"wrong error: the {side} raised {entry['type']}: {entry['error']}")
        elif entry["how"] == "end" and not entry["ok"] and fired is None:
            problems.append(f"unexpected failure without a fault: the {side}: {entry['error']}")
        elif entry["how"] == "end" and not entry["ok"] and fired is not None and \
                outcome[side]["t"] - fired > max(stall, run["config"]["timeout"]) + MARGIN \
                and "resumed" not in outcome[side]:
            problems.append(f"late: the {side} failed {outcome[side]['t'] - fired:.1f} s after "
                            f"the fault")
    src_ok = record["sides"]["source"].get("ok") is True
    dst_ok = record["sides"]["destination"].get("ok") is True
    verdict = None
    if src_ok or dst_ok:
        diff = _compare(outcome["destination"] if dst_ok else None, run, src_regions,
                        dst_regions, devices)
        record["data"] = diff or "equal"
        if diff and diff != "unverifiable":
            text = (f"{'source' if src_ok else ''}{' and ' if src_ok and dst_ok else ''}"
                    f"{'destination' if dst_ok else ''} succeeded, but {diff}")
            if run["fault"] == "corrupt" and not _covered(run, record.get("where", "")):
                # No check covers that byte: like TCP without TLS, the bytes arrive as
                # they were sent to the destination. A figure, not a failure.
                record["notes"] = [f"undetected corruption of unprotected bytes: {text}"]
                verdict = "undetected"
            else:
                problems.append(f"false success: {text}")
                verdict = "false success"
        elif src_ok and not dst_ok and record["sides"]["destination"]["how"] == "end":
            problems.append("false success: the source succeeded, the destination failed: "
                            + record["sides"]["destination"].get("error", ""))
            verdict = "false success"
    if verdict is None:
        if any(p.startswith("hang") for p in problems):
            verdict = "hang"
        elif src_ok and dst_ok:
            verdict = "ok"
        elif problems:
            verdict = "bad"
        elif dst_ok:
            # The destination finished (its data checked) and the source failed: a
            # reply lost or late (the last message's two-generals window).
            verdict = "split"
        elif src_ok:
            verdict = "late fault"      # the destination killed after its last word
        else:
            verdict = "failed cleanly"
    record["verdict"] = verdict


def _covered(run: dict, where: str) -> bool:
    """Whether fastmfd claims to detect a flipped byte there: checksum=True covers
    every multifd packet, header and payload, RAM and device state alike (README);
    nothing covers the channel headers, the init packets or the main channel
    without TLS."""
    return bool(run["config"]["checksum"]) and where.startswith(
        ("RAM ", "zero-RAM ", "sync ", "device ", "packet header"))


def _compare(dst_end, run, src_regions, dst_regions, devices) -> str | None:
    """None if the destination holds what the source sent, else what differs
    ("unverifiable" when the destination died and kept no copy)."""
    for i, region in enumerate(src_regions):
        if dst_regions:
            other = dst_regions[i]
            if not (region.array == other.array).all():
                pages = (region.array != other.array).reshape(-1, 4096).any(axis=1)
                return f"region {region.name} differs in {int(pages.sum())} pages"
        elif dst_end is not None:
            digest = hashlib.sha256(region.buffer).hexdigest()
            if dst_end["regions"].get(region.name) != digest:
                return f"region {region.name} differs (sha256)"
        else:
            return "unverifiable"
    for d in devices:
        expected = device_bytes(d)
        key = f"{d['idstr']}#{d['instance']}"
        if d["loader"] == "file":
            try:
                with open(d["path"], "rb") as f:
                    got = f.read()
            except FileNotFoundError:
                return f"device {key}: no state file"
            if got != expected:
                return f"device {key}: state differs ({len(got)} of {len(expected)} bytes)"
        elif dst_end is None:
            return "unverifiable"
        elif d["loader"] == "verify":
            if dst_end["devices"].get(key) != repr(len(expected)):
                return f"device {key}: verified {dst_end['devices'].get(key)}"
        elif dst_end["devices"].get(key) != hashlib.sha256(expected).hexdigest():
            return f"device {key}: state differs (sha256)"
    return None


def _check_leaks(record, segments_before, fds_before, children_before) -> None:
    from fastmfd.shm import list_segments
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        _reap_orphans(children_before)
        procs = proc_scan.os_children() - children_before
        new_segments = set(list_segments()) - segments_before
        if new_segments:
            # Another session on this machine may be making segments of its own.
            new_segments -= proc_scan.mapped_outside(new_segments,
                                                     proc_scan.process_tree(os.getpid()))
        fds = _fd_targets()
        grown = {fd: t for fd, t in fds.items() if fds_before.get(fd) != t
                 and not t.startswith("/proc/")}
        if not (procs or new_segments or grown) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    leaks = []
    if procs:
        leaks.append("processes: " + "; ".join(_describe(p) for p in sorted(procs)))
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        _reap_orphans(children_before)
    if new_segments:
        leaks.append("segments: " + ", ".join(sorted(new_segments)))
        for name in new_segments:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except FileNotFoundError:
                pass
    if grown:
        leaks.append("fds: " + ", ".join(f"{fd}->{t}" for fd, t in sorted(grown.items())))
    if leaks:
        record["leaks"] = leaks
        record["problems"].append("leak: " + " | ".join(leaks))
        if record.get("verdict") in ("ok", "failed cleanly", "late fault", "split"):
            record["verdict"] = "leak"


# ======================================================================== the summary

def summarize(records: list[dict], wall: float) -> str:
    kinds = list(FAULT_WEIGHTS)
    rows = []
    header = ("fault", "runs", "fired", "ok", "failed cleanly", "split*", "late fault*", "hangs",
              "leaks",
              "false success", "other", "undetected*", "ttf median", "ttf max")
    for kind in kinds + ["all"]:
        rs = [r for r in records if kind == "all" or r["fault"] == kind]
        if not rs:
            continue
        c = collections.Counter(r.get("verdict", "bad") for r in rs)
        hangs = sum(1 for r in rs if any(p.startswith("hang") for p in r["problems"]))
        leaks = sum(1 for r in rs if r.get("leaks"))
        false = sum(1 for r in rs if any(p.startswith("false success") for p in r["problems"]))
        other = sum(1 for r in rs if any(not p.startswith(("hang", "leak", "false success"))
                                         for p in r["problems"]))
        ttf = [e["after_fault"] for r in rs if r.get("verdict") == "failed cleanly"
               for e in r["sides"].values() if "after_fault" in e and not e.get("ok")]
        rows.append((kind, len(rs), sum(1 for r in rs if r.get("fired")), c["ok"],
                     c["failed cleanly"], c["split"], c["late fault"], hangs, leaks, false,
                     other,
                     c["undetected"], f"{statistics.median(ttf):.2f} s" if ttf else "-",
                     f"{max(ttf):.2f} s" if ttf else "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    out.append(f"\nwall time {wall / 60:.1f} min; ttf: time from the fault to a side's "
               f"MigrationError, over the cleanly failed runs' surviving sides; split: the "
               f"destination finished (its data checked) while the source failed; late fault: "
               f"the source finished, the destination was killed after its last word; "
               f"undetected*: "
               f"a flipped byte no check covers (no checksum, a channel's greeting, the main "
               f"channel without TLS) passed unnoticed")
    # the errors each fault kind produced, by their first words
    out.append("\nerrors by fault kind (first words, count):")
    for kind in kinds:
        words = collections.Counter()
        for r in records:
            if r["fault"] != kind:
                continue
            for side, e in r.get("sides", {}).items():
                if e.get("error"):
                    words[f"{side}: {_first_words(e['error'])}"] += 1
        if words:
            out.append(f"  {kind}:")
            out += [f"    {n:3d}  {w}" for w, n in words.most_common(8)]
    split = [r for r in records if r.get("verdict") == "split"]
    if split:
        out.append("\nsplit outcomes (destination ok, source failed):")
        out += [f"  run {r['seed']}: {r['plan']} [{r['config']}]: source: "
                f"{r['sides']['source'].get('error', r['sides']['source']['how'])[:100]}"
                for r in split]
    bad = [r for r in records if r["problems"]]
    if bad:
        out.append("\nproblems:")
        for r in bad:
            out.append(f"  run {r['seed']}: {r['plan']} [{r['config']}]")
            out += [f"      {p}" for p in r["problems"]]
    corrupt = [r for r in records if r["fault"] == "corrupt" and r.get("where")]
    if corrupt:
        out.append("\ncorrupted bytes: where they landed -> verdict")
        where = collections.Counter(
            (re.sub(r" byte \d+", "", r["where"]), "checksum" if "checksum" in r["config"]
             else "no checksum", r.get("verdict")) for r in corrupt)
        out += [f"  {n:3d}  {w} ({c}) -> {v}" for (w, c, v), n in sorted(where.items())]
    return "\n".join(out)


# ======================================================================== main

def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:         # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["source", "destination"], help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", default="1")
    parser.add_argument("--first", type=int, default=0, help="index of the first run")
    parser.add_argument("--size", type=_size, default=16 * MIB,
                        help="image bytes per run (default 16M)")
    parser.add_argument("--stall", type=float, default=2.0, help="stall_timeout, seconds")
    parser.add_argument("--fault", choices=list(FAULT_WEIGHTS),
                        help="only runs whose drawn fault is this kind (others are skipped)")
    parser.add_argument("--json", help="write every run's record to this file")
    parser.add_argument("--logs", help="keep the logs of runs with problems in this directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "source":
        source_child()
        return 0
    if args.role == "destination":
        destination_child()
        return 0

    _become_subreaper()
    import numpy  # noqa: F401  (warm up before the descriptor baseline)
    import fastmfd
    from fastmfd.shm import list_segments  # noqa: F401
    warm = fastmfd.Region.create("warm", 4096)      # starts this process's resource tracker
    warm.close()
    _proxy_module()
    logroot = tempfile.mkdtemp(prefix="fastmfd-soak-")
    records = []
    started = time.monotonic()
    try:
        for i in range(args.first, args.first + args.runs):
            seed = f"{args.seed}:{i}"
            run = choose_run(seed, args.size, args.stall)
            if args.fault and run["fault"] != args.fault:
                continue
            t0 = time.monotonic()
            record = run_once(run, args.size, args.stall, logroot, args.verbose)
            record["seconds"] = round(time.monotonic() - t0, 2)
            records.append(record)
            sides = " ".join(f"{s[0]}={e['how'] if e['how'] != 'end' else ('ok' if e['ok'] else 'err')}"
                             f"{'@%.2f' % e['after_fault'] if 'after_fault' in e else ''}"
                             for s, e in record.get("sides", {}).items())
            print(f"[{i:4d}] {record.get('verdict', 'bad'):14s} {record['seconds']:5.1f}s "
                  f"{record['plan']} [{record['config']}] {sides}"
                  f"{'' if record.get('fired') or run['fault'] == 'none' else ' (not fired)'}",
                  flush=True)
            for p in record["problems"]:
                print(f"         {p}", flush=True)
            if args.verbose:
                for side, e in record.get("sides", {}).items():
                    print(f"         {side}: {e}")
                if record.get("log"):
                    print(record["log"])
            if record["problems"] and args.logs:
                os.makedirs(args.logs, exist_ok=True)
                with open(os.path.join(args.logs, f"run-{i}.json"), "w") as f:
                    json.dump(record, f, indent=1, default=str)
    finally:
        shutil.rmtree(logroot, ignore_errors=True)
    wall = time.monotonic() - started
    print()
    print(f"fastmfd soak: seed {args.seed}, runs {args.first}..{args.first + args.runs - 1}, "
          f"size {args.size >> 20} MiB, stall_timeout {args.stall:g} s, deadline stall + "
          f"{MARGIN:g} s after the fault")
    print(summarize(records, wall))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
    failed = any(r["problems"] for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
