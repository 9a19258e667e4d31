"""Test helpers that use the product's own code paths (no mocks)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from recovery.directory.demo import demo_accounts
from recovery.directory.embedded import EmbeddedDirectory
from recovery.directory.importer import validate


def load_accounts(container, records: list[dict]) -> None:
    with container.db.transaction() as s:
        directory = EmbeddedDirectory(s, keyring=container.keyring, clock=container.clock)
        for i, rec in enumerate(records):
            raw = json.loads(json.dumps(rec, default=lambda d: d.isoformat()))
            directory.upsert(validate(raw, f"accounts[{i}]"))


def load_demo(container) -> None:
    load_accounts(container, demo_accounts(container.clock.now()))


def account(id: str, email: str, *, days_old: int = 900, events=(), balance: int = 0, **extra) -> dict:
    now = datetime.now(timezone.utc)
    return {"id": id, "email": email, "password": "pw-" + id, "locale": "en",
            "created_at": now - timedelta(days=days_old), "totp_enabled": True,
            "facts": {"first_deposit_month": "2023-05", "last_withdrawal_currency": "USDT"},
            "events": [{"type": t, "at": now - timedelta(days=d)} for t, d in events],
            "balance_usd": balance, **extra}
