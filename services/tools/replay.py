"""`cairn replay`: re-run a slice of history in an isolated namespace and compare, artifact by artifact.

The slice's data-arrived events are re-published under `cairn.replay.<id>.` with ids derived from
the originals. A separate set of service processes consumes that namespace with its own MLflow
store and no inference endpoint, so the production champion and endpoint are never touched. The
artifact store is shared: it is content-addressed, so a replay can only add files, never change one.

A replay leaves nothing on the bus: however it ends (done, failed, Ctrl-C, SIGTERM) its consumers,
buckets and record stream are deleted. Killed outright (SIGKILL), its services die with it (parent-
death signal), NATS deletes its consumers once idle `CAIRN_REPLAY_INACTIVE_S` (so its unprocessed
messages stop holding the stream's retention floor), its buckets' entries expire with its ledger's
TTL, and the next replay deletes the empty buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.js.errors import NotFoundError

from contracts import (
    ContractError,
    DataArrived,
    DatasetIngested,
    DeploymentFailed,
    Envelope,
    FeaturesBuilt,
    ModelDeployed,
    ModelEvaluated,
    ModelTrained,
    TrialCompleted,
    TrialsPromoted,
    TuningCompleted,
    TuningRequested,
    decode,
    derive_id,
    is_dead_letter,
    new_event,
    replay_namespace,
)
from services.platform.bus.connection import connect
from services.platform.bus.provision import provision_handled_bucket, provision_study_bucket, study_bucket
from services.platform.settings import DEFAULT_TENANT, CairnSettings
from services.tools import supervisor
from services.tools.client import Client, RunTimeout

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 180.0
# What a replay's resources end with: durables `<service>-<event>-cairn_replay_<id>`, buckets
# `cairn_<what>_cairn_replay_<id>` (streams `KV_...`), record stream `<STREAM>_REQUESTS_cairn_replay_<id>`.
REPLAY_NAME = re.compile(r"[-_](" + re.escape(replay_namespace("").replace(".", "_")) + r"[A-Za-z0-9]+)$")


@dataclass
class Comparison:
    step: str
    what: str
    original: Any
    replay: Any
    kind: str = "artifact"  # shadow: decision, metric, artifact; "context" is shown, never a verdict

    @property
    def same(self) -> bool:
        return self.kind == "context" or self.original == self.replay


@dataclass
class RunReport:
    original_correlation: str
    replay_correlation: str
    comparisons: list[Comparison] = field(default_factory=list)
    shadow: bool = False

    @property
    def identical(self) -> bool:
        return all(c.same for c in self.comparisons) and bool(self.comparisons)

    def first_difference(self) -> Comparison | None:
        return next((c for c in self.comparisons if not c.same), None)


def select_roots(
    events: list[tuple[int, Envelope[Any]]],
    correlation: str | None,
    since: datetime | None,
    from_seq: int | None,
    until: datetime | None = None,
) -> list[Envelope[Any]]:
    roots = []
    for seq, ev in events:
        if ev.type != DataArrived.EVENT_TYPE or ev.causationid is not None:
            continue
        if correlation and ev.correlationid != correlation:
            continue
        if since and ev.time < since:
            continue
        if until and ev.time >= until:
            continue
        if from_seq and seq < from_seq:
            continue
        roots.append(ev)
    return roots


def _one(run: list[Envelope[Any]], event_type: str) -> Any | None:
    found = [e.data for e in run if e.type == event_type]
    return found[-1] if found else None


def compare_runs(original: list[Envelope[Any]], replay: list[Envelope[Any]]) -> list[Comparison]:
    """Step by step: every artifact hash, every trial score, every promotion decision."""
    out: list[Comparison] = []

    def add(step: str, what: str, a: Any, b: Any) -> None:
        out.append(Comparison(step, what, a, b))

    pairs = [
        (
            "ingestion",
            DatasetIngested.EVENT_TYPE,
            [("raw data sha256", lambda d: d.source_sha256), ("snapshot sha256", lambda d: d.dataset.sha256)],
        ),
        (
            "features",
            FeaturesBuilt.EVENT_TYPE,
            [
                ("featureset sha256", lambda d: d.featureset.sha256),
                ("transform sha256", lambda d: d.transform.sha256),
            ],
        ),
        (
            "tuning",
            TuningRequested.EVENT_TYPE,
            [("configurations", lambda d: [c.model_dump() for c in d.configurations])],
        ),
        (
            "tuning",
            TuningCompleted.EVENT_TYPE,
            [("leaderboard", lambda d: [(r.trial_id, r.rung, r.score) for r in d.leaderboard])],
        ),
        ("training", ModelTrained.EVENT_TYPE, [("model sha256", lambda d: d.model.sha256)]),
        ("evaluation", ModelEvaluated.EVENT_TYPE, [("holdout metrics", lambda d: d.metrics)]),
    ]
    for step, event_type, fields in pairs:
        a, b = _one(original, event_type), _one(replay, event_type)
        if a is None and b is None:
            continue
        for what, get in fields:
            add(step, what, get(a) if a is not None else None, get(b) if b is not None else None)
    trials_a = {
        (d.trial_id, d.rung): d.score
        for d in (e.data for e in original if e.type == TrialCompleted.EVENT_TYPE)
    }
    trials_b = {
        (d.trial_id, d.rung): d.score for d in (e.data for e in replay if e.type == TrialCompleted.EVENT_TYPE)
    }
    if trials_a or trials_b:
        add("training", f"{len(trials_a)} trial scores", trials_a, trials_b)
    promoted_a = [
        (d.from_rung, d.promoted) for d in (e.data for e in original if e.type == TrialsPromoted.EVENT_TYPE)
    ]
    promoted_b = [
        (d.from_rung, d.promoted) for d in (e.data for e in replay if e.type == TrialsPromoted.EVENT_TYPE)
    ]
    if promoted_a or promoted_b:
        add("tuning", "promotion decisions", sorted(promoted_a), sorted(promoted_b))
    return out


def _all(run: list[Envelope[Any]], event_type: str) -> list[Any]:
    return [e.data for e in run if e.type == event_type]


def _outcome(run: list[Envelope[Any]]) -> str:
    """How the run ended after its gate: deployed, not deployed (gate failed) or deployment failed."""
    if _one(run, ModelDeployed.EVENT_TYPE) is not None:
        return "deployed"
    if _one(run, DeploymentFailed.EVENT_TYPE) is not None:
        return "deployment failed"
    return "not deployed"


def shadow_compare(original: list[Envelope[Any]], replay: list[Envelope[Any]]) -> list[Comparison]:
    """What a pipeline upgrade would have changed: each decision (rung promotions, the chosen model,
    the gate outcome, the deployment), each metric and each artifact hash, same or changed.

    The gate's reasons and the champion it was compared with are context, not verdicts: the replay
    namespace has its own registry, so a replayed run meets the champions of the replayed window only.
    """
    out: list[Comparison] = []

    def add(kind: str, step: str, what: str, a: Any, b: Any) -> None:
        out.append(Comparison(step, what, a, b, kind))

    promotions_a = {d.from_rung: sorted(d.promoted) for d in _all(original, TrialsPromoted.EVENT_TYPE)}
    promotions_b = {d.from_rung: sorted(d.promoted) for d in _all(replay, TrialsPromoted.EVENT_TYPE)}
    for rung in sorted(set(promotions_a) | set(promotions_b)):
        add("decision", "tuning", f"promotions rung {rung}", promotions_a.get(rung), promotions_b.get(rung))

    def chosen(run: list[Envelope[Any]]) -> Any:
        d = _one(run, ModelTrained.EVENT_TYPE)
        return None if d is None else f"{d.family.value} budget {d.budget} {dict(sorted(d.params.items()))}"

    add("decision", "training", "chosen model", chosen(original), chosen(replay))
    gate_a, gate_b = _one(original, ModelEvaluated.EVENT_TYPE), _one(replay, ModelEvaluated.EVENT_TYPE)

    def verdict(d: Any) -> str | None:
        return None if d is None else ("passed" if d.passed else "failed")

    add("decision", "evaluation", "gate outcome", verdict(gate_a), verdict(gate_b))
    add("decision", "deployment", "outcome", _outcome(original), _outcome(replay))
    add(
        "context",
        "evaluation",
        "gate reasons",
        "; ".join(gate_a.reasons) if gate_a else None,
        "; ".join(gate_b.reasons) if gate_b else None,
    )

    trained_a, trained_b = _one(original, ModelTrained.EVENT_TYPE), _one(replay, ModelTrained.EVENT_TYPE)
    add(
        "metric",
        "training",
        "validation score",
        trained_a.validation_score if trained_a else None,
        trained_b.validation_score if trained_b else None,
    )
    holdout_a = gate_a.metrics if gate_a else {}
    holdout_b = gate_b.metrics if gate_b else {}
    for name in sorted(set(holdout_a) | set(holdout_b)):
        add("metric", "evaluation", f"holdout {name}", holdout_a.get(name), holdout_b.get(name))
    trials_a = {(d.trial_id, d.rung): d.score for d in _all(original, TrialCompleted.EVENT_TYPE)}
    trials_b = {(d.trial_id, d.rung): d.score for d in _all(replay, TrialCompleted.EVENT_TYPE)}
    if trials_a or trials_b:
        add("metric", "training", f"{len(trials_a)} trial scores", trials_a, trials_b)

    for c in compare_runs(original, replay):
        if c.what.endswith("sha256"):
            add("artifact", c.step, c.what, c.original, c.replay)
    return out


def with_cached_sources(
    run: list[Envelope[Any]], by_id: dict[str, Envelope[Any]], by_corr: dict[str, list[Envelope[Any]]]
) -> list[Envelope[Any]]:
    """A run served from the step cache, completed by the run that computed it.

    A cache hit republishes a step's outputs (marked `cachedfrom`) and skips the work, so the run
    has no plan or trials of its own; a replay computes them. The recorded computation is the
    run that first produced the outputs: its events of the types this run lacks stand in.
    """
    sources = {
        by_id[origin].correlationid
        for ev in run
        if (origin := (ev.model_extra or {}).get("cachedfrom")) and origin in by_id
    }
    have = {ev.type for ev in run}
    extra = [
        ev
        for corr in sorted(sources - {run[0].correlationid if run else ""})
        for ev in by_corr.get(corr, [])
        if ev.type not in have
    ]
    return run + extra


def replay_token(namespace: str) -> str:
    """The suffix every consumer and stream of a replay's namespace ends with (`cairn_replay_<id>`)."""
    return namespace.replace(".", "_")


