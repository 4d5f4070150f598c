"""The `cairn` command line: run the system, feed it data, watch it, query it."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from contracts import (
    DataArrived,
    DataFormat,
    DataRejected,
    DeploymentFailed,
    Envelope,
    EventRejected,
    ModelDeployed,
    ModelEvaluated,
    ModelFamily,
    SearchStrategy,
    Task,
    TrialCompleted,
    TrialRequested,
    TrialsPromoted,
    TuningCompleted,
    TuningRequested,
    TuningSpec,
    decode,
    event_type_of,
    new_event,
    subject_for,
)
from services.settings import CairnSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXIT_DEPLOYED, EXIT_FAILED, EXIT_NOT_PROMOTED = 0, 1, 3


def settings() -> CairnSettings:
    return CairnSettings()


def _logging(s: CairnSettings) -> None:
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(service: str) -> None:
    """Run one service (an operator runs one process per replica)."""
    from services.catalog import build_service
    from services.runtime import ServiceRunner

    s = settings()
    _logging(s)
    asyncio.run(ServiceRunner(build_service(service, s)).run_forever())


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port; default CAIRN_SERVE_PORT.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address; default CAIRN_SERVE_HOST.")] = None,
) -> None:
    """Run the inference endpoint for every model's champion."""
    import uvicorn

    from services.serving.app import InferenceServer

    s = settings()
    _logging(s)
    server = InferenceServer(s)
    uvicorn.run(
        server.app(),
        host=host or s.serve_host,
        port=port or s.serve_port,
        log_level="warning",
        limit_concurrency=256,
    )


@app.command()
def provision() -> None:
    """Create or update the stream and buckets (an admin step; services never need these rights)."""
    from services.bus.connection import connect
    from services.bus.provision import provision_all

    async def go() -> str:
        nc = await connect(settings(), "admin")
        try:
            return await provision_all(nc.jetstream(), settings())
        finally:
            await nc.close()

    typer.echo(f"stream {settings().stream}: {asyncio.run(go())}")


@app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once everything is ready.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 180.0,
) -> None:
    """Start NATS (unless CAIRN_NATS_URL is set), every service and the inference endpoint."""
    from services import supervisor

    s = settings()
    if (s.home_dir / "runtime.json").exists():
        supervisor.down(s)
    runtime = supervisor.up(s)
    not_ready = supervisor.wait_ready(runtime, timeout)
    if not_ready:
        typer.echo(f"not ready: {not_ready}; logs in {s.home_dir / 'logs'}", err=True)
        supervisor.down(s)
        raise typer.Exit(1)
    typer.echo(f"cairn is up: NATS {runtime['nats_url']}, inference {runtime.get('serve_url')}")
    typer.echo(f"state in {s.home_dir}; stop with `cairn down`")
    if detach:
        return
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.down(s)


@app.command()
def down() -> None:
    """Stop what `cairn up` started in this home."""
    from services import supervisor

    stopped = supervisor.down(settings())
    typer.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


