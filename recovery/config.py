"""Settings from environment variables (12-factor), validated once at start-up.

pydantic-settings does the parsing and gives errors that name the variable, which is why it is used
instead of hand-rolled `os.environ` reads.
"""
from __future__ import annotations

import json
import secrets
from email.utils import formataddr
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from recovery.errors import ConfigError
from recovery.policy import Policy
from recovery.retention import Retention

CommaList = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=True, extra="ignore")

    DATABASE_URL: str = "sqlite:///recoverybot.db"
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=1, le=65535)
    PUBLIC_BASE_URL: str = "http://127.0.0.1:8000"
    SECRET_KEY: str = ""
    # Older keys, still accepted for reading while `recoverybot keys rotate` moves everything to SECRET_KEY.
    SECRET_KEY_PREVIOUS: CommaList = ()

    INTERCOM_ACCESS_TOKEN: str = ""
    INTERCOM_CLIENT_SECRET: str = ""
    INTERCOM_ADMIN_ID: str = ""
    INTERCOM_API_BASE: str = "https://api.intercom.io"
    INTERCOM_HANDOVER_TEAM_ID: str = ""
    # Set true only when the Messenger enforces identity verification (user_hash / JWT). Otherwise a
    # visitor can claim any user_id, so every contact is treated as a lead.
    INTERCOM_IDENTITY_VERIFICATION: bool = False
    # Teammates who may start a case with a `!recovery start` note, as Intercom admin id = approver id
    # (Slack user id, or a local approver name), comma-separated. Without an entry, a teammate is found
    # in Slack by their Intercom email (users.lookupByEmail); without either, they cannot start a case.
    INTERCOM_ADMIN_SLACK_IDS: CommaList = ()

    SLACK_BOT_TOKEN: str = ""
    SLACK_SIGNING_SECRET: str = ""
    SLACK_APPROVAL_CHANNEL: str = ""
    SLACK_APPROVER_IDS: CommaList = ()
    SLACK_SECURITY_APPROVER_IDS: CommaList = ()
    SLACK_API_URL: str = "https://slack.com/api/"
    SLACK_APP_TOKEN: str = ""
    # Optional: our workspace id. Without it the bot asks Slack once (auth.test).
    SLACK_TEAM_ID: str = ""
    # Optional: the card's link to an Intercom conversation, with {id} for the conversation id, e.g.
    # https://app.intercom.com/a/inbox/APP_ID/inbox/conversation/{id}
    SLACK_CONVERSATION_URL: str = ""
    # When set, requests from any other Enterprise Grid organisation are refused.
    SLACK_ENTERPRISE_ID: str = ""

    SMTP_URL: str = ""
    # The sender of every email. Unset, it is the brand at no-reply@localhost: customers see the exchange's
    # name, never this software's.
    MAIL_FROM: str = ""
    MAIL_OUTBOX_DIR: str = "var/mail"

    ACCOUNT_DIRECTORY: Literal["embedded", "http"] = "embedded"
    ACCOUNT_API_URL: str = ""
    ACCOUNT_API_TOKEN: str = ""

    BRAND_NAME: str = "Exchange"
    SUPPORT_EMAIL: str = "support@example.com"

    # Local approvers act through `recoverybot cases approve` while Slack is not configured.
    LOCAL_APPROVERS: CommaList = ("alice", "bob", "carol")
    LOCAL_SECURITY_APPROVERS: CommaList = ("carol",)

    # JSON object overriding parts of the default policy; see docs/configuration.md.
    RISK_POLICY: str = ""
    TEMPLATES_DIR: str = ""
    LOG_LEVEL: str = "INFO"
    # `text` for people at a terminal, `json` for a log pipeline: one object per line, with the request
    # id and the case id on every line they concern.
    LOG_FORMAT: Literal["text", "json"] = "text"
    # Log every chat poll and health or metrics probe too (they are most of the traffic, so off by default).
    LOG_POLLS: bool = False
    # When set, /metrics answers only `Authorization: Bearer <METRICS_TOKEN>`.
    METRICS_TOKEN: str = ""
    # Where `recoverybot worker` serves its own /metrics and /healthz (on HOST); 0 turns that off.
    WORKER_METRICS_PORT: int = Field(9101, ge=0, le=65535)
    # How many reverse proxies (load balancer, Heroku's router) stand in front of the web process; their
    # X-Forwarded-For entries are trusted for the client IP that per-IP limits count. 0 trusts none.
    TRUSTED_PROXIES: int = Field(0, ge=0, le=5)
    # How long an idle worker waits before looking for work again (seconds).
    WORKER_IDLE_SECONDS: float = Field(0.2, gt=0, le=60)
    # On PostgreSQL the worker LISTENs for new work and starts at once; off for a pooler that cannot carry
    # LISTEN (PgBouncer in transaction mode), leaving polling every WORKER_IDLE_SECONDS.
    WORKER_LISTEN: bool = True

    # Days each kind of personal data is kept once its case (or a conversation without one) is final;
    # `recoverybot purge` and the worker's daily run remove what is older. See docs/security.md.
    RETENTION_DAYS_TRANSCRIPTS: int = Field(90, ge=0, le=36500)
    RETENTION_DAYS_DOCUMENTS: int = Field(30, ge=0, le=36500)
    RETENTION_DAYS_EVENTS: int = Field(30, ge=0, le=36500)
    RETENTION_DAYS_CASES: int = Field(365, ge=0, le=36500)

    @field_validator("SLACK_APPROVER_IDS", "SLACK_SECURITY_APPROVER_IDS", "LOCAL_APPROVERS",
                     "LOCAL_SECURITY_APPROVERS", "INTERCOM_ADMIN_SLACK_IDS", "SECRET_KEY_PREVIOUS",
                     mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("INTERCOM_ADMIN_SLACK_IDS")
    @classmethod
    def _pairs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pair in value:
            admin, _, approver = pair.partition("=")
            if not admin.strip() or not approver.strip():
                raise ValueError(f"{pair!r} is not of the form INTERCOM_ADMIN_ID=APPROVER_ID")
        return value

    def admin_approver_map(self) -> dict[str, str]:
        return {a.strip(): b.strip() for a, _, b in (p.partition("=") for p in self.INTERCOM_ADMIN_SLACK_IDS)}

    @field_validator("PUBLIC_BASE_URL", "INTERCOM_API_BASE", "SLACK_API_URL")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("SLACK_CONVERSATION_URL")
    @classmethod
    def _conversation_url(cls, value: str) -> str:
        if value and (not value.startswith(("http://", "https://")) or "{id}" not in value):
            raise ValueError("must be an http(s) URL containing {id}")
        return value

    @field_validator("SMTP_URL")
    @classmethod
    def _smtp(cls, value: str) -> str:
        if value and not value.startswith(("smtp://", "smtps://")):
            raise ValueError("must look like smtp://user:pass@host:port or smtps://...")
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _db(cls, value: str) -> str:
        if value.startswith("postgres://"):  # Heroku's spelling
            value = "postgresql+psycopg://" + value[len("postgres://"):]
        elif value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value[len("postgresql://"):]
        if not value.startswith(("sqlite:", "postgresql+psycopg:")):
            raise ValueError("only sqlite:/// and postgresql:// URLs are supported")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if "PUBLIC_BASE_URL" not in self.model_fields_set:
            # Links in emails must reach this server: follow PORT (and HOST) unless told otherwise.
            host = "127.0.0.1" if self.HOST in ("0.0.0.0", "::", "") else self.HOST
            self.PUBLIC_BASE_URL = f"http://{host}:{self.PORT}"
        if not self.MAIL_FROM.strip():
            self.MAIL_FROM = formataddr((self.BRAND_NAME, "no-reply@localhost"))
        if self.ACCOUNT_DIRECTORY == "http" and not self.ACCOUNT_API_URL:
            raise ValueError("ACCOUNT_DIRECTORY=http needs ACCOUNT_API_URL")
        if self.slack_enabled:
            if not self.SLACK_BOT_TOKEN:
                raise ValueError("SLACK_APP_TOKEN is set but SLACK_BOT_TOKEN is empty")
            if not self.SLACK_APP_TOKEN and not self.SLACK_SIGNING_SECRET.strip():
                # Checked here, at start-up, so no request is ever handled without verification.
                raise ValueError("SLACK_BOT_TOKEN is set but SLACK_SIGNING_SECRET is empty; "
                                 "Slack requests cannot be verified")
            if not self.SLACK_APPROVAL_CHANNEL:
                raise ValueError("SLACK_APPROVAL_CHANNEL is required when Slack is configured")
            if not self.SLACK_APPROVER_IDS:
                raise ValueError("SLACK_APPROVER_IDS is required when Slack is configured")
        if self.intercom_enabled:
            if not self.INTERCOM_CLIENT_SECRET.strip():
                # Checked at start-up, so no webhook is ever accepted without a signature to check.
                raise ValueError("INTERCOM_ACCESS_TOKEN is set but INTERCOM_CLIENT_SECRET is empty; "
                                 "Intercom webhooks cannot be verified")
            if not self.INTERCOM_ADMIN_ID.strip():
                raise ValueError("INTERCOM_ADMIN_ID is required when Intercom is configured "
                                 "(the admin the bot replies as)")
        elif self.INTERCOM_CLIENT_SECRET or self.INTERCOM_ADMIN_ID or self.INTERCOM_HANDOVER_TEAM_ID:
            raise ValueError("INTERCOM_ACCESS_TOKEN is empty but other INTERCOM_* settings are set; "
                             "set it too, or unset them to leave the Intercom channel off")
        if not self.is_embedded_default and len(self.SECRET_KEY) < 32:
            raise ValueError("SECRET_KEY is required (at least 32 characters) outside the embedded "
                             "default (SQLite, no Slack, no Intercom)")
        if self.SECRET_KEY and len(self.SECRET_KEY) < 32:
            raise ValueError("SECRET_KEY must be at least 32 characters")
        self._check_previous_keys()
        self.policy  # validates RISK_POLICY early
        return self

    def _check_previous_keys(self) -> None:
        for i, key in enumerate(self.SECRET_KEY_PREVIOUS, start=1):
            if len(key) < 32:
                raise ValueError(f"SECRET_KEY_PREVIOUS: key {i} of {len(self.SECRET_KEY_PREVIOUS)} is shorter "
                                 "than 32 characters (keys are separated by commas)")
            if self.SECRET_KEY and key == self.SECRET_KEY:
                raise ValueError(f"SECRET_KEY_PREVIOUS: key {i} is SECRET_KEY itself; put the new key in "
                                 "SECRET_KEY and the old one in SECRET_KEY_PREVIOUS")

    def retention(self) -> Retention:
        return Retention(transcripts=self.RETENTION_DAYS_TRANSCRIPTS, documents=self.RETENTION_DAYS_DOCUMENTS,
                         events=self.RETENTION_DAYS_EVENTS, cases=self.RETENTION_DAYS_CASES)

    @property
    def is_embedded_default(self) -> bool:
        return (self.DATABASE_URL.startswith("sqlite:") and not self.slack_enabled
                and not self.intercom_enabled)

    @property
    def slack_enabled(self) -> bool:
        return bool(self.SLACK_BOT_TOKEN or self.SLACK_APP_TOKEN)

    @property
    def intercom_enabled(self) -> bool:
        return bool(self.INTERCOM_ACCESS_TOKEN)

    @property
    def policy(self) -> Policy:
        if not self.RISK_POLICY:
            return Policy()
        try:
            overrides = json.loads(self.RISK_POLICY)
        except json.JSONDecodeError as exc:
            raise ValueError(f"RISK_POLICY is not valid JSON: {exc}") from None
        return Policy.from_overrides(overrides)

    def approver_ids(self) -> tuple[str, ...]:
        return self.SLACK_APPROVER_IDS if self.slack_enabled else self.LOCAL_APPROVERS

    def security_approver_ids(self) -> tuple[str, ...]:
        return self.SLACK_SECURITY_APPROVER_IDS if self.slack_enabled else self.LOCAL_SECURITY_APPROVERS

    def secret_key(self) -> str:
        """The key material for hashing and at-rest encryption.

        The embedded default may run without SECRET_KEY: a random key is then kept in a file beside
        the SQLite database, so encrypted data survives restarts.
        """
        if self.SECRET_KEY:
            return self.SECRET_KEY
        path = self.sqlite_path().parent / ".recoverybot-secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def sqlite_path(self) -> Path:
        raw = self.DATABASE_URL.split("sqlite:///", 1)[-1]
        return Path(raw or ".").resolve() if raw and raw != ":memory:" else Path.cwd() / "x"


def load_settings(**overrides) -> Settings:
    """Read settings from the environment; a bad or missing value raises ConfigError naming it."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise ConfigError("; ".join(problems)) from None
