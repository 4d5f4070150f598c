"""The Python client of a cairn deployment: publish an arrival, follow a run to its end, ask the
inference endpoint.

The one place that knows how to read the log and watch a run: the CLI, replay, the demo, gc, the
benchmarks and the tests use it, and an upstream Python system imports it to publish arrivals (any
other language publishes the JSON Schema'd event itself).

    async with Client(CairnSettings()) as client:
        end = await client.run(new_event(DataArrived(uri=..., target="price"), source="/my/system"))
        print(end.code, end.event.type)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from contracts import (
    Envelope,
    ModelDeployed,
    ModelEvaluated,
    decode,
    ends_run,
    is_dead_letter,
    stream_filter,
    subject_for,
)
from services.platform.bus.availability import publish_when_available
from services.platform.bus.connection import connect
from services.platform.bus.publisher import event_headers
from services.platform.settings import CairnSettings

DEPLOYED, FAILED, NOT_PROMOTED = 0, 1, 3  # also the CLI's exit codes
READ_TIMEOUT_S = 10.0  # for the next message of a log being read to its end
PUBLISH_PATIENCE_S = 30.0  # for a stream between leaders (an election takes seconds)


def outcome(event: Envelope[Any]) -> int | None:
    """How a run ends with this event (DEPLOYED, FAILED, NOT_PROMOTED), or None if it goes on."""
    if not ends_run(event):
        return None
    if isinstance(event.data, ModelDeployed):
        return DEPLOYED
    return NOT_PROMOTED if isinstance(event.data, ModelEvaluated) else FAILED


@dataclass
class RunEnd:
    """A followed run: its terminal event, the exit code it means, and every event of it seen."""

    event: Envelope[Any]
    code: int
    events: list[Envelope[Any]] = field(default_factory=list)


class RunTimeout(TimeoutError):
    def __init__(self, correlation: str, timeout: float, events: list[Envelope[Any]]):
        super().__init__(f"run {correlation} did not end within {timeout:.0f}s ({len(events)} events seen)")
        self.events = events


class EndpointError(RuntimeError):
    """The inference endpoint is unreachable or refused a request; the message says which."""


OnEvent = Callable[[Envelope[Any]], None]


class Client:
    """A connection to one deployment (its NATS and, for predictions, its endpoint)."""

    def __init__(self, settings: CairnSettings, name: str = "client", nc: Any = None, **connect_options: Any):
        """`nc`: a NATS connection already open (the client closes it); else one is opened on entry."""
        self.settings = settings
        self.name = name
        self.connect_options = connect_options
        self.nc: Any = nc

    async def __aenter__(self) -> Client:
        if self.nc is None:
            self.nc = await connect(self.settings, self.name, **self.connect_options)
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    # Publishing and following ---------------------------------------------------------------
    async def publish(
        self,
        event: Envelope[Any],
        patience_s: float = PUBLISH_PATIENCE_S,
        on_wait: Callable[[str], None] | None = None,
    ) -> int:
        """Publish one event; returns its stream sequence. Refused while the stream elects a leader
        (no responders: only a clustered stream's leader listens on its subjects, so a restart, a
        healed partition or a step-down leaves a moment with none) or its PubAck late, it is sent
        again for up to `patience_s`; under its id the stream stores it once. `on_wait` hears each
        new reason for sending again."""
        subject, body = subject_for(event.type, self.settings.namespace), event.encode()
        ack = await publish_when_available(
            self.js, subject, body, event_headers(event), patience_s, on_wait, stream=self.settings.stream
        )
        return ack.seq

    async def watch(self, from_start: bool = False) -> Any:
        """An ordered subscription to the namespace: new events only, or the whole log."""
        from nats.js.api import DeliverPolicy

        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        return await self.js.subscribe(
            stream_filter(self.settings.namespace), ordered_consumer=True, deliver_policy=policy
        )

    async def run(
        self, event: Envelope[Any], timeout: float = 1800.0, on_event: OnEvent | None = None
    ) -> RunEnd:
        """Publish an arrival and follow its run to the end (watching first, so nothing is missed)."""
        sub = await self.watch()
        try:
            await self.publish(event)
            return await self.follow_on(sub, event.correlationid, timeout, on_event)
        finally:
            await sub.unsubscribe()

    async def follow(
        self, correlation: str, timeout: float = 1800.0, on_event: OnEvent | None = None
    ) -> RunEnd:
        """Follow a run already published, from the start of the log."""
        sub = await self.watch(from_start=True)
        try:
            return await self.follow_on(sub, correlation, timeout, on_event)
        finally:
            await sub.unsubscribe()

    async def follow_on(
        self, sub: Any, correlation: str, timeout: float, on_event: OnEvent | None = None
    ) -> RunEnd:
        """Read `sub` until the run's terminal event; `on_event` sees each of the run's events."""
        deadline = time.monotonic() + timeout
        seen: list[Envelope[Any]] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(5.0, max(0.1, left)))
            except TimeoutError:
                continue
            event = _run_event(msg, correlation)
            if event is None:
                continue
            seen.append(event)
            if on_event is not None:
                on_event(event)
            if (code := outcome(event)) is not None:
                return RunEnd(event, code, seen)
        raise RunTimeout(correlation, timeout, seen)

    # Reading the log ------------------------------------------------------------------------
    async def read_log(self, start_seq: int = 1) -> AsyncIterator[Any]:
        """The stream's messages (every namespace, dead letters too) from `start_seq` to the last
        one at the time of the call, in order. An ordered ephemeral consumer reads them: it leaves
        nothing on the server, and asks again for a message lost in flight."""
        from nats.js.api import ConsumerConfig, DeliverPolicy

        state = (await self.js.stream_info(self.settings.stream)).state
        if state.last_seq < max(start_seq, state.first_seq):
            return
        sub = await self.js.subscribe(
            stream_filter(),
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq),
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
                yield msg
                if msg.metadata.sequence.stream >= state.last_seq or msg.metadata.num_pending == 0:
                    return
        finally:
            await sub.unsubscribe()

    async def events(self, start_seq: int = 1) -> AsyncIterator[Envelope[Any]]:
        """The log's events from `start_seq`, decoded; dead letters and invalid events are skipped."""
        async for msg in self.read_log(start_seq):
            if (event := _event(msg)) is not None:
                yield event

    async def history(self) -> list[tuple[int, str, bytes]]:
        """The whole log as (sequence, subject, raw bytes): the archive (what retention took out of
        the stream, its chain and signatures checked), then the stream; ArchiveError on a gap.
        The lineage service's audit reads the same history, so both go through one function."""
        from services.lineage.audit import history_records

        return await history_records(self.js, self.settings)

    # The inference endpoint -----------------------------------------------------------------
    def endpoint(self, url: str | None = None) -> str:
        s = self.settings
        return (url or s.runtime().get("serve_url") or f"http://{s.serve_host}:{s.serve_port}").rstrip("/")

    def endpoint_headers(self) -> dict[str, str]:
        """The endpoint's bearer token when this tenant's endpoint has one (services.serving.auth)."""
        from services.platform.endpoint_token import client_headers

        return client_headers(self.settings)

    def models(self, url: str | None = None) -> dict[str, Any]:
        url = self.endpoint(url) + "/v1/models"
        return _http("get", url, headers=self.endpoint_headers(), timeout=10).json()

    def only_model(self, fits: Callable[[dict[str, Any]], bool], what: str, url: str | None = None) -> str:
        names = [n for n, m in self.models(url).items() if fits(m)]
        if len(names) != 1:
            raise EndpointError(
                f"choose a {what} with --model: {', '.join(names) or f'no {what} deployed yet'}"
            )
        return names[0]

    def predict(self, rows: str | bytes, model: str | None = None, url: str | None = None) -> Any:
        """Predictions for raw rows (a JSON object or list of objects) from a model's champion."""
        model = model or self.only_model(lambda _: True, "model", url)
        body = rows.encode() if isinstance(rows, str) else rows
        headers = {"content-type": "application/json", **self.endpoint_headers()}
        return _http(
            "post",
            f"{self.endpoint(url)}/v1/models/{model}/predict",
            content=body,
            headers=headers,
            timeout=30,
        ).json()

    def generate(self, prompt: str, model: str | None = None, url: str | None = None, **sampling: Any) -> str:
        """A continuation of `prompt` from a deployed text model (max_tokens, temperature, top_k, seed)."""
        model = model or self.only_model(lambda m: m.get("task") == "text_generation", "text model", url)
        body = {"prompt": prompt, **sampling}
        return _http(
            "post",
            f"{self.endpoint(url)}/v1/models/{model}/generate",
            json=body,
            headers=self.endpoint_headers(),
            timeout=120,
        ).json()["text"]


