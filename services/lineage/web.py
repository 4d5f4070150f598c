"""The auditor's view (`cairn ui`): a read-only page over the lineage store. Runs with their status,
each model's champion timeline, the chain's verify status, and a run's lineage graph drawn in the
page from the DOT text `cairn lineage --format dot` prints.

Plain server-rendered HTML and one small inline script (no build step, nothing fetched from
elsewhere: the page must work on an air-gapped auditor's laptop). Every request re-reads the store,
so the page shows what the lineage service has recorded so far.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from contracts import (
    DataArrived,
    DataRejected,
    DeploymentFailed,
    EventRejected,
    ModelDeployed,
    ModelEvaluated,
)
from services.lineage import graph, timeline
from services.lineage.audit import verify_records
from services.lineage.store import LineageStore

STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
pre{white-space:pre-wrap;word-break:break-all;font-size:12px}.ok{color:#176f2c}.bad{color:#b00020}code{font-size:12px}
svg text{font:11px system-ui,sans-serif}
.reign rect{fill:#cfe3ff;stroke:#3b6fb6}.gatefail line{stroke:#b00020;stroke-width:2}
.node rect{fill:#fff8e1;stroke:#a67c00}.edge{stroke:#888;fill:none;marker-end:url(#arrow)}
"""

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
    champions = []
    for model, history in sorted(timeline.reigns(docs).items()):
        failed = [g for g in timeline.gates(docs, model) if not g.passed]
        current = history[-1]
        champions.append(
            f"<h3>{html.escape(model)}: champion v{current.version} since "
            f"{html.escape(timeline.stamp(current.since) or '')}</h3>"
            + timeline_svg(model, history, failed, now)
        )
    rows = "".join(
        f'<tr class="run"><td><a href="/run/{html.escape(r.correlation)}">'
        f"{html.escape(r.correlation[:8])}</a></td>"
        f"<td>{html.escape(r.started)}</td><td>{html.escape(r.model or '')}</td>"
        f'<td title="{html.escape(r.uri)}">{html.escape(r.uri.rsplit("/", 1)[-1])}</td>'
        f"<td>{html.escape(r.status)}</td></tr>"
        for r in runs(store)
    )
    body = (
        "<h1>cairn: the auditor's view</h1>"
        f"{status}<h2>Champion timelines</h2>{''.join(champions) or '<p>no champion yet</p>'}"
        "<h2>Runs</h2><table id='runs'><tr><th>run</th><th>started (UTC)</th><th>model</th>"
        f"<th>data</th><th>status</th></tr>{rows}</table>"
    )
    return _page("cairn audit", body)


def run_page(store: LineageStore, correlation: str) -> Response:
    root = store.by_event_id(correlation)
    if root is None:
        return HTMLResponse(f"<p>no run {html.escape(correlation)}</p>", status_code=404)
    dot = graph.render(store, root, "dot").replace("</", "<\\/")
    text = graph.render(store, root, "text")
    body = (
        f'<p><a href="/">all runs</a></p><h1>run {html.escape(correlation)}</h1>'
        "<h2>Lineage graph</h2><p>drawn from <code>cairn lineage "
        f"{html.escape(correlation[:8])} --format dot</code></p>"
        '<svg id="graph" xmlns="http://www.w3.org/2000/svg">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs></svg>'
        f'<script type="text/plain" id="dot">{dot}</script>'
        f"<h2>Events</h2><pre>{html.escape(text)}</pre>"
    )
    return _page(f"run {correlation[:8]}", body, SCRIPT)


def app(lineage_url: str) -> Starlette:
    """The read-only page over the store at `lineage_url`."""
    store = LineageStore(lineage_url)

    def home(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
        return index(store)

    def one_run(request: Request) -> Response:
        return run_page(store, request.path_params["correlation"])

    return Starlette(routes=[Route("/", home), Route("/run/{correlation}", one_run)])
