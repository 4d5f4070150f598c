"""The audit trail: lineage, verification, export, replay."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import (
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
            help="The Ed25519 public key (or the HMAC secret) that checks the sign-off.",
        ),
    ] = None,
) -> None:
    """Check the hash chain against the stream; name the first modified, missing or reordered record.

    Exit 0 when the chain holds, 1 when it does not."""
    from services.lineage.audit import verify_against_stream, verify_bundle

    if bundle is not None:
        verdict = verify_bundle(_readable(bundle), _readable(key_file).read_bytes() if key_file else None)
    else:
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
    from services.lineage.audit import export_bundle

    s = settings()
    verdict = export_bundle(
        lineage_store(s).all(), out, s.stream, _readable(key_file).read_bytes() if key_file else None
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
        correlation = full_id(lineage_store(s), correlation)
    reports = asyncio.run(
        run_replay(s, correlation=correlation, since=start, from_seq=from_seq, timeout=timeout)
    )
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
