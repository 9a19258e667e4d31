"""The few Intercom calls the bot makes, through the official SDK, with its errors translated.

- The SDK gets `token=` explicitly and a pinned `Intercom-Version` (it sends none of its own), and every
  call passes `max_retries=0`: a retried POST can post a reply twice, so the outbox dispatcher alone
  decides when to try again, with its backoff.
- HTTP 429, 5xx and network failures raise `IntercomUnavailable` (the dispatcher retries); any other 4xx
  raises `IntercomRefused`, a `PermanentFailure` (the message is parked, not retried).
- Error messages carry the status and Intercom's error code, never a response body (customer data).
"""
from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import httpx
from intercom import (AdminReplyConversationRequest, Intercom, QuickReplyOption,
                      RedactConversationRequest_ConversationPart, RedactConversationRequest_Source)
from intercom.conversations import ConversationsManageRequestBody_Assignment
from intercom.core.api_error import ApiError

from recovery.outbox import PermanentFailure

log = logging.getLogger(__name__)

API_VERSION = "2.14"  # bodies arrive as HTML up to 2.14; parse.html_to_text reads plain text as well
TIMEOUT = 10          # seconds per API call
DOWNLOAD_TIMEOUT = 20


class IntercomUnavailable(Exception):
    """Intercom could not take the call now (429, 5xx, network); trying later may work."""


class IntercomRefused(PermanentFailure):
    """Intercom refused the call (a 4xx other than 429); repeating it will not help."""

    def __init__(self, message: str, *, status: int | None):
        super().__init__(message)
        self.status = status


class DownloadRefused(Exception):
    """An attachment could not be fetched, or is larger than allowed."""


@dataclass(frozen=True)
class Contact:
    id: str
    role: str | None          # "user" (signed in to the exchange) or "lead"
    external_id: str | None   # our account id, set by the exchange's Messenger install for users
    email: str | None
    language: str | None      # language_override, else the browser's language


@dataclass(frozen=True)
class Button:
    text: str
    uuid: str


class IntercomApi:
    def __init__(self, *, token: str, base_url: str, admin_id: str, timeout: float = TIMEOUT,
                 download_timeout: float = DOWNLOAD_TIMEOUT):
        if not token:
            raise ValueError("an Intercom access token is required")
        self.admin_id = admin_id
        self.sdk = Intercom(token=token, base_url=base_url.rstrip("/"),
                            headers={"Intercom-Version": API_VERSION}, timeout=timeout)
        self._options = {"max_retries": 0, "timeout_in_seconds": int(timeout)}
        # Upload URLs are signed links on Intercom's file host: they get no Authorization header.
        self._files = httpx.Client(timeout=download_timeout, follow_redirects=True)

    # ---- reads -----------------------------------------------------------------------------------

    def contact(self, contact_id: str) -> Contact:
        with _translated("contacts.find"):
            c = self.sdk.contacts.find(contact_id, request_options=self._options)
        language = c.language_override or c.browser_language
        return Contact(id=contact_id, role=c.role, external_id=c.external_id, email=c.email,
                       language=language if isinstance(language, str) else None)

    def download(self, url: str, *, max_bytes: int) -> bytes:
        """The file behind an upload URL, refused beyond `max_bytes` without reading the rest."""
        try:
            with self._files.stream("GET", url) as r:
                if r.status_code != 200:
                    raise DownloadRefused(f"HTTP {r.status_code}")
                declared = r.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise DownloadRefused(f"larger than {max_bytes} bytes")
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadRefused(f"larger than {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise DownloadRefused(type(exc).__name__) from None

    # ---- writes ----------------------------------------------------------------------------------

    def reply(self, conversation_id: str, *, html: str, buttons: Sequence[Button] = ()) -> None:
        """A reply from our admin. With buttons it is a quick reply: the Messenger shows them under
        the text, and a click comes back as the customer's part with the button's text."""
        options = {"reply_options": [QuickReplyOption(text=b.text, uuid_=b.uuid) for b in buttons]} \
            if buttons else {}
        request = AdminReplyConversationRequest(message_type="quick_reply" if buttons else "comment",
                                                type="admin", admin_id=self.admin_id, body=html, **options)
        with _translated("conversations.reply"):
            self.sdk.conversations.reply(conversation_id, request=request, request_options=self._options)

    def note(self, conversation_id: str, *, html: str) -> None:
        """An internal note: seen by teammates, never by the customer."""
        request = AdminReplyConversationRequest(message_type="note", type="admin", admin_id=self.admin_id,
                                                body=html)
        with _translated("conversations.reply(note)"):
            self.sdk.conversations.reply(conversation_id, request=request, request_options=self._options)

    def assign_to_team(self, conversation_id: str, team_id: str) -> None:
        request = ConversationsManageRequestBody_Assignment(type="team", admin_id=self.admin_id,
                                                            assignee_id=team_id)
        with _translated("conversations.manage(assignment)"):
            self.sdk.conversations.manage(conversation_id, request=request, request_options=self._options)

    def redact(self, conversation_id: str, *, part_id: str, source: bool) -> None:
        """Redact a customer's message in Intercom: the conversation's first message (`source`) or a
        later part. Intercom refuses parts it cannot redact, which ends as IntercomRefused."""
        request = (RedactConversationRequest_Source(conversation_id=conversation_id, source_id=part_id) if source
                   else RedactConversationRequest_ConversationPart(conversation_id=conversation_id,
                                                                   conversation_part_id=part_id))
        with _translated("conversations.redact"):
            self.sdk.conversations.redact_conversation_part(request=request, request_options=self._options)

    def close(self) -> None:
        self._files.close()


# The namespace of our quick-reply option uuids: changing it changes every button's uuid.
BUTTONS = uuid.UUID("fe713c59-315c-4c3b-ac61-783fe315de56")


def button(key: str, text: str) -> Button:
    """A quick-reply option whose uuid is the same for a button key every time it is offered."""
    return Button(text=text, uuid=str(uuid.uuid5(BUTTONS, key)))


@contextmanager
def _translated(call: str) -> Iterator[None]:
    try:
        yield
    except ApiError as exc:
        status = exc.status_code
        if status is not None and 200 <= status < 300:
            # A success whose body the SDK could not read: the call took effect, so it is not repeated.
            log.warning("intercom %s: HTTP %s with an unreadable body", call, status)
            return
        what = f"intercom {call}: HTTP {status}{_error_code(exc.body)}"
        if status is None or status == 429 or status >= 500:
            raise IntercomUnavailable(what) from None
        raise IntercomRefused(what, status=status) from None
    except httpx.HTTPError as exc:  # connection refused, reset, timeout
        raise IntercomUnavailable(f"intercom {call}: {type(exc).__name__}") from None


def _error_code(body) -> str:
    errors = body.get("errors") if isinstance(body, dict) else getattr(body, "errors", None)
    if isinstance(errors, list) and errors:
        first = errors[0]
        code = first.get("code") if isinstance(first, dict) else getattr(first, "code", None)
        if isinstance(code, str):
            return f" ({code[:60]})"
    return ""
