"""The bus: one service hop with acks, cairn's consumer policy against raw nats-py, in the same run.

Each side consumes data-arrived events from a durable pull consumer, parses the JSON, publishes one
output event into the stream (waiting for the PubAck) and acks the input. cairn's side adds the
typed envelope, validation, deterministic ids, the lease keeper and the metrics; the ratio is the
price of those. Each side gets a fresh nats-server (file storage, fsync always).

    .venv/bin/python bench/bus.py [--events 2000] [--latency-samples 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from contracts import DataArrived, DataRejected  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402
from nats.js.api import ConsumerConfig  # noqa: E402

from contracts import Envelope, new_event  # noqa: E402
from services.bus.connection import connect  # noqa: E402
from services.bus.consumer import Delivery  # noqa: E402
from services.bus.embedded import EmbeddedNats  # noqa: E402
from services.bus.provision import provision_all  # noqa: E402
from services.runtime import Route, Service, ServiceRunner  # noqa: E402
from services.settings import CairnSettings  # noqa: E402

IN, OUT = DataArrived.EVENT_TYPE, DataRejected.EVENT_TYPE


class Echo(Service):
    name = "echo"

    def __init__(self, settings: CairnSettings, workers: int):
        super().__init__(settings)
        self.workers = workers

    def routes(self):
        return [Route(DataArrived, self.handle, max_workers=self.workers)]

    async def handle(self, event: Envelope[DataArrived], delivery: Delivery) -> list[Envelope[Any]]:
        return [new_event(DataRejected(uri=event.data.uri, reason="echo"), source=self.source, cause=event)]


async def raw_consumer(url: str, stop: asyncio.Event) -> None:
    """The baseline: the same hop written directly with nats-py."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(IN, durable="raw", config=ConsumerConfig(ack_wait=30, max_deliver=-1))
    while not stop.is_set():
        try:
            msgs = await sub.fetch(1, timeout=1)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            doc = json.loads(msg.data)
            out = {"id": doc["id"] + "-out", "causationid": doc["id"], "data": {"uri": doc["data"]["uri"]}}
            await js.publish(OUT, json.dumps(out).encode(), headers={"Nats-Msg-Id": out["id"]})
            await msg.ack()
    await nc.close()


def arrivals(n: int) -> list[bytes]:
    return [
        new_event(DataArrived(uri=f"file:///data/{i}.csv", target="y"), source="/bench").encode()
        for i in range(n)
    ]


async def measure(url: str, events: int, samples: int) -> dict[str, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    received: asyncio.Queue[float] = asyncio.Queue()

    async def on_output(_msg: Any) -> None:
        received.put_nowait(time.perf_counter())

    await nc.subscribe(OUT, cb=on_output)

    async def send(body: bytes) -> None:
        await js.publish(IN, body, headers={"Nats-Msg-Id": json.loads(body)["id"]})

    latencies = []
    for body in arrivals(samples):
        t0 = time.perf_counter()
        await send(body)
        latencies.append(await asyncio.wait_for(received.get(), 30) - t0)
    bodies = arrivals(events)
    started = time.perf_counter()
    for i in range(0, len(bodies), 100):
        await asyncio.gather(*(send(b) for b in bodies[i : i + 100]))
    last = started
    for _ in range(events):
        last = await asyncio.wait_for(received.get(), 60)
    await nc.close()
    latencies.sort()
    return {
        "events_per_s": events / (last - started),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


async def run_side(kind: str, events: int, samples: int, workers: int = 1) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats")
        server.start()
        settings = CairnSettings(home=Path(tmp), nats_url=server.url)
        nc = await connect(settings, "admin")
        await provision_all(nc.jetstream(), settings)
        await nc.close()
        stop = asyncio.Event()
        runner = None
        if kind == "raw":
            task = asyncio.create_task(raw_consumer(server.url, stop))
        else:
            runner = ServiceRunner(Echo(settings, workers))
            await runner.start()
        try:
            return await measure(server.url, events, samples)
        finally:
            stop.set()
            if runner:
                await runner.stop()
            else:
                await task
            server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bus.json"))
    args = parser.parse_args()
    raw = await run_side("raw", args.events, args.latency_samples)
    cairn = await run_side("cairn", args.events, args.latency_samples)
    cairn8 = await run_side("cairn", args.events, args.latency_samples, workers=8)
    result = {
        "raw_nats_py": raw,
        "cairn_1_worker": cairn,
        "cairn_8_workers": cairn8,
        "throughput_ratio_cairn_vs_raw": cairn["events_per_s"] / raw["events_per_s"],
        "p50_ratio_cairn_vs_raw": cairn["p50_ms"] / raw["p50_ms"],
        "p99_ratio_cairn_vs_raw": cairn["p99_ms"] / raw["p99_ms"],
    }
    result = json.loads(json.dumps(result), parse_float=lambda v: round(float(v), 3))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
