"""The one error ingestion raises: a refusal with a reason the sender can act on."""

from __future__ import annotations


class DataProblem(Exception):
    def __init__(self, reason: str, problems: list[str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.problems = problems or [reason]
