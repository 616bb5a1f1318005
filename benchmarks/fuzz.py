#!/usr/bin/env python
"""Fuzz fastmfd: mutated packets and SETUPs against its decoders and a live destination.

::

    python benchmarks/fuzz.py --packets 1000000 --setups 200000 --live 2000 --seed 1

Not part of the unit suite (pytest does not collect it): a campaign of minutes.

- ``--packets N`` mutated binary inputs to the decoders, in worker processes
  (``--jobs``), so a segfault is counted, not fatal: RAM packet headers under
  ten session geometries (``_core.RamPacketCodec``), device-state and chunk
  headers, init packets, channel headers, main-channel message headers,
  zlib/zstd payload streams, the QEMU main channel (``protocol.qemu``) and
  whole captures through ``fastmfd inspect``'s reader (the real QEMU 7.2 and
  10.0 captures in shared/data beside the checkout, read only, captures
  fastmfd's encoders make, and real sessions recorded, ``_fuzz_sessions.py``:
  a shared key, the old way with checksums, checksums with a device-state
  channel; with and without the main channel; some read with the options a user
  may give wrongly: --checksum, --packet-pages, --layout);
- ``--setups N`` mutated SETUPs (``Setup.decode`` strict and lenient),
  main-channel payloads of every message type (``decode_payload``), ``bench
  --link`` texts (``parse_link``, ``LinkSpec.same``) and the bounded reprs of
  results, statistics and any value a loader may return (``reprs.py``);
- ``--live N`` connections to real ``fastmfd.Destination`` s on loopback:
  mutated greetings, SETUPs, hellos and packet streams into guarded regions
  (see ``_fuzz_live.py``).

Mutations: bit flips, byte replacement, truncation, extension, insertion,
splices, and field-aware ones that put boundary values (0, 1, 2**31-1,
2**32-1, 2**63, 2**64-1 and neighbours) into length, count, offset and flag
fields (``_fuzz_mutate.py``). Every case is determined by ``--seed``, its
target, batch and index: ``--replay TARGET:BATCH:INDEX`` runs one again here
(``--replay live:SEED:N`` one live session).

The summary counts per target: cases, accepted, refused with a FastMFDError,
crashes (a worker killed by a signal), hangs, and everything else raised (one
example each). The exit status is 1 if any case crashed, hung or raised
anything but a FastMFDError (oracle failures included), else 0.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import math
import multiprocessing
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastmfd._engine.processes import describe_exit  # noqa: E402

HANG_SECONDS = 60.0         # one case (made and run) that long is a hang
MAX_EXAMPLES = 3
MAX_CRASHES = 20          # per target: then its remaining cases are skipped


# ---------------------------------------------------------------- results

@dataclass
class Finding:
    count: int = 0
    examples: list = field(default_factory=list)    # (case id, message, traceback tail)


@dataclass
class Tally:
    cases: int = 0
    accepted: int = 0
    refused: int = 0            # a FastMFDError
    seconds: float = 0.0
    crashes: list = field(default_factory=list)     # (case id, how)
    hangs: list = field(default_factory=list)
    bad: dict = field(default_factory=dict)         # exception type -> Finding

    def add_bad(self, kind: str, case_id: str, detail: tuple[str, str] | None) -> None:
        """One case that raised ``kind``; ``detail``: its (message, traceback tail),
        if the worker sent them (the first few of each kind in a batch)."""
        finding = self.bad.setdefault(kind, Finding())
        finding.count += 1
        if detail is not None and len(finding.examples) < MAX_EXAMPLES:
            finding.examples.append((case_id, *detail))

    def add_batch(self, progress: "Progress", cases: int) -> None:
        """The outcomes a worker kept in ``progress`` of ``cases`` cases (those that
        raised anything else were counted as they came)."""
        self.cases += cases
        self.accepted += progress.accepted
        self.refused += progress.refused
        self.seconds += progress.cpu

    @property
    def bad_count(self) -> int:
        return sum(f.count for f in self.bad.values())


def case_id(name: str, batch: int, index: int) -> str:
    return f"{name}:{batch}:{index}"


def batch_rng(seed: int, name: str, batch: int) -> random.Random:
    return random.Random(f"{seed}/{name}/{batch}")


# ---------------------------------------------------------------- the worker

BUILDING = -1       # Progress.index while the seeds are built: no case yet
WAITING = -2        # while the worker has not taken its batch yet


class Progress(ctypes.Structure):
    """Where a worker's batch is, in shared memory: what the parent judges a hang
    by, and what it counts of a batch whose worker died before it reported. The
    worker writes it, but for :meth:`given`, which the parent calls while the
    worker waits for its next batch."""
    _fields_ = [("index", ctypes.c_int64),      # the case made or run (or BUILDING, WAITING)
                ("since", ctypes.c_double),     # when it began: time.monotonic(), one clock
                                                # for every process
                ("making", ctypes.c_bool),      # it is still being made
                ("accepted", ctypes.c_int64),   # the outcomes of the batch's cases so far
                ("refused", ctypes.c_int64),
                ("cpu", ctypes.c_double)]       # the CPU seconds they took

    def given(self) -> None:
        """A new batch: no outcome yet, and no clock until the worker takes it (a
        fresh worker imports fastmfd first, which is no case's time)."""
        self.index, self.since, self.making = WAITING, math.inf, False
        self.accepted = self.refused = 0
        self.cpu = 0.0

    def at(self, index: int) -> None:
        self.index, self.since, self.making = index, time.monotonic(), True


def run_batch(targets, states, task, progress: Progress, report) -> tuple:
    """Run cases ``start..count-1`` of one batch, keeping ``progress`` and calling
    ``report(("bad", kind, case id, detail))`` at once for a case that raised
    anything but a FastMFDError (a worker that dies later in the batch loses no
    finding); returns ``("done",)``, or ``("error", why)`` if the harness failed."""
    from fastmfd.errors import FastMFDError
    name, batch, start, count, seed = task
    target = targets[name]
    if name not in states:
        progress.at(BUILDING)
        try:
            states[name] = target.build()
        except Exception:
            return ("error", f"building the seeds of {name!r} failed:\n"
                             f"{traceback.format_exc()}")
    state = states[name]
    rng = batch_rng(seed, name, batch)
    detailed: dict[str, int] = {}       # exception kind -> cases sent with their detail
    began = time.process_time()
    for index in range(count):
        # A case is timed from the start of its making: a make that hangs is its own
        # case's hang, and a slow one never counts to the case before. The cases
        # before start (run by a worker that died) are made again only to reach it.
        progress.at(max(index, start))
        try:
            case = target.make(rng, state)
        except Exception:
            return ("error", f"making case {case_id(name, batch, index)} failed:\n"
                             f"{traceback.format_exc()}")
        if index < start:
            continue
        progress.making = False
        try:
            target.run(state, case)
        except FastMFDError:
            progress.refused += 1
        except Exception as exc:        # noqa: BLE001 - this is what the fuzzer looks for
            kind = type(exc).__name__
            detail = None
            if detailed.get(kind, 0) < MAX_EXAMPLES:
                detailed[kind] = detailed.get(kind, 0) + 1
                tail = "".join(traceback.format_exception(exc)[-4:])
                detail = (str(exc)[:300], tail[-1500:])
            report(("bad", kind, case_id(name, batch, index), detail))
        else:
            progress.accepted += 1
        progress.cpu = time.process_time() - began
    return ("done",)


def worker_main(conn, progress: Progress, targets: str) -> None:
    import logging
    logging.getLogger("fastmfd").setLevel(logging.CRITICAL)
    found = importlib.import_module(targets).TARGETS
    states: dict = {}
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(run_batch(found, states, task, progress, conn.send))


class Worker:
    def __init__(self, ctx, targets: str) -> None:
        self.progress = ctx.Value(Progress, lock=False)
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(theirs, self.progress, targets),
                                   daemon=True, name="fuzz worker")
        self.process.start()
        theirs.close()
        self.task = None

    def give(self, task) -> None:
        self.task = task
        self.progress.given()
        self.conn.send(task)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def plan(counts: dict[str, int], targets) -> list[tuple]:
    """Batches of every target, interleaved so each target progresses all along."""
    per_target = []
    for name, total in counts.items():
        size = targets[name].batch
        per_target.append([(name, b, 0, min(size, total - b * size))
                           for b in range((total + size - 1) // size)])
    tasks = []
    while any(per_target):
        for batches in per_target:
            if batches:
                tasks.append(batches.pop(0))
    return tasks


class Campaign:
    """The in-process cases of a run, in ``jobs`` worker processes. A worker that
    dies (a crash) or makes no progress for ``hang_seconds`` (a hang: it is
    killed) is replaced, the case it was at is recorded once, and its batch goes
    on with the next case in the new worker; the cases before it are counted
    from what the dead worker kept in its Progress. ``targets``: the module
    whose TARGETS the workers run."""

    def __init__(self, counts: dict[str, int], seed: int, jobs: int, log,
                 targets: str = "_fuzz_targets", hang_seconds: float = HANG_SECONDS) -> None:
        self.tallies = {name: Tally() for name in counts}
        self.tasks = [(*t, seed) for t in plan(counts, importlib.import_module(targets).TARGETS)]
        self.total = sum(counts.values())
        self.done_cases = 0
        self.jobs, self.log, self.hang_seconds, self._targets = jobs, log, hang_seconds, targets
        self._ctx = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []

    def run(self) -> dict[str, Tally]:
        last_report = started = time.monotonic()
        try:
            self.workers = [Worker(self._ctx, self._targets) for _ in range(self.jobs)]
            while self.tasks or any(w.task for w in self.workers):
                for worker in self.workers:
                    if worker.task is None and self.tasks:
                        worker.give(self.tasks.pop(0))
                busy = [w for w in self.workers if w.task is not None]
                waitables = {w.conn: w for w in busy} | {w.process.sentinel: w for w in busy}
                for item in connection.wait(list(waitables),
                                            timeout=min(5.0, self.hang_seconds / 4)):
                    worker = waitables[item]
                    if worker.task is None:
                        continue
                    if item is worker.conn:
                        try:
                            self._take(worker, worker.conn.recv())
                        except (EOFError, OSError):
                            pass            # it died: its sentinel says so
                        continue
                    worker.process.join()
                    self._lost(worker, describe_exit(worker.process.exitcode), crashed=True)
                now = time.monotonic()
                for worker in busy:
                    if worker.task is not None and \
                            now - worker.progress.since > self.hang_seconds:
                        worker.process.kill()
                        worker.process.join()
                        self._lost(worker, f"made no progress for {self.hang_seconds:g} s",
                                   crashed=False)
                if now - last_report > 15:
                    last_report = now
                    bad = sum(t.bad_count + len(t.crashes) + len(t.hangs)
                              for t in self.tallies.values())
                    self.log(f"  {self.done_cases}/{self.total} cases, {now - started:.0f} s, "
                             f"findings {bad}")
        finally:
            for worker in self.workers:
                worker.stop()
        return self.tallies

    def _take(self, worker: Worker, message: tuple) -> None:
        """A message from ``worker`` (see run_batch)."""
        name, _, start, count, _ = worker.task
        if message[0] == "error":
            raise SystemExit(f"fuzz.py: {message[1]}")
        if message[0] == "bad":
            self.tallies[name].add_bad(*message[1:])
            return
        self.tallies[name].add_batch(worker.progress, count - start)
        self.done_cases += count - start
        worker.task = None

    def _lost(self, worker: Worker, how: str, crashed: bool) -> None:
        """``worker`` died, or hung and was killed (``how``), at the case its
        Progress names: record that case once, count it and the batch's cases
        before it, and go on with the next case in a new worker."""
        while True:         # what it sent before it died: findings, or its batch's end
            try:
                if worker.task is None or not worker.conn.poll():
                    break
                self._take(worker, worker.conn.recv())
            except (EOFError, OSError):
                break
        self.workers[self.workers.index(worker)] = Worker(self._ctx, self._targets)
        worker.conn.close()
        task, worker.task = worker.task, None
        if task is None:
            return          # it had ended its batch: nothing was lost
        name, batch, start, count, seed = task
        index, making = worker.progress.index, worker.progress.making
        if index < 0:
            raise SystemExit(f"fuzz.py: a worker {how} "
                             + (f"building the seeds of {name!r}" if index == BUILDING
                                else "before it took a batch"))
        cid = case_id(name, batch, index)
        if making:
            how += " making the case"
        found = self.tallies[name]
        (found.crashes if crashed else found.hangs).append((cid, how))
        self.log(f"{'CRASH' if crashed else 'HANG'} {cid}: the worker {how}")
        found.add_batch(worker.progress, index - start + 1)
        self.done_cases += index - start + 1
        if len(found.crashes) >= MAX_CRASHES:
            self.log(f"{name}: {MAX_CRASHES} crashes, its remaining cases are skipped")
            self.tasks = [t for t in self.tasks if t[0] != name]
        elif making and index + 1 < count:
            # A batch's cases are made in turn from one generator: the next ones
            # cannot be made without this one.
            self.log(f"{name}: cases {index + 1}..{count - 1} of batch {batch} skipped")
        elif index + 1 < count:
            self.tasks.insert(0, (name, batch, index + 1, count, seed))


def split(total: int, group: str) -> dict[str, int]:
    """``total`` cases over the targets of ``group`` by weight."""
    from _fuzz_targets import TARGETS
    chosen = [t for t in TARGETS.values() if t.group == group]
    weight = sum(t.weight for t in chosen)
    counts = {t.name: int(total * t.weight / weight) for t in chosen}
    if chosen:
        counts[chosen[0].name] += total - sum(counts.values())
    return {name: n for name, n in counts.items() if n > 0}


# ---------------------------------------------------------------- report

def print_table(rows: list[tuple], out=sys.stdout) -> None:
    headers = ("target", "cases", "accepted", "FastMFDError", "crashes", "hangs",
               "other exceptions", "cases/s")
    cells = [headers] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths))) + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def tally_rows(tallies: dict[str, Tally]) -> list[tuple]:
    rows = []
    for name, t in tallies.items():
        rate = f"{t.cases / t.seconds:,.0f}" if t.seconds else "-"
        rows.append((name, t.cases, t.accepted, t.refused, len(t.crashes), len(t.hangs),
                     t.bad_count, rate))
    return rows


