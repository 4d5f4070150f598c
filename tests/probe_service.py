"""A real service process with a slow handler, to kill mid-event in the crash test.

Run as `python -m tests.probe_service SECONDS`; settings come from CAIRN_ variables like any service.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from contracts import DataArrived, DataRejected, Envelope, new_event
from services.bus.consumer import Delivery
from services.runtime import Route, Service, ServiceRunner
from services.settings import CairnSettings


class Probe(Service):
    name = "probe"

    def __init__(self, settings: CairnSettings, seconds: float):
        super().__init__(settings)
        self.seconds = seconds

    def routes(self):
        return [Route(DataArrived, self.handle)]

    async def handle(self, event: Envelope[DataArrived], delivery: Delivery) -> list[Envelope[Any]]:
        await asyncio.sleep(self.seconds)  # the slow step the test kills the process in
        out = DataRejected(uri=event.data.uri, reason=f"handled on attempt {delivery.attempt}")
        return [new_event(out, source=self.source, cause=event)]


if __name__ == "__main__":
    asyncio.run(ServiceRunner(Probe(CairnSettings(), float(sys.argv[1]))).run_forever())
