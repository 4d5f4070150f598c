"""Ingestion as pure steps: where may we read, what did we read, is it usable, what is it.

Every refusal raises `DataProblem` with a reason a person can act on.
"""

from __future__ import annotations

import io
import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contracts import ColumnInfo, DataArrived, DataFormat, PipelineContext, Task
from services.ingestion.problems import DataProblem
from services.ingestion.sources import DATA_SUFFIXES
from services.platform.artifacts import sha256_bytes
from services.platform.ml.transform import column_kind, infer_task
from services.platform.settings import CairnSettings

PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"


def verify_checksum(data: bytes, expected: str | None) -> str:
    actual = sha256_bytes(data)
    if expected is not None and actual != expected:
        raise DataProblem(f"checksum mismatch: expected sha256 {expected}, the file has {actual}")
    return actual


MAX_LINE_BYTES = 1024 * 1024  # a line longer than this is not a table row anyone meant to send
MAX_COLUMN_NAME = 256  # the contracts' ColumnName limit


def longest_line_over(data: bytes, limit: int) -> int | None:
    """1-based number of the first line longer than `limit` bytes, or None.

    From each line start it jumps to the last newline within reach, so it takes O(len / limit)
    Python steps whatever the line lengths are (the searching runs in C).
    """
    pos, n = 0, len(data)
    while n - pos > limit:
        nl = data.rfind(b"\n", pos, pos + limit + 1)
        if nl == -1:
            return data.count(b"\n", 0, pos) + 1
        pos = nl + 1
    return None


def parse(data: bytes, fmt: DataFormat, settings: CairnSettings) -> pd.DataFrame:
    if fmt is DataFormat.csv:
        first = data[: 1024 * 1024].split(b"\n", 1)[0]
        if first.count(b",") + 1 > settings.max_columns:
            raise DataProblem(f"the header has more than {settings.max_columns} columns")
    if fmt in (DataFormat.csv, DataFormat.jsonl) and (
        (line := longest_line_over(data, MAX_LINE_BYTES)) is not None
    ):
        raise DataProblem(
            f"line {line} is longer than {MAX_LINE_BYTES} bytes; this is not a table we can read"
        )
    try:
        if fmt is DataFormat.csv:
            frame = pd.read_csv(io.BytesIO(data), low_memory=False)
        elif fmt is DataFormat.parquet:
            frame = pq.read_table(io.BytesIO(data)).to_pandas()
        else:
            frame = pd.read_json(io.BytesIO(data), lines=True)
    except Exception as exc:  # noqa: BLE001 - every parser error is the sender's to fix
        # The parser's message can quote the file; name the error and where, never the content.
        where = re.search(r"\b(line|row) \d+", str(exc))
        at = f" at {where.group(0)}" if where else ""
        raise DataProblem(f"cannot parse as {fmt.value}: {type(exc).__name__}{at}") from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def validate(frame: pd.DataFrame, event: DataArrived, settings: CairnSettings) -> tuple[pd.DataFrame, Task]:
    problems = []
    if frame.shape[1] > settings.max_columns:
        problems.append(f"{frame.shape[1]} columns; the limit is {settings.max_columns}")
    long_names = [c for c in frame.columns if len(c) > MAX_COLUMN_NAME]
    if long_names:
        problems.append(
            f"{len(long_names)} column names are longer than {MAX_COLUMN_NAME} characters "
            f"(first starts {long_names[0][:40]!r})"
        )
    duplicated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if duplicated:
        problems.append(f"duplicate column names: {', '.join(duplicated)}")
    if event.target not in frame.columns:
        problems.append(f"target column '{event.target}' not found; " + _columns_hint(frame, event))
    if problems:
        raise DataProblem(problems[0], problems)
    if frame.shape[1] < 2:
        raise DataProblem("no feature columns besides the target")
    labelled = frame[frame[event.target].notna()].reset_index(drop=True)
    missing_target = len(frame) - len(labelled)
    if missing_target > len(frame) / 2:
        raise DataProblem(f"{missing_target} of {len(frame)} rows have no value in target '{event.target}'")
    if len(labelled) < settings.min_rows:
        raise DataProblem(f"{len(labelled)} labelled rows; at least {settings.min_rows} are needed")
    task = event.task or infer_task(labelled[event.target])
    if task is Task.regression and not pd.api.types.is_numeric_dtype(labelled[event.target]):
        raise DataProblem(f"task is regression but target '{event.target}' is not numeric")
    if task is Task.classification and labelled[event.target].nunique() < 2:
        raise DataProblem(f"target '{event.target}' has a single class; classification needs two or more")
    return labelled, task


def _columns_hint(frame: pd.DataFrame, event: DataArrived) -> str:
    """The header helps whoever sent a table, but is content of whatever file was named: show it
    only for a file named as a data file that parsed into a real table."""
    name = PurePosixPath(urlsplit(event.uri).path).name.lower()
    if frame.shape[1] >= 2 and name.endswith(tuple(DATA_SUFFIXES)):
        return "columns are: " + ", ".join(list(frame.columns)[:20])
    return f"the file has {frame.shape[1]} column(s)"


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as nullable strings so the snapshot's schema is stable across readers."""
    out = frame.copy()
    for name in out.columns:
        if column_kind(out[name]).value == "categorical":
            out[name] = out[name].map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    return out


def snapshot_bytes(frame: pd.DataFrame) -> bytes:
    """Deterministic Parquet: no index, fixed compression and row groups."""
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=65536, write_statistics=True)
    return buf.getvalue()


def describe(frame: pd.DataFrame) -> list[ColumnInfo]:
    out = []
    for name in frame.columns:
        s = frame[name]
        kind = column_kind(s)
        numeric = kind.value == "numeric"
        out.append(
            ColumnInfo(
                name=name,
                kind=kind,
                dtype=str(s.dtype),
                missing=int(s.isna().sum()),
                distinct=int(s.nunique()),
                mean=_finite(s.mean()) if numeric else None,
                std=_finite(s.std()) if numeric else None,
                minimum=_finite(s.min()) if numeric else None,
                maximum=_finite(s.max()) if numeric else None,
            )
        )
    return out


def _finite(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def default_model_name(uri: str, target: str) -> str:
    stem = PurePosixPath(urlsplit(uri).path or uri).name.split(".")[0]
    name = re.sub(r"[^a-z0-9_-]+", "-", f"{stem}-{target}".lower()).strip("-_")
    return (name or "model")[:64]


def context_for(event: DataArrived, task: Task) -> PipelineContext:
    return PipelineContext(
        model_name=event.model_name or default_model_name(event.uri, event.target),
        target=event.target,
        task=task,
        seed=event.seed,
        tuning=event.tuning,
    )
