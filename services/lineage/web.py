"""The auditor's view (`cairn ui`): a read-only page over the lineage store. Runs with their status,
each model's champion timeline, the chain's verify status, and a run's lineage graph drawn in the
page from the DOT text `cairn lineage --format dot` prints; a run's study (every trial's score
against its budget, the leaderboard), a model's holdout metrics across its champions, and a live
page (each consumer's lag, the trials in flight) drawn as inline SVG (services/lineage/pictures.py).

Plain server-rendered HTML and small inline scripts (no build step, nothing fetched from
elsewhere: the page must work on an air-gapped auditor's laptop). Every request re-reads the store,
so the page shows what the lineage service has recorded so far.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from contracts import (
    DataArrived,
    DataRejected,
    DeploymentFailed,
    EventRejected,
    ModelDeployed,
    ModelEvaluated,
)
from services.lineage import champions, graph, pictures, studies, timeline
from services.lineage.audit import verify_records
from services.lineage.store import LineageStore

# Where the live page's consumer lags come from: `cairn ui` hands in what `cairn status` reads.
Lags = Callable[[], Awaitable[Sequence[pictures.Lag]]]
LIVE_REFRESH_S = 2.0
LAG_TIMEOUT_S = 15.0  # the first call also finds the consumers' names (imports every service)

STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
pre{white-space:pre-wrap;word-break:break-all;font-size:12px}.ok{color:#176f2c}.bad{color:#b00020}code{font-size:12px}
svg text{font:11px system-ui,sans-serif}
.reign rect{fill:#cfe3ff;stroke:#3b6fb6}.gatefail line{stroke:#b00020;stroke-width:2}
.node rect{fill:#fff8e1;stroke:#a67c00}.edge{stroke:#888;fill:none;marker-end:url(#arrow)}
nav a{margin-right:1em}.grid{stroke:#eee}.axis{stroke:#999}.tick,.when{fill:#555;font-size:10px}
.promotion line{stroke-width:1.5;opacity:.6}.promotion.pending line{stroke-dasharray:3 3}
.reign-line{fill:none;stroke:#3b6fb6;stroke-width:2}.champion circle{fill:#3b6fb6}
.lag-pending{fill:#e8a33d}.lag-acking{fill:#3b6fb6}.mono{font-family:monospace;font-size:10px}
.pictures{display:flex;gap:2em;align-items:flex-start;flex-wrap:wrap}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
"""
NAV = '<nav><a href="/">runs and champions</a><a href="/live">live</a></nav>'


# Lays the DOT graph out top-down in layers (longest path from a root) and draws it as SVG.
SCRIPT = r"""
const src = document.getElementById('dot').textContent;
const nodes = {}, edges = [];
for (const line of src.split('\n')) {
  let m = line.match(/^\s*(\w+) \[label="(.*)"\];$/);
  if (m) { nodes[m[1]] = {id: m[1], label: m[2].split('\\n'), layer: 0}; continue; }
  m = line.match(/^\s*(\w+) -> (\w+);$/);
  if (m) edges.push([m[1], m[2]]);
}
for (let i = 0; i < Object.keys(nodes).length; i++)
  for (const [a, b] of edges)
    if (nodes[a] && nodes[b]) nodes[b].layer = Math.max(nodes[b].layer, nodes[a].layer + 1);
const rows = {}, W = 190, H = 44, GX = 40, GY = 16;
for (const n of Object.values(nodes)) { n.row = (rows[n.layer] = (rows[n.layer] || 0) + 1) - 1; }
const ns = 'http://www.w3.org/2000/svg', svg = document.getElementById('graph');
const el = (tag, attrs, parent) => { const e = document.createElementNS(ns, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); (parent || svg).appendChild(e); return e; };
const x = n => 10 + n.row * (W + GX), y = n => 10 + n.layer * (H + GY);
for (const [a, b] of edges) { const p = nodes[a], q = nodes[b]; if (!p || !q) continue;
  el('path', {class: 'edge', d: `M${x(p) + W / 2},${y(p) + H} L${x(q) + W / 2},${y(q)}`}); }
for (const n of Object.values(nodes)) {
  const g = el('g', {class: 'node', 'data-node': n.id});
  el('rect', {x: x(n), y: y(n), width: W, height: H, rx: 5}, g);
  n.label.forEach((t, i) => { el('text', {x: x(n) + 8, y: y(n) + 17 + i * 15}, g).textContent = t; });
}
const layers = Math.max(0, ...Object.values(nodes).map(n => n.layer)) + 1;
svg.setAttribute('height', 20 + layers * (H + GY));
svg.setAttribute('width', 20 + Math.max(1, ...Object.values(rows)) * (W + GX));
"""

