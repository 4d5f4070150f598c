"""The audit trail: lineage, verification, export, replay."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from services.tools.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    CliError,
    app,
    full_id,
    lineage_store,
    settings,
    stream_messages,
)

audit_app = typer.Typer(no_args_is_help=True, help="Tamper-evident audit trail.")
app.add_typer(audit_app, name="audit")


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
        count = rebuild(store, asyncio.run(stream_messages(s)))
        typer.echo(f"rebuilt {count} records into {store.url}")
        return
    if fmt not in {"text", "json", "mermaid", "dot"}:
        raise CliError("--format must be text, json, mermaid or dot", EXIT_USAGE)
    store = lineage_store(s)
    try:
        record = graph.resolve(store, full_id(store, ident))
    except graph.NotFound as exc:
        raise CliError(str(exc)) from None
    typer.echo(graph.render(store, record, fmt))


@audit_app.command("verify")
def audit_verify(
    bundle: Annotated[Path | None, typer.Option(help="Verify an exported bundle offline instead.")] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key",
            "--key-file",
            help="The Ed25519 public key (audit-public.pem) the bundle's signature must verify with.",
        ),
    ] = None,
    unsigned_ok: Annotated[
        bool,
        typer.Option(
            "--unsigned-ok", help="With --bundle and no --key: accept a check of self-consistency alone."
        ),
    ] = False,
) -> None:
    """Check the hash chain against the stream; name the first modified, missing or reordered record.

    Exit 0 when the chain holds, 1 when it does not. A bundle is checked with the key you give,
    never with what the bundle says of itself; without --key only its self-consistency is checked,
    which anyone could forge, so that exits 1 unless --unsigned-ok."""
    from services.lineage.audit import verify_against_stream, verify_bundle

    if bundle is not None:
        verdict = verify_bundle(_readable(bundle), _readable(key_file).read_bytes() if key_file else None)
        typer.echo(verdict.text())
        if verdict.ok and key_file is None:
            typer.echo(
                "only self-consistency was checked: anyone can write a consistent bundle; "
                "give --key audit-public.pem to check who signed it"
                + ("" if unsigned_ok else " (or --unsigned-ok to accept this)"),
                err=True,
            )
            raise typer.Exit(0 if unsigned_ok else EXIT_FAILED)
        raise typer.Exit(0 if verdict.ok else EXIT_FAILED)
    if key_file is not None or unsigned_ok:
        raise CliError("--key and --unsigned-ok go with --bundle", EXIT_USAGE)
    s = settings()
    verdict = verify_against_stream(lineage_store(s).all(), asyncio.run(stream_messages(s)))
    typer.echo(verdict.text())
    raise typer.Exit(0 if verdict.ok else EXIT_FAILED)


def _readable(path: Path) -> Path:
    if not path.is_file():
        raise CliError(f"no such file: {path}", EXIT_USAGE)
    return path


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Argument(help="Bundle file (JSON lines).")],
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key", "--key-file", help="Sign with this Ed25519 private key (`cairn audit keygen`)."
        ),
    ] = None,
) -> None:
    """Write events + chain head to a bundle that `cairn audit verify --bundle` checks offline."""
    from services.lineage import signing
    from services.lineage.audit import export_bundle

    s = settings()
    private_pem = _readable(key_file).read_bytes() if key_file else None
    problem = signing.private_key_problem(private_pem) if private_pem is not None else None
    if problem:
        raise CliError(f"{key_file}: {problem}", EXIT_USAGE)
    verdict = export_bundle(lineage_store(s).all(), out, s.stream, private_pem)
    typer.echo(f"exported {verdict.checked} records, head {verdict.head} -> {out}")


@app.command()
def replay(
    correlation: Annotated[
        str | None, typer.Option("--correlation", help="One run (its id or a unique prefix).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Runs started at or after this ISO time (no zone: UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Runs started before this ISO time (no zone: UTC).")
    ] = None,
    from_seq: Annotated[
        int | None, typer.Option("--from-seq", help="Runs from this stream sequence.")
    ] = None,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="Through the code and settings installed now: diff each decision, metric and artifact "
            "hash against the recorded run.",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per run.")] = 1800.0,
) -> None:
    """Re-run history in an isolated namespace; exit 0 only if every artifact is bit-identical (with
    --shadow: every verdict the same), else 1."""
    from services.lineage.timeline import instant
    from services.tools.replay import render
    from services.tools.replay import replay as run_replay

    if not (correlation or since or until or from_seq):
        raise CliError("give --correlation, --since, --until or --from-seq", EXIT_USAGE)

    def when(option: str, text: str | None):
        try:
            return instant(text) if text else None
        except ValueError:
            raise CliError(
                f"{option} {text!r} is not an ISO time (e.g. 2026-11-30T15:00:00+00:00)", EXIT_USAGE
            ) from None

    start, end = when("--since", since), when("--until", until)
    s = settings()
    if correlation:
        correlation = full_id(lineage_store(s), correlation)
    try:
        reports = asyncio.run(
            run_replay(
                s,
                correlation=correlation,
                since=start,
                until=end,
                from_seq=from_seq,
                shadow=shadow,
                timeout=timeout,
            )
        )
    except LookupError as exc:
        raise CliError(str(exc)) from None
    typer.echo(render(reports))
    raise typer.Exit(0 if reports and all(r.identical for r in reports) else EXIT_FAILED)


@audit_app.command("keygen")
def audit_keygen(
    out: Annotated[Path, typer.Option("--out", help="Folder for audit-private.pem and audit-public.pem.")],
) -> None:
    """An Ed25519 key pair: export signs with the private key; an auditor verifies with the public one."""
    from services.lineage.signing import keygen

    for path in keygen(out):
        typer.echo(str(path))


def _timeline_docs() -> list:
    from services.lineage.timeline import load

    return load(lineage_store(settings()))


def _format(fmt: str) -> str:
    if fmt not in {"text", "json"}:
        raise CliError("--format must be text or json", EXIT_USAGE)
    return fmt


@audit_app.command("at")
def audit_at(
    when: Annotated[
        str, typer.Argument(metavar="TIME", help="ISO 8601 (no zone: UTC), to the millisecond, or 'now'.")
    ],
    model: Annotated[str | None, typer.Option("--model", help="One model; default every model.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """Who was champion at TIME (since, until, the gate and evidence, whom it displaced, the raw data).

    Answered from the event log alone: the version in place at that instant, to the millisecond;
    the gate decision and evidence that put it there; the champion it displaced; and the chain
    back to the raw data's sha256."""
    from services.lineage import timeline

    _format(fmt)
    try:
        moment = timeline.instant(when)
    except ValueError:
        raise CliError(
            f"TIME {when!r} is not an ISO 8601 time (e.g. 2026-11-30T15:04:05.123Z) or 'now'", EXIT_USAGE
        ) from None
    everything = timeline.reigns(_timeline_docs())
    if model is not None and model not in everything:
        known = ", ".join(sorted(everything)) or "none yet"
        raise CliError(f"no champion of {model!r} was ever deployed (deployed models: {known})", EXIT_USAGE)
    chosen = {model: everything[model]} if model else everything
    answers = {m: timeline.champion_at(h, moment) for m, h in sorted(chosen.items())}
    if fmt == "json":
        typer.echo(timeline.at_json(moment, answers))
    elif not answers:
        typer.echo(f"at {timeline.stamp(moment)} (UTC): no model has ever been deployed")
    else:
        typer.echo(timeline.at_text(moment, answers, {m: h[0].since for m, h in chosen.items()}))