def replay_of(name: str) -> str | None:
    """The replay token a consumer or stream name ends with; None for live resources."""
    found = REPLAY_NAME.search(name)
    return found[1] if found else None


def replay_ttl(runs: int, timeout: float) -> float:
    """How long a replay may need its buckets: every run to its timeout, plus start and stop."""
    return runs * timeout + 2 * READY_TIMEOUT_S


def stale_replays(
    consumers: Iterable[str], stream_ages: Mapping[str, float], min_age_s: float
) -> dict[str, list[str]]:
    """Replay token -> its streams, for replays that have no consumer left (a live replay's services
    keep theirs, a dead one's are deleted by NATS once idle) and whose streams are all older than
    `min_age_s` (a replay starting now has buckets before its services bind their consumers)."""
    busy = {t for name in consumers if (t := replay_of(name))}
    by_replay: dict[str, list[str]] = {}
    for name in stream_ages:
        if (token := replay_of(name)) and token not in busy:
            by_replay.setdefault(token, []).append(name)
    return {
        token: sorted(names)
        for token, names in by_replay.items()
        if all(stream_ages[n] >= min_age_s for n in names)
    }


async def _consumer_names(js: Any, stream: str) -> list[str]:
    names: list[str] = []
    while page := await js.consumers_info(stream, offset=len(names)):
        names += [c.name for c in page]
    return names


