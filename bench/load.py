"""Load: a burst of data arrivals through the whole pipeline, and a flood of trial requests straight
to the training service, against real processes (nats-server, every service, MLflow on SQLite, a
Dask LocalCluster). Reports throughput, arrival->terminal latency percentiles (stream timestamps,
so one clock), the lineage lag (each event's stream timestamp to the first poll that finds it in the
lineage store; target p99 <= 2 s) and the resident memory of every process before and after.

    .venv/bin/python bench/load.py [--arrivals 200] [--trials 1000] [--out bench/results/load.json]

The helpers here (start a system, read the stream incrementally, measure RSS) are also what
tests/test_load.py, tests/test_faults.py and tests/test_hostile.py drive the system with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from nats.js.api import ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts import (  # noqa: E402
    DataArrived,
    Metric,
    ModelFamily,
    SearchStrategy,
    Task,
    TrialRequested,
    TuningSpec,
    new_event,
)
from services import supervisor  # noqa: E402
from services.bus.connection import connect  # noqa: E402
from services.bus.embedded import EmbeddedNats  # noqa: E402
from services.settings import RUNTIME_FILE, CairnSettings  # noqa: E402

TERMINAL_TYPES = {
    "cairn.model.deployed.v1",
    "cairn.data.rejected.v1",
    "cairn.event.rejected.v1",
    "cairn.deployment.failed.v1",
}
GIB = 1024**3


# A running system ----------------------------------------------------------------------------
def settings_env(settings: CairnSettings) -> dict[str, str]:
    """The CAIRN_ variables a service process needs to run with these settings."""
    env = {
        "CAIRN_HOME": str(settings.home_dir),
        "CAIRN_ACK_WAIT_S": str(settings.ack_wait_s),
        "CAIRN_RETRY_BACKOFF_S": json.dumps(settings.retry_backoff_s),
        "CAIRN_MAX_DELIVER": str(settings.max_deliver),
        "CAIRN_ALLOWED_ROOTS": json.dumps([str(r) for r in settings.read_roots]),
    }
    for name in ("nats_url", "mlflow_uri", "dask_workers", "trial_concurrency"):
        value = getattr(settings, name)
        if value is not None:
            env[f"CAIRN_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class System:
    """nats-server, the services `cairn up` starts (each its own process) and the endpoint."""

    home: Path
    settings: CairnSettings
    server: EmbeddedNats
    runtime: dict[str, Any]
    env: dict[str, str]
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {**self.runtime["pids"], "nats-server": self.server.process.pid}  # type: ignore[union-attr]

    def health_url(self, name: str) -> str:
        return self.runtime["health"][name]

    def respawn(self, name: str) -> int:
        """Start a service again on the same health port, as its supervisor would after a crash."""
        port = self.runtime["health"][name].rsplit(":", 1)[1]
        proc = supervisor.spawn(
            ["run", name],
            {**self.env, **self.service_env.get(name, {}), "CAIRN_HTTP_PORT": port},
            self.settings.home_dir / "logs" / f"{name}.log",
        )
        self.runtime["pids"][name] = proc.pid
        (self.settings.home_dir / RUNTIME_FILE).write_text(json.dumps(self.runtime, indent=2))
        return proc.pid

    def kill(self, name: str) -> None:
        """kill -9 a service and everything it started (its Dask workers): a crashed container."""
        pid = self.runtime["pids"][name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def not_ready(self, timeout: float = 180.0) -> dict[str, str]:
        return supervisor.wait_ready(self.runtime, timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process group at once (supervisor.down does one after the other), then
        SIGKILL what is left; nats-server last."""
        pids = dict(self.runtime["pids"])
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in pids.values():
            while supervisor.alive(pid) and time.monotonic() < deadline:  # noqa: SLF001
                time.sleep(0.05)
            if supervisor.alive(pid):  # noqa: SLF001
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (self.settings.home_dir / RUNTIME_FILE).unlink()
        self.server.stop()


