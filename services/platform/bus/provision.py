"""Idempotent provisioning of the one stream: an admin step, never done by runtime services."""

from __future__ import annotations

from dataclasses import replace

from nats.aio.client import ServerVersion
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from contracts.records import record_subject
from contracts.subjects import is_live, stream_subjects
from services.platform.settings import CairnSettings


def stream_config(settings: CairnSettings) -> StreamConfig:
    """Keep everything (limits retention, no limits), file storage, explicit duplicate window.

    Durability: the embedded server runs with `sync_interval: always` (see services.platform.bus.embedded),
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
    return await create_or_update(js, stream_config(settings))


async def create_or_update(js: JetStreamContext, config: StreamConfig) -> str:
    """Add the stream `config` names, or update it to `config`; returns what was done."""
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return "created"
    await js.update_stream(config)
    return "updated"


def _namespaced(base: str, namespace: str) -> str:
    """A bucket's name in a namespace: the live one keeps `base`, each replay gets its own."""
    return base if is_live(namespace) else f"{base}_" + namespace.replace(".", "_")


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> None:
    """Create a key-value bucket unless it exists (provisioning is idempotent)."""
    try:
        await js.key_value(config.bucket)
    except (NotFoundError, BucketNotFoundError):
        await js.create_key_value(config)


def _kv_config(settings: CairnSettings, bucket: str, **options: object) -> KeyValueConfig:
    """What every cairn bucket shares: the latest value only, on file, replicated like the stream.

    A replay's buckets keep entries for its ledger's TTL (set to the replay's longest duration): the
    bucket itself cannot expire in JetStream, so one left by a killed replay at least empties.
    """
    if not is_live(settings.namespace):
        options.setdefault("ttl", settings.handled_ttl_s)
    return KeyValueConfig(
        bucket=bucket, history=1, storage=StorageType.FILE, replicas=settings.stream_replicas, **options
    )


async def provision_study_bucket(js: JetStreamContext, settings: CairnSettings, bucket: str) -> None:
    """Tuning's study state: one key per study plan and rung, compare-and-set updated.

    Reads are direct gets on a single-replica stream: a read through the stream API also makes
    the server publish an API advisory (request and reply, about 1.6 kB), two per trial. With
    replicas, a direct get may be answered by a follower that lags, and the rung's results must be
    read after their tally, so reads stay on the leader.
    """
    await _ensure_bucket(js, _kv_config(settings, bucket, direct=settings.stream_replicas == 1))


def study_bucket(namespace: str) -> str:
    """Tuning's key-value bucket; replays get their own."""
    return _namespaced("cairn_studies", namespace)


def champion_bucket(namespace: str) -> str:
    """Deployment's champion record per model name (services.deployment.lock); replays get their own."""
    return _namespaced("cairn_champions", namespace)


async def provision_champion_bucket(js: JetStreamContext, settings: CairnSettings) -> None:
    """One key per model name; its revision is the compare-and-set token for moving the champion."""
    description = "cairn deployment: the champion decided for each model name"
    config = _kv_config(settings, champion_bucket(settings.namespace), description=description)
    await _ensure_bucket(js, config)


def handled_bucket(namespace: str) -> str:
    """The consumer policy's record of handled inputs (bus.ledger); replays get their own."""
    return _namespaced("cairn_handled", namespace)


async def provision_handled_bucket(js: JetStreamContext, settings: CairnSettings) -> None:
    """One key per (service, input): kept `handled_ttl_s` (a week by default), then forgotten.

    Direct get is on so that a service's reads go through a subject naming its own keys, which the
    generated NATS permissions pin (services.tools.nats_auth). A changed TTL is applied on the next run.

    Where the server allows it (`async_persist`), the bucket's stream acknowledges records before
    they reach disk: a handled event is then one fsync (its output) instead of three. Losing the
    last records in a server crash costs a rerun, never a second copy in the log: the redelivery
    that follows the crash comes within the duplicate window, which drops the rerun's outputs. The
    mode is fixed when the stream is created, so where it applies the bucket's stream is created as
    nats-py's `create_key_value` would create it, with the mode added (`add_stream`).
    """
    bucket = handled_bucket(settings.namespace)
    name = f"KV_{bucket}"
    try:
        current = (await js.stream_info(name)).config
    except NotFoundError:
        description = "cairn consumer policy: inputs each service has handled, and their outputs"
        ttl = settings.handled_ttl_s
        config = _kv_config(settings, bucket, description=description, ttl=ttl, direct=True)
        server = js._nc.connected_server_version  # nats-py: the context does not name its connection
        if not (settings.ledger_async_persist and async_persist(server, settings.stream_replicas)):
            await js.create_key_value(config)
            return
        await js.add_stream(_kv_stream_config(config), persist_mode=PersistMode.ASYNC)
        return
    if current.max_age != settings.handled_ttl_s:
        await js.update_stream(current, max_age=settings.handled_ttl_s)