async def _stream_ages(js: Any) -> dict[str, float]:
    """Every stream's name and age in seconds (by the server's creation time)."""
    ages: dict[str, float] = {}
    while page := await js.streams_info(offset=len(ages)):
        for info in page:
            created = info.created.timestamp() if info.created else time.time()
            ages[info.config.name] = time.time() - created
    return ages


async def remove_replay(js: Any, settings: CairnSettings, token: str) -> list[str]:
    """Delete a replay's consumers on the event stream, then its buckets and record stream (each a
    stream named after it); returns what was deleted. One already gone is skipped."""
    removed = []
    for name in await _consumer_names(js, settings.stream):
        if replay_of(name) == token:
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(settings.stream, name)
                removed.append(name)
    for name in await _stream_ages(js):
        if replay_of(name) == token:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
                removed.append(name)
    return removed


async def sweep_replays(js: Any, settings: CairnSettings) -> dict[str, list[str]]:
    """Delete the streams dead replays left (JetStream expires entries, never a stream); returns them."""
    stale = stale_replays(
        await _consumer_names(js, settings.stream), await _stream_ages(js), settings.replay_inactive_s
    )
    for names in stale.values():
        for name in names:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
    return stale


async def _history(settings: CairnSettings) -> list[tuple[int, Envelope[Any]]]:
    async with Client(settings, "replay") as client:
        raw = await client.history()
    events = []
    for seq, subject, body in raw:
        if is_dead_letter(subject):
            continue
        try:
            events.append((seq, decode(body)))
        except ContractError:
            continue
    return events


