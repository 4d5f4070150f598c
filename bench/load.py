"""Load: a burst of data arrivals through the whole pipeline, and a flood of trial requests straight
to the training service, against real processes (nats-server, every service, MLflow on SQLite, a
Dask LocalCluster). Reports throughput, arrival->terminal latency percentiles (stream timestamps,
so one clock), the lineage lag (each event's stream timestamp to the first poll that finds it in the
lineage store; target p99 <= 2 s) and the resident memory of every process before and after.

    .venv/bin/python bench/load.py [--arrivals 200] [--trials 1000] [--out bench/results/load.json]

The system, the stream reader and the workloads live in `harness/`, which the tests share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from contracts import dead_letter_subject
from services.platform.bus.connection import connect
from services.platform.bus.embedded import EmbeddedNats
from services.platform.settings import CairnSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.system import start_system  # noqa: E402
from harness.workloads import GIB, burst, percentiles, trial_flood  # noqa: E402


async def publish_cost(home: Path, sync_interval: str, n: int) -> dict[str, Any]:
    """n events of ~1 KB published one after another, each waiting for its PubAck."""
    server = EmbeddedNats(home / f"nats-{sync_interval}", sync_interval=sync_interval)
    server.start()
    try:
        settings = CairnSettings(home=home, nats_url=server.url)
        nc = await connect(settings, "bench")
        from services.platform.bus.provision import provision

        await provision(nc.jetstream(), settings)
        js = nc.jetstream()
        body = b'{"pad": "' + b"x" * 1000 + b'"}'
        times = []
        started = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await js.publish(dead_letter_subject("bench"), body, headers={"Nats-Msg-Id": f"fsync-{i}"})
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
