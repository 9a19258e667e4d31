"""What the domain services need from the outside world, assembled once by the composition root."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from sqlalchemy.orm import Session

from recovery.clock import Clock
from recovery.crypto import Keyring
from recovery.directory.interfaces import AccountDirectory
from recovery.policy import Policy

if TYPE_CHECKING:
    from recovery.notify import Notifier


@dataclass(frozen=True)
class Deps:
    policy: Policy
    keyring: Keyring
    clock: Clock
    directory_for: Callable[[Session], AccountDirectory]
    public_base_url: str
    approver_ids: frozenset[str]
    security_approver_ids: frozenset[str]
    brand_name: str = "Exchange"
    # conversation prefix -> recovery.notify.ChatWriter, for channels whose replies need no sending
    chat_writers: dict = field(default_factory=dict)

    def notifier(self, session: Session, now) -> "Notifier":
        from recovery.notify import Notifier

        return Notifier(session, self.keyring, self.public_base_url, now, chat_writers=self.chat_writers)
