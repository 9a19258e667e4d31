"""The embedded account directory: accounts kept in this bot's own SQL tables.

It works inside the caller's unit of work (the session passed in), so a factor reset commits or rolls
back together with the case transition that caused it.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from recovery import totp
from recovery.crypto import Keyring, hash_password, verify_password
from recovery.directory.interfaces import AccountProfile, SecurityEvent
from recovery.errors import ClockOutOfSync, CodeReused, DirectoryError, WrongCode
from recovery.models import Account, AccountEvent, RecoveryCode, WithdrawalHold


class EmbeddedDirectory:
    supports_password = True

    def __init__(self, session: Session, *, keyring: Keyring, clock):
        self.session, self.keyring, self.clock = session, keyring, clock

    def _profile(self, account: Account | None) -> AccountProfile | None:
        if account is None:
            return None
        events = self.session.scalars(select(AccountEvent).where(AccountEvent.account_id == account.id)
                                      .order_by(AccountEvent.at)).all()
        return AccountProfile(
            id=account.id, email=account.email, locale=account.locale, created_at=account.created_at,
            totp_enabled=account.totp_enabled, facts=dict(account.facts or {}),
            events=tuple(SecurityEvent(e.type, e.at) for e in events), balance_usd=account.balance_usd)

    def _account(self, account_id: str) -> Account:
        account = self.session.get(Account, account_id)
        if account is None:
            raise DirectoryError(f"no account {account_id!r}")
        return account

    def find_by_email(self, email: str) -> AccountProfile | None:
        email = email.strip().lower()
        return self._profile(self.session.scalar(select(Account).where(func.lower(Account.email) == email)))

    def get(self, account_id: str) -> AccountProfile | None:
        return self._profile(self.session.get(Account, account_id))

    def verify_password(self, account_id: str, password: str) -> bool:
        account = self.session.get(Account, account_id)
        return verify_password(account.password_hash if account else None, password)

    def place_hold(self, account_id: str, *, case_id: str, hours: int, reason: str) -> None:
        now = self.clock.now()
        existing = self.session.scalar(select(WithdrawalHold).where(
            WithdrawalHold.account_id == account_id, WithdrawalHold.case_id == case_id,
            WithdrawalHold.reason == reason))
        until = now + timedelta(hours=hours)
        if existing is not None:
            existing.until = max(existing.until, until)
            return
        self.session.add(WithdrawalHold(account_id=account_id, case_id=case_id, reason=reason,
                                        until=until, created_at=now))

    def replace_factor(self, account_id: str, *, secret: str, step: int, recovery_code_hashes: list[str],
                       case_id: str) -> None:
        # Runs in the caller's transaction, so the old factor is replaced, not removed then added: a
        # failure anywhere rolls both back together.
        account = self._account(account_id)
        if account.factor_case_id == case_id:
            return  # this case already replaced it
        account.totp_secret_enc = self.keyring.encrypt(secret)
        account.totp_last_step = step
        account.totp_enabled = True
        account.factor_case_id = case_id
        self.session.execute(delete(RecoveryCode).where(RecoveryCode.account_id == account_id))
        self.session.add_all(RecoveryCode(account_id=account_id, code_hash=h) for h in recovery_code_hashes)

    def verify_totp(self, account_id: str, code: str, *, now: datetime) -> bool:
        account = self._account(account_id)
        if not account.totp_enabled or not account.totp_secret_enc:
            return False
        secret = self.keyring.decrypt(account.totp_secret_enc)
        try:
            step = totp.verify(secret, code, now=now, last_step=account.totp_last_step)
        except (WrongCode, CodeReused):
            return False
        except ClockOutOfSync:
            raise
        account.totp_last_step = step
        return True

    def active_hold(self, account_id: str) -> WithdrawalHold | None:
        now = self.clock.now()
        return self.session.scalar(select(WithdrawalHold).where(
            WithdrawalHold.account_id == account_id, WithdrawalHold.until > now)
            .order_by(WithdrawalHold.until.desc()))

    # ---- administration, used by `recoverybot accounts import` and `demo-data` ------------------

    def upsert(self, record: dict) -> str:
        """Insert or replace one validated import record; returns 'created' or 'updated'."""
        account = self.session.get(Account, record["id"])
        outcome = "updated" if account else "created"
        if account is None:
            account = Account(id=record["id"])
            self.session.add(account)
        account.email = record["email"].lower()
        account.password_hash = hash_password(record["password"]) if record.get("password") else None
        account.locale = record.get("locale", "en")
        account.created_at = record["created_at"]
        account.totp_enabled = record.get("totp_enabled", False)
        account.facts = record.get("facts", {})
        account.balance_usd = record.get("balance_usd", 0)
        self.session.flush()
        self.session.execute(delete(AccountEvent).where(AccountEvent.account_id == account.id))
        self.session.add_all(AccountEvent(account_id=account.id, type=e["type"], at=e["at"])
                             for e in record.get("events", []))
        return outcome