ENDINGS = {
    ModelDeployed.EVENT_TYPE: "deployed",
    DataRejected.EVENT_TYPE: "data rejected",
    DeploymentFailed.EVENT_TYPE: "deployment failed",
    EventRejected.EVENT_TYPE: "rejected",
}


@dataclass(frozen=True)
class Run:
    correlation: str
    started: str
    uri: str
    model: str | None
    status: str


def _stamp(text: str | None) -> str:
    try:
        return timeline.stamp(timeline.instant(text or "")) or ""
    except ValueError:
        return text or ""


def runs(store: LineageStore) -> list[Run]:
    """Each live run from its arrival, with how it ended (or 'running' while it has not)."""
    ended: dict[str, str] = {}
    for event_type in (ModelEvaluated.EVENT_TYPE, *ENDINGS):
        for r in store.by_type(event_type):
            if r.subject != r.type or not r.correlationid:
                continue
            data = (r.event() or {}).get("data", {})
            if event_type == ModelEvaluated.EVENT_TYPE:
                if not data.get("passed"):
                    ended[r.correlationid] = "not promoted (gate failed)"
            elif event_type == ModelDeployed.EVENT_TYPE:
                ended[r.correlationid] = f"deployed v{data.get('version')}"
            else:
                ended[r.correlationid] = ENDINGS[event_type]
    out = []
    for r in store.by_type(DataArrived.EVENT_TYPE):
        if r.subject != r.type or r.causationid:
            continue
        data = (r.event() or {}).get("data", {})
        out.append(
            Run(
                r.correlationid or "",
                _stamp(r.time),
                data.get("uri", ""),
                data.get("model_name"),
                ended.get(r.correlationid or "", "running"),
            )
        )
    return sorted(out, key=lambda run: run.started, reverse=True)


def timeline_svg(
    model: str, history: list[timeline.Reign], failed: list[timeline.Gate], now: datetime
) -> str:
    """One model's champions in order, one equal bar each (a reign of a second and one of a month
    both stay readable), with since and until; a failed gate is a red tick inside the reign it left
    in place, at its place in that reign's span."""
    bar, left, top, height = 250, 10, 8, 58
    width = 2 * left + bar * len(history)
    parts = [
        f'<svg class="timeline" data-model="{html.escape(model)}" width="{width}" height="{height + 16}">'
    ]
    for i, reign in enumerate(history):
        x, end = left + i * bar, reign.until or now
        since, until = timeline.stamp(reign.since) or "", timeline.stamp(reign.until) or "now"
        title = f"v{reign.version}: {since} until {until}; displaced " + (
            f"v{reign.displaced}" if reign.displaced else "nothing"
        )
        parts.append(
            f'<g class="reign" data-version="{reign.version}"><title>{html.escape(title)}</title>'
            f'<rect x="{x}" y="{top}" width="{bar - 4}" height="{height}"/>'
            f'<text x="{x + 6}" y="{top + 16}" font-weight="bold">v{reign.version}</text>'
            f'<text x="{x + 6}" y="{top + 32}">since {html.escape(since)}</text>'
            f'<text x="{x + 6}" y="{top + 48}">until {html.escape(until)}</text></g>'
        )
        span = max((end - reign.since).total_seconds(), 1e-3)
        for gate in (g for g in failed if reign.since <= g.time < end):
            gx = x + 2 + (bar - 8) * (gate.time - reign.since).total_seconds() / span
            parts.append(
                f'<g class="gatefail"><title>{html.escape("gate failed: " + "; ".join(gate.reasons))}</title>'
                f'<line x1="{gx:.1f}" y1="{top - 4}" x2="{gx:.1f}" y2="{top + height + 4}"/></g>'
            )
    return "".join(parts) + "</svg>"


def _page(title: str, body: str, script: str = "") -> HTMLResponse:
    tail = f"<script>{script}</script>" if script else ""
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}{tail}</body></html>"
    )


