"""What a starting process says: in a few lines, what runs where."""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

log = logging.getLogger("recoverybot.startup")


def freeze_heap() -> None:
    """Takes what a process has built before it serves (modules, templates, mappers, the intent model:
    about 125,000 objects) out of the garbage collector's sight.

    A full collection otherwise walks all of them every time: 30 to 70 ms with the interpreter held, which
    a burst of requests meets as one stall for every request in flight (a burst of 50 Slack clicks was
    acked 160 to 550 ms late). They live as long as the process, so nothing that could be freed is kept,
    and the garbage made while building is collected first."""
    gc.collect()
    gc.freeze()


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def summary(c, role: str) -> list[tuple[str, str]]:
    s = c.settings
    base = s.PUBLIC_BASE_URL.rstrip("/")
    lines = []
    if role in ("serve", "web"):
        lines += [("listening", f"http://{s.HOST}:{s.PORT} (public address {base})"),
                  ("chat", f"{base}/chat"),
                  ("metrics", f"{base}/metrics, " + ("bearer token required" if s.METRICS_TOKEN
                                                     else "open to anyone who reaches the port (set METRICS_TOKEN)"))]
    if role == "worker":
        lines.append(("metrics", f"http://{s.HOST}:{s.WORKER_METRICS_PORT}/metrics" if s.WORKER_METRICS_PORT
                      else "not served (WORKER_METRICS_PORT=0)"))
    try:
        revision = c.db.revision()
    except Exception as exc:  # noqa: BLE001 - the summary reports, it does not stop the start
        revision = f"unknown: {type(exc).__name__}"
    lines.append(("database", f"{safe_url(s.DATABASE_URL)} (schema {revision})"))
    if s.SMTP_URL:
        url = urlsplit(s.SMTP_URL)  # host and port only, never the password
        lines.append(("mail", f"{url.scheme.upper()} {url.hostname}:{url.port or 'default port'} as {s.MAIL_FROM}"))
    else:
        lines.append(("mail", f"written to the folder {Path(s.MAIL_OUTBOX_DIR).resolve()} (SMTP_URL unset)"))
    customers = "built-in web chat"
    if s.intercom_enabled:
        customers += f", Intercom (webhook {base}/webhooks/intercom)"
    lines.append(("customers", customers))
    if s.slack_enabled:
        how = "Socket Mode" if s.SLACK_APP_TOKEN else f"{base}/slack/events"
        lines.append(("approvals", f"Slack channel {s.SLACK_APPROVAL_CHANNEL} ({how})"))
    else:
        lines.append(("approvals", "recoverybot cases approve CASE_ID --approver NAME "
                                   f"(local approvers: {', '.join(s.LOCAL_APPROVERS)})"))
    lines.append(("accounts", "embedded directory" if s.ACCOUNT_DIRECTORY == "embedded"
                  else f"exchange backend at {s.ACCOUNT_API_URL}"))
    return lines


def announce(c, role: str) -> None:
    lines = summary(c, role)
    if c.settings.LOG_FORMAT == "json":
        log.info("Recovery Bot %s started", role, extra={"startup": dict(lines)})
        return
    log.info("Recovery Bot %s started", role)
    for label, text in lines:
        log.info("  %-9s %s", label, text)
