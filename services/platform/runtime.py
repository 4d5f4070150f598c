"""Run one service: broker, its durable consumers, heavy clients, and health/metrics over HTTP.

A service is a `Service` subclass that names its routes and builds its clients in `lifespan`
(never at import), yielding them as one typed context. `ServiceRunner` wires it to the bus and
opens everything on one `AsyncExitStack`, so a start that fails half-way closes what it opened;
the same runner backs `cairn run`, `cairn up` and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import uvicorn
from faststream.exceptions import IncorrectState
from faststream.nats import NatsBroker
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from contracts import Envelope
from contracts.types import Contract
from services.platform.artifact_policy import foreign_artifacts, store_root
from services.platform.artifacts import IntegrityError
from services.platform.bus.availability import wait_for_stream
from services.platform.bus.connection import make_broker
from services.platform.bus.consumer import EventConsumer, Handler, durable_name, subscribe
from services.platform.bus.ledger import HandledLedger
from services.platform.bus.metrics import ServiceMetrics
from services.platform.bus.publisher import EventPublisher
from services.platform.bus.pull import PullLoop
from services.platform.cache import StepCache, StepVersion
from services.platform.http_server import QuietServer
from services.platform.settings import CairnSettings
from services.platform.step_cache import behind_cache

log = logging.getLogger(__name__)

C = TypeVar("C")


@dataclass(frozen=True)
class Route:
    """One consumed event type and the handler for it.

    `handler_timeout_s` bounds one attempt (default CAIRN_HANDLER_TIMEOUT_S): past it the attempt
    fails and is retried, so a hung step cannot hold its message forever.
    """

    payload_cls: type[Contract]
    handler: Handler
    max_workers: int = 1
    ack_wait_s: float | None = None
    handler_timeout_s: float | None = None
    # Content-keyed cache (services.platform.cache): what the step computes with, and the input event's
    # parts that determine its output as JSON (None: this input is not cacheable). `cache_store`
    # False: the step keeps its own result later (tuning keeps a study's end, not its plan).
    cache_version: StepVersion | None = None
    cache_inputs: Callable[[Envelope[Any]], Any] | None = None
    cache_store: bool = True


class Service(Generic[C]):
    """Base of every service: subclasses set `name`, define `routes`, build clients in `lifespan`.

    Handlers read the clients from `context` (typed `C`): it exists only while the service runs.
    """

    name: str = ""

    def __init__(self, settings: CairnSettings):
        self.settings = settings
        self.publisher: EventPublisher | None = None
        self.metrics = ServiceMetrics(self.name)
        self.source = f"/cairn/{self.name}"
        self.cache: StepCache | None = None  # set by the runner: its KV handle needs the broker
        self._context: C | None = None

    @property
    def context(self) -> C:
        if self._context is None:
            raise RuntimeError(f"{self.name} has no context: not running, or its lifespan opens no clients")
        return self._context

    def routes(self) -> Sequence[Route]:
        raise NotImplementedError

    def subscribe_extra(self, broker: NatsBroker) -> None:
        """Subscriptions outside the typed-route policy (lineage reads raw messages in order)."""

    def extra_durables(self) -> list[str]:
        """Durable consumers made by `subscribe_extra`, so readiness and status check them too."""
        return []

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[C]:
        """Open heavy clients (MLflow, Dask) after the bus is known, before consuming; yield them.

        Open each on an `AsyncExitStack` so a failure half-way still closes the ones already open.
        """
        yield None  # type: ignore[misc]  # a service without clients has no context

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[C]:
        """`lifespan`, with its context readable by the handlers until it closes."""
        async with self.lifespan() as context:
            self._context = context
            try:
                yield context
            finally:
                self._context = None

    async def attach(self, broker: NatsBroker) -> None:
        """After the broker connected: work on its connection outside FastStream (lineage's pull loop)."""

    async def detach(self) -> None:
        """Before the broker closes: end what `attach` started, so it finishes on an open connection."""

    def reconnected(self) -> None:
        """The broker's connection is back (perhaps to a restarted server): renew what `attach` asked
        the server for."""


STOP_PING_S = 0.5  # a server that answers no PING within this at stop is not drained


async def within(step: Awaitable[Any], seconds: float) -> Any:
    """`step`'s result if it ends within `seconds`, else TimeoutError once it is cancelled.

    Unlike `asyncio.wait_for`, a step that swallows the first cancel is cancelled again: nats-py's
    drain ignores a cancel while it waits for its subscriptions, then flushes for up to 10 s more
    in a `finally`, and `wait_for` waited for all of it."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        return task.result()
    for _ in range(5):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            break
    raise TimeoutError(f"did not finish within {seconds:.1f} s")


class ServiceRunner:
    def __init__(self, service: Service):
        self.service = service
        self.settings = service.settings
        self.broker: NatsBroker = make_broker(self.settings, service.name, reconnected_cb=self._reconnected)
        self.service.publisher = EventPublisher(self.broker, self.settings)
        self.ledger = HandledLedger(self.broker, self.settings, service.name, self.service.publisher)
        self.durables: list[str] = []
        self.loops: list[PullLoop] = []
        self._http: QuietServer | None = None
        self._http_task: asyncio.Task[Any] | None = None
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "not started")
        self.http_port: int | None = None
        self._opened = contextlib.AsyncExitStack()
        self._stop_deadline: float | None = None
        self.service.cache = StepCache(lambda: self.broker.config.connection_state.stream, self.settings)
        artifact_root = store_root(self.settings)
        for route in service.routes():
            consumer = EventConsumer(
                service=service.name,
                payload_cls=route.payload_cls,
                handler=behind_cache(
                    route.handler,
                    route.cache_version,
                    route.cache_inputs,
                    route.cache_store,
                    cache=self.service.cache,
                    service=service.name,
                    source=service.source,
                    metrics=service.metrics,
                ),
                settings=self.settings,
                publisher=self.service.publisher,
                metrics=service.metrics,
                ledger=self.ledger,
                ack_wait_s=route.ack_wait_s,
                handler_timeout_s=route.handler_timeout_s,
                input_check=functools.partial(foreign_artifacts, root=artifact_root),
                permanent=(IntegrityError,),
            )
            self.loops.append(subscribe(self.broker, consumer, max_workers=route.max_workers))
            self.durables.append(durable_name(service.name, route.payload_cls, self.settings.namespace))
        service.subscribe_extra(self.broker)
        self.durables.extend(service.extra_durables())

    async def _reconnected(self) -> None:
        """A restarted server has forgotten every pull request waiting on it: ask again at once
        rather than when the long polls expire."""
        for loop in self.loops:
            loop.wake()
        self.service.reconnected()

    async def start(self) -> None:
        """Open the service, the broker, `attach` and HTTP in order; a failure (or a cancel) closes
        what had opened, in reverse, before it propagates."""
        with contextlib.suppress(OSError):  # a fresh home; read-only file systems keep state elsewhere
            self.settings.home_dir.mkdir(parents=True, exist_ok=True)
        await wait_for_stream(self.settings, self.service.name)
        async with contextlib.AsyncExitStack() as opened:
            await opened.enter_async_context(self.service.running())
            opened.push_async_callback(self._stop_broker)
            await self.broker.start()
            opened.push_async_callback(self._on_the_bus, self.service.detach, "detach")
            await self.service.attach(self.broker)
            state = self.broker.config.connection_state
            for loop in self.loops:
                opened.push_async_callback(self._on_the_bus, loop.stop, "a pull loop's stop")
                await loop.start(state.stream, state.connection)
            if self.settings.http_port is not None:
                opened.push_async_callback(self._stop_http)
                await self._start_http(self.settings.http_port)
            self._opened = opened.pop_all()
        log.info("%s consuming %s", self.service.name, ", ".join(self.durables))

    async def stop(self) -> None:
        """Close what `start` opened (nothing, if it never finished: it closed its own).

        What needs the bus gets CAIRN_STOP_TIMEOUT_S in all; past it the connection is closed
        without draining and the messages in flight are left for redelivery. So a stop never waits
        on a server that is gone, reconnecting, or cut off by a partition (where the connection
        looks alive and nothing answers: a drain waited for its 30 s timeout, then a flush for
        another 10 s, and the process exited with an error)."""
        self._stop_deadline = time.monotonic() + self.settings.stop_timeout_s
        await self._opened.aclose()

    def _stop_budget(self) -> float:
        """Seconds left for the bus at stop (a whole budget when `start` itself is unwinding)."""
        if self._stop_deadline is None:
            return self.settings.stop_timeout_s
        return max(self._stop_deadline - time.monotonic(), 0.1)

    async def _on_the_bus(self, step: Callable[[], Any], what: str) -> None:
        """A stop step that talks to NATS, within the stop budget; past it, or failing, it is left."""
        try:
            await within(step(), self._stop_budget())
        except (TimeoutError, NatsError) as exc:
            name = self.service.name
            log.warning("%s: %s did not finish at stop (%r); left for redelivery", name, what, exc)

    async def _stop_broker(self) -> None:
        """Drain the connection within the stop budget; otherwise close it without draining. nats-py
        refuses to drain a connection that is reconnecting (ConnectionReconnectingError), which left
        its reconnect loop running: the process then hung on its way out, waiting for that loop to
        end (seen when a SIGKILLed `cairn up` took the embedded server down with the services)."""
        connection = None
        with contextlib.suppress(IncorrectState):  # never connected
            connection = self.broker.config.connection_state.connection
        try:
            if connection is not None and connection.is_connected:
                # A PING first: a server that does not answer it in half a second (gone unnoticed,
                # or cut off by a partition) will not let a drain finish either.
                await connection.flush(timeout=min(STOP_PING_S, self._stop_budget()))
            await within(self.broker.stop(), self._stop_budget())
            return
        except (TimeoutError, NatsError) as exc:
            name = self.service.name
            log.warning("%s: NATS did not drain at stop (%r); connection closed without draining", name, exc)
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(TimeoutError, NatsError):
                await within(connection.close(), 1.0)

    async def _stop_http(self) -> None:
        if self._http is not None:
            self._http.exit()
            if self._http_task:
                await self._http_task

    async def run_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopped_by(sig: signal.Signals) -> None:
            # Said in the log, so a service that ended without being asked to is told apart from
            # one that was (by whom is not known here: a pid signalled twice is the usual suspect).
            if not stop.is_set():  # uvicorn raises a signal it caught again once it has stopped
                log.info("%s: %s received; stopping", self.service.name, sig.name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped_by, sig)
        # A start can wait a long time (for NATS, for `cairn provision`): a signal must end it too.
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # the start closes what it had opened
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        stopping.cancel()
        starting.result()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # Health -------------------------------------------------------------------------------
    async def readiness(self) -> tuple[bool, str]:
        """Ready = connected to NATS and every durable consumer exists on the stream."""
        now = time.monotonic()
        if now - self._ready_cache[0] < 1.0:
            return self._ready_cache[1], self._ready_cache[2]
        ok, why = await self._check_ready()
        self._ready_cache = (now, ok, why)
        self.service.metrics.ready.labels(self.service.name).set(1 if ok else 0)
        return ok, why

    async def _check_ready(self) -> tuple[bool, str]:
        connection = self.broker.config.connection_state.connection
        if connection is None or not connection.is_connected:
            return False, "not connected to NATS"
        js = self.broker.config.connection_state.stream
        pending = 0
        for durable in self.durables:
            try:
                info = await js.consumer_info(self.settings.stream, durable, timeout=2)
            except NotFoundError:
                return False, f"consumer {durable} not bound"
            except Exception as exc:  # noqa: BLE001
                return False, f"consumer {durable}: {type(exc).__name__}"
            pending += info.num_pending or 0
            self.service.metrics.consumer_pending.labels(self.service.name, durable).set(
                info.num_pending or 0
            )
        return True, f"{len(self.durables)} consumers bound, {pending} pending"

    def http_app(self) -> Starlette:
        async def healthz(_: Request) -> Response:
            return JSONResponse({"service": self.service.name, "alive": True})

        async def readyz(_: Request) -> Response:
            ok, why = await self.readiness()
            return JSONResponse(
                {"service": self.service.name, "ready": ok, "detail": why}, 200 if ok else 503
            )

        async def metrics(_: Request) -> Response:
            await self.readiness()
            return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return Starlette(
            routes=[
                HttpRoute("/healthz", healthz),
                HttpRoute("/readyz", readyz),
                HttpRoute("/metrics", metrics),
            ]
        )

    async def _start_http(self, port: int) -> None:
        config = uvicorn.Config(
            self.http_app(), host=self.settings.health_host, port=port, log_level="warning", lifespan="off"
        )
        self._http = QuietServer(config)
        self._http.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)
        with contextlib.suppress(Exception):
            self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
