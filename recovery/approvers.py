"""Approvers' own authenticators, for step-up on the approvals that policy marks.

A stolen Slack session alone cannot approve: the approve step also needs a current code from the
approver's phone, checked with replay protection.
"""
from __future__ import annotations

from recovery import totp
from recovery.models import Approver


def new_secret() -> str:
    return totp.new_secret()


def uri(secret: str, approver_id: str, brand: str) -> str:
    return totp.provisioning_uri(secret, name=f"approver {approver_id}", issuer=f"{brand} Recovery Bot")


def enroll(db, keyring, clock, approver_id: str, secret: str, code: str) -> None:
    """Store the approver's secret (encrypted) once a code from the app proves it was set up."""
    step = totp.verify(secret, code, now=clock.now(), last_step=None)
    with db.transaction() as session:
        row = session.get(Approver, approver_id)
        if row is None:
            row = Approver(id=approver_id, totp_secret_enc="", enrolled_at=clock.now())
            session.add(row)
        row.totp_secret_enc, row.last_step, row.enrolled_at = keyring.encrypt(secret), step, clock.now()
