"""The account directory port: everything the bot needs to know about, or do to, an exchange account.

Implementations: `embedded.EmbeddedDirectory` (SQL tables, the default) and `http.HttpDirectory` (the
exchange's backend, contract in docs/account-api.md). Both are checked against this contract by the
same tests (tests/test_directory_contract.py).

There is deliberately no operation that removes a factor: the only change to an account's second factor
is `replace_factor`, called once the customer has confirmed a code from the new authenticator. A case
that ends any other way leaves the old factor exactly as it was.
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

    def place_hold(self, account_id: str, *, case_id: str, hours: int, reason: str) -> None:
        """Block withdrawals for `hours` from now. Idempotent per (case, reason): a repeat never
        shortens a hold nor adds a second one."""

    def replace_factor(self, account_id: str, *, secret: str, step: int, recovery_code_hashes: list[str],
                       case_id: str) -> None:
        """In one operation, make `secret` the account's TOTP factor in place of the old one, and
        `recovery_code_hashes` its recovery codes in place of all old ones. `step` is the time step of
        the code the customer just confirmed (stored as used, so it cannot log in again).

        Either everything changes or nothing does: there is never a moment without a factor.
        Idempotent per case: a repeat for the same `case_id` (a retry after a crash or timeout) changes
        nothing more. The secret is stored encrypted.
        """

    def verify_totp(self, account_id: str, code: str, *, now: datetime) -> bool:
        """Check a login code against the account's factor, refusing a code used before.

        Raises ClockOutOfSync when the code is a few steps off; returns False for a wrong or reused
        code. Used by tests and by the exchange's own login in the embedded demo.
        """
