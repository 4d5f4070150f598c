"""What a tenant costs, and how much one tenant's flood slows another's run (docs/TENANTS.md).

    .venv/bin/python bench/tenants.py [--rounds 2] [--burst 200] [--skip-idle] [--skip-share]

Idle cost: `cairn up --detach` on fresh homes with no tenant but the default and with one more,
interleaved; for each, the seconds to ready, the memory of every process it started (PSS, with
the Dask workers the training services start) and their CPU over 20 idle seconds. The difference is
the price of one extra tenant (one set of services each: docs/TENANTS.md says why).

Fair share: one home with tenants team-a and team-b. team-b's single run (`cairn --tenant team-b
submit ... --wait`, the executable as a user runs it) alone, then while team-a's `--burst` arrivals
(each a run of its own) queue in team-a's account. With two busy tenants on one machine a fair share
is half of it, so the ratio during/alone should stay near 2 or below; it says nothing of a timing
assertion (there is none). Medians of the rounds. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite_cost import cpu_of  # noqa: E402
from contracts import DataArrived, ModelFamily, SearchStrategy, TuningSpec, new_event  # noqa: E402
from harness.stream import publish_all  # noqa: E402
from harness.workloads import tiny_csv  # noqa: E402
from services.platform.bus.connection import connect  # noqa: E402
from services.platform.settings import CairnSettings  # noqa: E402

CAIRN = Path(sys.executable).parent / "cairn"
FAST = ["--trials", "6", "--max-budget", "20", "--strategy", "random", "--families", "xgboost,linear"]
IDLE_S = 20.0


def env_for(root: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")},
        "CAIRN_HOME": str(root / "home"),
        "CAIRN_SERVE_PORT": "0",
        "CAIRN_ALLOWED_ROOTS": json.dumps([str(root / "data")]),
        **extra,
    }


def cairn(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(CAIRN), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"cairn {' '.join(args)}: {done.stdout}{done.stderr}")
    return done


def processes(home: Path) -> list[psutil.Process]:
    """Every process `cairn up` started, with their children (Dask workers, endpoint workers)."""
    runtime = json.loads((home / "runtime.json").read_text())
    out: dict[int, psutil.Process] = {}
    for pid in runtime["pids"].values():
        with_children = [psutil.Process(pid)]
        with_children += with_children[0].children(recursive=True)
        out |= {p.pid: p for p in with_children}
    return list(out.values())


def cpu_s(procs: list[psutil.Process]) -> float:
    return sum(cpu_of(p) for p in procs)


def pss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total / 1024


def idle_round(extra_tenants: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        env = env_for(root)
        for i in range(extra_tenants):
            cairn("tenant", "add", f"team-{i}", env=env)
        started = time.monotonic()
        cairn("up", "--detach", "--timeout", "300", env=env)
        ready = time.monotonic() - started
        try:
            procs = processes(root / "home")
            before = cpu_s(procs)
            time.sleep(IDLE_S)
            idle = (cpu_s(procs) - before) / IDLE_S
            return {
                "ready_s": ready,
                "pss_mib": pss_mib(procs),
                "idle_cpu_pct": 100 * idle,
                "processes": len(procs),
            }
        finally:
            cairn("down", env=env)


def median(rows: list[dict[str, float]], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in rows]
    return statistics.median(values), min(values), max(values)


def idle_cost(rounds: int) -> dict:
    results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    for _ in range(rounds):
        for extra in (0, 1):
            results[extra].append(idle_round(extra))
            print(f"  extra tenants {extra}: {results[extra][-1]}", flush=True)
    out = {}
    for key in ("ready_s", "pss_mib", "idle_cpu_pct", "processes"):
        zero, one = median(results[0], key), median(results[1], key)
        out[key] = {"default only": zero, "one more tenant": one, "extra": one[0] - zero[0]}
    return out


def write_table(path: Path, seed: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(240, 2))
    y = 3 * x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.1, size=240)
    rows = "".join(f"{a:.5f},{b:.5f},{c:.5f}\n" for a, b, c in zip(x[:, 0], x[:, 1], y, strict=True))
    path.write_text("x1,x2,price\n" + rows)
    return path


def b_run(env: dict[str, str], table: Path) -> float:
    started = time.monotonic()
    cairn("submit", str(table), "--target", "price", *FAST, "--wait", env={**env, "CAIRN_TENANT": "team-b"})
    return time.monotonic() - started


async def flood(home: Path, data: Path, n: int) -> None:
    """team-a's burst: n arrivals, each a table of its own and the same study as team-b's run,
    published as team-a's upstream."""
    settings = CairnSettings(home=home, tenant="team-a").with_home_credentials("upstream")
    families = [ModelFamily.xgboost, ModelFamily.linear]
    spec = TuningSpec(trials=6, max_budget=20, strategy=SearchStrategy.random, families=families)
    events = [
        new_event(
            DataArrived(
                uri=tiny_csv(data, i, rows=240).as_uri(),
                target="y",
                model_name=f"flood-{i:04d}",
                seed=i,
                tuning=spec,
            ),
            source="/bench/tenants",
        )
        for i in range(n)
    ]
    await publish_all(settings, events)


def a_events(home: Path) -> int:
    """How many events team-a's log holds: it grows while team-a's runs go on."""

    async def last() -> int:
        settings = CairnSettings(home=home, tenant="team-a").with_home_credentials("reader")
        nc = await connect(settings, "bench-tenants")
        try:
            return (await nc.jetstream().stream_info(settings.stream)).state.last_seq
        finally:
            await nc.close()

    return asyncio.run(last())


def fair_share(rounds: int, burst: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        env = env_for(root)
        for name in ("team-a", "team-b"):
            cairn("tenant", "add", name, "--max-trials-in-flight", "4", env=env)
        cairn("up", "--detach", "--timeout", "300", env=env)
        try:
            b_run(env, write_table(root / "data" / "warm.csv", 99))  # imports and caches warmed in both
            alone = [b_run(env, write_table(root / "data" / f"alone-{i}.csv", i)) for i in range(rounds)]
            print(f"  team-b alone: {[round(a, 2) for a in alone]}", flush=True)
            asyncio.run(flood(root / "home", root / "data", burst))
            during, a_grew = [], []
            for i in range(rounds):
                before = a_events(root / "home")
                during.append(b_run(env, write_table(root / "data" / f"during-{i}.csv", 100 + i)))
                a_grew.append(a_events(root / "home") - before)
            print(f"  team-b during team-a's burst: {[round(d, 2) for d in during]}", flush=True)
            print(f"  team-a's events written meanwhile: {a_grew}", flush=True)
        finally:
            cairn("down", env=env)
    a, d = statistics.median(alone), statistics.median(during)
    return {
        "team-b alone s": (a, min(alone), max(alone)),
        "team-b during team-a's burst s": (d, min(during), max(during)),
        "ratio": d / a,
        "team-a events written during each team-b run": a_grew,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-share", action="store_true")
    args = parser.parse_args()
    report = {"cores": os.cpu_count()}
    if not args.skip_idle:
        print("idle cost of a tenant:", flush=True)
        report["idle"] = idle_cost(args.rounds)
    if not args.skip_share:
        print(f"fair share: team-b's run against team-a's burst of {args.burst}:", flush=True)
        report["share"] = fair_share(args.rounds, args.burst)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
