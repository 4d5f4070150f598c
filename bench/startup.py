"""Start-up as an operator sees it: `cairn up` on a fresh home until it prints "cairn is up", then
SIGTERM until every child has exited; and the import time of each service on its own (what one
replica pays before it can connect).

Every figure is a median over --repeats runs with its spread (bench/repeat.py). No baseline ratio:
these are figures to follow over time, not targets.

    .venv/bin/python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.repeat import rounded, spread  # noqa: E402
from services.tools.catalog import SERVICES  # noqa: E402

CAIRN = str(Path(sys.executable).with_name("cairn"))


def up_and_stop() -> tuple[float, float]:
    """Seconds to "cairn is up", and from SIGTERM until the whole process tree is gone."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
        env.update(CAIRN_HOME=f"{tmp}/home", CAIRN_SERVE_PORT="0")
        began = time.monotonic()
        proc = subprocess.Popen(
            [CAIRN, "up", "--timeout", "240"],
            env=env,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("cairn is up"):
                break
        else:
            raise SystemExit("cairn up exited before it was up")
        up = time.monotonic() - began
        tree = psutil.Process(proc.pid).children(recursive=True)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        psutil.wait_procs(tree, timeout=60)
        return up, time.monotonic() - began


def import_cpu_s(name: str) -> float:
    """CPU seconds of a fresh interpreter that imports one service's module and nothing else."""
    code = f"from services.tools.catalog import service_class; service_class({name!r})"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "startup.json"))
    args = parser.parse_args()
    runs = [up_and_stop() for _ in range(args.repeats)]
    imports = {name: [import_cpu_s(name) for _ in range(args.repeats)] for name in SERVICES}
    result = rounded(
        {
            "repeats": args.repeats,
            "up_s": spread([u for u, _ in runs]),
            "sigterm_to_exit_s": spread([s for _, s in runs]),
            "import_cpu_s": {name: spread(values) for name, values in imports.items()},
        }
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
