#!/usr/bin/env python
"""Does the chat's reply to an email address arrive later when the address has an account?

    .venv/bin/pip install -e '.[bench]'                  # scipy, for the Mann-Whitney U test
    .venv/bin/python benchmarks/enumeration_timing.py    # five configurations, about 3 minutes
    options: --samples N (per group, default 50)  --configs mailer:directory:probe,...  --smtp-delay S
             --backend-delay S  --poll-interval S  --seed N  --json FILE

Each configuration starts the product itself, `recoverybot serve`, in a scratch folder (SQLite), with
- mailer `smtp`: SMTP_URL pointing at a real SMTP server (aiosmtpd) in a process of its own that waits
  --smtp-delay seconds per message, like a slow relay; or `folder`: no SMTP_URL (the folder mailer);
- directory `embedded`: accounts imported with `recoverybot accounts import`; or `http`: the exchange's
  account backend played by the project's test double of docs/account-api.md, in a process of its own,
  answering each call after --backend-delay seconds like a remote service.
Then, one customer at a time, in a shuffled order of N registered and N unknown addresses, a new chat
session says "I lost my authenticator", names the address and, for probe `resend` or `cancel`, goes on to
ask for that. The sample is the time from the last message's POST to the bot's reply being visible through
the chat API (polled every --poll-interval). Every registered address belongs to its own account, so each
start is a real one that emails a code and a notice.

It prints each group's median, the ratio registered/unknown, and a two-sided Mann-Whitney U test: a p
above 0.05 means the two groups' reply times cannot be told apart. Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SECRET = "bench-secret-key-0123456789-abcdefghijklmnop"
# A hundred starts from one address in a minute is the point here, not an attack: lift the per-address limit.
POLICY = json.dumps({"case_starts_per_ip_per_hour": 10_000, "attempts_per_ip_per_hour": 10_000})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_smtp(port: int, delay: float, received) -> None:
    """The SMTP server's own process: kept apart from the client measuring reply times, so its work
    (parsing each message) never competes with the measurement, as a real mail relay would not."""
    import asyncio

    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            await asyncio.sleep(delay)
            with received.get_lock():
                received.value += 1
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    while True:
        time.sleep(3600)


class SlowSmtp:
    """A real SMTP server (aiosmtpd, in a process of its own) that takes `delay` seconds per message."""

    def __init__(self, delay: float):
        import multiprocessing

        self.port = free_port()
        self._received = multiprocessing.Value("i", 0)
        self.process = multiprocessing.Process(target=_serve_smtp, args=(self.port, delay, self._received),
                                               daemon=True)
        self.process.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the SMTP server did not start")

    @property
    def received(self) -> int:
        return self._received.value

    def stop(self):
        self.process.terminate()
        self.process.join(5)


def recoverybot(*args: str, env: dict, cwd: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("recoverybot")
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, check=True)


def start_server(folder: str, env: dict, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("recoverybot")
    proc = subprocess.Popen([str(exe), "serve", "--no-demo"], env=env, cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers import wait_until_answers

    try:
        wait_until_answers(f"http://127.0.0.1:{port}/healthz", timeout=60, process=proc)
    except AssertionError as exc:
        proc.kill()
        raise SystemExit(f"recoverybot serve did not come up: {exc}") from None
    return proc


def wait_reply(base: str, session_id: str, after: int, poll: float, timeout: float = 30.0) -> tuple[float, int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = requests.get(f"{base}/chat/api/sessions/{session_id}/messages", params={"after": after},
                                timeout=10).json()["messages"]
        bot = [m for m in messages if m["sender"] == "bot"]
        if bot:
            return time.perf_counter(), bot[-1]["seq"], bot[-1]["text"]
        if messages:
            after = messages[-1]["seq"]
        time.sleep(poll)
    raise SystemExit(f"no reply within {timeout} s")


def one_sample(base: str, address: str, probe: str, poll: float) -> tuple[float, str]:
    """A new chat names `address`; then, for probe "resend" or "cancel", asks for that. Returns the time from
    the last message's POST to the bot's reply, and the reply."""
    created = requests.post(f"{base}/chat/api/sessions", json={"locale": "en"}, timeout=10).json()
    sid, after = created["session_id"], created["messages"][-1]["seq"]
    steps = ["I lost my authenticator", address] + {"start": [], "resend": ["resend the code"],
                                                    "cancel": ["cancel"]}[probe]
    for text in steps[:-1]:
        requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": text}, timeout=10)
        _, after, _ = wait_reply(base, sid, after, poll)
    sent = time.perf_counter()
    requests.post(f"{base}/chat/api/sessions/{sid}/messages", json={"text": steps[-1]}, timeout=10)
    seen, _, text = wait_reply(base, sid, after, poll)
    return (seen - sent) * 1000, text


def _serve_backend(accounts: list[dict], delay: float, ports) -> None:
    """The exchange's account backend (the project's test double of docs/account-api.md), in a process of
    its own, answering every call after `delay` seconds like a remote service."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.account_backend import AccountBackend

    backend = AccountBackend(delay=delay)
    for record in accounts:
        backend.add(record)
    ports.put(backend.url)
    while True:
        time.sleep(3600)


