"""Prometheus metrics from two sources (docs/operations.md lists every metric).

- **The database** (`DatabaseCollector`, reading recovery/stats.py at scrape time, cached a few
  seconds): cases by state, queues, worker heartbeats, transitions, decisions, refusals, and the time to
  decision and to completion. Every process that reads them reports the same numbers, whichever process
  did the work (a web process, a worker, or a one-shot `recoverybot cases approve`). Web processes and
  `serve` export them; a worker does not, so a scrape of both never counts them twice.
- **This process** (`Metrics`): messages in and out, emails, check outcomes, failed attempts and chat
  reply latency, counted where they happen. A worker serves them on its own port; gunicorn's processes
  share theirs through prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by
  `recoverybot web`), so any scrape of the web port sees the sum over all of them.

The registry is our own, so several apps in one process (tests) do not clash.
"""
from __future__ import annotations

import collections
import hmac
import logging
import os
import threading
import time
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from recovery import stats
from recovery.machine import TRANSITIONS

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTBOX_KINDS = ("chat", "email", "slack", "staff")
REPLY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
WAITING_MAX = 10_000  # conversations whose reply is being timed; the oldest are dropped beyond this


class Metrics:
    """Counters and histograms of this process."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self._inbox = Counter("recoverybot_inbox_events_total", "Inbound events by source (channel) and outcome",
                              ["source", "outcome"], registry=r)
        self._outbox = Counter("recoverybot_outbox_deliveries_total", "Outbox delivery attempts by kind",
                               ["kind", "outcome"], registry=r)
        self._failures = Counter("recoverybot_verification_failures_total",
                                 "Failed verification attempts by reason", ["reason"], registry=r)
        self._checks = Counter("recoverybot_check_results_total", "Identity check outcomes",
                               ["check", "result"], registry=r)
        self._out = Counter("recoverybot_messages_out_total", "Messages handed to each channel, by result",
                            ["channel", "result"], registry=r)
        self._emails = Counter("recoverybot_emails_total", "Emails by template and result",
                               ["template", "result"], registry=r)
        self._reply = Histogram("recoverybot_chat_reply_seconds",
                                "From a customer's message being stored to the bot's first reply delivered",
                                ["channel"], buckets=REPLY_BUCKETS, registry=r)
        self._waiting: collections.OrderedDict[str, datetime] = collections.OrderedDict()
        self._lock = threading.Lock()

    def inbox(self, source: str, outcome: str) -> None:
        self._inbox.labels(source, outcome).inc()

    def outbox(self, kind: str, outcome: str) -> None:
        self._outbox.labels(kind, outcome).inc()

    def failure(self, reason: str, n: int = 1) -> None:
        self._failures.labels(reason).inc(n)

    def check(self, name: str, result: str) -> None:
        self._checks.labels(name, result).inc()

    def delivered(self, channel: str, result: str, *, template: str | None = None) -> None:
        self._out.labels(channel, result).inc()
        if template is not None:
            self._emails.labels(template, result).inc()

    # chat reply latency: the worker notes when a customer's message was stored, and the first reply
    # delivered to that conversation afterwards closes the measurement
    def customer_message(self, conversation: str, received_at: datetime) -> None:
        with self._lock:
            self._waiting[conversation] = received_at
            self._waiting.move_to_end(conversation)
            while len(self._waiting) > WAITING_MAX:
                self._waiting.popitem(last=False)

    def reply_delivered(self, conversation: str, channel: str, now: datetime) -> None:
        with self._lock:
            received_at = self._waiting.pop(conversation, None)
        if received_at is not None:
            self._reply.labels(channel).observe(max(0.0, (now - received_at).total_seconds()))


class DatabaseCollector:
    """Metrics read from the database (see recovery/stats.py), at most once per `ttl` seconds.

    The first tally of the audit log reads all of it (seconds for a million records), so with
    `background` it runs on a thread of its own: until it is done, scrapes get the queues but no totals,
    rather than totals that would look like a counter reset. Afterwards each read folds in only the
    records added since. Reads take no write lock (Database.reading).
    """

    def __init__(self, db, clock, *, ttl: float = 5.0, background: bool = False):
        self.db, self.clock, self.ttl, self.background = db, clock, ttl, background
        self.tally = stats.AuditTally()
        self._lock = threading.Lock()
        self._cached: list | None = None
        self._cached_at = 0.0
        self._caught_up = threading.Event()
        self._catching_up: threading.Thread | None = None

    def describe(self):
        return []  # names are only known by reading; this keeps registries from reading at register time

    def collect(self):
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached_at >= self.ttl:
                self._cached = self._read()
                self._cached_at = time.monotonic()
            return list(self._cached)

    def _catch_up(self) -> None:
        try:
            with self.db.reading() as session:
                self.tally.update(session)
            self._caught_up.set()
        except Exception as exc:  # noqa: BLE001 - the next scrape tries again
            log.warning("metrics: cannot tally the audit log: %s: %s", type(exc).__name__, exc)
        finally:
            self._catching_up = None

    def _read(self) -> list:
        started = time.perf_counter()
        now = self.clock.now()
        if not self._caught_up.is_set():
            if not self.background:
                self._catch_up()
            elif self._catching_up is None:
                self._catching_up = threading.Thread(target=self._catch_up, name="metrics-tally", daemon=True)
                self._catching_up.start()
        try:
            with self.db.reading() as session:
                if self._caught_up.is_set():
                    self.tally.update(session)
                queues = stats.queues(session, now)
        except Exception as exc:  # noqa: BLE001 - a scrape reports the outage instead of failing
            log.warning("metrics: cannot read the database: %s: %s", type(exc).__name__, exc)
            return [_gauge("recoverybot_database_up", "1 when the last read of the database worked", 0)]
        families = _queue_families(queues, now)
        if self._caught_up.is_set():
            families += _tally_families(self.tally)
        families.append(_gauge("recoverybot_database_up", "1 when the last read of the database worked", 1))
        families.append(_gauge("recoverybot_database_totals_ready",
                               "1 once the audit log has been tallied (totals are left out until then)",
                               1 if self._caught_up.is_set() else 0))
        families.append(_gauge("recoverybot_database_read_seconds",
                               "How long the last read of these metrics from the database took",
                               time.perf_counter() - started))
        return families


def _gauge(name: str, doc: str, value: float | None = None, labels=(), rows=()) -> GaugeMetricFamily:
    if value is not None:
        return GaugeMetricFamily(name, doc, value=value)
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for label_values, v in rows:
        family.add_metric(list(label_values), v)
    return family


def _age(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since else 0.0


def _queue_families(q: stats.Queues, now: datetime) -> list:
    return [
        _gauge("recoverybot_cases", "Open cases by state", labels=["state"],
               rows=[((state,), n) for state, n in sorted(q.cases.items())]),
        _gauge("recoverybot_oldest_awaiting_approval_seconds",
               "How long the oldest case awaiting approval has waited (0 when none waits)",
               _age(now, q.oldest_awaiting_approval)),
        _gauge("recoverybot_inbox_backlog", "Inbound events not processed yet", q.inbox_backlog),
        _gauge("recoverybot_inbox_backlog_age_seconds", "Age of the oldest unprocessed inbound event",
               _age(now, q.inbox_oldest)),
        _gauge("recoverybot_inbox_failed", "Inbound events given up after repeated errors", q.inbox_failed),
        _gauge("recoverybot_outbox_ready", "Outbox messages due to be sent now, by kind", labels=["kind"],
               rows=[((k,), q.outbox_ready.get(k, 0)) for k in sorted(set(OUTBOX_KINDS) | set(q.outbox_ready))]),
        _gauge("recoverybot_outbox_ready_age_seconds", "How long the longest-waiting due message has waited",
               _age(now, q.outbox_oldest_ready)),
        _gauge("recoverybot_outbox_dead", "Outbox messages parked after failing for good, by kind",
               labels=["kind"],
               rows=[((k,), q.outbox_dead.get(k, 0)) for k in sorted(set(OUTBOX_KINDS) | set(q.outbox_dead))]),
        _gauge("recoverybot_worker_last_heartbeat_timestamp_seconds",
               "Unix time of the freshest worker heartbeat (0 when no worker ever ran)",
               q.last_heartbeat.timestamp() if q.last_heartbeat else 0),
        _gauge("recoverybot_workers_alive", "Workers whose heartbeat is fresh", q.workers_alive),
    ]


def _counter(name: str, doc: str, labels, rows) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for label_values, v in rows:
        family.add_metric(list(label_values), v)
    return family


def _histogram(family: HistogramMetricFamily, labels, d: stats.Durations) -> None:
    cumulative, buckets = 0, []
    for bound, n in zip(list(d.bounds) + [float("inf")], d.counts):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    family.add_metric(list(labels), buckets, d.total)


def _tally_families(t: stats.AuditTally) -> list:
    # every declared move is reported from zero, so a panel or an alert never sees "no data"
    moves = collections.Counter({(tr.event, s.value, tr.target.value): 0 for tr in TRANSITIONS for s in tr.sources})
    moves.update(t.transitions)
    opens = collections.Counter({"none": 0})
    opens.update(t.opens)
    to_decision = HistogramMetricFamily("recoverybot_time_to_decision_seconds",
                                        "From approvers being asked to the deciding approval or denial",
                                        labels=["decision"])
    for decision in ("approve", "deny"):
        _histogram(to_decision, [decision], t.to_decision[decision])
    to_completion = HistogramMetricFamily("recoverybot_time_to_complete_seconds",
                                          "From a case being opened to the new authenticator confirmed")
    _histogram(to_completion, [], t.to_completion)
    return [
        _counter("recoverybot_case_opens", "Cases opened; decoy names why a case can never pass "
                 "(unknown_email, case_already_open, too_many_cases) or is none", ["decoy"],
                 [((k,), opens[k]) for k in sorted(opens)]),
        _counter("recoverybot_case_transitions", "Case state changes", ["event", "from_state", "to_state"],
                 [(k, moves[k]) for k in sorted(moves)]),
        _counter("recoverybot_decisions", "Approvers' decisions (each approval of a two-approval case counts)",
                 ["decision"], [((d,), t.decisions[d]) for d in ("approve", "deny")]),
        _counter("recoverybot_approval_refusals", "Approval attempts refused, by reason", ["reason"],
                 [((r,), n) for r, n in sorted(t.refusals.items())]),
        to_decision, to_completion,
    ]


# ---- exposition -------------------------------------------------------------------------------------------

def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Exposition:
    """What one /metrics answer holds: this process's metrics (or, under gunicorn, all its processes'),
    plus any extra collectors such as the database's."""

    def __init__(self, metrics: Metrics, *extra):
        self.metrics, self.extra = metrics, extra

    def collect(self):
        path = multiprocess_dir()
        if path:
            from prometheus_client.multiprocess import MultiProcessCollector

            yield from MultiProcessCollector(None, path=path).collect()
        else:
            yield from self.metrics.registry.collect()
        for collector in self.extra:
            yield from collector.collect()

    def render(self) -> bytes:
        return generate_latest(self)


def authorized(header: str | None, token: str) -> bool:
    """With METRICS_TOKEN set, only `Authorization: Bearer <token>` may read the metrics."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def start_server(exposition: Exposition, *, host: str, port: int, token: str, healthy=lambda: True):
    """Serve /metrics (and /healthz) on a port of its own, for the worker process; returns the server."""
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    @Request.application
    def app(request: Request) -> Response:
        if request.path == "/healthz":
            ok = healthy()
            return Response('{"status": "%s"}' % ("ok" if ok else "stalled"), status=200 if ok else 503,
                            mimetype="application/json")
        if request.path != "/metrics":
            return Response("not found\n", status=404)
        if not authorized(request.headers.get("Authorization"), token):
            return Response("unauthorized\n", status=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(exposition.render(), content_type=CONTENT_TYPE)

    server = make_server(host, port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