def start_system(
    home: Path,
    *,
    services: list[str] | None = None,
    serve: bool = True,
    nats_port: int = -1,
    extra_env: dict[str, str] | None = None,
    service_env: dict[str, dict[str, str]] | None = None,
    ready_timeout: float = 180.0,
    **overrides: Any,
) -> System:
    """`service_env`: variables for one service only (that one is started after the others)."""
    from services.catalog import SERVICES

    home = Path(home)
    service_env = service_env or {}
    names = [n for n in (services or list(SERVICES)) if n not in service_env]
    server = EmbeddedNats(home / "nats", port=nats_port)
    server.start()
    base: dict[str, Any] = {
        "home": home / "state",  # data files go in `home`, beside cairn's state and never in it
        "nats_url": server.url,
        "allowed_roots": [str(home)],
        "serve_port": 0,
    }
    settings = CairnSettings(**{**base, **overrides})
    env = {**settings_env(settings), **(extra_env or {})}
    try:
        with _environ(env):
            runtime = supervisor.up(settings, services=names, serve=serve)
            full_env = {**os.environ, "CAIRN_NATS_URL": settings.nats_url or ""}
        system = System(home, settings, server, runtime, full_env, service_env)
        for name in service_env:
            runtime["health"][name] = f"http://127.0.0.1:{supervisor._free_port()}"  # noqa: SLF001
            system.respawn(name)
        not_ready = system.not_ready(ready_timeout)
        if not_ready:
            raise RuntimeError(f"not ready: {not_ready}; logs in {settings.home_dir / 'logs'}")
    except BaseException:
        supervisor.down(settings)
        server.stop()
        raise
    return system


def rss(system: System) -> dict[str, int]:
    """Resident memory of every process, Dask workers (children of training) each on their own."""
    out: dict[str, int] = {}
    for name, pid in system.pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    out[f"{name}/{child.pid}"] = child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return out


# Reading the event log -----------------------------------------------------------------------
@dataclass
class Record:
    seq: int
    subject: str
    ts: datetime
    doc: dict[str, Any] | None
    headers: dict[str, str]

    @property
    def type(self) -> str | None:
        return self.doc.get("type") if self.doc else None

    @property
    def correlation(self) -> str | None:
        return self.doc.get("correlationid") if self.doc else None

    @property
    def data(self) -> dict[str, Any]:
        return (self.doc or {}).get("data") or {}