def run(mailer: str, directory: str, probe: str, args) -> dict:
    import multiprocessing

    from scipy.stats import mannwhitneyu

    folder = tempfile.mkdtemp(prefix=f"rb-timing-{mailer}-{directory}-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "SLACK_", "INTERCOM_", "ACCOUNT_"))}
    env.update(DATABASE_URL=f"sqlite:///{folder}/bot.db", SECRET_KEY=SECRET, PORT=str(port), HOST="127.0.0.1",
               RISK_POLICY=POLICY, LOG_LEVEL="WARNING", MAIL_OUTBOX_DIR=f"{folder}/mail")
    smtp = SlowSmtp(args.smtp_delay) if mailer == "smtp" else None
    if smtp:
        env["SMTP_URL"] = f"smtp://127.0.0.1:{smtp.port}"
    known = [f"bench{i}@example.com" for i in range(args.samples)]
    accounts = [{"id": f"acct-bench-{i}", "email": a, "locale": "en", "created_at": "2023-05-02T08:00:00Z",
                 "totp_enabled": True, "facts": {"first_deposit_month": "2023-05"}} for i, a in enumerate(known)]
    backend = None
    recoverybot("db", "upgrade", env=env, cwd=folder)
    if directory == "http":
        ports = multiprocessing.Queue()
        backend = multiprocessing.Process(target=_serve_backend, args=(accounts, args.backend_delay, ports),
                                          daemon=True)
        backend.start()
        env.update(ACCOUNT_DIRECTORY="http", ACCOUNT_API_URL=ports.get(timeout=30),
                   ACCOUNT_API_TOKEN="backend-token-for-tests")
    else:
        Path(folder, "accounts.json").write_text(json.dumps({"accounts": accounts}))
        recoverybot("accounts", "import", "accounts.json", env=env, cwd=folder)
    proc = start_server(folder, env, port)
    base = f"http://127.0.0.1:{port}"
    letters = random.Random(args.seed)
    unknown = [f"nobody.{''.join(letters.choices('abcdefghijklmnopqrstuvwxyz', k=8))}@example.com"
               for _ in range(args.samples)]
    order = [("registered", a) for a in known] + [("unknown", a) for a in unknown]
    random.Random(args.seed).shuffle(order)
    samples: dict[str, list[float]] = {"registered": [], "unknown": []}
    texts: dict[str, set[str]] = {"registered": set(), "unknown": set()}  # every reply text seen
    try:
        one_sample(base, "warmup@example.com", probe, args.poll_interval)
        for group, address in order:
            ms, text = one_sample(base, address, probe, args.poll_interval)
            samples[group].append(ms)
            texts[group].add(text)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if smtp is not None:
            smtp.stop()
        if backend is not None:
            backend.terminate()
    test = mannwhitneyu(samples["registered"], samples["unknown"], alternative="two-sided")
    med = {g: statistics.median(v) for g, v in samples.items()}
    return {"mailer": mailer, "directory": directory, "probe": probe, "n": args.samples,
            "smtp_delay_s": args.smtp_delay if smtp else None,
            "backend_delay_s": args.backend_delay if directory == "http" else None,
            "median_ms": med, "p90_ms": {g: sorted(v)[int(0.9 * len(v)) - 1] for g, v in samples.items()},
            "ratio_registered_to_unknown": med["registered"] / med["unknown"],
            "mann_whitney_u": float(test.statistic), "p_value": float(test.pvalue),
            "same_text": texts["registered"] == texts["unknown"] and len(texts["registered"]) == 1,
            "texts": {g: sorted(t) for g, t in texts.items()},
            "emails_accepted_by_smtp_during_run": smtp.received if smtp else None}


CONFIGS = ("smtp:embedded:start", "folder:embedded:start", "folder:http:start", "folder:http:resend",
           "folder:http:cancel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--smtp-delay", type=float, default=0.2)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated mailer:directory:probe (mailer smtp|folder, directory embedded|http, "
                             "probe start|resend|cancel)")
    parser.add_argument("--backend-delay", type=float, default=0.03,
                        help="seconds the http account backend takes per call")
    parser.add_argument("--poll-interval", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--json", help="write the results to this file as well")
    args = parser.parse_args()
    results = [run(*config.split(":"), args) for config in args.configs.split(",")]
    print(f"{'mailer':7} {'directory':9} {'probe':7} {'n':>3} {'registered p50':>15} {'unknown p50':>12} "
          f"{'ratio':>6} {'U':>6} {'p':>6}  same text")
    for r in results:
        print(f"{r['mailer']:7} {r['directory']:9} {r['probe']:7} {r['n']:>3} {r['median_ms']['registered']:>12.1f} ms "
              f"{r['median_ms']['unknown']:>9.1f} ms {r['ratio_registered_to_unknown']:>6.3f} "
              f"{r['mann_whitney_u']:>6.0f} {r['p_value']:>6.3f}  {r['same_text']}")
    for r in results:
        verdict = "cannot be told apart" if r["p_value"] > 0.05 else "DIFFER"
        print(f"{r['mailer']}/{r['directory']}/{r['probe']}: reply times for registered and unknown addresses "
              f"{verdict} (p = {r['p_value']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
