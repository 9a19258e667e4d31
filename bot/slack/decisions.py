"""Approve and deny submissions: stored in the inbox before Slack gets its ack, decided by the worker.

A decision is a locked, audited state change: about 5 ms of CPU, against half a millisecond for the
ack itself. Deciding before the ack made a burst of submissions wait on each other in the web process
(docs/performance.md, "Slack approvals"). So the web process checks what Slack can show on the form
(a missing reason, a malformed code), stores the submission, and acks with a "deciding…" view; the
worker decides in the same transaction that marks the submission processed, and the outcome reaches
the approver through the outbox: the view updated in place (views.update), and for a refusal that
ends the form, an ephemeral message in the channel too, which stays if the modal was closed meanwhile.

Nothing about who may decide is settled in the web process that the worker does not check again: the
worker's `decide` re-reads the case under a row lock and applies every rule.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re

from slack_sdk.errors import SlackApiError
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
from recovery.outbox import Outgoing, PermanentFailure

log = logging.getLogger(__name__)
SOURCE = "slack"
KIND = "slack"  # outbox messages that answer an approver: a view update or an ephemeral message
CODE = re.compile(r"\d{6}")
CASE_ID = re.compile(r"RC-[A-Z0-9]{8}")  # recovery.cases.new_case_id
# Refusals the approver can fix on the same form: it is shown again with the reason above the field.
FIXABLE = {"step_up_failed", "step_up_required", "reason_required"}


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
            reason = _value(values, "reason", "text")
            if not (reason or "").strip():
                return {"reason": "A denial needs a reason; the owner is told it."}
        elif "totp" in values and not CODE.fullmatch((_value(values, "totp", "code") or "").replace(" ", "")):
            return {"totp": "Enter the 6-digit code your own authenticator shows now."}
        return None

    def store(self, db, *, body: dict, view: dict, case_id: str, channel_id: str, user: str, approve: bool,
              values: dict, now) -> bool:
        """Store the submission; False when this very submission is stored already (a replay: Slack signs
        the same body again only if it was sent again).

        One statement on a plain connection, and on PostgreSQL the worker's wake-up inside it: this is all
        the web process does before the ack, so it is kept to a single round trip and commit."""
        code = _value(values, "totp", "code")
        reason = _value(values, "reason", "text")
        keyring = self.deps.keyring
        identity = json.dumps([view.get("id"), view.get("hash"), user, values], sort_keys=True, default=str)
        statement = inbox.insertion(
            db.engine.dialect.name, source=SOURCE,
            delivery_key="slack:" + hashlib.sha256(identity.encode()).hexdigest(),
            # one queue per case, so two approvers' submissions are decided in the order they arrived
            conversation_key=f"slack:{case_id}", now=now,
            payload={"case_id": case_id, "channel_id": channel_id, "user": user,
                     "team": _dict(body.get("team")).get("id"), "view_id": view.get("id"),
                     "decision": "approve" if approve else "deny",
                     # the code and the reason are sealed, and dropped once decided
                     "code_enc": keyring.encrypt(code) if code else None,
                     "reason_enc": keyring.encrypt(reason) if reason else None})
        if db.is_postgres:
            statement = wakeup.announcing(statement, wakeup.INBOX)
        with db.engine.begin() as conn:
            return conn.execute(statement).scalar() is not None

    def deciding_view(self, case_id: str, channel_id: str, *, approve: bool) -> dict:
        return views.message_view(self.renderer, approve=approve, block="deciding",
                                  context=dict(case_id=case_id, approve=approve),
                                  private_metadata=f"{case_id}|{channel_id}")

    # ---- worker ---------------------------------------------------------------------------------------

    def handle(self, session: Session, event: InboxEvent) -> None:
        """Decide a stored submission and queue what the approver is shown, in the inbox's transaction."""
        p = dict(event.payload)
        keyring, approve = self.deps.keyring, p["decision"] == "approve"
        svc = LinkService(session, self.deps)
        case_id, user, channel_id = p["case_id"], p["user"], p.get("channel_id") or ""
        view, ephemeral = None, None
        try:
            case = decide_within(svc, case_id, approver=user, decision=p["decision"], channel="slack",
                                 reason=keyring.decrypt(p["reason_enc"]) if p.get("reason_enc") else None,
                                 step_up_code=keyring.decrypt(p["code_enc"]) if p.get("code_enc") else None)
            view = self._outcome(session, case, approve=approve, channel_id=channel_id)
        except ApprovalRefused as exc:
            case = session.get(Case, case_id)
            if exc.reason in FIXABLE and case is not None and (approve or exc.reason == "reason_required"):
                view = views.decision_modal(self.renderer, self.deps, case, approve=approve, channel_id=channel_id,
                                            masked=views.masked_email(self.deps, session, case),
                                            notice=str(exc)[:150])
            else:
                text = self._refused(exc.reason, message=str(exc))
                view, ephemeral = self._final(case_id, channel_id, approve, text), text
            log.info("slack decision on %s refused: %s", case_id, exc.reason)
        except IllegalTransition as exc:
            # a racing approver or a second submission: the first decision stands, nothing changed
            text = self._refused("closed", message=str(exc), state=exc.state)
            view, ephemeral = self._final(case_id, channel_id, approve, text), text
        except NotFound:
            text = self._refused("unknown", message=f"case {case_id} was not found.")
            view, ephemeral = self._final(case_id, channel_id, approve, text), text
        now = svc.now
        if p.get("view_id"):
            outbox.enqueue(session, keyring, kind=KIND, key=f"slack-view:{event.id}", now=now,
                           payload={"case_id": case_id, "view_id": p["view_id"], "view": view})
        if ephemeral and channel_id:
            outbox.enqueue(session, keyring, kind=KIND, key=f"slack-ephemeral:{event.id}", now=now,
                           payload={"case_id": case_id, "channel": channel_id, "user": user, "text": ephemeral})
        event.payload = {k: v for k, v in p.items() if k not in ("code_enc", "reason_enc")}

    def _outcome(self, session: Session, case: Case, *, approve: bool, channel_id: str) -> dict:
        if not approve:
            outcome, remaining = "denied", 0
        elif case.state == State.AWAITING_APPROVAL:
            given = session.scalar(select(func.count(Approval.id)).where(Approval.case_id == case.id,
                                                                         Approval.decision == "approve"))
            outcome, remaining = "approval_recorded", self.deps.policy.rule(case.risk_level).approvals - given
        else:
            outcome, remaining = "approved", 0
        return views.message_view(self.renderer, approve=approve, block="decided",
                                  context=dict(case_id=case.id, outcome=outcome, remaining=remaining),
                                  private_metadata=f"{case.id}|{channel_id}")

    def _refused(self, reason: str, *, message: str, state: str = "") -> str:
        return self.renderer.block(card.TEMPLATE, "refused", dict(reason=reason, state=state, message=message))

    def _final(self, case_id: str, channel_id: str, approve: bool, text: str) -> dict:
        return views.message_view(self.renderer, approve=approve, block="decided",
                                  context=dict(case_id=case_id, outcome="refused", message=text),
                                  private_metadata=f"{case_id}|{channel_id}")


