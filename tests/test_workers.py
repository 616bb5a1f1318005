"""WorkerSet: the one owner of a group of worker processes."""

from __future__ import annotations


from fastmfd.workers import WorkerSet, recv_worker_main


def test_stop_lets_every_idle_worker_exit_by_itself():
    # Idle workers exit when told to; stop() must wait for all of them, not kill
    # the slower ones once the first has gone.
    workers = WorkerSet(recv_worker_main, [f"receive channel {i}" for i in range(4)])
    workers.stop(timeout=30)
    assert [w.process.exitcode for w in workers] == [0, 0, 0, 0]