def wait_until_served(
    endpoint: str, model: str, version: int, timeout_s: float = 60.0, headers: dict[str, str] | None = None
) -> str | None:
    """Poll the endpoint until it serves `version` of `model`, or a later one; None when it does,
    else what it answered last.

    `model.deployed` is the decision; the endpoint swaps to it a moment later, once it has loaded
    and verified the bundle, so a client that predicts at once may still meet the previous champion,
    or none. With several endpoint workers each swaps on its own: this sees the one that answers.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    # The swap takes tens of milliseconds: ask again soon, then less often (at most five times a second).
    pause = 0.01
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{endpoint.rstrip('/')}/v1/models", headers=headers, timeout=5)
            served = reply.json().get(model) if reply.status_code == 200 else None
            if served is not None and int(served.get("version", 0)) >= version:
                return None
            last = f"serving v{served['version']}" if served else f"{reply.status_code}: {reply.text[:200]}"
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(pause)
        pause = min(2 * pause, 0.2)
    return last


def _event(msg: Any) -> Envelope[Any] | None:
    """The message as an event, or None (a dead letter, an invalid event)."""
    if is_dead_letter(msg.subject):
        return None
    try:
        return decode(msg.data)
    except Exception:  # noqa: BLE001 - the log may hold invalid events; they belong to no run
        return None


def _run_event(msg: Any, correlation: str) -> Envelope[Any] | None:
    """The message as an event of this run, or None (another run, a dead letter, an invalid event)."""
    event = _event(msg)
    return event if event is not None and event.correlationid == correlation else None


def _http(method: str, url: str, **kwargs: Any) -> Any:
    import httpx

    try:
        response = httpx.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        base = url.split("/v1/")[0]
        raise EndpointError(
            f"no inference endpoint at {base} ({type(exc).__name__}): start one with `cairn up` or "
            "`cairn serve`, or pass --url"
        ) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise EndpointError(f"{response.status_code} from {url}: {str(detail)[:500]}")
    return response
