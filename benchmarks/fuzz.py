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
  10.0 captures in shared/data beside the checkout, read only, and captures
  fastmfd's encoders make);
- ``--setups N`` mutated SETUPs (``Setup.decode`` strict and lenient) and
  main-channel payloads of every message type (``decode_payload``);
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
import json
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

HANG_SECONDS = 60.0         # one case that long is a hang
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

    def add_bad(self, kind: str, case_id: str, message: str, tb: str) -> None:
        finding = self.bad.setdefault(kind, Finding())
        finding.count += 1
        if len(finding.examples) < MAX_EXAMPLES:
            finding.examples.append((case_id, message, tb))

    def merge(self, other: dict) -> None:
        self.cases += other["cases"]
        self.accepted += other["accepted"]
        self.refused += other["refused"]
        self.seconds += other["seconds"]
        for kind, (count, examples) in other["bad"].items():
            finding = self.bad.setdefault(kind, Finding())
            finding.count += count
            finding.examples += examples[:MAX_EXAMPLES - len(finding.examples)]

    @property
    def bad_count(self) -> int:
        return sum(f.count for f in self.bad.values())


def case_id(name: str, batch: int, index: int) -> str:
    return f"{name}:{batch}:{index}"


def batch_rng(seed: int, name: str, batch: int) -> random.Random:
    return random.Random(f"{seed}/{name}/{batch}")


# ---------------------------------------------------------------- the worker

def run_batch(targets, states, task, progress=None) -> dict:
    """Run cases ``start..count-1`` of one batch; returns the tally as a dict."""
    from fastmfd.errors import FastMFDError
    name, batch, start, count, seed = task
    target = targets[name]
    if name not in states:
        if progress is not None:
            progress[0] = -1                # building: not a case
        try:
            states[name] = target.build()
        except Exception:
            return {"error": f"building the seeds of {name!r} failed:\n"
                             f"{traceback.format_exc()}"}
    state = states[name]
    if progress is not None:
        progress[0] = start
    rng = batch_rng(seed, name, batch)
    out = {"cases": 0, "accepted": 0, "refused": 0, "seconds": 0.0, "bad": {}}
    began = time.process_time()
    for index in range(count):
        try:
            case = target.make(rng, state)
        except Exception:
            return {"error": f"making case {case_id(name, batch, index)} failed:\n"
                             f"{traceback.format_exc()}"}
        if index < start:
            continue
        if progress is not None:
            progress[0] = index
            progress[1] = int(time.monotonic())
        out["cases"] += 1
        try:
            target.run(state, case)
        except FastMFDError:
            out["refused"] += 1
        except Exception as exc:        # noqa: BLE001 - this is what the fuzzer looks for
            kind = type(exc).__name__
            count_, examples = out["bad"].setdefault(kind, [0, []])
            out["bad"][kind][0] = count_ + 1
            if len(examples) < MAX_EXAMPLES:
                tail = "".join(traceback.format_exception(exc)[-4:])
                examples.append((case_id(name, batch, index), str(exc)[:300], tail[-1500:]))
        else:
            out["accepted"] += 1
    out["seconds"] = time.process_time() - began
    return out


def worker_main(conn, progress) -> None:
    import logging
    logging.getLogger("fastmfd").setLevel(logging.CRITICAL)
    from _fuzz_targets import TARGETS
    states: dict = {}
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(run_batch(TARGETS, states, task, progress))


class Worker:
    def __init__(self, ctx) -> None:
        self.progress = ctx.Array("q", 2, lock=False)
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(theirs, self.progress),
                                   daemon=True, name="fuzz worker")
        self.process.start()
        theirs.close()
        self.task = None

    def give(self, task) -> None:
        self.task = task
        self.progress[0] = task[2]
        self.progress[1] = int(time.monotonic())
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


def run_in_workers(counts: dict[str, int], seed: int, jobs: int, log) -> dict[str, Tally]:
    from _fuzz_targets import TARGETS
    tallies = {name: Tally() for name in counts}
    tasks = [(*t, seed) for t in plan(counts, TARGETS)]
    total = sum(counts.values())
    ctx = multiprocessing.get_context("spawn")
    workers = [Worker(ctx) for _ in range(jobs)]
    done_cases = 0
    last_report = time.monotonic()
    started = time.monotonic()
    try:
        while tasks or any(w.task for w in workers):
            for worker in workers:
                if worker.task is None and tasks:
                    worker.give(tasks.pop(0))
            busy = [w for w in workers if w.task is not None]
            waitables = {w.conn: w for w in busy} | {w.process.sentinel: w for w in busy}
            ready = connection.wait(list(waitables), timeout=5.0)
            for item in ready:
                worker = waitables[item]
                if worker.task is None:
                    continue
                name, batch, start, count, _ = worker.task
                if item is worker.conn:
                    try:
                        result = worker.conn.recv()
                    except (EOFError, OSError):
                        continue            # it died: its sentinel says so
                    if "error" in result:
                        raise SystemExit(f"fuzz.py: {result['error']}")
                    tallies[name].merge(result)
                    done_cases += result["cases"]
                    worker.task = None
                    continue
                # The worker died mid-batch: a crash at the case it was running.
                worker.process.join()
                index = worker.progress[0]
                how = describe_exit(worker.process.exitcode)
                if index < 0:
                    raise SystemExit(f"fuzz.py: a worker {how} building the seeds of {name!r}")
                tallies[name].crashes.append((case_id(name, batch, index), how))
                tallies[name].cases += index - start + 1
                done_cases += index - start + 1
                log(f"CRASH {case_id(name, batch, index)}: the worker {how}")
                workers[workers.index(worker)] = Worker(ctx)
                worker.conn.close()
                if len(tallies[name].crashes) >= MAX_CRASHES:
                    log(f"{name}: {MAX_CRASHES} crashes, its remaining cases are skipped")
                    tasks = [t for t in tasks if t[0] != name]
                elif index + 1 < count:
                    tasks.insert(0, (name, batch, index + 1, count, seed))
            now = time.monotonic()
            for i, worker in enumerate(workers):
                if worker.task is not None and now - worker.progress[1] > HANG_SECONDS:
                    name, batch, start, count, _ = worker.task
                    index = worker.progress[0]
                    tallies[name].hangs.append((case_id(name, batch, index),
                                                f"no progress for {HANG_SECONDS:g} s"))
                    log(f"HANG {case_id(name, batch, index)}")
                    worker.process.kill()
                    worker.process.join()
                    worker.conn.close()
                    workers[i] = Worker(ctx)
                    if index + 1 < count:
                        tasks.insert(0, (name, batch, index + 1, count, seed))
            if now - last_report > 15:
                last_report = now
                bad = sum(t.bad_count + len(t.crashes) + len(t.hangs) for t in tallies.values())
                log(f"  {done_cases}/{total} cases, {now - started:.0f} s, findings {bad}")
    finally:
        for worker in workers:
            worker.stop()
    return tallies


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
            out.write(f"\nHANG {cid}: {how}\n")
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
    tallies = run_in_workers(counts, args.seed, args.jobs, log) if counts else {}
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
