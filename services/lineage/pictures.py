"""The pictures of `cairn ui`, drawn on the server as inline SVG: data in, an SVG string out, no
script and nothing fetched (the page must work on an air-gapped auditor's laptop).

Every mark is a `<g>` carrying its numbers as data attributes (data-trial, data-score,
data-version, ...), exact as the events hold them (Python's shortest round-trip repr of a float),
so a test reads and counts what the picture shows without parsing pixels.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from contracts import Metric
from services.lineage.studies import InFlight, RungPlan, Study, Trial

FAMILY_COLOURS = {
    "xgboost": "#d95f02",
    "random_forest": "#1b9e77",
    "linear": "#7570b3",
    "mlp": "#e7298a",
    "transformer": "#66a61e",
}
OTHER = "#777"
GATES = ", the gate's metric"
BAD = "#b00020"


def colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, OTHER)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _attrs(**data: object) -> str:
    """data-* attributes (underscores become dashes); None is left out."""
    return "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items() if v is not None)


def _num(value: float) -> str:
    """A number on an axis or a label: four significant digits."""
    return f"{value:.4g}"


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round numbers spanning [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, value = [], first
    while value <= hi + step * 1e-9:
        out.append(round(value, 12))
        value += step
    return out


@dataclass(frozen=True)
class Axis:
    """A linear map from data values [lo, hi] to pixels [bottom, top] (SVG y grows downwards)."""

    lo: float
    hi: float
    bottom: float
    top: float

    @classmethod
    def over(cls, values: Iterable[float], bottom: float, top: float, margin: float = 0.08) -> Axis:
        """An axis over `values`, with `margin` of their range free above and below."""
        values = [v for v in values if math.isfinite(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (hi - lo) * margin or abs(hi) * 0.1 or 1.0
        return cls(lo - pad, hi + pad, bottom, top)

    def __call__(self, value: float) -> float:
        return self.bottom + (value - self.lo) / (self.hi - self.lo) * (self.top - self.bottom)

    def grid(self, left: float, right: float) -> str:
        parts = []
        for tick in nice_ticks(self.lo, self.hi):
            y = self(tick)
            parts.append(
                f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
                f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(tick)}</text>'
            )
        return "".join(parts)


def _legend(families: Sequence[str], x: float, y: float) -> str:
    parts = []
    for name in families:
        parts.append(
            f'<g class="legend"{_attrs(family=name)}><rect x="{x:.0f}" y="{y - 9:.0f}" width="10" '
            f'height="10" fill="{colour(name)}"/><text x="{x + 14:.0f}" y="{y:.0f}">{_e(name)}</text></g>'
        )
        x += 24 + 7 * len(name)
    return "".join(parts)


# A study: every trial's score against its budget -------------------------------------------------
def _rungs(study: Study) -> list[RungPlan]:
    if study.rungs:
        return study.rungs
    seen = {(t.rung, t.budget) for t in study.trials}
    return [RungPlan(r, b, sum(t.rung == r for t in study.trials)) for r, b in sorted(seen)]


def study_svg(study: Study) -> str:
    """One column per rung (its budget: rounds or trees), one mark per trial.completed at its
    validation score, coloured by model family. A trial promoted from a rung has a dark ring and a
    line to its mark at the next rung; a trial the rung dropped is faded; a failed trial is a cross
    below the axis; the leaderboard's best has a larger mark."""
    rungs = _rungs(study)
    col, left, top = 170, 70, 34
    width = left + col * max(len(rungs), 1) + 20
    bottom = 330
    failed_y, height = bottom + 22, bottom + 90
    scores = [t.score for t in study.trials if t.score is not None]
    y = Axis.over(scores, bottom, top)
    best = study.leaderboard[0] if study.leaderboard else None
    parts = [
        f'<svg class="study" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f"{_attrs(study=study.study_id, metric=study.metric, run=study.correlation)}>",
        f'<text x="{left}" y="14" font-weight="bold">validation {_e(study.metric)} '
        f"({_better(study.metric)}) against budget</text>",
        y.grid(left, width - 20),
    ]
    index = {r.rung: i for i, r in enumerate(rungs)}

    def x_of(trial_id: int, rung: int) -> float:
        ids = sorted({t.trial_id for t in study.trials if t.rung == rung} | {trial_id})
        i, n = ids.index(trial_id), len(ids)
        centre = left + (index.get(rung, rung) + 0.5) * col
        return centre + ((i + 0.5) / n - 0.5) * col * 0.7

    def y_of(t: Trial) -> float:
        return y(t.score) if t.score is not None else failed_y

    for r in rungs:
        ran = [t for t in study.trials if t.rung == r.rung]
        kept = study.survivors(r.rung)
        cx = left + (index[r.rung] + 0.5) * col
        parts.append(
            f'<g class="rung"{_attrs(rung=r.rung, budget=r.budget, trials=len(ran), promoted=len(kept))}>'
            f'<line class="axis" x1="{cx:.1f}" y1="{bottom}" x2="{cx:.1f}" y2="{bottom + 5}"/>'
            f'<text x="{cx:.1f}" y="{height - 40}" text-anchor="middle" font-weight="bold">'
            f"rung {r.rung}: budget {r.budget}</text>"
            f'<text x="{cx:.1f}" y="{height - 26}" text-anchor="middle">{len(ran)} ran'
            + (f", {len(kept)} promoted" if r.rung != rungs[-1].rung else "")
            + "</text></g>"
        )
    parts.append(
        f'<line class="axis" x1="{left}" y1="{bottom}" x2="{width - 20}" y2="{bottom}"/>'
        f'<text class="tick" x="{left - 6}" y="{failed_y + 4}" text-anchor="end">failed</text>'
    )
    at = {(t.trial_id, t.rung): t for t in study.trials}
    for p in study.promotions:
        for trial_id in p.promoted:
            source = at.get((trial_id, p.from_rung))
            if source is None:
                continue
            x1, y1 = x_of(trial_id, p.from_rung), y_of(source)
            target = at.get((trial_id, p.to_rung))
            x2 = x_of(trial_id, p.to_rung) if target else left + (index.get(p.to_rung, p.to_rung) + 0.5) * col
            y2 = y_of(target) if target else y1
            parts.append(
                f'<g class="promotion{"" if target else " pending"}"'
                f"{_attrs(trial=trial_id, from_rung=p.from_rung, to_rung=p.to_rung)}>"
                f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                f'stroke="{colour(source.family)}"/></g>'
            )
    last = rungs[-1].rung if rungs else 0
    for t in sorted(study.trials, key=lambda t: (t.rung, t.trial_id)):
        x, yy, fill = x_of(t.trial_id, t.rung), y_of(t), colour(t.family)
        promoted = t.trial_id in study.survivors(t.rung)
        is_best = best is not None and (best.trial_id, best.rung) == (t.trial_id, t.rung)
        fate = "best" if is_best else "promoted" if promoted else "final" if t.rung == last else "dropped"
        score = "failed" if t.score is None else repr(t.score)
        title = f"trial {t.trial_id} ({t.family}) rung {t.rung}, budget {t.budget}: {study.metric} {score}"
        data = _attrs(
            trial=t.trial_id, rung=t.rung, budget=t.budget, family=t.family,
            score=None if t.score is None else repr(t.score), fate=fate, event=t.event_id,
        )  # fmt: skip
        if t.score is None:
            shape = (
                f'<path d="M{x - 4:.1f},{yy - 4:.1f} L{x + 4:.1f},{yy + 4:.1f} M{x - 4:.1f},{yy + 4:.1f} '
                f'L{x + 4:.1f},{yy - 4:.1f}" stroke="{fill}" stroke-width="2"/>'
            )
        else:
            ring = ' stroke="#111" stroke-width="2"' if promoted or is_best else ""
            faded = ' fill-opacity="0.4"' if fate == "dropped" else ""
            shape = (
                f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="{7 if is_best else 5}" fill="{fill}"{ring}{faded}/>'
            )
        parts.append(f'<g class="trial {fate}"{data}><title>{_e(title)}</title>{shape}</g>')
    families = sorted({t.family for t in study.trials} | set(study.families.values()))
    parts.append(_legend(families, left, height - 6))
    return "".join(parts) + "</svg>"


