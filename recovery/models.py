"""SQLAlchemy 2 models. The schema itself is owned by the Alembic migrations in `recovery/migrations/`."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String,
                        Text, TypeDecorator, UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def waiting(name: str, *columns: str, where: str) -> Index:
    """An index of the rows a queue still has to work on (migration 0009): it stays as small as the
    queue, however much processed history the table keeps, so a claim's cost does not grow with it."""
    return Index(name, *columns, postgresql_where=text(where), sqlite_where=text(where))


# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class UtcDateTime(TypeDecorator):
    """Always hands back timezone-aware UTC datetimes; SQLite stores them naive, PostgreSQL aware."""
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use recovery.clock for UTC times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def ts() -> Mapped[datetime]:
    return mapped_column(UtcDateTime())


# ---- embedded account directory -------------------------------------------------------------

class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    locale: Mapped[str] = mapped_column(String(16), default="en")
    created_at: Mapped[datetime] = ts()
    totp_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_secret_enc: Mapped[str | None] = mapped_column(Text)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    facts: Mapped[dict] = mapped_column(JSON, default=dict)
    balance_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    # the recovery case whose confirmation set the current factor (replace_factor is idempotent per case)
    factor_case_id: Mapped[str | None] = mapped_column(String(32))


class AccountEvent(Base):
    __tablename__ = "account_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = ts()


class RecoveryCode(Base):
    __tablename__ = "recovery_codes"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(255))
    used_at: Mapped[datetime | None] = ts()


class WithdrawalHold(Base):
    __tablename__ = "withdrawal_holds"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    case_id: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(200))
    until: Mapped[datetime] = ts()
    created_at: Mapped[datetime] = ts()


# ---- recovery cases -----------------------------------------------------------------------------

class Case(Base):
    __tablename__ = "cases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    # Null while the typed email matched no account: the case then runs identically but can never
    # pass, so the customer cannot learn whether the address is registered.
    account_id: Mapped[str | None] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(32))
    conversation_id: Mapped[str] = mapped_column(String(200), index=True)
    opened_by: Mapped[str] = mapped_column(String(200))
    locale: Mapped[str] = mapped_column(String(16), default="en")
    risk_level: Mapped[str | None] = mapped_column(String(16))
    risk_reasons: Mapped[list] = mapped_column(JSON, default=list)
    final_reason: Mapped[str | None] = mapped_column(String(500))
    code_failures: Mapped[int] = mapped_column(Integer, default=0)
    code_sends: Mapped[int] = mapped_column(Integer, default=0)
    link_failures: Mapped[int] = mapped_column(Integer, default=0)
    # the end of the withdrawal hold placed when the link was sent; it is never shortened
    hold_until: Mapped[datetime | None] = ts()
    # Encrypted JSON {"email", "locale"}: where the owner's emails go, read from the directory once at the
    # start ({"email": null} for a stand-in). Later emails use it, so no turn after the start asks the
    # directory something only a real case would ask (its answer time would tell).
    owner_contact_enc: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = ts()
    updated_at: Mapped[datetime] = ts()
    # When the case reached a final state: retention counts from here (recovery/retention.py).
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), index=True)
    # When `purge` blanked the case's personal details (account, conversation, free-text reasons).
    details_purged_at: Mapped[datetime | None] = ts()


