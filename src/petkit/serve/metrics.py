"""Prometheus metrics of `petkit serve`, in a registry of their own (one per app, so tests that
start several servers in one process do not collide in prometheus_client's global registry).

    petkit_requests_total{endpoint,status}       requests answered, by HTTP status
    petkit_prompt_tokens_total                   prompt tokens of finished requests
    petkit_completion_tokens_total               generated tokens of finished requests
    petkit_requests_in_flight                    requests being answered now
    petkit_queue_depth                           requests waiting for a batch row (engine)
    petkit_request_latency_seconds{endpoint}     time from request to last token
    petkit_time_to_first_token_seconds{endpoint} time from request to first token
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """The server's counters, gauges and histograms; `render()` is the /metrics body."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = {"registry": self.registry}
        self.requests = Counter("petkit_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], **reg)
        self.prompt_tokens = Counter("petkit_prompt_tokens", "Prompt tokens of finished requests", **reg)
        self.completion_tokens = Counter("petkit_completion_tokens",
                                         "Generated tokens of finished requests", **reg)
        self.in_flight = Gauge("petkit_requests_in_flight", "Requests being answered now", **reg)
        self.queue_depth = Gauge("petkit_queue_depth", "Requests waiting for a batch row", **reg)
        self.queue_depth.set_function(queue_depth)
        self.latency = Histogram("petkit_request_latency_seconds", "Time from request to last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, **reg)
        self.first_token = Histogram("petkit_time_to_first_token_seconds",
                                     "Time from request to first token", ["endpoint"],
                                     buckets=LATENCY_BUCKETS, **reg)

    def answered(self, endpoint: str, status: int) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def finished(self, endpoint: str, usage: dict[str, Any], seconds: float) -> None:
        """Record a generation that ran to its end: tokens and latency."""
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.completion_tokens.inc(usage.get("completion_tokens", 0))
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
