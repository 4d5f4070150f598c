"""Starting the endpoint: one process, or several worker processes sharing one port.

Each worker runs services.serving.wire's HTTP server on its own event loop (uvloop when
installed), after loading the champions and starting its deployment watch. One worker serves in
this process and binds once its champions are loaded. Several: this process binds the port, starts
each worker (spawned, so none inherits a half-started event loop) with the listening socket, and
keeps them: a worker that dies is started again; SIGTERM or SIGINT stops them all, each answering
what it holds first. Their metrics go to prometheus_client's multiprocess files so /metrics,
whichever worker answers, counts every worker's requests. With CAIRN_SERVE_GRPC_PORT, every worker
serves gRPC on that one port too (SO_REUSEPORT), on the bind address given here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait

from services.platform import event_loop
from services.platform.settings import CairnSettings

log = logging.getLogger(__name__)

BACKLOG = 2048
RESTART_PAUSE_S = 1.0  # between starts of a worker that keeps dying
STOP_WAIT_S = 15.0  # a worker still there after this (past the wire's grace) is killed


def worker_count(settings: CairnSettings) -> int:
    """CAIRN_SERVE_WORKERS, 0 meaning one per CPU this process may use."""
    if settings.serve_workers:
        return settings.serve_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_grpc_port(host: str, port: int) -> None:
    """Refuse to start when the gRPC port is taken: a worker that cannot bind it fails its start,
    and would be started again and again."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(
                f"port {port} on {host} is in use or not ours ({exc.strerror}): set CAIRN_SERVE_GRPC_PORT to "
                "a free port, or 0 for no gRPC"
            ) from None


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(settings: CairnSettings, sock: socket.socket | None, host: str, port: int) -> None:
    """One worker: champions loaded, then HTTP (and gRPC) until SIGTERM or SIGINT."""
    from services.serving.app import InferenceServer
    from services.serving.wire import WireServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = InferenceServer(settings)
    app = server.app()
    try:
        await server.startup()
        if sock is None:
            sock = listening_socket(host, port)
        wire = WireServer(app, server.inference_handlers(), max_body=settings.max_request_bytes,
                          token=server.token)
        bound = sock.getsockname()
        log.info("the endpoint answers on http://%s:%d (worker %d)", bound[0], bound[1], os.getpid())
        await wire.serve(sock, stop)
    finally:
        await server.shutdown()


def run_worker(sock: socket.socket, keeper: int) -> None:
    """A spawned worker's entry point: its settings from the CAIRN_ environment its keeper set."""
    from services.platform.bus.embedded import tie_to_parent

    tie_to_parent(keeper)  # a keeper killed outright takes its workers along
    settings = CairnSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = sock.getsockname()[:2]
    event_loop.run(serve(settings, sock, host, port))


def run_endpoint(settings: CairnSettings, host: str, port: int) -> None:
    settings = settings.model_copy(update={"serve_host": host})  # gRPC binds where HTTP does
    if settings.serve_grpc_port:
        check_grpc_port(host, settings.serve_grpc_port)
    workers = worker_count(settings)
    if workers == 1:
        event_loop.run(serve(settings, None, host, port))
        return
    metrics_dir = tempfile.mkdtemp(prefix="cairn-serve-metrics-")
    os.environ.update(settings.to_env())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    sock = listening_socket(host, port)
    try:
        Workers(sock, workers).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class Workers:
    """Keeps `count` worker processes on one listening socket until SIGTERM or SIGINT."""

    def __init__(self, sock: socket.socket, count: int):
        self.sock = sock
        self.count = count
        self.context = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.stopping = False

    def start_one(self) -> multiprocessing.process.BaseProcess:
        proc = self.context.Process(target=run_worker, args=(self.sock, os.getpid()), name="cairn-serve")
        proc.start()
        return proc

    def run(self) -> None:
        # A signal wakes the wait below (signal.set_wakeup_fd): SIGTERM or SIGINT to stop, SIGCHLD
        # when a worker ends (its sentinel alone can stay open: a worker's own children inherit it).
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        previous = signal.set_wakeup_fd(wake_w)
        handlers = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        try:
            self.procs = [self.start_one() for _ in range(self.count)]
            while not self.stopping:
                wait([p.sentinel for p in self.procs] + [wake_r])
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                for i, proc in enumerate(self.procs):
                    if not self.stopping and not proc.is_alive():
                        log.warning("worker %d ended (exit %s): starting another", proc.pid, proc.exitcode)
                        time.sleep(RESTART_PAUSE_S)
                        self.procs[i] = self.start_one()
        finally:
            self._end_all()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _end_all(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
