"""A local HTTP server playing Slack's Web API, recording every call (as bolt-python tests itself),
plus helpers that sign requests the way Slack does."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode

from slack_sdk.signature import SignatureVerifier

TEAM = "T0OURTEAM"
SIGNING_SECRET = "slack-signing-secret-for-tests"


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog of 5 drops connections under a burst of concurrent calls
    # (the client then waits a 1 s SYN retransmit, or gets a reset); Slack's servers do not.
    request_queue_size = 128


class FakeSlack:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.fail_next: list[tuple[int, dict]] = []  # (status, headers) to answer before succeeding
        self.uploads: dict[str, bytes] = {}  # file id -> the bytes POSTed to its upload_url
        self.gates: dict[str, threading.Event] = {}  # method -> answered only once the event is set
        self.users: dict[str, str] = {}  # email -> user id, for users.lookupByEmail
        self.refuse: dict[str, str] = {}  # method -> Slack error for its calls ({"ok": false}, HTTP 200)
        self._ts = 1700000000
        self._files = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/upload/"):  # step 2 of files_upload_v2: the bytes themselves
                    file_id = self.path.rsplit("/", 1)[-1]
                    with fake.lock:
                        fake.uploads.setdefault(file_id, data)
                        fake.calls.append(("upload", {"file_id": file_id, "size": len(data),
                                                      "_auth": self.headers.get("Authorization"),
                                                      "_at": time.monotonic(), "_failed": False}))
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")
                    return
                method = self.path.strip("/").split("/")[-1]
                raw = data.decode()
                if "json" in (self.headers.get("Content-Type") or ""):
                    args = json.loads(raw or "{}")
                else:
                    args = {k: v[0] for k, v in parse_qs(raw).items()}
                    for key in ("blocks", "view", "files"):
                        if isinstance(args.get(key), str):
                            args[key] = json.loads(args[key])
                with fake.lock:
                    failure = fake.fail_next.pop(0) if fake.fail_next else None
                    fake.calls.append((method, args | {"_auth": self.headers.get("Authorization"),
                                                       "_at": time.monotonic(), "_failed": bool(failure)}))
                gate = fake.gates.get(method)
                if gate is not None:
                    gate.wait(timeout=20)  # a slow Slack: the call is recorded, its answer held back
                if failure:
                    status, headers = failure
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    body = json.dumps({"ok": False, "error": "ratelimited" if status == 429 else "fatal"}).encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                body = json.dumps(fake.answer(method, args)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"
        # a short poll, so close() (shutdown) returns within 10 ms rather than socketserver's 0.5 s
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def answer(self, method: str, args: dict) -> dict:
        if method in self.refuse:
            return {"ok": False, "error": self.refuse[method]}
        if method == "auth.test":
            return {"ok": True, "team_id": TEAM, "user_id": "UBOT", "bot_id": "BBOT"}
        if method == "chat.postMessage":
            with self.lock:
                self._ts += 1
                ts = f"{self._ts}.000100"
            return {"ok": True, "channel": args.get("channel"), "ts": ts, "message": {"ts": ts}}
        if method == "users.lookupByEmail":
            user_id = self.users.get(args.get("email", ""))
            return {"ok": True, "user": {"id": user_id, "team_id": TEAM}} if user_id else \
                {"ok": False, "error": "users_not_found"}
        if method == "chat.update":
            return {"ok": True, "channel": args.get("channel"), "ts": args.get("ts")}
        if method == "files.getUploadURLExternal":
            with self.lock:
                self._files += 1
                file_id = f"F{self._files:08d}"
            return {"ok": True, "file_id": file_id, "upload_url": self.url.replace("/api/", f"/upload/{file_id}")}
        if method == "files.completeUploadExternal":
            return {"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in args.get("files", [])]}
        return {"ok": True}

    def uploaded(self) -> list[dict]:
        """Each completed upload: the completion's arguments (channel_id, thread_ts, initial_comment) and,
        under "content", the bytes that were POSTed for it."""
        done = []
        for call in self.named("files.completeUploadExternal"):
            for f in call["files"]:
                with self.lock:
                    content = self.uploads.get(f["id"])
                done.append({k: v for k, v in call.items() if k != "files"} | {"file": f, "content": content})
        return done

    def named(self, method: str, *, ok_only: bool = True) -> list[dict]:
        with self.lock:
            return [a for m, a in self.calls if m == method and not (ok_only and a["_failed"])]

    def wait_for(self, method: str, count: int = 1, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.named(method)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"expected {count} {method} call(s), got {[m for m, _ in self.calls]}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def signed(body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None,
           content_type: str = "application/x-www-form-urlencoded") -> dict:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    sig = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig, "Content-Type": content_type}


def interaction(payload: dict) -> str:
    return urlencode({"payload": json.dumps(payload)})


def button_click(action_id: str, *, case_id: str, channel: str, message_ts: str, user: str, team: str = TEAM,
                 trigger: str = "trig-1") -> str:
    return interaction({
        "type": "block_actions", "team": {"id": team, "domain": "x"},
        "user": {"id": user, "username": user, "team_id": team}, "api_app_id": "A1", "token": "legacy",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False},
        "trigger_id": trigger, "channel": {"id": channel, "name": "approvals"},
        "message": {"type": "message", "ts": message_ts, "text": "card"},
        "actions": [{"action_id": action_id, "block_id": "decision", "value": case_id, "type": "button",
                     "action_ts": str(time.time())}]})


def submission(view: dict, *, user: str, team: str = TEAM, values: dict | None = None) -> str:
    """A view_submission of `view` (as we sent it to views.open). Slack gives each opened view an id and
    each of its versions a new hash, so every call here is a distinct submission; send the same body
    twice for a replay."""
    return interaction({
        "type": "view_submission", "team": {"id": team, "domain": "x"},
        "user": {"id": user, "username": user, "team_id": team}, "api_app_id": "A1", "token": "legacy",
        "trigger_id": "trig-2",
        "view": {"id": view.get("id") or f"V{uuid.uuid4().hex[:10].upper()}", "type": "modal",
                 "callback_id": view["callback_id"], "private_metadata": view["private_metadata"],
                 "blocks": view["blocks"], "state": {"values": values or {}}, "hash": uuid.uuid4().hex[:12],
                 "title": view["title"]}})


def slash(text: str, *, user: str, team: str = TEAM, channel: str = "C0APPROVE") -> str:
    return urlencode({"token": "legacy", "team_id": team, "team_domain": "x", "channel_id": channel,
                      "channel_name": "approvals", "user_id": user, "user_name": user, "command": "/recovery",
                      "text": text, "api_app_id": "A1", "response_url": "http://127.0.0.1:9/unused",
                      "trigger_id": "trig-3"})
