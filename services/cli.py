"""The `cairn` command line: run the system, feed it data, watch it, query it.

Exit codes: 0 success (a run deployed), 1 failure (a run failed, a server unreachable),
2 usage error (a bad option, an unknown name), 3 a run's model was not promoted by the gate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    pretty_exceptions_show_locals=False,  # locals can hold secrets (passwords, keys)
)

EXIT_DEPLOYED, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_PROMOTED = 0, 1, 2, 3


class CliError(Exception):
    """A user error: one line on stderr saying what is wrong and what to do, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.code = code


def settings() -> CairnSettings:
    from pydantic import ValidationError

    try:
        return CairnSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"CAIRN_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(f"invalid setting: {problems}", EXIT_USAGE) from None


async def _connect(s: CairnSettings, name: str):
    """A NATS connection for a command, or a one-line error saying how to get one."""
    from services.bus.connection import connect

    try:
        url = s.resolved_nats_url()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None

    async def quiet(_: Exception) -> None:
        """nats-py logs a traceback per failed attempt by default; the one line below says it all."""

    try:
        return await connect(s, name, error_cb=quiet, max_reconnect_attempts=1, reconnect_time_wait=0.5)
    except Exception as exc:  # noqa: BLE001 - nats-py raises several kinds for one cause
        raise CliError(
            f"cannot reach NATS at {url} ({type(exc).__name__}): start it with `cairn up`, "
            "or point CAIRN_NATS_URL at a running server"
        ) from None


def _stream_missing(s: CairnSettings) -> CliError:
    return CliError(f"stream {s.stream} not found on the NATS server: run `cairn provision` first")


def _logging(s: CairnSettings) -> None:
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    service: Annotated[
        str, typer.Argument(help="ingestion, features, tuning, training, evaluation, deployment or lineage.")
    ],
) -> None:
    """Run one service (an operator runs one process per replica); waits for NATS and the stream."""
    from services.catalog import SERVICES, build_service
    from services.runtime import ServiceRunner

    if service not in SERVICES:
        raise CliError(f"unknown service {service!r}; choose one of: {', '.join(SERVICES)}", EXIT_USAGE)
    s = settings()
    try:
        s.resolved_nats_url()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
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
    from services.supervisor import PortInUse, check_port

    s = settings()
    host, port = host or s.serve_host, s.serve_port if port is None else port
    try:
        s.resolved_nats_url()
        if port:
            check_port(host, port)
    except (RuntimeError, PortInUse) as exc:
        raise CliError(str(exc)) from None
    _logging(s)
    server = InferenceServer(s)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", limit_concurrency=256)


@app.command()
def provision() -> None:
    """The admin step: create or update the stream, the buckets, the MLflow and lineage schemas."""
    from services.provisioning import provision_everything

    s = settings()

    async def go() -> dict[str, str]:
        nc = await _connect(s, "admin")  # a clear error when NATS is not there
        await nc.close()
        return await provision_everything(s)

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

    from services import supervisor

    s = settings()
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
        except supervisor.PortInUse as exc:
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


def _watch_children(runtime: dict) -> None:
    """Block until a signal; say once when a child exits on its own (its log says why)."""
    from services import supervisor

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
    from services import supervisor

    s = settings()
    stopped = []
    if (pid := supervisor.running_supervisor(s)) is not None:
        import signal

        stopped = [f"cairn up (pid {pid}) and its children"]
        os.kill(pid, signal.SIGTERM)  # it stops its children itself, NATS last
        deadline = time.monotonic() + 30
        while supervisor.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    stopped += supervisor.down(s)
    typer.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


@app.command()
def status() -> None:
    """Each service's consumers: bound, live, pending (lag). Exit 0 only when all are live."""
    from services.catalog import SERVICES, durables

    s = settings()

    async def go() -> bool:
        from nats.js.errors import NotFoundError

        nc = await _connect(s, "status")
        js = nc.jetstream()
        all_live = True
        try:
            try:
                await js.stream_info(s.stream)
            except NotFoundError:
                raise _stream_missing(s) from None
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
    from nats.js.errors import NotFoundError

    nc = await _connect(s, "events")
    js = nc.jetstream()
    policy = DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL
    try:
        sub = await js.subscribe(f"{s.namespace}.>", ordered_consumer=True, deliver_policy=policy)
    except NotFoundError:
        await nc.close()
        raise _stream_missing(s) from None
    return nc, js, sub


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    correlation: Annotated[str | None, typer.Option("--correlation", "-c", help="Only one run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print whole events.")] = False,
) -> None:
    """Print the event log, oldest first."""
    s = settings()
    if correlation and len(correlation) < FULL_ID_LENGTH:
        correlation = _full_id(_lineage_store(s), correlation)

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


