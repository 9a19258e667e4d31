"""HttpDirectory against a real local HTTP server that plays the exchange's backend (docs/account-api.md)."""
from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from recovery.directory.http import HttpDirectory
from recovery.directory.interfaces import AccountProfile, SecurityEvent
from recovery.errors import ClockOutOfSync, ConfigError, DirectoryError, DirectoryUnavailable

TOKEN = "tok-s3cr3t-never-shown"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)

MEI = {
    "id": "acct-1001", "email": "mei@example.com", "locale": "zh-TW",
    "created_at": "2023-05-02T08:00:00Z", "totp_enabled": True,
    "facts": {"first_deposit_month": "2023-05", "last_withdrawal_currency": "USDT"},
    "events": [{"type": "withdrawal", "at": "2026-11-25T09:30:00+01:00"},
               {"type": "password_changed", "at": "2026-11-20T10:00:00Z"}],
    "balance_usd": 12500,
}


class Backend:
    """A scripted backend: `routes[(method, path)]` is (status, body); body is JSON-able, bytes or None."""

    def __init__(self):
        self.routes: dict[tuple[str, str], tuple[int, object]] = {}
        self.calls: list[dict] = []
        self.delay = 0.0


def _handler(backend: Backend):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            backend.calls.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                  "json": json.loads(raw) if raw else None})
            if backend.delay:
                time.sleep(backend.delay)
            status, body = backend.routes.get((self.command, self.path), (404, {"error": "not_found"}))
            payload = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the timeout test)

        do_GET = do_POST = _serve

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def backend():
    state = Backend()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def directory(backend):
    return HttpDirectory(base_url=backend.url, token=TOKEN, timeout=2.0)


def _only_call(backend: Backend) -> dict:
    assert len(backend.calls) == 1
    return backend.calls[0]


# ---- lookups ------------------------------------------------------------------------------------

def test_find_by_email_builds_the_profile(backend, directory):
    """An email lookup posts the lowercased address with the bearer token and builds a UTC profile."""
    backend.routes[("POST", "/api/v1/accounts/lookup")] = (200, MEI)
    profile = directory.find_by_email("  Mei@Example.COM ")
    call = _only_call(backend)
    assert call["json"] == {"email": "mei@example.com"}
    assert call["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert "Idempotency-Key" not in call["headers"]
    assert profile == AccountProfile(
        id="acct-1001", email="mei@example.com", locale="zh-TW",
        created_at=datetime(2023, 5, 2, 8, 0, tzinfo=timezone.utc), totp_enabled=True,
        facts={"first_deposit_month": "2023-05", "last_withdrawal_currency": "USDT"},
        events=(SecurityEvent("password_changed", datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)),
                SecurityEvent("withdrawal", datetime(2026, 11, 25, 8, 30, tzinfo=timezone.utc))),
        balance_usd=12500)
    assert profile.created_at.utcoffset().total_seconds() == 0


def test_find_by_email_unknown_is_none(backend, directory):
    """A 404 on an email lookup means no such account and returns None."""
    assert directory.find_by_email("nobody@example.com") is None
    assert _only_call(backend)["json"] == {"email": "nobody@example.com"}


def test_find_by_email_refuses_another_address(backend, directory):
    """A lookup answered with an account for a different email is a DirectoryError, not that account."""
    backend.routes[("POST", "/api/v1/accounts/lookup")] = (200, dict(MEI, email="eve@example.com"))
    with pytest.raises(DirectoryError, match="another address"):
        directory.find_by_email("mei@example.com")


def test_get_found_and_not_found(backend, directory):
    """GET /accounts/{id} returns the profile, with optional fields defaulted, and 404 gives None."""
    minimal = {"id": "acct 7/x", "email": "a@example.com", "created_at": "2024-01-01T00:00:00Z",
               "totp_enabled": False}
    backend.routes[("GET", "/api/v1/accounts/acct%207%2Fx")] = (200, minimal)
    profile = directory.get("acct 7/x")
    assert (profile.id, profile.locale, profile.facts, profile.events, profile.balance_usd) == \
           ("acct 7/x", "en", {}, (), 0)
    assert directory.get("acct-404") is None
    assert [c["path"] for c in backend.calls] == ["/api/v1/accounts/acct%207%2Fx", "/api/v1/accounts/acct-404"]


# ---- password -----------------------------------------------------------------------------------

