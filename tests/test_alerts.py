"""cairn's alerts and dashboards as the chart ships them.

The rules are rendered by the real Helm engine from helm/cairn/files/alerts.yaml, and `promtool
test rules` (Debian's prometheus package) runs that rendering: for every alert, input series that
make it fire (its labels, its value and its annotations as Prometheus renders them) and series
that must leave it quiet. That the expressions name metrics and labels the services really export
is tests/test_prometheus.py's job, on a real Prometheus scraping a running system.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import missing_system_dependency
from tests.test_helm_chart import CHART, find, merged, objects, render

pytestmark = pytest.mark.k8s

ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARDS = CHART / "files" / "dashboards"
CRDS = {"metrics": {"prometheusRule": {"crdsInstalled": True}}}


def rendered_rules(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec as the chart renders it, with the Operator's CRDs declared."""
    (rule,) = find(objects(render(merged(CRDS, values or {}))), "PrometheusRule")
    return rule["spec"]


def rules_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in spec["groups"] for r in group["rules"] if "alert" in r}


# What an alert's annotations read, rendered the way Prometheus renders the few template forms the
# rules use; a label an annotation names that the alert does not carry is an error here (Prometheus
# would print "<no value>").
TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def go_float(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def render_annotation(text: str, labels: dict[str, str], value: float) -> str:
    def one_field(match: re.Match[str]) -> str:
        expr = match.group(1)
        if expr == "$value":
            return go_float(value)
        if expr.startswith("$labels."):
            name = expr.removeprefix("$labels.")
            assert name in labels, f"the annotation names {name!r}, which the alert does not carry"
            return labels[name]
        if printf := re.fullmatch(r'printf "(%\.\d[gf])" \$value', expr):
            return printf.group(1) % value
        raise AssertionError(f"a template this test cannot render: {{{{ {expr} }}}}")

    return TEMPLATE.sub(one_field, text)


@dataclass
class Case:
    """Input series (selector -> promtool's expanding notation, one sample a minute), when to look,
    and the alerts expected then: (labels of the result series, value). None: no alert firing."""

    series: dict[str, str]
    at: str
    fires: list[tuple[dict[str, str], float]] = field(default_factory=list)


def series(metric: str, **labels: str) -> str:
    """A series of a scraped target (its job and instance) with these labels."""
    body = ",".join(f'{k}="{v}"' for k, v in {**SCRAPED, **labels}.items())
    return f"{metric}{{{body}}}"


SCRAPED = {"job": "cairn-x", "instance": "10.0.0.1:8000"}
BUCKETS = ("0.1", "0.5", "1", "+Inf")
PENDING, HANDLED, GATE = "cairn_consumer_pending", "cairn_events_handled_total", "cairn_gate_decisions_total"
OVERDUE, ARCHIVED = "cairn_archive_overdue_records", "cairn_archive_last_success_timestamp_seconds"
WORKERS, TRIALS, READY = "cairn_dask_workers", "cairn_trials_running", "cairn_service_ready"
TRIAL_CONSUMER = "training-trial-requested-v1"


def histogram(model: str, counts_per_minute: dict[str, int]) -> dict[str, str]:
    """cairn_inference_seconds buckets growing by so many requests a minute (cumulative by le)."""
    return {
        series("cairn_inference_seconds_bucket", model=model, le=le): f"0+{counts_per_minute[le]}x40"
        for le in BUCKETS
    }


def scraped(**labels: str) -> dict[str, str]:
    return {**SCRAPED, **labels}


# alert -> (cases where it fires, cases where it must stay quiet)
CASES: dict[str, tuple[list[Case], list[Case]]] = {
    "CairnConsumerLagGrowing": (
        [
            Case(
                {  # two replicas report the durable they share: one alert
                    series(PENDING, service="training", consumer=TRIAL_CONSUMER): "0+5x40",
                    series(
                        PENDING, service="training", consumer=TRIAL_CONSUMER, instance="10.0.0.5:8000"
                    ): "0+5x40",
                },
                "30m",
                [({"service": "training", "consumer": TRIAL_CONSUMER}, 150)],
            )
        ],
        [
            # A backlog that drains, a steady one, and lineage (its own alert) growing.
            Case({series(PENDING, service="training", consumer="a"): "200-5x40"}, "30m"),
            Case({series(PENDING, service="training", consumer="b"): "40x40"}, "30m"),
            Case({series(PENDING, service="lineage", consumer="lineage"): "0+5x40"}, "30m"),
        ],
    ),
    "CairnDeadLetters": (
        [
            Case(
                {
                    series(
                        HANDLED, service="ingestion", type="cairn.data.arrived.v1", outcome="rejected"
                    ): "0x20 1x20"
                },
                "25m",
                [({"service": "ingestion", "type": "cairn.data.arrived.v1"}, 1)],
            )
        ],
        [
            # Counted long ago, and every other outcome growing.
            Case({series(HANDLED, service="a", type="t", outcome="rejected"): "0x5 3x40"}, "40m"),
            Case({series(HANDLED, service="a", type="t", outcome="ok"): "0+9x40"}, "30m"),
            Case({series(HANDLED, service="a", type="t", outcome="retried"): "0+9x40"}, "30m"),
        ],
    ),
    "CairnGateFailures": (
        [
            Case(
                {series(GATE, service="evaluation", model="houses", outcome="failed"): "0x30 2x40"},
                "65m",
                [({"model": "houses"}, 2)],
            )
        ],
        [
            Case({series(GATE, service="evaluation", model="houses", outcome="passed"): "0+1x70"}, "65m"),
            Case({series(GATE, service="evaluation", model="houses", outcome="failed"): "1x5 2x70"}, "75m"),
        ],
    ),
    "CairnInferenceP99High": (
        # Every request between 0.5 and 1 s: p99 = 0.5 + 0.5 * 0.99.
        [
            Case(
                histogram("houses", {"0.1": 0, "0.5": 0, "1": 60, "+Inf": 60}),
                "20m",
                [({"model": "houses"}, 0.995)],
            )
        ],
        # Every request under 0.1 s; and a slow spell shorter than the 10 minutes it must last.
        [
            Case(histogram("houses", {"0.1": 60, "0.5": 60, "1": 60, "+Inf": 60}), "20m"),
            Case(histogram("houses", {"0.1": 0, "0.5": 0, "1": 60, "+Inf": 60}), "9m"),
        ],
    ),
    "CairnLineageLagging": (
        [
            Case(
                {series(PENDING, service="lineage", consumer="lineage"): "5x40"},
                "20m",
                [(scraped(service="lineage", consumer="lineage"), 5)],
            )
        ],
        [
            # Busy but catching up now and then; and another consumer's lag.
            Case(
                {series(PENDING, service="lineage", consumer="lineage"): " ".join(["300", "0"] * 20)}, "30m"
            ),
            Case({series(PENDING, service="training", consumer="t"): "5x40"}, "30m"),
        ],
    ),
    "CairnArchiveBehindRetention": (
        [Case({series(OVERDUE, service="lineage"): "12x40"}, "20m", [(scraped(service="lineage"), 12)])],
        # Nothing overdue; overdue for 10 minutes only (a consumer finished its work).
        [
            Case({series(OVERDUE, service="lineage"): "0x40"}, "30m"),
            Case({series(OVERDUE, service="lineage"): "0x10 12x10 0x20"}, "30m"),
        ],
    ),
    "CairnArchiverFailing": (
        # The last good pass at 60 s, looked at 1200 s after the epoch promtool starts from; then a
        # pass every minute.
        [Case({series(ARCHIVED, service="lineage"): "60x40"}, "20m", [(scraped(service="lineage"), 1140)])],
        [Case({series(ARCHIVED, service="lineage"): "0+60x40"}, "30m")],
    ),
    "CairnDaskWorkersLost": (
        [
            # Every worker gone (seen by two replicas: one alert); one of four gone while trials ran.
            Case(
                {
                    series(WORKERS, service="training"): "2x10 0x30",
                    series(WORKERS, service="training", instance="10.0.0.5:8000"): "2x10 0x30",
                },
                "20m",
                [({"service": "training"}, 0)],
            ),
            Case(
                {series(WORKERS, service="training"): "4x10 3x30", series(TRIALS): "2x40"},
                "15m",
                [({"service": "training"}, 3)],
            ),
        ],
        [
            # Scaled down while idle, and a steady cluster at work.
            Case({series(WORKERS, service="training"): "4x10 3x30", series(TRIALS): "0x40"}, "15m"),
            Case({series(WORKERS, service="training"): "4x40", series(TRIALS): "8x40"}, "15m"),
        ],
    ),
    "CairnServiceNotReady": (
        [
            Case(
                {series(READY, job="cairn-features", service="features"): "1x5 0x30"},
                "15m",
                [(scraped(job="cairn-features", service="features"), 0)],
            ),
            Case(
                {'up{job="cairn-inference",instance="10.0.0.9:8080"}': "1x5 0x30"},
                "15m",
                [({"job": "cairn-inference", "instance": "10.0.0.9:8080"}, 0)],
            ),
        ],
        [
            # Ready again within 5 minutes; another application's target down; all well.
            Case({series(READY, service="features"): "1x5 0x3 1x30"}, "15m"),
            Case({'up{job="node-exporter",instance="10.0.0.2:9100"}': "0x30"}, "15m"),
            Case(
                {
                    series(READY, service="features"): "1x30",
                    series("up", job="my-release-cairn-training"): "1x30",
                },
                "15m",
            ),
        ],
    ),
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_system_dependency("no promtool (Debian's prometheus package; `make install` installs it)")
    return found


def unit_test(spec: dict[str, Any], alert: str, cases: list[Case]) -> dict[str, Any]:
    """One promtool test group per case: its series, and the alerts expected at its time."""
    rule = rules_of(spec)[alert]
    groups = []
    for case in cases:
        expected = [
            {
                "exp_labels": {**labels, **rule.get("labels", {})},
                "exp_annotations": {
                    k: render_annotation(v, labels, value) for k, v in rule.get("annotations", {}).items()
                },
            }
            for labels, value in case.fires
        ]
        groups.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                "alert_rule_test": [{"eval_time": case.at, "alertname": alert, "exp_alerts": expected}],
            }
        )
    return {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": groups}


def run_promtool(
    tmp_path: Path, spec: dict[str, Any], tests: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return rendered_rules()


# The rules ------------------------------------------------------------------------------------
def test_the_chart_renders_the_rules_file_as_it_is(spec: dict[str, Any]) -> None:
    """What promtool tests below is the file, and the file is what the chart installs."""
    assert spec == yaml.safe_load(ALERTS.read_text())


def test_every_alert_has_cases_that_fire_and_cases_that_do_not(spec: dict[str, Any]) -> None:
    assert set(rules_of(spec)) == set(CASES)
    for alert, (fire, quiet) in CASES.items():
        assert fire and all(c.fires for c in fire) and quiet and not any(c.fires for c in quiet), alert


@pytest.mark.parametrize("alert", sorted(CASES))
def test_alert_fires_on_its_signal_and_only_then(spec: dict[str, Any], alert: str, tmp_path: Path) -> None:
    fire, quiet = CASES[alert]
    result = run_promtool(tmp_path, spec, unit_test(spec, alert, fire + quiet))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_tells_a_wrong_expectation(spec: dict[str, Any], tmp_path: Path) -> None:
    """The harness can fail: a quiet case expected to fire is reported, not passed."""
    fire, quiet = CASES["CairnDeadLetters"]
    wrong = Case(quiet[0].series, quiet[0].at, fire[0].fires)
    result = run_promtool(tmp_path, spec, unit_test(spec, "CairnDeadLetters", [wrong]))
    assert result.returncode != 0 and "CairnDeadLetters" in result.stdout + result.stderr


def test_the_p99_threshold_comes_from_the_values(tmp_path: Path) -> None:
    """0.05 s instead of 0.5 s: requests under 0.1 s (p99 0.099 s) now fire."""
    spec = rendered_rules({"metrics": {"prometheusRule": {"inferenceP99Seconds": 0.05}}})
    assert rules_of(spec)["CairnInferenceP99High"]["expr"].endswith("> 0.05")
    fast = histogram("houses", {"0.1": 60, "0.5": 60, "1": 60, "+Inf": 60})
    tests = unit_test(spec, "CairnInferenceP99High", [Case(fast, "20m", [({"model": "houses"}, 0.099)])])
    result = run_promtool(tmp_path, spec, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_needs_the_operator_and_can_be_turned_off() -> None:
    assert not find(objects(render()), "PrometheusRule")  # an offline render: no CRDs advertised
    off = {"metrics": {"prometheusRule": {"enabled": False, "crdsInstalled": True}}}
    assert not find(objects(render(off)), "PrometheusRule")
    labelled = {"metrics": {"prometheusRule": {"crdsInstalled": True, "labels": {"release": "prom"}}}}
    (rule,) = find(objects(render(labelled)), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    # Without labels of its own, those the ServiceMonitor is selected by (kube-prometheus-stack
    # selects both by its release).
    inherited = merged(CRDS, {"metrics": {"serviceMonitor": {"labels": {"release": "kps"}}}})
    (rule,) = find(objects(render(inherited)), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"


# The dashboards -------------------------------------------------------------------------------
def dashboard_files() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def test_dashboards_ship_in_a_configmap_for_grafanas_sidecar() -> None:
    (configmap,) = [
        o for o in find(objects(render()), "ConfigMap") if o["metadata"]["name"].endswith("-dashboards")
    ]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {name: json.loads(text) for name, text in configmap["data"].items()}
    assert shipped == dashboard_files() and len(shipped) == 4
    off = objects(render({"metrics": {"dashboards": {"enabled": False}}}))
    assert not [o for o in find(off, "ConfigMap") if o["metadata"]["name"].endswith("-dashboards")]


def test_every_panel_has_a_query_and_a_place() -> None:
    uids = set()
    for name, board in dashboard_files().items():
        assert board["uid"] not in uids, name
        uids.add(board["uid"])
        (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert variable["name"] == "datasource" and variable["query"] == "prometheus", name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            where = f"{name}: {panel['title']}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            assert panel["description"] and panel["targets"], where
            for t in panel["targets"]:
                assert t["expr"] and t["datasource"]["uid"] == "${datasource}", where


def panel_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, for tests/test_prometheus.py."""
    return [
        (f"{name}: {panel['title']} [{t['refId']}]", t["expr"])
        for name, board in dashboard_files().items()
        for panel in board["panels"]
        for t in panel["targets"]
    ]


def alert_queries() -> list[tuple[str, str]]:
    return [(alert, rule["expr"]) for alert, rule in rules_of(yaml.safe_load(ALERTS.read_text())).items()]
