"""The pure parts of the auditor's questions, on events built from the contracts: which runs a
`--since/--until` window selects, how TIME is read, and the millisecond edges of a reign. The same
questions on a real system are in tests/test_audit_journey.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contracts import DataArrived, new_event
from services.lineage import timeline
from services.tools.replay import select_roots

T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def arrivals(*offsets_s: float) -> list:
    return [
        (
            i + 1,
            new_event(
                DataArrived(uri=f"file:///d{i}.csv", target="y"), source="/t", time=T0 + timedelta(seconds=s)
            ),
        )
        for i, s in enumerate(offsets_s)
    ]


def test_a_window_selects_the_runs_that_started_in_it() -> None:
    history = arrivals(0, 60, 120)
    ids = [ev.id for _, ev in history]
    window = select_roots(history, None, T0 + timedelta(seconds=30), None, T0 + timedelta(seconds=120))
    assert [e.id for e in window] == [ids[1]], "since is inclusive, until exclusive"
    assert [e.id for e in select_roots(history, None, None, None, T0 + timedelta(seconds=61))] == ids[:2]
    assert [e.id for e in select_roots(history, ids[2], None, None, None)] == [ids[2]]


def test_time_is_iso_8601_utc_when_unzoned_or_now_to_the_millisecond() -> None:
    assert timeline.instant("2026-11-30T12:00:00.123456") == datetime(
        2026, 11, 30, 12, 0, 0, 123000, tzinfo=UTC
    )
    assert timeline.instant("2026-11-30T13:00:00.5+01:00") == datetime(
        2026, 11, 30, 12, 0, 0, 500000, tzinfo=UTC
    )
    assert timeline.instant("2026-11-30T12:00:00Z") == datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert timeline.instant("now", now=T0) == datetime(2026, 11, 30, 12, 0, 0, 123000, tzinfo=UTC)
    assert timeline.stamp(T0.replace(microsecond=123000)) == "2026-11-30T12:00:00.123Z"
    with pytest.raises(ValueError):
        timeline.instant("yesterday")


def test_a_reign_holds_from_its_first_millisecond_until_the_next_begins() -> None:
    def reign(version: int, since: datetime, until: datetime | None) -> timeline.Reign:
        return timeline.Reign("m", version, since, until, "e", "c", "0" * 64, "r", None, None)

    t1, t2 = timeline.to_ms(T0), timeline.to_ms(T0 + timedelta(seconds=5))
    history = [reign(1, t1, t2), reign(2, t2, None)]
    assert timeline.champion_at(history, t1 - timedelta(milliseconds=1)) is None
    assert timeline.champion_at(history, t1).version == 1
    assert timeline.champion_at(history, t2 - timedelta(milliseconds=1)).version == 1
    assert timeline.champion_at(history, t2).version == 2
    assert timeline.champion_at(history, t2 + timedelta(days=365)).version == 2
