"""Demo accounts for the embedded default, one per risk level, with times relative to now."""
from __future__ import annotations

from datetime import datetime, timedelta


def demo_accounts(now: datetime) -> list[dict]:
    def ago(**delta) -> datetime:
        return now - timedelta(**delta)

    return [
        {   # low risk: old account, nothing changed lately
            "id": "acct-1001", "email": "alex@example.com", "password": "correct horse battery",
            "locale": "en", "created_at": ago(days=900), "totp_enabled": True,
            "facts": {"first_deposit_month": "2023-05", "last_withdrawal_currency": "USDT"},
            "events": [{"type": "withdrawal", "at": ago(days=40)}], "balance_usd": 1200,
        },
        {   # medium risk: password changed a few days ago
            "id": "acct-1002", "email": "mei@example.com", "password": "mei-demo-password",
            "locale": "zh-TW", "created_at": ago(days=600), "totp_enabled": True,
            "facts": {"first_deposit_month": "2024-02", "last_withdrawal_currency": "TWD"},
            "events": [{"type": "password_changed", "at": ago(days=3)}], "balance_usd": 800,
        },
        {   # high risk: email changed recently and a large balance
            "id": "acct-1003", "email": "sam@example.com", "password": "sam-demo-password",
            "locale": "en", "created_at": ago(days=20), "totp_enabled": True,
            "facts": {"first_deposit_month": "2026-11", "last_withdrawal_currency": "BTC"},
            "events": [{"type": "email_changed", "at": ago(days=2)}], "balance_usd": 250_000,
        },
    ]
