"""Approve and deny submissions: stored in the inbox before Slack gets its ack, decided by the worker.

A decision is a locked, audited state change: about 5 ms of CPU, against half a millisecond for the
ack itself. Deciding before the ack made a burst of submissions wait on each other in the web process
(docs/performance.md, "Slack approvals"). So the web process checks what Slack can show on the form
(a missing reason, a malformed code), stores the submission, and answers with a view saying the
decision is being recorded. The worker decides in the same transaction that marks the submission
processed, and the outcome reaches the approver through the outbox as an ephemeral message in the
card's channel, next to the card, which is updated for everyone as before.

The outcome is not shown by updating the modal: the worker can be quicker than Slack applying our
answer to the submission, and Slack would then put "recording…" back over the outcome for good.

The web process settles only that the request comes from our workspace (and enterprise) and from a
listed approver, and stores nothing otherwise; the worker's `decide` checks the approver list again,
re-reads the case under a row lock and applies every other rule.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot import wakeup
from bot.slack import card, views
from recovery import inbox, outbox
from recovery.app import decide_within
from recovery.errors import ApprovalRefused, IllegalTransition, NotFound
from recovery.links import LinkService
from recovery.machine import State
from recovery.models import Approval, Case, InboxEvent

log = logging.getLogger(__name__)
SOURCE = "slack"
KIND = "slack"  # outbox messages that tell an approver what their submission came to
CODE = re.compile(r"\d{6}")
CASE_ID = re.compile(r"RC-[A-Z0-9]{8}")  # recovery.cases.new_case_id
# Refusals the approver can fix by submitting again (a fresh code, a reason).
FIXABLE = {"step_up_failed", "step_up_required", "reason_required"}
SEALED = ("code_enc", "reason_enc")


class Decisions:
    def __init__(self, *, deps, renderer):
        self.deps, self.renderer = deps, renderer

    # ---- web process ----------------------------------------------------------------------------------

    @staticmethod
    def unusable(case_id: str, view: dict, user: str | None) -> bool:
        """A submission we could not have produced: our modals carry a case id and Slack gives every view an
        id. Only a body signed by someone else holding the signing secret gets here; nothing is stored."""
        return not (CASE_ID.fullmatch(case_id) and isinstance(view.get("id"), str) and view["id"] and user)

    def form_error(self, values: dict, *, approve: bool) -> dict | None:
        """What Slack can show on the form itself, with nothing stored: {block_id: message}, or None."""
        if not approve:
            reason = views.form_value(values, "reason", "text")
            if not (reason or "").strip():
                return {"reason": "A denial needs a reason; the owner is told it."}
        elif "totp" in values and not CODE.fullmatch((views.form_value(values, "totp", "code") or "").replace(" ", "")):
            return {"totp": "Enter the 6-digit code your own authenticator shows now."}
        return None

    def store(self, db, *, view: dict, case_id: str, channel_id: str, user: str, approve: bool,
              values: dict, now) -> bool:
        """Store the submission; False when this very submission is stored already (a replay: Slack signs
        the same body again only if it was sent again).

        One statement on a plain connection, and on PostgreSQL the worker's wake-up inside it: this is all
        the web process does before the ack, so it is kept to a single round trip and commit."""
        code = views.form_value(values, "totp", "code")
        reason = views.form_value(values, "reason", "text")
        keyring = self.deps.keyring
        # A version of a view is submitted once (our answer replaces it), so the view's id and hash, with
        # who submitted it, name the submission; the code and reason stay out of the key, which is stored
        # in the clear.
        identity = json.dumps([view.get("id"), view.get("hash"), user], default=str)
        statement = inbox.insertion(
            db.engine.dialect.name, source=SOURCE,
            delivery_key="slack:" + hashlib.sha256(identity.encode()).hexdigest(),
            # one queue per case, so two approvers' submissions are decided in the order they arrived
            conversation_key=f"slack:{case_id}", now=now,
            payload={"case_id": case_id, "channel_id": channel_id, "user": user,
                     "decision": "approve" if approve else "deny",
                     # sealed, and dropped once decided
                     "code_enc": keyring.encrypt(code) if code else None,
                     "reason_enc": keyring.encrypt(reason) if reason else None})
        if db.is_postgres:
            statement = wakeup.announcing(statement, db.engine, wakeup.INBOX)
        with db.engine.begin() as conn:
            return conn.execute(statement).scalar() is not None

    def recording_view(self, case_id: str, channel_id: str, *, approve: bool) -> dict:
        return views.message_view(self.renderer, approve=approve, block="deciding",
                                  context=dict(case_id=case_id, approve=approve, in_channel=bool(channel_id)),
                                  private_metadata=f"{case_id}|{channel_id}")

    # ---- worker ---------------------------------------------------------------------------------------

    def handle(self, session: Session, event: InboxEvent) -> None:
        """Decide a stored submission and queue what the approver is told, in the inbox's transaction."""
        p = dict(event.payload)
        keyring, approve = self.deps.keyring, p["decision"] == "approve"
        svc = LinkService(session, self.deps)
        case_id = p["case_id"]
        try:
            case = decide_within(svc, case_id, approver=p["user"], decision=p["decision"], channel="slack",
                                 reason=keyring.decrypt(p["reason_enc"]) if p.get("reason_enc") else None,
                                 step_up_code=keyring.decrypt(p["code_enc"]) if p.get("code_enc") else None,
                                 # the code is checked against when it was typed, not when it is read
                                 step_up_at=event.received_at)
            text = self._decided(session, case, approve=approve)
        except ApprovalRefused as exc:
            log.info("slack decision on %s refused: %s", case_id, exc.reason)
            retry = ("approve" if approve else "deny") if exc.reason in FIXABLE else None
            text = self._text(case_id, outcome="refused", retry=retry,
                              message=views.refusal_text(self.renderer, exc.reason, message=str(exc)))
        except IllegalTransition as exc:
            # a racing approver or a second submission: the first decision stands, nothing changed
            text = self._text(case_id, outcome="refused",
                              message=views.refusal_text(self.renderer, "closed", message=str(exc), state=exc.state))
        except NotFound:
            text = self._text(case_id, outcome="refused", message=f"case {case_id} was not found.")
        self._tell(session, event, p, text)

    def give_up(self, session: Session, event: InboxEvent) -> None:
        """The submission failed for the last time (recovery.inbox): tell the approver that nothing was
        recorded, so they do not wait on "recording…", and drop the sealed code and reason."""
        p = dict(event.payload)
        self._tell(session, event, p, self._text(p.get("case_id"), outcome="failed",
                                                 retry="approve" if p.get("decision") == "approve" else "deny"))

    def _tell(self, session: Session, event: InboxEvent, p: dict, text: str) -> None:
        if p.get("channel_id") and p.get("user"):
            outbox.enqueue(session, self.deps.keyring, kind=KIND, key=f"slack-outcome:{event.id}",
                           now=self.deps.clock.now(),
                           payload={"case_id": p.get("case_id"), "channel": p["channel_id"], "user": p["user"],
                                    "text": text})
        event.payload = {k: v for k, v in p.items() if k not in SEALED}

    def _decided(self, session: Session, case: Case, *, approve: bool) -> str:
        if not approve:
            return self._text(case.id, outcome="denied")
        if case.state == State.AWAITING_APPROVAL:
            given = session.scalar(select(func.count(Approval.id)).where(Approval.case_id == case.id,
                                                                         Approval.decision == "approve"))
            return self._text(case.id, outcome="approval_recorded",
                              remaining=self.deps.policy.rule(case.risk_level).approvals - given)
        return self._text(case.id, outcome="approved")

    def _text(self, case_id: str | None, **context) -> str:
        return self.renderer.block(card.TEMPLATE, "decided",
                                   dict(dict(retry=None, remaining=0, message=""), **context, case_id=case_id))


