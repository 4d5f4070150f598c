"""Read-your-writes for lineage queries: wait until the store holds what the stream held when asked.

The store is derived from the stream by the lineage service, so it trails the stream a little; a
query made right after a run (`cairn submit --wait`, then `cairn lineage ID`) must first let it
reach the stream's last sequence, or it answers from a history without the run's tail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.lineage.store import LineageStore
from services.platform.bus.connection import connect
from services.platform.settings import CairnSettings

POLL_S = 0.05


async def stream_last_seq(settings: CairnSettings) -> int:
    nc = await connect(settings, "lineage-query")
    try:
        return (await nc.jetstream().stream_info(settings.stream)).state.last_seq
    finally:
        await nc.close()


async def wait_until_caught_up(
    settings: CairnSettings,
    store: LineageStore,
    timeout: float,
    on_wait: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Wait until the store reaches the stream's last sequence as read once now, or `timeout` passes.

    Later events are not waited for: the query reads what was written before it. `on_wait(store_seq,
    stream_seq)` is called once if the store is behind. Returns (store_seq, stream_seq); store_seq
    below stream_seq means the timeout passed (is the lineage service running?).
    """
    stream_seq = await stream_last_seq(settings)
    deadline = time.monotonic() + timeout
    store_seq = await asyncio.to_thread(store.last_seq)
    if store_seq >= stream_seq:
        return store_seq, stream_seq
    if on_wait is not None:
        on_wait(store_seq, stream_seq)
    while store_seq < stream_seq and time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_S, max(deadline - time.monotonic(), 0)))
        store_seq = await asyncio.to_thread(store.last_seq)
    return store_seq, stream_seq
