"""The same champion served by cairn, Seldon MLServer (its XGBoost runtime) and `mlflow models serve`.

A diamonds-like table (carat, cut, color, clarity, depth, table, x, y, z -> price; generated, so the
bench needs no download), an XGBoost regressor of 300 rounds trained and registered as deployment
does (the champion is an MLflow model, models:/diamonds@champion). Each server runs with the same
number of worker processes (MLServer: `parallel_workers`) and one predict thread. Loads: one-row
and 1,000-row requests over HTTP JSON (wrk, 8 connections) and over the Open Inference Protocol's
gRPC (bench/grpc_load.py, 8 calls in flight), where the peer speaks it (mlflow: HTTP only). Each
peer gets its own request form: cairn the raw rows (v2 tensors, one per column, categories as
text; `--cairn-route v1`: /v1 rows), MLServer the feature matrix cairn computes from them (its
runtime has no transform), mlflow dataframe_records. Before timing, the bench checks that every
peer and protocol gives the same predictions.

Every (peer, load) is run once per round, rounds interleaved (bench/repeat.py), so a background
burst hits all alike; reported: the median and [min-max] over rounds of req/s, rows/s, p50/p99
latency and CPU milliseconds per request (the server's process tree), and cairn/peer ratios
paired by round.

    .venv/bin/python bench/serve.py [--seconds 10] [--rounds 3] [--workers 2] [--peers cairn,mlserver,mlflow]
    .venv/bin/python bench/serve.py --seconds 3 --rounds 3        # short rounds

Needs wrk (Debian: `sudo apt-get install wrk`). MLServer is installed on first use into a venv of
its own, .venv-mlserver (bench/serve_peers.py), never into the project's. Figures on a shared
machine are noisy: the spread says how much. Not part of `make bench`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.repeat import column, interleave, ratio_spread, rounded, spread  # noqa: E402
from bench.serve_peers import mlserver_folder, mlserver_venv, mlserver_version  # noqa: E402
from bench.serve_profile import Profiler  # noqa: E402
from bench.suite_cost import cpu_of  # noqa: E402
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
from services.serving.grpc_v2 import predict_v2_pb2 as pb  # noqa: E402
from services.serving.logic import features as feature_matrix  # noqa: E402
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


def champion(settings: CairnSettings, csv: Path, rounds: int) -> tuple[dict[str, Any], bytes]:
    """Ingest, build features, fit XGBoost at `rounds`, register and alias it as deployment does;
    the transform spec (rows -> features) and the booster's UBJSON bytes, for MLServer."""
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
    return transform, fitted["estimator"]


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
    root = psutil.Process(proc.pid)
    return sum(cpu_of(p) for p in [root, *root.children(recursive=True)])


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, body: Path, secs: int, connections: int) -> dict[str, float]:
    script = body.with_suffix(".lua")
    script.write_text(LUA.format(body=body))
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{secs}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "req_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": seconds(lat["50"]) * 1000,
        "p99_ms": seconds(lat["99"]) * 1000,
        "errors": int(errors.group(1)) if errors else 0,
    }


def grpc_load(target: str, request: Path, secs: int, connections: int) -> dict[str, float]:
    """bench/grpc_load.py in a process of its own: `connections` calls in flight on one channel."""
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "grpc_load.py"),
            target,
            str(request),
            "--concurrency",
            str(connections),
            "--seconds",
            str(secs),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


@dataclass
class Case:
    """One peer under one kind of load: what is sent where, and how many rows it carries."""

    peer: str
    label: str  # http_1, http_1000, grpc_1, grpc_1000
    target: str  # a URL (HTTP) or HOST:PORT (gRPC)
    body: Path
    rows: int
    proc: subprocess.Popen

    def run(self, secs: int, connections: int) -> dict[str, Any]:
        before = cpu_seconds(self.proc)
        if self.label.startswith("http"):
            result = wrk(self.target, self.body, secs, connections)
        else:
            result = grpc_load(self.target, self.body, secs, connections)
        cpu = cpu_seconds(self.proc) - before
        result["rows_s"] = result["req_s"] * self.rows
        result["cpu_ms_per_request"] = cpu * 1000 / max(result["requests"], 1)
        print(f"{self.peer:8s} {self.label:9s} {json.dumps(rounded(result, 2))}", file=sys.stderr)
        return result


