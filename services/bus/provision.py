"""Idempotent provisioning of the one stream: an admin step, never done by runtime services."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

from contracts.subjects import stream_subjects
from services.settings import CairnSettings


def stream_config(settings: CairnSettings) -> StreamConfig:
    """Keep everything (limits retention, no limits), file storage, explicit duplicate window.

    Durability: the embedded server runs with `sync_interval: always` (see services.bus.embedded),
    so an acknowledged event is on disk before the PubAck; for an external server the operator
    sets it in the server config (DESIGN.md).
    """
    return StreamConfig(
        name=settings.stream,
        description="cairn event log: every event, kept for audit and replay",
        subjects=stream_subjects(),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        num_replicas=settings.stream_replicas,
        duplicate_window=settings.duplicate_window_s,
        allow_direct=True,
        deny_delete=True,
    )


async def provision(js: JetStreamContext, settings: CairnSettings) -> str:
    """Create the stream, or update it to the declared config; returns what was done."""
    config = stream_config(settings)
    try:
        await js.stream_info(settings.stream)
    except NotFoundError:
        await js.add_stream(config)
        return "created"
    await js.update_stream(config)
    return "updated"


async def provision_study_bucket(js: JetStreamContext, settings: CairnSettings, bucket: str) -> None:
    """Tuning's study state: one key per study plan and rung, compare-and-set updated."""
    try:
        await js.key_value(bucket)
    except (NotFoundError, BucketNotFoundError):
        await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=settings.stream_replicas)
        )


def study_bucket(namespace: str) -> str:
    """Tuning's key-value bucket; replays get their own."""
    return "cairn_studies" if namespace == "cairn" else "cairn_studies_" + namespace.replace(".", "_")


async def provision_all(js: JetStreamContext, settings: CairnSettings) -> str:
    done = await provision(js, settings)
    await provision_study_bucket(js, settings, study_bucket(settings.namespace))
    return done
