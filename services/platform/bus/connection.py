"""Connections to NATS built from settings: a FastStream broker for services, raw nats-py for tools."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import nats
from faststream.nats import NatsBroker
from faststream.nats.security import NatsSecurity, NatsUserPassword

from services.platform.settings import CairnSettings


def inbox_prefix(user: str) -> str:
    """Reply subjects of one NATS user. With credentials every process uses `_INBOX_<user>`, so the
    generated permissions (services.tools.nats_auth) can let each user read only its own replies and
    JetStream deliveries; without credentials nats-py's default `_INBOX` is kept."""
    return f"_INBOX_{user}"


def _inbox_kwargs(settings: CairnSettings) -> dict[str, Any]:
    return {"inbox_prefix": inbox_prefix(settings.nats_user)} if settings.nats_user else {}


def tls_context(settings: CairnSettings) -> ssl.SSLContext | None:
    if settings.nats_tls_ca is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca))
    if settings.nats_tls_cert and settings.nats_tls_key:
        ctx.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    return ctx


def _security(settings: CairnSettings) -> NatsSecurity | None:
    ctx = tls_context(settings)
    if settings.nats_user:
        password = settings.nats_password.get_secret_value() if settings.nats_password else ""
        return NatsUserPassword(settings.nats_user, password, ssl_context=ctx, use_ssl=ctx is not None)
    if ctx is not None:
        return NatsSecurity(ssl_context=ctx, use_ssl=True)
    return None


def make_broker(settings: CairnSettings, name: str, **kwargs: Any) -> NatsBroker:
    """A broker that reconnects forever: a restarted nats-server must not end a service."""
    return NatsBroker(
        settings.nats_servers(),
        name=f"cairn-{name}",
        security=_security(settings),
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        ping_interval=settings.nats_ping_interval_s,
        max_outstanding_pings=2,
        graceful_timeout=settings.ack_wait_s,
        log_level=logging.DEBUG,  # per-message Received/Processed lines cost CPU the trials need
        **_inbox_kwargs(settings),
        **kwargs,
    )


async def connect(
    settings: CairnSettings, name: str = "cli", persistent: bool = False, **extra: Any
) -> nats.NATS:
    """A plain nats-py connection for tools (status, events, provisioning).

    `persistent`: reconnect forever (a long-running process such as the inference server must
    outlive a nats-server restart); tools give up after three attempts.
    """
    options: dict[str, Any] = {
        "name": f"cairn-{name}",
        "connect_timeout": 5,
        "max_reconnect_attempts": -1 if persistent else 3,
        "reconnect_time_wait": 1 if persistent else 2,
        "ping_interval": settings.nats_ping_interval_s,
        "max_outstanding_pings": 2,
        **_inbox_kwargs(settings),
        **extra,
    }
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value() if settings.nats_password else ""
    ctx = tls_context(settings)
    if ctx is not None:
        options["tls"] = ctx
    return await nats.connect(settings.nats_servers(), **options)


async def _silent(_: Exception) -> None:
    """nats-py logs a traceback per failed attempt by default; `connect_once` callers say it in one line."""


async def connect_once(settings: CairnSettings, name: str) -> nats.NATS:
    """A connection for a check or a short command: two quick attempts, no traceback per attempt, so
    "nobody there" surfaces in about a second as the exception the caller turns into one line."""
    return await connect(settings, name, error_cb=_silent, max_reconnect_attempts=1, reconnect_time_wait=0.5)
