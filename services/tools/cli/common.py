"""What every command shares: the app, user errors, settings, the connection, the lineage store."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import typer

from services.platform.settings import CairnSettings

HELP = """The `cairn` command line: run the system, feed it data, watch it, query it.

`--tenant NAME` (or CAIRN_TENANT), anywhere on the line, runs a command for that tenant
(docs/TENANTS.md); without it, the default tenant.

Exit codes: 0 success (a run deployed), 1 failure (a run failed, a server unreachable),
2 usage error (a bad option, an unknown name), 3 a run's model was not promoted by the gate.
"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=HELP,
    pretty_exceptions_show_locals=False,  # locals can hold secrets (passwords, keys)
)

EXIT_DEPLOYED, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_PROMOTED = 0, 1, 2, 3


class CliError(Exception):
    """A user error: one line on stderr saying what is wrong and what to do, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.code = code


ADMIN, READER, UPSTREAM = "admin", "reader", "upstream"  # services.tools.nats_auth's users


def settings(user: str | None = ADMIN) -> CairnSettings:
    """The settings, as `user` of the nats-server `cairn up` runs from this home when one does and
    no NATS URL or user is set: commands that only read pass READER; None for no NATS user."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        s = CairnSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"CAIRN_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(f"invalid setting: {problems}", EXIT_USAGE) from None
    except SettingsError as exc:  # a list or map setting that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"CAIRN_{field.group(1).upper()}" if field else "a CAIRN_ setting"
        raise CliError(
            f"invalid setting: {name} is not JSON (lists are written as JSON, e.g. {name}='[\"/data\"]')",
            EXIT_USAGE,
        ) from None
    check_tenant(s)
    try:
        return s.with_home_credentials(user) if user else s
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


def check_tenant(s: CairnSettings) -> None:
    """A tenant that this home does not know is a usage error, not an empty answer. With
    CAIRN_NATS_URL (a pod, an outside server), that server's accounts decide instead."""
    from services.platform.settings import DEFAULT_TENANT
    from services.tools import tenants

    if s.tenant != DEFAULT_TENANT and not s.nats_url and all(t.name != s.tenant for t in tenants.load(s)):
        raise CliError(f"no tenant {s.tenant!r} in {s.root_dir} (`cairn tenant list`)", EXIT_USAGE)


TENANT_OPTION = "--tenant"


def lift_tenant_option(argv: list[str], environ: dict[str, str]) -> list[str]:
    """`--tenant NAME` anywhere on the command line (before or after the command) becomes
    CAIRN_TENANT, which every command's settings read; the rest of the line is returned."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == TENANT_OPTION:
            if i + 1 >= len(argv):
                raise CliError(f"{TENANT_OPTION} needs a tenant name", EXIT_USAGE)
            environ["CAIRN_TENANT"] = argv[i + 1]
            i += 2
            continue
        if arg.startswith(TENANT_OPTION + "="):
            environ["CAIRN_TENANT"] = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out


async def connect_nats(s: CairnSettings, name: str):
    """A NATS connection for a command, or a one-line error saying how to get one."""
    from services.platform.bus.connection import connect_once

    try:
        url = s.resolved_nats_url()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None

    try:
        return await connect_once(s, name)
    except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds for one cause
        raise CliError(
            f"cannot reach NATS at {url} ({type(exc).__name__}): start it with `cairn up`, "
            "or point CAIRN_NATS_URL at a running server"
        ) from None


def stream_missing(s: CairnSettings) -> CliError:
    return CliError(f"stream {s.stream} not found on the NATS server: run `cairn provision` first")


def configure_logging(s: CairnSettings) -> None:
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def client_for(s: CairnSettings, name: str) -> Any:
    """A client on a connection whose errors are one line (see `connect_nats`)."""
    from services.tools.client import Client

    return Client(s, name, nc=await connect_nats(s, name))


LINEAGE_WAIT_S = 30.0
FULL_ID_LENGTH = 36  # a uuid as text: event ids published by cairn itself


def lineage_store(s: CairnSettings, wait: bool = True):
    """The lineage store; by default first caught up with the stream, so a query reads its writes."""
    from services.lineage.store import LineageStore

    store = LineageStore(s.lineage_url)
    if wait:
        from services.lineage.catchup import wait_until_caught_up

        def behind(at: int, last: int) -> None:
            typer.echo(
                f"waiting for the lineage store to reach the stream ({at} of {last} events)...", err=True
            )

        async def go() -> tuple[int, int]:
            from nats.js.errors import NotFoundError

            await (await connect_nats(s, "lineage-query")).close()  # a clear error when NATS is not there
            try:
                return await wait_until_caught_up(s, store, LINEAGE_WAIT_S, behind)
            except NotFoundError:
                raise stream_missing(s) from None

        at, last = asyncio.run(go())
        if at < last:
            typer.echo(
                f"the lineage store is still behind the stream ({at} of {last} events) after "
                f"{LINEAGE_WAIT_S:.0f}s: is the lineage service running? Answers may be incomplete.",
                err=True,
            )
    return store


def full_id(store: Any, ident: str) -> str:
    """The one event id that starts with `ident`, as git resolves a short hash; ident if none does."""
    matches = store.event_ids_starting(ident, limit=6)
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise CliError(f"{ident!r} is ambiguous: it starts {shown}; give more characters", EXIT_USAGE)
    return matches[0] if matches else ident


async def stream_messages(s: CairnSettings) -> list[tuple[int, str, bytes]]:
    from nats.js.errors import NotFoundError

    from services.lineage.archive import ArchiveError
    from services.lineage.audit import history_records
    from services.platform.bus.availability import jetstream_when_available

    nc = await connect_nats(s, "audit")
    try:
        return await jetstream_when_available(lambda: history_records(nc.jetstream(), s))
    except NotFoundError:
        raise stream_missing(s) from None
    except ArchiveError as exc:
        raise CliError(f"the archive is not intact: {exc}") from None
    finally:
        await nc.close()
