"""How the CLI prints events: one-line summaries, the log, and the progress of a run."""

from __future__ import annotations

from typing import Any

import typer

from contracts import (
    DataArrived,
    DataRejected,
    DeploymentFailed,
    Envelope,
    EventRejected,
    ModelDeployed,
    ModelEvaluated,
    TrialCompleted,
    TrialRequested,
    TrialsPromoted,
    TuningCompleted,
    TuningRequested,
    decode,
    event_type_of,
    is_dead_letter,
)


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


def print_event(msg: Any, seq: int, correlation: str | None, as_json: bool) -> None:
    if is_dead_letter(msg.subject):
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


class Progress:
    """What `submit --wait` prints while a run goes: a progress bar over the trials, one line per step."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.planned = self.done = 0
        self.best: float | None = None
        self.metric = ""

    def show(self, event: Envelope[Any]) -> None:
        d = event.data
        if isinstance(d, TuningRequested):
            self.planned, self.metric = sum(r.keep for r in d.rungs), d.metric.value
        elif isinstance(d, TrialCompleted):
            self._trial(d)
            return
        if isinstance(d, TrialRequested):
            return
        if self.interactive and self.done:
            typer.echo("")
        typer.echo(f"{event_type_of(type(d)):<28} {summary(event)}")

    def _trial(self, d: TrialCompleted) -> None:
        self.done += 1
        if d.score is not None and (
            self.best is None or (d.score > self.best if d.metric.higher_is_better else d.score < self.best)
        ):
            self.best = d.score
        planned = self.planned or "?"
        line = f"trials {self.done}/{planned}" + (
            f"  best {self.metric}={self.best:.4f}" if self.best is not None else ""
        )
        bar = "#" * int(30 * self.done / self.planned) if self.planned else ""
        text = f"[{bar:<30}] {line}"
        if self.interactive:
            typer.echo("\r" + text, nl=False)
        elif self.done == self.planned or self.done % 20 == 0:
            typer.echo(text)