def index(store: LineageStore) -> HTMLResponse:
    verdict = verify_records(store.all())
    status = (
        f'<p id="verify" class="ok">chain verified: {html.escape(verdict.text())}</p>'
        if verdict.ok
        else f'<p id="verify" class="bad">{html.escape(verdict.text())}</p>'
    )
    docs = timeline.load(store)
    now = timeline.to_ms(datetime.now(UTC))
    heads = []
    for model, history in sorted(timeline.reigns(docs).items()):
        failed = [g for g in timeline.gates(docs, model) if not g.passed]
        current = history[-1]
        heads.append(
            f"<h3>{_model_link(model)}: champion v{current.version} since "
            f"{html.escape(timeline.stamp(current.since) or '')}</h3>"
            + timeline_svg(model, history, failed, now)
        )
    rows = "".join(
        f'<tr class="run"><td><a href="/run/{html.escape(r.correlation)}">'
        f"{html.escape(r.correlation[:8])}</a></td>"
        f"<td>{html.escape(r.started)}</td><td>{_model_link(r.model)}</td>"
        f'<td title="{html.escape(r.uri)}">{html.escape(r.uri.rsplit("/", 1)[-1])}</td>'
        f'<td><a class="study" href="/study/{html.escape(r.correlation)}">study</a></td>'
        f"<td>{html.escape(r.status)}</td></tr>"
        for r in runs(store)
    )
    body = (
        f"{NAV}<h1>cairn: the auditor's view</h1>"
        f"{status}<h2>Champion timelines</h2>{''.join(heads) or '<p>no champion yet</p>'}"
        "<h2>Runs</h2><table id='runs'><tr><th>run</th><th>started (UTC)</th><th>model</th>"
        f"<th>data</th><th>tuning</th><th>status</th></tr>{rows}</table>"
    )
    return _page("cairn audit", body)


def run_page(store: LineageStore, correlation: str) -> Response:
    root = store.by_event_id(correlation)
    if root is None:
        return HTMLResponse(f"<p>no run {html.escape(correlation)}</p>", status_code=404)
    dot = graph.render(store, root, "dot").replace("</", "<\\/")
    text = graph.render(store, root, "text")
    body = (
        f"{NAV}<h1>run {html.escape(correlation)}</h1>"
        f'<p><a href="/study/{html.escape(correlation)}">its tuning study</a></p>'
        "<h2>Lineage graph</h2><p>drawn from <code>cairn lineage "
        f"{html.escape(correlation[:8])} --format dot</code></p>"
        '<svg id="graph" xmlns="http://www.w3.org/2000/svg">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs></svg>'
        f'<script type="text/plain" id="dot">{dot}</script>'
        f"<h2>Events</h2><pre>{html.escape(text)}</pre>"
    )
    return _page(f"run {correlation[:8]}", body, SCRIPT)


def _model_link(model: str | None) -> str:
    return f'<a class="model" href="/model/{html.escape(model)}">{html.escape(model)}</a>' if model else ""


def study_page(store: LineageStore, correlation: str) -> Response:
    """A run's study: every trial's score against its budget, the leaderboard beside it."""
    study = studies.load_study(store, correlation)
    if study is None:
        return HTMLResponse(
            f"{NAV}<p>run {html.escape(correlation)} planned no study (yet)</p>", status_code=404
        )
    origin = store.by_event_id(study.cached_from) if study.cached_from else None
    cached = (
        f'<p id="cached">served from the step cache: its trials ran in run <a href="/study/'
        f'{html.escape(origin.correlationid or "")}">{html.escape((origin.correlationid or "")[:8])}</a></p>'
        if origin
        else ""
    )
    rungs = ", ".join(f"{r.keep} at budget {r.budget}" for r in study.rungs)
    body = (
        f"{NAV}<h1>study {html.escape(study.study_id)}</h1>"
        f'<p>run <a href="/run/{html.escape(correlation)}">{html.escape(correlation[:8])}</a>: '
        f"{html.escape(study.strategy)}, metric {html.escape(study.metric)}"
        + (f", rungs {html.escape(rungs)}" if rungs else "")
        + f"; {len(study.trials)} trial results, {len(study.promotions)} promotion decisions</p>{cached}"
        f'<div class="pictures"><div>{pictures.study_svg(study) if study.trials else ""}</div>'
        f"<div><h2>Leaderboard</h2>{pictures.leaderboard_html(study)}</div></div>"
    )
    return _page(f"study {correlation[:8]}", body)