def v2_columns(rows: list[dict[str, Any]], spec: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    """cairn's v2 request: one tensor per column, its raw values (categories as text)."""
    return [
        (c["name"], "BYTES" if c["kind"] == "categorical" else "FP64", [r[c["name"]] for r in rows])
        for c in spec["columns"]
    ]


def cairn_grpc(rows: list[dict[str, Any]], spec: dict[str, Any]) -> bytes:
    request = pb.ModelInferRequest(model_name="diamonds")
    for name, datatype, data in v2_columns(rows, spec):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(data)])
        if datatype == "BYTES":
            tensor.contents.bytes_contents.extend(v.encode() for v in data)
        else:
            tensor.contents.fp64_contents.extend(data)
    return request.SerializeToString()


def mlserver_grpc(x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="diamonds")
    tensor = request.inputs.add(name="input-0", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request.SerializeToString()


def payloads(
    rows: list[dict[str, Any]], spec: dict[str, Any], cairn_route: str
) -> dict[str, dict[str, bytes]]:
    """Each peer's request for `rows`, in its own form: cairn the raw rows (v2 tensors or /v1 rows),
    MLServer the feature matrix cairn computes from them (its runtime has no transform), mlflow
    dataframe_records."""
    x = feature_matrix(spec, rows)
    if cairn_route == "v1":
        cairn_http = {"rows": rows}
    else:
        cairn_http = {
            "inputs": [
                {"name": n, "datatype": d, "shape": [len(v)], "data": v} for n, d, v in v2_columns(rows, spec)
            ]
        }
    return {
        "cairn": (cairn := {"http": orjson.dumps(cairn_http), "grpc": cairn_grpc(rows, spec)}),
        "cairn-xgboost": cairn,  # the same endpoint with XGBoost's own predict (no compiled forest)
        "mlserver": {
            "http": orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "input-0",
                            "datatype": "FP32",
                            "shape": list(x.shape),
                            "data": x.ravel().tolist(),
                        }
                    ]
                }
            ),
            "grpc": mlserver_grpc(x),
        },
        "mlflow": {"http": orjson.dumps({"dataframe_records": rows})},
    }


def grpc_predictions(target: str, request: bytes) -> list[float]:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        answer = call(request, timeout=30)
    out = answer.outputs[0]
    if answer.raw_output_contents:
        dtype = {"FP32": "<f4", "FP64": "<f8"}[out.datatype]
        return np.frombuffer(answer.raw_output_contents[0], dtype=dtype).tolist()
    return list(out.contents.fp64_contents or out.contents.fp32_contents)


def http_predictions(peer: str, url: str, body: bytes) -> list[float]:
    doc = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60).json()
    if peer == "mlflow":
        return doc["predictions"]
    if "predictions" in doc:  # cairn's /v1
        return doc["predictions"]
    return doc["outputs"][0]["data"]


