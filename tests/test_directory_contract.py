"""The account directory port's contract (recovery/directory/interfaces.py), checked the same way against
both implementations: the embedded one on a real SQLite database, and the http one against a local server
that plays the exchange's backend by docs/account-api.md (tests/account_backend.py)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyotp
import pytest
from sqlalchemy import select

from recovery import db as dbmod, totp
from recovery.clock import ManualClock
from recovery.crypto import Keyring
from recovery.directory.embedded import EmbeddedDirectory
from recovery.directory.http import HttpDirectory
from recovery.directory.importer import validate
from recovery.directory.interfaces import AccountDirectory
from recovery.errors import ClockOutOfSync
from recovery.models import WithdrawalHold
from tests.account_backend import TOKEN, AccountBackend

NOW = datetime.now(timezone.utc).replace(microsecond=0)
RECORD = {"id": "acct-7.x", "email": "Mei@Example.com", "locale": "zh-TW", "created_at": "2023-05-02T08:00:00Z",
          "totp_enabled": True, "facts": {"first_deposit_month": "2023-05"},
          "events": [{"type": "password_changed", "at": "2026-11-20T10:00:00Z"}], "balance_usd": 12500}
PASSWORD = "correct horse battery"


class Embedded:
    def __init__(self, tmp_path):
        url = f"sqlite:///{tmp_path / 'contract.db'}"
        dbmod.upgrade(url)
        self.db = dbmod.Database(url)
        self.keyring, self.clock = Keyring("contract-secret-key-0123456789-abcdef"), ManualClock(NOW)
        with self.db.transaction() as s:
            raw = dict(RECORD, email=RECORD["email"].lower(), password=PASSWORD)
            self._dir(s).upsert(validate(raw, "accounts[0]"))

    def _dir(self, session) -> EmbeddedDirectory:
        return EmbeddedDirectory(session, keyring=self.keyring, clock=self.clock)

    def call(self, method: str, *args, **kwargs):
        with self.db.transaction() as s:  # each call its own unit of work, as the services use it
            return getattr(self._dir(s), method)(*args, **kwargs)

    def holds(self) -> list[tuple[str, str]]:
        with self.db.transaction() as s:
            return [(h.case_id, h.reason) for h in s.scalars(select(WithdrawalHold).order_by(WithdrawalHold.id))]

    def close(self):
        self.db.dispose()


class Http:
    def __init__(self, tmp_path):
        self.backend = AccountBackend()
        self.backend.add(dict(RECORD, email=RECORD["email"].lower(), totp_enabled=False), password=PASSWORD)
        self.directory = HttpDirectory(base_url=self.backend.url, token=TOKEN, timeout=5)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.directory, method)(*args, **kwargs)

    def holds(self) -> list[tuple[str, str]]:
        return [(h["case_id"], h["reason"]) for h in self.backend.holds]

    def close(self):
        self.backend.close()


@pytest.fixture(params=["embedded", "http"])
def impl(request, tmp_path):
    made = (Embedded if request.param == "embedded" else Http)(tmp_path)
    yield made
    made.close()


def _code(secret: str, at: datetime) -> str:
    return pyotp.TOTP(secret).at(at)


def test_lookups_find_the_account_case_insensitively_and_nothing_else(impl):
    """find_by_email ignores case and spaces and answers None for an unknown address; get answers by id."""
    profile = impl.call("find_by_email", "  MEI@example.COM ")
    assert (profile.id, profile.email, profile.locale) == ("acct-7.x", "mei@example.com", "zh-TW")
    assert profile.facts == {"first_deposit_month": "2023-05"} and profile.balance_usd == 12500
    assert [e.type for e in profile.events] == ["password_changed"]
    assert impl.call("find_by_email", "nobody@example.com") is None
    assert impl.call("get", "acct-7.x").email == "mei@example.com"
    assert impl.call("get", "acct-missing") is None


def test_password_check_is_true_only_for_the_password(impl):
    """verify_password is True for the password, False for anything else, and never raises for a wrong one."""
    assert impl.call("verify_password", "acct-7.x", PASSWORD) is True
    assert impl.call("verify_password", "acct-7.x", PASSWORD + " ") is False
    assert impl.call("verify_password", "acct-7.x", "") is False
    assert impl.call("verify_password", "acct-missing", PASSWORD) is False


def test_replace_factor_swaps_old_for_new_in_one_step_and_once_per_case(impl):
    """After replace_factor only the new secret's codes log in (the confirming code's step is spent); a repeat
    for the same case changes nothing, and a later case's replacement does apply."""
    old, new, later = totp.new_secret(), totp.new_secret(), totp.new_secret()
    step = int(NOW.timestamp()) // totp.STEP
    impl.call("replace_factor", "acct-7.x", secret=old, step=step - 10, recovery_code_hashes=["h0"],
              case_id="enrollment")
    assert impl.call("verify_totp", "acct-7.x", _code(old, NOW), now=NOW) is True
    impl.call("replace_factor", "acct-7.x", secret=new, step=step + 1, recovery_code_hashes=["h1", "h2"],
              case_id="RC-ONE")
    soon = NOW + timedelta(seconds=2 * totp.STEP)
    assert impl.call("verify_totp", "acct-7.x", _code(old, soon), now=soon) is False
    assert impl.call("verify_totp", "acct-7.x", _code(new, NOW + timedelta(seconds=totp.STEP)),
                     now=NOW + timedelta(seconds=totp.STEP)) is False  # the confirming step is spent
    assert impl.call("verify_totp", "acct-7.x", _code(new, soon), now=soon) is True
    assert impl.call("get", "acct-7.x").totp_enabled is True

    impl.call("replace_factor", "acct-7.x", secret=later, step=step + 3, recovery_code_hashes=["h9"],
              case_id="RC-ONE")  # a retry of the same case: answered, not applied
    after = NOW + timedelta(seconds=4 * totp.STEP)
    assert impl.call("verify_totp", "acct-7.x", _code(later, after), now=after) is False
    assert impl.call("verify_totp", "acct-7.x", _code(new, after), now=after) is True

    impl.call("replace_factor", "acct-7.x", secret=later, step=step + 5, recovery_code_hashes=["h9"],
              case_id="RC-TWO")
    final = NOW + timedelta(seconds=6 * totp.STEP)
    assert impl.call("verify_totp", "acct-7.x", _code(later, final), now=final) is True