class CaseCheck(Base):
    __tablename__ = "case_checks"
    __table_args__ = (UniqueConstraint("case_id", "name"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    result: Mapped[str] = mapped_column(String(16))  # pending, pass, fail, needs_review
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = ts()


class EmailCode(Base):
    __tablename__ = "email_codes"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = ts()
    used_at: Mapped[datetime | None] = ts()
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)


class Approval(Base):
    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("case_id", "approver"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    approver: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(16))  # approve, deny
    reason: Mapped[str | None] = mapped_column(String(1000))
    security_group: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = ts()


class LinkToken(Base):
    """Enroll and cancel links. Only the SHA-256 of the 256-bit token is stored."""
    __tablename__ = "link_tokens"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # enroll, cancel, lock
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = ts()
    expires_at: Mapped[datetime] = ts()
    used_at: Mapped[datetime | None] = ts()
    revoked_at: Mapped[datetime | None] = ts()
    password_ok_at: Mapped[datetime | None] = ts()
    # SHA-256 of a secret kept in the browser that started the page; others holding the link are refused
    browser_hash: Mapped[str | None] = mapped_column(String(64))
    pending_secret_enc: Mapped[str | None] = mapped_column(Text)
    # the new recovery codes (encrypted JSON list) between start and confirmation
    pending_codes_enc: Mapped[str | None] = mapped_column(Text)
    # A confirmation whose factor replacement got no clear answer (a timeout): the directory may have
    # applied it. The case may not end any other way until a retry (same key, same data) settles it.
    replace_in_doubt_at: Mapped[datetime | None] = ts()
    replace_step: Mapped[int | None] = mapped_column(BigInteger)


class AuditRecord(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(String(32), index=True)
    event: Mapped[str] = mapped_column(String(48))
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(1000))
    at: Mapped[datetime] = ts()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The newest record's id and hash, so deleting the tail of the chain is detected too."""
    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


class Timer(Base):
    __tablename__ = "timers"
    __table_args__ = (waiting("ix_timers_open_due", "due_at", "id",
                              where="fired_at IS NULL AND cancelled_at IS NULL"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    due_at: Mapped[datetime] = ts()
    fired_at: Mapped[datetime | None] = ts()
    cancelled_at: Mapped[datetime | None] = ts()


# ---- messaging --------------------------------------------------------------------------------

class InboxEvent(Base):
    __tablename__ = "inbox_events"
    __table_args__ = (waiting("ix_inbox_pending_id", "id", where="processed_at IS NULL"),
                      waiting("ix_inbox_pending_conversation", "conversation_key", "id",
                              where="processed_at IS NULL"))
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_key: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(32))
    conversation_key: Mapped[str] = mapped_column(String(200), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
    received_at: Mapped[datetime] = ts()
    processed_at: Mapped[datetime | None] = ts()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # not before this time: set after a failure caused by a service that did not answer (recovery/inbox.py)
    retry_at: Mapped[datetime | None] = ts()


class OutboxMessage(Base):
    __tablename__ = "outbox"
    __table_args__ = (waiting("ix_outbox_pending_id", "id", where="status = 'pending'"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # email, chat, staff
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    # Encrypted: emails carry codes and links, which must never rest in plain text.
    payload_enc: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, sent, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = ts()
    lease_until: Mapped[datetime | None] = ts()
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = ts()
    sent_at: Mapped[datetime | None] = ts()
    # What the message belongs to, read from its payload when queued, so retention can tell a message
    # of an open case from one whose case is long closed without decrypting anything.
    case_id: Mapped[str | None] = mapped_column(String(32), index=True)
    conversation_key: Mapped[str | None] = mapped_column(String(200), index=True)


class Conversation(Base):
    """Channel-neutral dialog state for one customer conversation."""
    __tablename__ = "conversations"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # e.g. webchat:<id>
    channel: Mapped[str] = mapped_column(String(32))
    locale: Mapped[str] = mapped_column(String(16), default="en")
    stage: Mapped[str] = mapped_column(String(32), default="idle")
    case_id: Mapped[str | None] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = ts()
    updated_at: Mapped[datetime] = ts()


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (Index("ix_chat_session_seq", "session_id", "seq"),)
    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(64))
    sender: Mapped[str] = mapped_column(String(16))  # customer, bot
    text: Mapped[str] = mapped_column(Text)
    buttons: Mapped[list] = mapped_column(JSON, default=list)
    # the outbox key of a bot message, so a resend after a crash does not post it twice
    source_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    # which message a bot line is (its template block, e.g. "code_sent"); None for the customer's lines
    message_key: Mapped[str | None] = mapped_column(String(48))
    created_at: Mapped[datetime] = ts()


class ChatSession(Base):
    __tablename__ = "chat_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    locale: Mapped[str] = mapped_column(String(16), default="en")
    created_at: Mapped[datetime] = ts()


class Approver(Base):
    __tablename__ = "approvers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    totp_secret_enc: Mapped[str] = mapped_column(Text)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    enrolled_at: Mapped[datetime] = ts()


class Attempt(Base):
    """One row per rate-limited attempt; counted over a sliding window."""
    __tablename__ = "attempts"
    __table_args__ = (Index("ix_attempts_key_at", "key", "at"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = ts()


class SlackCard(Base):
    """Where a case's approval card lives in Slack, so it can be updated and threaded."""
    __tablename__ = "slack_cards"
    case_id: Mapped[str] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64))
    message_ts: Mapped[str] = mapped_column(String(32))
    posted_at: Mapped[datetime] = ts()
    updated_at: Mapped[datetime] = ts()


class CaseDocument(Base):
    """A file the customer uploaded in chat (an ID photo), kept encrypted for the approvers."""
    __tablename__ = "case_documents"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    case_id: Mapped[str | None] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    conversation_key: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_enc: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = ts()
    # Shown to the approvers in the card's Slack thread once: the outbox message uploading it holds the
    # claim (its id) while the upload runs, and the Slack file id records that it is done.
    slack_claim: Mapped[str | None] = mapped_column(String(64))
    slack_file_id: Mapped[str | None] = mapped_column(String(64))


class WorkerHeartbeat(Base):
    """One row per running worker process, touched as its loop goes round, so any process can tell
    whether some worker is alive (`/readyz`, the stalled-worker alert)."""
    __tablename__ = "worker_heartbeats"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # host:pid:random
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = ts()
    beat_at: Mapped[datetime] = ts()


# ---- retention and keys ---------------------------------------------------------------------------

class PurgeRun(Base):
    """One run of `purge` (by the CLI or the worker's daily run), with how much of each kind it removed.
    The worker claims a run by inserting its row, so two workers do not purge on the same day."""
    __tablename__ = "purge_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    trigger: Mapped[str] = mapped_column(String(16))  # cli, worker
    started_at: Mapped[datetime] = ts()
    finished_at: Mapped[datetime | None] = ts()
    transcripts: Mapped[int] = mapped_column(Integer, default=0)
    documents: Mapped[int] = mapped_column(Integer, default=0)
    events: Mapped[int] = mapped_column(Integer, default=0)
    cases: Mapped[int] = mapped_column(Integer, default=0)


class KeyRotation(Base):
    """A run of `keys rotate` towards the key named `key_id` (see recovery.crypto.key_id)."""
    __tablename__ = "key_rotations"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = ts()
    finished_at: Mapped[datetime | None] = ts()
    rekeyed: Mapped[int] = mapped_column(BigInteger, default=0)
    unreadable: Mapped[int] = mapped_column(BigInteger, default=0)
    # Until when keyed values made under an older key stay live (email codes): the old key is needed
    # until then. Null when none were live.
    old_key_needed_until: Mapped[datetime | None] = ts()
