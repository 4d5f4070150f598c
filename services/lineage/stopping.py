"""The lineage service's stop: one event its loops watch, and a sleep that the stop ends at once."""

from __future__ import annotations

import asyncio
import contextlib


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep, but end at once on stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
