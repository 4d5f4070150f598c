"""What each test module costs: CPU seconds of every process it starts, and its wall time.

`make test` runs modules on two workers, so its wall time is bounded below by the suite's CPU over
two cores; this says where that CPU goes. Each module runs alone (`pytest -p no:xdist`), under this
process made a child subreaper (`PR_SET_CHILD_SUBREAPER`): what a test detaches (a `cairn up
--detach`, a daemonised nats-server) is re-parented here when its parent exits, reaped here, and
counted in RUSAGE_CHILDREN with the rest. Linux only.

    .venv/bin/python bench/suite_cost.py [tests/test_a.py ...]   # default: every tests/test_*.py

Prints one line per module as it finishes, then the modules by CPU and the total. Run it on a
quiet machine for the wall times; CPU seconds move less with load.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36


def cpu_of(proc: Any) -> float:
    """A psutil.Process's CPU seconds so far (0 once it is gone)."""
    import psutil

    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reap_orphans(grace: float = 60.0) -> None:
    """Wait for what the module left behind (re-parented here); kill it after `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                subprocess.run(["pkill", "-KILL", "-P", str(os.getpid())], check=False)
            time.sleep(0.2)


def cost(module: str) -> tuple[float, float, int]:
    """(CPU s, wall s, pytest's exit code) of one module run alone."""
    before, started = children_cpu(), time.monotonic()
    code = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", module],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
    ).returncode  # fmt: skip
    reap_orphans()
    return children_cpu() - before, time.monotonic() - started, code


def main(argv: list[str]) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed: Linux only")
    modules = argv or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    rows = []
    for module in modules:
        cpu, wall, code = cost(module)
        rows.append((cpu, wall, code, module))
        print(f"{cpu:7.1f} s CPU {wall:7.1f} s wall  exit {code}  {module}", flush=True)
    print("\nby CPU:")
    for cpu, wall, code, module in sorted(rows, reverse=True):
        print(f"{cpu:7.1f} {wall:7.1f} {code:3d}  {module}")
    total_cpu, total_wall = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"total: {total_cpu:.0f} s CPU, {total_wall:.0f} s wall run one by one; "
          f"two cores cannot run it in under {total_cpu / 2 / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
