"""The inference endpoint's request records: which model version answered which request, and with what.

Not an event (no envelope, not in the event log's PAYLOADS): records go to a stream of their own
with a retention of their own (services.platform.bus.provision), sampled by CAIRN_REQUEST_RECORD_RATE.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.types import ModelName, Sha256

RECORD_ROOT = "requests"  # outside `cairn.>`: the event log's stream must not capture records


class RequestRecord(BaseModel):
    """One answered request: model version and bundle hash, a hash of the input, the output, the time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(max_length=128)
    model_name: ModelName
    model_version: int = Field(ge=1)
    model_sha256: Sha256
    route: str = Field(max_length=64, description="predict, infer (v2) or generate.")
    input_sha256: Sha256 = Field(description="SHA-256 of the request body as received.")
    rows: int = Field(ge=0)
    output: Any = Field(None, description="The answer as returned (predictions, outputs or text).")
    received_at: float = Field(description="Unix time the request arrived.")
    latency_ms: float = Field(ge=0)


def record_subject(namespace: str) -> str:
    """`requests.cairn` in the live namespace, `requests.cairn.replay.<id>` in a replay."""
    return f"{RECORD_ROOT}.{namespace}"
