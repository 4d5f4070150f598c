"""bench/summary.py: the issue's figures read from the benches' results, each judged against its
target (pure: results written here, nothing measured)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.summary import rows


def spread(median: float) -> dict[str, float]:
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "spread": 0.2, "n": 3}


def test_each_figure_is_judged_against_its_target_and_a_missing_bench_is_named(tmp_path: Path):
    (tmp_path / "bus.json").write_text(json.dumps({
        "bus_vs_raw_pipelined": spread(0.75),
        "bus_p99_ms": spread(30.0),
        "raw_pipelined_p99_ms": spread(10.0),
    }))
    (tmp_path / "shell_80.json").write_text(json.dumps({
        "service_cpu_ms_per_trial": spread(12.0),
        "direct_dask_client_scheduler_cpu_ms_per_trial": spread(10.0),
        "trial_phase_overhead_vs_direct": spread(0.04),
        "speedup_1_to_2_workers": spread(1.5),
        "machine_speedup_1_to_2_processes": 1.9,
        "machine_python_loops_per_s": 2.2e7,
    }))
    met = {figure: ok for figure, _, _, ok in rows(tmp_path)}
    assert met["bus hop: cairn / raw pipelined nats-py, events/s"] == "yes"
    assert met["bus p99: cairn / raw (medians)"] == "NO"  # 3x raw's
    assert met["cost of a trial: cairn / Dask's own (medians)"] == "yes"  # 1.2x
    assert met["trial phase over the same trials straight to Dask"] == "yes"
    assert met["scaling: speedup / ceiling"] == "NO"  # 1.5 / 1.9
    table = {figure: value for figure, value, _, _ in rows(tmp_path)}
    assert table["bus hop: cairn / raw pipelined nats-py, events/s"] == "0.75 [0.68-0.83] (n=3)"
    assert table["study against Optuna (bench/study_peers.py)"] == "not run"
    assert table["many trials (bench/scale.py)"] == "not run"