def test_login_codes_are_refused_when_reused_and_flag_a_drifting_clock(impl):
    """verify_totp refuses a code of a spent step and raises ClockOutOfSync for a code a few steps away."""
    secret = totp.new_secret()
    impl.call("replace_factor", "acct-7.x", secret=secret, step=0, recovery_code_hashes=[], case_id="enrollment")
    code = _code(secret, NOW)
    assert impl.call("verify_totp", "acct-7.x", code, now=NOW) is True
    assert impl.call("verify_totp", "acct-7.x", code, now=NOW) is False
    with pytest.raises(ClockOutOfSync) as drift:
        impl.call("verify_totp", "acct-7.x", _code(secret, NOW + timedelta(minutes=3)), now=NOW)
    assert drift.value.drift_seconds == 180


def test_holds_are_one_per_case_and_reason(impl):
    """place_hold twice for the same case and reason keeps one hold; another reason adds its own."""
    impl.call("place_hold", "acct-7.x", case_id="RC-ONE", hours=24, reason="2fa_recovery")
    impl.call("place_hold", "acct-7.x", case_id="RC-ONE", hours=24, reason="2fa_recovery")
    impl.call("place_hold", "acct-7.x", case_id="RC-ONE", hours=168, reason="owner_dispute")
    assert impl.holds() == [("RC-ONE", "2fa_recovery"), ("RC-ONE", "owner_dispute")]


def test_no_implementation_can_remove_a_factor():
    """The port offers no way to strip a factor: replace_factor is the only change to it."""
    for cls in (AccountDirectory, EmbeddedDirectory, HttpDirectory):
        assert not any(name in dir(cls) for name in ("reset_factor", "remove_factor", "disable_totp"))
        assert "replace_factor" in dir(cls)