def test_verify_password_true_and_false(backend, directory):
    """The password goes in the JSON body and the backend's boolean comes back; unknown accounts are False."""
    route = ("POST", "/api/v1/accounts/acct-1001/password/verify")
    backend.routes[route] = (200, {"ok": True})
    assert directory.verify_password("acct-1001", "hunter2") is True
    backend.routes[route] = (200, {"ok": False})
    assert directory.verify_password("acct-1001", "wrong") is False
    assert directory.verify_password("acct-404", "x") is False
    assert [c["json"] for c in backend.calls] == [{"password": "hunter2"}, {"password": "wrong"},
                                                  {"password": "x"}]


# ---- changes ------------------------------------------------------------------------------------

def test_place_hold_sends_hours_reason_and_key_per_reason(backend, directory):
    """A hold posts case, hours and reason, keyed per case and reason so two kinds of hold both apply."""
    backend.routes[("POST", "/api/v1/accounts/acct-1001/holds")] = (201, {"until": "2026-12-03T12:00:00Z"})
    directory.place_hold("acct-1001", case_id="case-9", hours=48, reason="2fa_recovery")
    directory.place_hold("acct-1001", case_id="case-9", hours=168, reason="owner_dispute")
    first, second = backend.calls
    assert first["json"] == {"case_id": "case-9", "hours": 48, "reason": "2fa_recovery"}
    assert first["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert first["headers"]["Idempotency-Key"] == "recoverybot:case-9:hold:2fa_recovery"
    assert second["headers"]["Idempotency-Key"] == "recoverybot:case-9:hold:owner_dispute"


def test_replace_factor_sends_secret_step_and_hashes_keyed_per_case(backend, directory):
    """A replacement posts secret, step and recovery-code hashes in one call, with an Idempotency-Key that
    names the case only, so a retry for the same case is answered from the first call."""
    backend.routes[("POST", "/api/v1/accounts/acct-1001/2fa/replace")] = (200, {})
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    directory.replace_factor("acct-1001", secret=secret, step=58_000_000, recovery_code_hashes=["h1", "h2"],
                             case_id="case-9")
    directory.replace_factor("acct-1001", secret=secret, step=58_000_001, recovery_code_hashes=["h3", "h4"],
                             case_id="case-9")
    directory.replace_factor("acct-1001", secret=secret, step=58_000_002, recovery_code_hashes=["h5"],
                             case_id="case-10")
    first, retry, other = backend.calls
    assert first["json"] == {"case_id": "case-9", "secret": secret, "step": 58_000_000,
                             "recovery_code_hashes": ["h1", "h2"]}
    assert first["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert first["headers"]["Idempotency-Key"] == "recoverybot:case-9:replace_factor"
    assert retry["headers"]["Idempotency-Key"] == first["headers"]["Idempotency-Key"]
    assert other["headers"]["Idempotency-Key"] == "recoverybot:case-10:replace_factor"


def test_replace_factor_unknown_account_is_an_error(backend, directory):
    """Replacing the factor of an account the backend does not know raises DirectoryError."""
    with pytest.raises(DirectoryError, match="404"):
        directory.replace_factor("acct-404", secret="JBSWY3DPEHPK3PXP", step=1, recovery_code_hashes=[],
                                 case_id="case-9")


# ---- TOTP check ---------------------------------------------------------------------------------

def test_verify_totp_ok_and_wrong(backend, directory):
    """A login code is posted with the bot's time and the backend's boolean is returned."""
    route = ("POST", "/api/v1/accounts/acct-1001/2fa/verify")
    backend.routes[route] = (200, {"ok": True})
    assert directory.verify_totp("acct-1001", "123 456", now=NOW) is True
    backend.routes[route] = (200, {"ok": False, "reason": "wrong_code"})
    assert directory.verify_totp("acct-1001", "000000", now=NOW) is False
    assert backend.calls[0]["json"] == {"code": "123456", "at": "2026-12-01T12:00:00Z"}


def test_verify_totp_clock_skew_raises(backend, directory):
    """A clock_skew answer raises ClockOutOfSync carrying the backend's drift."""
    backend.routes[("POST", "/api/v1/accounts/acct-1001/2fa/verify")] = (
        200, {"ok": False, "reason": "clock_skew", "drift_seconds": -90})
    with pytest.raises(ClockOutOfSync) as caught:
        directory.verify_totp("acct-1001", "123456", now=NOW)
    assert caught.value.drift_seconds == -90


# ---- failures -----------------------------------------------------------------------------------

def test_server_error_is_directory_error(backend, directory):
    """A 5xx or 429 answer raises DirectoryUnavailable (worth trying again later) naming the status; a
    refused token, an unexpected 4xx or a malformed body raise a DirectoryError that is not one."""
    for status in (500, 502, 503, 429):
        backend.routes[("GET", "/api/v1/accounts/acct-1001")] = (status, {"error": "boom"})
        with pytest.raises(DirectoryUnavailable, match=str(status)):
            directory.get("acct-1001")
    for status, body in ((401, {}), (400, {}), (409, {}), (200, {"not": "an account"})):
        backend.routes[("GET", "/api/v1/accounts/acct-1001")] = (status, body)
        with pytest.raises(DirectoryError) as caught:
            directory.get("acct-1001")
        assert not isinstance(caught.value, DirectoryUnavailable), (status, caught.value)


def test_malformed_json_is_directory_error(backend, directory):
    """A 200 whose body is not JSON, or JSON that breaks the contract, raises DirectoryError."""
    route = ("GET", "/api/v1/accounts/acct-1001")
    bad_bodies = [b"<html>oops</html>", [MEI], dict(MEI, created_at="yesterday"),
                  dict(MEI, created_at="2023-05-02T08:00:00"), dict(MEI, totp_enabled="yes"),
                  dict(MEI, facts={"n": 1}), dict(MEI, events=[{"type": "withdrawal"}]),
                  {k: v for k, v in MEI.items() if k != "email"}]
    for body in bad_bodies:
        backend.routes[route] = (200, body)
        with pytest.raises(DirectoryError):
            directory.get("acct-1001")
    backend.routes[("POST", "/api/v1/accounts/acct-1001/2fa/verify")] = (200, {"ok": "true"})
    with pytest.raises(DirectoryError):
        directory.verify_totp("acct-1001", "123456", now=NOW)


def test_refused_token_is_directory_error_without_token(backend, directory):
    """A 401 raises DirectoryError pointing at the token setting without quoting the token."""
    backend.routes[("POST", "/api/v1/accounts/lookup")] = (401, {"error": "bad token " + TOKEN})
    with pytest.raises(DirectoryError, match="ACCOUNT_API_TOKEN") as caught:
        directory.find_by_email("mei@example.com")
    assert TOKEN not in str(caught.value)


def test_connection_refused_is_directory_error():
    """A backend that is not listening raises DirectoryError without the token in it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = HttpDirectory(base_url=f"http://127.0.0.1:{port}", token=TOKEN, timeout=1.0)
    with pytest.raises(DirectoryUnavailable) as caught:
        directory.verify_password("acct-1001", "hunter2")
    assert TOKEN not in str(caught.value) and "hunter2" not in str(caught.value)


def test_timeout_is_directory_error(backend):
    """A backend slower than the timeout raises DirectoryError saying so."""
    backend.delay = 0.5
    directory = HttpDirectory(base_url=backend.url, token=TOKEN, timeout=0.1)
    with pytest.raises(DirectoryUnavailable, match="no answer") as caught:
        directory.replace_factor("acct-1001", secret="JBSWY3DPEHPK3PXP", step=1, recovery_code_hashes=[],
                                 case_id="case-9")
    assert TOKEN not in str(caught.value) and "JBSWY3DPEHPK3PXP" not in str(caught.value)


def test_errors_never_carry_secrets(backend, directory):
    """No raised error message, nor the directory's repr, contains the token, password or secret."""
    backend.routes[("POST", "/api/v1/accounts/acct-1001/password/verify")] = (502, b"echo hunter2 " + TOKEN.encode())
    backend.routes[("POST", "/api/v1/accounts/acct-1001/2fa/replace")] = (200, b"not json hunter2")
    with pytest.raises(DirectoryError) as first:
        directory.verify_password("acct-1001", "hunter2")
    with pytest.raises(DirectoryError) as second:
        directory.replace_factor("acct-1001", secret="JBSWY3DPEHPK3PXP", step=1, recovery_code_hashes=[],
                                 case_id="case-9")
    for text in (str(first.value), str(second.value), repr(directory)):
        assert TOKEN not in text and "hunter2" not in text and "JBSWY3DPEHPK3PXP" not in text


def test_plain_http_only_for_localhost():
    """The constructor refuses plain http to a remote host and a missing token."""
    with pytest.raises(ConfigError, match="https"):
        HttpDirectory(base_url="http://accounts.exchange.internal", token=TOKEN)
    with pytest.raises(ConfigError, match="ACCOUNT_API_TOKEN"):
        HttpDirectory(base_url="https://accounts.exchange.internal", token="")
    assert HttpDirectory(base_url="https://accounts.exchange.internal/", token=TOKEN).base_url == \
        "https://accounts.exchange.internal"
