"""Settings are validated at start-up with errors that name the variable."""
from __future__ import annotations

import pytest

from recovery.config import load_settings
from recovery.errors import ConfigError


def test_embedded_default_needs_no_settings(tmp_path, monkeypatch):
    """With no environment at all the bot runs on SQLite with local mail and approvals."""
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.is_embedded_default and s.DATABASE_URL == "sqlite:///recoverybot.db"
    assert not s.slack_enabled and not s.intercom_enabled
    assert len(s.secret_key()) >= 32 and s.secret_key() == load_settings().secret_key()


@pytest.mark.parametrize("overrides, named", [
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
    ({"SMTP_URL": "http://mail"}, "SMTP_URL"),
    ({"PORT": "99999"}, "PORT"),
    ({"PUBLIC_BASE_URL": "example.com"}, "PUBLIC_BASE_URL"),
    ({"ACCOUNT_DIRECTORY": "ldap"}, "ACCOUNT_DIRECTORY"),
    ({"ACCOUNT_DIRECTORY": "http"}, "ACCOUNT_API_URL"),
    ({"RISK_POLICY": "{not json"}, "RISK_POLICY"),
    ({"RISK_POLICY": '{"bogus": 1}'}, "bogus"),
    ({"RISK_POLICY": '{"levels": {"high": {"approvals": 0}}}'}, "approvals"),
    ({"DATABASE_URL": "postgresql://u@h/db"}, "SECRET_KEY"),
    ({"SLACK_BOT_TOKEN": "xoxb-1", "SECRET_KEY": "k" * 40}, "SLACK_SIGNING_SECRET"),
])
def test_bad_settings_are_named(monkeypatch, overrides, named):
    """A bad or missing value stops start-up with a message naming it."""
    for key, value in overrides.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert named in str(info.value)


def test_policy_overrides_merge(monkeypatch):
    """RISK_POLICY changes only the values it names."""
    monkeypatch.setenv("RISK_POLICY", '{"levels": {"medium": {"notice_hours": 12}}, "code_max_wrong": 3}')
    policy = load_settings().policy
    assert policy.rule("medium").notice_hours == 12 and policy.rule("medium").hold_hours == 48
    assert policy.code_max_wrong == 3 and policy.rule("high").approvals == 2


def test_heroku_database_url_is_accepted(monkeypatch):
    """postgres:// (Heroku's spelling) is read as the psycopg driver."""
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db:5432/x")
    monkeypatch.setenv("SECRET_KEY", "k" * 40)
    assert load_settings().DATABASE_URL == "postgresql+psycopg://u:p@db:5432/x"


def test_public_base_url_follows_port_unless_set(monkeypatch):
    """Without PUBLIC_BASE_URL, links point at the port the bot listens on; a set value wins."""
    for name in ("PORT", "HOST", "PUBLIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings().PUBLIC_BASE_URL == "http://127.0.0.1:8000"
    monkeypatch.setenv("PORT", "8765")
    assert load_settings().PUBLIC_BASE_URL == "http://127.0.0.1:8765"
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://help.example.com")
    assert load_settings().PUBLIC_BASE_URL == "https://help.example.com"


def test_the_email_sender_name_is_the_brand(tmp_path, monkeypatch):
    """Unset, MAIL_FROM names the brand (BRAND_NAME) as the sender; set, it is kept as given."""
    monkeypatch.chdir(tmp_path)
    assert load_settings(BRAND_NAME="Acme Exchange").MAIL_FROM == "Acme Exchange <no-reply@localhost>"
    assert load_settings().MAIL_FROM == "Exchange <no-reply@localhost>"
    assert load_settings(MAIL_FROM="Acme <security@acme.test>").MAIL_FROM == "Acme <security@acme.test>"
