"""Workloads shared by tests and benchmarks: a burst of arrivals, a flood of trials."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from contracts import (  # noqa: E402
    DataArrived,
    Metric,
    ModelDeployed,
    ModelFamily,
    SearchStrategy,
    Task,
    TrialCompleted,
    TrialRequested,
    TuningSpec,
    is_dead_letter,
    new_event,
)
from harness.stream import LineageWatch, Record, StreamLog, publish_all
from harness.system import System, rss
from services.platform.settings import CairnSettings

GIB = 1024**3


def tiny_csv(folder: Path, i: int, rows: int = 60) -> Path:
    """A small regression table, different per i."""
    rng = np.random.default_rng(i)
    x = rng.normal(size=(rows, 2))
    y = 1.5 * x[:, 0] - x[:, 1] + rng.normal(scale=0.3, size=rows)
    path = folder / f"tiny-{i:04d}.csv"
    lines = ["a,b,y"] + [f"{a:.5f},{b:.5f},{t:.5f}" for a, b, t in zip(x[:, 0], x[:, 1], y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def study_table(folder: Path, rows: int = 3000) -> Path:
    """A regression table (six features, a non-linear target) whose trials take a fraction of a
    second: a 40-trial study that still has trials in flight when a fault lands."""
    import pandas as pd

    path = folder / "study.csv"
    if not path.exists():
        rng = np.random.default_rng(7)
        x = rng.normal(size=(rows, 6))
        frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(6)])
        frame["y"] = x[:, 0] * 2 - x[:, 1] + np.sin(x[:, 2]) + rng.normal(scale=0.2, size=rows)
        frame.to_csv(path, index=False)
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
    from services.features import logic as features
    from services.ingestion.app import ingest
    from services.platform.artifacts import ArtifactStore

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
        r.doc["id"]: r for r in log.of_type(DataArrived.EVENT_TYPE) if r.doc and r.doc.get("id") in ids
    }
    latencies = [(terminals[c].ts - arrivals[c].ts).total_seconds() for c in ids]
    run_events = [r for r in log.records if r.correlation in ids]
    deployed = Counter(r.correlation for r in log.of_type(ModelDeployed.EVENT_TYPE) if r.correlation in ids)
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
        "dead_letters": len([r for r in log.records if is_dead_letter(r.subject)]),
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
        return len({r.doc.get("causationid") for r in lg.of_type(TrialCompleted.EVENT_TYPE)} & ids) >= m

    await log.wait(finished, timeout, f"{m} trial-completed events", every=1.0)
    wall = time.perf_counter() - started
    rss_after = rss(system)
    requested = {r.doc["id"]: r for r in log.of_type(TrialRequested.EVENT_TYPE) if r.doc["id"] in ids}
    completed: dict[str, Record] = {}
    for r in log.of_type(TrialCompleted.EVENT_TYPE):
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