@audit_app.command("history")
def audit_history(
    model: Annotated[str, typer.Argument(help="The model name (its champion scope).")],
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """Every champion change of a model with its time, cause and evidence; a failed gate as 'no change'."""
    from services.lineage import timeline

    _format(fmt)
    docs = _timeline_docs()
    changes = timeline.history(docs, model)
    if not changes:
        known = ", ".join(sorted(timeline.reigns(docs))) or "none yet"
        raise CliError(f"no gate decision or deployment of {model!r} (deployed models: {known})", EXIT_USAGE)
    typer.echo(
        timeline.history_json(model, changes) if fmt == "json" else timeline.history_text(model, changes)
    )


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8090,
    host: Annotated[str, typer.Option(help="Address to bind (default: this machine only).")] = "127.0.0.1",
) -> None:
    """The auditor's view, read-only: runs, lineage graphs, champion timelines, chain status, each
    run's study, each model's holdout metrics, and a live page of consumer lag and trials in flight."""
    import uvicorn

    from services.lineage.web import app as web_app

    s = settings()
    typer.echo(f"cairn ui on http://{host}:{port}/ (read-only, store {s.lineage_url})", err=True)
    uvicorn.run(web_app(s.lineage_url, _consumer_lags()), host=host, port=port, log_level="warning")


def _consumer_lags():
    """Each consumer's lag as `cairn status` reads it, as the reader user, on a connection per call
    (the live page asks every few seconds); the consumers' names are found once."""
    from services.tools.cli.common import READER, connect_nats
    from services.tools.cli.system import consumer_lags, consumer_names

    names: list[tuple[str, str]] = []

    async def lags():
        reader = settings(READER)
        if not names:  # two first calls at once both look: each replaces, neither adds
            names[:] = await asyncio.to_thread(consumer_names, reader)
        nc = await connect_nats(reader, "ui")
        try:
            return await consumer_lags(nc.jetstream(), reader.stream, names)
        finally:
            await nc.close()

    return lags