def async_persist(server: ServerVersion, replicas: int) -> bool:
    """Whether a stream may be created with persist_mode async: one replica (the server refuses it
    on more) and a server that knows the mode (2.12 and later; older ones would ignore it)."""
    return replicas == 1 and (server.major, server.minor) >= (2, 12)


def _kv_stream_config(config: KeyValueConfig) -> StreamConfig:
    """The stream nats-py's `create_key_value` makes for a bucket (latest value, direct get, TTL)."""
    return StreamConfig(
        name=f"KV_{config.bucket}",
        description=config.description,
        subjects=[f"$KV.{config.bucket}.>"],
        allow_direct=config.direct,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=min(config.ttl or 120.0, 120.0),
        max_age=config.ttl,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=config.history,
        num_replicas=config.replicas,
        storage=config.storage,
    )


async def provision_all(js: JetStreamContext, settings: CairnSettings) -> str:
    done = await provision(js, settings)
    await provision_study_bucket(js, settings, study_bucket(settings.namespace))
    await provision_champion_bucket(js, settings)
    await provision_handled_bucket(js, settings)
    await provision_record_stream(js, settings)
    await provision_cache_bucket(js, settings)
    if is_live(settings.namespace):
        await provision_holds_bucket(js, settings)
    return done


HOLDS_BUCKET = "cairn_holds"


async def provision_holds_bucket(js: JetStreamContext, settings: CairnSettings) -> None:
    """`cairn hold`'s legal holds, one key per hold, shared by every operator of the deployment.

    Kept until released (no TTL), with a few revisions so a release can be traced; no service user
    is granted it (services.tools.nats_auth): only operator tools hold, release and read for gc.
    """
    description = "cairn gc: legal holds, one key per held run, artifact or model version"
    config = _kv_config(settings, HOLDS_BUCKET, description=description)
    await _ensure_bucket(js, replace(config, history=8))


def cache_bucket(namespace: str) -> str:
    """The step cache's key-value bucket; replays would get their own (they do not use it)."""
    return _namespaced("cairn_cache", namespace)


async def provision_cache_bucket(js: JetStreamContext, settings: CairnSettings) -> None:
    """One key per (step, cache key), kept until overwritten: content keys never go stale."""
    description = "cairn step cache: outputs of each step by the hash of what determines them"
    # Direct get: reads name their key, so NATS permissions can pin a service to `<step>.>`.
    config = _kv_config(settings, cache_bucket(settings.namespace), description=description, direct=True)
    await _ensure_bucket(js, config)


def record_stream(settings: CairnSettings) -> str:
    """The endpoint's request records: `CAIRN_REQUESTS`, or `CAIRN_REQUESTS_<replay>` in a replay."""
    return _namespaced(f"{settings.stream}_REQUESTS", settings.namespace)


async def provision_record_stream(js: JetStreamContext, settings: CairnSettings) -> str:
    """Request records (contracts.records) apart from the event log: their own subject outside
    `cairn.>`, and their own retention (CAIRN_REQUEST_RECORD_MAX_AGE_S), applied again on each run."""
    config = StreamConfig(
        name=record_stream(settings),
        description="cairn inference endpoint: sampled request records (model version, input hash, output)",
        subjects=[record_subject(settings.namespace)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=float(settings.request_record_max_age_s),
        num_replicas=settings.stream_replicas,
        allow_direct=True,
    )
    return await create_or_update(js, config)
