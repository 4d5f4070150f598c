"""Micro-batching: concurrent requests for one model share a predict call, as Triton and KServe do.

A request's feature matrix joins its model's queue; one task per loaded model takes what is
queued, waits at most `wait_s` for more (up to `max_rows`) but only while other admitted requests
are still being parsed (`inflight`), runs one predict on the stacked rows in a thread, and hands
each request its slice. What queues while one predict runs forms the next batch. A batcher
belongs to one loaded model: a swap starts a new one, and the old one finishes what was queued on
it, so a request is answered by the model it was admitted with, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


def fast_predict(model) -> Predict:  # noqa: ANN001 - a services.platform.ml.bundle.LoadedModel
    """The model's predict on a ready feature matrix; XGBoost through `inplace_predict` (no DMatrix)."""
    predictor = model.predictor
    booster = getattr(predictor, "booster", None)
    if booster is None:
        return predictor.predict
    classification = model.spec["task"] == "classification"

    def predict(x: np.ndarray) -> np.ndarray:
        out = booster.inplace_predict(x)
        if classification and out.ndim == 1:
            out = np.column_stack([1 - out, out])
        return out

    return predict


class MicroBatcher:
    def __init__(self, predict: Predict, wait_s: float, max_rows: int):
        self.predict = predict
        self.wait_s = wait_s
        self.max_rows = max_rows
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="predict")
        self.task: asyncio.Task[None] | None = None
        self.batches = 0
        self.inflight = 0  # requests admitted for this model and not yet answered (set by the server)
        self.closed = False


    async def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.closed:
            # Admitted with this model just before a swap closed its batcher: still this model's
            # answer, alone (the queue is no longer read; a put now would wait forever).
            return await asyncio.to_thread(self.predict, x)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, future))
        return await future

    async def close(self) -> None:
        """Answer everything queued, then stop (a swapped-out model's batcher)."""
        self.closed = True
        if self.task is not None:
            self.queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.pool.shutdown(wait=False)

    async def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, rows, stop = [first], len(first[0]), False
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_rows:
            if self.queue.empty():
                left = deadline - time.monotonic()
                if left <= 0 or self.inflight <= len(batch):  # nobody else is on the way: go now
                    break
                try:
                    async with asyncio.timeout(left):  # no task per wait, as wait_for makes on 3.11
                        item = await self.queue.get()
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            if item is None:
                stop = True
                break
            batch.append(item)
            rows += len(item[0])
        return batch, stop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self.queue.get()
            if first is None:
                return
            batch, stop = await self._gather(first)
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
            try:
                out = await loop.run_in_executor(self.pool, self.predict, x)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for part, future in batch:
                if not future.done():  # a client gone meanwhile cancelled its future
                    future.set_result(out[start : start + len(part)])
                start += len(part)
