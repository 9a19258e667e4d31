"""The modals an approver sees: the decision form, and what answers its submission ("recording…", or why
a submission we could not have produced was not taken).
"""
from __future__ import annotations

from bot.slack import card
from recovery.models import Case

APPROVE_VIEW, DENY_VIEW = "approve_modal", "deny_modal"


def as_dict(value) -> dict:
    """A payload field that should be an object; anything else reads as empty (bot/slack/gate.py has
    already refused bodies whose fields have the wrong type, so this is a second belt)."""
    return value if isinstance(value, dict) else {}


def form_values(view: dict) -> dict:
    """A submitted view's input values, {block_id: {action_id: {...}}}."""
    return as_dict(as_dict(view.get("state")).get("values"))


def form_value(values: dict, block: str, action: str) -> str | None:
    """The text typed into one input of a submitted form, or None."""
    value = as_dict(as_dict(values.get(block)).get(action)).get("value")
    return value if isinstance(value, str) else None


def refusal_text(renderer, reason: str, *, message: str = "", state: str = "") -> str:
    """Why an approver's click or submission changed nothing (the staff template's "refused" block)."""
    return renderer.block(card.TEMPLATE, "refused", dict(reason=reason, state=state, message=message))


def needs_step_up(deps, case: Case) -> bool:
    return bool(case.risk_level) and deps.policy.rule(case.risk_level).step_up


def masked_email(deps, session, case: Case) -> str:
    """The address the case writes to, as kept on the case since it opened; the directory only for a case
    opened before the case kept it."""
    if case.owner_contact_enc:
        email = deps.keyring.decrypt_json(case.owner_contact_enc).get("email")
    else:
        profile = deps.directory_for(session).get(case.account_id) if case.account_id else None
        email = profile.email if profile else None
    return card.mask_email(email) if email else "-"


def _title(approve: bool) -> dict:
    return {"type": "plain_text", "text": "Approve reset" if approve else "Deny reset"}


def _section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def decision_modal(renderer, deps, case: Case, *, approve: bool, channel_id: str | None, masked: str) -> dict:
    """The form: what approving or denying does, a step-up field where policy asks for one, a reason for a
    denial."""
    text = renderer.block(card.TEMPLATE, "approve_modal_text" if approve else "deny_modal_text",
                          dict(case=case, masked_email=masked))
    blocks = [_section(text)]
    if approve and needs_step_up(deps, case):
        blocks.append({"type": "input", "block_id": "totp", "label": {"type": "plain_text",
                       "text": "Code from your own authenticator"},
                       "element": {"type": "plain_text_input", "action_id": "code", "min_length": 6,
                                   "max_length": 7}})
    if not approve:
        blocks.append({"type": "input", "block_id": "reason", "label": {"type": "plain_text",
                       "text": "Reason (the owner is told)"},
                       "element": {"type": "plain_text_input", "action_id": "text", "multiline": True,
                                   "min_length": 5, "max_length": 1000}})
    return {"type": "modal", "callback_id": APPROVE_VIEW if approve else DENY_VIEW,
            "private_metadata": f"{case.id}|{channel_id or ''}", "title": _title(approve),
            "submit": {"type": "plain_text", "text": "Approve" if approve else "Deny"},
            "close": {"type": "plain_text", "text": "Cancel"}, "blocks": blocks}


def message_view(renderer, *, approve: bool, block: str, context: dict, private_metadata: str = "") -> dict:
    """A view with no form, rendered from a block of the staff template. Nothing is left to submit, so the
    approver closes it; `private_metadata` keeps the case for anything that reads the view later."""
    return {"type": "modal", "callback_id": "decision_status", "private_metadata": private_metadata,
            "title": _title(approve), "close": {"type": "plain_text", "text": "Close"},
            "blocks": [_section(renderer.block(card.TEMPLATE, block, context))]}
