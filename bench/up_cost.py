"""What one `cairn up` costs until every process is ready, and its `cairn down`: CPU seconds of every
process it starts, wall seconds to ready, and the services' memory; forked from the launcher
(CAIRN_PRELOAD=true, the default) against one interpreter per process (false), interleaved rounds.

    .venv/bin/python bench/up_cost.py [--rounds 3]

Each round runs the executable in a fresh temporary home under this process made a child
subreaper, so the detached services are reaped here and counted in RUSAGE_CHILDREN. Memory is
the sum of the services' proportional set size (PSS: a page shared by n processes counts 1/n), read
from /proc/PID/smaps_rollup once all are ready. Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite_cost import PR_SET_CHILD_SUBREAPER, children_cpu, reap_orphans  # noqa: E402

CAIRN = Path(sys.executable).parent / "cairn"


def pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def one_up(preload: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")},
            "CAIRN_HOME": str(Path(tmp) / "home"),
            "CAIRN_SERVE_PORT": "0",
            "CAIRN_PRELOAD": str(preload).lower(),
        }
        before = children_cpu()
        start = time.monotonic()
        up = subprocess.run([str(CAIRN), "up", "--detach"], env=env, capture_output=True, text=True)
        if up.returncode != 0:
            logs = "".join(p.read_text()[-1500:] for p in (Path(tmp) / "home" / "logs").glob("*.log"))
            raise RuntimeError(f"cairn up failed: {up.stdout}{up.stderr}\n{logs}")
        ready = time.monotonic() - start
        runtime = json.loads((Path(tmp) / "home" / "runtime.json").read_text())
        services = [pid for name, pid in runtime["pids"].items() if name != "nats-server"]
        memory = pss_mib(services)
        subprocess.run([str(CAIRN), "down"], env=env, check=True, capture_output=True)
        reap_orphans()
        return {"cpu_s": children_cpu() - before, "ready_s": ready, "pss_mib": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for preload in (False, True):
            result = one_up(preload)
            results[preload].append(result)
            label = "launcher" if preload else "spawn each"
            print(f"round {round_ + 1} {label:>10}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
    print()
    for key in ("cpu_s", "ready_s", "pss_mib"):
        each = statistics.median(r[key] for r in results[False])
        forked = statistics.median(r[key] for r in results[True])
        print(f"{key:>8}: spawn each {each:7.1f}  launcher {forked:7.1f}  ratio {each / forked:.2f}x")


if __name__ == "__main__":
    main()
