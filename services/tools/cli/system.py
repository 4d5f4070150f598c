"""Running cairn: the supervisor, single services, the endpoint, provisioning, status, settings."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from services.platform.settings import CairnSettings
from services.tools.cli.common import (
    EXIT_USAGE,
    READER,
    CliError,
    app,
    configure_logging,
    connect_nats,
    settings,
    stream_missing,
)


@app.command()
def run(
    service: Annotated[
        str, typer.Argument(help="ingestion, features, tuning, training, evaluation, deployment or lineage.")
    ],
) -> None:
    """Run one service (an operator runs one process per replica); waits for NATS and the stream."""
    from services.platform.event_loop import event_loop_factory
    from services.platform.runtime import ServiceRunner
    from services.tools.catalog import SERVICES, build_service

    if service not in SERVICES:
        raise CliError(f"unknown service {service!r}; choose one of: {', '.join(SERVICES)}", EXIT_USAGE)
    s = settings(service)  # against `cairn up`'s server from this home: as its own user
    try:
        s.resolved_nats_url()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    configure_logging(s)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(ServiceRunner(build_service(service, s)).run_forever())
    exit_now()


def exit_now() -> None:
    """Leave once the service has closed what it opened (connection, Dask cluster, HTTP): the
    interpreter's own teardown of a service's libraries took about a second of CPU, four with seven
    services stopping at once on two cores, and holds nothing that still needs saving."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port; default CAIRN_SERVE_PORT.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address; default CAIRN_SERVE_HOST.")] = None,
) -> None:
    """Run the inference endpoint for every model's champion (same as `cairn serving start`)."""
    from services.tools.cli.serving import start

    start(port=port, host=host, workers=None)


@app.command()
def provision() -> None:
    """The admin step: create or update the stream, the buckets, the MLflow and lineage schemas."""
    from services.tools.provisioning import provision_everything

    s = settings()

    def waiting(why: str) -> None:
        typer.echo(f"waiting for JetStream: {why}", err=True)

    async def go() -> dict[str, str]:
        nc = await connect_nats(s, "admin")  # a clear error when NATS is not there
        await nc.close()
        return await provision_everything(s, on_wait=waiting)

    for part, done in asyncio.run(go()).items():
        typer.echo(f"{part}: {done}")


@app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once everything is ready.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 180.0,
) -> None:
    """Start NATS (unless CAIRN_NATS_URL is set), every service and the inference endpoint.

    In the foreground, SIGINT or SIGTERM stops everything; so does SIGKILL (children die with it)."""
    import signal

    from services.tools import supervisor

    s = every_tenant(settings(None))  # the supervisor gives each child its own user
    if running := supervisor.still_running(s):
        raise CliError(
            f"cairn is already up from {s.home_dir} ({', '.join(running)}): stop it with `cairn down`"
        )
    supervisor.down(s)  # the record a crashed start left behind

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    keep = False
    try:
        try:
            runtime = supervisor.up(s, tied=not detach)
        except (supervisor.PortInUse, supervisor.forks.LauncherError) as exc:
            raise CliError(str(exc)) from None
        not_ready = supervisor.wait_ready(runtime, timeout)
        if not_ready:
            detail = "; ".join(f"{n}: {why}" for n, why in not_ready.items())
            raise CliError(f"not ready: {detail}; logs in {s.home_dir / 'logs'}")
        typer.echo(f"cairn is up: NATS {runtime['nats_url']}, inference {runtime.get('serve_url')}")
        typer.echo(f"state in {s.home_dir}; stop with `cairn down`" + ("" if detach else " or Ctrl-C"))
        if detach:
            keep = True
            return
        _watch_children(runtime)
    except KeyboardInterrupt:
        pass
    finally:
        if not keep:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if stopped := supervisor.down(s):
                typer.echo("stopped: " + ", ".join(stopped), err=True)


def every_tenant(s: CairnSettings) -> CairnSettings:
    """`up` and `down` act for the whole home; with CAIRN_NATS_URL (another server's accounts), `up`
    starts the one tenant CAIRN_TENANT names."""
    from services.platform.settings import DEFAULT_TENANT

    if s.tenant != DEFAULT_TENANT and not s.nats_url:
        raise CliError(
            "`cairn up` and `cairn down` start and stop every tenant of the home: run them without "
            "--tenant (or CAIRN_TENANT)",
            EXIT_USAGE,
        )
    return s


