"""The pictures of `cairn ui`: a study (every trial's score against its budget, the rungs and who
survived them, the leaderboard), a model's holdout metrics across its champions, and the live page
(each consumer's lag, the trials in flight).

The drawing functions are pure (data in, SVG out): their tests parse the SVG and count its marks.
The pages are then driven in Debian's chromium through Playwright on a real system in operator mode
(one `cairn run` per service): the training service is stopped before a small successive-halving
study is submitted, so its first rung waits in the bus, deterministically, and the live page must
show what `cairn status` prints; training is started again, the study ends, and the study page must
show what `cairn events` prints. The model page of a model with several champions and a failed gate
is checked on the auditor's journey (tests/test_audit_journey.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from services.lineage import pictures, studies
from services.lineage.studies import Entry, InFlight, Promotion, RungPlan, Study, Trial
from services.platform.bus.embedded import EmbeddedNats
from services.tools.cli.system import ConsumerLag
from services.tools.supervisor import free_port
from tests.conftest import missing_system_dependency
from tests.test_journeys import CAIRN, SERVICES, cairn, stop_all, user_env, wait_until, write_table

CHROMIUM = Path("/usr/bin/chromium")
SVG = "{http://www.w3.org/2000/svg}"


def marks(svg: str, cls: str) -> list[ET.Element]:
    """The `<g>` elements of `svg` whose class list holds `cls` (the SVG must be well-formed XML)."""
    root = ET.fromstring(svg)
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


# The drawing functions, on their own -------------------------------------------------------------
def a_study() -> Study:
    """Three rungs (budgets 1, 3, 9), six configurations of two families; trial 5 failed at rung 0."""
    scores = {0: 2.0, 1: 1.5, 2: 3.0, 3: 1.1, 4: 2.5, 5: None}
    families = {t: ("linear" if t % 2 else "random_forest") for t in scores}
    trials = [Trial(t, 0, 1, families[t], s, f"e0-{t}") for t, s in scores.items()]
    trials += [Trial(3, 1, 3, "linear", 0.9, "e1-3"), Trial(1, 1, 3, "linear", 1.2, "e1-1")]
    trials += [Trial(3, 2, 9, "linear", 0.8, "e2-3")]
    return Study(
        study_id="study-1",
        correlation="run-1",
        metric="rmse",
        strategy="asha",
        rungs=[RungPlan(0, 1, 6), RungPlan(1, 3, 2), RungPlan(2, 9, 1)],
        families=families,
        trials=trials,
        promotions=[Promotion(0, 1, 3, [3, 1], "p0"), Promotion(1, 2, 9, [3], "p1")],
        leaderboard=[Entry(3, "linear", 2, 9, 0.8), Entry(1, "linear", 1, 3, 1.2)],
    )


def test_the_study_picture_has_a_mark_per_result_and_shows_who_survived() -> None:
    study = a_study()
    svg = pictures.study_svg(study)
    trials = marks(svg, "trial")
    assert len(trials) == len(study.trials)
    drawn = {(int(g.get("data-trial")), int(g.get("data-rung"))): g for g in trials}
    for t in study.trials:
        g = drawn[(t.trial_id, t.rung)]
        assert g.get("data-family") == t.family and int(g.get("data-budget")) == t.budget
        assert (g.get("data-score") is None) if t.score is None else float(g.get("data-score")) == t.score
    fates = {key: g.get("data-fate") for key, g in drawn.items()}
    assert [k for k, f in fates.items() if f == "promoted"] == [(1, 0), (3, 0), (3, 1)]
    assert fates[(3, 2)] == "best" and fates[(1, 1)] == "dropped" and fates[(5, 0)] == "dropped"
    assert drawn[(5, 0)].find(f"{SVG}path") is not None, "a failed trial is a cross, not a dot"
    lines = marks(svg, "promotion")
    assert sorted((int(g.get("data-trial")), int(g.get("data-to-rung"))) for g in lines) == [
        (1, 1),
        (3, 1),
        (3, 2),
    ]
    rungs = {int(g.get("data-rung")): g for g in marks(svg, "rung")}
    assert [(int(g.get("data-trials")), int(g.get("data-promoted"))) for g in rungs.values()] == [
        (6, 2),
        (2, 1),
        (1, 0),
    ]
    assert {g.get("data-family") for g in marks(svg, "legend")} == {"linear", "random_forest"}
    colours = {
        g.get("data-family"): g.find(f"{SVG}circle").get("fill") for g in trials if g.get("data-score")
    }
    assert colours["linear"] != colours["random_forest"], "coloured by family"


def test_a_promotion_whose_next_rung_is_still_running_is_drawn_pending() -> None:
    study = a_study()
    running = Study(**{**study.__dict__, "trials": [t for t in study.trials if t.rung < 2]})
    lines = marks(pictures.study_svg(running), "promotion")
    pending = [g for g in lines if "pending" in g.get("class").split()]
    assert [(g.get("data-trial"), g.get("data-to-rung")) for g in pending] == [("3", "2")]


def test_the_leaderboard_lists_every_entry_best_first() -> None:
    study = a_study()
    table = ET.fromstring(pictures.leaderboard_html(study))
    rows = [r for r in table.iter("tr") if r.get("class") == "entry"]
    assert [(int(r.get("data-trial")), float(r.get("data-score"))) for r in rows] == [
        (e.trial_id, e.score) for e in study.leaderboard
    ]


def test_the_model_picture_has_every_champion_and_every_failure_in_each_panel() -> None:
    t0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    history = [
        pictures.ModelMark("champion", t0, "run-a", {"rmse": 1.85, "r2": 0.70}, 1),
        pictures.ModelMark("champion", t0 + timedelta(seconds=2), "run-b", {"rmse": 0.89, "r2": 0.93}, 2),
        pictures.ModelMark("gatefail", t0 + timedelta(days=30), "run-c", {"rmse": 1.85, "r2": 0.70}),
        pictures.ModelMark("deployfail", t0 + timedelta(days=31), "run-d", {}),
    ]
    svg = pictures.model_svg("houses", "rmse", history)
    root = ET.fromstring(svg)
    panels = marks(svg, "panel")
    assert [p.get("data-metric") for p in panels] == ["rmse", "r2"], "the gate's metric first"
    for panel in panels:
        points = [g for g in panel.iter(f"{SVG}g") if "point" in g.get("class").split()]
        assert [g.get("data-kind") for g in points] == ["champion", "champion", "gatefail", "deployfail"]
        metric = panel.get("data-metric")
        assert [g.get("data-value") for g in points[:3]] == [repr(m.metrics[metric]) for m in history[:3]]
        assert points[3].get("data-value") is None, "a failed deployment with no gate in the log"
        assert [g.get("data-version") for g in points[:2]] == ["1", "2"]
        assert panel.find(f"{SVG}path[@class='reign-line']") is not None
    links = [a.get("href") for a in root.iter(f"{SVG}a")]
    assert links == [f"/run/{m.correlation}" for m in history] * 2, "each mark links to its run"


def test_the_lag_picture_has_a_bar_per_consumer() -> None:
    lags = [
        ConsumerLag("training", "training-trial-requested-v1", "IDLE-NO-PULLERS", 9, 0),
        ConsumerLag("lineage", "lineage", "live", 0, 2),
    ]
    rows = marks(pictures.lag_svg(lags), "consumer")
    assert [(g.get("data-durable"), g.get("data-pending"), g.get("data-ack-pending")) for g in rows] == [
        (x.durable, str(x.pending), str(x.ack_pending)) for x in lags
    ]
    widths = [float(g.find(f"{SVG}rect").get("width")) for g in rows]
    assert widths[0] > widths[1] == 0.0, "the pending bar is to scale"


def test_trials_in_flight_are_those_requested_and_not_completed() -> None:
    def doc(kind: str, trial: int, rung: int) -> dict:
        data = {"study_id": "s", "trial_id": trial, "rung": rung, "budget": 3**rung, "family": "linear"}
        return {
            "type": f"cairn.trial.{kind}.v1",
            "id": f"{kind}{trial}{rung}",
            "correlationid": "r",
            "data": data,
        }

    docs = [doc("requested", t, 0) for t in range(4)] + [doc("completed", 0, 0), doc("completed", 2, 0)]
    docs += [doc("requested", 0, 1)]
    flying = studies.in_flight(docs)
    assert [(t.trial_id, t.rung) for t in flying] == [(1, 0), (3, 0), (0, 1)]
    squares = marks(pictures.flight_svg(flying), "inflight")
    assert [(g.get("data-trial"), g.get("data-rung")) for g in squares] == [
        ("1", "0"),
        ("3", "0"),
        ("0", "1"),
    ]
    assert isinstance(flying[0], InFlight)


# The pages in a browser, on a real system ---------------------------------------------------------
MODEL = "study"
STUDY = ["--families", "linear,random_forest", "--trials", "9", "--strategy", "asha", "--max-budget", "9"]
STATUS_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(live|IDLE-NO-PULLERS)\s+pending=(\d+) in-flight=(\d+) ")


def events(env: dict, root: Path, correlation: str | None = None, as_json: bool = True) -> list:
    args = [
        "events",
        *(["--json"] if as_json else []),
        *(["--correlation", correlation] if correlation else []),
    ]
    listing = cairn(*args, env=env, cwd=root)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")] if as_json else lines


def status(env: dict, root: Path) -> subprocess.CompletedProcess[str] | None:
    """`cairn status`, or None when it took over two minutes (seven services starting on two busy
    cores): the callers wait for a condition and ask again."""
    try:
        return cairn("status", env=env, cwd=root, timeout=120)
    except subprocess.TimeoutExpired:
        return None


def status_lags(env: dict, root: Path) -> dict[str, tuple[int, int]]:
    """Each consumer's (pending, in flight) as `cairn status` prints them."""
    out = (status(env, root) or subprocess.CompletedProcess([], 1, "")).stdout
    return {m[2]: (int(m[4]), int(m[5])) for line in out.splitlines() if (m := STATUS_LINE.match(line))}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Operator mode on an external nats-server: provisioned, every service live, then training
    stopped (its durable consumers stay on the stream and collect what is sent to them), and
    `cairn ui` serving."""
    if not CHROMIUM.exists():
        missing_system_dependency("no /usr/bin/chromium (Debian's chromium; `make install` installs it)")
    started = time.monotonic()
    root = tmp_path_factory.mktemp("pictures")
    nats = EmbeddedNats(root / "nats-server")
    nats.start()
    env = user_env(root / "home", CAIRN_NATS_URL=nats.url or "")
    logs = root / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "a") as log:  # the child keeps its own descriptor
            procs[name] = subprocess.Popen(
                [CAIRN, *args], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT
            )

    try:
        assert cairn("provision", env=env, cwd=root).returncode == 0
        for name in SERVICES:
            start(name, "run", name)
        wait_until(lambda: getattr(status(env, root), "returncode", 1) == 0, 300, "every consumer live")
        procs["training"].send_signal(signal.SIGTERM)
        procs["training"].wait(30)
        port = free_port()
        start("ui", "ui", "--port", str(port))
        url = f"http://127.0.0.1:{port}"

        def serving() -> bool:
            try:
                return httpx.get(url + "/live.json", timeout=5).status_code == 200
            except httpx.TransportError:
                assert procs["ui"].poll() is None, (logs / "ui.log").read_text()
                return False

        wait_until(serving, 60, "cairn ui to serve")
        yield {"root": root, "env": env, "url": url, "start": start, "procs": procs, "logs": logs}
    finally:
        stop_all(procs.values())
        nats.stop()
        print(f"pictures system: {time.monotonic() - started:.0f}s")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_live_then_study_pages_show_what_cairn_prints(
    system: dict, browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env, root, url = system["env"], system["root"], system["url"]
    shots = tmp_path_factory.mktemp("pictures-shots")
    data = write_table(root / "data")
    submit = subprocess.Popen(
        [CAIRN, "submit", str(data), "--target", "price", "--model-name", MODEL, *STUDY,
         "--wait", "--timeout", "300"],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Training is stopped: the first rung's trials wait in the bus, requested and not completed.
        def first_rung_waiting() -> list | None:
            log = events(env, root)
            plans = [e for e in log if e["type"] == "cairn.tuning.requested.v1"]
            if not plans:
                return None
            requested = [e for e in log if e["type"] == "cairn.trial.requested.v1"]
            return log if len(requested) == plans[0]["data"]["rungs"][0]["keep"] else None

        log = wait_until(first_rung_waiting, 180, "the first rung's trials to be requested")
        requested = [e for e in log if e["type"] == "cairn.trial.requested.v1"]
        completed = [e for e in log if e["type"] == "cairn.trial.completed.v1"]
        assert not completed, "nothing trains while training is stopped"

        def page_matches_status() -> dict | None:
            state = httpx.get(url + "/live.json", timeout=10).json()
            shown = {c["durable"]: (c["pending"], c["ack_pending"]) for c in state["consumers"]}
            printed = status_lags(env, root)
            return (
                state if printed and shown == printed and len(state["in_flight"]) == len(requested) else None
            )

        state = wait_until(page_matches_status, 60, "the live page to show what `cairn status` prints")
        lags = {c["durable"]: c for c in state["consumers"]}
        waiting = [c for c in lags.values() if c["service"] == "training" and c["pending"]]
        assert [c["pending"] for c in waiting] == [len(requested)], lags

        page = browser.new_page(viewport={"width": 1200, "height": 600})
        page.goto(url + "/live")
        first = page.locator("#live").get_attribute("data-updated")
        page.wait_for_function(
            "before => document.getElementById('live').dataset.updated !== before", arg=first, timeout=10_000
        )  # the page fetched /live.json again by itself
        rows = page.locator("svg.lag g.consumer")
        assert rows.count() == len(lags)
        for i in range(rows.count()):
            row = rows.nth(i)
            c = lags[row.get_attribute("data-durable")]
            assert int(row.get_attribute("data-pending")) == c["pending"]
            assert int(row.get_attribute("data-ack-pending")) == c["ack_pending"]
        flying = page.locator("svg.flight g.inflight")
        assert flying.count() == len(requested) - len(completed)
        assert sorted(
            int(flying.nth(i).get_attribute("data-trial")) for i in range(flying.count())
        ) == sorted(e["data"]["trial_id"] for e in requested)
        page.screenshot(path=str(shots / "live-page.png"), full_page=True)

        # Training again: the study runs to its end and the model is deployed.
        system["start"]("training", "run", "training")
        out, err = submit.communicate(timeout=330)
        assert submit.returncode == 0, out + err
    finally:
        if submit.poll() is None:
            submit.kill()

    correlation = next(e for e in log if e["type"] == "cairn.data.arrived.v1")["correlationid"]
    run = events(env, root, correlation)
    done = [e["data"] for e in run if e["type"] == "cairn.trial.completed.v1"]
    promoted = [e["data"] for e in run if e["type"] == "cairn.trials.promoted.v1"]
    board = next(e["data"] for e in run if e["type"] == "cairn.tuning.completed.v1")["leaderboard"]
    assert promoted, "a study of several rungs"
    # `cairn events` prints each trial's score in full: the picture must hold the same numbers.
    printed = {
        (int(m[1]), int(m[2])): float(m[3])
        for line in events(env, root, correlation, as_json=False)
        if (m := re.search(r"trial (\d+) rung (\d+) \w+ rmse=(\S+)$", line))
    }
    assert len(printed) == len(done)

    page.goto(f"{url}/study/{correlation}")
    trials = page.locator("svg.study g.trial")
    assert trials.count() == len(done)
    shown = {
        (int(g.get_attribute("data-trial")), int(g.get_attribute("data-rung"))): float(
            g.get_attribute("data-score")
        )
        for g in (trials.nth(i) for i in range(trials.count()))
    }
    assert shown == printed
    families = {g.get_attribute("data-family") for g in (trials.nth(i) for i in range(trials.count()))}
    assert families == {d["family"] for d in done}
    for decision in promoted:
        rung = page.locator(f'svg.study g.rung[data-rung="{decision["from_rung"]}"]')
        assert int(rung.get_attribute("data-promoted")) == len(decision["promoted"])
        survivors = page.locator(
            f'svg.study g.trial[data-rung="{decision["from_rung"]}"][data-fate="promoted"]'
        )
        assert sorted(
            int(survivors.nth(i).get_attribute("data-trial")) for i in range(survivors.count())
        ) == sorted(decision["promoted"])
    assert page.locator("svg.study g.promotion").count() == sum(len(d["promoted"]) for d in promoted)
    entries = page.locator("#leaderboard tr.entry")
    assert [
        (int(entries.nth(i).get_attribute("data-trial")), float(entries.nth(i).get_attribute("data-score")))
        for i in range(entries.count())
    ] == [(e["trial_id"], e["score"]) for e in board]
    best_line = next(
        line for line in events(env, root, correlation, as_json=False) if "tuning.completed" in line
    )
    best_score = entries.nth(0).locator("td").last.inner_text()
    assert f"rmse={best_score} of" in best_line, (best_score, best_line)
    page.screenshot(path=str(shots / "study-page.png"), full_page=True)

    # The model page: the champion this run made, with the numbers `cairn audit at` gives.
    answer = json.loads(
        cairn("audit", "at", "now", "--model", MODEL, "--format", "json", env=env, cwd=root).stdout
    )
    reign = answer["models"][MODEL]
    page.goto(f"{url}/model/{MODEL}")
    chart = page.locator(f'svg.model[data-model="{MODEL}"]')
    metric = chart.get_attribute("data-metric")
    assert metric == reign["gate"]["metric"]
    champion = chart.locator(f'g.panel[data-metric="{metric}"] g.point.champion')
    assert champion.count() == 1 and champion.get_attribute("data-version") == str(reign["version"])
    assert float(champion.get_attribute("data-value")) == reign["gate"]["metrics"][metric]
    page.close()
    print(f"screenshots: {shots}")
