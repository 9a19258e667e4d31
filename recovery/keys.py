"""Key rotation: every encrypted value re-encrypted under SECRET_KEY, in batches, resumably.

`SEALED` lists every place a value encrypted by the keyring is stored; a new encrypted column must be
added here, or `keys rotate` would leave it under the old key. The rotation walks each in primary-key
order, a batch per transaction, and skips values already under the current key: a run that stops half
way is simply run again, and repeats nothing. Keyed hashes (email codes) cannot be re-keyed, since the
code itself is never kept; the run names the live ones and says until when the old key is needed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from recovery import audit
from recovery.crypto import Keyring, UnreadableValue
from recovery.models import (Account, Approver, Case, CaseDocument, EmailCode, InboxEvent, KeyRotation,
                             LinkToken, OutboxMessage)

BATCH = 500
SHOWN = 20  # unreadable values named in a report; the rest are counted


@dataclass(frozen=True)
class Sealed:
    """A column holding encrypted values: the value itself, or (in_json) a JSON object whose members
    named `*_enc` are encrypted values (an inbox event's text until it is processed)."""
    model: type
    column: str
    in_json: bool = False

    @property
    def name(self) -> str:
        return f"{self.model.__tablename__}.{self.column}"

    @property
    def attr(self):
        return getattr(self.model, self.column)

    @property
    def pk(self):
        return inspect(self.model).primary_key[0]


SEALED = (
    Sealed(OutboxMessage, "payload_enc"),
    Sealed(Approver, "totp_secret_enc"),
    Sealed(Account, "totp_secret_enc"),
    Sealed(LinkToken, "pending_secret_enc"),
    Sealed(LinkToken, "pending_codes_enc"),
    Sealed(Case, "owner_contact_enc"),
    Sealed(CaseDocument, "content_enc"),
    Sealed(InboxEvent, "payload", in_json=True),
)


def tokens(sealed: Sealed, value) -> list[str]:
    """The encrypted values one stored column value holds."""
    if value is None:
        return []
    if not sealed.in_json:
        return [value]
    return [v for k, v in value.items() if k.endswith("_enc") and isinstance(v, str)] if isinstance(value, dict) else []


# ---- can the configured keys read this database? ----------------------------------------------------

def unreadable_samples(s: Session, keyring: Keyring) -> list[str]:
    """The oldest and the newest value of each encrypted column, tried with every configured key; the
    names of those no key opens. A handful of reads, so every start-up can afford it."""
    problems = []
    for sealed in SEALED:
        for order in (sealed.pk.asc(), sealed.pk.desc()):
            row = s.execute(select(sealed.pk, sealed.attr).where(sealed.attr.is_not(None)).order_by(order)
                            .limit(1)).first()
            if row is None:
                continue
            for token in tokens(sealed, row[1]):
                try:
                    keyring.decrypt(token)
                except UnreadableValue:
                    problems.append(f"{sealed.name} #{row[0]}")
                    break
    return sorted(set(problems))


# ---- the rotation --------------------------------------------------------------------------------------

@dataclass
class LiveKeyedValue:
    what: str
    case_id: str
    expires_at: datetime


@dataclass
class RotationReport:
    rekeyed: Counter = field(default_factory=Counter)   # by column
    current: Counter = field(default_factory=Counter)   # already under SECRET_KEY
    unreadable: list[str] = field(default_factory=list)
    unreadable_count: int = 0
    live_keyed: list[LiveKeyedValue] = field(default_factory=list)

    @property
    def old_key_needed_until(self) -> datetime | None:
        return max((v.expires_at for v in self.live_keyed), default=None)

    @property
    def finished(self) -> bool:
        return self.unreadable_count == 0


def _rotate_row(keyring: Keyring, sealed: Sealed, value, report: RotationReport, label: str):
    """The row's new column value, or None when nothing in it changes."""
    changed = False
    if sealed.in_json:
        value = dict(value)  # a new object, so the JSON column is written
        items = [(k, v) for k, v in value.items() if k.endswith("_enc") and isinstance(v, str)]
    else:
        items = [(None, value)]
    for key, token in items:
        if keyring.is_current(token):
            report.current[sealed.name] += 1
            continue
        try:
            new = keyring.rotate(token)
        except UnreadableValue:
            report.unreadable_count += 1
            if len(report.unreadable) < SHOWN:
                report.unreadable.append(label)
            continue
        report.rekeyed[sealed.name] += 1
        changed = True
        if key is None:
            value = new
        else:
            value[key] = new
    return value if changed else None


def rotate(db, keyring: Keyring, clock, *, batch: int = BATCH) -> RotationReport:
    """Re-encrypt every encrypted value under the current key, then record and audit the run."""
    with db.transaction() as s:
        run = KeyRotation(key_id=keyring.key_id, started_at=clock.now(), rekeyed=0, unreadable=0)
        s.add(run)
        s.flush()
        run_id = run.id
    report = RotationReport()
    for sealed in SEALED:
        last = None
        while True:
            with db.transaction() as s:
                query = select(sealed.model).where(sealed.attr.is_not(None)).order_by(sealed.pk).limit(batch)
                if last is not None:
                    query = query.where(sealed.pk > last)
                if db.is_postgres:
                    query = query.with_for_update()  # the app may write these rows meanwhile: no lost update
                rows = s.scalars(query).all()
                for row in rows:
                    pk = getattr(row, sealed.pk.key)
                    new = _rotate_row(keyring, sealed, getattr(row, sealed.column), report, f"{sealed.name} #{pk}")
                    if new is not None:
                        setattr(row, sealed.column, new)
                if rows:
                    last = getattr(rows[-1], sealed.pk.key)
            if len(rows) < batch:
                break
    now = clock.now()
    with db.transaction() as s:
        report.live_keyed = live_keyed_values(s, keyring, now)
        run = s.get(KeyRotation, run_id)
        run.rekeyed, run.unreadable = sum(report.rekeyed.values()), report.unreadable_count
        run.old_key_needed_until = report.old_key_needed_until
        run.finished_at = now if report.finished else None
        audit.append(s, case_id=audit.NO_CASE, event="keys_rotated", from_state=None, to_state=None,
                     actor="system", channel="cli", at=now,
                     reason=f"key {keyring.key_id}: re-encrypted {run.rekeyed}, unreadable {run.unreadable}, "
                            f"live keyed values under older keys {len(report.live_keyed)}")
    return report


def live_keyed_values(s: Session, keyring: Keyring, now: datetime) -> list[LiveKeyedValue]:
    """Email codes that can still be typed and were keyed with another key than the current one."""
    rows = s.execute(select(EmailCode.case_id, EmailCode.code_hash, EmailCode.expires_at)
                     .where(EmailCode.used_at.is_(None), EmailCode.superseded.is_(False),
                            EmailCode.expires_at > now).order_by(EmailCode.expires_at))
    return [LiveKeyedValue("email code", case_id, expires) for case_id, code_hash, expires in rows
            if keyring.hash_key_id(code_hash) != keyring.key_id]


def previous_keys_left_over(s: Session, keyring: Keyring, now: datetime) -> str | None:
    """A warning when SECRET_KEY_PREVIOUS is set although a rotation to SECRET_KEY has finished."""
    if not keyring.has_previous:
        return None
    done = s.scalar(select(KeyRotation).where(KeyRotation.key_id == keyring.key_id,
                                              KeyRotation.finished_at.is_not(None))
                    .order_by(KeyRotation.finished_at.desc()).limit(1))
    if done is None:
        return None
    finished = f"{done.finished_at:%Y-%m-%d %H:%M}Z"
    until = done.old_key_needed_until
    if until is not None and until > now:
        return (f"SECRET_KEY_PREVIOUS is still set; `recoverybot keys rotate` finished at {finished}, and the "
                f"older keys are needed only until {until:%Y-%m-%d %H:%M}Z (live email codes): remove "
                "SECRET_KEY_PREVIOUS after that and restart")
    return (f"SECRET_KEY_PREVIOUS is still set, but `recoverybot keys rotate` finished at {finished}: "
            "everything is under SECRET_KEY now; remove SECRET_KEY_PREVIOUS and restart")
