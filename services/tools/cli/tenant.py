"""`cairn tenant add|list|remove`: teams on one home, each in its own NATS account (docs/TENANTS.md)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from services.platform.settings import DEFAULT_TENANT, CairnSettings
from services.tools import tenants
from services.tools.cli.common import (
    ADMIN,
    EXIT_USAGE,
    CliError,
    app,
    connect_nats,
    settings,
    stream_messages,
)

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: teams isolated in their own NATS accounts.")
app.add_typer(tenant_app, name="tenant")


def _home(s: CairnSettings) -> CairnSettings:
    """The home as a whole (the registry, the server), whatever CAIRN_TENANT says."""
    return tenants.settings_for(s, DEFAULT_TENANT)


@tenant_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Lower-case letters, digits and '-'; 2 to 30 characters.")],
    max_storage: Annotated[
        str, typer.Option(help="Its JetStream storage (events, buckets): 10GB, 512MiB.")
    ] = "10GB",
    max_trials_in_flight: Annotated[int, typer.Option(min=1, help="Its trials running at once.")] = 40,
) -> None:
    """Add a tenant: its account, users and limits now; its services at the next `cairn up`."""
    s = _home(settings(None))
    try:
        tenant = tenants.add(s, name, tenants.parse_size(max_storage), max_trials_in_flight)
    except tenants.TenantError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    reloaded = _reload_accounts(s)
    typer.echo(
        f"tenant {tenant.name}: account {tenant.name}, storage {max_storage}, "
        f"{tenant.max_trials_in_flight} trials in flight; state in {tenants.settings_for(s, name).home_dir}"
    )
    if reloaded:
        typer.echo("the NATS server has its account now; its services start with the next `cairn up`")


@tenant_app.command("list")
def list_tenants() -> None:
    """Every tenant with its limits and, while cairn is up, what it uses of them."""
    s = _home(settings(None))
    for tenant in tenants.every(s):
        own = tenants.settings_for(s, tenant.name)
        storage = "server's" if tenant.max_storage_bytes is None else _size(tenant.max_storage_bytes)
        trials = "-" if tenant.max_trials_in_flight is None else str(tenant.max_trials_in_flight)
        usage = _usage(own)
        used, in_flight = (f"{_size(usage[0])} ({usage[1]})", str(usage[2])) if usage else ("(not up)", "-")
        typer.echo(
            f"{tenant.name:<16} storage {used} of {storage:<10} trials in flight {in_flight} of {trials}"
        )


def _usage(own: CairnSettings) -> tuple[int, str, int] | None:
    """(JetStream bytes, its streams and consumers, trials being run now), or None when not up."""
    from nats.js.errors import NotFoundError

    from contracts import TrialRequested
    from services.platform.bus.consumer import durable_name

    try:
        admin = own.with_home_credentials(ADMIN)
        admin.resolved_nats_url()
    except RuntimeError:
        return None

    async def go() -> tuple[int, str, int]:
        nc = await connect_nats(admin, "tenant-list")
        try:
            js = nc.jetstream()
            info = await js.account_info()
            try:  # delivered to training, not acknowledged yet: the trials running now
                trials = await js.consumer_info(
                    own.stream, durable_name("training", TrialRequested, own.namespace)
                )
                running = trials.num_ack_pending
            except NotFoundError:
                running = 0
            return info.storage, f"{info.streams} streams, {info.consumers} consumers", running
        finally:
            await nc.close()

    return asyncio.run(go())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


@tenant_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The tenant to remove.")]) -> None:
    """Archive a tenant's history and state, then remove it: its services stop, its streams and
    buckets are deleted, its users are gone from the server. Refused while it holds anything."""
    from services.tools import gc, supervisor

    s = _home(settings(None))
    if name == DEFAULT_TENANT:
        raise CliError("the default tenant is the home itself: it cannot be removed", EXIT_USAGE)
    if all(t.name != name for t in tenants.load(s)):
        raise CliError(f"no tenant {name!r} (`cairn tenant list`)", EXIT_USAGE)
    try:
        admin = tenants.settings_for(s, name).with_home_credentials(ADMIN)
        admin.resolved_nats_url()
    except RuntimeError:
        raise CliError(
            f"tenant {name} is not up: start it with `cairn up` (its history is read from its stream "
            "to archive it before anything is removed)"
        ) from None

    async def holds() -> list[gc.Hold]:
        nc = await connect_nats(admin, "tenant-remove")
        try:
            return await gc.read_holds(nc.jetstream())
        finally:
            await nc.close()

    if held := asyncio.run(holds()):
        raise CliError(
            f"tenant {name} has {len(held)} holds ({', '.join(h.id for h in held[:5])}): release them "
            f"first (`cairn --tenant {name} hold --list`)"
        )
    # Its services stop first, so nothing is written between the archive and the deletion.
    stopped = supervisor.stop_tenant(s, name)
    folder = s.root_dir / tenants.REMOVED_DIR / f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"
    folder.mkdir(parents=True)
    count, digest = _archive_history(asyncio.run(stream_messages(admin)), folder / "history.jsonl")
    asyncio.run(_delete_streams(admin))
    home = tenants.settings_for(s, name).home_dir
    if home.exists():
        home.rename(folder / "state")
    tenants.forget(s, name)
    _reload_accounts(s)
    typer.echo(f"archived {count} events (sha256 {digest}) and the state of {name} in {folder}")
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}; tenant {name} removed")


def _archive_history(records: list[tuple[int, str, bytes]], path: Path) -> tuple[int, str]:
    """Every event as it was in the log (sequence, subject, exact bytes), one JSON line each."""
    with path.open("w") as out:
        for seq, subject, data in records:
            out.write(json.dumps({"seq": seq, "subject": subject, "data": base64.b64encode(data).decode()}))
            out.write("\n")
    return len(records), hashlib.sha256(path.read_bytes()).hexdigest()


async def _delete_streams(admin: CairnSettings) -> None:
    """Its stream and buckets (each a stream) go, so its account's storage is freed."""
    nc = await connect_nats(admin, "tenant-remove")
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def _reload_accounts(s: CairnSettings) -> bool:
    """With the embedded server up: its users and accounts regenerated, and reloaded (SIGHUP)."""
    from services.tools import supervisor

    runtime = s.runtime()
    pid = runtime.get("pids", {}).get("nats-server")
    if not runtime.get("nats_auth") or pid is None or not supervisor.is_ours(runtime, pid):
        return False
    supervisor.write_local_auth(s)
    supervisor.reload_nats(pid)
    return True