class SlackReplySender:
    """The outbox sender for kind "slack": a view updated in place, or an ephemeral message."""

    def __init__(self, client):
        self.client = client

    def send(self, message: Outgoing) -> None:
        p = message.payload
        try:
            if "view" in p:
                self.client.views_update(view_id=p["view_id"], view=p["view"])
            else:
                self.client.chat_postEphemeral(channel=p["channel"], user=p["user"], text=p["text"])
        except SlackApiError as exc:
            error = exc.response.get("error") if hasattr(exc.response, "get") else None
            if "view" in p and error == "not_found":
                # The approver closed the modal before the outcome came: nothing to update. The card (and,
                # for a refusal, the ephemeral message) says the same.
                log.info("view of case %s was closed before its outcome was shown", p.get("case_id"))
                return
            status = getattr(exc.response, "status_code", 0)
            if 400 <= status < 500 and status != 429 or error in ("invalid_arguments", "channel_not_found",
                                                                  "user_not_in_channel", "not_in_channel"):
                raise PermanentFailure(f"Slack refused {'views.update' if 'view' in p else 'an ephemeral'}: "
                                       f"{error or status}") from None
            raise


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _value(values: dict, block: str, action: str) -> str | None:
    value = _dict(_dict(values.get(block)).get(action)).get("value")
    return value if isinstance(value, str) else None
