"""Hashing and at-rest encryption.

- Link tokens are 256 random bits, so a plain SHA-256 is enough to store them.
- Email codes are six digits, so they are keyed (HMAC with a key derived from SECRET_KEY, bound to the
  case id): a database dump alone cannot brute-force them, and a code for one case fails on another.
- Passwords and recovery codes use argon2, as PyPI does.
- TOTP secrets and outbox payloads are encrypted with Fernet under a key derived by HKDF.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_hasher = PasswordHasher()


def _derive(secret_key: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"recoverybot", info=purpose).derive(
        secret_key.encode())


class Keyring:
    """Everything derived from SECRET_KEY, built once at start-up."""

    def __init__(self, secret_key: str):
        if not secret_key:
            raise ValueError("an empty secret key")
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(secret_key, b"at-rest v1")))
        self._mac_key = _derive(secret_key, b"code-mac v1")

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError("cannot decrypt: wrong SECRET_KEY or damaged data") from None

    def encrypt_json(self, obj) -> str:
        return self.encrypt(json.dumps(obj, separators=(",", ":"), default=str))

    def decrypt_json(self, token: str):
        return json.loads(self.decrypt(token))

    def code_hash(self, scope: str, code: str) -> str:
        return hmac.new(self._mac_key, f"{scope}\x00{code}".encode(), hashlib.sha256).hexdigest()

    def code_matches(self, scope: str, code: str, stored: str) -> bool:
        return hmac.compare_digest(self.code_hash(scope, code), stored)


def new_token() -> str:
    """256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_email_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    if not stored:
        # still spend the time, so a missing hash is not told apart by timing
        _hasher.hash(password)
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def new_recovery_codes(count: int = 8) -> list[str]:
    """Codes of 80 bits, shown as groups of hex for easy typing."""
    out = []
    for _ in range(count):
        raw = secrets.token_hex(10)
        out.append("-".join(raw[i:i + 5] for i in range(0, 20, 5)))
    return out
