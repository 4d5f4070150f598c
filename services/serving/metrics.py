"""The endpoint's Prometheus counters, in one registry shared by the champions and the routes.

Several workers (CAIRN_SERVE_WORKERS) share /metrics through prometheus_client's multiprocess
files: whichever worker answers counts every worker's requests.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by the launcher when several workers share /metrics


class EndpointMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.requests = Counter(
            "cairn_inference_requests_total",
            "Inference requests.",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cairn_inference_seconds",
            "Inference latency.",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._answered: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.swaps = Counter("cairn_model_swaps_total", "Champion swaps.", ["model"], registry=self.registry)
        self.refused = Counter(
            "cairn_models_refused_total",
            "Champions refused (unsigned, a signature that fails, hash mismatch, outside the store).",
            ["model"],
            registry=self.registry,
        )

    def answered(self, model: str, start: float, status: str = "200") -> None:
        """One answered request: its latency since `start` (perf_counter) and its count. The
        labelled children are kept per (model, status), so the hot path does not look them up."""
        children = self._answered.get((model, status))
        if children is None:
            children = self._answered[(model, status)] = (
                self.latency.labels(model), self.requests.labels(model, status))
        children[0].observe(time.perf_counter() - start)
        children[1].inc()

    def exposition(self) -> bytes:
        """The text /metrics answers with."""
        if self.multiprocess:  # every worker's counters, from prometheus_client's shared files
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
