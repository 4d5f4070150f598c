"""ingestion: data-arrived -> dataset-ingested (an immutable Parquet snapshot) or data-rejected."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from contracts import DataArrived, DataRejected, DatasetIngested, Envelope, new_event
from services.ingestion import logic, sources
from services.platform.artifacts import ArtifactStore
from services.platform.bus.consumer import Delivery, PermanentError
from services.platform.cache import StepVersion
from services.platform.runtime import Route, Service


def ingest(event: DataArrived, store: ArtifactStore, settings: Any) -> DatasetIngested:
    """The whole step, synchronous and pure apart from reading the source and writing the store."""
    if event.is_text:
        from services.ingestion.text import ingest_text

        return ingest_text(event, store, settings)
    source = sources.resolve_source(event, settings)
    raw = sources.read_bytes(source, settings)
    source_sha = logic.verify_checksum(raw, event.sha256)
    frame, task = logic.validate(logic.parse(raw, source.format, settings), event, settings)
    frame = logic.normalise(frame)
    snapshot = store.put_bytes(logic.snapshot_bytes(frame), logic.PARQUET_MEDIA_TYPE, ".parquet")
    return DatasetIngested(
        context=logic.context_for(event, task),
        source_uri=event.uri,
        source_sha256=source_sha,
        dataset=snapshot,
        rows=len(frame),
        columns=logic.describe(frame),
    )


# The step's code: its package and every project module it imports (platform.ml.transform, the tokenizer).
CODE = ("ingestion",)
LIBRARIES = ("pandas", "pyarrow", "numpy")


def cache_inputs(event: Envelope[DataArrived]) -> dict[str, Any] | None:
    """The whole arrival (where, what, seed, tuning spec) with its sha256; without one, the
    content is unknown until read: not cacheable."""
    return event.data.model_dump(mode="json") if event.data.sha256 else None


class Ingestion(Service[ArtifactStore]):
    name = "ingestion"

    def routes(self) -> Sequence[Route]:
        version = StepVersion.of("ingestion", CODE, LIBRARIES, self.settings)
        return [
            Route(
                DataArrived,
                self.on_data_arrived,
                max_workers=2,
                cache_version=version,
                cache_inputs=cache_inputs,
            )
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[ArtifactStore]:
        """The only client: the artifact store (nothing to close)."""
        yield ArtifactStore(self.settings.artifacts)

    async def on_data_arrived(self, event: Envelope[DataArrived], delivery: Delivery) -> list[Envelope[Any]]:
        """Snapshot and describe the arrived data, or say plainly why it cannot be used."""
        try:
            result = await asyncio.to_thread(ingest, event.data, self.context, self.settings)
        except logic.DataProblem as problem:
            rejected = DataRejected(uri=event.data.uri, reason=problem.reason, problems=problem.problems)
            raise PermanentError(problem.reason, problem.problems, event=rejected) from None
        return [new_event(result, source=self.source, cause=event, subject=result.context.model_name)]
