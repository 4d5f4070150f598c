"""The same champion served by cairn's endpoint and by `mlflow models serve`, side by side, one run.

A diamonds-like table (carat, cut, color, clarity, depth, table, x, y, z -> price; generated, so the
bench needs no download), an XGBoost regressor of 300 rounds trained and registered as deployment
does (the champion is an MLflow model, models:/diamonds@champion). Then each server, with the same
number of worker processes, under wrk: 8 connections of one-row JSON requests, then 8 connections of
1,000-row requests. Reported per server: req/s, p50/p99 latency (wrk --latency), rows/s, CPU seconds
per request (utime+stime of the server's process tree over the run / requests); and cairn/mlflow.

    .venv/bin/python bench/serve.py [--seconds 10] [--workers 2] [--rows 20000]

Needs wrk (Debian: `sudo apt-get install wrk`). Figures on a shared machine are noisy: they are
reported as measured. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec  # noqa: E402
from services.features import logic as features  # noqa: E402
from services.ingestion.app import ingest  # noqa: E402
from services.platform.artifacts import ArtifactStore, read_verified  # noqa: E402
from services.platform.bus.connection import connect  # noqa: E402
from services.platform.bus.embedded import EmbeddedNats  # noqa: E402
from services.platform.bus.provision import provision_all  # noqa: E402
from services.platform.ml.bundle import save_bundle  # noqa: E402
from services.platform.ml.trial import TrialSpec, fit_final  # noqa: E402
from services.platform.model_loading import bundle_files  # noqa: E402
from services.platform.settings import CairnSettings  # noqa: E402
from services.platform.tracking import Tracker  # noqa: E402
from services.tools.supervisor import free_port  # noqa: E402

BIN = Path(sys.executable).parent
CUTS = ["Fair", "Good", "Very Good", "Premium", "Ideal"]
COLORS = list("DEFGHIJ")
CLARITIES = ["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"]
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""


def diamonds(path: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A table shaped like ggplot2's diamonds: price grows with carat, better cut/colour/clarity."""
    rng = np.random.default_rng(seed)
    carat = np.round(rng.gamma(2.0, 0.4, n) + 0.2, 2)
    cut, color, clarity = rng.integers(0, 5, n), rng.integers(0, 7, n), rng.integers(0, 8, n)
    depth, table = np.round(rng.normal(61.7, 1.4, n), 1), np.round(rng.normal(57.4, 2.2, n), 1)
    x = np.round(carat ** (1 / 3) * 6.3 + rng.normal(0, 0.05, n), 2)
    price = np.round(
        4000
        * carat**1.7
        * (1 + 0.05 * cut)
        * (1 - 0.04 * color)
        * (1 + 0.07 * clarity)
        * rng.lognormal(0, 0.1, n),
        0,
    )
    rows = [
        {
            "carat": float(carat[i]),
            "cut": CUTS[cut[i]],
            "color": COLORS[color[i]],
            "clarity": CLARITIES[clarity[i]],
            "depth": float(depth[i]),
            "table": float(table[i]),
            "x": float(x[i]),
            "y": float(x[i]),
            "z": float(round(x[i] * 0.62, 2)),
        }
        for i in range(n)
    ]
    header = list(rows[0]) + ["price"]
    lines = [",".join(header)] + [
        ",".join(str(r[c]) for c in header[:-1]) + f",{price[i]}" for i, r in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return rows


def champion(settings: CairnSettings, csv: Path, rounds: int) -> Tracker:
    """Ingest, build features, fit XGBoost at `rounds`, register and alias it as deployment does."""
    store = ArtifactStore(settings.artifacts)
    spec = TuningSpec(
        trials=1, families=[ModelFamily.xgboost], strategy=SearchStrategy.random, max_budget=rounds
    )
    ingested = ingest(DataArrived(uri=csv.as_uri(), target="price", tuning=spec), store, settings)
    built = features.build(ingested, store)
    params = {"learning_rate": 0.1, "max_depth": 6}
    trial = TrialSpec(
        built.featureset.uri, built.featureset.sha256, "xgboost", params, rounds, "regression", "rmse", 0
    )
    fitted = fit_final(trial)
    transform = json.loads(read_verified(built.transform.uri, built.transform.sha256))
    bundle = save_bundle(
        store,
        estimator=fitted["estimator"],
        estimator_format=fitted["format"],
        spec=transform,
        family=ModelFamily.xgboost,
        params=params,
        budget=rounds,
    )
    tracker = Tracker.from_settings(settings)
    run_id = tracker.log_run(
        experiment="diamonds", run_name="bench", event_id="bench-serve", params=params, metrics={}, tags={}
    )
    version = tracker.register(
        "diamonds",
        source=bundle.uri,
        run_id=run_id,
        sha256=bundle.sha256,
        evidence_event_id="bench-serve",
        size=bundle.size,
        files=bundle_files(bundle, settings),
    )
    tracker.set_champion("diamonds", version)
    return tracker


def wait_up(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: see its log above")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def cpu_seconds(proc: subprocess.Popen) -> float:
    total = 0.0
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, body: Path, work: Path, secs: int, connections: int = 8) -> dict[str, float]:
    script = work / f"{body.stem}.lua"
    script.write_text(LUA.format(body=body))
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{secs}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": requests,
        "req_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": round(seconds(lat["50"]) * 1000, 3),
        "p99_ms": round(seconds(lat["99"]) * 1000, 3),
        "errors": int(errors.group(1)) if errors else 0,
    }


