"""Text corpora: UTF-8 validated, size-limited, hashed, snapshotted byte for byte.

A corpus is one file, or a directory whose files (sorted by path, `.py .txt .md .rst` only)
are joined with a separator line: the order is fixed, so the snapshot's hash is too.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from contracts import DataArrived, DataFormat, DatasetIngested, PipelineContext, Task
from services.ingestion import logic, sources
from services.ingestion.sources import is_own_state
from services.platform.artifacts import ArtifactStore
from services.platform.ml.textgen.tokenizer import CorpusError, validate_corpus
from services.platform.settings import CairnSettings

TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"
CORPUS_SUFFIXES = (".py", ".txt", ".md", ".rst")
MIN_CORPUS_BYTES = 2048


def _read_directory(root: Path, settings: CairnSettings) -> bytes:
    parts: list[bytes] = []
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES):
        resolved = path.resolve()
        allowed = any(resolved.is_relative_to(r) for r in settings.read_roots)
        if not allowed or is_own_state(resolved, settings):
            continue  # a symlink out of the allowed roots (or into cairn's home) is skipped, never followed
        data = resolved.read_bytes()
        total += len(data)
        if total > settings.max_dataset_bytes:
            raise logic.DataProblem(f"corpus {root} exceeds the limit of {settings.max_dataset_bytes} bytes")
        parts.append(f"# file: {path.relative_to(root)}\n".encode() + data + b"\n")
    if not parts:
        raise logic.DataProblem(f"{root} holds no {', '.join(CORPUS_SUFFIXES)} files")
    return b"".join(parts)


def default_model_name(uri: str) -> str:
    stem = PurePosixPath(urlsplit(uri).path or uri).name.split(".")[0]
    return (re.sub(r"[^a-z0-9_-]+", "-", f"{stem}-text".lower()).strip("-_") or "text")[:64]


def ingest_text(event: DataArrived, store: ArtifactStore, settings: CairnSettings) -> DatasetIngested:
    source = sources.resolve_source(event.model_copy(update={"format": DataFormat.text}), settings)
    if source.scheme == "file" and Path(source.path).is_dir():
        raw = _read_directory(Path(source.path), settings)
    else:
        raw = sources.read_bytes(source, settings)
    source_sha = logic.verify_checksum(raw, event.sha256)
    try:
        text = validate_corpus(raw, settings.max_dataset_bytes, name=event.uri)
    except CorpusError as exc:
        raise logic.DataProblem(str(exc)) from None
    if len(raw) < MIN_CORPUS_BYTES:
        raise logic.DataProblem(f"corpus is {len(raw)} bytes; at least {MIN_CORPUS_BYTES} are needed")
    snapshot = store.put_bytes(raw, TEXT_MEDIA_TYPE, ".txt")
    context = PipelineContext(
        model_name=event.model_name or default_model_name(event.uri),
        target=None,
        task=Task.text_generation,
        seed=event.seed,
        tuning=event.tuning,
    )
    return DatasetIngested(
        context=context,
        source_uri=event.uri,
        source_sha256=source_sha,
        dataset=snapshot,
        rows=text.count("\n") + 1,
        columns=[],
    )
