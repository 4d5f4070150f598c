"""Public APIs against the private paths cairn took for speed (issue 28, item 3), in one run.

Each pair runs the workload its caller runs, the same content on both sides:

- MLflow, `trials` finished trials (five params, three metrics, five tags, status and end time,
  as the training service records them) on a real SQLite tracking store, a fresh copy per side:
  `direct_rows` (services/platform/trial_runs.py: TrialRunWriter, all trials logged at once, as a
  burst of trials finishing, written in batched transactions) against `client_sync` (MlflowClient's
  create_run, log_batch, set_terminated per trial: Tracker.log_run) and `client_async` (the same
  with `log_batch(..., synchronous=False)`, MLflow's asynchronous logging, all waited for at the end).
- nats-py, on one nats-server from the wheel (file storage, fsync on every write, as the embedded
  server runs) provisioned as cairn provisions it:
  `pubacks` (bus/acks.py) against `publish_async` and awaited `publish`: events published in bursts
  of 256 (the publisher's window), every PubAck waited for;
  `fast_kv_get` / `fast_kv_update` (bus/kv.py's FastKeyValue, now in bench/retired.py) against
  nats-py KeyValue `get` / `update`: awaited one after the other on the handled-inputs bucket, as
  the ledger and tuning call them;
  `ready` (bus/pull.py's no-wait request, now in bench/retired.py) against `fetch(batch)` (what
  bus/pull.py's `ready` is now): a backlog of 600 events drained as PullLoop
  drains it, a one-message long poll then up to the free slots at once, every message acked; with
  4 slots (tuning's TrialCompleted route) and 256 (lineage's batch), each side its own durable.

Every side runs once per round, every other round in reverse order (A B C, C B A, ...), each on the
event loop a service runs on (uvloop). Per side: the median wall time per operation with its
spread, and the CPU time of this process per operation (the client's own cost; nats-server and the
disk are not in it). Per pair: public / private, the ratio of paired repeats (bench/repeat.py).
Issue 28's rule: the private path stays only where the public API costs more than twice as much.

    .venv/bin/python bench/public_api.py [--trials 40] [--messages 512] [--kv-ops 500] [--backlog 600]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from nats.js.api import ConsumerConfig, DeliverPolicy  # noqa: E402

from bench import retired  # noqa: E402
from bench.repeat import column, ratio_spread, rounded, spread  # noqa: E402
from contracts import DataArrived, DataRejected, subject_for  # noqa: E402
from services.platform.bus.acks import PubAcks  # noqa: E402
from services.platform.bus.embedded import EmbeddedNats  # noqa: E402
from services.platform.bus.provision import handled_bucket, provision_all  # noqa: E402
from services.platform.bus.pull import FETCH_WAIT_S, ready  # noqa: E402
from services.platform.event_loop import event_loop_factory  # noqa: E402
from services.platform.settings import CairnSettings  # noqa: E402
from services.platform.tracking import EVENT_TAG, Tracker  # noqa: E402
from services.platform.trial_runs import TrialRun, TrialRunWriter  # noqa: E402

EXPERIMENT = "bench-trials"
BURST = 256  # the publisher's window (services/platform/bus/publisher.py WINDOW)
# Pull loops: tuning's TrialCompleted route (4 handler slots) and lineage's batch (256).
SLOTS = (4, 256)
# (private side, public sides): the ratios reported are public / private.
PAIRS = {
    "mlflow": ("direct_rows", ("client_sync", "client_async")),
    "publish": ("pubacks", ("publish_async", "publish_awaited")),
    "kv_get": ("fast_kv_get", ("kv_get",)),
    "kv_update": ("fast_kv_update", ("kv_update",)),
    "pull_4": ("ready_4", ("fetch_4",)),
    "pull_256": ("ready_256", ("fetch_256",)),
}


async def timed(ops: int, work: Callable[[], Awaitable[None]]) -> dict[str, float]:
    """Wall and process CPU time per operation, in ms, of `ops` operations done by `work`."""
    cpu, wall = time.process_time(), time.perf_counter()
    await work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"ms_per_op": 1000 * wall / ops, "cpu_ms_per_op": 1000 * cpu / ops}


# MLflow -------------------------------------------------------------------------------------
def trials(n: int) -> list[TrialRun]:
    """What the training service records for each trial (services/training/app.py)."""
    return [
        TrialRun(
            experiment=EXPERIMENT,
            run_name=f"study-1/t{i}/r0",
            event_id=f"trial-event-{i}",
            params={
                "max_depth": 3 + i % 5,
                "eta": 0.05 * (1 + i % 7),
                "family": "xgboost",
                "budget": 50,
                "rung": 0,
            },
            metrics={"rmse": 1.0 + i / n, "duration_s": 0.01 * i, "rounds": 50},
            tags={
                "cairn.kind": "trial",
                "cairn.study_id": "study-1",
                "cairn.correlation_id": "corr-1",
                "cairn.featureset_sha256": "0" * 64,
            },
        )
        for i in range(n)
    ]


class TrackingStores:
    """Fresh SQLite tracking stores, copied from one template: creating MLflow's schema takes seconds."""

    def __init__(self, root: Path):
        self.root = root
        self.template = root / "template.db"
        Tracker(f"sqlite:///{self.template}").experiment(EXPERIMENT)
        with sqlite3.connect(self.template) as db:  # everything in the main file, for the copies
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def fresh(self) -> tuple[Tracker, Path]:
        path = self.root / f"{uuid.uuid4().hex}.db"
        shutil.copyfile(self.template, path)
        tracker = Tracker(f"sqlite:///{path}")
        tracker.experiment(EXPERIMENT)
        return tracker, path


