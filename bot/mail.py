"""Email senders for the outbox: SMTP when SMTP_URL is set, else .eml files in a local folder.

smtplib (standard library) speaks SMTP; the message's Message-ID comes from the outbox idempotency key,
so a resend after a crash can be recognised as the same message.
"""
from __future__ import annotations

import hashlib
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bot.templates import Renderer
from recovery.outbox import Outgoing, PermanentFailure


def build_message(renderer: Renderer, mail_from: str, message: Outgoing) -> EmailMessage:
    p = message.payload
    subject, text, html = renderer.email(p["template"], p["locale"], p["context"])
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = p["to"] or "undisclosed-recipients:;"
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    domain = mail_from.rsplit("@", 1)[-1].strip(">") or "localhost"
    digest = hashlib.sha256(message.idempotency_key.encode()).hexdigest()[:32]
    msg["Message-ID"] = f"<{digest}@{domain}>"
    msg["X-Recovery-Case"] = p["context"].get("case_id", "")
    msg["X-Recovery-Template"] = p["template"]
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg


class SmtpMailer:
    def __init__(self, url: str, *, mail_from: str, renderer: Renderer, timeout: float = 20):
        parts = urlsplit(url)
        self.secure = parts.scheme == "smtps"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (465 if self.secure else 25)
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.mail_from, self.renderer, self.timeout = mail_from, renderer, timeout

    def send(self, message: Outgoing) -> None:
        msg = build_message(self.renderer, self.mail_from, message)
        if message.payload.get("suppress"):
            bytes(msg)  # a stand-in's message: built and encoded like a real one (same work), sent to no one
            return
        smtp_cls = smtplib.SMTP_SSL if self.secure else smtplib.SMTP
        kwargs = {"context": ssl.create_default_context()} if self.secure else {}
        try:
            with smtp_cls(self.host, self.port, timeout=self.timeout, **kwargs) as smtp:
                smtp.ehlo()
                if not self.secure and smtp.has_extn("starttls"):
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if self.user:
                    smtp.login(self.user, self.password or "")
                smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            raise PermanentFailure(f"recipient refused: {list(exc.recipients)}") from None
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise PermanentFailure(f"SMTP {exc.smtp_code}") from None
            raise


class FolderMailer:
    """The local twin: each email becomes an .eml file in MAIL_OUTBOX_DIR (default var/mail)."""

    def __init__(self, folder: str | Path, *, mail_from: str, renderer: Renderer):
        self.folder = Path(folder)
        self.mail_from, self.renderer = mail_from, renderer

    def send(self, message: Outgoing) -> None:
        msg = build_message(self.renderer, self.mail_from, message)
        if message.payload.get("suppress"):
            bytes(msg)  # a stand-in's message: built and encoded like a real one (same work), sent to no one
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{message.id:08d}-{message.payload['template']}.eml"
        tmp = self.folder / (name + ".tmp")
        tmp.write_bytes(bytes(msg))
        tmp.replace(self.folder / name)  # atomic: a reader never sees half a message
