"""The throughput figures of `make bench` in one table: each with its spread, its target and
whether this run met it, and the machine's speed beside them.

It reads what the benches wrote to bench/results/ (bus.json, shell_80.json, study_peers.json,
scale.json) and measures nothing itself; a bench that did not run is named as missing. Every ratio
was measured against its baseline in the same run, interleaved, by the bench that wrote it.

    .venv/bin/python bench/summary.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def spread_text(s: Any, digits: int = 2) -> str:
    """'median [min-max]' of a bench/repeat.py spread, or the bare value."""
    if isinstance(s, dict) and "median" in s:
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}] (n={s['n']})"
    return "-" if s is None else f"{s:.{digits}f}"


def median(s: Any) -> float | None:
    return s["median"] if isinstance(s, dict) else s


def rows(results: Path) -> list[tuple[str, str, str, str]]:
    """(figure, value with spread, target, met) for every figure the issue names."""
    out: list[tuple[str, str, str, str]] = []

    def add(figure: str, value: Any, target: str, ok: bool | None, digits: int = 2) -> None:
        met = "-" if ok is None else ("yes" if ok else "NO")
        out.append((figure, spread_text(value, digits), target, met))

    if (bus := load(results, "bus")) is None:
        out.append(("bus hop (bench/bus.py)", "not run", "", ""))
    else:
        ratio = bus["bus_vs_raw_pipelined"]
        add("bus hop: cairn / raw pipelined nats-py, events/s", ratio, ">= 0.7", median(ratio) >= 0.7)
        cairn_p99, raw_p99 = median(bus["bus_p99_ms"]), median(bus["raw_pipelined_p99_ms"])
        add("bus p99 at half raw's rate, ms: cairn", bus["bus_p99_ms"], "", None, 1)
        add("bus p99 at half raw's rate, ms: raw pipelined", bus["raw_pipelined_p99_ms"], "", None, 1)
        add("bus p99: cairn / raw (medians)", cairn_p99 / raw_p99, "<= 2", cairn_p99 / raw_p99 <= 2)
    if (shell := load(results, "shell_80")) is None:
        out.append(("trials (bench/shell_80.py)", "not run", "", ""))
    else:
        cairn_cpu = shell["service_cpu_ms_per_trial"]
        dask_cpu = shell["direct_dask_client_scheduler_cpu_ms_per_trial"]
        add("service CPU per trial, ms (every cairn process, nats-server too)", cairn_cpu, "", None, 1)
        add("Dask's own client and scheduler CPU per trial, ms", dask_cpu, "", None, 1)
        cost = median(cairn_cpu) / median(dask_cpu)
        add("cost of a trial: cairn / Dask's own (medians)", cost, "<= 1.5", cost <= 1.5)
        overhead = shell["trial_phase_overhead_vs_direct"]
        add("trial phase over the same trials straight to Dask", overhead, "<= 0.05",
            median(overhead) <= 0.05, 3)
        ceiling = shell["machine_speedup_1_to_2_processes"]
        scaling = median(shell["speedup_1_to_2_workers"]) / ceiling
        add("workers 1 -> 2 speedup", shell["speedup_1_to_2_workers"], "", None)
        add("machine's own 1 -> 2 ceiling (pure CPU work)", ceiling, "", None)
        add("scaling: speedup / ceiling", scaling, ">= 0.9", scaling >= 0.9)
        speed = shell["machine_python_loops_per_s"] / 1e6
        add("machine speed: one core's Python loops per s (millions)", speed, "", None, 1)
    if (study := load(results, "study_peers")) is None:
        out.append(("study against Optuna (bench/study_peers.py)", "not run", "", ""))
    else:
        ratio = study["ratio_cairn_over_optuna"]
        add("study: cairn arrival -> served, s", study["cairn_arrival_to_served_s"], "", None)
        add("study: Optuna study + refit + holdout, s", study["optuna_study_refit_holdout_s"], "", None)
        add("study wall: cairn / Optuna", ratio, "<= 1", median(ratio) <= 1)
        r2_cairn, r2_peer = study["cairn_holdout_r2"], study["optuna_holdout_r2"]
        add("holdout R2: cairn", r2_cairn, "", None, 4)
        add("holdout R2: Optuna", r2_peer, "", None, 4)
        add("holdout R2: cairn - Optuna (medians)", median(r2_cairn) - median(r2_peer), ">= 0",
            median(r2_cairn) >= median(r2_peer), 4)
    if (scale := load(results, "scale")) is None:
        out.append(("many trials (bench/scale.py)", "not run", "", ""))
    else:
        trials = scale["trials_completed"]
        worst = scale.get("services_rss_end_over_from_max")
        add(f"services' RSS at trial {trials} over trial 2,000 (largest)", worst, "<= 1.10",
            None if worst is None else worst <= 1.10, 3)
        server = next((v for k, v in scale.items() if k.startswith("rss_end_over") and "nats-server" in v),
                      {})
        add("nats-server's (the stream's index grows with it)", server.get("nats-server"), "", None, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    table = rows(args.results)
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    print("figure".ljust(widths[0]), "median [min-max]".ljust(widths[1]), "target".ljust(widths[2]), "met")
    for r in table:
        print(*(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