@app.command()
def status() -> None:
    """Each service's consumers: bound, live, pending (lag). Exit 0 only when all are live."""
    from services.catalog import SERVICES, durables

    s = settings()

    async def go() -> bool:
        from nats.js.errors import NotFoundError

        from services.bus.connection import connect

        nc = await connect(s, "status")
        js = nc.jetstream()
        all_live = True
        try:
            for name in SERVICES:
                for durable in durables(name, s):
                    try:
                        info = await js.consumer_info(s.stream, durable)
                    except NotFoundError:
                        typer.echo(f"{name:<11} {durable:<34} MISSING")
                        all_live = False
                        continue
                    live = (info.num_waiting or 0) > 0 or (info.num_ack_pending or 0) > 0
                    all_live &= live
                    typer.echo(
                        f"{name:<11} {durable:<34} {'live' if live else 'IDLE-NO-PULLERS':<16} "
                        f"pending={info.num_pending} in-flight={info.num_ack_pending} "
                        f"redelivered={info.num_redelivered}"
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


def summary(event: Envelope[Any]) -> str:
    d = event.data
    if isinstance(d, DataArrived):
        return f"{d.uri} target={d.target}"
    if isinstance(d, TrialCompleted):
        return f"trial {d.trial_id} rung {d.rung} {d.family.value} {d.metric.value}={d.score}"
    if isinstance(d, ModelEvaluated):
        return f"passed={d.passed} " + "; ".join(d.reasons)
    if isinstance(d, ModelDeployed):
        return f"{d.model_name} v{d.version} sha256={d.model.sha256[:12]}"
    if isinstance(d, DataRejected | EventRejected | DeploymentFailed):
        return f"REJECTED: {d.reason}"
    if isinstance(d, TuningRequested):
        return (
            f"{d.study_id}: {len(d.configurations)} configurations, {d.strategy.value}, rungs "
            + ", ".join(f"{r.keep}x{r.budget}" for r in d.rungs)
        )
    if isinstance(d, TrialsPromoted):
        return f"rung {d.from_rung} -> {d.to_rung}: {len(d.promoted)} of {len(d.evidence)} promoted"
    if isinstance(d, TrialRequested):
        return f"trial {d.trial_id} rung {d.rung} {d.family.value} budget {d.budget}"
    if isinstance(d, TuningCompleted):
        best = d.leaderboard[0]
        return f"best {best.family.value} {d.metric.value}={best.score:.4f} of {d.trials_completed} trials"
    for attr in ("model", "featureset", "dataset"):
        ref = getattr(d, attr, None)
        if ref is not None and hasattr(ref, "sha256"):
            return f"{attr} sha256={ref.sha256[:12]}"
    return ""


async def _follow(s: CairnSettings, deliver_new: bool):
    from nats.js.api import DeliverPolicy

    from services.bus.connection import connect

    nc = await connect(s, "events")
    js = nc.jetstream()
    policy = DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL
    sub = await js.subscribe(f"{s.namespace}.>", ordered_consumer=True, deliver_policy=policy)
    return nc, js, sub


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    correlation: Annotated[str | None, typer.Option("--correlation", "-c", help="Only one run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print whole events.")] = False,
) -> None:
    """Print the event log, oldest first."""
    s = settings()

    async def go() -> None:
        nc, js, sub = await _follow(s, deliver_new=False)
        try:
            info = await js.stream_info(s.stream)
            last = info.state.last_seq
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0 if not follow else 3600)
                except TimeoutError:
                    if not follow:
                        return
                    continue
                seq = msg.metadata.sequence.stream
                _print_event(msg, seq, correlation, as_json)
                if not follow and seq >= last:
                    return
        finally:
            await nc.close()

    asyncio.run(go())


def _print_event(msg: Any, seq: int, correlation: str | None, as_json: bool) -> None:
    if ".dlq." in msg.subject:
        if correlation is None:
            typer.echo(
                f"{seq:>6} {msg.subject:<32} dead letter: {(msg.headers or {}).get('Cairn-Reason', '')}"
            )
        return
    try:
        event = decode(msg.data)
    except Exception:  # noqa: BLE001 - the log may hold invalid events; show them as such
        if correlation is None:
            typer.echo(f"{seq:>6} {msg.subject:<32} (invalid event, {len(msg.data)} bytes)")
        return
    if correlation and event.correlationid != correlation:
        return
    if as_json:
        typer.echo(event.encode().decode())
    else:
        typer.echo(f"{seq:>6} {event.time:%H:%M:%S} {event.type:<28} {event.id[:8]} {summary(event)}")


