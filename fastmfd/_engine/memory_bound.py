"""``max_memory``, spent part by part: what a receiving side (a Destination at
SETUP, a QEMU receiver as QEMU's channels connect) lets a session make it hold
beside its regions, and the one refusal when a part does not fit.

::

    MemoryBudget(max_memory, "this destination", spent=[(regions, "regions")])
      .spend(channel buffers, ...)      each part checked beside those spent before it,
      .spend(worker processes, ...)     refused (ConfigError) naming them all
      .left                             what is left (the device-state pool's share)

A worker process's own memory is counted as WORKER_BYTES each (below): what it
allocates for its channel (its buffers, a zstd window) is counted apart, by the
caller, and the regions it maps are the regions'.
"""

from __future__ import annotations

from .. import _core
from ..errors import ConfigError

__all__ = ["MemoryBudget", "WORKER_BYTES", "check_qemu_channels", "qemu_greeting_refusal"]

# A receive worker (or the reassembly process) is forked from the forkserver, with
# Python, numpy and the core imported (about 22 MiB, shared copy-on-write). Measured
# (/proc/PID/smaps, Private_* of every mapping but shared memory, plus page tables):
# 3.2 MiB idle, 4.8 after a session, 7.7 after one in TLS with zstd (Pss 6.8, 8.4 and
# 11.6 with 4 workers); a full garbage collection in a forked child made 8.2 MiB more of
# the shared heap its own. 16 MiB bounds both; all 22 MiB made private would be 24.
WORKER_BYTES = 16 << 20


class MemoryBudget:
    """``budget`` bytes (max_memory) that ``holder`` ("this destination") holds at
    most; ``spent``: (bytes, what) counted already, in order."""

    def __init__(self, budget: int, holder: str,
                 spent: list[tuple[int, str]] | None = None) -> None:
        self.budget, self.holder = budget, holder
        self.spent = list(spent or [])

    @property
    def left(self) -> int:
        return self.budget - sum(amount for amount, _ in self.spent)

    def spend(self, amount: int, what: str, claim: str) -> None:
        """Count ``amount`` bytes of ``what`` ("receive buffers"), or refuse them:
        ``claim`` says who needs them and why ("the source's 3 channel(s) need N
        bytes of receive buffers (...)"), the error adds what was spent before."""
        if amount > self.left:
            besides = " and ".join(f"{n} bytes of {w}" for n, w in self.spent)
            besides = f", besides {besides}" if besides else ""
            raise ConfigError(f"{claim}{besides}; {self.holder} holds at most {self.budget} "
                              f"(max_memory)")
        self.spent.append((amount, what))


def check_qemu_channels(budget: int, channels: int, workers: int, packet_bytes: int,
                        page_size: int, tls: bool, counted: str = "so far") -> None:
    """A QEMU receiver's ``channels`` learnt so far (each as its init packet is read;
    ``counted`` says which, in the error) and its ``workers`` processes alive (one a
    channel, those started ahead, in TLS those greeting and the main channel's
    relay) must fit in ``budget`` (max_memory). Each channel's buffers are counted
    as zstd's: its method is learnt only from its first page, later, and a zstd
    decoder may hold a window of up to 32 MiB (QEMU's level 20). Not the block
    files: max_size and the disk bound those."""
    each = _core.receive_channel_bytes(packet_bytes // page_size, page_size, 1 << 62, 0, False,
                                       "zstd", tls)
    memory = MemoryBudget(budget, "this receiver")
    claim = f"QEMU's {channels} multifd channel(s) {counted} need"
    memory.spend(channels * each, "receive buffers", (
        f"{claim} {channels * each} bytes of receive buffers ({packet_bytes >> 10} KiB "
        f"packets, and a zstd window of up to 32 MiB each: a channel's compression is "
        f"learnt from its first page)"))
    memory.spend(workers * WORKER_BYTES, "worker processes", (
        f"{claim} {workers} worker processes (a receive worker per channel, and those started "
        f"ahead{' or greeting connections' if tls else ''}), {WORKER_BYTES >> 20} MiB each: "
        f"{workers * WORKER_BYTES} bytes"))


def qemu_greeting_refusal(budget: int, channels: int, workers: int, packet_bytes: int,
                          page_size: int) -> str | None:
    """Why a QEMU receiver in TLS may not greet one more connection (None: it may):
    ``channels`` (QEMU's so far, and each connection being greeted, this one too:
    any may be one, but the main channel) and ``workers`` processes (this one's
    too, unless an idle one greets it) do not fit in ``budget``, counted as
    :func:`check_qemu_channels` counts them. A channel greeted is then counted as
    before, so it fits: strangers' greetings never leave one of QEMU's channels
    over the bound."""
    try:
        check_qemu_channels(budget, channels, workers, packet_bytes, page_size, True,
                            "so far, with one more to greet,")
    except ConfigError as exc:
        return str(exc)
    return None
