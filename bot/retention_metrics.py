"""Retention on /metrics: purge runs, and how overdue the oldest data past its retention is.

The values are read from the database when /metrics is scraped, so the web process reports what the
worker (or `recoverybot purge`) did. Finding the oldest overdue data is a scan of the retained rows, so
it is cached for `ttl` seconds, and recomputed at once after a purge run finishes.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from recovery import retention
from recovery.models import PurgeRun

log = logging.getLogger(__name__)


class RetentionCollector:
    def __init__(self, db, policy: retention.Retention, clock, *, ttl: float = 300.0):
        self.db, self.policy, self.clock, self.ttl = db, policy, clock, ttl
        self._lock = threading.Lock()
        self._cached: tuple | None = None  # (computed at, last finished run, overdue by kind)

    def describe(self):
        return []  # values come from the database; nothing to check at registration

    def collect(self):
        try:
            runs, last_finished, sums, overdue = self._read()
        except Exception as exc:  # noqa: BLE001 - /metrics must answer even while the database is away
            log.warning("retention metrics unavailable: %s", type(exc).__name__)
            return
        yield CounterMetricFamily("recoverybot_purge_runs", "Finished purge runs (worker and CLI)", value=runs)
        yield GaugeMetricFamily("recoverybot_purge_last_run_timestamp_seconds",
                                "When the last purge run finished (Unix time; 0 before the first)",
                                value=last_finished.timestamp() if last_finished else 0)
        purged = CounterMetricFamily("recoverybot_purged", "Items purged, by kind of data", labels=["kind"])
        overdue_family = GaugeMetricFamily(
            "recoverybot_retention_overdue_seconds",
            "How long the oldest data past its retention has been overdue, by kind (0: nothing is)",
            labels=["kind"])
        age = GaugeMetricFamily(
            "recoverybot_retention_oldest_age_seconds",
            "Age (since it became final) of the oldest data past its retention, by kind (0: none is past)",
            labels=["kind"])
        for kind in retention.KINDS:
            purged.add_metric([kind], sums[kind])
            overdue_family.add_metric([kind], overdue[kind])
            days = getattr(self.policy, kind)
            age.add_metric([kind], overdue[kind] + days * 86400 if overdue[kind] else 0.0)
        yield purged
        yield overdue_family
        yield age

    def _read(self):
        # Only reads: on SQLite it takes no write turn, so a scrape never waits behind chat writes (nor, in
        # a thread that holds the turn, on itself).
        with self.db.reading() as s:
            runs, last_finished, *totals = s.execute(
                select(func.count(PurgeRun.id), func.max(PurgeRun.finished_at),
                       *(func.coalesce(func.sum(getattr(PurgeRun, k)), 0) for k in retention.KINDS))
                .where(PurgeRun.finished_at.is_not(None))).one()
            now = self.clock.now()
            with self._lock:
                cached = self._cached
                if (cached is None or cached[1] != last_finished
                        or not 0 <= (now - cached[0]).total_seconds() <= self.ttl):
                    overdue = retention.overdue(retention.plan(s, self.policy, now), self.policy, now)
                    cached = self._cached = (now, last_finished, overdue)
        return runs, last_finished, dict(zip(retention.KINDS, totals)), cached[2]