def leaderboard_html(study: Study) -> str:
    """tuning.completed's leaderboard, best first, as `cairn events` summarises its head."""
    rows = "".join(
        f'<tr class="entry"{_attrs(trial=e.trial_id, score=repr(e.score), rung=e.rung, budget=e.budget)}>'
        f'<td>{i + 1}</td><td>{e.trial_id}</td><td><span class="swatch" style="background:'
        f'{colour(e.family)}"></span>{_e(e.family)}</td><td>{e.rung}</td><td>{e.budget}</td>'
        f"<td>{e.score:.4f}</td></tr>"
        for i, e in enumerate(study.leaderboard)
    )
    head = f"<th>#</th><th>trial</th><th>family</th><th>rung</th><th>budget</th><th>{_e(study.metric)}</th>"
    return f'<table id="leaderboard"><tr>{head}</tr>{rows}</table>'


# A model: holdout metrics of every champion version over time -------------------------------------
@dataclass(frozen=True)
class ModelMark:
    """One moment of a model's history: a champion taking over, a gate that refused a challenger,
    or a deployment that failed; with the holdout metrics of the model it was about."""

    kind: str  # "champion", "gatefail" or "deployfail"
    time: datetime
    correlation: str
    metrics: dict[str, float]
    version: int | None = None
    note: str = ""