@dataclass
class StreamLog:
    """The stream read incrementally, each poll on a fresh connection (survives server restarts)."""

    settings: CairnSettings
    records: list[Record] = field(default_factory=list)
    next_seq: int = 1

    async def poll(self) -> list[Record]:
        try:
            nc = await connect(self.settings, "bench-reader")
        except Exception:  # noqa: BLE001 - the server is restarting: nothing new yet
            return []
        new: list[Record] = []
        try:
            js = nc.jetstream()
            last = (await js.stream_info(self.settings.stream)).state.last_seq
            if last < self.next_seq:
                return []
            sub = await js.subscribe(
                "cairn.>",
                ordered_consumer=True,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.next_seq
                ),
            )
            while self.next_seq <= last:
                msg = await sub.next_msg(timeout=10)
                meta = msg.metadata
                try:
                    doc = json.loads(msg.data) if ".dlq." not in msg.subject else None
                except (ValueError, RecursionError):
                    doc = None
                if not isinstance(doc, dict):
                    doc = None
                new.append(
                    Record(meta.sequence.stream, msg.subject, meta.timestamp, doc, dict(msg.headers or {}))
                )
                self.next_seq = meta.sequence.stream + 1
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - a restart mid-read: keep what we have, read on next poll
            pass
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        self.records.extend(new)
        return new

    async def wait(
        self, done: Callable[[StreamLog], Any], timeout: float, what: str, every: float = 0.5
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            value = done(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(every)

    # Views ----------------------------------------------------------------------------------
    def of_type(self, event_type: str) -> list[Record]:
        return [r for r in self.records if r.type == event_type]

    def on(self, subject: str) -> list[Record]:
        return [r for r in self.records if r.subject == subject]

    def run(self, correlation: str) -> list[Record]:
        return [r for r in self.records if r.correlation == correlation]

    def terminal(self, correlation: str) -> Record | None:
        for r in self.records:
            if r.correlation != correlation:
                continue
            if r.type in TERMINAL_TYPES or (
                r.type == "cairn.model.evaluated.v1" and not r.data.get("passed")
            ):
                return r
        return None

    def terminals(self, correlations: set[str]) -> dict[str, Record]:
        out: dict[str, Record] = {}
        for r in self.records:
            c = r.correlation
            if (
                c in correlations
                and c not in out
                and (
                    r.type in TERMINAL_TYPES
                    or (r.type == "cairn.model.evaluated.v1" and not r.data.get("passed"))
                )
            ):
                out[c] = r
        return out

    def trial_counts(self) -> Counter[tuple[str, int, int]]:
        """trial-completed events per (study, trial, rung): each must be exactly 1."""
        return Counter(
            (r.data["study_id"], r.data["trial_id"], r.data["rung"])
            for r in self.of_type("cairn.trial.completed.v1")
        )


@dataclass
class LineageWatch:
    """The lineage store seen from outside: its last sequence polled every `every` seconds, and the
    wall-clock time each sequence was first seen there (the service itself records nothing extra)."""

    settings: CairnSettings
    every: float = 0.05
    seen: int = 0
    first_seen: dict[int, datetime] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        from services.lineage.store import LineageStore

        store = await asyncio.to_thread(LineageStore, self.settings.lineage_url)
        try:
            while True:
                try:
                    last = await asyncio.to_thread(store.last_seq)
                except Exception:  # noqa: BLE001 - a write holds the SQLite lock: ask again
                    last = self.seen
                now = datetime.now(UTC)
                for seq in range(self.seen + 1, last + 1):
                    self.first_seen[seq] = now
                self.seen = max(self.seen, last)
                async with self.changed:
                    self.changed.notify_all()
                await asyncio.sleep(self.every)
        finally:
            store.close()

    async def reached(self, seq: int, timeout: float) -> bool:
        """Wait until the store holds `seq` (True), or `timeout` passes (False)."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.seen >= seq), timeout)
        return self.seen >= seq

    def lags(self, records: list[Record]) -> list[float]:
        """Seconds from each record's stream timestamp to its first sighting in the store."""
        return [(self.first_seen[r.seq] - r.ts).total_seconds() for r in records if r.seq in self.first_seen]


async def publish_all(settings: CairnSettings, events: list[Any], concurrency: int = 64) -> dict[str, float]:
    """Publish with PubAcks, many in flight; returns event id -> seconds since the first publish."""
    nc = await connect(settings, "bench-publisher")
    js = nc.jetstream()
    sent: dict[str, float] = {}
    started = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)

    async def one(event: Any) -> None:
        async with gate:
            subject = event.type  # subjects equal types in the live namespace
            await js.publish(subject, event.encode(), headers={"Nats-Msg-Id": event.id}, timeout=30)
            sent[event.id] = time.perf_counter() - started

    try:
        await asyncio.gather(*(one(e) for e in events))
    finally:
        await nc.close()
    return sent


async def wait_streamed(settings: CairnSettings, n: int, subject: str, timeout: float = 30) -> None:
    nc = await connect(settings, "bench")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.stream_info(settings.stream, subjects_filter=subject)
            if (info.state.subjects or {}).get(subject, 0) >= n:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{subject}: fewer than {n} stored after {timeout}s")
    finally:
        await nc.close()


# Data ----------------------------------------------------------------------------------------
def tiny_csv(folder: Path, i: int, rows: int = 60) -> Path:
    """A small regression table, different per i."""
    rng = np.random.default_rng(i)
    x = rng.normal(size=(rows, 2))
    y = 1.5 * x[:, 0] - x[:, 1] + rng.normal(scale=0.3, size=rows)
    path = folder / f"tiny-{i:04d}.csv"
    lines = ["a,b,y"] + [f"{a:.5f},{b:.5f},{t:.5f}" for a, b, t in zip(x[:, 0], x[:, 1], y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_spec() -> TuningSpec:
    return TuningSpec(trials=2, families=[ModelFamily.linear], strategy=SearchStrategy.random, max_budget=10)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p95": round(float(np.percentile(arr, 95)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "max": round(float(arr.max()), 3),
        "mean": round(float(arr.mean()), 3),
    }


def build_featureset(settings: CairnSettings, csv: Path) -> Any:
    """A feature set made in-process by the same pure functions ingestion and features use."""
    from services.artifacts import ArtifactStore
    from services.features import logic as features
    from services.ingestion.app import ingest

    store = ArtifactStore(settings.artifacts)
    ingested = ingest(DataArrived(uri=csv.as_uri(), target="y", tuning=tiny_spec()), store, settings)
    return features.build(ingested, store)


# The two measurements ------------------------------------------------------------------------
async def burst(
    system: System,
    n: int,
    timeout: float = 900.0,
    prefix: str = "load",
    lineage_wait: float = 60.0,
    data_root: Path | None = None,
) -> dict[str, Any]:
    """n arrivals at once, each its own model; every one must reach a terminal event. With the
    lineage service running, also the lineage lag of every event of the burst (`lineage_wait`:
    how long after the last terminal event the store may take to hold them all). The data files go
    under `data_root` (default: the system's home)."""
    data = (data_root or system.home) / prefix
    data.mkdir(exist_ok=True)
    events = [
        new_event(
            DataArrived(
                uri=tiny_csv(data, i).as_uri(),
                target="y",
                model_name=f"{prefix}-{i:04d}",
                seed=i,
                tuning=tiny_spec(),
            ),
            source="/bench/load",
        )
        for i in range(n)
    ]
    ids = {e.id for e in events}
    log = StreamLog(system.settings)
    await log.poll()
    before_seq = log.next_seq - 1
    watch = LineageWatch(system.settings) if "lineage" in system.runtime["pids"] else None
    watching = asyncio.create_task(watch.run()) if watch else None
    rss_before = rss(system)
    started = time.perf_counter()
    await publish_all(system.settings, events)
    published_s = time.perf_counter() - started

    def all_terminal(lg: StreamLog) -> dict[str, Record] | None:
        found = lg.terminals(ids)
        return found if len(found) == n else None

    terminals = await log.wait(all_terminal, timeout, f"{n} terminal events", every=1.0)
    wall = time.perf_counter() - started
    rss_after = rss(system)
    lineage: dict[str, Any] = {}
    if watch and watching:
        await watch.reached(log.next_seq - 1, lineage_wait)
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        burst_records = [r for r in log.records if r.seq > before_seq]
        lineage = {
            "lineage_lag_s": percentiles(watch.lags(burst_records)),
            "lineage_unrecorded": len([r for r in burst_records if r.seq not in watch.first_seen]),
        }
    arrivals = {
        r.doc["id"]: r for r in log.of_type("cairn.data.arrived.v1") if r.doc and r.doc.get("id") in ids
    }
    latencies = [(terminals[c].ts - arrivals[c].ts).total_seconds() for c in ids]
    run_events = [r for r in log.records if r.correlation in ids]
    deployed = Counter(r.correlation for r in log.of_type("cairn.model.deployed.v1") if r.correlation in ids)
    span = (max(t.ts for t in terminals.values()) - min(a.ts for a in arrivals.values())).total_seconds()
    return {
        "arrivals": n,
        "terminal": dict(Counter(t.type for t in terminals.values())),
        "lost": n - len(terminals),
        "events": len(run_events),
        "publish_s": round(published_s, 3),
        "wall_s": round(wall, 3),
        "stream_span_s": round(span, 3),
        "pipelines_per_s": round(n / span, 3),
        "events_per_s": round(len(run_events) / span, 1),
        "latency_s": percentiles(latencies),
        "trial_completed_max_per_trial": max(log.trial_counts().values()),
        "deployed_max_per_run": max(deployed.values()) if deployed else 0,
        "dead_letters": len([r for r in log.records if r.subject.startswith("cairn.dlq.")]),
        **lineage,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "log": log,
    }


async def trial_flood(
    system: System, m: int, timeout: float = 1200.0, prefix: str = "flood", data_root: Path | None = None
) -> dict[str, Any]:
    """m trial-requested events for one tiny feature set, straight to the training service."""
    data = (data_root or system.home) / prefix
    data.mkdir(exist_ok=True)
    built = await asyncio.to_thread(build_featureset, system.settings, tiny_csv(data, 0, rows=200))
    events = [
        new_event(
            TrialRequested(
                study_id=f"{prefix}-{i // 100:03d}",
                trial_id=i % 100,
                rung=0,
                budget=10,
                family=ModelFamily.linear,
                params={"alpha": round(0.001 * (1 + i % 97), 6)},
                metric=Metric.rmse,
                task=Task.regression,
                target="y",
                seed=0,
                featureset=built.featureset,
                model_name="flood",
            ),
            source="/bench/load",
        )
        for i in range(m)
    ]
    ids = {e.id for e in events}
    log = StreamLog(system.settings)
    await log.poll()
    rss_before = rss(system)
    started = time.perf_counter()
    await publish_all(system.settings, events)
    published_s = time.perf_counter() - started

    def finished(lg: StreamLog) -> bool:
        return len({r.doc.get("causationid") for r in lg.of_type("cairn.trial.completed.v1")} & ids) >= m

    await log.wait(finished, timeout, f"{m} trial-completed events", every=1.0)
    wall = time.perf_counter() - started
    rss_after = rss(system)
    requested = {r.doc["id"]: r for r in log.of_type("cairn.trial.requested.v1") if r.doc["id"] in ids}
    completed: dict[str, Record] = {}
    for r in log.of_type("cairn.trial.completed.v1"):
        if r.doc.get("causationid") in ids:
            completed.setdefault(r.doc["causationid"], r)
    latencies = [(completed[i].ts - requested[i].ts).total_seconds() for i in ids]
    span = (max(c.ts for c in completed.values()) - min(r.ts for r in requested.values())).total_seconds()
    statuses = Counter(c.data.get("status") for c in completed.values())
    return {
        "trials": m,
        "completed": len(completed),
        "status": dict(statuses),
        "publish_s": round(published_s, 3),
        "wall_s": round(wall, 3),
        "stream_span_s": round(span, 3),
        "trials_per_s": round(m / span, 2),
        "latency_s": percentiles(latencies),
        "trial_completed_max_per_trial": max(log.trial_counts().values()),
        "rss_before": rss_before,
        "rss_after": rss_after,
    }


async def publish_cost(home: Path, sync_interval: str, n: int) -> dict[str, Any]:
    """n events of ~1 KB published one after another, each waiting for its PubAck."""
    server = EmbeddedNats(home / f"nats-{sync_interval}", sync_interval=sync_interval)
    server.start()
    try:
        settings = CairnSettings(home=home, nats_url=server.url)
        nc = await connect(settings, "bench")
        from services.bus.provision import provision

        await provision(nc.jetstream(), settings)
        js = nc.jetstream()
        body = b'{"pad": "' + b"x" * 1000 + b'"}'
        times = []
        started = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await js.publish("cairn.dlq.bench", body, headers={"Nats-Msg-Id": f"fsync-{i}"})
            times.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        await nc.close()
    finally:
        server.stop()
    ms = percentiles([t * 1000 for t in times])
    return {"sync_interval": sync_interval, "events": n, "per_s": round(n / wall, 1), "pubAck_ms": ms}


def _mib(values: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 2**20, 1) for k, v in sorted(values.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrivals", type=int, default=200)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--fsync", type=int, default=2000, help="events for the sync_interval comparison")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "load.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.arrivals:
        home = Path(tempfile.mkdtemp(prefix="cairn-load-"))
        system = start_system(home / "state", allowed_roots=[str(home)])  # data beside cairn's home
        try:
            warm = asyncio.run(burst(system, 1, prefix="warm-up", data_root=home))  # imports, first writes
            b = asyncio.run(burst(system, args.arrivals, data_root=home))
            b.pop("log")
            b["one_arrival_alone_latency_s"] = warm["latency_s"]["p50"]
            b["rss_before_mib"], b["rss_after_mib"] = _mib(b.pop("rss_before")), _mib(b.pop("rss_after"))
            result["burst"] = b
            print(json.dumps({k: v for k, v in b.items() if not k.startswith("rss")}, indent=2))
            if b.get("lineage_lag_s"):
                lag = b["lineage_lag_s"]
                print(f"lineage lag p50 {lag['p50']} s, p99 {lag['p99']} s (target p99 <= 2 s)")
        finally:
            system.stop()
    if args.trials:
        home = Path(tempfile.mkdtemp(prefix="cairn-trials-"))
        system = start_system(home / "state", services=["training"], serve=False, allowed_roots=[str(home)])
        try:
            warm = asyncio.run(trial_flood(system, 1, prefix="warm-up", data_root=home))
            t = asyncio.run(trial_flood(system, args.trials, data_root=home))
            t["one_trial_alone_latency_s"] = warm["latency_s"]["p50"]
            t["rss_before_mib"], t["rss_after_mib"] = _mib(t.pop("rss_before")), _mib(t.pop("rss_after"))
            result["trials"] = t
            print(json.dumps({k: v for k, v in t.items() if not k.startswith("rss")}, indent=2))
        finally:
            system.stop()
    if args.fsync:
        home = Path(tempfile.mkdtemp(prefix="cairn-fsync-"))
        result["fsync"] = [
            asyncio.run(publish_cost(home, interval, args.fsync)) for interval in ("always", "2m")
        ]
        print(json.dumps(result["fsync"], indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
