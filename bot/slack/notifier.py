"""Staff notifications through Slack: the outbox sender for kind "staff" when Slack is configured.

The card is posted once per case and afterwards re-rendered from the database with chat.update;
every other case event goes to the card's thread.
"""
from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError

from bot.slack import card
from recovery.models import Case, SlackCard
from recovery.outbox import Outgoing, PermanentFailure

log = logging.getLogger(__name__)

CARD_EVENTS = {"approval_recorded", "approved", "denied", "cancelled", "expired", "locked", "rejected",
               "completed"}


class SlackStaffNotifier:
    def __init__(self, *, db, deps, renderer, client, channel: str, security_ids, conversation_url=None):
        self.db, self.deps, self.renderer, self.client = db, deps, renderer, client
        self.channel, self.security_ids = channel, tuple(security_ids)
        self.conversation_url = conversation_url or (lambda case: None)

    def send(self, message: Outgoing) -> None:
        p = message.payload
        try:
            self._send(p["case_id"], p["event"], p.get("context", {}))
        except SlackApiError as exc:
            status = getattr(exc.response, "status_code", 0)
            error = exc.response.get("error") if hasattr(exc.response, "get") else None
            if 400 <= status < 500 and status != 429 or error in ("channel_not_found", "not_in_channel",
                                                                  "is_archived", "invalid_blocks"):
                raise PermanentFailure(f"Slack refused {p['event']}: {error or status}") from None
            raise

    def _send(self, case_id: str, event: str, context: dict) -> None:
        with self.db.transaction() as s:
            case = s.get(Case, case_id)
            existing = s.get(SlackCard, case_id)
            data = card.render(self.renderer, s, self.deps, case, conversation_url=self.conversation_url(case))
            where = (existing.channel, existing.message_ts) if existing else None
        if event == "approval_requested":
            if where is None:
                self._post_card(case_id, data)
            else:
                self._update(where, data)
            return
        if where is None:
            return  # the case never reached approval: nothing in Slack to tell
        if event in CARD_EVENTS:
            self._update(where, data)
        if event == "approval_reminder":
            text = self._text("reminder", case_id, context)
        elif event == "approval_escalation":
            text = self._text("escalation", case_id, context, security_ids=self.security_ids)
        else:
            text = self._text("thread_event", case_id, context, event=event)
        self.client.chat_postMessage(channel=where[0], thread_ts=where[1], text=text,
                                     reply_broadcast=event == "approval_escalation")

    def _text(self, block: str, case_id: str, context: dict, **extra) -> str:
        context = {k: card.escape(v) if isinstance(v, str) else v for k, v in context.items()}
        return self.renderer.block(card.TEMPLATE, block, dict(case_id=case_id, context=context, **extra))

    def _post_card(self, case_id: str, data: card.CardData) -> None:
        resp = self.client.chat_postMessage(channel=self.channel, text=data.text, blocks=data.blocks,
                                            unfurl_links=False, unfurl_media=False)
        now = self.deps.clock.now()
        with self.db.transaction() as s:
            if s.get(SlackCard, case_id) is None:
                s.add(SlackCard(case_id=case_id, channel=resp["channel"], message_ts=resp["ts"],
                                posted_at=now, updated_at=now))

    def _update(self, where: tuple[str, str], data: card.CardData) -> None:
        self.client.chat_update(channel=where[0], ts=where[1], text=data.text, blocks=data.blocks)
        with self.db.transaction() as s:
            row = s.get(SlackCard, data.case.id)
            if row is not None:
                row.updated_at = self.deps.clock.now()