def stored(path: Path) -> tuple[int, int, int, int]:
    """Finished runs, params, metrics and tags in a store: the check that every side wrote the same."""
    with sqlite3.connect(path) as db:
        return tuple(  # type: ignore[return-value]
            db.execute(query).fetchone()[0]
            for query in (
                "SELECT count(*) FROM runs WHERE status = 'FINISHED' AND end_time IS NOT NULL",
                "SELECT count(*) FROM params",
                "SELECT count(*) FROM metrics",
                "SELECT count(*) FROM tags",
            )
        )


async def mlflow_side(kind: str, stores: TrackingStores, runs: list[TrialRun]) -> dict[str, float]:
    tracker, path = stores.fresh()
    client = tracker.client
    experiment_id = tracker.experiment(EXPERIMENT)

    def one(run: TrialRun, synchronous: bool) -> Any:
        """Tracker.log_run's three calls, the batch optionally asynchronous."""
        created = client.create_run(
            experiment_id, run_name=run.run_name, tags={EVENT_TAG: run.event_id, **run.tags}
        )
        run_id = created.info.run_id
        pending = client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), run.end_ms, 0) for k, v in run.metrics.items()],
            params=[Param(k, str(v)) for k, v in run.params.items()],
            synchronous=synchronous,
        )
        client.set_terminated(run_id, status="FINISHED", end_time=run.end_ms)
        return pending

    async def work() -> None:
        if kind == "direct_rows":
            writer = TrialRunWriter.for_tracker(tracker)
            assert writer is not None
            await asyncio.gather(*(writer.log(run) for run in runs))
            await writer.close()
        elif kind == "client_sync":
            for run in runs:
                one(run, synchronous=True)
        else:
            for operations in [one(run, synchronous=False) for run in runs]:
                operations.wait()

    result = await timed(len(runs), work)
    counts = stored(path)
    tracker.client._tracking_client.store.engine.dispose()
    path.unlink()
    return {**result, "stored": counts}


