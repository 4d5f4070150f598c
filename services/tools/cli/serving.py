"""The inference endpoint's own commands: start it (with its workers), read its request records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from services.tools.cli.common import CliError, app, configure_logging, connect_nats, settings

serving_app = typer.Typer(no_args_is_help=True, help="The inference endpoint and its request records.")
app.add_typer(serving_app, name="serving")


@serving_app.command("start")
def start(
    port: Annotated[int | None, typer.Option(help="Port; default CAIRN_SERVE_PORT.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address; default CAIRN_SERVE_HOST.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Worker processes; default CAIRN_SERVE_WORKERS (0: per CPU).")
    ] = None,
) -> None:
    """Run the endpoint (v1 and Open Inference Protocol v2 routes) with its worker processes."""
    from services.serving.launch import run_endpoint
    from services.tools.supervisor import PortInUse, check_port

    s = settings("serve")  # against `cairn up`'s server from this home: as the endpoint's user
    if workers is not None:
        s = s.model_copy(update={"serve_workers": workers})
    host, port = host or s.serve_host, s.serve_port if port is None else port
    try:
        s.resolved_nats_url()
        if port:
            check_port(host, port)
    except (RuntimeError, PortInUse) as exc:
        raise CliError(str(exc)) from None
    configure_logging(s)
    run_endpoint(s, host, port)


@serving_app.command("requests")
def requests(
    model: Annotated[str | None, typer.Option(help="Only this model's records.")] = None,
    last: Annotated[int, typer.Option(min=1, max=100_000, help="How many of the newest records.")] = 20,
) -> None:
    """Which model version answered which request: the sampled records (CAIRN_REQUEST_RECORD_RATE)."""
    from services.serving.records import read_records

    s = settings()

    async def go():
        nc = await connect_nats(s, "admin")
        try:
            return await read_records(nc.jetstream(), s, model=model, last=last)
        finally:
            await nc.close()

    for record in asyncio.run(go()):
        typer.echo(json.dumps(record.model_dump(mode="json"), sort_keys=True))


@serving_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Folder for model-signing-private.pem and -public.pem.")],
) -> None:
    """An EC P-256 key pair for OpenSSF model signing: deployment signs champions with the private key
    (CAIRN_MODEL_SIGNING_KEY), the endpoint verifies with the public one (CAIRN_MODEL_VERIFY_KEY)."""
    from services.platform.model_signatures import PRIVATE_NAME
    from services.platform.model_signatures import keygen as make_pair

    if (out / PRIVATE_NAME).exists():
        raise CliError(f"{out / PRIVATE_NAME} exists: keep it, or choose another --out")
    for path in make_pair(out):
        typer.echo(str(path))