TABLE_FAMILIES = "xgboost,random_forest,linear"
TEXT_TRIALS = 8  # transformer trials are minutes each on a CPU, not seconds


@app.command()
def submit(
    path: Annotated[str, typer.Argument(help="A local file (uploaded into the artifact store) or a URL.")],
    target: Annotated[str | None, typer.Option(help="Column to predict (tables; not for text).")] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="regression, classification or text_generation (text-generation); inferred if absent."
        ),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(help=f"Trials to sample; default 80, {TEXT_TRIALS} for text.")
    ] = None,
    strategy: Annotated[SearchStrategy, typer.Option(help="asha (successive halving) or random.")] = (
        SearchStrategy.asha
    ),
    families: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated model families; default {TABLE_FAMILIES}, transformer for text."),
    ] = None,
    max_budget: Annotated[int, typer.Option(help="Full budget: boosting rounds / trees x3.")] = 300,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Champion scope.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split and every trial.")] = 0,
    data_format: Annotated[DataFormat | None, typer.Option("--format", help="Override the format.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the file.")] = None,
    upload: Annotated[
        bool,
        typer.Option(
            "--upload/--no-upload",
            help="Upload a local file into the artifact store's landing area (default), or publish its "
            "path as given (the services must be able to read it: CAIRN_ALLOWED_ROOTS).",
        ),
    ] = True,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 1800.0,
) -> None:
    """Publish a data-arrival event; with --wait, follow it (exit 0 deployed, 3 not promoted, 1 failed)."""
    s = settings()
    task_value = _parse_task(task, data_format)
    is_text = task_value is Task.text_generation
    if target is None and not is_text:
        raise CliError(
            "--target is required for a table (omit it only with --task text_generation)", EXIT_USAGE
        )
    try:  # everything is checked before a byte is uploaded
        arrived = DataArrived(
            uri=Path(path).expanduser().absolute().as_uri() if "://" not in path else path,
            target=target,
            task=task_value,
            format=data_format,
            sha256=sha256,
            model_name=model_name,
            seed=seed,
            tuning=TuningSpec(
                trials=trials or (TEXT_TRIALS if is_text else 80),
                strategy=strategy,
                families=_parse_families(families or ("transformer" if is_text else TABLE_FAMILIES)),
                max_budget=max_budget,
            ),
        )
    except ValueError as exc:  # pydantic's ValidationError: a bad model name, seed, budget, ...
        raise CliError(f"invalid submission: {_first_error(exc)}", EXIT_USAGE) from None
    uri, digest = _locate(s, path, sha256, upload)
    arrived = arrived.model_copy(update={"uri": uri, "sha256": digest})
    event = new_event(arrived, source="/cairn/cli", subject=model_name)
    code = asyncio.run(_submit(s, event, wait, timeout))
    raise typer.Exit(code)


def _parse_task(task: str | None, data_format: DataFormat | None) -> Task | None:
    if task is None:
        return Task.text_generation if data_format is DataFormat.text else None
    try:
        return Task(task.strip().lower().replace("-", "_"))
    except ValueError:
        raise CliError(
            f"unknown task {task!r}; choose one of: {', '.join(t.value for t in Task)}", EXIT_USAGE
        ) from None


def _parse_families(text: str) -> list[ModelFamily]:
    names = [f.strip().lower().replace("-", "_") for f in text.split(",") if f.strip()]
    unknown = [n for n in names if n not in ModelFamily.__members__]
    if unknown or not names:
        choices = ", ".join(f.value for f in ModelFamily)
        given = ", ".join(unknown) or "(none given)"
        raise CliError(f"unknown model family {given}; choose from: {choices}", EXIT_USAGE)
    return [ModelFamily(n) for n in names]


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        e = errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        return f"{where}: {e['msg']}" if where else e["msg"]
    return str(exc).splitlines()[0]


