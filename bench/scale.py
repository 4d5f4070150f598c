"""One study of many trials of a tiny model through the real services: trials/s, and whether every
process's memory stays bounded while it runs.

A generated table (default 2,000 x 10, outside cairn's home), the `linear` family at budget 1,
strategy random: each trial is a ridge fit of milliseconds, so what is measured is the cost the
pipeline adds per trial (events, ledger, key-value state, tracking, Dask scheduling). A sampler
thread reads every service process, the Dask workers and nats-server with psutil (RSS, CPU) a few
times a second; the report gives each process's peak RSS, its RSS at the start and the end of the
trial phase, and its CPU ms per trial over the trial phase, so the process that saturates (the
limit) and any growth per trial are named by the numbers; and each process's RSS at the end over its
RSS at trial 2,000 (`--rss-from`), the issue's bound of 10 % for cairn's services (nats-server, which
holds the stream and its index, is reported beside them).

    .venv/bin/python bench/scale.py [--trials 10000] [--rows 2000] [--trial-concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repeat import rounded  # noqa: E402
from bench.shell_80 import scratch_system  # noqa: E402
from contracts import DataArrived, ModelFamily, SearchStrategy, TuningCompleted, TuningSpec, new_event  # noqa: E402
from services.platform.settings import CairnSettings  # noqa: E402
from services.tools import supervisor  # noqa: E402
from services.tools.client import Client as CairnClient  # noqa: E402

MB = 1024 * 1024


def processes(pids: dict[str, int]) -> dict[str, psutil.Process]:
    """Each named process, and the Dask workers (children of training) as `dask-worker-<i>`."""
    out: dict[str, psutil.Process] = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        out[name] = proc
        if name == "training":
            for i, child in enumerate(proc.children(recursive=True)):
                out[f"dask-worker-{i}"] = child
    return out


@dataclass
class Sampler:
    """RSS and CPU seconds of every process, `interval` apart, on a thread of its own so that a
    busy event loop (the client reads every event) does not skew the sampling."""

    pids: dict[str, int]
    interval: float
    times: list[float] = field(default_factory=list)
    samples: list[dict[str, tuple[int, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        now = time.perf_counter()
        row: dict[str, tuple[int, float]] = {}
        for name, proc in processes(self.pids).items():
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    row[name] = (proc.memory_info().rss, cpu.user + cpu.system)
            except psutil.NoSuchProcess:
                continue
        self.times.append(now)
        self.samples.append(row)

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self.thread = threading.Thread(target=self.run, name="sampler", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.sample()

    def at(self, when: float) -> dict[str, tuple[int, float]]:
        """The first sample taken at or after `when` (perf_counter), else the last."""
        return self.samples[min(bisect_left(self.times, when), len(self.samples) - 1)]

    def peak_rss_mb(self) -> dict[str, float]:
        names = {n for row in self.samples for n in row}
        return {n: max(row[n][0] for row in self.samples if n in row) / MB for n in sorted(names)}


async def study(
    settings: CairnSettings, arrived: DataArrived, timeout: float, rss_from: int
) -> dict[str, Any]:
    """Submit, follow the run to its end; perf_counter marks of the first and last of each type, and
    of the `rss_from`-th trial result."""
    marks: dict[str, float] = {}
    completed = 0

    def mark(ev: Any) -> None:
        nonlocal completed
        now = time.perf_counter()
        marks.setdefault(f"first:{ev.type}", now)
        marks[f"last:{ev.type}"] = now
        if ev.type == "cairn.trial.completed.v1":
            completed += 1
            if completed == rss_from:
                marks["rss_from"] = now

    started = time.perf_counter()
    async with CairnClient(settings, "bench") as client:
        end = await client.run(new_event(arrived, source="/bench"), timeout=timeout, on_event=mark)
    tuned = next((e.data for e in end.events if e.type == TuningCompleted.EVENT_TYPE), None)
    counts: dict[str, int] = {}
    for e in end.events:
        counts[e.type] = counts.get(e.type, 0) + 1
    return {
        "started": started,
        "marks": marks,
        "terminal": end.events[-1].type,
        "tuned": tuned,
        "counts": counts,
    }


def report(
    args: argparse.Namespace, sampler: Sampler, run: dict[str, Any], bench_cpu_s: float
) -> dict[str, Any]:
    marks, started = run["marks"], run["started"]
    phase_start = marks.get("first:cairn.trial.requested.v1", started)
    phase_end = marks.get("last:cairn.trial.completed.v1", time.perf_counter())
    trials = run["counts"].get("cairn.trial.completed.v1", 0)
    first, last = sampler.at(phase_start), sampler.at(phase_end)
    names = sorted(set(first) & set(last))
    cpu_ms = {n: 1000 * (last[n][1] - first[n][1]) / max(trials, 1) for n in names}
    phase_s = phase_end - phase_start
    # Growth per 1,000 trials from 10 % into the trial phase (the Dask workers have imported their
    # libraries and loaded the table by then) to its end: what a bigger study would add.
    warm = sampler.at(phase_start + 0.1 * (phase_end - phase_start))
    names = [n for n in names if n in warm]
    growth = {n: (last[n][0] - warm[n][0]) / MB / max(0.9 * trials, 1) * 1000 for n in names}
    # The issue's own figure: each process's RSS at the end over its RSS at trial `--rss-from`.
    settled = sampler.at(marks["rss_from"]) if "rss_from" in marks else None
    rss_end_over_from = {n: last[n][0] / settled[n][0] for n in names if settled and n in settled}
    busiest = max(cpu_ms, key=lambda n: cpu_ms[n]) if cpu_ms else None
    tuned = run["tuned"]
    return rounded(
        {
            "machine": f"{os.cpu_count()} cores",
            "trials": args.trials,
            "rows": args.rows,
            "trial_concurrency": args.trial_concurrency or "default (2 x Dask workers)",
            "terminal": run["terminal"],
            "trials_completed": trials,
            "trials_per_s": trials / phase_s if phase_s > 0 else None,
            "trial_phase_s": phase_s,
            "end_to_end_s": marks.get(f"last:{run['terminal']}", phase_end) - started,
            "to_first_trial_request_s": phase_start - started,
            "after_last_trial_s": marks.get(f"last:{run['terminal']}", phase_end) - phase_end,
            "tuning_completed": None
            if tuned is None
            else {"trials_completed": tuned.trials_completed, "trials_failed": tuned.trials_failed},
            "cpu_ms_per_trial": {**cpu_ms, "total": sum(cpu_ms.values())},
            "busiest_process": busiest,
            "cpu_busy_fraction_of_one_core": {n: cpu_ms[n] * trials / 1000 / phase_s for n in names}
            if phase_s > 0
            else {},
            "rss_mb_trial_phase_start": {n: first[n][0] / MB for n in names},
            "rss_mb_10pct_into_trial_phase": {n: warm[n][0] / MB for n in names},
            "rss_mb_trial_phase_end": {n: last[n][0] / MB for n in names},
            "rss_mb_growth_per_1000_trials": growth,
            f"rss_end_over_rss_at_trial_{args.rss_from}": rss_end_over_from,
            "services_rss_end_over_from_max": max(
                (v for n, v in rss_end_over_from.items() if n != "nats-server" and not n.startswith("dask")),
                default=None,
            ),
            "peak_rss_mb": sampler.peak_rss_mb(),
            "bench_client_cpu_ms_per_trial": 1000 * bench_cpu_s / max(trials, 1),
            "event_counts": run["counts"],
            "samples": len(sampler.samples),
        },
        3,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=2_000)
    parser.add_argument("--budget", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between psutil samples")
    parser.add_argument(
        "--trial-concurrency", type=int, default=None, help="trials in flight per training replica"
    )
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds to wait for the run's end")
    parser.add_argument(
        "--rss-from", type=int, default=2000, help="the trial whose RSS the end's is compared with"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args()
    settings, server, csv = scratch_system(
        "cairn-scale-", args.rows, trial_concurrency=args.trial_concurrency
    )
    spec = TuningSpec(
        strategy=SearchStrategy.random,
        trials=args.trials,
        families=[ModelFamily.linear],
        max_budget=args.budget,
    )
    arrived = DataArrived(uri=csv.as_uri(), target="y", model_name="scale", tuning=spec)
    try:
        runtime = supervisor.up(settings)
        assert not supervisor.wait_ready(runtime, 180), "system not ready"
        pids = {**runtime["pids"], "nats-server": server.process.pid}
        me = psutil.Process()
        cpu0 = sum(me.cpu_times()[:2])
        with Sampler(pids, args.interval) as sampler:
            run = asyncio.run(study(settings, arrived, args.timeout, args.rss_from))
        result = report(args, sampler, run, sum(me.cpu_times()[:2]) - cpu0)
    finally:
        supervisor.down(settings)
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
