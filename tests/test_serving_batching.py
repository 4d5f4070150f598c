"""The micro-batcher (services.serving.batching): concurrent requests share a predict call, each gets
its own rows back, a failure reaches every request of its batch, and a closed batcher answers what
it holds. A real predict function on real numpy arrays; no server."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.serving.batching import MicroBatcher


class Model:
    """Predicts the row sums, and remembers each call's row count (from the predict thread)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # a predict has begun

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(10)
        self.calls.append(len(x))
        self.threads.add(threading.current_thread().name)
        if np.isnan(x).any():
            raise ValueError("a NaN reached the model")
        return x.sum(axis=1)


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 1.0] for v in values], dtype=np.float32)


async def test_requests_waiting_together_share_one_predict_and_get_their_own_rows():
    model = Model()
    batcher = MicroBatcher(model, wait_s=0.5, max_rows=100)
    batcher.inflight = 3  # three requests admitted: the batch waits for all of them
    answers = await asyncio.gather(batcher(rows(1)), batcher(rows(2, 3)), batcher(rows(4)))
    assert [a.tolist() for a in answers] == [[2.0], [3.0, 4.0], [5.0]]
    assert model.calls == [4] and batcher.batches == 1
    assert model.threads == {"predict"}  # the predict thread, not the event loop
    await batcher.close()


async def test_a_lone_request_does_not_wait_and_max_rows_splits_batches():
    model = Model()
    batcher = MicroBatcher(model, wait_s=5.0, max_rows=2)
    batcher.inflight = 1
    assert (await asyncio.wait_for(batcher(rows(1)), 2)).tolist() == [2.0]  # no one else on the way
    await batcher.close()
    batcher = MicroBatcher(model, wait_s=0.05, max_rows=2)
    batcher.inflight = 3
    answers = await asyncio.gather(batcher(rows(1)), batcher(rows(2)), batcher(rows(3)))
    assert [a.tolist() for a in answers] == [[2.0], [3.0], [4.0]]
    assert model.calls[0] == 1 and max(model.calls[1:]) <= 2 and sum(model.calls[1:]) == 3
    await batcher.close()


async def test_a_failed_predict_reaches_every_request_of_its_batch_and_the_next_batch_works():
    model = Model()
    batcher = MicroBatcher(model, wait_s=0.5, max_rows=100)
    batcher.inflight = 2
    results = await asyncio.gather(batcher(rows(1)), batcher(rows(float("nan"))), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results), results
    batcher.inflight = 1
    assert (await batcher(rows(5))).tolist() == [6.0]
    await batcher.close()


async def test_close_answers_what_is_queued_and_later_requests_are_answered_alone():
    model = Model()
    batcher = MicroBatcher(model, wait_s=0.001, max_rows=100)
    model.release.clear()  # the first predict holds; the others queue behind it
    batcher.inflight = 1
    first = asyncio.create_task(batcher(rows(1)))
    assert await asyncio.to_thread(model.entered.wait, 10)
    queued = [asyncio.create_task(batcher(rows(v))) for v in (2, 3)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close())
    model.release.set()
    await closing
    assert [(await t).tolist() for t in (first, *queued)] == [[2.0], [3.0], [4.0]]
    assert (await batcher(rows(7))).tolist() == [8.0]  # after close: alone, still this model's


@pytest.mark.parametrize("inflight", [0, 1])
async def test_a_cancelled_request_does_not_break_its_batch(inflight):
    model = Model()
    batcher = MicroBatcher(model, wait_s=0.2, max_rows=100)
    batcher.inflight = 2
    model.release.clear()
    gone = asyncio.create_task(batcher(rows(1)))
    kept = asyncio.create_task(batcher(rows(2)))
    await asyncio.sleep(0.01)
    gone.cancel()
    model.release.set()
    assert (await kept).tolist() == [3.0]
    batcher.inflight = inflight
    assert (await batcher(rows(4))).tolist() == [5.0]
    await batcher.close()
