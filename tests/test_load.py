"""Load on real processes: a burst of 200 data arrivals (tiny datasets, two linear trials each)
through every service at once. Every arrival must reach a terminal event, none twice, nothing
dead-lettered, and no process may grow without bound. bench/load.py measures the same burst
(and 1,000 trials straight to training) for the figures in docs/RELIABILITY.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.system import start_system
from harness.workloads import GIB, burst

pytestmark = pytest.mark.slow
ARRIVALS = 200
MAX_RSS = int(1.5 * GIB)  # any one process, Dask workers included
MAX_GROWTH = 400 * 2**20  # any one process, from after a warm-up run to after the burst


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    home = tmp_path_factory.mktemp("load")
    system = start_system(home, dask_workers=2)
    yield system
    system.stop()


async def test_burst_of_200_arrivals_all_terminate_once_with_bounded_memory(system):
    warm = await burst(system, 1, timeout=120, prefix="warm-up")  # imports, first writes, first Dask tasks
    assert warm["lost"] == 0
    result = await burst(system, ARRIVALS, timeout=600)
    log = result.pop("log")
    summary = {k: v for k, v in result.items() if not k.startswith("rss")}
    out = Path(__file__).resolve().parents[1] / "bench" / "results" / "test_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {**summary, "rss_before": result["rss_before"], "rss_after": result["rss_after"]}, indent=2
        )
        + "\n"
    )

    assert result["lost"] == 0, summary
    assert set(result["terminal"]) <= {
        "cairn.model.deployed.v1",
        "cairn.model.evaluated.v1",
        "cairn.data.rejected.v1",
        "cairn.event.rejected.v1",
        "cairn.deployment.failed.v1",
    }, summary
    assert result["terminal"].get("cairn.model.deployed.v1") == ARRIVALS, (
        "every tiny model is its own champion"
    )
    assert result["trial_completed_max_per_trial"] == 1 and result["deployed_max_per_run"] == 1, summary
    assert result["dead_letters"] == 0, [
        r.headers for r in log.records if r.subject.startswith("cairn.dlq.")
    ][:3]
    before, after = result["rss_before"], result["rss_after"]
    too_big = {k: v for k, v in after.items() if v > MAX_RSS}
    assert not too_big, too_big
    grew = {k: after[k] - before[k] for k in after if k in before and after[k] - before[k] > MAX_GROWTH}
    assert not grew, grew
    assert set(before) <= set(after) | {k for k in before if "/" in k}, "a service process went away"
