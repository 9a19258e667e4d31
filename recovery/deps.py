"""What the domain services need from the outside world, assembled once by the composition root."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy.orm import Session

from recovery.clock import Clock
from recovery.crypto import Keyring
from recovery.directory.interfaces import AccountDirectory
from recovery.policy import Policy


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
