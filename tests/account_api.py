"""A local HTTP server playing the exchange's account backend (docs/account-api.md) over a dict of
accounts, for tests that need the `http` directory with more than one account."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

TOKEN = "account-api-token-for-tests"


class FakeExchange:
    """Answers lookups and reads from `accounts` (id -> account JSON); every change is acknowledged."""

    def __init__(self, accounts: list[dict]):
        self.accounts = {a["id"]: a for a in accounts}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body=None):
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._answer(401, {"error": "unauthorized"})
                account = fake.accounts.get(unquote(self.path.removeprefix("/accounts/")))
                self._answer(200 if account else 404, account or {"error": "not_found"})

            def do_POST(self):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._answer(401, {"error": "unauthorized"})
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/accounts/lookup":
                    found = [a for a in fake.accounts.values() if a["email"] == body.get("email")]
                    return self._answer(200 if found else 404, found[0] if found else {"error": "not_found"})
                if self.path.endswith("/password/verify"):
                    return self._answer(200, {"ok": False})
                self._answer(204)  # reset, hold, bind: acknowledged

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def settings(self) -> dict:
        return {"ACCOUNT_DIRECTORY": "http", "ACCOUNT_API_URL": self.url, "ACCOUNT_API_TOKEN": TOKEN}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
