"""Faults cost seconds, not minutes: real `recoverybot web` and `recoverybot worker` processes on a
private PostgreSQL cluster (stopped and started here; the shared server is never touched), with
web-chat customers asking question after question.

(a) A worker SIGKILLed while it holds outbox leases, and a new worker started: the dead worker's
    messages wait for their short lease, not two minutes.
(b) PostgreSQL stopped mid-pass and started again, with no process dying: the worker gives back what its
    failed pass leased as soon as it reaches the database again; requests during the outage are answered
    503 with Retry-After (never 500), store nothing, and the same message sent again is answered once.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
import uuid
from datetime import timedelta

import pytest
import requests
from sqlalchemy import exc as sa_exc

from recovery import db as dbmod
from recovery import outbox
from recovery.outbox import Dispatcher
from tests import fault_rig
from tests.conftest import ChatClient
from tests.intercom_api import FakeIntercom, customer_event, settings_for, signed_headers
from tests.slack_api import SIGNING_SECRET, FakeSlack, signed, submission
from tests.test_reliability import RecordingSender, outbox_rows, queue_emails

BEYOND = 15.0  # seconds a reply may wait beyond the others (the target)


@pytest.fixture
def cluster():
    if fault_rig.initdb_path() is None:
        pytest.skip("initdb is not installed (looked in /usr/lib/postgresql/*/bin and on PATH): "
                    "these tests need a private PostgreSQL cluster they may stop")
    c = fault_rig.PrivateCluster()
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture
def processes(cluster, tmp_path):
    procs = fault_rig.Processes(cluster.url, tmp_path / "logs")
    yield procs
    procs.stop()


def _assert_nothing_waited(traffic, cluster, what: str, log: str) -> None:
    """Chat replies (timed by the customers) and outbox messages (emails; queued to sent, from the
    database) alike: none waits more than BEYOND seconds longer than the typical one of the run."""
    for name, delays in (("chat reply", [d for _, d in traffic.delays]),
                         ("outbox message", [d for _, d in fault_rig.outbox_delays(cluster)])):
        assert len(delays) > 10, (name, delays)
        typical, worst = statistics.median(delays), max(delays)
        assert worst - typical < BEYOND, f"a {name} waited {worst:.1f} s (typical {typical:.2f} s) after {what}\n{log}"


def test_a_worker_killed_mid_pass_delays_its_replies_by_seconds(cluster, processes):
    traffic = fault_rig.Traffic(processes.base).start()
    try:
        time.sleep(2)
        victim = processes.workers[0]
        held = fault_rig.freeze_mid_pass(cluster, victim)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        processes.start_worker()
        assert fault_rig.leased_rows(cluster) >= 1, "the kill should leave leases behind"
        time.sleep(12)  # the dead worker's lease runs out and its successor sends the rest
    finally:
        traffic.stop()
    assert not traffic.problems, traffic.problems + [processes.log_text()]
    _assert_nothing_waited(traffic, cluster, f"a kill that stranded {held} lease(s)",
                           processes.log_text())
    assert fault_rig.leased_rows(cluster) == 0
    # the dead worker's messages were answered, once each, by its successor
    assert cluster.query("SELECT count(*) FROM outbox WHERE status <> 'sent'")[0][0] == 0


def test_a_database_restart_delays_replies_by_seconds_and_answers_503_meanwhile(cluster, processes):
    traffic = fault_rig.Traffic(processes.base).start()
    probe_sid = requests.post(f"{processes.base}/chat/api/sessions", json={}, timeout=10).json()["session_id"]
    worker = processes.workers[0]
    try:
        time.sleep(2)
        held = fault_rig.freeze_mid_pass(cluster, worker)
        cluster.stop()
        os.kill(worker.pid, signal.SIGCONT)  # its pass now fails: the database cut it off mid-pass

        # During the outage: 503 with Retry-After and a clear body, for the chat, a webhook and a link page.
        text_of = {"text": "I lost my phone", "client_id": f"probe-{uuid.uuid4().hex}"}
        said = requests.post(f"{processes.base}/chat/api/sessions/{probe_sid}/messages", json=text_of, timeout=30)
        assert said.status_code == 503, said.text
        assert int(said.headers["Retry-After"]) > 0
        assert said.json()["error"] == "unavailable" and "try again" in said.json()["message"]
        polled = requests.get(f"{processes.base}/chat/api/sessions/{probe_sid}/messages", timeout=30)
        assert (polled.status_code, polled.json()["error"]) == (503, "unavailable")
        page = requests.get(f"{processes.base}/cancel/not-a-real-token", timeout=30)
        assert page.status_code == 503 and "Retry-After" in page.headers
        assert "try again" in page.text and "text/html" in page.headers["Content-Type"]
        time.sleep(1)
        cluster.start()
        time.sleep(4)
    finally:
        traffic.stop()
    assert worker.poll() is None, "the worker should ride out the restart"
    assert not traffic.problems, traffic.problems + [processes.log_text()]
    assert traffic.refused.get(503), "customers should have met the outage"
    assert not set(traffic.refused) - {503, -1}, traffic.refused  # 503s (and refused connections), no 500
    _assert_nothing_waited(traffic, cluster, f"a restart during a pass holding {held} "
                           "lease(s)", processes.log_text())
    assert fault_rig.leased_rows(cluster) == 0
    # The refused message was not stored; sent again it is stored and answered once.
    stored = cluster.query("SELECT count(*) FROM inbox_events WHERE delivery_key LIKE %s",
                           f"%{text_of['client_id']}")[0][0]
    assert stored == 0
    again = requests.post(f"{processes.base}/chat/api/sessions/{probe_sid}/messages", json=text_of, timeout=10)
    assert (again.status_code, again.json()["duplicate"]) == (202, False)


# ---- the parts, in one process: leases given back, renewed, and the wake-up --------------------------

@pytest.fixture
def private_url(cluster):
    dbmod.upgrade(cluster.url)
    return cluster.url


class StopsTheDatabase:
    """A sender (the network edge) during whose first send the database goes away, as in a restart."""

    def __init__(self, cluster, sent: list):
        self.cluster, self.sent = cluster, sent

    def send(self, message: outbox.Outgoing) -> None:
        self.sent.append(message.idempotency_key)
        if len(self.sent) == 1:
            self.cluster.stop()


def test_a_pass_cut_off_by_the_database_gives_back_its_leases_when_it_returns(cluster, private_url,
                                                                            make_container):
    c = make_container(private_url)
    keys = [f"faults:blip:{i}" for i in range(5)]
    queue_emails(c, keys)
    sent: list[str] = []
    dispatcher = Dispatcher(c.db, keyring=c.keyring, clock=c.clock, senders={"email": StopsTheDatabase(cluster, sent)})

    with pytest.raises(sa_exc.OperationalError):
        dispatcher.run_once()  # the first message went out; recording it, and giving back the rest, failed
    cluster.start()
    leased = cluster.query("SELECT count(*) FROM outbox WHERE lease_until > now()")[0][0]
    assert leased == len(keys), "with the database down, nothing could be given back yet"

    # The next pass gives them back first, so it sends them at once instead of after the lease.
    assert dispatcher.run_once() == len(keys)
    assert sorted(sent) == sorted(keys + keys[:1])  # the first one again: at least once, same key
    rows = outbox_rows(c)
    assert {r.status for r in rows} == {"sent"}
    # The untried messages got their attempt back: a database blip does not use up their retries.
    assert [r.attempts for r in rows] == [2, 1, 1, 1, 1]


def leased(c) -> int:
    return sum(1 for row in outbox_rows(c) if row.lease_until is not None)


def holding_the_batch(c, dispatcher, count: int) -> threading.Thread:
    """A pass of `dispatcher` in a thread, returned once it holds all `count` messages (so another
    dispatcher polling from then on competes with a pass in progress, not with its start)."""
    worker = threading.Thread(target=dispatcher.run_once)
    worker.start()
    deadline = time.monotonic() + 10
    while leased(c) < count:
        assert time.monotonic() < deadline, "the dispatcher never leased the batch"
        time.sleep(0.01)
    return worker


def test_a_send_slower_than_the_lease_keeps_it(pg_url, make_container):
    """The renewer keeps a batch's leases while one send takes longer than a whole lease, so a second
    dispatcher polling meanwhile takes nothing. (A dispatcher that dies holding leases loses them within
    the lease: the SIGKILL test above.)"""
    lease = timedelta(seconds=1.2)
    c = make_container(pg_url)
    keys = [f"faults:slow:{i}" for i in range(3)]
    queue_emails(c, keys)
    log, lock = [], threading.Lock()
    slow = Dispatcher(c.db, keyring=c.keyring, clock=c.clock, lease=lease,
                      senders={"email": RecordingSender("slow", log, lock, delay=1.5)})
    other = Dispatcher(c.db, keyring=c.keyring, clock=c.clock, lease=lease,
                       senders={"email": RecordingSender("other", log, lock)})
    taken = []
    worker = holding_the_batch(c, slow, len(keys))
    while worker.is_alive():
        taken.append(other.run_once())
        time.sleep(0.1)
    worker.join()
    assert sum(taken) == 0 and len(taken) > 20, taken
    assert sorted(log) == sorted((k, "slow") for k in keys)


def test_a_slow_pass_lets_go_of_what_it_has_not_started_on(pg_url, make_container):
    """A pass whose sends are slow keeps the message it is sending, but past `hold_untried` lets the rest
    of its batch go: an idle dispatcher sends those instead of waiting behind it, and every message is
    sent exactly once."""
    c = make_container(pg_url)
    keys = [f"faults:hold:{i}" for i in range(4)]
    queue_emails(c, keys)
    log, lock = [], threading.Lock()
    slow = Dispatcher(c.db, keyring=c.keyring, clock=c.clock, lease=timedelta(seconds=1.2),
                      hold_untried=timedelta(seconds=1), senders={"email": RecordingSender("slow", log, lock, delay=2.0)})
    other = Dispatcher(c.db, keyring=c.keyring, clock=c.clock,
                       senders={"email": RecordingSender("other", log, lock)})
    worker = holding_the_batch(c, slow, len(keys))
    while worker.is_alive():
        other.run_once()
        time.sleep(0.05)
    worker.join()
    other.run_once()
    senders = dict(log)
    assert sorted(senders) == sorted(keys) and len(log) == len(keys), log  # each sent once
    assert senders[keys[0]] == "slow"
    assert sum(1 for who in senders.values() if who == "other") >= 2, log
    assert {r.status for r in outbox_rows(c)} == {"sent"}
    assert all(r.attempts == 1 for r in outbox_rows(c)), [r.attempts for r in outbox_rows(c)]


def test_the_worker_wakes_on_notify_and_listens_again_after_a_restart(cluster, private_url, live, make_container):
    """A worker that polls only every 30 s answers a message stored by another process at once, and
    still does after PostgreSQL restarted under it."""
    web = live(private_url, worker=False)
    worker = make_container(private_url, WORKER_IDLE_SECONDS=30)
    runner = threading.Thread(target=worker.worker.run_forever, daemon=True)
    runner.start()
    try:
        time.sleep(1)  # past its first (empty) passes: from now on it sleeps 30 s unless woken
        chat = ChatClient(web.url)
        started = time.monotonic()
        assert "email address" in chat.ask("I lost my authenticator", timeout=5)
        first = time.monotonic() - started

        cluster.stop()
        cluster.start()
        time.sleep(3)  # the listener reconnects (within 2 s); the woken pass finds nothing
        started = time.monotonic()
        chat = ChatClient(web.url)
        assert "email address" in chat.ask("I lost my authenticator", timeout=10)
        second = time.monotonic() - started
    finally:
        worker.worker.stop()
        runner.join(10)
    assert first < 5 and second < 10, (first, second)


def test_webhooks_meeting_a_stopped_database_get_503_and_store_nothing(cluster, private_url, live):
    """Intercom's webhook and Slack's route, with the database really stopped: 503 with Retry-After (the
    sender retries), not 500; once it is back, the same Intercom event is stored."""
    intercom, slack = FakeIntercom(), FakeSlack()
    try:
        server = live(private_url, worker=False, **settings_for(intercom),
                      SLACK_BOT_TOKEN="xoxb-test-token", SLACK_SIGNING_SECRET=SIGNING_SECRET,
                      SLACK_APPROVAL_CHANNEL="C0APPROVE", SLACK_APPROVER_IDS="UALICE", SLACK_API_URL=slack.url)
        event = json.dumps(customer_event("I lost my phone", conversation="147000000901", part="1", first=True))
        modal = {"callback_id": "approve_modal", "private_metadata": "RC-NOSUCH01|C0APPROVE", "blocks": [],
                 "title": {"type": "plain_text", "text": "Approve reset"}}
        click = submission(modal, user="UALICE")
        cluster.stop()

        hook = requests.post(f"{server.url}/webhooks/intercom", data=event.encode(),
                             headers=signed_headers(event.encode()), timeout=30)
        assert hook.status_code == 503 and int(hook.headers["Retry-After"]) > 0, hook.text
        assert hook.json()["error"] == "unavailable"
        decided = requests.post(f"{server.url}/slack/events", data=click, headers=signed(click), timeout=30)
        assert decided.status_code == 503 and int(decided.headers["Retry-After"]) > 0, decided.text
        assert decided.json()["error"] == "unavailable"

        cluster.start()
        assert cluster.query("SELECT count(*) FROM inbox_events")[0][0] == 0
        again = requests.post(f"{server.url}/webhooks/intercom", data=event.encode(),
                              headers=signed_headers(event.encode()), timeout=30)
        assert (again.status_code, again.json()["status"]) == (200, "stored")
    finally:
        intercom.close()
        slack.close()


def test_an_inbox_event_cut_off_by_a_database_restart_keeps_its_attempts(cluster, private_url, make_container):
    """A restart while an event is being handled says nothing about the event: it is not processed, it
    keeps all five attempts, and the next pass after the restart processes it."""
    from recovery import inbox
    from sqlalchemy import text

    c = make_container(private_url)
    assert inbox.store(c.db, source="webchat", delivery_key="faults:inbox:1", conversation_key="conv-1",
                       payload={"text": "hello"}, now=c.clock.now())

    def restarted_midway(session, event):
        cluster.stop()
        session.execute(text("SELECT 1"))  # the connection is gone

    with pytest.raises(sa_exc.DBAPIError) as raised:
        inbox.process_one(c.db, restarted_midway, c.clock.now)
    assert raised.value.connection_invalidated
    cluster.start()
    assert cluster.query("SELECT attempts, processed_at FROM inbox_events")[0] == (0, None)

    handled = []
    assert inbox.process_one(c.db, lambda session, event: handled.append(event.delivery_key), c.clock.now)
    assert handled == ["faults:inbox:1"]
    assert cluster.query("SELECT attempts, processed_at IS NOT NULL FROM inbox_events")[0] == (0, True)


def test_only_a_database_that_cannot_be_reached_counts_as_an_outage(cluster, pg_url, tmp_path):
    """503 and 'retry' are for a database that is away; a statement timeout, a lock timeout or a schema
    error is an error of the request itself, shown as such (500, with its traceback logged)."""
    from sqlalchemy import create_engine, text

    from recovery.db import is_outage

    def error_of(engine, *statements):
        try:
            with engine.begin() as conn:
                for sql in statements:
                    conn.execute(text(sql))
        except Exception as exc:  # noqa: BLE001 - what is raised is the subject
            return exc
        raise AssertionError(f"{statements} raised nothing")

    pg = create_engine(pg_url)
    assert not is_outage(error_of(pg, "SET LOCAL statement_timeout = 1", "SELECT pg_sleep(0.5)"))
    assert not is_outage(error_of(pg, "SELECT * FROM no_such_table"))
    pg.dispose()
    lite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    assert not is_outage(error_of(lite, "SELECT * FROM no_such_table"))
    lite.dispose()

    private = create_engine(cluster.url)
    cluster.stop()
    assert is_outage(error_of(private, "SELECT 1"))  # refused: nothing listens
    cluster.start()
    with private.connect() as conn:  # a pooled connection that the restart below cuts off
        conn.execute(text("SELECT 1"))
        cluster.stop()
        cluster.start()
        try:
            conn.execute(text("SELECT 1"))
            raise AssertionError("the connection outlived the restart")
        except Exception as exc:  # noqa: BLE001
            assert is_outage(exc), exc
    private.dispose()
