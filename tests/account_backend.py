"""A local HTTP server playing the exchange's account backend by the contract in docs/account-api.md,
with state: accounts, passwords, factors, holds and idempotency keys. The `http` directory is tested
against it the same way as the embedded one (tests/test_directory_contract.py)."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from recovery import totp
from recovery.errors import ClockOutOfSync, CodeReused, WrongCode

TOKEN = "backend-token-for-tests"


def record(account_id: str, email: str) -> dict:
    """An account as the backend sends it (docs/account-api.md): 2FA on, the usual facts."""
    return {"id": account_id, "email": email, "locale": "en", "created_at": "2023-05-02T08:00:00Z",
            "totp_enabled": True, "facts": {"first_deposit_month": "2023-05", "last_withdrawal_currency": "USDT"}}


class AccountBackend:
    def __init__(self, *, delay: float = 0.0):
        self.delay = delay                       # seconds every answer takes, like a remote backend
        self.accounts: dict[str, dict] = {}      # id -> account JSON (as the contract returns it)
        self.passwords: dict[str, str] = {}
        self.factors: dict[str, dict] = {}       # id -> {"secret", "last_step", "recovery_code_hashes"}
        self.holds: list[dict] = []              # {"account_id", "case_id", "reason", "until"}
        self.answers: dict[str, tuple[int, dict]] = {}  # Idempotency-Key -> first answer
        self.failing: set[str] = set()  # path endings (e.g. "2fa/replace") answered 503, doing nothing
        self.lost_answers: set[str] = set()  # path endings whose work is done but answered 503 (a timeout)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(*backend.route("GET", self.path, None, self.headers))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(*backend.route("POST", self.path, json.loads(raw or b"{}"), self.headers))

            def _answer(self, status: int, body: dict | None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def settings(self) -> dict:
        """The settings that point the bot's `http` directory here."""
        return {"ACCOUNT_DIRECTORY": "http", "ACCOUNT_API_URL": self.url, "ACCOUNT_API_TOKEN": TOKEN}

    def add(self, record: dict, *, password: str | None = None) -> None:
        self.accounts[record["id"]] = record
        if password is not None:
            self.passwords[record["id"]] = password

    # ---- the contract ---------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: dict | None, headers) -> tuple[int, dict | None]:
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, {"error": "unauthorized"}
        path = path.removeprefix("/v1")
        self.requests.append((method, path))
        if self.delay:
            time.sleep(self.delay)
        if any(path.endswith(ending) for ending in self.failing):
            return 503, {"error": "unavailable"}
        with self.lock:
            key = headers.get("Idempotency-Key")
            if key and key in self.answers:
                return self.answers[key]
            answer = self._route(method, path, body or {})
            if key and 200 <= answer[0] < 300:
                self.answers[key] = answer
            if any(path.endswith(ending) for ending in self.lost_answers):
                return 503, {"error": "the answer was lost"}
            return answer

    def _route(self, method: str, path: str, body: dict) -> tuple[int, dict | None]:
        if (method, path) == ("POST", "/accounts/lookup"):
            found = [a for a in self.accounts.values() if a["email"].lower() == body.get("email")]
            return (200, found[0]) if found else (404, {"error": "not_found"})
        parts = path.split("/")
        if len(parts) < 3 or parts[1] != "accounts":
            return 404, {"error": "not_found"}
        account_id, rest = unquote(parts[2]), "/".join(parts[3:])
        if account_id not in self.accounts:
            return 404, {"error": "not_found"}
        if (method, rest) == ("GET", ""):
            return 200, self.accounts[account_id]
        if (method, rest) == ("POST", "password/verify"):
            known = self.passwords.get(account_id)
            return 200, {"ok": known is not None and body.get("password") == known}
        if (method, rest) == ("POST", "2fa/replace"):
            self.factors[account_id] = {"secret": body["secret"], "last_step": body["step"],
                                        "recovery_code_hashes": list(body["recovery_code_hashes"])}
            self.accounts[account_id] = dict(self.accounts[account_id], totp_enabled=True)
            return 204, None
        if (method, rest) == ("POST", "holds"):
            existing = [h for h in self.holds if (h["account_id"], h["case_id"], h["reason"]) ==
                        (account_id, body["case_id"], body["reason"])]
            until = datetime.now(timezone.utc) + timedelta(hours=body["hours"])
            if existing:
                existing[0]["until"] = max(existing[0]["until"], until)
            else:
                self.holds.append({"account_id": account_id, "case_id": body["case_id"], "reason": body["reason"],
                                   "until": until})
            return 201, {"until": until.isoformat()}
        if (method, rest) == ("POST", "2fa/verify"):
            return 200, self._verify(account_id, body)
        return 404, {"error": "not_found"}

    def _verify(self, account_id: str, body: dict) -> dict:
        factor = self.factors.get(account_id)
        if factor is None:
            return {"ok": False, "reason": "not_enrolled"}
        at = datetime.fromisoformat(body["at"].replace("Z", "+00:00"))
        try:
            factor["last_step"] = totp.verify(factor["secret"], body["code"], now=at, last_step=factor["last_step"])
        except ClockOutOfSync as exc:
            return {"ok": False, "reason": "clock_skew", "drift_seconds": exc.drift_seconds}
        except CodeReused:
            return {"ok": False, "reason": "reused"}
        except WrongCode:
            return {"ok": False, "reason": "wrong_code"}
        return {"ok": True}
