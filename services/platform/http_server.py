"""The HTTP server every service's health and metrics, and the endpoint's single worker, run on."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn, waking once a second instead of ten times to look for its exit flag.

    That tick was most of an idle service's CPU (2.7 ms per second before, 1 after, read from the
    process's CPU time); the Date header it refreshes has a one-second resolution, and `exit`
    ends the wait at once.
    """

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._exit = asyncio.Event()

    def exit(self) -> None:
        self.should_exit = True
        self._exit.set()

    async def main_loop(self) -> None:
        tick = 0
        while not await self.on_tick(tick):  # a multiple of ten: the Date header is refreshed
            tick += 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)
