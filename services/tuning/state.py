"""A study's state in the key-value bucket, laid out so that one trial result costs O(1).

Keys (the bucket is the only state shared by tuning replicas):

- `<study>.plan`                the plan event and when it started, written once;
- `<study>.rung.<n>.tally`      which trials rung n waits for and which have reported (two bitmaps,
                                `logic.RungTally`), compare-and-set per result: ~2.5 kB at 10,000;
- `<study>.rung.<n>.t.<trial>`  one trial's result at rung n, written once with `create`, so the
                                first report wins and a redelivery cannot count twice.

A result is stored before its bit is set, so whoever finds the tally complete can read every
result of the rung, once, by key. A replica sets the bit on the tally it last wrote (`TallyCache`)
and reads the tally only when the server refuses that copy as stale. Studies started under the
previous layout (one JSON document per rung, `<study>.rung.<n>`) are not migrated: their next
result is refused as permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from datetime import datetime
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from contracts import Envelope, TrialCompleted, TuningRequested
from services.platform.bus.consumer import PermanentError
from services.tuning import logic

# Concurrent gets when a complete rung is read: enough to hide round trips, few enough that one
# decision does not flood the connection's pending buffer.
READ_CONCURRENCY = 256


def plan_key(study_id: str) -> str:
    return f"{study_id}.plan"


def tally_key(study_id: str, rung: int) -> str:
    return f"{study_id}.rung.{rung}.tally"


def result_key(study_id: str, rung: int, trial_id: int) -> str:
    return f"{study_id}.rung.{rung}.t.{trial_id}"


async def record_plan(kv: Any, event: Envelope[TuningRequested]) -> str:
    """Keep the plan event, once; returns when the study started (the first recording's time)."""
    started = event.time.isoformat()
    state = {"plan_event": json.loads(event.encode()), "started": started}
    with contextlib.suppress(KeyWrongLastSequenceError):  # redelivered: the plan is already recorded
        await kv.create(plan_key(event.data.study_id), json.dumps(state).encode())
    return started


async def create_rung(kv: Any, study_id: str, rung: int, trial_ids: list[int]) -> None:
    """The rung's tally with no result yet; a second creation (redelivery, another replica) keeps
    the first, which is the same since the trials of a rung are decided once."""
    with contextlib.suppress(KeyWrongLastSequenceError):
        await kv.create(tally_key(study_id, rung), logic.RungTally.of(trial_ids).encode())


async def record(kv: Any, done: TrialCompleted, event_id: str, tallies: TallyCache | None = None) -> bool:
    """Store one result and mark it seen; True when the rung then has every result it waits for.

    True also for a redelivery after the rung completed: the decision is made again and its
    derived ids make the second publication a no-op, so a crash after the last bit was set and
    before the decision was published cannot stall the study. `tallies`: this replica's last
    written tallies, so that a result is usually one write with no read before it.
    """
    result = logic.TrialResult(done.score, event_id, done.budget, done.duration_s)
    with contextlib.suppress(KeyWrongLastSequenceError):  # already stored: the first report wins
        await kv.create(result_key(done.study_id, done.rung, done.trial_id), result.encode())
    key = tally_key(done.study_id, done.rung)
    cached = tallies.get(key) if tallies is not None else None
    while True:
        if cached is not None:
            tally, revision = cached
        else:
            tally, revision = await _read_tally(kv, done.study_id, done.rung)
            if tallies is not None:
                tallies.read(key, revision)
        if tally.has(done.trial_id):
            if cached is not None:  # a redelivery: judged on the stored tally, not on this copy
                cached = None
                continue
            return tally.complete
        tally = tally.with_seen(done.trial_id)
        try:
            revision = await kv.update(key, tally.encode(), last=revision)
        except KeyWrongLastSequenceError:
            cached = None  # another result for this rung got in first: read the tally again
            continue
        if tallies is not None:
            tallies.wrote(key, tally, revision)
        return tally.complete


async def _read_tally(kv: Any, study_id: str, rung: int) -> tuple[logic.RungTally, int]:
    try:
        entry = await kv.get(tally_key(study_id, rung))
    except KeyNotFoundError as exc:
        raise PermanentError(
            f"{study_id} rung {rung} has no tally: the study was started by an older "
            "tuning (state layout before per-result keys) or never planned"
        ) from exc
    return logic.RungTally.decode(entry.value), entry.revision


def keep_recent(entries: OrderedDict[str, Any], key: str, value: Any, size: int) -> None:
    """Store `key` as the most recent entry, dropping the oldest past `size` (both caches below)."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > size:
        entries.popitem(last=False)


class TallyCache:
    """The tally this replica last wrote per rung, with its revision: the next result of the rung is
    set on it by compare-and-set straight away, one write instead of a read and a write.

    The bucket stays the truth: a copy another writer has moved past is refused by the server
    (wrong last sequence) and the tally is read again. A rung that another replica writes too is
    not cached any more here (a read then shows a revision this replica did not write): with
    several replicas taking turns, a stale copy would cost a refused write on most results. Results
    handled side by side in this replica only race each other, as they did before. Bounded; per
    service instance, never module-global.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._rungs: OrderedDict[str, tuple[logic.RungTally, int] | None] = OrderedDict()  # None: shared

    def get(self, key: str) -> tuple[logic.RungTally, int] | None:
        return self._rungs.get(key)

    def wrote(self, key: str, tally: logic.RungTally, revision: int) -> None:
        if key in self._rungs:
            known = self._rungs[key]
            if known is None or known[1] > revision:  # shared, or a later write of ours landed first
                return
        self._keep(key, (tally, revision))

    def read(self, key: str, revision: int) -> None:
        """A revision read from the bucket: past this replica's last write means another writer."""
        known = self._rungs.get(key)
        if known is not None and known[1] != revision:
            self._keep(key, None)

    def _keep(self, key: str, value: tuple[logic.RungTally, int] | None) -> None:
        keep_recent(self._rungs, key, value, self.size)


async def read_rung(kv: Any, study_id: str, rung: int) -> logic.RungState:
    """Every result of a rung, read once by key (KeyNotFoundError when the rung was never made)."""
    tally = logic.RungTally.decode((await kv.get(tally_key(study_id, rung))).value)
    expected = tally.expected_ids
    results: dict[int, logic.TrialResult] = {}
    reported = [t for t in expected if tally.has(t)]
    for start in range(0, len(reported), READ_CONCURRENCY):
        chunk = reported[start : start + READ_CONCURRENCY]
        entries = await asyncio.gather(*(kv.get(result_key(study_id, rung, t)) for t in chunk))
        results.update((t, logic.TrialResult.decode(e.value)) for t, e in zip(chunk, entries, strict=True))
    return logic.RungState(expected, results)


class PlanCache:
    """Parsed plans by study id, most recent kept: a plan of 10,000 configurations takes tens of
    milliseconds to validate, and every decision of the study needs it. Bounded, so a replica that
    sees many studies holds at most `size` plans; one that misses reads the plan once from the
    bucket. Per service instance, never module-global."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._plans: OrderedDict[str, tuple[TuningRequested, datetime]] = OrderedDict()

    def put(self, plan: TuningRequested, started: str) -> None:
        keep_recent(self._plans, plan.study_id, (plan, datetime.fromisoformat(started)), self.size)

    async def get(self, kv: Any, study_id: str) -> tuple[TuningRequested, datetime]:
        if study_id not in self._plans:
            doc = json.loads((await kv.get(plan_key(study_id))).value)
            self.put(Envelope[TuningRequested].model_validate(doc["plan_event"]).data, doc["started"])
        self._plans.move_to_end(study_id)
        return self._plans[study_id]
