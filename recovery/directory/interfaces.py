"""The account directory port: everything the bot needs to know about, or do to, an exchange account.

Implementations: `embedded.EmbeddedDirectory` (SQL tables, the default) and `http.HttpDirectory` (the
exchange's backend, contract in docs/account-api.md). Both are checked against this contract by the
same tests (tests/test_directory_contract.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

SECURITY_EVENT_TYPES = ("password_changed", "email_changed", "phone_changed", "new_device_login",
                        "withdrawal")


@dataclass(frozen=True)
class SecurityEvent:
    type: str
    at: datetime


@dataclass(frozen=True)
class AccountProfile:
    """What the bot may know about an account. It carries no password hash and no TOTP secret."""
    id: str
    email: str
    locale: str
    created_at: datetime
    totp_enabled: bool
    facts: dict[str, str] = field(default_factory=dict)
    events: tuple[SecurityEvent, ...] = ()
    balance_usd: int = 0


class AccountDirectory(Protocol):
    supports_password: bool
    """True when `verify_password` can check the account password (the enroll page then asks)."""

    def find_by_email(self, email: str) -> AccountProfile | None:
        """The account whose registered email equals `email` (case-insensitive), or None.

        Callers must not reveal to a customer which of the two happened.
        """

    def get(self, account_id: str) -> AccountProfile | None:
        """The account with this id, or None."""

    def verify_password(self, account_id: str, password: str) -> bool:
        """True when `password` is the account's password. Never raises for a wrong password."""

    def reset_factor(self, account_id: str, *, case_id: str) -> None:
        """Remove the account's current TOTP factor and recovery codes. Idempotent."""

    def place_hold(self, account_id: str, *, case_id: str, hours: int, reason: str) -> None:
        """Block withdrawals for `hours` from now. Idempotent per case."""

    def bind_totp(self, account_id: str, *, secret: str, step: int, recovery_code_hashes: list[str],
                  case_id: str) -> None:
        """Make `secret` the account's TOTP factor; `step` is the already-used time step.

        The secret is stored encrypted; recovery codes arrive hashed and replace any old ones.
        """

    def verify_totp(self, account_id: str, code: str, *, now: datetime) -> bool:
        """Check a login code against the account's factor, refusing a code used before.

        Raises ClockOutOfSync when the code is a few steps off; returns False for a wrong or reused
        code. Used by tests and by the exchange's own login in the embedded demo.
        """
