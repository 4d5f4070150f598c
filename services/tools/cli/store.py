"""The artifact store's retention: gc, hold."""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from services.tools.cli.common import (
    EXIT_USAGE,
    CliError,
    app,
    client_for,
    connect_nats,
    settings,
    stream_missing,
)

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
T = TypeVar("T")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `1h`, `7d` -> seconds."""
    found = DURATION.match(text.lower())
    if not found:
        raise CliError(f"--grace {text!r} is not a duration: give e.g. 90s, 30m, 1h or 7d", EXIT_USAGE)
    return float(found[1]) * UNITS[found[2]]


def _logged_runs(s: Any) -> dict[str, Any]:
    """The runs of the whole log, archive and stream, read through the client: a reference gc does
    not see would be a file it deletes, so an archive it cannot check stops it."""
    from nats.js.errors import NotFoundError

    from services.lineage.archive import ArchiveError
    from services.tools import gc

    async def go() -> list[tuple[int, str, bytes]]:
        async with await client_for(s, "gc") as client:
            try:
                return await client.history()
            except NotFoundError:
                raise stream_missing(s) from None

    try:
        return gc.runs_of_log(asyncio.run(go()))
    except ArchiveError as exc:
        raise CliError(
            f"cannot read the archive ({exc}): gc deletes nothing it cannot see the references of"
        ) from None


@app.command("gc")
def collect_garbage(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would go; delete nothing.")] = False,
    keep_champions: Annotated[
        int | None,
        typer.Option(help="Past champions kept per model, beside the current one (CAIRN_GC_KEEP_CHAMPIONS)."),
    ] = None,
    keep_runs: Annotated[
        int | None, typer.Option(help="Latest runs kept per model (CAIRN_GC_KEEP_RUNS).")
    ] = None,
    grace: Annotated[
        str | None, typer.Option(help="Never delete files younger than this, e.g. 1h (CAIRN_GC_GRACE_S).")
    ] = None,
) -> None:
    """Delete the artifacts no champion, recent run, hold or unfinished run reaches; print bytes freed."""
    from services.platform.tracking import Tracker
    from services.tools import gc

    s = settings()
    if (keep_champions is not None and keep_champions < 0) or (keep_runs is not None and keep_runs < 0):
        raise CliError("--keep-champions and --keep-runs must be 0 or more", EXIT_USAGE)
    policy = gc.Policy(
        keep_champions=s.gc_keep_champions if keep_champions is None else keep_champions,
        keep_runs=s.gc_keep_runs if keep_runs is None else keep_runs,
        grace_s=s.gc_grace_s if grace is None else parse_duration(grace),
    )
    runs = _logged_runs(s)
    try:
        tracker = Tracker.from_settings(s)
        champions = [c.model_sha256 for c in tracker.champions().values() if c.model_sha256]
    except Exception as exc:  # noqa: BLE001 - without the registry gc cannot know every champion
        raise CliError(
            f"cannot read the model registry at {s.tracking_uri}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        holds = asyncio.run(_with_holds(s, gc.read_holds))
    except ValueError as exc:  # a hold gc cannot read could be a deletion: stop instead
        raise CliError(f"cannot read the holds ({exc}); gc deletes nothing until it can") from None
    keep = gc.keep_set(runs, holds, policy, champions)
    files = gc.collect(s.artifacts)
    now = time.time()
    doomed, kept = gc.plan(files, keep, now, policy.grace_s)
    # A kept bundle names its estimator file: keep that too.
    named = gc.bundle_references(s.artifacts, [f for f, _ in kept])
    doomed, saved = [f for f in doomed if f.sha256 not in named], [f for f in doomed if f.sha256 in named]
    kept += [(f, "named by a kept model bundle") for f in saved]
    size = sum(f.size for f in doomed)
    verb = "would delete" if dry_run else "deleting"
    for f in doomed:
        typer.echo(f"{verb} {f.sha256[:12]} {f.size:>10} {f.path}")
    if dry_run:
        typer.echo(f"would free {size} bytes in {len(doomed)} files; {len(kept)} files kept")
        return
    freed = gc.delete(s.artifacts, doomed)
    marked = 0
    for run_id in gc.removed_runs(runs, {f.sha256 for f in doomed}):
        try:
            tracker.client.set_tag(run_id, "cairn.gc", gc.gc_tag_value(now))
            marked += 1
        except Exception as exc:  # noqa: BLE001 - a run deleted from MLflow by hand: say so, go on
            typer.echo(f"could not tag MLflow run {run_id}: {type(exc).__name__}", err=True)
    typer.echo(
        f"freed {freed} bytes in {len(doomed)} files; {len(kept)} files kept; {marked} MLflow runs marked"
    )


@app.command()
def hold(
    ident: Annotated[
        str | None,
        typer.Argument(help="Event id or unique prefix (holds its run), artifact sha256, or model@version."),
    ] = None,
    release: Annotated[bool, typer.Option("--release", help="Release the hold on ID.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the holds.")] = False,
) -> None:
    """Keep a run, an artifact or a model version from `cairn gc` until released (a legal hold).

    Holds live in the deployment's NATS (bucket cairn_holds), so every operator and home sees them."""
    from services.tools import gc

    s = settings()
    if list_:
        for h in asyncio.run(_with_holds(s, gc.read_holds)):
            what = f"run {h.correlation}" if h.correlation else f"artifact {h.sha256}"
            by = f" by {h.by}" if h.by else ""
            typer.echo(f"{h.id}\t{what}\tsince {gc.gc_tag_value(h.at).split(' ', 1)[1]}{by}")
        return
    if not ident:
        raise CliError("give an ID to hold (or --release ID, or --list)", EXIT_USAGE)
    if release:
        if not asyncio.run(_with_holds(s, lambda js: gc.release_hold(js, ident))):
            raise CliError(f"no hold on {ident!r} (see `cairn hold --list`)", EXIT_USAGE)
        typer.echo(f"released {ident}")
        return
    try:
        held = gc.resolve_hold(ident, _logged_runs(s))
    except LookupError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    held = dataclasses.replace(held, by=f"{getpass.getuser()}@{socket.gethostname()}")
    before = asyncio.run(_with_holds(s, lambda js: gc.add_hold(js, held)))
    what = f"run {held.correlation}" if held.correlation else f"artifact {held.sha256}"
    if before is not None:
        typer.echo(f"{ident} was already held ({what}, since {gc.gc_tag_value(before.at).split(' ', 1)[1]})")
        return
    typer.echo(f"held {ident}: {what}")


async def _with_holds(s: Any, work: Callable[[Any], Awaitable[T]]) -> T:
    """`work` on the JetStream of the deployment's holds bucket, after importing this home's old
    holds.json (once)."""
    from services.tools import gc

    nc = await connect_nats(s, "hold")
    js = nc.jetstream()
    try:  # each opens the bucket: LookupError when it was never provisioned
        if moved := await gc.import_file_holds(js, s.home_dir):
            count, path = moved
            typer.echo(
                f"imported {count} holds from {s.home_dir / gc.HOLDS_FILE} into the shared bucket "
                f"cairn_holds, which every home of this deployment reads; the file is now {path}",
                err=True,
            )
        return await work(js)
    except LookupError as exc:
        raise CliError(str(exc)) from None
    finally:
        await nc.close()
