"""Starting the endpoint: one process, or several worker processes sharing one port.

Several workers: uvicorn binds the port once and starts each worker with the app factory
(`services.serving.app:create_app`); each loads the champions and watches deployments by
itself. Their metrics go to prometheus_client's multiprocess files so /metrics, whichever worker
answers, counts every worker's requests. With CAIRN_SERVE_GRPC_PORT, every worker serves gRPC
on that one port too (SO_REUSEPORT), on the bind address given here.
"""

from __future__ import annotations

import os
import shutil
import socket
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


def check_grpc_port(host: str, port: int) -> None:
    """Refuse to start when the gRPC port is taken: a worker that cannot bind it fails its start,
    and uvicorn would start it again and again."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(
                f"port {port} on {host} is in use or not ours ({exc.strerror}): set CAIRN_SERVE_GRPC_PORT to "
                "a free port, or 0 for no gRPC"
            ) from None


def run_endpoint(settings: CairnSettings, host: str, port: int) -> None:
    import uvicorn

    settings = settings.model_copy(update={"serve_host": host})  # gRPC binds where HTTP does
    if settings.serve_grpc_port:
        check_grpc_port(host, settings.serve_grpc_port)
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