def _locate(s: CairnSettings, path: str, sha256: str | None, upload: bool) -> tuple[str, str | None]:
    """The URI to publish and the expected hash: a local file goes into the landing area by default."""
    from urllib.parse import unquote, urlsplit

    if "://" in path and not path.startswith("file://"):
        return path, sha256  # already where the services read from (s3://, https://, ...)
    local = Path(unquote(urlsplit(path).path) if path.startswith("file://") else path).expanduser()
    if not local.exists():
        raise CliError(f"no such file: {local}")
    if not upload:
        return local.resolve().as_uri(), sha256
    if local.is_dir():
        raise CliError(
            f"{local} is a directory: submit one file, or publish the directory with --no-upload "
            "(it must then be under CAIRN_ALLOWED_ROOTS of the ingestion service)",
            EXIT_USAGE,
        )
    from services.artifacts import ArtifactStore

    try:
        ref = ArtifactStore(s.artifacts).put_file(local, _media_type(local))
    except PermissionError:
        raise CliError(f"cannot read {local}: permission denied") from None
    except OSError as exc:
        raise CliError(f"cannot upload {local} to {s.artifacts}: {exc}") from None
    if sha256 and sha256.lower() != ref.sha256:
        raise CliError(f"{local} has SHA-256 {ref.sha256}, not the expected {sha256}")
    typer.echo(f"uploaded {local} ({ref.size} bytes, sha256 {ref.sha256[:12]}) to {ref.uri}", err=True)
    return ref.uri, ref.sha256


def _media_type(path: Path) -> str:
    import mimetypes

    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


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
    try:
        json.loads(rows)
    except json.JSONDecodeError as exc:
        raise CliError(f"the rows are not JSON ({exc.msg} at character {exc.pos})", EXIT_USAGE) from None
    base = _endpoint(settings(), url)
    model = model or _only_model(base, lambda _: True, "model")
    response = _http(
        "post",
        f"{base}/v1/models/{model}/predict",
        content=rows.encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    typer.echo(json.dumps(response.json(), indent=2))


def _endpoint(s: CairnSettings, url: str | None) -> str:
    return (url or s.runtime().get("serve_url") or f"http://{s.serve_host}:{s.serve_port}").rstrip("/")


def _http(method: str, url: str, **kwargs: Any) -> Any:
    """One request to the endpoint; a refused connection or an error status is one line."""
    import httpx

    try:
        response = httpx.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        base = url.split("/v1/")[0]
        raise CliError(
            f"no inference endpoint at {base} ({type(exc).__name__}): start one with `cairn up` or "
            "`cairn serve`, or pass --url"
        ) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise CliError(f"{response.status_code} from {url}: {str(detail)[:500]}")
    return response


def _only_model(base: str, fits: Any, what: str) -> str:
    models = _http("get", base + "/v1/models", timeout=10).json()
    names = [n for n, m in models.items() if fits(m)]
    if len(names) != 1:
        raise CliError(
            f"choose a {what} with --model: {', '.join(names) or f'no {what} deployed yet'}", EXIT_USAGE
        )
    return names[0]


audit_app = typer.Typer(no_args_is_help=True, help="Tamper-evident audit trail.")
app.add_typer(audit_app, name="audit")


LINEAGE_WAIT_S = 30.0
FULL_ID_LENGTH = 36  # a uuid as text: event ids published by cairn itself


def _lineage_store(s: CairnSettings, wait: bool = True):
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

            await (await _connect(s, "lineage-query")).close()  # a clear error when NATS is not there
            try:
                return await wait_until_caught_up(s, store, LINEAGE_WAIT_S, behind)
            except NotFoundError:
                raise _stream_missing(s) from None

        at, last = asyncio.run(go())
        if at < last:
            typer.echo(
                f"the lineage store is still behind the stream ({at} of {last} events) after "
                f"{LINEAGE_WAIT_S:.0f}s: is the lineage service running? Answers may be incomplete.",
                err=True,
            )
    return store


def _full_id(store: Any, ident: str) -> str:
    """The one event id that starts with `ident`, as git resolves a short hash; ident if none does."""
    matches = store.event_ids_starting(ident, limit=6)
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise CliError(f"{ident!r} is ambiguous: it starts {shown}; give more characters", EXIT_USAGE)
    return matches[0] if matches else ident


async def _stream(s: CairnSettings) -> list[tuple[int, str, bytes]]:
    from nats.js.errors import NotFoundError

    from services.lineage.audit import stream_records

    nc = await _connect(s, "audit")
    try:
        return await stream_records(nc.jetstream(), s.stream)
    except NotFoundError:
        raise _stream_missing(s) from None
    finally:
        await nc.close()


@app.command()
def lineage(
    ident: Annotated[
        str,
        typer.Argument(
            help="Event id or its unique prefix, artifact hash (8+ hex), model name, or 'rebuild'."
        ),
    ],
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
        raise CliError("--format must be text, json, mermaid or dot", EXIT_USAGE)
    store = _lineage_store(s)
    try:
        record = graph.resolve(store, _full_id(store, ident))
    except graph.NotFound as exc:
        raise CliError(str(exc)) from None
    typer.echo(graph.render(store, record, fmt))


@audit_app.command("verify")
def audit_verify(
    bundle: Annotated[Path | None, typer.Option(help="Verify an exported bundle offline instead.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Key that signed the bundle off (HMAC).")] = None,
) -> None:
    """Check the hash chain against the stream; name the first modified, missing or reordered record.

    Exit 0 when the chain holds, 1 when it does not."""
    from services.lineage.audit import verify_against_stream, verify_bundle

    if bundle is not None:
        verdict = verify_bundle(_readable(bundle), _readable(key_file).read_bytes() if key_file else None)
    else:
        s = settings()
        verdict = verify_against_stream(_lineage_store(s).all(), asyncio.run(_stream(s)))
    typer.echo(verdict.text())
    raise typer.Exit(0 if verdict.ok else EXIT_FAILED)


def _readable(path: Path) -> Path:
    if not path.is_file():
        raise CliError(f"no such file: {path}", EXIT_USAGE)
    return path


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Argument(help="Bundle file (JSON lines).")],
    key_file: Annotated[Path | None, typer.Option(help="Sign the head off with this key (HMAC).")] = None,
) -> None:
    """Write events + chain head to a bundle that `cairn audit verify --bundle` checks offline."""
    from services.lineage.audit import export_bundle

    s = settings()
    verdict = export_bundle(
        _lineage_store(s).all(), out, s.stream, _readable(key_file).read_bytes() if key_file else None
    )
    typer.echo(f"exported {verdict.checked} records, head {verdict.head} -> {out}")


