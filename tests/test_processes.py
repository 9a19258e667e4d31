"""The commands a newcomer and an operator run: `recoverybot serve` and `recoverybot web` as real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from recovery import db as dbmod
from tests.conftest import SECRET, free_port

BIN = Path(sys.executable).parent / "recoverybot"


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # still starting, or busy starting
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "INTERCOM_", "DATABASE_URL", "SMTP_"))}
    return env | extra


def test_serve_runs_the_embedded_default_in_an_empty_folder(tmp_path):
    """`recoverybot serve` with no settings migrates SQLite, loads demo accounts and serves the chat."""
    port = free_port()
    proc = subprocess.Popen([str(BIN), "serve"], cwd=tmp_path, env=_env(PORT=str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(f"{base}/healthz", proc)
        assert requests.get(f"{base}/readyz", timeout=5).json()["status"] == "ok"
        page = requests.get(f"{base}/chat", timeout=5)
        assert page.status_code == 200 and "/chat/api/sessions" in page.text
        session = requests.post(f"{base}/chat/api/sessions", json={}, timeout=5).json()
        sid = session["session_id"]
        requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": "I lost my phone"}, timeout=5)
        requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": "alex@example.com"}, timeout=5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list((tmp_path / "var" / "mail").glob("*verification_code.eml")):
            time.sleep(0.1)
        assert list((tmp_path / "var" / "mail").glob("*verification_code.eml")), "no code email in var/mail"
        assert (tmp_path / "recoverybot.db").exists() and (tmp_path / ".recoverybot-secret").exists()
    finally:
        proc.terminate()
        proc.wait(10)


def _metric(text: str, sample: str) -> float:
    """The value of one exposition line, such as 'name{label="v"}'; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_web_and_worker_processes_report_readiness_and_metrics(tmp_path):
    """Under gunicorn with two processes, /readyz waits for a worker's heartbeat, /metrics needs the
    token and reports the same summed counters whichever process answers, and the worker serves its
    own /metrics and /healthz."""
    url = f"sqlite:///{tmp_path / 'web.db'}"
    dbmod.upgrade(url)
    port, worker_port = free_port(), free_port()
    env = _env(DATABASE_URL=url, SECRET_KEY=SECRET, PORT=str(port), METRICS_TOKEN="scrape-me",
               WORKER_METRICS_PORT=str(worker_port), MAIL_OUTBOX_DIR=str(tmp_path / "mail"))
    web = subprocess.Popen([str(BIN), "web", "--workers", "2"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = None
    auth = {"Authorization": "Bearer scrape-me"}
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(f"{base}/healthz", web)
        not_ready = requests.get(f"{base}/readyz", timeout=5)
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"] == {"database": "ok", "schema": "ok",
                                              "worker": "no worker has reported yet: start `recoverybot worker`"}
        assert requests.get(f"{base}/metrics", timeout=5).status_code == 401
        assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        sid = requests.post(f"{base}/chat/api/sessions", json={}, timeout=5).json()["session_id"]
        for i in range(6):
            r = requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": f"hello {i}"}, timeout=5)
            assert r.status_code == 202
        stored = 'recoverybot_inbox_events_total{outcome="stored",source="webchat"}'
        for _ in range(6):  # each scrape may be answered by either gunicorn process
            assert _metric(requests.get(f"{base}/metrics", headers=auth, timeout=5).text, stored) == 6.0

        worker = subprocess.Popen([str(BIN), "worker"], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _wait_up(f"http://127.0.0.1:{worker_port}/healthz", worker)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and requests.get(f"{base}/readyz", timeout=5).status_code != 200:
            time.sleep(0.1)
        assert requests.get(f"{base}/readyz", timeout=5).json() == {
            "status": "ok", "checks": {"database": "ok", "schema": "ok", "worker": "ok"}}
        assert requests.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).status_code == 401
        while time.monotonic() < deadline and "recoverybot_chat_reply_seconds_count" not in requests.get(
                f"http://127.0.0.1:{worker_port}/metrics", headers=auth, timeout=5).text:
            time.sleep(0.1)
        own = requests.get(f"http://127.0.0.1:{worker_port}/metrics", headers=auth, timeout=5).text
        assert _metric(own, 'recoverybot_messages_out_total{channel="webchat",result="sent"}') >= 1
        assert _metric(own, 'recoverybot_chat_reply_seconds_count{channel="webchat"}') >= 1
        assert "recoverybot_cases{" not in own, "the database's numbers come from the web processes only"
        # the database's numbers are read at most every few seconds, then served from each process's cache
        deadline, alive = time.monotonic() + 15, 0.0
        while time.monotonic() < deadline and alive != 1.0:
            alive = _metric(requests.get(f"{base}/metrics", headers=auth, timeout=5).text, "recoverybot_workers_alive")
            time.sleep(0.2)
        assert alive == 1.0
    finally:
        for proc in (worker, web):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def test_web_refuses_an_unmigrated_database(tmp_path):
    """`recoverybot web` on an empty database stops with a message saying to run `db upgrade`."""
    out = subprocess.run([str(BIN), "web"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env=_env(DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}", SECRET_KEY=SECRET))
    assert out.returncode != 0 and "recoverybot db upgrade" in out.stderr


def test_access_logs_never_show_link_tokens(tmp_path):
    """A request for /enroll/<token> is logged by `recoverybot serve` with the token masked."""
    port = free_port()
    proc = subprocess.Popen([str(BIN), "serve"], cwd=tmp_path, env=_env(PORT=str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    token = "sEcReTtOkEn_" + "x" * 30
    try:
        _wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        assert requests.get(f"http://127.0.0.1:{port}/enroll/{token}", timeout=5).status_code == 404
        assert requests.get(f"http://127.0.0.1:{port}/cancel/{token}", timeout=5).status_code == 404
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert "/enroll/[redacted]" in output and "/cancel/[redacted]" in output
    assert token not in output