# nats-py --------------------------------------------------------------------------------------
class Bus:
    """One provisioned nats-server and a client connection to it, shared by every bus side."""

    def __init__(self, root: Path):
        self.root = root
        self.server = EmbeddedNats(root / "nats")
        self.sent = 0

    async def start(self) -> None:
        self.server.start()
        self.settings = CairnSettings(home=self.root / "home", nats_url=self.server.url)
        self.subject = subject_for(DataArrived, self.settings.namespace)
        self.nc = await nats.connect(self.server.url)
        self.js = self.nc.jetstream()
        await provision_all(self.js, self.settings)
        self.acks = PubAcks(self.nc)
        self.kv = await self.js.key_value(handled_bucket(self.settings.namespace))
        self.fast_kv = retired.FastKeyValue(self.kv, lambda: self.acks, retired.Replies(self.nc))

    async def fill_backlog(self, n: int) -> None:
        """`n` events on a subject of their own, drained by every pull side (each its own durable)."""
        self.backlog_subject = subject_for(DataRejected, self.settings.namespace)
        self.backlog = n
        futures = [await self.acks.send(self.backlog_subject, body, h) for body, h in self.events(n)]
        for future in futures:
            await future

    async def stop(self) -> None:
        await self.nc.close()
        self.server.stop()

    def events(self, n: int) -> list[tuple[bytes, dict[str, str]]]:
        """Event-sized bodies with the headers the publisher sends (unique ids: none deduplicated)."""
        out = []
        for _ in range(n):
            self.sent += 1
            event_id = f"bench-{self.sent}"
            body = json.dumps({"id": event_id, "data": {"uri": f"file:///data/{event_id}.csv"}}).encode()
            headers = {
                "Nats-Msg-Id": event_id,
                "content-type": "application/cloudevents+json",
                "ce-type": DataArrived.EVENT_TYPE,
                "Nats-Expected-Stream": self.settings.stream,
            }
            out.append((body, headers))
        return out