def model_page(store: LineageStore, model: str) -> Response:
    """A model's holdout metrics across its champion versions, failed gates and deployments marked."""
    docs = timeline.load(store)
    marks = champions.marks(docs, champions.load_failures(store), model)
    if not marks:
        return HTMLResponse(f"{NAV}<p>no gate decision about {html.escape(model)}</p>", status_code=404)
    metric = champions.gate_metric(docs, model)
    body = (
        f"{NAV}<h1>model {html.escape(model)}</h1><p>holdout metrics of every champion version, in "
        "the order they happened (evenly spaced); a red cross is a gate that kept the champion, a red "
        "square a deployment that failed. Each mark links to its run.</p>"
        + pictures.model_svg(model, metric, marks)
    )
    return _page(f"model {model}", body)


async def live_state(store: LineageStore, lags: Lags | None) -> dict[str, Any]:
    """What the live page shows: each consumer's lag (from the bus) and the trials in flight (from
    the store), as numbers and as the page's HTML."""
    consumers: list[Any] = []
    error = "no bus: `cairn ui` was started without one" if lags is None else None
    if lags is not None:
        try:
            consumers = list(await asyncio.wait_for(lags(), LAG_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - an unreachable bus is shown, not raised
            error = f"the bus did not answer: {exc or type(exc).__name__}"
    flying = await run_in_threadpool(studies.load_in_flight, store)
    at = timeline.stamp(timeline.to_ms(datetime.now(UTC)))
    lag_part = (
        f'<p id="lag-error" class="bad">{html.escape(error)}</p>' if error else pictures.lag_svg(consumers)
    )
    fragment = (
        f"<h2>Lag per consumer</h2><p>as <code>cairn status</code> reads it, at {at}</p>{lag_part}"
        f"<h2>Trials in flight: {len(flying)}</h2>"
        + (pictures.flight_svg(flying) if flying else "<p>none</p>")
    )
    return {
        "at": at,
        "error": error,
        "consumers": [
            {k: getattr(c, k) for k in ("service", "durable", "state", "pending", "ack_pending")}
            for c in consumers
        ],
        "in_flight": [asdict(t) for t in flying],
        "html": fragment,
    }


LIVE_SCRIPT = """
const live = document.getElementById('live');
async function refresh() {
  try {
    const state = await (await fetch('/live.json', {cache: 'no-store'})).json();
    live.innerHTML = state.html;
    live.dataset.updated = state.at;
  } catch (e) {
    live.dataset.error = String(e);
  }
}
setInterval(refresh, PERIOD_MS);
"""


async def live_page(store: LineageStore, lags: Lags | None) -> Response:
    state = await live_state(store, lags)
    body = (
        f"{NAV}<h1>live</h1><p>refreshed every {LIVE_REFRESH_S:g}s from <code>/live.json</code></p>"
        f'<div id="live" data-updated="{state["at"]}">{state["html"]}</div>'
    )
    return _page("cairn live", body, LIVE_SCRIPT.replace("PERIOD_MS", str(int(LIVE_REFRESH_S * 1000))))


def app(lineage_url: str, lags: Lags | None = None) -> Starlette:
    """The read-only page over the store at `lineage_url`; `lags` reads each consumer's lag from
    the bus for the live page (None: the page says there is no bus)."""
    store = LineageStore(lineage_url)

    def home(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
        return index(store)

    def one_run(request: Request) -> Response:
        return run_page(store, request.path_params["correlation"])

    def one_study(request: Request) -> Response:
        return study_page(store, request.path_params["correlation"])

    def one_model(request: Request) -> Response:
        return model_page(store, request.path_params["model"])

    async def live(request: Request) -> Response:
        return await live_page(store, lags)

    async def live_json(request: Request) -> Response:
        return JSONResponse(await live_state(store, lags))

    return Starlette(
        routes=[
            Route("/", home),
            Route("/run/{correlation}", one_run),
            Route("/study/{correlation}", one_study),
            Route("/model/{model}", one_model),
            Route("/live", live),
            Route("/live.json", live_json),
        ]
    )
