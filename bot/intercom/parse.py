"""From an Intercom webhook payload to the customer's newest message, or to nothing.

Pure functions over already-parsed JSON, with no trust in its shape: any field may be missing, null or of
the wrong type, and then the event is simply not for the bot. Shapes (DESIGN.md section 8):

- `conversation.user.created`: the text is `data.item.source.body`, written by the contact who started it.
- `conversation.user.replied`: the text is the last part in `data.item.conversation_parts.conversation_parts`
  whose `author.type` is `user` or `lead`. Parts by admins (our own replies included: the echo loop) and
  bots are never the customer's message.

Bodies are HTML up to API 2.14 (the version we pin) and plain text from 2.15; `html_to_text` reads both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser

CREATED, REPLIED = "conversation.user.created", "conversation.user.replied"
NOTED = "conversation.admin.noted"
HANDLED_TOPICS = (CREATED, REPLIED)
# A teammate's internal note that starts a recovery for the customer: "!recovery start [email]".
STAFF_COMMAND = re.compile(r"^\s*!recovery\s+(start|help)\b\s*(.*)$", re.I | re.S)
EMAIL = re.compile(r"[^@\s<>(),;:]+@[^@\s<>(),;:]+\.[A-Za-z]{2,}")
CUSTOMER_AUTHORS = ("user", "lead")
# Intercom ids are digits, hex or "notif_<uuid>". Anything else is refused, because ids end up in API
# paths (`contacts/{id}`), where "../" would point the SDK somewhere else.
ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_TEXT = 4000          # characters handed to the dialog; a chat message longer than this is not a question
MAX_ATTACHMENTS = 10
LOOKS_LIKE_HTML = re.compile(r"<\s*/?\s*[A-Za-z][^>]*>")
BLOCK_TAGS = frozenset({"p", "div", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                        "pre", "tr", "table"})


@dataclass(frozen=True)
class Attachment:
    name: str
    url: str
    content_type: str
    filesize: int | None  # as Intercom states it; the download enforces its own cap


@dataclass(frozen=True)
class Message:
    """One customer message: where it is, who wrote it, its text and its uploads."""
    topic: str
    notification_id: str | None
    conversation_id: str
    part_id: str
    part_kind: str          # "source" (the first message) or "part"; redaction addresses them differently
    author_type: str        # "user" or "lead"
    contact_id: str | None
    text: str
    attachments: tuple[Attachment, ...] = ()

    @property
    def conversation_key(self) -> str:
        return f"intercom:{self.conversation_id}"

    @property
    def delivery_key(self) -> str:
        """Notification id plus part id: a redelivered notification maps to the same key."""
        return f"intercom:{self.notification_id or '-'}:{self.part_id}"


@dataclass(frozen=True)
class StaffCommand:
    """A teammate's `!recovery start [email]` note: who wrote it and where."""
    notification_id: str | None
    conversation_id: str
    part_id: str
    admin_id: str
    admin_email: str | None
    verb: str              # "start" or "help"
    email: str | None      # the account address the teammate named, if any

    @property
    def conversation_key(self) -> str:
        return f"intercom:{self.conversation_id}"

    @property
    def delivery_key(self) -> str:
        return f"intercom:{self.notification_id or '-'}:{self.part_id}"


def staff_command(event: object) -> StaffCommand | None:
    """The newest note in a `conversation.admin.noted` event, when it is a `!recovery` command written by
    an admin; None for anything else (other notes are for people, not the bot)."""
    if not isinstance(event, dict) or event.get("topic") != NOTED:
        return None
    item = _dict(_dict(event.get("data")).get("item"))
    conversation_id = _id(item.get("id"))
    parts = _dict(item.get("conversation_parts")).get("conversation_parts")
    notes = [p for p in parts if isinstance(p, dict) and p.get("part_type") == "note"
             and _author_type(p) == "admin"] if isinstance(parts, list) else []
    if conversation_id is None or not notes:
        return None
    note = notes[-1]
    author, part_id = _dict(note.get("author")), _id(note.get("id"))
    admin_id = _id(author.get("id"))
    body = note.get("body")
    match = STAFF_COMMAND.match(html_to_text(body)) if isinstance(body, str) else None
    if part_id is None or admin_id is None or match is None:
        return None
    email = EMAIL.search(match.group(2) or "")
    admin_email = author.get("email") if isinstance(author.get("email"), str) and "@" in author["email"] else None
    return StaffCommand(notification_id=_id(event.get("id")), conversation_id=conversation_id, part_id=part_id,
                        admin_id=admin_id, admin_email=admin_email[:320] if admin_email else None,
                        verb=match.group(1).lower(), email=email.group(0)[:320] if email else None)


