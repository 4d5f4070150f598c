"""A service's handler behind the step cache (services.platform.cache): a hit republishes the kept
outputs as events of this run and runs nothing; a miss runs the handler and keeps what it returned."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from contracts import Envelope
from services.platform.bus.consumer import Handler
from services.platform.bus.metrics import ServiceMetrics
from services.platform.cache import (
    StepCache,
    StepVersion,
    carry_no_cache,
    missing_artifacts,
    served,
    wants_cache,
)

log = logging.getLogger(__name__)


def behind_cache(
    handler: Handler,
    step: StepVersion | None,
    cache_inputs: Callable[[Envelope[Any]], Any] | None,
    cache_store: bool,
    *,
    cache: StepCache,
    service: str,
    source: str,
    metrics: ServiceMetrics,
) -> Handler:
    """`handler` behind the step cache; every output carries a run's `nocache` on.

    A hit republishes the kept outputs as events of this run (marked `cachedfrom`) and runs
    nothing; a miss runs the handler and keeps what it returned (unless `cache_store` is off).
    `step` and `cache_inputs` are the route's (None: not cached); `source` names this service
    as the publisher of what a hit republishes.
    """

    @functools.wraps(handler)
    async def handle(event: Envelope[Any], delivery: Any) -> Sequence[Envelope[Any]]:
        key = None
        if step is not None and cache_inputs is not None and cache.enabled:
            inputs = cache_inputs(event)
            key = step.key(inputs) if inputs is not None else None
        if key is not None and wants_cache(event):
            entry = await cache.get(step.step, key)  # type: ignore[union-attr]
            outputs = served(entry, event, source)
            if outputs and not await asyncio.to_thread(missing_artifacts, outputs):
                metrics.cache_hits.labels(service, step.step).inc()  # type: ignore[union-attr]
                log.info("%s: %s served from cache (%s)", service, event.id, key[:12])
                return carry_no_cache(event, outputs)
        if key is not None:
            metrics.cache_misses.labels(service, step.step).inc()  # type: ignore[union-attr]
        outputs = await handler(event, delivery)
        if key is not None and cache_store:
            await cache.put(step.step, key, outputs)  # type: ignore[union-attr]
        return carry_no_cache(event, outputs)

    return handle