def _better(metric: str) -> str:
    known = metric in Metric.__members__
    return "higher is better" if known and Metric(metric).higher_is_better else "lower is better"


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def model_svg(model: str, metric: str, marks: Sequence[ModelMark]) -> str:
    """One panel per holdout metric (the gate's metric first). Marks in time order, evenly spaced
    (a reign of a second and one of a month both stay readable), each labelled with its time: a
    champion version is a dot on the step line of the champion's metric, a failed gate a red cross
    at the challenger's metric, a failed deployment a red square. Each mark links to its run."""
    names = sorted({k for m in marks for k in m.metrics}, key=lambda k: (k != metric, k))
    step = 110 if len(marks) <= 12 else max(1400 // max(len(marks), 1), 14)
    left, panel, gap = 70, 130, 50
    width = max(left + step * max(len(marks), 1) + 30, 560)
    height = gap + len(names or [metric]) * (panel + gap) + 30
    parts = [
        f'<svg class="model" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f"{_attrs(model=model, metric=metric)}>"
    ]
    xs = [left + step * (i + 0.5) for i in range(len(marks))]
    for n, name in enumerate(names):
        top = gap + n * (panel + gap)
        bottom = top + panel
        y = Axis.over((m.metrics[name] for m in marks if name in m.metrics), bottom, top, margin=0.18)
        parts.append(
            f'<g class="panel"{_attrs(metric=name)}><text x="{left}" y="{top - 10}" font-weight="bold">'
            f"holdout {_e(name)} ({_better(name)}{GATES if name == metric else ''})</text>"
            + y.grid(left, width - 30)
        )
        held = [
            (x, y(m.metrics[name]))
            for x, m in zip(xs, marks, strict=True)
            if m.kind == "champion" and name in m.metrics
        ]
        if held:  # the champion's value holds until the next one takes over, and up to now
            d = [f"M{held[0][0]:.1f},{held[0][1]:.1f}"]
            d += [
                f"L{x:.1f},{prev:.1f} L{x:.1f},{v:.1f}"
                for (x, v), (_, prev) in zip(held[1:], held, strict=False)
            ]
            parts.append(f'<path class="reign-line" d="{" ".join(d)} L{width - 30},{held[-1][1]:.1f}"/>')
        for x, m in zip(xs, marks, strict=True):
            value = m.metrics.get(name)
            yy = y(value) if value is not None else bottom - 6
            data = _attrs(
                kind=m.kind, version=m.version, metric=name, value=None if value is None else repr(value),
                time=_stamp(m.time), run=m.correlation,
            )  # fmt: skip
            what = {"champion": f"v{m.version} champion", "gatefail": "gate failed"}.get(
                m.kind, "deployment failed"
            )
            shown = "?" if value is None else _num(value)
            title = f"{what} at {_stamp(m.time)}: holdout {name} {shown}" + (f"; {m.note}" if m.note else "")
            if m.kind == "champion":
                shape = (
                    f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="5"/>'
                    f'<text x="{x:.1f}" y="{yy - 9:.1f}" text-anchor="middle">v{m.version}</text>'
                )
            elif m.kind == "gatefail":
                shape = (
                    f'<path d="M{x - 5:.1f},{yy - 5:.1f} L{x + 5:.1f},{yy + 5:.1f} M{x - 5:.1f},{yy + 5:.1f} '
                    f'L{x + 5:.1f},{yy - 5:.1f}" stroke="{BAD}" stroke-width="2.5"/>'
                )
            else:
                shape = f'<rect x="{x - 5:.1f}" y="{yy - 5:.1f}" width="10" height="10" fill="{BAD}"/>'
            href = f"/run/{_e(m.correlation)}"
            parts.append(
                f'<a href="{href}"><g class="point {m.kind}"{data}><title>{_e(title)}</title>{shape}</g></a>'
            )
        parts.append("</g>")
    axis_y = height - 22
    for x, m in zip(xs, marks, strict=True):
        parts.append(
            f'<text class="when" x="{x:.1f}" y="{axis_y}" text-anchor="middle">{m.time:%H:%M:%S}</text>'
            f'<text class="when" x="{x:.1f}" y="{axis_y + 13}" text-anchor="middle">{m.time:%Y-%m-%d}</text>'
        )
    return "".join(parts) + "</svg>"


# Live: lag per consumer, trials in flight -----------------------------------------------------------
class Lag(Protocol):
    """A consumer's lag as `cairn status` reads it (services/tools/cli/system.py: ConsumerLag)."""

    service: str
    durable: str
    state: str
    pending: int
    ack_pending: int


def lag_svg(lags: Sequence[Lag]) -> str:
    """One bar per durable consumer: pending (not delivered yet) and in flight (delivered, not
    acknowledged), stacked, with the consumer's state from `cairn status`."""
    row, label, bar = 22, 360, 320
    most = max((x.pending + x.ack_pending for x in lags), default=0) or 1
    parts = [
        f'<svg class="lag" xmlns="http://www.w3.org/2000/svg" width="{label + bar + 270}" '
        f'height="{row * len(lags) + 28}">'
        f'<text x="{label}" y="12"><tspan fill="#e8a33d">&#9632; pending</tspan> '
        f'<tspan fill="#3b6fb6">&#9632; in flight (ack pending)</tspan></text>'
    ]
    for i, x in enumerate(lags):
        y = 22 + i * row
        p = bar * x.pending / most
        a = bar * x.ack_pending / most
        bad = "" if x.state == "live" else f' fill="{BAD}"'
        parts.append(
            f'<g class="consumer"{_attrs(service=x.service, durable=x.durable, state=x.state, pending=x.pending, ack_pending=x.ack_pending)}>'  # noqa: E501
            f'<text x="0" y="{y + 14}">{_e(x.service)}</text>'
            f'<text x="90" y="{y + 14}" class="mono">{_e(x.durable)}</text>'
            f'<rect class="lag-pending" x="{label}" y="{y + 3}" width="{p:.1f}" height="{row - 8}"/>'
            f'<rect class="lag-acking" x="{label + p:.1f}" y="{y + 3}" width="{a:.1f}" height="{row - 8}"/>'
            f'<text x="{label + p + a + 6:.1f}" y="{y + 14}"{bad}>{x.pending} pending, '
            f"{x.ack_pending} in flight{'' if x.state == 'live' else ', ' + _e(x.state)}</text></g>"
        )
    return "".join(parts) + "</svg>"


def flight_svg(trials: Sequence[InFlight]) -> str:
    """Trials requested and not completed yet, one square each (coloured by family), a row per run."""
    runs: dict[str, list[InFlight]] = {}
    for t in trials:
        runs.setdefault(t.correlation, []).append(t)
    size, row = 14, 26
    width = 300 + (size + 3) * max((len(ts) for ts in runs.values()), default=1)
    families = sorted({t.family for t in trials})
    parts = [
        f'<svg class="flight" xmlns="http://www.w3.org/2000/svg" width="{max(width, 560)}" '
        f'height="{row * len(runs) + 26}"{_attrs(count=len(trials))}>',
        _legend(families, 300, row * len(runs) + 18),
    ]
    for i, (correlation, ts) in enumerate(runs.items()):
        y = 4 + i * row
        parts.append(
            f'<g class="run"{_attrs(run=correlation, count=len(ts))}><a href="/study/{_e(correlation)}">'
            f'<text x="0" y="{y + 12}">run {_e(correlation[:8])}: {len(ts)} in flight</text></a>'
        )
        for j, t in enumerate(ts):
            title = f"trial {t.trial_id} ({t.family}) rung {t.rung}, budget {t.budget}"
            data = _attrs(trial=t.trial_id, rung=t.rung, budget=t.budget, family=t.family)
            parts.append(
                f'<g class="inflight"{data}>'
                f"<title>{_e(title)}</title>"
                f'<rect x="{300 + j * (size + 3)}" y="{y}" width="{size}" height="{size}" '
                f'fill="{colour(t.family)}"/></g>'
            )
        parts.append("</g>")
    return "".join(parts) + "</svg>"