def _watch_children(runtime: dict) -> None:
    """Block until a signal; say once when a child exits on its own (its log says why)."""
    from services.tools import supervisor

    reported: set[str] = set()
    while True:
        time.sleep(1)
        for name in runtime["pids"]:
            if name not in reported and (why := supervisor.exited(runtime, name)):
                typer.echo(f"{name}: {why}", err=True)
                reported.add(name)


@app.command()
def down() -> None:
    """Stop what `cairn up` started from this home."""
    from services.tools import supervisor

    s = every_tenant(settings(None))
    stopped = []
    if (pid := supervisor.running_supervisor(s)) is not None:
        import signal

        stopped = [f"cairn up (pid {pid}) and its children"]
        os.kill(pid, signal.SIGTERM)  # it stops its children itself, NATS last
        deadline = time.monotonic() + 30
        while supervisor.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    result = supervisor.stop_recorded(s)
    for gone in result.gone:
        typer.echo(f"{gone}: gone, not signalled (that pid is no longer the process `cairn up` started)")
    typer.echo("stopped: " + (", ".join(stopped + result.stopped) or "nothing was running"))


@dataclass(frozen=True)
class ConsumerLag:
    """A service's durable consumer as `cairn status` reports it; `cairn ui`'s live page draws it."""

    service: str
    durable: str
    state: str  # live, IDLE-NO-PULLERS (bound by nobody pulling) or MISSING
    pending: int = 0  # not delivered yet: the lag
    ack_pending: int = 0  # delivered, not acknowledged yet: in flight
    redelivered: int = 0


def consumer_names(s: CairnSettings) -> list[tuple[str, str]]:
    """(service, durable) for every consumer the services bind."""
    from services.tools.catalog import SERVICES, durables

    return [(name, durable) for name in SERVICES for durable in durables(name, s)]


async def consumer_lags(js: Any, stream: str, names: list[tuple[str, str]]) -> list[ConsumerLag]:
    """Each consumer's lag from the server: live when someone pulls or holds a message."""
    from nats.js.errors import NotFoundError

    out = []
    for name, durable in names:
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            out.append(ConsumerLag(name, durable, "MISSING"))
            continue
        live = (info.num_waiting or 0) > 0 or (info.num_ack_pending or 0) > 0
        out.append(
            ConsumerLag(
                name, durable, "live" if live else "IDLE-NO-PULLERS",
                info.num_pending or 0, info.num_ack_pending or 0, info.num_redelivered or 0,
            )
        )  # fmt: skip
    return out


