"""Retention on the lineage side: archive what the stream's limits send out, then trim the stream;
and a store that starts behind the archive reads from it first, so the chain starts at sequence 1."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.lineage.archive import Archive, archive_and_trim, signing_key
from services.lineage.stopping import pause
from services.lineage.store import LineageStore
from services.platform.bus.metrics import ServiceMetrics
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)


async def keep_archiving(
    js: Any, settings: CairnSettings, store: LineageStore, stopping: asyncio.Event, metrics: ServiceMetrics
) -> None:
    """Every CAIRN_ARCHIVE_INTERVAL_S: archive what retention sends out, then trim the stream.

    Its gauges say how far the stream is behind its limits and when a pass last succeeded (the
    start counts as one, so an archiver that never succeeds is seen too)."""
    overdue = metrics.archive_overdue.labels(metrics.service)
    succeeded = metrics.archive_success.labels(metrics.service)
    overdue.set(0)
    succeeded.set_to_current_time()
    archive = Archive.of(settings)
    key = await asyncio.to_thread(signing_key, settings)
    while not stopping.is_set():
        await pause(stopping, settings.archive_interval_s)
        if stopping.is_set():
            return
        try:
            trim = await archive_and_trim(js, settings, store, archive, key)
        except Exception:  # noqa: BLE001 - the stream keeps everything until the next try
            log.exception("archiving failed; the stream keeps its events")
            continue
        if trim.held_by:
            log.info("retention held back: %s", trim.held_by)
        overdue.set(trim.overdue)
        succeeded.set_to_current_time()


async def from_archive(head: int, js: Any, settings: CairnSettings, store: LineageStore) -> int:
    """A store newer than the archive (rebuilt, or a new database) first reads what the stream
    no longer holds from the archive, so the chain starts at sequence 1."""
    info = await js.stream_info(settings.stream)
    if head + 1 >= info.state.first_seq:
        return head
    archive = Archive.of(settings)
    messages = await asyncio.to_thread(archive.messages, None, info.state.first_seq)
    added = await asyncio.to_thread(store.append_many, [m for m in messages if m[0] > head])
    return added[-1].seq if added else head