async def publish_side(bus: Bus, kind: str, messages: int) -> dict[str, float]:
    bursts = [bus.events(BURST) for _ in range(max(messages // BURST, 1))]

    async def work() -> None:
        for burst in bursts:
            if kind == "pubacks":
                futures = [await bus.acks.send(bus.subject, body, dict(h)) for body, h in burst]
                for future in futures:
                    await future
            elif kind == "publish_async":
                futures = [
                    await bus.js.publish_async(bus.subject, body, headers=dict(h)) for body, h in burst
                ]
                await asyncio.gather(*futures)
            else:
                for body, h in burst:
                    await bus.js.publish(bus.subject, body, headers=dict(h))

    return await timed(BURST * len(bursts), work)


async def kv_side(bus: Bus, kind: str, ops: int) -> dict[str, float]:
    key = f"bench.{uuid.uuid4().hex}"
    value = json.dumps({"service": "bench", "outcome": "ok", "outputs": ["x" * 36], "at": 0.0}).encode()
    revision = await bus.kv.create(key, value)

    async def gets() -> None:
        get = bus.fast_kv.get if kind == "fast_kv_get" else bus.kv.get
        for _ in range(ops):
            assert (await get(key)).value == value

    async def updates() -> None:
        nonlocal revision
        update = bus.fast_kv.update if kind == "fast_kv_update" else bus.kv.update
        for _ in range(ops):
            revision = await update(key, value, last=revision)

    return await timed(ops, gets if kind.endswith("get") else updates)


async def pull_side(bus: Bus, kind: str, slots: int) -> dict[str, float]:
    """The backlog drained by a fresh durable as PullLoop drains it (its `_pull`), with `slots` free."""
    durable = f"bench-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(
        durable_name=durable,
        ack_wait=30,
        max_deliver=-1,
        max_ack_pending=4 * slots,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=bus.backlog_subject,
    )
    sub = await bus.js.pull_subscribe(
        bus.backlog_subject, durable=durable, stream=bus.settings.stream, config=config
    )

    async def work() -> None:
        got = 0
        while got < bus.backlog:
            batch = await sub.fetch(batch=1, timeout=FETCH_WAIT_S)  # LongPoll.next
            if slots > 1 and batch[0].metadata.num_pending:
                take = retired.ready if kind == "ready" else ready  # bus/pull.py's: nats-py's fetch
                batch += await take(sub, slots - 1)
            for msg in batch:
                await msg.ack()
            got += len(batch)
        assert got == bus.backlog, (got, bus.backlog)

    result = await timed(bus.backlog, work)
    await sub.unsubscribe()
    await bus.js.delete_consumer(bus.settings.stream, durable)
    return result


# The run --------------------------------------------------------------------------------------
async def rounds(
    sides: dict[str, Callable[[], Awaitable[dict[str, Any]]]], repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """Every side once per round, every other round in reverse order (A B C, C B A, ...): a side
    that leaves work behind (SQLite's and the server's writes to disk) does not always land on the
    same neighbour, and a drift over the run hits each side alike."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(repeats):
        for name in list(sides) if i % 2 == 0 else reversed(list(sides)):
            results[name].append(await sides[name]())
    return results


def summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per pair: each side's time per operation and public / private, paired by round."""
    out: dict[str, Any] = {}
    for pair, (private, publics) in PAIRS.items():
        doc: dict[str, Any] = {"private": private}
        for side in (private, *publics):
            doc[side] = {
                "ms_per_op": spread(column(rows[side], "ms_per_op")),
                "cpu_ms_per_op": spread(column(rows[side], "cpu_ms_per_op")),
            }
        for side in publics:
            ratios = {
                metric: ratio_spread(column(rows[side], metric), column(rows[private], metric))
                for metric in ("ms_per_op", "cpu_ms_per_op")
            }
            # The rule of issue 28: the public API replaces the private path unless it costs more
            # than twice as much (in time per operation).
            ratios["public_within_2x"] = ratios["ms_per_op"]["median"] <= 2.0
            doc[f"{side}_vs_{private}"] = ratios
        out[pair] = doc
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--messages", type=int, default=512)
    parser.add_argument("--kv-ops", type=int, default=500)
    parser.add_argument("--backlog", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "public_api.json"))
    args = parser.parse_args()
    runs = trials(args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        stores = TrackingStores(Path(tmp))
        bus = Bus(Path(tmp))
        await bus.start()
        try:
            await publish_side(bus, "publish_async", BURST)  # warm: reply subscriptions, first sends
            await publish_side(bus, "pubacks", BURST)
            await bus.fill_backlog(args.backlog)
            sides: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                **{
                    k: (lambda k=k: mlflow_side(k, stores, runs))
                    for k in ("direct_rows", "client_sync", "client_async")
                },
                **{
                    k: (lambda k=k: publish_side(bus, k, args.messages))
                    for k in ("pubacks", "publish_async", "publish_awaited")
                },
                **{
                    k: (lambda k=k: kv_side(bus, k, args.kv_ops))
                    for k in ("fast_kv_get", "kv_get", "fast_kv_update", "kv_update")
                },
                **{
                    f"{k}_{n}": (lambda k=k, n=n: pull_side(bus, k, n))
                    for n in SLOTS
                    for k in ("ready", "fetch")
                },
            }
            rows = await rounds(sides, args.repeats)
        finally:
            await bus.stop()
    counts = {
        tuple(row["stored"]) for side in ("direct_rows", "client_sync", "client_async") for row in rows[side]
    }
    assert len(counts) == 1, f"the MLflow sides stored different content: {counts}"
    result = rounded(
        {
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "trials": args.trials,
            "messages": args.messages,
            "kv_ops": args.kv_ops,
            "backlog": args.backlog,
            "repeats": args.repeats,
            "stored_per_mlflow_side": dict(
                zip(("runs", "params", "metrics", "tags"), counts.pop(), strict=True)
            ),
            **summary(rows),
        }
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict[str, Any]) -> str:
    """The figures as people read them: median ms per operation (wall, CPU), public / private."""
    lines = [f"{'side':<16} {'ms/op':>8} {'cpu ms/op':>10}   public/private: wall (min-max), cpu (min-max)"]
    for pair, (private, publics) in PAIRS.items():
        doc = result[pair]
        for side in (private, *publics):
            wall, cpu = doc[side]["ms_per_op"], doc[side]["cpu_ms_per_op"]
            ratio = ""
            if side != private:
                r, c = (doc[f"{side}_vs_{private}"][m] for m in ("ms_per_op", "cpu_ms_per_op"))
                ratio = (
                    f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}), "
                    f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f})"
                )
            lines.append(f"{side:<16} {wall['median']:>8.3f} {cpu['median']:>10.3f}   {ratio}")
    return "\n".join(lines)


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())
