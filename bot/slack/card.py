"""The approval card, re-rendered from the database every time (never patched from a click).

Texts come from templates/slack/staff.j2; the block structure and Block Kit limits live here.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import quote

from sqlalchemy import func, select

from recovery.machine import State
from recovery.models import Approval, Case, CaseCheck, CaseDocument

MAX_TEXT = 3000
MAX_BLOCKS = 50
TEMPLATE = "slack/staff.j2"
APPROVE, DENY = "approve_case", "deny_case"


def mask_email(email: str) -> str:
    name, _, domain = email.partition("@")
    return f"{name[:1]}{'•' * max(2, len(name) - 1)}@{domain}"


def escape(text: str | None) -> str | None:
    """Make typed text (a customer's file name, an approver's reason) inert in mrkdwn: no mentions such
    as <!channel>, no disguised links. Slack asks for exactly these three characters to be escaped."""
    if text is None:
        return None
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def conversation_link(template: str):
    """case -> the staff link to its customer conversation, or None.

    Only Intercom conversations get one (SLACK_CONVERSATION_URL, with `{id}`): a web-chat conversation's
    key is the customer's own session secret and must never reach Slack.
    """
    def link(case: Case) -> str | None:
        prefix, _, conversation = (case.conversation_id or "").partition(":")
        if not template or prefix != "intercom" or not conversation:
            return None
        return template.replace("{id}", quote(conversation, safe=""))
    return link


def check_summary(chk: CaseCheck) -> str:
    """A safe one-line account of a check's evidence: counts and matches, never values."""
    ev = chk.evidence or {}
    if chk.name == "email_code":
        return f"{ev.get('sent', 0)} code(s) sent, {ev.get('wrong_tries', 0)} wrong tries"
    if chk.name == "account_facts":
        per = ev.get("per_question") or {}
        parts = [f"{name.replace('_', ' ')}: {outcome}" for name, outcome in per.items()]
        return f"{ev.get('matched', 0)}/{ev.get('asked', 0)} matched" + (f" ({'; '.join(parts)})" if parts else "")
    return str(ev.get("note", ""))


@dataclass
class CardData:
    case: Case
    blocks: list[dict]
    text: str


def _section(text: str) -> dict:
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT - 1] + "…"
    return {"type": "section", "text": {"type": "mrkdwn", "text": text or " "}}


def render(renderer, session, deps, case: Case, *, conversation_url: str | None = None) -> CardData:
    directory = deps.directory_for(session)
    profile = directory.get(case.account_id) if case.account_id else None
    checks = list(session.scalars(select(CaseCheck).where(CaseCheck.case_id == case.id).order_by(CaseCheck.id)))
    approvals = list(session.scalars(select(Approval).where(Approval.case_id == case.id).order_by(Approval.at)))
    documents = list(session.scalars(select(CaseDocument).where(CaseDocument.case_id == case.id)
                                     .order_by(CaseDocument.id)))
    now = deps.clock.now()
    recent = sorted({e.type.replace("_", " ") for e in (profile.events if profile else ())
                     if e.at >= now - timedelta(days=deps.policy.recent_change_days)})
    earlier = session.scalar(select(func.count(Case.id)).where(Case.account_id == case.account_id,
                                                               Case.id != case.id)) if case.account_id else 0
    ctx = dict(case=case, masked_email=mask_email(profile.email) if profile else "-", profile=profile,
               checks=[{"name": c.name, "result": c.result, "summary": check_summary(c)} for c in checks],
               approvals=[{"approver": a.approver, "decision": a.decision, "at": a.at, "reason": escape(a.reason)}
                          for a in approvals],
               documents=[{"name": escape(d.name), "content_type": escape(d.content_type), "size": d.size,
                           "sha256": d.sha256} for d in documents],
               final_reason=escape(case.final_reason), rule=deps.policy.rule(case.risk_level or "high"),
               account_age_days=(now - profile.created_at).days if profile else 0, recent_events=recent,
               earlier_cases=earlier, conversation_url=conversation_url)
    block = lambda name: renderer.block(TEMPLATE, name, ctx)  # noqa: E731
    title = block("card_title")
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        _section(block("card_summary")),
        _section(block("card_risk")),
        _section(block("card_checks")),
    ]
    if profile:
        blocks.append(_section(block("card_account")))
    blocks.append(_section(block("card_documents")))
    decisions = block("card_decisions")
    if decisions:
        blocks.append(_section(decisions))
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": block("card_state")[:MAX_TEXT]}]})
    if case.state == State.AWAITING_APPROVAL:
        blocks.append({"type": "actions", "block_id": "decision", "elements": [
            {"type": "button", "action_id": APPROVE, "style": "primary", "value": case.id,
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": DENY, "style": "danger", "value": case.id,
             "text": {"type": "plain_text", "text": "Deny"}},
        ]})
    return CardData(case, blocks[:MAX_BLOCKS], f"{title}: {case.state.replace('_', ' ')}")