def measure(
    name: str, url: str, bodies: dict[str, tuple[Path, int]], proc: subprocess.Popen, work: Path, secs: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, (body, rows) in bodies.items():
        httpx.post(url, content=body.read_bytes(), headers={"content-type": "application/json"}, timeout=60)
        before = cpu_seconds(proc)
        result = wrk(url, body, work, secs)
        cpu = cpu_seconds(proc) - before
        result["rows_s"] = round(result["req_s"] * rows, 1)
        result["cpu_ms_per_request"] = round(cpu * 1000 / max(result["requests"], 1), 3)
        out[label] = result
        print(f"{name:7s} {label:9s} {json.dumps(result)}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration of each measurement")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each server")
    parser.add_argument("--rows", type=int, default=20_000, help="training rows")
    parser.add_argument("--rounds", type=int, default=300, help="XGBoost boosting rounds")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/serve.py needs wrk: `sudo apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`")

    work = Path(tempfile.mkdtemp(prefix="cairn-bench-serve-"))
    nats = EmbeddedNats(work / "nats")
    procs: list[subprocess.Popen] = []
    try:
        url = nats.start()
        data = work / "data"
        data.mkdir()
        settings = CairnSettings(home=work / "home", nats_url=url, allowed_roots=[str(data)], serve_port=0)

        async def provision() -> None:
            nc = await connect(settings, "admin")
            await provision_all(nc.jetstream(), settings)
            await nc.close()

        asyncio.run(provision())
        rows = diamonds(data / "diamonds.csv", args.rows)
        t0 = time.perf_counter()
        champion(settings, data / "diamonds.csv", args.rounds)
        trained_s = time.perf_counter() - t0

        one, batch = rows[:1], rows[:1000]
        bodies = {
            "cairn": {"one_row": ({"rows": one}, 1), "rows_1000": ({"rows": batch}, 1000)},
            "mlflow": {
                "one_row": ({"dataframe_records": one}, 1),
                "rows_1000": ({"dataframe_records": batch}, 1000),
            },
        }
        files: dict[str, dict[str, tuple[Path, int]]] = {}
        for server, kinds in bodies.items():
            files[server] = {}
            for label, (doc, n) in kinds.items():
                path = work / f"{server}-{label}.json"
                path.write_text(json.dumps(doc))
                files[server][label] = (path, n)

        env = {
            **os.environ,
            **settings.to_env(),
            "CAIRN_SERVE_WORKERS": str(args.workers),
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow execs `uvicorn`
        }
        logs = open(work / "servers.log", "ab")  # noqa: SIM115 - closed with the servers
        cairn_port, mlflow_port = free_port(), free_port()
        cairn = subprocess.Popen(
            [str(BIN / "cairn"), "serving", "start", "--port", str(cairn_port)],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(cairn)
        mlflow = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/diamonds@champion",
                "--env-manager",
                "local",
                "-p",
                str(mlflow_port),
                "-w",
                str(args.workers),
            ],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(mlflow)
        wait_up(f"http://127.0.0.1:{cairn_port}/v2/models/diamonds/ready", cairn, "cairn")
        wait_up(f"http://127.0.0.1:{mlflow_port}/ping", mlflow, "mlflow models serve")

        same = (
            httpx.post(
                f"http://127.0.0.1:{cairn_port}/v1/models/diamonds/predict", json={"rows": rows[:5]}
            ).json()["predictions"],
            httpx.post(
                f"http://127.0.0.1:{mlflow_port}/invocations", json={"dataframe_records": rows[:5]}
            ).json()["predictions"],
        )
        results = {
            "cairn": measure(
                "cairn",
                f"http://127.0.0.1:{cairn_port}/v1/models/diamonds/predict",
                files["cairn"],
                cairn,
                work,
                args.seconds,
            ),
            "mlflow": measure(
                "mlflow",
                f"http://127.0.0.1:{mlflow_port}/invocations",
                files["mlflow"],
                mlflow,
                work,
                args.seconds,
            ),
        }
        report = {
            "bench": "serve",
            "command": "bench/serve.py " + " ".join(sys.argv[1:]),
            "cpus": len(os.sched_getaffinity(0)),
            "workers_each": args.workers,
            "connections": 8,
            "seconds_each": args.seconds,
            "model": f"xgboost {args.rounds} rounds, diamonds-like table of {args.rows} rows",
            "train_and_register_s": round(trained_s, 1),
            "same_predictions": bool(np.allclose(same[0], same[1], rtol=1e-5)),
            **results,
            "ratio_cairn_over_mlflow": {
                label: {
                    "req_s": round(
                        results["cairn"][label]["req_s"] / max(results["mlflow"][label]["req_s"], 1e-9), 1
                    ),
                    "p99": round(
                        results["cairn"][label]["p99_ms"] / max(results["mlflow"][label]["p99_ms"], 1e-9), 3
                    ),
                }
                for label in ("one_row", "rows_1000")
            },
        }
        print(json.dumps(report, indent=2))
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with_kill = proc.poll() is None
                if with_kill:
                    os.killpg(proc.pid, 9)
        nats.stop()
        if sys.exc_info()[0] is not None and (work / "servers.log").exists():
            print((work / "servers.log").read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