async def _run_one(
    settings: CairnSettings, replay_settings: CairnSettings, root: Envelope[Any], rid: str, timeout: float
) -> list[Envelope[Any]]:
    """Publish the recorded arrival again in the replay's namespace and follow its run to the end."""
    event = new_event(
        root.data, source="/cairn/replay", event_id=derive_id(root.id, root.type, rid), subject=root.subject
    )
    async with Client(replay_settings, "replay") as client:
        try:
            events = (await client.run(event, timeout)).events
        except RunTimeout as exc:  # the report shows what the run did reach
            events = exc.events
    return [event, *(e for e in events if e.id != event.id)]


async def replay(
    settings: CairnSettings,
    *,
    correlation: str | None = None,
    since: datetime | None = None,
    from_seq: int | None = None,
    until: datetime | None = None,
    shadow: bool = False,
    timeout: float = 1800,
) -> list[RunReport]:
    """Replay the slice's runs one after another (so a window meets the champions it made); with
    `shadow`, compare decisions, metrics and hashes instead of requiring bit-identity throughout."""
    history = await _history(settings)
    roots = select_roots(history, correlation, since, from_seq, until)
    if not roots:
        raise LookupError("no data-arrived event in that slice of history")
    rid = uuid.uuid4().hex[:10]
    home = settings.home_dir / "replays" / rid
    ttl = replay_ttl(len(roots), timeout)
    replay_settings = settings.model_copy(
        update={
            "namespace": replay_namespace(rid),
            "home": home,
            "nats_url": settings.resolved_nats_url(),
            "mlflow_uri": f"sqlite:///{home / 'mlflow.db'}",
            "artifacts_url": settings.artifacts,
            # Its paths are the replay's folder and the tenant's store as they are: nothing more
            # is derived from the tenant (its NATS user is already resolved above).
            "tenant": DEFAULT_TENANT,
            "allowed_roots": [str(r) for r in settings.read_roots],
            "http_port": None,
            # Its buckets' entries and its record stream expire once the replay is surely over.
            "handled_ttl_s": ttl,
            "request_record_max_age_s": int(ttl) + 1,
        }
    )
    with _cancelled_by_sigterm() as terminated:
        try:
            return await _replay_in(settings, replay_settings, history, roots, rid, shadow, timeout)
        except asyncio.CancelledError:
            if terminated():
                raise SystemExit(128 + signal.SIGTERM) from None
            raise


