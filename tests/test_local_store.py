"""The local SQLite stores (MLflow's and lineage's) run in write-ahead-log mode.

What the mode buys is measured in services/platform/local_store.py; what is checked here is what a user of
the files sees: the mode is stored in the file (so every process that opens it uses it), a reader
in the middle of a transaction does not stop a writer, and what was committed is there for the
next process.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from services.lineage.store import LineageStore
from services.platform.local_store import write_ahead_log
from services.platform.tracking import Tracker


def journal_mode(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def test_mlflow_and_lineage_stores_are_created_in_write_ahead_log_mode(tmp_path: Path) -> None:
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    LineageStore(f"sqlite:///{tmp_path / 'lineage.db'}").close()
    assert journal_mode(tmp_path / "mlflow.db") == "wal"
    assert journal_mode(tmp_path / "lineage.db") == "wal"


def test_a_reader_mid_transaction_does_not_stop_the_lineage_writer(tmp_path: Path) -> None:
    path = tmp_path / "lineage.db"
    store = LineageStore(f"sqlite:///{path}")
    try:
        store.append_many([(1, "cairn.a.v1", b'{"id": "a"}')])
        reader = sqlite3.connect(path, timeout=0.1)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM cairn_records").fetchone() == (1,)
            # In rollback-journal mode this commit waits for the reader's lock, then fails with
            # "database is locked"; with the log it goes through and the reader keeps its snapshot.
            store.append_many([(2, "cairn.b.v1", b'{"id": "b"}')])
            assert reader.execute("SELECT count(*) FROM cairn_records").fetchone() == (1,)
            reader.execute("COMMIT")
        finally:
            reader.close()
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # the next process sees both
        assert [r[0] for r in db.execute("SELECT seq FROM cairn_records ORDER BY seq")] == [1, 2]


def test_a_database_that_cannot_switch_is_used_as_it_is(tmp_path: Path, caplog) -> None:
    """The mode is a speed-up: a file SQLite cannot open in it is reported and left to the store."""
    missing = tmp_path / "no such folder" / "lineage.db"
    write_ahead_log(f"sqlite:///{missing}")
    assert "could not put" in caplog.text and str(missing) in caplog.text
    write_ahead_log("postgresql+psycopg://nobody@127.0.0.1:1/none")  # other URLs: nothing to do
