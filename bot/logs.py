"""Logging set-up, through structlog's formatter for the standard library's log records.

- `LOG_FORMAT=text` (default) writes one readable line per record; `json` writes one JSON object.
- Context is bound once and appears on every line it concerns: the request id for a web request (taken
  from `X-Request-ID` when a proxy sent a sane one), and the case id as soon as a unit of work creates,
  changes or moves a case (seen through SQLAlchemy events, so the domain needs no logging calls).
- Link tokens travel in URL paths, so access logs (werkzeug's and gunicorn's) are filtered to mask
  them; the chat page's polls and health and metrics probes are left out of access logs unless
  LOG_POLLS is set; Bolt's request-body logging and Alembic's start-up chatter are kept quiet.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session
from structlog.contextvars import bind_contextvars, clear_contextvars, get_contextvars, unbind_contextvars

from recovery.models import Case

TOKEN_PATH = re.compile(r"/(enroll|cancel|lock)/[A-Za-z0-9_\-]+")
# GETs that arrive every second or so from every open chat page and every probe
POLL_PATH = re.compile(r"^/(chat/api/sessions/[A-Za-z0-9_\-]+/messages|healthz|readyz|metrics)(\?|$)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ACCESS_LINE = re.compile(r'"GET (\S+) HTTP/[0-9.]+" (\d{3})')
CASE_KEYS = ("case_id",)
_MARK = "_recoverybot_handler"


class RedactTokens(logging.Filter):
    """Masks link tokens in access lines (and drops werkzeug's terminal colours, which logs do not need)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is passed through untouched
            return True
        redacted = TOKEN_PATH.sub(lambda m: f"/{m.group(1)}/[redacted]", ANSI.sub("", message))
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class QuietPolls(logging.Filter):
    """Drops access-log lines of successful polls and probes (werkzeug's and gunicorn's formats both
    quote the request line and follow it with the status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            found = ACCESS_LINE.search(ANSI.sub("", record.getMessage()))
        except Exception:  # noqa: BLE001 - a malformed record is passed through untouched
            return True
        return not (found and POLL_PATH.match(found.group(1)) and int(found.group(2)) < 400)


def _text(_logger, _name, event_dict) -> str:
    """One readable line: time, level, logger, message, then the bound context as key=value."""
    head = (f"{event_dict.pop('timestamp', '')} {event_dict.pop('level', '').upper()} "
            f"{event_dict.pop('logger', '')}: {event_dict.pop('event', '')}")
    trace = event_dict.pop("exception", None)
    extra = " ".join(f"{k}={v}" for k, v in sorted(event_dict.items()))
    return head + (f"  [{extra}]" if extra else "") + (f"\n{trace}" if trace else "")


def make_handler(fmt: str = "text") -> logging.Handler:
    """A stderr handler rendering every standard-library record through structlog."""
    pre_chain = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(allow=("startup",)),  # the start-up summary's fields, in JSON
    ]
    renderer = structlog.processors.JSONRenderer(ensure_ascii=False) if fmt == "json" else _text
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer])
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    setattr(handler, _MARK, True)
    return handler


def _add_filter(name: str, flt: logging.Filter) -> None:
    logger = logging.getLogger(name)
    if not any(type(f) is type(flt) for f in logger.filters):
        logger.addFilter(flt)


def configure(level: str | int, fmt: str = "text", *, log_polls: bool = False) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(make_handler(fmt))
    root.setLevel(level)
    for name in ("werkzeug", "gunicorn.access", "gunicorn.error"):
        _add_filter(name, RedactTokens())
    quiet = [logging.getLogger(n) for n in ("werkzeug", "gunicorn.access")]
    for logger in quiet:
        if log_polls:
            logger.filters = [f for f in logger.filters if not isinstance(f, QuietPolls)]
        else:
            _add_filter(logger.name, QuietPolls())
    # On a failed signature check Bolt logs the whole request body, which is customer data.
    logging.getLogger("slack_bolt").setLevel(logging.WARNING)
    # Alembic announces each plugin and each step at INFO; start-up says the schema revision instead.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def gunicorn_logconfig(level: str, fmt: str) -> dict:
    """gunicorn's logging: its own loggers propagate to our handler on the root logger, in the master
    and in every worker, so access lines are masked, quiet about polls and formatted like the rest."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"recoverybot": {"()": "bot.logs.make_handler", "fmt": fmt}},
        "root": {"level": level, "handlers": ["recoverybot"]},
        "loggers": {name: {"level": "INFO", "handlers": [], "propagate": True}
                    for name in ("gunicorn.error", "gunicorn.access")},
    }


# ---- context bound once per unit of work ---------------------------------------------------------------

def start_request(request_id: str) -> None:
    """A web request begins: forget the previous request's context (threads are reused)."""
    clear_contextvars()
    bind_contextvars(request_id=request_id)


@contextmanager
def unit_of_work():
    """One item of the worker's loop: its case id, once bound, does not leak into the next item."""
    unbind_contextvars(*CASE_KEYS)
    try:
        yield
    finally:
        unbind_contextvars(*CASE_KEYS)


def bind_case(case_id: str | None) -> None:
    if case_id and get_contextvars().get("case_id") != case_id:
        bind_contextvars(case_id=case_id)


@event.listens_for(Case, "refresh")
def _case_refreshed(case, _context, _attrs):
    # recovery.machine.fire refreshes the case right after moving it, before anything is logged
    bind_case(case.id)


@event.listens_for(Session, "after_flush")
def _case_written(session, _flush_context):
    for obj in list(session.new) + list(session.dirty):
        if isinstance(obj, Case):
            bind_case(obj.id)
            return
