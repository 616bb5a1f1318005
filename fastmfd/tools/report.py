"""Human-readable summaries of a migration, shared by the commands."""

from __future__ import annotations

from rich.table import Table

from ..stats import MigrationStats
from ..units import format_bytes, format_rate

__all__ = ["stats_table"]


def stats_table(stats: MigrationStats, *, channels: str, downtime_limit: float | None = None,
                verdict: str | None = None) -> Table:
    """The source's view of a finished migration as a two-column table."""
    table = Table(show_header=False, box=None)
    table.add_row("channels", channels)
    table.add_row("total time", f"{stats.total_time_s * 1000:.0f} ms "
                  f"(setup {stats.setup_time_s * 1000:.0f} ms)")
    table.add_row("throughput", f"{format_rate(stats.throughput_bytes_per_s)} of memory")
    table.add_row("rounds", f"{stats.rounds} ("
                  + ", ".join(str(r.pages) for r in stats.round_stats) + " pages)")
    table.add_row("pages", f"{stats.normal_pages} with data, {stats.zero_pages} zero "
                  "(sent as offsets only)")
    if stats.device_chunks:
        table.add_row("device state", f"{format_bytes(stats.device_bytes)} in "
                      f"{stats.device_chunks} chunks")
    table.add_row("wire bytes", f"{format_bytes(stats.wire_bytes)} for "
                  f"{format_bytes(stats.ram_bytes)} of memory")
    if stats.compression != "none":
        payloads = stats.compressed_payloads + stats.raw_payloads
        table.add_row("compressed", f"{stats.compressed_payloads} of {payloads} payloads "
                      f"({stats.compression})")
    limit = f" (limit {downtime_limit * 1000:.0f} ms)" if downtime_limit is not None else ""
    table.add_row("downtime", f"{stats.downtime_s * 1000:.0f} ms{limit}")
    if verdict is not None:
        table.add_row("destination", verdict)
    return table
