"""The step cache and gc, measured: a resubmission of the diamonds table with the cache on vs off,
and the artifact store's size before and after `cairn gc` on 20 runs.

The diamonds table is generated here with the shape and columns of the classic one (53,940 rows:
carat, cut, color, clarity, depth, table, x, y, z -> price): no data set is downloaded. One system
(every service its own process) serves all of it. Part 1: a first submission computes (cold),
the same file again is served from the cache, and once more with `nocache` (what `cairn submit
--no-cache` sends) computes again; wall time from publish to deployment and the CPU seconds of
every cairn process (Dask workers included) for each. Part 2: 20 tiny runs of one model, then
`cairn gc --grace 0` with the default retention (current + 3 past champions, last 5 runs).

    .venv/bin/python bench/cache.py [--rows 53940] [--trials 8] [--budget 60] [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec, new_event  # noqa: E402
from harness.system import start_system  # noqa: E402
from harness.workloads import tiny_csv, tiny_spec  # noqa: E402
from services.platform.artifacts import ArtifactStore  # noqa: E402
from services.platform.cache import NO_CACHE  # noqa: E402
from services.tools.client import Client  # noqa: E402

CAIRN = str(Path(sys.executable).with_name("cairn"))


def diamonds(path: Path, rows: int, seed: int = 0) -> Path:
    """A table with the diamonds schema and a price that depends on carat, cut, color and clarity."""
    rng = np.random.default_rng(seed)
    cuts = np.array(["Fair", "Good", "Very Good", "Premium", "Ideal"])
    colors = np.array(list("DEFGHIJ"))
    clarities = np.array(["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"])
    carat = np.round(rng.gamma(2.0, 0.4, rows) + 0.2, 2)
    cut, color, clarity = rng.integers(0, 5, rows), rng.integers(0, 7, rows), rng.integers(0, 8, rows)
    depth = np.round(rng.normal(61.75, 1.4, rows), 1)
    table = np.round(rng.normal(57.5, 2.2, rows), 1)
    x = np.round(6.5 * carat ** (1 / 3), 2)
    y, z = np.round(x * rng.normal(1.0, 0.01, rows), 2), np.round(x * 0.618, 2)
    price = np.round(
        3900
        * carat**1.7
        * (1 + 0.05 * cut)
        * (1 - 0.04 * color)
        * (1 + 0.06 * clarity)
        * rng.lognormal(0, 0.1, rows)
    )
    lines = ["carat,cut,color,clarity,depth,table,price,x,y,z"] + [
        f"{c},{cuts[a]},{colors[b]},{clarities[d]},{e},{t},{int(p)},{u},{v},{w}"
        for c, a, b, d, e, t, p, u, v, w in zip(
            carat, cut, color, clarity, depth, table, price, x, y, z, strict=True
        )
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def cpu_seconds(pids: dict[str, int]) -> float:
    """CPU (user + system) of every cairn process and its children (training's Dask workers)."""
    total = 0.0
    for pid in pids.values():
        try:
            proc = psutil.Process(pid)
            total += sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                try:
                    total += sum(child.cpu_times()[:2])
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            continue
    return total


def store_bytes(url: str) -> tuple[int, int]:
    root = Path(url.removeprefix("file://"))
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


async def submit(
    system: Any, path: Path, spec: TuningSpec, model: str, no_cache: bool = False
) -> dict[str, Any]:
    ref = ArtifactStore(system.settings.artifacts).put_file(path, "text/csv")
    event = new_event(
        DataArrived(
            uri=ref.uri,
            sha256=ref.sha256,
            target="price" if "diamonds" in model else "y",
            model_name=model,
            tuning=spec,
        ),
        source="/bench",
    )
    if no_cache:
        event = event.model_copy(update={NO_CACHE: "true"})
    cpu0, t0 = cpu_seconds(system.pids), time.perf_counter()
    async with Client(system.settings, "bench") as client:
        end = await client.run(event, timeout=1800)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(system.pids) - cpu0
    types = [e.type for e in end.events]
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "outcome": types[-1] if types else None,
        "trials": types.count("cairn.trial.requested.v1"),
        "served_from_cache": sum(1 for e in end.events if (e.model_extra or {}).get("cachedfrom")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=53_940)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    spec = TuningSpec(
        trials=args.trials,
        max_budget=args.budget,
        strategy=SearchStrategy.random,
        families=[ModelFamily.xgboost, ModelFamily.linear],
    )
    with tempfile.TemporaryDirectory(prefix="cairn-bench-cache-") as tmp:
        home = Path(tmp)
        system = start_system(home, serve=False, dask_workers=2)
        try:
            table = diamonds(home / "diamonds.csv", args.rows)
            cache: dict[str, Any] = {"rows": args.rows, "trials": args.trials, "budget": args.budget}
            cache["first (cold)"] = asyncio.run(submit(system, table, spec, "diamonds"))
            cache["resubmission, cache on"] = asyncio.run(submit(system, table, spec, "diamonds"))
            cache["resubmission, --no-cache"] = asyncio.run(submit(system, table, spec, "diamonds", True))
            print(json.dumps({"cache": cache}, indent=2), flush=True)

            before = store_bytes(system.settings.artifacts)
            for i in range(args.runs):
                asyncio.run(submit(system, tiny_csv(home, i, rows=200), tiny_spec(), "gcbench"))
            grown = store_bytes(system.settings.artifacts)
            env = {**os.environ, **system.env, "CAIRN_HOME": str(system.settings.home_dir)}
            t0 = time.perf_counter()
            done = subprocess.run(
                [CAIRN, "gc", "--grace", "0"], env=env, capture_output=True, text=True, check=False
            )
            gc_wall = time.perf_counter() - t0
            after = store_bytes(system.settings.artifacts)
            print(
                json.dumps(
                    {
                        "gc": {
                            "runs": args.runs + 3,
                            "store before the 20 runs": {"bytes": before[0], "files": before[1]},
                            "store before gc": {"bytes": grown[0], "files": grown[1]},
                            "store after gc": {"bytes": after[0], "files": after[1]},
                            "gc says": done.stdout.strip().splitlines()[-1:] or done.stderr.strip()[-300:],
                            "gc wall_s": round(gc_wall, 2),
                        }
                    },
                    indent=2,
                ),
                flush=True,
            )
        finally:
            system.stop()


if __name__ == "__main__":
    main()
