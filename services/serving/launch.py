"""Starting the endpoint: one process, or several worker processes sharing one port.

Several workers: uvicorn binds the port once and starts each worker with the app factory
(`services.serving.app:create_app`); each loads the champions and watches deployments by
itself. Their metrics go to prometheus_client's multiprocess files so /metrics, whichever worker
answers, counts every worker's requests.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from services.platform.settings import CairnSettings


def worker_count(settings: CairnSettings) -> int:
    """CAIRN_SERVE_WORKERS, 0 meaning one per CPU this process may use."""
    if settings.serve_workers:
        return settings.serve_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def uvicorn_options() -> dict:
    """uvloop and httptools when installed (they are dependencies; a bare install falls back)."""
    import importlib.util

    fast = all(importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools"))
    return {"loop": "uvloop", "http": "httptools"} if fast else {}


def run_endpoint(settings: CairnSettings, host: str, port: int) -> None:
    import uvicorn

    workers = worker_count(settings)
    common = {"host": host, "port": port, "log_level": "warning", "limit_concurrency": 256 * workers,
              "access_log": False, **uvicorn_options()}
    if workers == 1:
        from services.platform.http_server import QuietServer
        from services.serving.app import InferenceServer

        # What uvicorn.run does for one worker, with the services' quieter main loop.
        QuietServer(uvicorn.Config(InferenceServer(settings).app(), **common)).run()
        return
    metrics_dir = tempfile.mkdtemp(prefix="cairn-serve-metrics-")
    os.environ.update(settings.to_env())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("services.serving.app:create_app", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
