"""Generate the published JSON Schemas (one per event type) and the AsyncAPI document.

Who publishes each type is ``contracts.events.PRODUCERS``, read off the payload classes; it is
re-exported here for the importers of old.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.compat import Report, compare
from contracts.envelope import OLDER_TYPES, TYPES, envelope_model
from contracts.events import PRODUCERS
from contracts.subjects import dead_letter_subject, stream_filter, subject_for
from contracts.types import is_strict
from contracts.upcasters import split_version

SCHEMA_DIR = Path(__file__).parent / "schemas"
ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.json"


def event_schema(event_type: str) -> dict[str, Any]:
    payload_cls = TYPES[event_type]
    schema = envelope_model(payload_cls).model_json_schema(mode="validation")
    if is_strict(payload_cls):
        # The strict door refuses unknown fields at every level (DataArrived's nested TuningSpec
        # is shared with the tolerant internal events, whose schema allows them).
        for definition in schema.get("$defs", {}).values():
            if definition.get("type") == "object":
                definition["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://cairn.dev/schemas/{event_type}.json"
    return schema


def schema_files() -> dict[str, str]:
    """File name -> exact text, so a test can compare with what is committed byte for byte."""
    return {f"{t}.json": json.dumps(event_schema(t), indent=2, sort_keys=True) + "\n" for t in sorted(TYPES)}


def asyncapi_document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event_type in sorted(TYPES):
        name = event_type.replace(".", "_")
        messages[name] = {
            "name": event_type,
            "contentType": "application/cloudevents+json",
            "payload": {"$ref": f"./schemas/{event_type}.json"},
        }
        channels[name] = {
            "address": subject_for(event_type),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "description": f"Published by {PRODUCERS[event_type]}.",
        }
        operations[f"publish_{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
        }
    channels["dead_letters"] = {
        "address": dead_letter_subject("{service}"),
        "parameters": {"service": {"description": "The service that refused the message."}},
        "description": "Original bytes of refused messages, headers carry the reason.",
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "cairn event bus",
            "version": "1.0.0",
            "description": f"Every event lives in the JetStream stream CAIRN (subjects {stream_filter()}).",
        },
        "defaultContentType": "application/cloudevents+json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def asyncapi_text() -> str:
    return json.dumps(asyncapi_document(), indent=2, sort_keys=True) + "\n"


def check(released_dir: Path = SCHEMA_DIR, schemas: dict[str, dict[str, Any]] | None = None) -> list[Report]:
    """Each model's schema against its released (committed) predecessor; `schemas` overrides models.

    A released type that no model publishes any more must be readable through an upcaster.
    """
    current = schemas if schemas is not None else {t: event_schema(t) for t in TYPES}
    reports = []
    for event_type, schema in sorted(current.items()):
        path = released_dir / f"{event_type}.json"
        if path.is_file():
            reports.append(compare(event_type, json.loads(path.read_text()), schema))
        else:
            reports.append(Report(event_type, additive=[("<type>", "new event type")]))
    for path in sorted(released_dir.glob("*.json")):
        event_type = path.name.removesuffix(".json")
        if event_type in current or event_type in OLDER_TYPES:
            continue
        base, version = split_version(event_type)
        newer = [t for t in current if split_version(t)[0] == base and split_version(t)[1] > version]
        what = f"superseded by {newer[0]} without an upcaster" if newer else "event type removed"
        what += ": events of it in the log become unreadable"
        reports.append(Report(event_type, breaking=[("<type>", what)]))
    return reports


def write_all() -> list[Path]:
    """Write the schemas of today's models; released schemas of superseded versions stay as they are."""
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = SCHEMA_DIR / name
        path.write_text(text)
        written.append(path)
    for stale in SCHEMA_DIR.glob("*.json"):
        if stale.name not in schema_files() and stale.name.removesuffix(".json") not in OLDER_TYPES:
            stale.unlink()
    ASYNCAPI_PATH.write_text(asyncapi_text())
    written.append(ASYNCAPI_PATH)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
