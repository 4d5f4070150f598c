"""The inference endpoint as its users drive it, on real parts: a real nats-server, MLflow on SQLite,
models trained for real, `cairn serving start` with two worker processes in a subprocess.

- The registered champion is a real MLflow model: `mlflow.pyfunc.load_model("models:/NAME@champion")`
  predicts what the endpoint predicts, and a tampered bundle is refused on load.
- The Open Inference Protocol v2 answers a plain HTTP client and KServe/Triton's own client library.
- A deployment under load: no request fails, each answer comes whole from the old or the new
  model, and afterwards every worker serves the new one.
- Request records name the version that answered; /metrics counts every worker's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from contracts import ModelDeployed, new_event
from services.platform.bus.connection import connect
from services.platform.bus.provision import record_stream
from services.platform.ml.transform import apply
from services.platform.model_loading import bundle_files
from services.serving.logic import RequestProblem, TableReader, checked_rows, features, v2_rows
from services.tools.supervisor import free_port
from tests.test_registry import BEST, GOOD, make_lab

CAIRN = Path(sys.executable).parent / "cairn"
ROW = {"a": 0.3, "b": -1.2}


def test_features_match_the_pandas_transform_and_v2_tensors_match_rows():
    """The hot path's numpy features equal platform.ml.transform.apply's, and both v2 forms give the rows."""
    import pandas as pd

    spec = {
        "task": "regression",
        "classes": [],
        "columns": [
            {"name": "x", "kind": "numeric", "fill": 2.5},
            {"name": "c", "kind": "categorical", "categories": ["red", "blue"]},
            {"name": "f", "kind": "boolean", "fill": 0.5},
        ],
    }
    schema = {"x": "numeric", "c": "categorical", "f": "boolean"}
    rows = checked_rows(
        [{"x": 1, "c": "blue", "f": True}, {"x": None, "c": "green"}, {"c": None, "f": 0}], schema
    )
    expected = apply(spec, pd.DataFrame.from_records(rows, columns=list(schema)))
    np.testing.assert_array_equal(features(spec, rows), expected)

    per_column = {
        "inputs": [
            {"name": "x", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
            {"name": "c", "shape": [2, 1], "datatype": "BYTES", "data": [["red"], ["blue"]]},
        ]
    }
    assert v2_rows(per_column, schema) == [{"x": 1.0, "c": "red"}, {"x": 2.0, "c": "blue"}]
    matrix = {"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "BYTES", "data": [[1, "red", 1]]}]}
    assert v2_rows(matrix, schema) == [{"x": 1, "c": "red", "f": 1}]
    for bad in (
        {"inputs": []},
        {"inputs": [{"name": "zz", "shape": [1], "datatype": "FP32", "data": [1]}]},
        {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]},
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]},
    ):
        with pytest.raises(RequestProblem):
            v2_rows(bad, schema)


@pytest.mark.parametrize(
    "inputs",
    [
        [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1.0, 2, 3.5]},
         {"name": "c", "shape": [3], "datatype": "BYTES", "data": ["red", "green", "blue"]},
         {"name": "f", "shape": [3, 1], "datatype": "BOOL", "data": [True, False, True]}],
        [{"name": "c", "shape": [1], "datatype": "BYTES", "data": ["blue"]}],  # missing columns: fills
        [{"name": "input-0", "shape": [2, 3], "datatype": "FP64", "data": [1.5, "red", 1, 2.5, "blue", 0]}],
        [{"name": "x", "shape": [2], "datatype": "FP64", "data": [None, 4.0]}],  # None: the detailed path
        [{"name": "c", "shape": [2, 1], "datatype": "BYTES", "data": [["red"], ["blue"]]}],  # nested
        [{"name": "x", "shape": [1], "datatype": "FP64", "data": [float("nan")]}],
        [{"name": "x", "shape": [1], "datatype": "FP64", "data": ["1.5"]}],
        [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1.0]}],
        [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]},
         {"name": "c", "shape": [2], "datatype": "BYTES", "data": ["red", "blue"]}],
        [{"name": "zz", "shape": [1], "datatype": "FP64", "data": [1.0]}],
        [{"name": "c", "shape": [1], "datatype": "BYTES", "data": [7]}],
        [{"name": "x", "shape": [0], "datatype": "FP64", "data": []}],
        *[  # many rows (numpy's path): each with one value that is not plain, at the end
            [{"name": "x", "shape": [20], "datatype": "FP64", "data": [float(i) for i in range(19)] + [odd]},
             {"name": "c", "shape": [20], "datatype": "BYTES", "data": ["red", "blue"] * 10}]
            for odd in (2, True, None, "3", float("inf"), 10**30, [1.0], {"v": 1})
        ],
        *[
            [{"name": "c", "shape": [20], "datatype": "BYTES", "data": ["red"] * 19 + [odd]},
             {"name": "f", "shape": [20], "datatype": "BOOL", "data": [True, False] * 10}]
            for odd in ("green", "", None, 7, "z" * 10_001, ["red"])
        ],
    ],
)
def test_the_column_reading_gives_the_row_paths_matrix_or_its_refusal(inputs):
    """TableReader.v2 reads plainly valid tensors column by column; it must give exactly what the row
    path (v2_rows, then features) gives, and refuse what that refuses, with its words."""
    spec = {"columns": [{"name": "x", "kind": "numeric", "fill": 2.5},
                        {"name": "c", "kind": "categorical", "categories": ["red", "blue"]},
                        {"name": "f", "kind": "boolean", "fill": 0.5}]}
    schema = {"x": "numeric", "c": "categorical", "f": "boolean"}
    body = {"inputs": inputs}
    try:
        rows = v2_rows(body, schema)
    except RequestProblem as exc:
        with pytest.raises(RequestProblem) as refused:
            TableReader(spec).v2(body)
        assert str(refused.value) == str(exc)
        return
    x, n = TableReader(spec).v2(body)
    assert n == len(rows)
    if rows:
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, features(spec, rows))


async def _publish_deployed(settings, trained, version: int, previous: int | None) -> None:
    """What deployment publishes once the alias has moved."""
    payload = ModelDeployed(
        model_name=trained.context.model_name,
        version=version,
        model=trained.model,
        previous_version=previous,
        mlflow_run_id=trained.mlflow_run_id,
        metrics={},
        evidence_event_id=f"test-evidence-{version}",
    )
    event = new_event(payload, source="/test/serving", subject=payload.model_name)
    nc = await connect(settings, "test")
    try:
        await nc.jetstream().publish(event.type, event.encode(), headers={"Nats-Msg-Id": event.id})
    finally:
        await nc.close()


def _register(lab, trained, evidence: str) -> int:
    files = bundle_files(trained.model, lab.settings)
    version = lab.tracker.register(
        trained.context.model_name,
        source=trained.model.uri,
        run_id=trained.mlflow_run_id,
        sha256=trained.model.sha256,
        evidence_event_id=evidence,
        size=trained.model.size,
        files=files,
    )
    lab.tracker.set_champion(trained.context.model_name, version)
    return version


@contextlib.contextmanager
def endpoint(settings, port: int, workers: int):
    env = {
        **os.environ,
        **settings.to_env(),
        "CAIRN_SERVE_WORKERS": str(workers),
        "CAIRN_REQUEST_RECORD_RATE": "1",
    }
    log = settings.home_dir / "serve-test.log"
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(CAIRN), "serving", "start", "--port", str(port), "--host", "127.0.0.1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.slow
async def test_champion_served_by_mlflow_and_cairn_v2_protocol_and_hot_swap_under_load(
    settings, js, tmp_path, monkeypatch
):
    from tests.conftest import data_dir

    lab = make_lab(settings, data_dir(settings))
    first, second = lab.train("srv", GOOD), lab.train("srv", BEST)
    assert _register(lab, first, "e1") == 1

    # The champion is an MLflow model: loaded through the registry alias, it predicts as cairn does.
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model("models:/srv@champion")
    rows = [ROW, {"a": 1.5, "b": 0.2}, {"a": None, "b": 0.0}]
    by_mlflow = [float(v) for v in pyfunc.predict(pd.DataFrame(rows, columns=["a", "b"]))]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with endpoint(settings, port, workers=2) as proc:
        async with httpx.AsyncClient(timeout=30) as client:
            await endpoint_ready(client, url, proc, settings)
            v1 = (await client.post(url + "/v1/models/srv/predict", json={"rows": rows})).json()
            assert v1["version"] == 1 and v1["sha256"] == first.model.sha256
            assert v1["predictions"] == pytest.approx(by_mlflow, rel=1e-6)

            # Open Inference Protocol v2, plain HTTP: metadata, readiness, both tensor layouts.
            meta = (await client.get(url + "/v2/models/srv")).json()
            assert meta["name"] == "srv" and meta["versions"] == ["1"]
            assert meta["parameters"]["predictor"] == "compiled-forest"  # an XGBoost regressor (forest.py)
            assert [i["name"] for i in meta["inputs"]] == ["a", "b"]
            assert (await client.get(url + "/v2/models/srv/ready")).json()["ready"] is True
            assert (await client.get(url + "/v2/models/nope/ready")).status_code == 404
            assert (await client.get(url + "/v2/health/live")).json()["live"] is True
            per_column = {
                "id": "q1",
                "inputs": [
                    {"name": "a", "shape": [3], "datatype": "FP64", "data": [r["a"] for r in rows]},
                    {"name": "b", "shape": [3], "datatype": "FP64", "data": [r["b"] for r in rows]},
                ],
            }
            infer = (await client.post(url + "/v2/models/srv/infer", json=per_column)).json()
            assert infer["model_name"] == "srv" and infer["model_version"] == "1" and infer["id"] == "q1"
            assert infer["outputs"][0]["name"] == "predict"
            assert infer["outputs"][0]["data"] == pytest.approx(by_mlflow, rel=1e-6)
            matrix = {
                "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [ROW["a"], ROW["b"]]}]
            }
            infer = (await client.post(url + "/v2/models/srv/infer", json=matrix)).json()
            assert infer["outputs"][0]["data"] == pytest.approx(by_mlflow[:1], rel=1e-6)
            bad = await client.post(url + "/v2/models/srv/infer", json={"inputs": [{"name": "zz"}]})
            assert bad.status_code == 422 and "error" in bad.json()

            # A KServe/Triton client library speaks to it unchanged.
            triton = await asyncio.to_thread(_triton_infer, port, rows[:2])
            assert triton == pytest.approx(by_mlflow[:2], rel=1e-6)

            # Both workers answer (fresh connections land on either).
            pids = set()

            async def both_workers() -> bool:
                async with httpx.AsyncClient(
                    timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
                ) as c:
                    r = await c.post(url + "/v1/models/srv/predict", json=ROW)
                    pids.add(r.headers["x-cairn-worker"])
                return len(pids) == 2

            await _wait(both_workers, "answers from both workers")

            # Deploy v2 under load: nothing fails, nothing mixes, every worker ends on v2.
            p1 = v1["predictions"][0]
            answers: list[tuple[int, str, str, float]] = []
            stop = asyncio.Event()

            async def load() -> None:
                async with httpx.AsyncClient(
                    timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
                ) as c:
                    while not stop.is_set():
                        r = await c.post(url + "/v1/models/srv/predict", json=ROW)
                        doc = r.json() if r.status_code == 200 else {"version": -r.status_code}
                        answers.append(
                            (
                                doc["version"],
                                doc.get("sha256", ""),
                                r.headers.get("x-cairn-worker", ""),
                                (doc.get("predictions") or [None])[0],
                            )
                        )

            loaders = [asyncio.create_task(load()) for _ in range(8)]
            await _wait(lambda: len(answers) >= 40, "load before the deployment")
            version = await asyncio.to_thread(_register, lab, second, "e2")
            assert version == 2
            await _publish_deployed(settings, second, 2, 1)

            def all_on_v2() -> bool:
                on_v2 = {w for v, _, w, _ in answers if v == 2}
                return on_v2 == pids

            await _wait(all_on_v2, "both workers on v2")
            swapped_at = len(answers)
            await _wait(lambda: len(answers) >= swapped_at + 40, "load after the swap")
            stop.set()
            await asyncio.gather(*loaders)

            assert {v for v, *_ in answers} == {1, 2}, sorted({v for v, *_ in answers})  # no errors (<0)
            p2 = (await client.post(url + "/v1/models/srv/predict", json=ROW)).json()["predictions"][0]
            assert p1 != p2
            expected = {1: (first.model.sha256, p1), 2: (second.model.sha256, p2)}
            assert all((sha, pred) == expected[v] for v, sha, _, pred in answers), (
                "an answer mixed two models"
            )
            last_per_worker = {}
            for v, _, w, _ in answers:
                last_per_worker[w] = v
            assert last_per_worker == dict.fromkeys(pids, 2)

            # /metrics, whichever worker answers, counts every worker's requests.
            text = (await client.get(url + "/metrics")).text
            counted = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('cairn_inference_requests_total{model="srv",status="200"}')
            )
            assert counted >= len(answers), (counted, len(answers))

            # A worker killed outright is replaced by the keeper; the other answers meanwhile.
            victim = int(sorted(pids)[0])
            os.kill(victim, signal.SIGKILL)
            fresh: set[str] = set()

            async def replaced() -> bool:
                async with httpx.AsyncClient(
                    timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
                ) as c:
                    r = await c.post(url + "/v1/models/srv/predict", json=ROW)
                assert r.status_code == 200 and r.json()["version"] == 2, r.text
                fresh.add(r.headers["x-cairn-worker"])
                return bool(fresh - pids)

            await _wait(replaced, "a new worker in the killed one's place")

        # SIGTERM to the keeper alone (not its group): it stops every worker, then ends.
        workers_now = {int(w) for w in pids | fresh} - {victim}
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        for pid in workers_now:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

        # Request records: which version answered, readable with the CLI.
        env = {**os.environ, **settings.to_env()}

        def recorded() -> list[dict]:
            out = subprocess.run(
                [str(CAIRN), "serving", "requests", "--model", "srv", "--last", "500"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            return [json.loads(line) for line in out.stdout.splitlines()]

        records = await _wait(lambda: [r for r in recorded() if r["model_version"] == 2], "records of v2")
        stream = await js.stream_info(record_stream(settings))  # their own stream, their own retention
        assert stream.config.max_age == settings.request_record_max_age_s
        assert stream.config.subjects == ["requests.cairn"]
        assert all(r["model_sha256"] == second.model.sha256 and r["route"] == "predict" for r in records)

    # A tampered copy in MLflow's artifacts is refused on load (the manifest hash is the identity).
    manifests = list(settings.home_dir.rglob("cairn-model/bundle.json"))
    assert manifests, "the registered MLflow model holds the bundle"
    for path in manifests:
        path.write_bytes(path.read_bytes().replace(b'"budget"', b'"budgeT"'))
    with pytest.raises(Exception, match="does not match"):
        mlflow.pyfunc.load_model("models:/srv@champion")


def _triton_infer(port: int, rows: list[dict]) -> list[float]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        assert client.is_server_live() and client.is_model_ready("srv")
        inputs = []
        for column in ("a", "b"):
            tensor = httpclient.InferInput(column, [len(rows)], "FP64")
            tensor.set_data_from_numpy(
                np.array([r[column] for r in rows], dtype=np.float64), binary_data=False
            )
            inputs.append(tensor)
        result = client.infer(
            "srv", inputs, outputs=[httpclient.InferRequestedOutput("predict", binary_data=False)]
        )
        return [float(v) for v in result.as_numpy("predict")]
    finally:
        client.close()


async def endpoint_ready(client: httpx.AsyncClient, url: str, proc, settings) -> None:
    """Wait until the endpoint says ready; an endpoint that died fails with its log."""

    async def up() -> bool:
        assert proc.poll() is None, (settings.home_dir / "serve-test.log").read_text()[-3000:]
        with contextlib.suppress(httpx.TransportError):
            return (await client.get(url + "/v2/health/ready")).status_code == 200
        return False

    await _wait(up, "the endpoint ready")


async def _wait(predicate, what: str, timeout: float = 180.0):
    from tests.conftest import wait_for

    async def check():
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        return value

    return await wait_for(check, timeout, what)


async def test_generation_counts_real_tokens_and_streams_them_as_server_sent_events(settings):
    """The endpoint's token loop gives the text services.platform.ml.textgen.generate gives for the same seed;
    `tokens` counts what was generated; `stream: true` sends one event per token, then the counts."""
    import torch

    from contracts import ArtifactRef
    from services.platform.ml.bundle import LoadedModel
    from services.platform.ml.textgen.generate import generate
    from services.platform.ml.textgen.model import GPT, GPTConfig, state_to_bytes
    from services.platform.ml.textgen.tokenizer import train_bpe
    from services.serving.app import InferenceServer

    tok = train_bpe("", 256)  # no merges: the byte-level tokenizer
    config = {"vocab_size": 256, "context": 32, "d_model": 32, "n_layers": 1, "n_heads": 2}
    torch.manual_seed(0)
    checkpoint = state_to_bytes(GPT(GPTConfig.from_dict(config)).state_dict())
    manifest = {
        "family": "transformer",
        "transform": {"task": "text_generation", "tokenizer": tok},
        "estimator": {"config": config},
    }
    ref = ArtifactRef(uri="file:///tmp/lm.json", sha256="0" * 64, size=1, media_type="application/json")
    server = InferenceServer(settings)
    lm = LoadedModel(ref, manifest, checkpoint=checkpoint)
    server.champions.models = {"lm": server.champions.prepare("lm", 1, lm)}
    ask = {"prompt": "def ", "max_tokens": 9, "temperature": 0.8, "top_k": 20, "seed": 7}
    expected = generate(checkpoint, config, tok, ask["prompt"], 9, 0.8, 20, 7)

    transport = httpx.ASGITransport(app=server.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://cairn") as client:
        plain = (await client.post("/v1/models/lm/generate", json=ask)).json()
        assert plain["text"] == expected and plain["tokens"] == 9 and plain["prompt_tokens"] == 4
        streamed = await client.post("/v1/models/lm/generate", json={**ask, "stream": True})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = [e for e in streamed.text.split("\n\n") if e]
        tokens = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        final = json.loads(events[-1].split("data: ", 1)[1])
        assert events[-1].startswith("event: done") and final["done"] is True
        assert len(tokens) == final["tokens"] == 9
        assert "".join(t["text"] for t in tokens) + final["tail"] == final["text"] == expected
        refused = await client.post("/v1/models/lm/generate", json={**ask, "max_tokens": 0})
        assert refused.status_code == 422


@contextlib.asynccontextmanager
async def served_over(server, how: str):
    """A client of `server`: through its Starlette app in process ("asgi"), or over a real socket
    through the endpoint's own HTTP server ("wire"), which answers the inference routes itself."""
    if how == "asgi":
        transport = httpx.ASGITransport(app=server.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://cairn") as client:
            yield client
        return
    from services.serving.launch import listening_socket
    from services.serving.wire import WireServer

    sock = listening_socket("127.0.0.1", 0)
    wire = WireServer(server.app(), server.inference_handlers(), max_body=server.settings.max_request_bytes)
    stop = asyncio.Event()
    serving = asyncio.create_task(wire.serve(sock, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as client:
            yield client
    finally:
        stop.set()
        await serving


@pytest.mark.parametrize("how", ["asgi", "wire"])
async def test_bad_requests_get_their_status_on_v1_and_v2(settings, how):
    """orjson on the hot path keeps the answers: 400 for broken JSON, 422 for NaN/Infinity and bad
    values, 413 over the size limit, 404 for an unknown model; a good request still answers. Under
    any ASGI server and under the endpoint's own."""
    from contracts import ArtifactRef, Task
    from services.platform.ml.bundle import LoadedModel
    from services.platform.ml.families import LinearPredictor
    from services.serving.app import InferenceServer

    spec = {
        "task": "regression",
        "classes": [],
        "columns": [
            {"name": "a", "kind": "numeric", "fill": 0.0},
            {"name": "b", "kind": "numeric", "fill": 1.0},
        ],
    }
    linear = {"mean": [0, 0], "std": [1, 1], "coef": [[1.0, 2.0]], "intercept": [0.5], "classes": [0]}
    model = LoadedModel(
        ArtifactRef(uri="file:///tmp/m.json", sha256="1" * 64, size=1, media_type="application/json"),
        {"family": "linear", "transform": spec},
        LinearPredictor(json.dumps(linear).encode(), Task.regression, 1),
    )
    small = settings.model_copy(update={"max_request_bytes": 4096})
    server = InferenceServer(small)
    server.champions.models = {"m": server.champions.prepare("m", 3, model)}
    async with served_over(server, how) as client:
        cases = {
            b"not json": 400,
            b"[" * 5000 + b"]" * 5000: 413,
            b"[" * 2000 + b"]" * 2000: 400,
            b'{"a": "seven", "b": 1}': 422,
            b'{"a": 1, "zodiac": "leo"}': 422,
            b'{"a": NaN, "b": 1}': 422,
            b'{"a": Infinity, "b": 1}': 422,
            b'{"a": [1, 2], "b": 1}': 422,
            b"[]": 422,
            b'"just a string"': 422,
            b'{"a": 1' + b"0" * 400 + b', "b": 1}': 422,  # an integer beyond any float
        }
        for body, status in cases.items():
            response = await client.post("/v1/models/m/predict", content=body)
            assert response.status_code == status, (body[:30], response.status_code, response.text)
            assert "error" in response.json()
        v2_bad = {"inputs": [{"name": "a", "shape": [1], "datatype": "FP64", "data": ["x"]}]}
        assert (await client.post("/v2/models/m/infer", json=v2_bad)).status_code == 422
        huge = b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP64", "data": [1%s]}]}' % (b"0" * 400)
        refused = await client.post("/v2/models/m/infer", content=huge)
        assert refused.status_code == 422 and "too large" in refused.json()["error"], refused.text
        assert (await client.post("/v2/models/zz/infer", json=v2_bad)).status_code == 404
        ok = await client.post("/v1/models/m/predict", json=[{"a": 1.0, "b": 2.0}, {"a": None}])
        assert ok.json()["predictions"] == pytest.approx([5.5, 2.5]) and ok.json()["version"] == 3
        v2 = await client.post(
            "/v2/models/m/infer",
            json={"inputs": [{"name": "a", "shape": [1], "datatype": "FP64", "data": [1.0]}]},
        )
        assert v2.json()["outputs"][0]["data"] == pytest.approx([3.5])


def _large_body(n: int = 300, **changes) -> bytes:
    """A v2 body over json_columns.FAST_BYTES: x numeric, c categorical, f boolean; `changes`
    replace whole tensors' data (by column) or add top-level fields."""
    data = {"x": [round(i * 0.37, 3) for i in range(n)], "c": ["red", "blue", "green"] * (n // 3),
            "f": [i % 2 for i in range(n)]}
    tensors = {name: {"name": name, "shape": [n], "datatype": "FP64", "data": values}
               for name, values in data.items()}
    top: dict = {}
    for key, value in changes.items():
        if key in tensors:
            tensors[key]["data"] = value
        else:
            top[key] = value
    return json.dumps({**top, "inputs": list(tensors.values())}).encode()


LARGE_BODIES = {
    "plain": (_large_body(), True),
    "integers": (_large_body(x=list(range(300))), True),
    "id and outputs": (_large_body(id="r-1", outputs=[{"name": "predict"}]), True),
    "unknown categories": (_large_body(c=["mauve"] * 300), True),
    "2-D, a number for a category": (
        json.dumps({"inputs": [{"name": "m", "shape": [300, 3], "datatype": "FP64",
                                "data": [float(i) for i in range(900)]}]}).encode(), False),
    "2-D, with text": (json.dumps({"inputs": [{"name": "m", "shape": [300, 3], "datatype": "BYTES",
                                               "data": [1.5, "red", 1] * 300}]}).encode(), True),
    "NaN": (_large_body().replace(b"0.37", b"NaN", 1), False),
    "a null": (_large_body(x=[None] + [1.0] * 299), False),
    "booleans": (_large_body(f=[True, False] * 150), False),
    "a number as text": (_large_body(x=["1.5"] + [1.0] * 299), False),
    "nested, [n, 1]": (_large_body(x=[[1.0]] * 300).replace(b'[300], "datatype": "FP64", "data": [[',
                                                         b'[300, 1], "datatype": "FP64", "data": [[', 1),
                       False),
    "nested, mixed": (_large_body(x=[[1.0]] + [1.0] * 299), False),
    "a key twice": (_large_body().replace(b'"name": "x"', b'"name": "c", "name": "x"', 1), False),
    "inputs twice": (b'{"inputs": [], ' + _large_body()[1:], False),
    "tensor parameters": (_large_body().replace(b'"name": "x"', b'"parameters": {}, "name": "x"', 1), False),
    "a bracket in a category": (_large_body(c=["re[d"] * 300), False),
    "a huge integer": (_large_body().replace(b"0.37", b"1" + b"0" * 400, 1), False),
    "beyond a double": (_large_body().replace(b"0.37", b"1e400", 1), False),
    "an unknown column": (_large_body().replace(b'"name": "x"', b'"name": "zz"', 1), False),
    "lengths that differ": (_large_body(x=[1.0] * 299), False),
    "not JSON": (_large_body()[:-1], False),
    "more rows than a request may hold": (_large_body(n=10_002), False),
    "2-D, more rows than a request may hold": (
        json.dumps({"inputs": [{"name": "m", "shape": [10_001, 3], "datatype": "BYTES",
                                "data": [1.5, "red", 1] * 10_001}]}).encode(), False),
}


@pytest.mark.parametrize("name", sorted(LARGE_BODIES))
def test_large_bodies_read_by_simdjson_give_what_orjson_gives(name):
    """services.serving.json_columns is a shortcut for large plain bodies: where it answers, the
    matrix, the row count and the other fields are the orjson path's to the bit; where it does not
    (None), the orjson path is taken and says what is wrong."""
    from services.serving.intake import Intake
    from services.serving.json_columns import FAST_BYTES, read_columns

    body, fast_expected = LARGE_BODIES[name]
    assert len(body) > FAST_BYTES
    spec = {"columns": [{"name": "x", "kind": "numeric", "fill": 2.5},
                        {"name": "c", "kind": "categorical", "categories": ["red", "blue"]},
                        {"name": "f", "kind": "boolean", "fill": 0.5}]}
    reader = TableReader(spec)
    fast = read_columns(body, reader.schema)
    matrix = reader.matrix(*fast[1:]) if fast is not None else None
    assert (matrix is not None) == fast_expected, (name, fast)
    if matrix is None:
        return
    doc = Intake.parse_json(body)
    x, n = reader.v2(doc)
    assert fast[1] == n and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, x)
    assert fast[0] == {k: v for k, v in doc.items() if k != "inputs"}


def test_a_large_2d_tensor_of_numbers_is_one_array_split_by_column():
    from services.serving.intake import Intake
    from services.serving.json_columns import read_columns

    spec = {"columns": [{"name": "a", "kind": "numeric", "fill": 0.0},
                        {"name": "b", "kind": "numeric", "fill": 1.0}]}
    body = json.dumps({"inputs": [{"name": "m", "shape": [500, 2], "datatype": "FP64",
                                   "data": [i * 0.5 for i in range(1000)]}]}).encode()
    reader = TableReader(spec)
    fast = read_columns(body, reader.schema)
    assert fast is not None and isinstance(fast[2]["a"], np.ndarray)
    np.testing.assert_array_equal(reader.matrix(*fast[1:]), reader.v2(Intake.parse_json(body))[0])
