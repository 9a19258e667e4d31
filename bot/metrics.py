"""Prometheus metrics, on a registry of our own so several apps in one process (tests) do not clash."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self._inbox = Counter("recoverybot_inbox_events_total", "Inbound events by source and outcome",
                              ["source", "outcome"], registry=self.registry)
        self._outbox = Counter("recoverybot_outbox_deliveries_total", "Outbox delivery attempts",
                               ["kind", "outcome"], registry=self.registry)
        self._failures = Counter("recoverybot_verification_failures_total",
                                 "Failed verification attempts by reason", ["reason"], registry=self.registry)

    def inbox(self, source: str, outcome: str) -> None:
        self._inbox.labels(source, outcome).inc()

    def outbox(self, kind: str, outcome: str) -> None:
        self._outbox.labels(kind, outcome).inc()

    def failure(self, reason: str) -> None:
        self._failures.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
