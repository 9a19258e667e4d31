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

import os
import signal
import statistics
import time
import uuid

import pytest
import requests

from tests import fault_rig

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
