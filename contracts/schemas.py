"""Generate the published JSON Schemas (one per event type) and the AsyncAPI document.

Who publishes each type is ``contracts.events.PRODUCERS``, read off the payload classes; it is
re-exported here for the importers of old.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.envelope import TYPES, envelope_model
from contracts.events import PRODUCERS
from contracts.subjects import dead_letter_subject, stream_filter, subject_for

SCHEMA_DIR = Path(__file__).parent / "schemas"
ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.json"


def event_schema(event_type: str) -> dict[str, Any]:
    model = envelope_model(TYPES[event_type])
    schema = model.model_json_schema(mode="validation")
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


def write_all() -> list[Path]:
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = SCHEMA_DIR / name
        path.write_text(text)
        written.append(path)
    for stale in SCHEMA_DIR.glob("*.json"):
        if stale.name not in schema_files():
            stale.unlink()
    ASYNCAPI_PATH.write_text(asyncapi_text())
    written.append(ASYNCAPI_PATH)
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
