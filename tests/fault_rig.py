"""Real processes for fault tests and the fault benchmark: a private PostgreSQL cluster that may be
stopped and started at will (never the shared server), `recoverybot web` and `recoverybot worker`
against it, and web-chat customers who time every reply."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests

from tests.conftest import SECRET, free_port
from tests.helpers import wait_until_answers

BIN = Path(sys.executable).parent / "recoverybot"
OPENING = "I lost my authenticator"
# Many case starts from one address (127.0.0.1) within the hour: lift the per-address limits.
LIMITS = ('{"case_starts_per_ip_per_hour": 1000000, "attempts_per_ip_per_hour": 1000000, '
          '"case_starts_per_contact_per_hour": 1000000}')


def initdb_path() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which("initdb")


class PrivateCluster:
    """A PostgreSQL cluster in a temporary folder on a free port, for this run only. initdb refuses to
    run as root, so as root the cluster belongs to the `postgres` OS user."""

    def __init__(self):
        initdb = initdb_path()
        if initdb is None:
            raise FileNotFoundError("initdb not found (no /usr/lib/postgresql/*/bin/initdb, none on PATH)")
        self.bin = Path(initdb).parent
        self.root = Path(tempfile.mkdtemp(prefix="recoverybot-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self.as_user = None
        if os.geteuid() == 0:
            self.as_user = "postgres"
            owner = pwd.getpwnam(self.as_user)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        # Durability is not under test here: no fsync keeps a 2-core machine's disk out of the figures.
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "-t", "30", "start")

    def stop(self) -> None:
        """A fast shutdown, as a restart or failover does: open sessions are cut off at once."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, sql: str, *params):
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()


def process_env(url: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLACK_", "INTERCOM_", "DATABASE_URL", "SMTP_", "WORKER_", "WEB_"))}
    return env | {"DATABASE_URL": url, "SECRET_KEY": SECRET, "LOG_LEVEL": "WARNING",
                  "WORKER_METRICS_PORT": "0", "RISK_POLICY": LIMITS} | extra


class Processes:
    """`recoverybot web` (gunicorn, one process) and any number of `recoverybot worker`s."""

    def __init__(self, url: str, logs: Path, **env):
        self.url, self.logs = url, logs
        self.env = process_env(url, **{"MAIL_OUTBOX_DIR": str(logs.parent / "mail")} | env)
        logs.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(BIN), "db", "upgrade"], env=self.env, check=True, capture_output=True, timeout=120)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.web = self._spawn("web", "web", "--workers", "1", PORT=str(self.port))
        self.workers: list[subprocess.Popen] = []
        self.start_worker()
        self._wait_web()

    def _spawn(self, name: str, *args: str, **env) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        try:
            return subprocess.Popen([str(BIN), *args], env=self.env | env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start_worker(self, **env) -> subprocess.Popen:
        proc = self._spawn(f"worker{len(self.workers)}", "worker", **env)
        self.workers.append(proc)
        return proc

    def _wait_web(self, timeout: float = 30) -> None:
        wait_until_answers(f"{self.base}/healthz", timeout=timeout, process=self.web,
                           output=lambda: (self.logs / "web.log").read_text())

    def stop(self) -> None:
        for proc in [self.web, *self.workers]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [self.web, *self.workers]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.glob("*.log")))


