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
        except requests.ConnectionError:
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
        assert requests.get(f"{base}/readyz", timeout=5).json() == {"status": "ok"}
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


def test_web_serves_under_gunicorn(tmp_path):
    """`recoverybot web` answers health, readiness and metrics under gunicorn."""
    url = f"sqlite:///{tmp_path / 'web.db'}"
    dbmod.upgrade(url)
    port = free_port()
    proc = subprocess.Popen([str(BIN), "web", "--workers", "1"], cwd=tmp_path,
                            env=_env(DATABASE_URL=url, SECRET_KEY=SECRET, PORT=str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(f"{base}/healthz", proc)
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        metrics = requests.get(f"{base}/metrics", timeout=5)
        assert metrics.status_code == 200 and "recoverybot_inbox_events_total" in metrics.text
    finally:
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
