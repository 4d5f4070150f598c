"""A real service process for the bus tests: a slow handler to kill mid-event, and faults on demand.

Run as `python -m tests.probe_service SECONDS`; settings come from CAIRN_ variables like any service.
Each handler run appends the event id to `$CAIRN_HOME/probe-runs.log`, so a test can count runs.
A `data-arrived` whose uri contains one of these markers triggers a fault in this process:

- `probe-kill-always`: SIGKILL on every delivery (a step that crashes its process each time);
- `probe-hang`: the handler never returns;
- `probe-kill-after-publish`: SIGKILL right after the output's PubAck, before the ack (once per event);
- `probe-kill-after-record`: SIGKILL once the ledger recorded the input as handled, before the ack.

`dataset-ingested` events are consumed too (their artifact references go through the policy's
checks), answered by nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from contracts import DataArrived, DataRejected, DatasetIngested, Envelope, new_event
from services.platform.bus.consumer import Delivery
from services.platform.runtime import Route, Service, ServiceRunner
from services.platform.settings import CairnSettings


class Probe(Service):
    name = "probe"

    def __init__(self, settings: CairnSettings, seconds: float):
        super().__init__(settings)
        self.seconds = seconds
        self.runs = settings.home_dir / "probe-runs.log"

    def routes(self):
        return [Route(DataArrived, self.handle), Route(DatasetIngested, self.handle_dataset)]

    def record_run(self, event: Envelope[Any]) -> None:
        with open(self.runs, "a") as out:
            out.write(event.id + "\n")

    async def handle(self, event: Envelope[DataArrived], delivery: Delivery) -> list[Envelope[Any]]:
        self.record_run(event)
        if "probe-kill-always" in event.data.uri:
            os.kill(os.getpid(), signal.SIGKILL)
        if "probe-hang" in event.data.uri:
            await asyncio.Event().wait()
        await asyncio.sleep(self.seconds)  # the slow step the test kills the process in
        out = DataRejected(uri=event.data.uri, reason=f"handled on attempt {delivery.attempt}")
        return [new_event(out, source=self.source, cause=event)]

    async def handle_dataset(self, event: Envelope[DatasetIngested], delivery: Delivery) -> list[Any]:
        self.record_run(event)
        return []


def die_once(home: Path, event_id: str) -> None:
    """SIGKILL this process, unless it already died for this event (a restarted probe carries on)."""
    mark = home / f"probe-died-{event_id}"
    if not mark.exists():
        mark.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def inject_faults(runner: ServiceRunner) -> None:
    """Crash points inside the policy, between its steps: after a publish, after the ledger record."""
    home = runner.settings.home_dir
    publisher = runner.service.publisher
    assert publisher is not None
    publish = publisher.publish_async
    uris: dict[str, str] = {}  # output id -> the uri of the event that caused it

    async def publish_then_die(event: Envelope[Any], body: bytes | None = None) -> Any:
        ack = await publish(event, body)
        await ack  # stored: the crash comes after the output's PubAck
        uri = getattr(event.data, "uri", "")
        if event.causationid:
            uris[event.id] = uri
        if "probe-kill-after-publish" in uri and event.causationid:
            die_once(home, event.causationid)
        return ack

    async def done_then_die(key: str, outcome: str, output_ids: Any) -> None:
        await done(key, outcome, output_ids)
        for output_id in output_ids:
            if "probe-kill-after-record" in uris.get(output_id, ""):
                die_once(home, output_id)

    publisher.publish_async = publish_then_die  # type: ignore[method-assign]
    ledger = getattr(runner, "ledger", None)  # absent where the policy keeps no ledger
    if ledger is not None:
        done = ledger.done
        ledger.done = done_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    probe_runner = ServiceRunner(Probe(CairnSettings(), float(sys.argv[1])))
    inject_faults(probe_runner)
    asyncio.run(probe_runner.run_forever())