@contextlib.contextmanager
def _cancelled_by_sigterm() -> Iterator[Any]:
    """SIGTERM cancels the replay (so its `finally` removes what it made) instead of ending the
    process on the spot; yields whether it came. Outside the main thread nothing is installed."""
    task, came = asyncio.current_task(), []

    def stop() -> None:
        came.append(True)
        if task is not None:
            task.cancel()

    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (RuntimeError, NotImplementedError, ValueError):
        yield lambda: False
        return
    try:
        yield lambda: bool(came)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _replay_in(
    settings: CairnSettings,
    replay_settings: CairnSettings,
    history: list[tuple[int, Envelope[Any]]],
    roots: list[Envelope[Any]],
    rid: str,
    shadow: bool,
    timeout: float,
) -> list[RunReport]:
    """Provision the namespace, run its services, replay each root; always remove it all after."""
    reports = []
    try:
        nc = await connect(settings, "admin")
        try:
            js = nc.jetstream()
            for dead, names in (await sweep_replays(js, settings)).items():
                log.info("removed what replay %s left: %s", dead, ", ".join(names))
            await provision_study_bucket(js, replay_settings, study_bucket(replay_settings.namespace))
            # The replay's own ledger: it must not see the live run's inputs as already handled.
            await provision_handled_bucket(js, replay_settings)
        finally:
            await nc.close()
        services = [n for n in supervisor.SERVICES if n != "lineage"]
        # Tied: the services get SIGTERM when this process dies, SIGKILL included.
        starting = asyncio.ensure_future(
            asyncio.to_thread(supervisor.up, replay_settings, services, False, True)
        )
        try:
            runtime = await asyncio.shield(starting)
            not_ready = await asyncio.to_thread(supervisor.wait_ready, runtime, READY_TIMEOUT_S)
            if not_ready:
                raise RuntimeError(f"replay services not ready: {not_ready}")
            by_corr: dict[str, list[Envelope[Any]]] = {}
            for _, ev in history:
                by_corr.setdefault(ev.correlationid, []).append(ev)
            by_id = {ev.id: ev for _, ev in history}
            for root in roots:
                replayed = await _run_one(settings, replay_settings, root, rid, timeout)
                report = RunReport(root.correlationid, replayed[0].id, shadow=shadow)
                compare = shadow_compare if shadow else compare_runs
                original = with_cached_sources(by_corr.get(root.correlationid, []), by_id, by_corr)
                report.comparisons = compare(original, replayed)
                reports.append(report)
        finally:
            with contextlib.suppress(Exception):  # a start cut short: let it finish, so down sees all
                await starting
            await asyncio.to_thread(supervisor.down, replay_settings)
    finally:
        await _remove_quietly(settings, replay_token(replay_settings.namespace))
    return reports


async def _remove_quietly(settings: CairnSettings, token: str) -> None:
    """Remove the replay's resources; when NATS cannot be reached, the idle threshold and the next
    replay's sweep remove them instead (said in the log)."""
    try:
        nc = await connect(settings, "admin")
        try:
            await remove_replay(nc.jetstream(), settings, token)
        finally:
            await nc.close()
    except Exception as exc:  # noqa: BLE001 - the backstops cover it; the replay's own result stands
        log.warning(
            "could not remove replay %s (%s: %s); NATS drops its consumers once idle",
            token,
            type(exc).__name__,
            exc,
        )


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def render_shadow(report: RunReport) -> list[str]:
    """The diff of one shadow run: by kind, one line a verdict, `same` or `changed`."""
    lines = [f"shadow run of {report.original_correlation} (replayed as {report.replay_correlation})"]
    for kind, title in (("decision", "decisions"), ("metric", "metrics"), ("artifact", "artifact hashes")):
        lines.append(f"  {title}")
        for c in (c for c in report.comparisons if c.kind == kind):
            if c.same:
                lines.append(f"    same     {c.step:<10} {c.what:<22} {_short(c.original)}")
            else:
                lines.append(
                    f"    changed  {c.step:<10} {c.what:<22} {_short(c.original)} -> {_short(c.replay)}"
                )
    for c in (c for c in report.comparisons if c.kind == "context"):
        lines.append(f"  recorded {c.what}: {c.original}")
        lines.append(f"  shadow   {c.what}: {c.replay}")
    verdicts = [c for c in report.comparisons if c.kind != "context"]
    changed = [c for c in verdicts if not c.same]
    lines.append(
        f"  verdict: same ({len(verdicts)} of {len(verdicts)} verdicts)"
        if not changed
        else f"  verdict: CHANGED ({len(changed)} of {len(verdicts)}): "
        + ", ".join(f"{c.step} {c.what}" for c in changed)
    )
    return lines


def render(reports: list[RunReport]) -> str:
    lines = []
    for report in reports:
        if report.shadow:
            lines += render_shadow(report)
            continue
        lines.append(f"run {report.original_correlation} replayed as {report.replay_correlation}")
        for c in report.comparisons:
            shown = c.original if isinstance(c.original, str) else ("identical" if c.same else "see below")
            lines.append(f"  {'SAME' if c.same else 'DIFF'}  {c.step:<10} {c.what:<22} {str(shown)[:70]}")
            if not c.same:
                lines.append(f"        original: {str(c.original)[:200]}")
                lines.append(f"        replay:   {str(c.replay)[:200]}")
        first = report.first_difference()
        lines.append(
            "  verdict: bit-identical"
            if report.identical
            else f"  verdict: DIFFERENT, first at step {first.step if first else '?'}"
            f" ({first.what if first else 'nothing compared'})"
        )
    return "\n".join(lines)
