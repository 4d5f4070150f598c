"""The deployment watch: every replica sees every `model.deployed`, from 'now', through a consumer of
its own that survives a restarted server or a lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts import ModelDeployed, subject_for
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)
WATCH_HEARTBEAT_S = 2.0


async def watch_deployments(
    nc: Any,
    settings: CairnSettings,
    on_deployment: Callable[[bytes], Awaitable[None]],
    watching: asyncio.Event,
) -> None:
    """Every replica sees every deployment, from 'now', through a consumer of its own.

    Not nats-py's ordered consumer: that one is created without a name, through an API
    subject that no permission can pin to a filter. This is the same idea with a name: a
    push consumer (no acks, in memory) filtered on the deployed subject, re-created from the
    next unseen stream sequence whenever heartbeats stop (nats-server restarted, connection
    lost). Permissions: `$JS.API.CONSUMER.CREATE.<stream>.*.cairn.model.deployed.v1` only.
    `watching` is set while the consumer is up.
    """
    js = nc.jetstream()
    subject = subject_for(ModelDeployed, settings.namespace)
    next_seq: int | None = None
    while True:
        sub = None
        try:
            if next_seq is None:
                next_seq = (await js.stream_info(settings.stream)).state.last_seq + 1
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await js.add_consumer(  # the manager API: unlike subscribe, it sets the consumer's name
                settings.stream,
                ConsumerConfig(
                    name=f"serve-{uuid.uuid4().hex[:16]}",
                    filter_subject=subject,
                    deliver_subject=inbox,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=next_seq,
                    ack_policy=AckPolicy.NONE,
                    idle_heartbeat=WATCH_HEARTBEAT_S,
                    inactive_threshold=30.0,
                    mem_storage=True,
                    num_replicas=1,
                ),
            )
            watching.set()
            while True:
                msg = await sub.next_msg(timeout=WATCH_HEARTBEAT_S * 3)
                if not msg.reply:  # idle heartbeat (status 100): the consumer is alive
                    continue
                seq = msg.metadata.sequence.stream
                if seq < next_seq:
                    continue
                next_seq = seq + 1
                await on_deployment(msg.data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - timeouts, disconnects, a restarted server
            watching.clear()
            log.info("deployment watch restarts from seq %s: %s", next_seq, type(exc).__name__)
            await asyncio.sleep(0.5)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
