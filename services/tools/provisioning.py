"""`cairn provision`, the admin step: everything the services share but may not create themselves.

The stream and the key-value buckets (services hold no stream-admin rights), the MLflow schema and
the lineage store's schema (so services started at the same instant never race to create them),
and, unless keys are set explicitly, the home's model-signing key pair, so a local system signs and
verifies its champions by default (services.platform.model_signatures).
Idempotent: run it again after an upgrade and it updates what changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.platform.bus.availability import jetstream_when_available
from services.platform.bus.connection import connect
from services.platform.bus.provision import provision_all
from services.platform.model_signatures import ensure_home_keys
from services.platform.settings import CairnSettings


async def provision_everything(
    settings: CairnSettings, on_wait: Callable[[str], None] | None = None
) -> dict[str, str]:
    """Returns what was done, per part, for the admin to read. A cluster still forming (no leader
    yet, too few peers counted online to place replicas, a reply late) is waited for, up to a minute: a
    provisioning Job started beside a fresh NATS StatefulSet meets one; `on_wait` hears why."""
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    nc = await connect(settings, "admin")
    try:
        js = nc.jetstream()
        # Idempotent, so a reply that did not come in time is asked again too (seen in CI against a
        # cluster a moment old).
        stream = await jetstream_when_available(
            lambda: provision_all(js, settings), 60.0, on_wait, idempotent=True
        )
    finally:
        await nc.close()
    await asyncio.to_thread(_schemas, settings)
    verify_key = await asyncio.to_thread(ensure_home_keys, settings)
    return {
        f"stream {settings.stream}": stream,
        "mlflow schema": settings.tracking_uri.split("@")[-1],
        "lineage schema": settings.lineage_url.split("@")[-1],
        "model signing": str(verify_key) if verify_key else "keys set explicitly (CAIRN_MODEL_*_KEY)",
    }


def _schemas(settings: CairnSettings) -> None:
    from services.lineage.store import LineageStore
    from services.platform.tracking import Tracker

    Tracker(settings.tracking_uri)
    LineageStore(settings.lineage_url).close()