@app.command()
def status() -> None:
    """The NATS cluster (servers, the stream's leader, replicas current or lagging) and each service's
    consumers: bound, live, pending (lag). Exit 0 only when all are live and every replica current."""
    s = settings(READER)

    async def go() -> bool:
        from nats.js.errors import NotFoundError

        nc = await connect_nats(s, "status")
        js = nc.jetstream()
        all_live = True
        try:
            try:
                info = await js.stream_info(s.stream)
            except NotFoundError:
                raise stream_missing(s) from None
            lines, healthy = cluster_report(info.cluster, info.config.num_replicas, nc.servers)
            for line in lines:
                typer.echo(line)
            all_live &= healthy
            for lag in await consumer_lags(js, s.stream, consumer_names(s)):
                all_live &= lag.state == "live"
                if lag.state == "MISSING":
                    typer.echo(f"{lag.service:<11} {lag.durable:<34} MISSING")
                    continue
                typer.echo(
                    f"{lag.service:<11} {lag.durable:<34} {lag.state:<16} pending={lag.pending} "
                    f"in-flight={lag.ack_pending} redelivered={lag.redelivered}"
                )
        finally:
            await nc.close()
        return all_live

    ok = asyncio.run(go())
    serve_url = s.runtime().get("serve_url")
    if serve_url:
        import httpx

        try:
            ready = httpx.get(serve_url + "/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            ready = False
        typer.echo(f"{'serve':<11} {serve_url:<34} {'live' if ready else 'DOWN'}")
        ok &= ready
    raise typer.Exit(0 if ok else 1)


UNREACHABLE_AFTER_NS = 10 * 10**9  # a replica not heard from for this long is down or cut off


def cluster_report(cluster: Any, replicas: int | None, servers: list[Any]) -> tuple[list[str], bool]:
    """The stream's place in a JetStream cluster: its leader and each replica current, lagging,
    unreachable or offline; healthy when every replica is current. A lone server: one line."""
    known = ", ".join(sorted({f"{u.hostname}:{u.port}" for u in servers}))
    if cluster is None or not cluster.name:
        return [f"{'nats':<11} {'one server, no cluster':<34} servers {known}"], True
    head = f"{'nats':<11} {'cluster ' + cluster.name:<34} servers {known}"
    lines = [head, f"{'stream':<11} {'R' + str(replicas or 1):<34} leader {cluster.leader or 'NONE'}"]
    healthy = bool(cluster.leader)
    for peer in cluster.replicas or []:
        if peer.offline:
            state = "OFFLINE"
        elif peer.current:
            state = "current"
        elif peer.active is not None and peer.active > UNREACHABLE_AFTER_NS:
            state = "UNREACHABLE"  # a killed or partitioned server is reported this way, not offline
        else:
            state = "LAGGING"
        healthy &= state == "current"
        seen = f" seen {peer.active / 1e9:.1f}s ago" if peer.active is not None else ""
        lines.append(f"{'replica':<11} {peer.name or '?':<34} {state} lag={peer.lag or 0}{seen}")
    return lines, healthy


@app.command("nats-config")
def nats_config(
    out: Annotated[Path, typer.Option(help="Folder for the server config, passwords and TLS files.")] = Path(
        ".cairn/nats-auth"
    ),
    tls: Annotated[bool, typer.Option(help="Also generate a CA, a server and client certificates.")] = False,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A DNS name of the server certificate besides localhost (repeatable; with --tls), e.g. "
            "the Kubernetes Service's names and *.<headless service> for cluster routes.",
        ),
    ] = None,
) -> None:
    """Generate a nats-server config with one user per service and least-privilege permissions."""
    from services.platform.tls import write_tls
    from services.tools.nats_auth import write_nats_config

    if host and not tls:
        raise typer.BadParameter("--host names the server certificate: it needs --tls")
    written = write_nats_config(out, tls=tls)
    if host:  # the same CA (kept), the leaves reissued for these names too
        written += write_tls(out.expanduser().resolve() / "tls", hosts=host)
    for path in dict.fromkeys(written):
        typer.echo(str(path))


@app.command("dask-tls")
def dask_tls(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, tls.crt, tls.key.")],
) -> None:
    """Certificates for Dask's mutual TLS between services, scheduler and workers (keep ca.key offline)."""
    from services.platform.dask_tls import write_dask_tls

    for path in write_dask_tls(out):
        typer.echo(str(path))


@app.command()
def schemas(
    check: Annotated[
        bool,
        typer.Option("--check", help="Only check: against the last release, generated files current."),
    ] = False,
    release: Annotated[
        bool,
        typer.Option("--release", help="Snapshot the schemas as release <pyproject version>; no rewrites."),
    ] = False,
) -> None:
    """Write the JSON Schemas and the AsyncAPI document into contracts/, if compatible with the release.

    Compatibility is judged against the last release's snapshot (contracts/releases/<version>/), not
    the working tree: a change old events or not-yet-upgraded consumers could not follow
    (docs/CONTRACTS.md) is refused, naming each field; exit 1."""
    from contracts.schemas import Refused, check_all, cut_release, judge, write_all

    if check and release:
        raise CliError("--check and --release exclude each other", EXIT_USAGE)
    try:
        verdict = judge()
        for line in verdict.additive:
            typer.echo(line)
        if check:
            check_all()
            typer.echo(f"compatible with release {verdict.release}; the generated files are current")
        elif release:
            typer.echo(str(cut_release()))
        else:
            for path in write_all():
                typer.echo(str(path))
    except Refused as exc:
        for line in exc.lines:
            typer.echo(line, err=True)
        raise CliError(str(exc)) from None


@app.command("settings")
def show_settings() -> None:
    """Every CAIRN_ variable: type, default, meaning."""
    for name, field in CairnSettings.model_fields.items():
        typer.echo(f"CAIRN_{name.upper():<22} default={field.default!r:<28} {field.description or ''}")
