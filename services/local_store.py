"""Local SQLite stores under $CAIRN_HOME: make their folder, and create their schema one process at a time.

Several services started in the same instant on a fresh home would otherwise race to create the
same schema (MLflow's alembic migrations fail with `table _alembic_tmp_experiments already exists`).
An exclusive file lock beside the database serialises the first creation; any other URL (PostgreSQL)
is left to the database, where `cairn provision` creates the schema as an admin step.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit


def sqlite_path(url: str) -> Path | None:
    """The file behind a `sqlite:///...` URL (SQLAlchemy style, any driver suffix), else None."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("sqlite"):
        return None
    path = unquote(parts.path)
    if not path or path == "/" or path.startswith("/:memory:"):
        return None
    return Path(path)


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock for the database at `url` (a no-op unless it is a local SQLite file)."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