def summary(results: dict[str, list[dict[str, Any]]], cases: list[Case]) -> dict[str, Any]:
    """Per case and peer: medians with [min, max] over rounds; per case: cairn / peer, paired by round."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(c.label for c in cases):
        peers = [c.peer for c in cases if c.label == label]
        entry: dict[str, Any] = {}
        for peer in peers:
            runs = results[f"{peer}:{label}"]
            entry[peer] = {
                key: spread(column(runs, key))
                for key in ("req_s", "rows_s", "p50_ms", "p99_ms", "cpu_ms_per_request", "errors")
            }
        if "cairn" in peers:
            cairn = results[f"cairn:{label}"]
            for peer in peers:
                if peer != "cairn":
                    other = results[f"{peer}:{label}"]
                    entry[f"cairn/{peer}"] = {
                        "req_s": ratio_spread(column(cairn, "req_s"), column(other, "req_s")),
                        "cpu_per_request": ratio_spread(
                            column(cairn, "cpu_ms_per_request"), column(other, "cpu_ms_per_request")
                        ),
                    }
        out[label] = entry
    return out


def fmt(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'case':10s} {'peer':13s} {'req/s':>24s} {'rows/s':>30s} {'p50 ms':>20s} {'p99 ms':>22s} "
        f"{'CPU ms/req':>20s}"
    ]
    for label, entry in report["cases"].items():
        for peer, s in entry.items():
            if "/" in peer:
                continue
            lines.append(
                f"{label:10s} {peer:13s} {fmt(s['req_s']):>24s} {fmt(s['rows_s']):>30s} "
                f"{fmt(s['p50_ms'], 2):>20s} {fmt(s['p99_ms'], 2):>22s} "
                f"{fmt(s['cpu_ms_per_request'], 3):>20s}"
            )
        for peer, s in entry.items():
            if "/" in peer:
                lines.append(
                    f"{label:10s} {peer:16s} req/s x{fmt(s['req_s'], 2)}   "
                    f"CPU per request x{fmt(s['cpu_per_request'], 2)}"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each measurement (3: short)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (medians and spread over them)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each server")
    parser.add_argument(
        "--connections", type=int, default=8, help="connections (HTTP) / calls in flight (gRPC)"
    )
    parser.add_argument(
        "--peers",
        default="cairn,mlserver,mlflow",
        help="which servers, comma-separated (cairn-xgboost: cairn with XGBoost's own predict)",
    )
    parser.add_argument("--cases", default="http_1,http_1000,grpc_1,grpc_1000", help="which loads")
    parser.add_argument("--cairn-route", choices=["v2", "v1"], default="v2", help="cairn's HTTP route")
    parser.add_argument("--rows", type=int, default=20_000, help="training rows")
    parser.add_argument("--rounds-xgb", type=int, default=300, help="XGBoost boosting rounds")
    parser.add_argument(
        "--json", type=Path, help="also write the full report here (and py-spy's stacks beside it)"
    )
    parser.add_argument(
        "--py-spy", type=Path, help="a py-spy executable: profile cairn's processes over the timed rounds"
    )
    args = parser.parse_args()
    peers, labels = args.peers.split(","), args.cases.split(",")
    if shutil.which("wrk") is None:
        sys.exit("bench/serve.py needs wrk: `sudo apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`")
    mlserver_exe = mlserver_venv() if "mlserver" in peers else None

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
        spec, booster = champion(settings, data / "diamonds.csv", args.rounds_xgb)
        trained_s = time.perf_counter() - t0

        env = {
            **os.environ,
            **settings.to_env(),
            "CAIRN_SERVE_WORKERS": str(args.workers),
            "MLFLOW_TRACKING_URI": settings.tracking_uri,
            "OMP_NUM_THREADS": "1",  # each server's predict on one thread, as cairn's is (nthread=1)
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow execs `uvicorn`
        }
        logs = open(work / "servers.log", "ab")  # noqa: SIM115 - closed with the servers

        def start(argv: list[str], extra: dict[str, str] | None = None, cwd: Path = work) -> subprocess.Popen:
            proc = subprocess.Popen(  # cwd: MLServer writes its metrics files under ./.metrics
                argv,
                cwd=cwd,
                env={**env, **(extra or {})},
                stdout=logs,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(proc)
            return proc

        http: dict[str, str] = {}  # peer -> its inference URL
        grpc_at: dict[str, str] = {}  # peer -> HOST:PORT
        servers: dict[str, subprocess.Popen] = {}
        versions = {}
        for peer, compiled in (("cairn", "true"), ("cairn-xgboost", "false")):
            if peer not in peers:
                continue
            port, gport = free_port(), free_port()
            servers[peer] = start(
                [str(BIN / "cairn"), "serving", "start", "--port", str(port)],
                {"CAIRN_SERVE_GRPC_PORT": str(gport), "CAIRN_SERVE_COMPILED_TREES": compiled},
            )
            route = "v1/models/diamonds/predict" if args.cairn_route == "v1" else "v2/models/diamonds/infer"
            http[peer], grpc_at[peer] = f"http://127.0.0.1:{port}/{route}", f"127.0.0.1:{gport}"
            wait_up(f"http://127.0.0.1:{port}/v2/models/diamonds/ready", servers[peer], peer)
        if "mlserver" in peers:
            port, gport = free_port(), free_port()
            folder = mlserver_folder(
                work / "mlserver", "diamonds", booster, port, gport, free_port(), args.workers
            )
            servers["mlserver"] = start([str(mlserver_exe), "start", str(folder)])
            http["mlserver"], grpc_at["mlserver"] = (
                f"http://127.0.0.1:{port}/v2/models/diamonds/infer",
                f"127.0.0.1:{gport}",
            )
            wait_up(f"http://127.0.0.1:{port}/v2/models/diamonds/ready", servers["mlserver"], "mlserver")
            versions["mlserver"] = mlserver_version(mlserver_exe)
        if "mlflow" in peers:
            port = free_port()
            servers["mlflow"] = start(
                [
                    str(BIN / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    "models:/diamonds@champion",
                    "--env-manager",
                    "local",
                    "-p",
                    str(port),
                    "-w",
                    str(args.workers),
                ]
            )
            http["mlflow"] = f"http://127.0.0.1:{port}/invocations"
            wait_up(f"http://127.0.0.1:{port}/ping", servers["mlflow"], "mlflow models serve")

        # Same answers from every peer and protocol, on five rows, before anything is timed.
        check = payloads(rows[:5], spec, args.cairn_route)
        answers = {f"{p}:http": http_predictions(p, http[p], check[p]["http"]) for p in http}
        answers |= {f"{p}:grpc": grpc_predictions(grpc_at[p], check[p]["grpc"]) for p in grpc_at}
        first = next(iter(answers.values()))
        same = {k: bool(np.allclose(v, first, rtol=1e-5)) for k, v in answers.items()}

        bodies = {
            1: payloads(rows[:1], spec, args.cairn_route),
            1000: payloads(rows[:1000], spec, args.cairn_route),
        }
        cases: list[Case] = []
        for label in labels:
            protocol, n = label.split("_")
            for peer in peers:
                content = bodies[int(n)][peer].get(protocol)
                if content is None:  # mlflow models serve has no gRPC
                    continue
                path = work / f"{peer}-{label}.{'json' if protocol == 'http' else 'bin'}"
                path.write_bytes(content)
                target = http[peer] if protocol == "http" else grpc_at[peer]
                cases.append(Case(peer, label, target, path, int(n), servers[peer]))
        for case in cases:  # warm each path once, with every connection: each worker gets some
            case.run(2, args.connections)

        async def timed(case: Case) -> dict[str, Any]:
            return case.run(args.seconds, args.connections)

        sides = {f"{c.peer}:{c.label}": (lambda c=c: timed(c)) for c in cases}
        load_before = os.getloadavg()
        stacks = args.json.with_suffix(".pyspy.txt") if args.json else work / "cairn.pyspy.txt"
        profiler = args.py_spy and Profiler(args.py_spy, servers["cairn"].pid, stacks)
        results = asyncio.run(interleave(sides, args.rounds))
        profile = profiler.stop() if profiler else None
        report = {
            "bench": "serve",
            "command": "bench/serve.py " + " ".join(sys.argv[1:]),
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "workers_each": args.workers,
            "connections": args.connections,
            "seconds_each": args.seconds,
            "rounds": args.rounds,
            "cairn_http_route": args.cairn_route,
            "peer_versions": versions,
            "model": f"xgboost {args.rounds_xgb} rounds, diamonds-like table of {args.rows} rows",
            "train_and_register_s": round(trained_s, 1),
            "same_predictions": same,
            "cases": summary(results, cases),
            "runs": results,
            **({"cairn_profile": profile} if profile else {}),
        }
        report = rounded(report, 3)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k not in ("cases", "runs")}, indent=2))
        print(table(report))
        if profile:
            print(f"cairn, py-spy: {profile['samples']} samples, {profile['busy_samples']} busy")
            for kind in ("waiting_pct_of_all", "buckets_pct_of_busy", "python_self_pct_of_busy"):
                print(f"  {kind}:")
                for name, pct in report["cairn_profile"][kind]:
                    print(f"    {pct:5.1f}  {name}")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
        nats.stop()
        if sys.exc_info()[0] is not None and (work / "servers.log").exists():
            print((work / "servers.log").read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