@app.command()
def replay(
    correlation: Annotated[
        str | None, typer.Option("--correlation", help="One run (its id or a unique prefix).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Runs started at or after this ISO time.")] = None,
    from_seq: Annotated[
        int | None, typer.Option("--from-seq", help="Runs from this stream sequence.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per run.")] = 1800.0,
) -> None:
    """Re-run history in an isolated namespace; exit 0 only if every artifact is bit-identical (else 1)."""
    from datetime import datetime

    from services.replay import render
    from services.replay import replay as run_replay

    if not (correlation or since or from_seq):
        raise CliError("give --correlation, --since or --from-seq", EXIT_USAGE)
    try:
        start = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise CliError(
            f"--since {since!r} is not an ISO time (e.g. 2026-11-30T15:00:00+00:00)", EXIT_USAGE
        ) from None
    s = settings()
    if correlation:
        correlation = _full_id(_lineage_store(s), correlation)
    reports = asyncio.run(
        run_replay(s, correlation=correlation, since=start, from_seq=from_seq, timeout=timeout)
    )
    typer.echo(render(reports))
    raise typer.Exit(0 if reports and all(r.identical for r in reports) else EXIT_FAILED)


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


@app.command("dask-tls")
def dask_tls(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, tls.crt, tls.key.")],
) -> None:
    """Certificates for Dask's mutual TLS between services, scheduler and workers (keep ca.key offline)."""
    from services.dask_tls import write_dask_tls

    for path in write_dask_tls(out):
        typer.echo(str(path))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model name; default: the only text model.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed gives the same text.")] = 0,
    url: Annotated[
        str | None, typer.Option(help="Inference URL; default: the one `cairn up` serves.")
    ] = None,
) -> None:
    """Continue a prompt with a deployed text model."""
    base = _endpoint(settings(), url)
    model = model or _only_model(base, lambda m: m.get("task") == "text_generation", "text model")
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
    }
    response = _http("post", f"{base}/v1/models/{model}/generate", json=body, timeout=120)
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
    """Run a command; a user error ends in one line on stderr and its exit code, never a traceback."""
    usage = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except CliError as exc:
        _fail(exc.message, exc.code)
    except usage.NoArgsIsHelpError:
        sys.exit(EXIT_USAGE)  # building the message printed the help already
    except usage.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "cairn"
        _fail(f"{exc.format_message()} (see `{command} --help`)", EXIT_USAGE)
    except usage.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        _fail("aborted", EXIT_FAILED)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug, not a user error: still one line unless asked
        if os.environ.get("CAIRN_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (CAIRN_DEBUG=1 shows the traceback)", EXIT_FAILED)
    sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions() -> Any:
    """Click's exception classes as Typer raises them: recent Typer vendors its own copy of Click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _fail(message: str, code: int) -> None:
    typer.echo(f"cairn: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
