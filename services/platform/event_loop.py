"""Which event loop cairn's processes run: uvloop where it is installed (a dependency; a bare
install falls back to asyncio's own loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """For `asyncio.Runner(loop_factory=...)`: uvloop's, or None for asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run` on the loop above."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)