def customer_message(event: object) -> Message | None:
    """The customer's newest message in a webhook event; None when the event holds none for the bot
    (another topic, an admin's or a bot's part, an empty body, ids of an unexpected shape)."""
    if not isinstance(event, dict):
        return None
    topic = event.get("topic")
    item = _dict(_dict(event.get("data")).get("item"))
    conversation_id = _id(item.get("id"))
    if topic not in HANDLED_TOPICS or conversation_id is None:
        return None
    if topic == CREATED:
        part, kind = _dict(item.get("source")), "source"
    else:
        parts = _dict(item.get("conversation_parts")).get("conversation_parts")
        customer_parts = [p for p in parts if isinstance(p, dict) and _author_type(p) in CUSTOMER_AUTHORS] \
            if isinstance(parts, list) else []
        part, kind = (customer_parts[-1] if customer_parts else {}), "part"
    author_type, part_id = _author_type(part), _id(part.get("id"))
    if author_type not in CUSTOMER_AUTHORS or part_id is None:
        return None
    body = part.get("body")
    text = html_to_text(body) if isinstance(body, str) else ""
    attachments = _attachments(part.get("attachments"))
    if not text and not attachments:
        return None
    contact_id = _id(_dict(part.get("author")).get("id")) or _first_contact(item)
    notification = event.get("id")
    return Message(topic=topic, notification_id=_id(notification), conversation_id=conversation_id,
                   part_id=part_id, part_kind=kind, author_type=author_type, contact_id=contact_id,
                   text=text[:MAX_TEXT], attachments=attachments)


def html_to_text(body: str) -> str:
    """Plain text of a message body: tags stripped, entities unescaped, <br> and block ends as newlines.
    A body without tags is plain text already (API 2.15+), and is left as typed."""
    if LOOKS_LIKE_HTML.search(body):
        reader = _TextReader()
        try:
            reader.feed(body)
            reader.close()
            text = "".join(reader.out)
        except Exception:  # noqa: BLE001 - html.parser has raised on odd markup in some Python versions
            text = unescape(re.sub(r"<[^>]*>", " ", body))
    else:
        text = body
    text = storable(text).replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def storable(value: str) -> str:
    """Without NUL (PostgreSQL refuses it in text) and lone surrogates (not encodable as UTF-8)."""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


class _TextReader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0  # inside <script> or <style>

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "br":
            self.out.append("\n")
        elif tag in BLOCK_TAGS:
            self.out.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag == "br":
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.out.append(data)

    def unknown_decl(self, data):  # a broken <![...]> must not raise
        pass


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _id(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and ID.fullmatch(value) else None


def _author_type(part: dict) -> object:
    return _dict(part.get("author")).get("type")


def _first_contact(item: dict) -> str | None:
    contacts = _dict(item.get("contacts")).get("contacts")
    if isinstance(contacts, list) and contacts and isinstance(contacts[0], dict):
        return _id(contacts[0].get("id"))
    return None


def _attachments(value) -> tuple[Attachment, ...]:
    found = []
    for a in value if isinstance(value, list) else []:
        if not isinstance(a, dict) or a.get("type") != "upload":
            continue
        url, name, ctype, size = a.get("url"), a.get("name"), a.get("content_type"), a.get("filesize")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 4000:
            continue
        found.append(Attachment(
            name=storable(name)[:255] if isinstance(name, str) and name else "upload",
            url=url,
            content_type=storable(ctype)[:100] if isinstance(ctype, str) and ctype else "application/octet-stream",
            filesize=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None))
    return tuple(found[:MAX_ATTACHMENTS])