@app.command()
def submit(
    path: str,
    target: Annotated[str, typer.Option(help="Column to predict.")],
    task: Annotated[
        Task | None, typer.Option(help="regression or classification; inferred if absent.")
    ] = None,
    trials: Annotated[int, typer.Option(help="Trials to sample.")] = 80,
    strategy: Annotated[SearchStrategy, typer.Option(help="asha (successive halving) or random.")] = (
        SearchStrategy.asha
    ),
    families: Annotated[str, typer.Option(help="Comma-separated model families.")] = (
        "xgboost,random_forest,linear"
    ),
    max_budget: Annotated[int, typer.Option(help="Full budget: boosting rounds / trees x3.")] = 300,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Champion scope.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split and every trial.")] = 0,
    data_format: Annotated[DataFormat | None, typer.Option("--format", help="Override the format.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the file.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 1800.0,
) -> None:
    """Publish a data-arrival event; with --wait, follow it (exit 0 deployed, 3 not promoted, 1 failed)."""
    s = settings()
    uri = path if "://" in path else Path(path).resolve().as_uri()
    arrived = DataArrived(
        uri=uri,
        target=target,
        task=task,
        format=data_format,
        sha256=sha256,
        model_name=model_name,
        seed=seed,
        tuning=TuningSpec(
            trials=trials,
            strategy=strategy,
            families=[ModelFamily(f.strip()) for f in families.split(",") if f.strip()],
            max_budget=max_budget,
        ),
    )
    event = new_event(arrived, source="/cairn/cli", subject=model_name)
    code = asyncio.run(_submit(s, event, wait, timeout))
    raise typer.Exit(code)


async def _submit(s: CairnSettings, event: Envelope[Any], wait: bool, timeout: float) -> int:
    from services.bus.publisher import event_headers

    nc, js, sub = await _follow(s, deliver_new=True)
    try:
        await js.publish(
            subject_for(event.type, s.namespace),
            event.encode(),
            headers=event_headers(event),
            stream=s.stream,
        )
        typer.echo(f"submitted {event.id} (correlation {event.correlationid})")
        if not wait:
            return 0
        return await watch_run(sub, event.correlationid, timeout)
    finally:
        await nc.close()


async def watch_run(sub: Any, correlation: str, timeout: float) -> int:
    """Follow one run to its terminal event with a progress line; returns the exit code."""
    deadline = time.monotonic() + timeout
    planned, done, best, metric = 0, 0, None, ""
    interactive = sys.stdout.isatty()
    while time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            continue
        if ".dlq." in msg.subject:
            continue
        try:
            ev = decode(msg.data)
        except Exception:  # noqa: BLE001
            continue
        if ev.correlationid != correlation:
            continue
        d = ev.data
        if isinstance(d, TuningRequested):
            planned = sum(r.keep for r in d.rungs)
            metric = d.metric.value
        elif isinstance(d, TrialCompleted):
            done += 1
            if d.score is not None and (
                best is None or (d.score > best if d.metric.higher_is_better else d.score < best)
            ):
                best = d.score
            line = (
                f"trials {done}/{planned or '?'}  best {metric}={best:.4f}"
                if best is not None
                else f"trials {done}/{planned or '?'}"
            )
            bar = "#" * int(30 * done / planned) if planned else ""
            text = f"[{bar:<30}] {line}"
            if interactive:
                typer.echo("\r" + text, nl=False)
            elif done == planned or done % 20 == 0:
                typer.echo(text)
            continue
        if isinstance(d, TrialRequested):
            continue
        if interactive and done:
            typer.echo("")
        typer.echo(f"{event_type_of(type(d)):<28} {summary(ev)}")
        if isinstance(d, ModelDeployed):
            return EXIT_DEPLOYED
        if isinstance(d, ModelEvaluated) and not d.passed:
            return EXIT_NOT_PROMOTED
        if isinstance(d, DataRejected | EventRejected | DeploymentFailed):
            return EXIT_FAILED
    typer.echo(f"timed out after {timeout}s", err=True)
    return EXIT_FAILED


@app.command()
def predict(
    rows: Annotated[str, typer.Argument(help="A JSON object or list of objects (raw columns).")],
    model: Annotated[str | None, typer.Option("--model", help="Model name; default: the only one.")] = None,
    url: Annotated[
        str | None, typer.Option(help="Inference URL; default: the one `cairn up` serves.")
    ] = None,
) -> None:
    """Ask the inference endpoint for predictions and print them."""
    import httpx

    s = settings()
    base = url or s.runtime().get("serve_url") or f"http://{s.serve_host}:{s.serve_port}"
    if model is None:
        models = httpx.get(base + "/v1/models", timeout=10).json()
        if len(models) != 1:
            typer.echo(f"choose a model with --model: {', '.join(models) or 'none deployed'}", err=True)
            raise typer.Exit(1)
        model = next(iter(models))
    response = httpx.post(
        f"{base}/v1/models/{model}/predict",
        content=rows.encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    if response.status_code != 200:
        typer.echo(f"{response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(response.json(), indent=2))


audit_app = typer.Typer(no_args_is_help=True, help="Tamper-evident audit trail.")
app.add_typer(audit_app, name="audit")


def _lineage_store(s: CairnSettings):
    from services.lineage.store import LineageStore

    return LineageStore(s.lineage_url)


async def _stream(s: CairnSettings) -> list[tuple[int, str, bytes]]:
    from services.bus.connection import connect
    from services.lineage.audit import stream_records

    nc = await connect(s, "audit")
    try:
        return await stream_records(nc.jetstream(), s.stream)
    finally:
        await nc.close()


@app.command()
def lineage(
    ident: Annotated[str, typer.Argument(help="Event id, artifact hash (8+ hex), model name, or 'rebuild'.")],
    fmt: Annotated[str, typer.Option("--format", help="text, json, mermaid or dot.")] = "text",
    into: Annotated[
        str | None, typer.Option(help="With rebuild: a store URL other than CAIRN_LINEAGE_DB.")
    ] = None,
) -> None:
    """Upstream to the raw data, downstream to deployments; `cairn lineage rebuild` re-derives the store."""
    from services.lineage import graph
    from services.lineage.audit import rebuild
    from services.lineage.store import LineageStore

    s = settings()
    if ident == "rebuild":
        store = LineageStore(into or s.lineage_url)
        count = rebuild(store, asyncio.run(_stream(s)))
        typer.echo(f"rebuilt {count} records into {store.url}")
        return
    if fmt not in {"text", "json", "mermaid", "dot"}:
        raise typer.BadParameter("--format must be text, json, mermaid or dot")
    store = _lineage_store(s)
    try:
        record = graph.resolve(store, ident)
    except graph.NotFound as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(graph.render(store, record, fmt))


@audit_app.command("verify")
def audit_verify(
    bundle: Annotated[Path | None, typer.Option(help="Verify an exported bundle offline instead.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Key that signed the bundle off (HMAC).")] = None,
) -> None:
    """Check the hash chain against the stream; name the first modified, missing or reordered record."""
    from services.lineage.audit import verify_against_stream, verify_bundle

    if bundle is not None:
        verdict = verify_bundle(bundle, key_file.read_bytes() if key_file else None)
    else:
        s = settings()
        verdict = verify_against_stream(_lineage_store(s).all(), asyncio.run(_stream(s)))
    typer.echo(verdict.text())
    raise typer.Exit(0 if verdict.ok else 2)


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Argument(help="Bundle file (JSON lines).")],
    key_file: Annotated[Path | None, typer.Option(help="Sign the head off with this key (HMAC).")] = None,
) -> None:
    """Write events + chain head to a bundle that `cairn audit verify --bundle` checks offline."""
    from services.lineage.audit import export_bundle

    s = settings()
    verdict = export_bundle(
        _lineage_store(s).all(), out, s.stream, key_file.read_bytes() if key_file else None
    )
    typer.echo(f"exported {verdict.checked} records, head {verdict.head} -> {out}")


@app.command()
def replay(
    correlation: Annotated[str | None, typer.Option("--correlation", help="One run.")] = None,
    since: Annotated[str | None, typer.Option(help="Runs started at or after this ISO time.")] = None,
    from_seq: Annotated[
        int | None, typer.Option("--from-seq", help="Runs from this stream sequence.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per run.")] = 1800.0,
) -> None:
    """Re-run history in an isolated namespace; exit 0 only if every artifact is bit-identical."""
    from datetime import datetime

    from services.lineage.replay import render
    from services.lineage.replay import replay as run_replay

    if not (correlation or since or from_seq):
        raise typer.BadParameter("give --correlation, --since or --from-seq")
    reports = asyncio.run(
        run_replay(
            settings(),
            correlation=correlation,
            since=datetime.fromisoformat(since) if since else None,
            from_seq=from_seq,
            timeout=timeout,
        )
    )
    typer.echo(render(reports))
    raise typer.Exit(0 if reports and all(r.identical for r in reports) else 2)


@app.command("nats-config")
def nats_config(
    out: Annotated[Path, typer.Option(help="Folder for the server config, passwords and TLS files.")] = Path(
        ".cairn/nats-auth"
    ),
    tls: Annotated[bool, typer.Option(help="Also generate a CA, a server and client certificates.")] = False,
) -> None:
    """Generate a nats-server config with one user per service and least-privilege permissions."""
    from services.security import write_nats_config

    for path in write_nats_config(out, tls=tls):
        typer.echo(str(path))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[str | None, typer.Option("--model", help="Model name; default: the only text model.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same text.")] = 0,
    url: Annotated[str | None, typer.Option(help="Inference URL; default: the one `cairn up` serves.")] = None,
) -> None:
    """Continue a prompt with a deployed text model."""
    import httpx

    s = settings()
    base = url or s.runtime().get("serve_url") or f"http://{s.serve_host}:{s.serve_port}"
    if model is None:
        models = httpx.get(base + "/v1/models", timeout=10).json()
        text_models = [n for n, m in models.items() if m["task"] == "text_generation"]
        if len(text_models) != 1:
            typer.echo(f"choose a model with --model: {', '.join(text_models) or 'no text model deployed'}", err=True)
            raise typer.Exit(1)
        model = text_models[0]
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    response = httpx.post(f"{base}/v1/models/{model}/generate", json=body, timeout=120)
    if response.status_code != 200:
        typer.echo(f"{response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)
    typer.echo(prompt + response.json()["text"])


@app.command()
def schemas() -> None:
    """Write the JSON Schemas and the AsyncAPI document into contracts/."""
    from contracts.schemas import write_all

    for path in write_all():
        typer.echo(str(path))


@app.command("settings")
def show_settings() -> None:
    """Every CAIRN_ variable: type, default, meaning."""
    for name, field in CairnSettings.model_fields.items():
        typer.echo(f"CAIRN_{name.upper():<22} default={field.default!r:<28} {field.description or ''}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