@dataclass
class Traffic:
    """Customers who each ask a question, wait for the answer, and ask again. Every answered question
    is kept as (sent at, reply delay) on time.monotonic(); requests refused during an outage are
    counted by status and sent again, as the page's script does."""
    base: str
    customers: int = 4
    pause: float = 0.05
    delays: list[tuple[float, float]] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.give_up_at = float("inf")
        self.threads = [threading.Thread(target=self._customer, args=(i,), daemon=True)
                        for i in range(self.customers)]

    def start(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def stop(self, wait: float = 30) -> None:
        """Stop asking; wait (up to `wait` s in all) for the answers still owed."""
        self.give_up_at = time.monotonic() + wait
        self.stop_event.set()
        for t in self.threads:
            t.join(max(0.0, self.give_up_at - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            self.problems.append(f"answers still owed {wait:.0f} s after the traffic stopped")

    def _request(self, method: str, url: str, **kw):
        """Retry through an outage: connection errors and 503s are sent again after a short pause."""
        while time.monotonic() < self.give_up_at:
            try:
                r = requests.request(method, url, timeout=10, **kw)
            except requests.RequestException as exc:
                with self.lock:
                    self.refused[-1] = self.refused.get(-1, 0) + 1
                    if len(self.problems) < 20:
                        self.problems.append(f"{method} {url}: {type(exc).__name__}")
                time.sleep(0.2)
                continue
            if r.status_code >= 500:
                with self.lock:
                    self.refused[r.status_code] = self.refused.get(r.status_code, 0) + 1
                if r.status_code != 503 and len(self.problems) < 20:
                    self.problems.append(f"{method} {url}: {r.status_code} {r.text[:200]}")
                time.sleep(0.2)
                continue
            return r
        raise TimeoutError(f"{method} {url}: still failing when the traffic stopped")

    def _customer(self, n: int) -> None:
        try:
            self._cases(n)
        except TimeoutError as exc:
            self.problems.append(str(exc))

    def _cases(self, n: int) -> None:
        """Start a case with an address that has no account, again and again: every start sends its
        emails through the outbox exactly as for a real account (the mailer drops them at the end)."""
        asked = 0
        while not self.stop_event.is_set():
            session = self._request("POST", f"{self.base}/chat/api/sessions", json={"locale": "en"}).json()
            sid, after = session["session_id"], max(m["seq"] for m in session["messages"])
            for text in (OPENING, f"nobody-{n}-{asked}-{uuid.uuid4().hex[:8]}@example.com"):
                asked += 1
                after = self._ask(sid, after, text, client_id=f"c{n}-{asked}")
                if after is None:
                    return
            time.sleep(self.pause)

    def _ask(self, sid: str, after: int, text: str, client_id: str) -> int | None:
        sent = time.monotonic()
        # resent after a 503 with the same client_id, it is still stored once
        r = self._request("POST", f"{self.base}/chat/api/sessions/{sid}/messages",
                          json={"text": text, "client_id": client_id})
        if r.status_code != 202:
            self.problems.append(f"message refused: {r.status_code} {r.text[:200]}")
            return None
        while True:
            page = self._request("GET", f"{self.base}/chat/api/sessions/{sid}/messages",
                                 params={"after": after}).json()["messages"]
            answered = False
            for m in page:
                after = m["seq"]
                answered = answered or m["sender"] == "bot"
            if answered:
                with self.lock:
                    self.delays.append((sent, time.monotonic() - sent))
                return after
            if time.monotonic() > self.give_up_at:
                self.problems.append(f"no reply to {client_id} {time.monotonic() - sent:.0f} s after it was sent")
                return None
            time.sleep(0.02)


def outbox_delays(cluster: PrivateCluster) -> list[tuple[float, float]]:
    """(queued at, seconds from queued to sent) of every outbox message, on the epoch clock; one not
    sent yet counts as waiting until now."""
    return [(float(a), float(d)) for a, d in cluster.query(
        "SELECT extract(epoch FROM created_at), extract(epoch FROM coalesce(sent_at, now()) - created_at) "
        "FROM outbox ORDER BY id")]


def leased_rows(cluster: PrivateCluster) -> int:
    """Outbox messages leased to a pass that has not finished them."""
    return cluster.query("SELECT count(*) FROM outbox WHERE status = 'pending' "
                         "AND lease_until IS NOT NULL")[0][0]


def freeze_mid_pass(cluster: PrivateCluster, proc: subprocess.Popen, timeout: float = 20) -> int:
    """Stop (SIGSTOP) the worker at a moment it holds outbox leases, so what follows (a SIGKILL, a
    database restart) lands mid-pass; returns how many messages it holds. The check runs after the
    stop, so a pass that finished in between is seen, and the worker is let go to try again."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute("SELECT 1 FROM outbox WHERE status = 'pending' AND "
                            "lease_until IS NOT NULL LIMIT 1").fetchone():
                os.kill(proc.pid, signal.SIGSTOP)
                held = conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending' AND "
                                    "lease_until > now()").fetchone()[0]
                if held:
                    return held
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.001)
    raise AssertionError("the worker never held an outbox lease long enough to be stopped mid-pass")


def summary(delays: list[float]) -> dict:
    ordered = sorted(delays)
    return {"n": len(ordered), "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], "max": ordered[-1]}
