"""Where a server's time goes under load: py-spy samples its process tree, this sums the stacks.

py-spy is not a dependency: install it anywhere (`python -m venv /tmp/py-spy && /tmp/py-spy/bin/pip
install py-spy`) and give bench/serve.py its path with `--py-spy`. It keeps only the samples of
threads the OS shows running (idle threads, waiting in epoll or on the predict queue, are left
out), so the shares below are shares of the server's busy time. It pauses the process for each
sample (100 a second): `--nonblocking` would not, but then py-spy guesses which threads are idle,
and counts a thread waiting on a queue as busy (benfred/py-spy#480), which misleads here.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


class Profiler:
    """py-spy recording the process tree of `pid` until stopped."""

    def __init__(self, py_spy: Path, pid: int, out: Path, rate: int = 100):
        self.out = out
        self.proc = subprocess.Popen(
            [str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--native", "--rate", str(rate),
             "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> dict[str, object]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode()[-2000:]}")
        return summary(self.out.read_text())


def short(frame: str) -> str:
    """'predict (services/serving/v1.py:30)' -> 'services/serving/v1.py:predict', package paths cut
    at site-packages so that the names read the same on every machine."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for cut in ("site-packages/", "/lib/python3", "/work/main/"):
        if cut in path:
            path = path.split(cut, 1)[1]
    return f"{path}:{m['func']}"


def stacks(collapsed: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) format: 'frame;frame;...;leaf count' per line, root first; the
    first frame names the process and thread, which we drop."""
    out = []
    for line in collapsed.splitlines():
        head, _, count = line.rpartition(" ")
        if not head or not count.isdigit():
            continue
        frames = [short(f) for f in head.split(";")]
        out.append((frames[1:] if frames and frames[0].startswith("process") else frames, int(count)))
    return out


# Samples of threads that wait rather than run (py-spy cannot tell them from busy ones on this
# kernel: benfred/py-spy#480): found by their native frames.
WAITING = {
    "idle: the loop waiting for sockets (epoll)": ("epoll_wait", "epoll_pwait"),
    "idle: the predict thread waiting for a batch": ("PyThread_acquire_lock_timed", "SimpleQueue_get"),
    "waiting for the GIL": ("pthread_cond_timedwait", "pthread_cond_wait"),
    "idle: the keeper of the workers": ("multiprocessing/connection.py",),
}
# What a busy sample's time was for: the first rule (in this order) that a frame matches, Python
# frames read from the leaf up, then native ones, so that json inside xgboost counts as predict, a
# socket write under the wire server's answer as HTTP; only the frames above the event loop count
# (what started it does not), and a sample in none of these is the loop's own.
BUCKETS = [
    ("predict (xgboost inplace_predict)", ("xgboost/", "libxgboost")),
    ("feature matrix (logic.features, TableReader)",
     ("serving/logic.py:features", "serving/logic.py:TableReader", "serving/logic.py:_shaped_columns",
      "serving/json_columns.py")),
    ("read the request (body, JSON, check rows)",
     ("serving/logic.py:v2_rows", "serving/logic.py:checked_rows", "serving/binary_tensors.py",
      "serving/intake.py:Intake.rows", "serving/intake.py:Intake.read_body",
      "serving/intake.py:Intake.parse_json", "serving/grpc_tensors.py:request_doc")),
    ("write the answer (outputs, JSON/protobuf)",
     ("serving/logic.py:v2_outputs", "serving/logic.py:present", "serving/intake.py:json_response",
      "serving/grpc_tensors.py:response", "serving/binary_tensors.py:response_body")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("request id, records", ("serving/records.py", "uuid.py")),
    ("micro-batcher (queue, gather)", ("serving/batching.py:MicroBatcher",)),
    ("predict thread handoff (executor, futures)", ("concurrent/futures/", "threading.py")),
    ("gRPC server (grpc.aio)", ("grpc/", "cygrpc", "serving/grpc_server.py")),
    ("routing, middleware (starlette)", ("starlette/",)),
    ("HTTP protocol (serving.wire, httptools)", ("serving/wire.py", "uvicorn/", "httptools", "llhttp")),
    ("route handler (v1/v2, own lines)", ("serving/v1.py", "serving/v2.py", "serving/intake.py")),
    ("event loop (uvloop, asyncio)", ("asyncio/", "loop.c", "uvloop", "libuv")),
]  # fmt: skip


def bucket(frames: list[str]) -> str:
    for name, patterns in WAITING.items():
        if any(p in f for f in frames for p in patterns):
            return name
    if any("gc_collect" in f for f in frames):  # set off by whichever allocation comes when it is due
        return "garbage collection (gc)"
    loop = [i for i, f in enumerate(frames) if f.startswith("asyncio/runners.py")]
    above = frames[loop[-1] + 1 :] if loop else frames  # what the loop runs, not what started it
    python = [f for f in above if ".py:" in f]  # Python frames first: a write() is its caller's
    for frame in [*reversed(python), *reversed(above)]:
        for name, patterns in BUCKETS:
            if any(p in frame for p in patterns):
                return name
    return "event loop (uvloop, asyncio)" if loop else "other"


def summary(collapsed: str, top: int = 30) -> dict[str, object]:
    """Where the samples went: waiting (idle, GIL) as shares of all samples; the busy ones per
    bucket and per Python function's own lines (the deepest .py frame), as shares of busy samples."""
    waiting, busy, own = Counter(), Counter(), Counter()
    for frames, count in stacks(collapsed):
        name = bucket(frames)
        if name in WAITING:
            waiting[name] += count
            continue
        busy[name] += count
        python = [f for f in frames if ".py:" in f]
        own[python[-1] if python else "(native only)"] += count
    total, busy_total = sum(waiting.values()) + sum(busy.values()), sum(busy.values())

    def shares(counter: Counter, of: int, n: int | None = None) -> list[tuple[str, float]]:
        return [(name, round(100 * c / max(of, 1), 1)) for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "busy_samples": busy_total,
        "waiting_pct_of_all": shares(waiting, total),
        "buckets_pct_of_busy": shares(busy, busy_total),
        "python_self_pct_of_busy": shares(own, busy_total, top),
    }
