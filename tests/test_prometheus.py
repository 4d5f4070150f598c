"""The alerts and dashboards against a real Prometheus scraping a running system.

Debian's `prometheus`, started here on a free port with a temp TSDB, scrapes every service and the
endpoint of one `cairn up` (a scrape every 2 s, the chart's rules loaded) while one small run goes
through, then the same file again (served from the step cache), a few predictions, and what a
healthy run never shows, provoked: a dead letter and a refused champion. Afterwards: every metric
and label an alert or a panel names is one the services exported (the label-values and series APIs,
so that a query with nothing to show is checked too); every rule evaluated without an error, and
only the dead-letter alert fired; what each alert watches, and every panel, showed data during the
run. Beside it, the archiver's gauges on a real nats-server, where retention is held back and then
released (a healthy run has nothing overdue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from contracts import DataArrived, subject_for
from services.lineage.retention import keep_archiving
from services.lineage.store import LineageStore
from services.platform.bus.connection import connect
from services.platform.bus.metrics import ServiceMetrics
from services.platform.settings import CairnSettings
from services.tools.nats_auth import ADMIN, credentials_env
from services.tools.supervisor import free_port
from tests.conftest import make_settings, missing_system_dependency, wait_for
from tests.test_alerts import alert_queries, panel_queries, rendered_rules
from tests.test_archive import publish, record_all
from tests.test_journeys import SERVICES, cairn, user_env, wait_until, write_table

pytestmark = pytest.mark.slow

MODEL = "houses"
# Three trials at budget 1, the best one promoted to budget 3: one rung decision, a few seconds.
RUN = ["--families", "linear", "--trials", "3", "--max-budget", "3", "--model-name", MODEL]
ROW = {"x1": 0.5, "x2": 3.0, "colour": "red"}
PREDICTIONS = 20
# Grafana's variables, as a dashboard over the run would set them.
RATE_INTERVAL = "30s"


@dataclass(frozen=True)
class Scraped:
    url: str  # Prometheus
    start: float  # the run's first and last second
    end: float

    def get(self, path: str, **params: Any) -> Any:
        answer = httpx.get(f"{self.url}{path}", params=params, timeout=30).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def values(self, expr: str) -> list[float]:
        """Every sample the expression gave during the run (one a second), NaN left out."""
        data = self.get("/api/v1/query_range", query=expr, start=self.start, end=self.end, step=1)
        return [float(v) for series in data["result"] for _, v in series["values"] if v != "NaN"]


@contextlib.contextmanager
def prometheus(root: Path, targets: dict[str, str], rules: dict[str, Any]) -> Iterator[str]:
    """Debian's prometheus on a free loopback port, scraping `targets` (job -> base URL)."""
    binary = shutil.which("prometheus")
    if binary is None:
        missing_system_dependency("no prometheus (Debian's prometheus package; `make install` installs it)")
    (root / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        # A scrape's timeout is its interval: 2 s leaves room for a loaded machine.
        "global": {"scrape_interval": "2s", "evaluation_interval": "1s"},
        "rule_files": [str(root / "rules.yaml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [url.split("://", 1)[1]]}]}
            for job, url in targets.items()
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (root / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (root / "prometheus.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            return False

        wait_until(ready, 60, "Prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """`cairn up --detach` with retention on (so the archiver's gauges exist; nothing is old enough
    to leave), Prometheus scraping it; one run, the same file again, predictions."""
    root = tmp_path_factory.mktemp("prometheus")
    home = root / "home"
    env = user_env(
        home, CAIRN_SERVE_PORT="0", CAIRN_RETENTION_MAX_AGE_S="86400", CAIRN_ARCHIVE_INTERVAL_S="1"
    )
    data = write_table(root / "data")
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=root, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        runtime = json.loads((home / "runtime.json").read_text())
        # Job names as the chart's ServiceMonitor gives them: the Services' names, <release>-<service>.
        targets = {f"cairn-{name}": url for name, url in runtime["health"].items()}
        targets["cairn-inference"] = runtime["serve_url"]
        with prometheus(root, targets, rendered_rules()) as url:
            # Prometheus takes its targets a few seconds after it is ready: the run starts once
            # every one has been scraped, so each counter is seen before it grows.
            wait_until(lambda: instant(url, "count(up == 1)") == len(targets), 60, "every target scraped")
            start = time.time()
            for _ in range(2):  # computed, then served from the step cache
                run = cairn(
                    "submit", str(data), "--target", "price", *RUN, "--wait", "--timeout", "300",
                    env=env, cwd=root, timeout=330,
                )  # fmt: skip
                assert run.returncode == 0, run.stdout + run.stderr
            count = f'sum(cairn_inference_requests_total{{model="{MODEL}", status="200"}})'
            for n in range(PREDICTIONS):
                answer = httpx.post(f"{runtime['serve_url']}/v1/models/{MODEL}/predict", json=ROW, timeout=30)
                assert answer.status_code == 200, answer.text
                if n == 0:  # the model's series exist from its first request: seen, then growing
                    wait_until(lambda: instant(url, count) >= 1, 30, "the first prediction scraped")
            # What a healthy run never shows, provoked: a dead letter (data outside the allowed
            # roots) and a refused champion.
            refused = cairn(
                "submit", "/etc/hostname", "--no-upload", "--target", "y", "--wait", env=env, cwd=root
            )
            assert refused.returncode == 1, refused.stdout + refused.stderr
            asyncio.run(forge_a_deployment(runtime, env, root))
            wait_until(
                lambda: instant(url, "sum(cairn_models_refused_total)") >= 1, 30, "the refusal scraped"
            )
            # Until every target has been scraped a few times since.
            done = time.time()
            wait_until(lambda: instant(url, "min(timestamp(up))") > done + 3, 30, "the last scrapes")
            assert instant(url, count) == PREDICTIONS
            yield Scraped(url, start, time.time())
    finally:
        cairn("down", env=env, cwd=root, timeout=60)


async def forge_a_deployment(runtime: dict[str, Any], env: dict[str, str], root: Path) -> None:
    """The last deployment again as a newer version whose bytes do not match their hash, published
    as the admin user: the endpoint refuses it and keeps its champion."""
    listing = cairn("events", "--json", env=env, cwd=root)
    docs = [json.loads(line) for line in listing.stdout.splitlines() if line.startswith("{")]
    doc = next(d for d in reversed(docs) if d["type"] == "cairn.model.deployed.v1")
    data = doc["data"]
    forged = {**doc, "id": f"forged-{doc['id']}", "data": {**data, "version": data["version"] + 1}}
    forged["data"]["model"] = {**data["model"], "sha256": "0" * 64}
    admin = credentials_env(Path(runtime["nats_auth"]), ADMIN)
    fields = {k.removeprefix("CAIRN_").lower(): v for k, v in admin.items()}
    nc = await connect(CairnSettings(home=root / "home", nats_url=runtime["nats_url"], **fields), "test")
    try:
        headers = {"Nats-Msg-Id": forged["id"]}
        await nc.jetstream().publish(forged["type"], json.dumps(forged).encode(), headers=headers)
    finally:
        await nc.close()


def instant(url: str, expr: str) -> float:
    """The value of a one-series expression now (0 while it has none)."""
    result = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


# PromQL, as far as the checks need it ----------------------------------------------------------
# Our expressions' selectors: a metric name (cairn's, a recording of ours, or `up`) with matchers.
SELECTOR = re.compile(r"\b(cairn[_:][a-zA-Z0-9_:]*|up)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# Where an expression splits into what it compares: set operators, then comparisons, each with
# its modifiers (bool, on/ignoring, group_left/right).
SET_OPERATOR = re.compile(r"\s(and|or|unless)\s+(?:(?:on|ignoring)\s*\([^)]*\)\s*)?")
COMPARISON = re.compile(
    r"(==|!=|>=|<=|>|<)\s*(?:bool\s*)?(?:(?:on|ignoring)\s*\([^)]*\)\s*)?(?:group_(?:left|right)\s*(?:\([^)]*\))?\s*)?"
)
NUMBER = re.compile(r"[0-9.]+")


def top_level_split(expr: str, operator: re.Pattern[str]) -> list[str]:
    """`expr` cut at each `operator` outside parentheses, braces and quotes."""
    parts, depth, quoted, last, i = [], 0, False, 0, 0
    while i < len(expr):
        c = expr[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and c in "({[":
            depth += 1
        elif not quoted and c in ")}]":
            depth -= 1
        elif not quoted and depth == 0 and (m := operator.match(expr, i)):
            parts.append(expr[last:i])
            last = i = m.end()
            continue
        i += 1
    return [p.strip() for p in [*parts, expr[last:]]]


def closing(expr: str) -> int:
    """Where the parenthesis that opens `expr` closes."""
    depth = 0
    for i, c in enumerate(expr):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            return i
    return -1


def unwrap(expr: str) -> str:
    """Without the parentheses that enclose the whole expression, if they do."""
    while expr.startswith("(") and closing(expr) == len(expr) - 1:
        expr = expr[1:-1].strip()
    return expr


def signals(expr: str) -> list[str]:
    """What an alert compares: the operands of its set operators and comparisons, numbers left out."""
    parts = top_level_split(unwrap(expr), SET_OPERATOR)
    if len(parts) > 1:
        return [signal for part in parts for signal in signals(part)]
    operands = top_level_split(parts[0], COMPARISON)
    return [unwrap(o) for o in operands if not NUMBER.fullmatch(o)]


def grafana(expr: str, run_seconds: float) -> str:
    """A panel's query as Grafana sends it for a dashboard showing the run."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{int(run_seconds) + 1}s")


def test_the_signal_splitter_finds_each_operand() -> None:
    expr = "a == 0 or (b < max_over_time(b[10m]) and on () sum(c) > 0)"
    assert signals(expr) == ["a", "b", "max_over_time(b[10m])", "sum(c)"]
    assert signals('x{l!="v"} > 0 and deriv(x{l!="v"}[10m]) > 0') == ['x{l!="v"}', 'deriv(x{l!="v"}[10m])']
    assert signals("time() - t > 900") == ["time() - t"]


# The checks ------------------------------------------------------------------------------------
def test_every_target_was_scraped_and_every_service_said_ready(scraped: Scraped) -> None:
    targets = scraped.get("/api/v1/targets")["activeTargets"]
    assert len(targets) == len(SERVICES) + 1, targets
    assert instant(scraped.url, "count(max_over_time(up[10m]) == 1)") == len(targets)
    assert instant(scraped.url, "count(max_over_time(cairn_service_ready[10m]) == 1)") == len(SERVICES)


def test_every_rule_evaluates_and_fires_on_what_was_provoked_only(scraped: Scraped) -> None:
    rules = [r for g in scraped.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {name for name, _ in alert_queries()}
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    state = {r["name"]: r["state"] for r in rules}
    assert state.pop("CairnDeadLetters") == "firing", "the provoked dead letter"
    # Not even pending. CairnServiceNotReady may be: a scrape that timed out on a loaded machine.
    quiet = {"CairnGateFailures", "CairnDaskWorkersLost", "CairnInferenceP99High"}
    quiet |= {"CairnArchiverFailing", "CairnArchiveBehindRetention"}
    assert all(state[name] == "inactive" for name in quiet), state
    assert all(value != "firing" for value in state.values()), state


QUERIES = [("alert " + where, expr) for where, expr in alert_queries()] + [
    ("panel " + where, expr) for where, expr in panel_queries()
]


@pytest.mark.parametrize(("where", "expr"), QUERIES, ids=[w for w, _ in QUERIES])
def test_every_metric_and_label_named_is_exported(scraped: Scraped, where: str, expr: str) -> None:
    """Metric names by the label-values API, labels and values by the series API: also for what a
    healthy run leaves at zero (a misspelt name or label would make such a query empty forever)."""
    names = set(scraped.get("/api/v1/label/__name__/values"))
    labels_seen: set[str] = set()
    selectors = SELECTOR.findall(expr)
    assert selectors, f"{where}: no cairn metric in {expr}"
    for name, matchers in selectors:
        assert name in names, f"{where}: no metric {name}"
        series = scraped.get("/api/v1/series", **{"match[]": name, "start": scraped.start})
        labels: dict[str, set[str]] = {}
        for one in series:
            for label, value in one.items():
                labels.setdefault(label, set()).add(value)
        labels_seen |= set(labels)
        for label, op, value in MATCHER.findall(matchers or ""):
            assert label in labels, f"{where}: {name} has no label {label}"
            if op == "=":
                assert value in labels[label], f"{where}: {name} never had {label}={value!r}"
        if matchers:
            selected = scraped.get("/api/v1/series", **{"match[]": name + matchers, "start": scraped.start})
            assert selected, f"{where}: no series {name}{matchers}"
    for grouping in GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in grouping.split(","))):
            assert label in labels_seen, f"{where}: groups by {label}, which none of its metrics has"


@pytest.mark.parametrize(("alert", "expr"), alert_queries(), ids=[a for a, _ in alert_queries()])
def test_what_each_alert_watches_had_data(scraped: Scraped, alert: str, expr: str) -> None:
    for signal in signals(expr):
        assert scraped.values(signal), f"{alert}: {signal} gave nothing during the run"


@pytest.mark.parametrize(("where", "expr"), panel_queries(), ids=[w for w, _ in panel_queries()])
def test_every_panel_showed_the_run(scraped: Scraped, where: str, expr: str) -> None:
    assert scraped.values(grafana(expr, scraped.end - scraped.start)), f"{where}: no data"


async def test_the_archivers_gauges_say_what_retention_holds_back(js, nats_server, tmp_path: Path) -> None:
    """What CairnArchiveBehindRetention and CairnArchiverFailing read, from a real archiver on a real
    nats-server: a consumer that has not processed what retention sends out keeps it in the stream,
    overdue; once it has, nothing is, and each pass is stamped."""
    settings = make_settings(
        nats_server.url, tmp_path, retention_max_bytes=6000, archive_segment_records=7, archive_interval_s=0.1
    )
    store = LineageStore(settings.lineage_url)
    await publish(js, settings, 30)
    await record_all(js, settings, store)
    reader = await js.pull_subscribe(subject_for(DataArrived, settings.namespace), durable="slow-reader")
    (first,) = await reader.fetch(1)
    await first.ack()  # the consumer has processed the stream's first message only
    metrics, stopping, started = ServiceMetrics("lineage"), asyncio.Event(), time.time()
    archiving = asyncio.create_task(keep_archiving(js, settings, store, stopping, metrics))

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"service": "lineage"}) or 0.0

    try:
        await wait_for(lambda: sample("cairn_archive_overdue_records") > 0, 10, "events held back")
        stamped = sample("cairn_archive_last_success_timestamp_seconds")
        assert stamped >= started
        left = 29
        while left:
            for msg in await reader.fetch(left, timeout=5):
                await msg.ack()
                left -= 1
        await wait_for(lambda: sample("cairn_archive_overdue_records") == 0, 10, "nothing held back")
        assert sample("cairn_archive_last_success_timestamp_seconds") > stamped
    finally:
        stopping.set()
        await archiving
        store.close()
