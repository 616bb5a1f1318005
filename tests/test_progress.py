"""``migrate(progress=True)``'s bar counts the pages the workers completed (the
shared counters), not the pages handed to them: a round is handed out long
before its pages are on the wire, and the bar showed 192 GB/s (issue #11). It
is drawn on stderr, in binary units."""

from __future__ import annotations

from fastmfd._engine.progress import RoundProgress


class FakeRegion:
    page_size = 4096


def test_bar_shows_what_the_counters_say_completed(capsys):
    done = [10]                          # pages completed before this round
    with RoundProgress(enabled=True, regions=[FakeRegion()],
                       pages_done=lambda: done[0]) as bar:
        bar.start_round(1, 256, live=True)      # 1 MiB handed out at once
        done[0] += 64                          # a quarter of it is on the wire
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "round 1" in printed.err and "0.2/1.0 MiB" in printed.err, printed.err


def test_disabled_bar_prints_nothing(capsys):
    with RoundProgress(enabled=False, regions=[], pages_done=lambda: 0) as bar:
        bar.start_round(1, 10, live=False)
    assert capsys.readouterr() == ("", "")
