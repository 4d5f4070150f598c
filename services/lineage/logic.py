"""The lineage service's one decision: which held messages continue the chain, strictly in stream order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """What to do with the held messages, given the store's last sequence."""

    recorded: list[int]  # at or below the head: a redelivery of something stored, only to ack
    run: list[int]  # head+1, head+2, ...: the next records, in order
    waiting: list[int]  # past a gap: held until the missing message is delivered (again)


def plan(head: int, seqs: Iterable[int]) -> Plan:
    ordered = sorted(set(seqs))
    run: list[int] = []
    for seq in ordered:
        if seq == head + len(run) + 1:
            run.append(seq)
    nxt = head + len(run) + 1
    return Plan([s for s in ordered if s <= head], run, [s for s in ordered if s >= nxt])
