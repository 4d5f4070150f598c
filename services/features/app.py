"""features: dataset-ingested -> features-built (feature set + transform, both content-addressed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from contracts import DatasetIngested, Envelope, Task, new_event
from services.features import logic
from services.platform.artifacts import ArtifactStore
from services.platform.bus.consumer import Delivery, PermanentError
from services.platform.cache import StepVersion
from services.platform.runtime import Route, Service

CODE = ("features", "ml")  # and every project module they import
LIBRARIES = ("pandas", "pyarrow", "numpy", "scikit-learn", "safetensors")


def cache_inputs(event: Envelope[DatasetIngested]) -> dict[str, Any]:
    """The snapshot (by sha256) and the run's context: all a feature build depends on."""
    return event.data.model_dump(mode="json")


class Features(Service[ArtifactStore]):
    name = "features"

    def routes(self) -> Sequence[Route]:
        version = StepVersion.of("features", CODE, LIBRARIES, self.settings)
        return [
            Route(DatasetIngested, self.on_dataset_ingested, cache_version=version, cache_inputs=cache_inputs)
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[ArtifactStore]:
        """The only client: the artifact store (nothing to close)."""
        yield ArtifactStore(self.settings.artifacts)

    async def on_dataset_ingested(
        self, event: Envelope[DatasetIngested], delivery: Delivery
    ) -> list[Envelope[Any]]:
        """Encode, split and store the features of one snapshot."""
        from services.features import text

        build = text.build_text if event.data.context.task is Task.text_generation else logic.build
        try:
            built = await asyncio.to_thread(build, event.data, self.context)
        except (logic.FeatureProblem, text.TextFeatureProblem) as problem:
            raise PermanentError(str(problem)) from None
        return [new_event(built, source=self.source, cause=event, subject=built.context.model_name)]
