"""A local HTTP server playing Intercom's REST API, recording every call, plus webhook payloads built from
the documented shapes in tests/fixtures/intercom/ and signed the way Intercom signs them."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bot.intercom.parse import html_to_text

FIXTURES = Path(__file__).parent / "fixtures" / "intercom"
CLIENT_SECRET = "intercom-client-secret-for-tests"
ACCESS_TOKEN = "intercom-access-token-for-tests"
ADMIN_ID = "7654321"          # the bot's admin, as in the fixtures
OTHER_ADMIN_ID = "1122334"
TEAM_ID = "5017691"


def settings_for(api: "FakeIntercom", **extra) -> dict:
    """The keyword settings that turn the Intercom channel on against the fake API."""
    return {"INTERCOM_ACCESS_TOKEN": ACCESS_TOKEN, "INTERCOM_CLIENT_SECRET": CLIENT_SECRET,
            "INTERCOM_ADMIN_ID": ADMIN_ID, "INTERCOM_API_BASE": api.url,
            "INTERCOM_IDENTITY_VERIFICATION": "true", **extra}


def sign(body: bytes, secret: str = CLIENT_SECRET) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def signed_headers(body: bytes, secret: str = CLIENT_SECRET) -> dict:
    return {"X-Hub-Signature": sign(body, secret), "Content-Type": "application/json"}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def customer_event(text: str, *, conversation: str, part: str, first: bool = False,
                   contact: str = "6762f0d51bb69f9f2193bb7f", author: str = "user",
                   notification: str | None = None, attachments: list | None = None, html: bool = True) -> dict:
    """A conversation.user.created (first=True) or conversation.user.replied event for one message."""
    event = fixture("conversation.user.created" if first else "conversation.user.replied")
    item = event["data"]["item"]
    item["id"] = conversation
    msg = item["source"] if first else item["conversation_parts"]["conversation_parts"][-1]
    msg["id"] = part
    msg["body"] = f"<p>{text}</p>" if html else text
    msg["author"] = {"type": author, "id": contact, "name": "", "email": ""}
    msg["attachments"] = attachments or []
    item["contacts"]["contacts"] = [{"type": "contact", "id": contact, "external_id": None}]
    event["id"] = notification or f"notif_{conversation}_{part}"
    return event


def admin_echo(text: str, *, conversation: str, part: str, admin_id: str = ADMIN_ID,
               topic: str = "conversation.admin.replied") -> dict:
    """Our own (or another admin's) reply as Intercom sends it back."""
    event = fixture("conversation.admin.replied")
    event["topic"] = topic
    event["id"] = f"notif_echo_{conversation}_{part}"
    item = event["data"]["item"]
    item["id"] = conversation
    echoed = item["conversation_parts"]["conversation_parts"][0]
    echoed.update(id=part, body=f"<p>{text}</p>")
    echoed["author"]["id"] = admin_id
    return event


def admin_note(text: str, *, conversation: str, part: str, admin_id: str = OTHER_ADMIN_ID,
               admin_email: str = "agent@exchange.test") -> dict:
    """A teammate's internal note (`conversation.admin.noted`), as Intercom sends it."""
    event = admin_echo(text, conversation=conversation, part=part, admin_id=admin_id,
                       topic="conversation.admin.noted")
    event["id"] = f"notif_note_{conversation}_{part}"
    noted = event["data"]["item"]["conversation_parts"]["conversation_parts"][0]
    noted["part_type"] = "note"
    noted["author"].update(email=admin_email, name="Agent")
    return event


@dataclass
class Call:
    method: str
    path: str
    body: dict | None
    headers: dict
    status: int
    at: float


ERROR = {"type": "error.list", "request_id": "req-test", "errors": [{"code": "x", "message": "x"}]}


class FakeIntercom:
    """Answers the calls the bot makes; `fail_next` scripts failures (status codes) for the next POSTs to
    a conversation's reply endpoint; `files` serves upload URLs."""

    def __init__(self):
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.contacts: dict[str, dict] = {}
        self.files: dict[str, tuple[str, bytes]] = {}
        self.unknown_conversations: set[str] = set()
        self.fail_next: list[int] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body, content_type: str = "application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, status: int, body) -> None:
                with fake.lock:
                    fake.calls.append(Call(self.command, self.path, body, dict(self.headers), status,
                                           time.monotonic()))

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path.startswith("/files/"):
                    found = fake.files.get(path)
                    self._record(200 if found else 404, None)
                    if found:
                        self._answer(200, found[1], found[0])
                    else:
                        self._answer(404, b"gone", "text/plain")
                    return
                if path.startswith("/contacts/"):
                    contact = fake.contacts.get(path.rsplit("/", 1)[1])
                    status = 200 if contact else 404
                    self._record(status, None)
                    self._answer(status, contact or ERROR | {"errors": [{"code": "not_found",
                                                                         "message": "User Not Found"}]})
                    return
                self._record(404, None)
                self._answer(404, ERROR)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                parts = self.path.strip("/").split("/")
                status, answer = 200, None
                if parts[:1] == ["conversations"] and len(parts) == 3 and parts[2] in ("reply", "parts"):
                    conversation = parts[1]
                    with fake.lock:
                        failure = fake.fail_next.pop(0) if fake.fail_next and parts[2] == "reply" else None
                    if conversation in fake.unknown_conversations:
                        status, answer = 404, ERROR | {"errors": [{"code": "not_found",
                                                                   "message": "Resource Not Found"}]}
                    elif failure:
                        status, answer = failure, ERROR | {"errors": [{"code": "rate_limit_exceeded"
                                                                       if failure == 429 else "server_error",
                                                                       "message": "try later"}]}
                    else:
                        answer = {"type": "conversation", "id": conversation, "state": "open",
                                  "conversation_parts": {"type": "conversation_part.list",
                                                         "conversation_parts": [], "total_count": 0}}
                elif parts == ["conversations", "redact"]:
                    answer = {"type": "conversation", "id": body.get("conversation_id")}
                else:
                    status, answer = 404, ERROR
                self._record(status, body)
                self._answer(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # a short poll, so close() (shutdown) returns within 10 ms rather than socketserver's 0.5 s
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    # ---- set-up ----------------------------------------------------------------------------------

    def add_contact(self, contact_id: str, *, role: str, external_id: str | None = None,
                    email: str | None = None, language: str | None = None) -> None:
        self.contacts[contact_id] = {
            "type": "contact", "id": contact_id, "workspace_id": "ekd9w0ew", "external_id": external_id,
            "role": role, "email": email, "name": "", "browser_language": language,
            "language_override": None, "created_at": 1764000000, "updated_at": 1764000000}

    def add_file(self, name: str, content: bytes, content_type: str = "image/png") -> str:
        self.files[f"/files/{name}"] = (content_type, content)
        return f"{self.url}/files/{name}?expires=1764145890&signature=abc"

    # ---- what was called -------------------------------------------------------------------------

    def posts(self, *, ok_only: bool = True) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == "POST" and (c.status == 200 or not ok_only)]

    def replies(self, conversation: str | None = None, *, ok_only: bool = True,
                message_types=("comment", "quick_reply")) -> list[Call]:
        return [c for c in self.posts(ok_only=ok_only) if c.path.endswith("/reply")
                and (conversation is None or c.path == f"/conversations/{conversation}/reply")
                and c.body.get("message_type") in message_types]

    def reply_texts(self, conversation: str) -> list[str]:
        return [html_to_text(c.body["body"]) for c in self.replies(conversation)]

    def wait_for(self, predicate, timeout: float = 10, what: str = "calls"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout}s; calls: "
                             f"{[(c.method, c.path, c.status) for c in self.calls]}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()
