"""The auditor's questions on a real system, driven only through the `cairn` executable: three runs
of one model (v1 deployed, v2 takes over, a third fails the gate), then `cairn audit at` between and
across them, `cairn audit history`, a shadow replay that is identical and one where a changed gate
setting flips the outcome, a tampered bundle refused with the public key, and `cairn ui` in a real
browser (Debian's chromium driven by Playwright), with a screenshot.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from services.tools.supervisor import free_port
from tests.conftest import missing_system_dependency
from tests.test_journeys import CAIRN, cairn, user_env, wait_until, write_table

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
MODEL = "houses"
# Run 1 and 3: a handful of trees (a weak model); run 2: a linear model, far better on this table.
WEAK = ["--families", "random_forest", "--trials", "1", "--strategy", "random", "--max-budget", "3"]
ROW = '{"x1": 0.5, "x2": 3.0, "colour": "red"}'
STRONG = ["--families", "linear", "--trials", "1", "--strategy", "random", "--max-budget", "3"]


def ms(text: str) -> str:
    """An event time as `cairn audit` prints it: UTC, cut to the millisecond, with a Z."""
    moment = datetime.fromisoformat(text).astimezone(UTC)
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shifted(stamp: str, millis: int) -> str:
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")) + timedelta(milliseconds=millis)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory):
    """`cairn up --detach` on a fresh home, three runs of one model; the events as the log has them."""
    root = tmp_path_factory.mktemp("auditor")
    home = root / "home"
    env = user_env(home, CAIRN_SERVE_PORT="0")
    data = write_table(root / "data")
    started = cairn("up", "--detach", "--timeout", "240", env=env, cwd=root, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        codes, served = [], []
        for spec in (WEAK, STRONG, WEAK):
            run = cairn(
                "submit", str(data), "--target", "price", "--model-name", MODEL, *spec,
                "--wait", "--timeout", "300", env=env, cwd=root, timeout=330,
            )  # fmt: skip
            codes.append(run.returncode)
            assert run.returncode in (0, 3), run.stdout + run.stderr
            # `--wait` returns once `cairn up`'s endpoint serves the champion: predict at once.
            if run.returncode == 0:
                assert f"served: {MODEL} v{len(served) + 1} at http://" in run.stdout, run.stdout
            predicted = cairn("predict", ROW, "--model", MODEL, env=env, cwd=root)
            assert predicted.returncode == 0, predicted.stderr
            served.append(json.loads(predicted.stdout)["version"])
        assert codes == [0, 0, 3], "v1 deployed, v2 took over, the third run failed the gate"
        assert served == [1, 2, 2], "served when submit returns; a failed gate changes nothing"
        listing = cairn("events", "--json", env=env, cwd=root)
        assert listing.returncode == 0, listing.stderr
        events = [json.loads(line) for line in listing.stdout.splitlines() if line.startswith("{")]
        arrivals = [e for e in events if e["type"] == "cairn.data.arrived.v1"]
        deployed = [e for e in events if e["type"] == "cairn.model.deployed.v1"]
        evaluated = [e for e in events if e["type"] == "cairn.model.evaluated.v1"]
        assert len(arrivals) == 3 and len(deployed) == 2 and len(evaluated) == 3
        yield {
            "root": root,
            "env": env,
            "data": data,
            "runs": [a["correlationid"] for a in arrivals],
            "deployed": deployed,
            "evaluated": evaluated,
        }
    finally:
        cairn("down", env=env, cwd=root, timeout=60)


def audit(h: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return cairn("audit", *args, env=h["env"], cwd=h["root"])


def at(h: dict, when: str) -> dict | None:
    result = audit(h, "at", when, "--model", MODEL, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["models"][MODEL]


def test_audit_at_answers_between_and_across_runs(history: dict) -> None:
    h = history
    t1, t2 = (ms(d["time"]) for d in h["deployed"])
    failed_gate = ms(h["evaluated"][2]["time"])
    raw_sha = hashlib.sha256(h["data"].read_bytes()).hexdigest()

    assert at(h, shifted(t1, -1)) is None, "nothing was champion before the first deployment"
    first = at(h, t1)  # to the millisecond: the instant of the deployment already answers
    assert first["version"] == 1 and first["since"] == t1 and first["until"] == t2
    assert first["displaced"] is None and first["correlation"] == h["runs"][0]
    assert (
        first["gate"]["passed"] and first["gate"]["event_id"] == h["deployed"][0]["data"]["evidence_event_id"]
    )
    assert first["raw"]["source_sha256"] == raw_sha, "the chain reaches the raw data's hash"
    assert [c["type"] for c in first["chain"]][-1] == "cairn.data.arrived.v1"

    second = at(h, t2)
    assert second["version"] == 2 and second["since"] == t2 and second["until"] is None
    assert second["displaced"] == 1 and second["gate"]["champion_version"] == 1
    assert any("vs champion" in r for r in second["gate"]["reasons"]), second["gate"]["reasons"]
    assert at(h, shifted(failed_gate, 1))["version"] == 2, "the failed gate changed nothing"

    # Text, 'now', and a time without a zone (UTC is assumed).
    now = audit(h, "at", "now", "--model", MODEL)
    assert now.returncode == 0, now.stderr
    assert "version 2 is champion" in now.stdout and "still champion" in now.stdout
    assert "displaced: version 1" in now.stdout and raw_sha in now.stdout
    naive = audit(h, "at", t1.removesuffix("Z"), "--model", MODEL)
    assert "version 1 was champion" in naive.stdout and f"until {t2}" in naive.stdout
    every = json.loads(audit(h, "at", shifted(t1, -1), "--format", "json").stdout)
    assert every["models"] == {MODEL: None}

    bad = audit(h, "at", "yesterday-ish")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
    unknown = audit(h, "at", "now", "--model", "nope")
    assert unknown.returncode == 2 and "houses" in unknown.stderr


def test_audit_history_lists_every_change_with_cause_and_evidence(history: dict) -> None:
    h = history
    result = audit(h, "history", MODEL, "--format", "json")
    assert result.returncode == 0, result.stderr
    changes = json.loads(result.stdout)["changes"]
    assert [(c["kind"], c["version"], c["champion_before"]) for c in changes] == [
        ("first champion", 1, None),
        ("takeover", 2, 1),
        ("no change", 2, 2),
    ]
    assert [c["time"] for c in changes] == sorted(c["time"] for c in changes)
    assert [c["gate"]["correlation"] for c in changes] == h["runs"]
    assert [c["gate"]["passed"] for c in changes] == [True, True, False]
    assert changes[1]["time"] == ms(h["deployed"][1]["time"])
    text = audit(h, "history", MODEL)
    assert "takeover       v2 displaces v1" in text.stdout and "gate FAILED" in text.stdout, text.stdout


def test_shadow_replay_same_then_a_changed_gate_setting_flips_it(history: dict) -> None:
    """Both replays at once (each in its own namespace): one as installed, one with a gate floor
    no model reaches on this table (holdout R2 at least 0.9999)."""
    h = history
    args = [CAIRN, "replay", "--correlation", h["runs"][1][:8], "--shadow", "--timeout", "300"]
    same = subprocess.Popen(
        args, env=h["env"], cwd=h["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stricter = {**h["env"], "CAIRN_GATE_MIN_R2": "0.9999"}
    flipped = subprocess.Popen(
        args, env=stricter, cwd=h["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out_same, err_same = same.communicate(timeout=600)
    out_flip, err_flip = flipped.communicate(timeout=600)

    assert same.returncode == 0, out_same + err_same
    for line in ("gate outcome", "chosen model", "holdout rmse", "model sha256", "featureset sha256"):
        assert any(line in row and row.split()[0] == "same" for row in out_same.splitlines()), (
            line,
            out_same,
        )
    assert "verdict: same" in out_same

    assert flipped.returncode == 1, out_flip + err_flip
    gate = next(row for row in out_flip.splitlines() if "gate outcome" in row)
    assert gate.split()[0] == "changed" and "passed -> failed" in gate, out_flip
    assert "verdict: CHANGED" in out_flip and "evaluation gate outcome" in out_flip
    model = next(row for row in out_flip.splitlines() if "model sha256" in row)
    assert model.split()[0] == "same", "the same model, judged by a stricter gate"


def test_a_tampered_bundle_is_refused_with_the_public_key(history: dict, tmp_path: Path) -> None:
    h = history
    assert audit(h, "keygen", "--out", str(tmp_path / "keys")).returncode == 0
    bundle = tmp_path / "audit.jsonl"
    exported = audit(h, "export", str(bundle), "--key", str(tmp_path / "keys" / "audit-private.pem"))
    assert exported.returncode == 0, exported.stderr
    public = str(tmp_path / "keys" / "audit-public.pem")
    assert audit(h, "verify", "--bundle", str(bundle), "--key", public).returncode == 0
    lines = bundle.read_text().splitlines()
    lines[5] = lines[5].replace("cairn", "CAIRN", 1)
    bundle.write_text("\n".join(lines) + "\n")
    refused = audit(h, "verify", "--bundle", str(bundle), "--key", public)
    assert refused.returncode == 1 and "TAMPERED: record 5" in refused.stdout, refused.stdout


def test_the_auditors_page_in_a_real_browser(history: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    if not CHROMIUM.exists():
        missing_system_dependency("no /usr/bin/chromium (Debian's chromium; `make install` installs it)")
    from playwright.sync_api import sync_playwright

    h = history
    port = free_port()
    page_url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [CAIRN, "ui", "--port", str(port)], env=h["env"], cwd=h["root"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def serving() -> bool:
        try:
            return httpx.get(page_url, timeout=2).status_code == 200
        except httpx.TransportError:
            assert ui.poll() is None, ui.stderr.read() if ui.stderr else "cairn ui exited"
            return False

    shots = tmp_path_factory.mktemp("auditor-view")
    try:
        wait_until(serving, 60, "cairn ui to serve")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(page_url)
            assert "chain verified: OK" in page.locator("#verify").inner_text()
            timeline = page.locator(f'svg.timeline[data-model="{MODEL}"]')
            assert timeline.locator("g.reign").count() == 2
            assert [timeline.locator("g.reign").nth(i).get_attribute("data-version") for i in (0, 1)] == [
                "1",
                "2",
            ]
            assert timeline.locator("g.gatefail").count() == 1, "the failed gate is on the timeline"
            statuses = page.locator("#runs tr.run td:last-child").all_inner_texts()
            assert sorted(statuses) == ["deployed v1", "deployed v2", "not promoted (gate failed)"]
            page.screenshot(path=str(shots / "auditor-view.png"), full_page=True)

            page.click(f'a[href="/run/{h["runs"][1]}"]')
            page.wait_for_selector("svg#graph g.node")
            nodes = page.locator("svg#graph g.node")
            labels = " ".join(nodes.all_text_contents())
            assert nodes.count() >= 7, labels
            for step in (
                "data.arrived",
                "dataset.ingested",
                "model.trained",
                "model.evaluated",
                "model.deployed",
            ):
                assert step in labels, labels
            assert page.locator("svg#graph path.edge").count() >= nodes.count() - 1
            page.screenshot(path=str(shots / "run-graph.png"), full_page=True)

            # The model page: every champion's holdout metrics as `cairn audit at` gives them, the
            # failed gate marked at the challenger's, each mark linking to its run.
            page.set_viewport_size({"width": 1100, "height": 500})
            page.goto(f"{page_url}/model/{MODEL}")
            chart = page.locator(f'svg.model[data-model="{MODEL}"]')
            metric = chart.get_attribute("data-metric")
            panel = chart.locator(f'g.panel[data-metric="{metric}"]')
            champions = panel.locator("g.point.champion")
            assert champions.count() == len(h["deployed"])
            for i, deployed in enumerate(h["deployed"]):
                answer = at(h, ms(deployed["time"]))
                mark = champions.nth(i)
                assert mark.get_attribute("data-version") == str(answer["version"])
                assert float(mark.get_attribute("data-value")) == answer["gate"]["metrics"][metric]
                assert mark.locator("xpath=..").get_attribute("href") == f"/run/{answer['correlation']}"
            refused = [e for e in h["evaluated"] if not e["data"]["passed"]]
            gates = panel.locator("g.point.gatefail")
            assert gates.count() == len(refused)
            assert float(gates.nth(0).get_attribute("data-value")) == refused[0]["data"]["metrics"][metric]
            assert gates.nth(0).get_attribute("data-run") == refused[0]["correlationid"]
            page.screenshot(path=str(shots / "model-page.png"), full_page=True)

            # A study page per run: one mark per trial result the log holds for it; a study the step
            # cache served says so and links to the run whose trials it reused.
            listing = cairn("events", "--json", env=h["env"], cwd=h["root"])
            logged = [json.loads(line) for line in listing.stdout.splitlines() if line.startswith("{")]
            for run in h["runs"]:
                page.goto(f"{page_url}/study/{run}")
                mine = [e for e in logged if e["correlationid"] == run]
                results = [e for e in mine if e["type"] == "cairn.trial.completed.v1"]
                assert page.locator("svg.study g.trial").count() == len(results)
                end = next(e for e in mine if e["type"] == "cairn.tuning.completed.v1")
                assert page.locator("#leaderboard tr.entry").count() == len(end["data"]["leaderboard"])
                origin = next((e for e in logged if e["id"] == end.get("cachedfrom")), None)
                cached = page.locator("#cached a")
                assert cached.count() == (1 if origin else 0)
                if origin:
                    assert cached.get_attribute("href") == f"/study/{origin['correlationid']}"
            browser.close()
        for name in ("auditor-view.png", "run-graph.png", "model-page.png"):
            assert (shots / name).stat().st_size > 10_000
        print(f"screenshots: {shots}/auditor-view.png {shots}/run-graph.png {shots}/model-page.png")
    finally:
        ui.terminate()
        ui.wait(10)
