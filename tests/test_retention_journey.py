"""A bounded stream with an unbroken audit, driven through the `cairn` executable: a small byte
retention pushes the first run out of the stream into the archive; `cairn events`, `cairn lineage`,
`cairn audit verify`, `cairn hold`, `cairn gc` and `cairn replay` of that archived run all still work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.lineage.archive import parse_name
from tests.test_journeys import cairn, user_env, wait_until, write_table

pytestmark = pytest.mark.slow
SMALL = ["--families", "linear", "--trials", "1", "--strategy", "random", "--max-budget", "3"]


def archived_up_to(home: Path) -> int:
    folder = home / "artifacts" / "archive" / "CAIRN"
    names = [parse_name(p.name) for p in folder.glob("*.json.gz")] if folder.exists() else []
    return max((last for _, last in filter(None, names)), default=0)


def test_an_archived_run_stays_auditable_and_replayable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = user_env(
        home, CAIRN_SERVE_PORT="0", CAIRN_RETENTION_MAX_BYTES="8000", CAIRN_ARCHIVE_INTERVAL_S="0.5"
    )
    data = write_table(tmp_path / "data")
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=tmp_path, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        for _ in range(2):
            run = cairn(
                "submit", str(data), "--target", "price", "--model-name", "kept", *SMALL,
                "--wait", "--timeout", "300", env=env, cwd=tmp_path, timeout=330,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
        listing = cairn("events", "--json", env=env, cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        events = [json.loads(line) for line in listing.stdout.splitlines() if line.startswith("{")]
        first_run = events[0]["correlationid"]
        last_of_first = max(i for i, e in enumerate(events) if e["correlationid"] == first_run) + 1

        # Retention moves the first run out of the stream, archived first.
        wait_until(lambda: archived_up_to(home) >= last_of_first, 60, "the first run archived")

        again = cairn("events", "--json", env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert [json.loads(line)["id"] for line in again.stdout.splitlines() if line.startswith("{")][
            : len(events)
        ] == [e["id"] for e in events], "archive and stream read as one log"

        verified = cairn("audit", "verify", env=env, cwd=tmp_path)
        assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr

        lineage = cairn("lineage", first_run[:8], env=env, cwd=tmp_path)
        assert lineage.returncode == 0, lineage.stderr
        assert "model.deployed" in lineage.stdout or "deployed" in lineage.stdout, lineage.stdout

        # gc and hold read the same history: the archived run is found, and gc runs on it.
        held = cairn("hold", first_run[:8], env=env, cwd=tmp_path)
        assert held.returncode == 0 and f"run {first_run}" in held.stdout, held.stdout + held.stderr
        collected = cairn("gc", "--dry-run", "--keep-runs", "0", "--grace", "0s", env=env, cwd=tmp_path)
        assert collected.returncode == 0, collected.stdout + collected.stderr

        replayed = cairn("replay", "--correlation", first_run, env=env, cwd=tmp_path, timeout=400)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    finally:
        cairn("down", env=env, cwd=tmp_path, timeout=60)
