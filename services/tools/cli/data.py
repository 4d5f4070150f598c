"""Feeding cairn data and following it: submit, events."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from contracts import (
    DataArrived,
    DataFormat,
    Envelope,
    ModelFamily,
    SearchStrategy,
    Task,
    TuningSpec,
    new_event,
)
from services.platform.cache import NO_CACHE
from services.platform.settings import CairnSettings
from services.tools.cli.common import (
    EXIT_DEPLOYED,
    EXIT_FAILED,
    EXIT_USAGE,
    FULL_ID_LENGTH,
    READER,
    UPSTREAM,
    CliError,
    app,
    client_for,
    full_id,
    lineage_store,
    settings,
    stream_missing,
)
from services.tools.cli.render import Progress, print_event

SERVE_WAIT_S = 60.0  # after model.deployed, for the local endpoint to load and verify the champion
LOG_STALL_S = 60.0  # `cairn events`: how long the log may stop coming before the last event


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    correlation: Annotated[str | None, typer.Option("--correlation", "-c", help="Only one run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print whole events.")] = False,
) -> None:
    """Print the event log, oldest first."""
    s = settings(READER)
    if correlation and len(correlation) < FULL_ID_LENGTH:
        correlation = full_id(lineage_store(s), correlation)

    async def go() -> None:
        from nats.js.errors import NotFoundError

        async with await client_for(s, "events") as client:
            try:
                sub = await client.watch(from_start=True)
                state = (await client.js.stream_info(s.stream)).state
            except NotFoundError:
                raise stream_missing(s) from None
            last, reached, quiet = state.last_seq, 0, 0.0
            for seq, subject, body in await archived_before(s, state.first_seq):
                kept = SimpleNamespace(subject=subject, data=body, headers=None)
                print_event(kept, seq, correlation, as_json)
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0 if not follow else 3600)
                except TimeoutError:
                    if follow:
                        continue
                    # A quiet second before the last event is a slow server or link, not the end
                    # (an auditor's listing cut there would look whole), unless retention took the
                    # rest meanwhile.
                    if reached >= last or (await client.js.stream_info(s.stream)).state.first_seq > last:
                        return
                    quiet += 1.0
                    if quiet >= LOG_STALL_S:
                        raise CliError(f"the event log stopped coming at seq {reached} of {last}") from None
                    continue
                quiet, reached = 0.0, msg.metadata.sequence.stream
                print_event(msg, reached, correlation, as_json)
                if not follow and reached >= last:
                    return

    asyncio.run(go())


async def archived_before(s: CairnSettings, first_seq: int) -> list[tuple[int, str, bytes]]:
    """What retention moved from the stream to the archive: the start of the log."""
    if first_seq <= 1:
        return []
    from services.lineage.archive import Archive, ArchiveError, MissingKey, public_key

    try:
        return await asyncio.to_thread(Archive.of(s).messages, public_key(s), first_seq)
    except MissingKey as exc:
        raise CliError(f"cannot check the archive: {exc}") from None
    except ArchiveError as exc:
        raise CliError(f"the archive is not intact: {exc}") from None


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
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Follow the run to its end (after `cairn up`: until its endpoint serves the champion).",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 1800.0,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Compute every step again, even what the step cache holds."),
    ] = False,
) -> None:
    """Publish a data-arrival event; with --wait, follow it (exit 0 deployed, 3 not promoted, 1 failed)."""
    s = settings(UPSTREAM)
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
    if no_cache:  # a CloudEvents extension: every service carries it on to the run's next events
        event = event.model_copy(update={NO_CACHE: "true"})
    code = asyncio.run(_submit(s, settings(READER), event, wait, timeout))
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
    from services.platform.artifacts import ArtifactStore

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


async def _submit(
    s: CairnSettings, reader: CairnSettings, event: Envelope[Any], wait: bool, timeout: float
) -> int:
    """Publish as `s` (against `cairn up`'s server: the `upstream` user, which may publish arrivals
    only) and follow the run as `reader` (which may only read)."""
    from services.tools.client import RunTimeout

    async with await client_for(s, "submit") as client:
        if not wait:
            await client.publish(event, on_wait=_waiting_for_jetstream)
            typer.echo(f"submitted {event.id} (correlation {event.correlationid})")
            return EXIT_DEPLOYED
        progress = Progress(interactive=sys.stdout.isatty())
        async with await client_for(reader, "submit-watch") as watcher:
            sub = await watcher.watch()
            await client.publish(event, on_wait=_waiting_for_jetstream)
            typer.echo(f"submitted {event.id} (correlation {event.correlationid})")
            try:
                end = await watcher.follow_on(sub, event.correlationid, timeout, progress.show)
            except RunTimeout:
                typer.echo(f"timed out after {timeout}s", err=True)
                return EXIT_FAILED
    return _until_served(s, end)


def _waiting_for_jetstream(why: str) -> None:
    typer.echo(f"waiting for NATS JetStream: {why}", err=True)


def _until_served(s: CairnSettings, end: Any) -> int:
    """A run deployed through the system `cairn up` runs from this home: return once its endpoint
    serves the new champion, so that `submit --wait && predict` meets it (the endpoint swaps a
    moment after the decision). An endpoint elsewhere (Kubernetes, `cairn serve`) is not waited for."""
    from services.platform.endpoint_token import client_headers
    from services.tools.client import DEPLOYED, wait_until_served

    runtime = s.runtime()
    local = runtime.get("serve_url") and runtime.get("nats_url") == s.resolved_nats_url()
    if end.code != DEPLOYED or not local:
        return end.code
    deployed = end.event.data
    problem = wait_until_served(
        runtime["serve_url"], deployed.model_name, deployed.version, SERVE_WAIT_S, client_headers(s)
    )
    if problem is not None:
        typer.echo(
            f"{deployed.model_name} v{deployed.version} was deployed, but the endpoint at "
            f"{runtime['serve_url']} did not serve it within {SERVE_WAIT_S:g}s ({problem}); see "
            f"{s.home_dir / 'logs' / 'serve.log'}",
            err=True,
        )
        return EXIT_FAILED
    typer.echo(f"served: {deployed.model_name} v{deployed.version} at {runtime['serve_url']}")
    return end.code
