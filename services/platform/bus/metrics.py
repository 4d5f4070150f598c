"""Prometheus metrics of one service process, in its own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        self.handled = Counter(
            "cairn_events_handled_total",
            "Events handled, by type and outcome (ok, retried, rejected).",
            ["service", "type", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cairn_handler_seconds",
            "Handler latency by event type.",
            ["service", "type"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cairn_handlers_in_flight", "Messages being handled now.", ["service"], registry=self.registry
        )
        self.consumer_pending = Gauge(
            "cairn_consumer_pending",
            "Messages in the stream not yet delivered to this service's consumer (lag).",
            ["service", "consumer"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "cairn_cache_hits_total",
            "Inputs served from the step cache.",
            ["service", "step"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "cairn_cache_misses_total",
            "Cacheable inputs computed (cache miss or --no-cache).",
            ["service", "step"],
            registry=self.registry,
        )
        self.trials_running = Gauge(
            "cairn_trials_running", "Trials running on Dask from this replica.", registry=self.registry
        )
        # For the operator's alerts and dashboards (docs/OPERATIONS.md): labelled, so a service
        # exports a family only once it sets a value.
        self.published = Counter(
            "cairn_events_published_total",
            "Events published by handlers (outputs and rejections), by type.",
            ["service", "type"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "cairn_service_ready",
            "1 when /readyz would answer ready, else 0.",
            ["service"],
            registry=self.registry,
        )
        self.gate_decisions = Counter(
            "cairn_gate_decisions_total",
            "Champion/challenger gate decisions, by model and outcome (passed, failed).",
            ["service", "model", "outcome"],
            registry=self.registry,
        )
        self.dask_workers = Gauge(
            "cairn_dask_workers",
            "Workers the Dask scheduler has, as this client last saw.",
            ["service"],
            registry=self.registry,
        )
        self.archive_overdue = Gauge(
            "cairn_archive_overdue_records",
            "Records the retention limits send out that are still in the stream after the last trim.",
            ["service"],
            registry=self.registry,
        )
        self.archive_success = Gauge(
            "cairn_archive_last_success_timestamp_seconds",
            "When the archiver last finished a pass without an error (Unix time).",
            ["service"],
            registry=self.registry,
        )
