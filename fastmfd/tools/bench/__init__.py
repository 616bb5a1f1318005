"""Compare channel and compression settings, and peers: ``fastmfd bench``.

Every way of moving an image is a *trial* with the same three steps, so the
command and the pytest-benchmark suite (``benchmarks/``) time exactly the
same thing::

    trial = make_trial(setting, image)   processes started, connections made (not timed)
    measurement = trial.run()            the timed part: the whole transfer
    trial.finish()                       destination == source checked, everything freed
                                         (trial.close() frees without checking)

    bench matrix: for each repeat ─▶ for each setting ─▶ one trial
      (repeats are the outer loop, so drift on a busy machine hits every setting alike)
                      │
                      ▼
    Result per setting (best and median time) ─▶ rich table + throughput bar chart, JSON

Methods: ``fastmfd`` (this library, ``migrate(live=False)``), ``sendall``
(one plain socket between two processes) and ``qemu`` (a real QEMU multifd
migration of a paused guest whose RAM is the image).

Modules, each importing only those listed before it::

    trial          Measurement, the Trial steps, wait_until_idle
    fastmfd_trial  FastmfdTrial: fastmfd over loopback TCP
    peers          SendallTrial, QemuTrial (and its QMP client), find_qemu
    matrix         Setting, Result, make_trial, run_once, run_matrix
    output         render: the table and the bar chart
    command        the ``fastmfd bench`` arguments and cli_main
"""
