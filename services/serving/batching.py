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
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


def fast_predict(model, compiled_trees: bool = True) -> tuple[Predict, str]:  # noqa: ANN001 - a LoadedModel
    """The model's predict on a ready feature matrix, and what it is (the v2 metadata says): an
    XGBoost regressor through the compiled forest where it reproduces XGBoost
    (services/serving/forest.py), else XGBoost through `inplace_predict` (no DMatrix)."""
    predictor = model.predictor
    booster = getattr(predictor, "booster", None)
    if booster is None:
        return predictor.predict, model.manifest["family"]
    if compiled_trees:
        from services.serving.forest import compile_forest  # numba (100 MiB) only where the forest is on

        if (forest := compile_forest(booster)) is not None:
            return forest.predict, "compiled-forest"
    classification = model.spec["task"] == "classification"

    def predict(x: np.ndarray) -> np.ndarray:
        out = booster.inplace_predict(x)
        if classification and out.ndim == 1:
            out = np.column_stack([1 - out, out])
        return out

    return predict, "xgboost"


class MicroBatcher:
    def __init__(self, predict: Predict, wait_s: float, max_rows: int):
        self.predict = predict
        self.wait_s = wait_s
        self.max_rows = max_rows
        self.queue: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] = deque()
        self.task: asyncio.Task[None] | None = None
        self.batches = 0
        self.inflight = 0  # requests admitted for this model and not yet answered (set by the server)
        self.closed = False
        self._arrival: asyncio.Future[None] | None = None  # what the gathering task waits on
        # One thread predicts; batches reach it on a SimpleQueue and their results come back with
        # call_soon_threadsafe (an executor's futures and their chaining cost more per batch).
        self._jobs: SimpleQueue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] = SimpleQueue()

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.closed:
            # Admitted with this model just before a swap closed its batcher: still this model's
            # answer, alone (the queue is no longer read).
            return await asyncio.to_thread(self.predict, x)
        loop = asyncio.get_running_loop()
        if self.task is None:
            thread = threading.Thread(target=self._predicting, args=(loop,), name="predict", daemon=True)
            thread.start()
            self.task = loop.create_task(self._run())
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._put((x, future))
        return await future

    def _put(self, item: tuple[np.ndarray, asyncio.Future[np.ndarray]] | None) -> None:
        self.queue.append(item)
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    async def _next_arrival(self) -> None:
        self._arrival = asyncio.get_running_loop().create_future()
        try:
            await self._arrival
        finally:
            self._arrival = None

    async def close(self) -> None:
        """Answer everything queued, then stop (a swapped-out model's batcher)."""
        self.closed = True
        if self.task is not None:
            self._put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self._jobs.put(None)  # the thread ends after the batch it may hold

    async def _gather(self) -> tuple[list[tuple], bool]:
        """What is queued, and more while others are on the way (at most wait_s, max_rows)."""
        batch: list[tuple] = []
        rows, stop = 0, False
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_rows:
            if not self.queue:
                left = deadline - time.monotonic()
                if batch and (left <= 0 or self.inflight <= len(batch)):  # nobody else is on the way: go
                    break
                try:
                    async with asyncio.timeout(left if batch else None):
                        await self._next_arrival()
                except TimeoutError:
                    break
                continue
            item = self.queue.popleft()
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
            batch, stop = await self._gather()
            if not batch:
                continue
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
            done: asyncio.Future[np.ndarray] = loop.create_future()
            self._jobs.put((x, done))
            try:
                out = await done
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

    def _predicting(self, loop: asyncio.AbstractEventLoop) -> None:
        """The predict thread: XGBoost releases the GIL, so the loop parses the next requests meanwhile."""
        while (job := self._jobs.get()) is not None:
            x, done = job
            try:
                result, failed = self.predict(x), None
            except Exception as exc:  # noqa: BLE001 - handed to the batch's requests
                result, failed = None, exc
            try:
                loop.call_soon_threadsafe(_settle, done, result, failed)
            except RuntimeError:  # the loop closed meanwhile: nobody waits
                return


def _settle(future: asyncio.Future, result: object, failed: BaseException | None) -> None:
    if future.done():
        return
    if failed is not None:
        future.set_exception(failed)
    else:
        future.set_result(result)