def print_findings(tallies: dict[str, Tally], out=sys.stdout) -> None:
    for name, t in tallies.items():
        for cid, how in t.crashes:
            out.write(f"\nCRASH {cid}: the worker {how}\n")
        for cid, how in t.hangs:
            out.write(f"\nHANG {cid}: the worker {how}\n")
        for kind, finding in t.bad.items():
            out.write(f"\n{name}: {kind} x{finding.count}\n")
            for cid, message, tb in finding.examples[:1]:
                out.write(f"  e.g. {cid}: {message}\n")
                out.write("    " + tb.strip().replace("\n", "\n    ") + "\n")


def replay(spec: str, seed: int) -> int:
    """Run one case again in this process, printing what it was and what it raised."""
    if spec.startswith("live:"):
        from _fuzz_live import replay_session
        return replay_session(spec)
    from _fuzz_targets import TARGETS
    name, batch, index = spec.rsplit(":", 2)
    target = TARGETS[name]
    state = target.build()
    rng = batch_rng(seed, name, int(batch))
    for _ in range(int(index)):
        target.make(rng, state)
    case = target.make(rng, state)
    shown = case if not isinstance(case, (bytes, bytearray)) else case.hex()
    print(f"case {spec} (seed {seed}): {str(shown)[:2000]}")
    target.run(state, case)
    print("no exception")
    return 0


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=100_000,
                        help="mutated binary inputs to the decoders")
    parser.add_argument("--setups", type=int, default=20_000,
                        help="mutated SETUPs and main-channel payloads")
    parser.add_argument("--live", type=int, default=200,
                        help="mutated connections to live destinations")
    parser.add_argument("--live-seconds", type=float, default=None,
                        help="stop the live part after this long (even before --live cases)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="decoder worker processes")
    parser.add_argument("--targets", default=None,
                        help="comma-separated substrings: run only the matching targets")
    parser.add_argument("--replay", metavar="TARGET:BATCH:INDEX", default=None,
                        help="run one in-process case again, here (live:SEED:SESSION: one "
                             "live session)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the summary as JSON")
    args = parser.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.seed)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    began = time.monotonic()
    counts = {**split(args.packets, "packets"), **split(args.setups, "setups")}
    if args.targets:
        wanted = args.targets.split(",")
        counts = {n: c for n, c in counts.items() if any(w in n for w in wanted)}
    log(f"fuzz: seed {args.seed}, {sum(counts.values())} in-process cases over "
        f"{len(counts)} targets, {args.jobs} workers")
    tallies = Campaign(counts, args.seed, args.jobs, log).run() if counts else {}
    in_process = time.monotonic() - began

    live = None
    if args.live > 0:
        from _fuzz_live import run_live
        log(f"live: up to {args.live} cases against real destinations")
        live = run_live(args.live, args.seed, args.live_seconds, log)

    print(f"\nfastmfd fuzz, seed {args.seed}: "
          f"python benchmarks/fuzz.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"in-process decoders ({args.jobs} worker processes, {in_process:.0f} s wall; "
          "cases/s per worker CPU second):\n")
    rows = tally_rows(tallies)
    total = Tally()
    for t in tallies.values():
        total.cases += t.cases
        total.accepted += t.accepted
        total.refused += t.refused
        total.seconds += t.seconds
        total.crashes += t.crashes
        total.hangs += t.hangs
        for kind, f in t.bad.items():
            total.bad.setdefault(kind, Finding()).count += f.count
    rows.append(("TOTAL in-process", *tally_rows({"": total})[0][1:]))
    print_table(rows)
    print_findings(tallies)
    failed = bool(total.crashes or total.hangs or total.bad_count)
    if live is not None:
        print(f"\nlive destinations ({live.sessions} Destinations, {live.wall:.0f} s wall; "
              "cases/s per wall second):\n")
        print_table(live.rows())
        live.print_findings()
        failed = failed or live.failed
    if args.json:
        Path(args.json).write_text(json.dumps({
            "seed": args.seed, "argv": argv if argv is not None else sys.argv[1:],
            "in_process": {n: {"cases": t.cases, "accepted": t.accepted,
                               "refused": t.refused, "crashes": t.crashes, "hangs": t.hangs,
                               "other": {k: [f.count, f.examples] for k, f in t.bad.items()},
                               "cpu_seconds": t.seconds} for n, t in tallies.items()},
            "live": live.as_json() if live is not None else None}, indent=1))
    print(f"\n{'FAILED' if failed else 'OK'}: {total.cases} in-process cases"
          + (f", {live.cases} live cases" if live is not None else "")
          + f", {time.monotonic() - began:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
