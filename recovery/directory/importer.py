"""Validation of the account import file (DESIGN.md section 7). Errors name the bad record and field."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from recovery.directory.interfaces import SECURITY_EVENT_TYPES
from recovery.errors import ImportProblem

ACCOUNT_KEYS = {"id", "email", "password", "locale", "created_at", "totp_enabled", "facts", "events",
                "balance_usd"}
REQUIRED = ("id", "email", "created_at")
LOCALES = ("en", "zh-TW")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def parse_time(value, where: str) -> datetime:
    if not isinstance(value, str):
        raise ImportProblem(where, "must be an ISO 8601 time string such as 2023-05-02T08:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ImportProblem(where, f"{value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ImportProblem(where, f"{value!r} has no time zone; add Z for UTC")
    return parsed.astimezone(timezone.utc)


def load(text: str) -> list[dict]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportProblem("file", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise ImportProblem("file", 'must be a JSON object like {"accounts": [...]}')
    unknown = sorted(set(doc) - {"accounts"})
    if unknown:
        raise ImportProblem("file", f"unknown keys: {', '.join(unknown)}")
    accounts = doc.get("accounts")
    if not isinstance(accounts, list):
        raise ImportProblem("accounts", "must be a list")
    out, seen_ids, seen_emails = [], set(), set()
    for i, raw in enumerate(accounts):
        rec = validate(raw, f"accounts[{i}]")
        if rec["id"] in seen_ids:
            raise ImportProblem(f"accounts[{i}].id", f"duplicate id {rec['id']!r}")
        if rec["email"] in seen_emails:
            raise ImportProblem(f"accounts[{i}].email", "duplicate email")
        seen_ids.add(rec["id"])
        seen_emails.add(rec["email"])
        out.append(rec)
    return out


def validate(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ImportProblem(where, "must be an object")
    unknown = sorted(set(raw) - ACCOUNT_KEYS)
    if unknown:
        raise ImportProblem(where, f"unknown keys: {', '.join(unknown)}")
    for key in REQUIRED:
        if key not in raw:
            raise ImportProblem(where, f"missing {key!r}")
    rec = dict(raw)
    if not isinstance(rec["id"], str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", rec["id"]):
        raise ImportProblem(f"{where}.id", "must be 1-64 letters, digits or _.:-")
    if not isinstance(rec["email"], str) or not EMAIL.match(rec["email"]) or len(rec["email"]) > 320:
        raise ImportProblem(f"{where}.email", f"{rec['email']!r} is not an email address")
    rec["email"] = rec["email"].strip().lower()
    if "password" in rec and (not isinstance(rec["password"], str) or not rec["password"]):
        raise ImportProblem(f"{where}.password", "must be a non-empty string")
    if rec.setdefault("locale", "en") not in LOCALES:
        raise ImportProblem(f"{where}.locale", f"must be one of {', '.join(LOCALES)}")
    rec["created_at"] = parse_time(rec["created_at"], f"{where}.created_at")
    if not isinstance(rec.setdefault("totp_enabled", False), bool):
        raise ImportProblem(f"{where}.totp_enabled", "must be true or false")
    balance = rec.setdefault("balance_usd", 0)
    if not isinstance(balance, int) or isinstance(balance, bool) or balance < 0:
        raise ImportProblem(f"{where}.balance_usd", "must be a non-negative whole number")
    facts = rec.setdefault("facts", {})
    if not isinstance(facts, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in facts.items()):
        raise ImportProblem(f"{where}.facts", "must be an object of strings")
    events = rec.setdefault("events", [])
    if not isinstance(events, list):
        raise ImportProblem(f"{where}.events", "must be a list")
    parsed_events = []
    for j, ev in enumerate(events):
        ew = f"{where}.events[{j}]"
        if not isinstance(ev, dict) or set(ev) != {"type", "at"}:
            raise ImportProblem(ew, 'must be {"type": ..., "at": ...}')
        if ev["type"] not in SECURITY_EVENT_TYPES:
            raise ImportProblem(f"{ew}.type", f"must be one of {', '.join(SECURITY_EVENT_TYPES)}")
        parsed_events.append({"type": ev["type"], "at": parse_time(ev["at"], f"{ew}.at")})
    rec["events"] = parsed_events
    return rec
