"""OpenLineage run events for the steps just recorded, emitted through the configured sink; a
failure is logged and never blocks the record."""

from __future__ import annotations

import logging

from services.lineage.openlineage import OpenLineageSink, run_events
from services.lineage.store import LineageStore, Record

log = logging.getLogger(__name__)


def emit_all(sink: OpenLineageSink, store: LineageStore, records: list[Record]) -> None:
    for record in records:
        emit(sink, store, record)


def emit(sink: OpenLineageSink, store: LineageStore, record: Record) -> None:
    try:
        cause = store.by_event_id(record.causationid) if record.causationid else None
        sink.emit(run_events(record, cause))
    except Exception:  # noqa: BLE001 - lineage reporting never blocks the record
        log.exception("OpenLineage emission failed for %s", record.event_id)
