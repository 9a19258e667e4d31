"""Hashing and at-rest encryption.

- Link tokens are 256 random bits, so a plain SHA-256 is enough to store them.
- Email codes are six digits, so they are keyed (HMAC with a key derived from SECRET_KEY, bound to the
  case id): a database dump alone cannot brute-force them, and a code for one case fails on another.
  Each keyed hash names the key that made it, so an older key keeps verifying it during a rotation.
- Passwords and recovery codes use argon2id, as PyPI does. Passwords, chosen by people, get argon2-cffi's
  default cost (RFC 9106's low-memory profile: 64 MiB, 3 passes, 4 lanes; about 0.13 s here). Recovery
  codes are 80 random bits, which no hashing cost makes easier or harder to guess, so they get OWASP's
  minimum for argon2id (19 MiB, 2 passes, 1 lane; about 0.02 s): the page that shows eight of them then
  spends 0.2 s hashing instead of 1 s of a core. The parameters are part of each hash, so any argon2
  verifier checks both kinds.
- TOTP secrets, outbox payloads, unprocessed inbox text and documents are encrypted with Fernet under a
  key derived by HKDF; MultiFernet reads values made under the keys in SECRET_KEY_PREVIOUS too.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_hasher = PasswordHasher()
_code_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def _derive(secret_key: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"recoverybot", info=purpose).derive(
        secret_key.encode())


def key_id(secret_key: str) -> str:
    """A short public name for a key (16 hex digits, derived one-way), so the database can say which
    key made a keyed hash or finished a rotation without holding anything that helps to guess it."""
    return _derive(secret_key, b"key-id v1")[:8].hex()


class UnreadableValue(ValueError):
    """A value that none of the configured keys can decrypt (a key is missing, or the data is damaged)."""


class Keyring:
    """Everything derived from SECRET_KEY (the current key) and SECRET_KEY_PREVIOUS (older keys still
    accepted), built once at start-up.

    New values are always encrypted and keyed with the current key. Reading tries the current key, then
    each older one: cryptography's MultiFernet does this for encrypted values, and `rotate()` re-encrypts
    a value under the current key. Keyed hashes (HMAC) cannot be re-keyed without the value they hash, so
    each one is stored with its key's id and checked with that key while it is configured.
    """

    def __init__(self, secret_key: str, previous: Sequence[str] = ()):
        if not secret_key:
            raise ValueError("an empty secret key")
        keys = [secret_key, *(k for k in previous if k and k != secret_key)]
        self.key_id = key_id(secret_key)
        self.previous_ids = tuple(key_id(k) for k in keys[1:])
        fernets = [Fernet(base64.urlsafe_b64encode(_derive(k, b"at-rest v1"))) for k in keys]
        self._current = fernets[0]
        self._fernet = MultiFernet(fernets)
        self._mac_keys = {key_id(k): _derive(k, b"code-mac v1") for k in keys}

    @property
    def has_previous(self) -> bool:
        return bool(self.previous_ids)

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise UnreadableValue("cannot decrypt with SECRET_KEY or any key in SECRET_KEY_PREVIOUS "
                                  "(a key is missing, or the data is damaged)") from None

    def encrypt_json(self, obj) -> str:
        return self.encrypt(json.dumps(obj, separators=(",", ":"), default=str))

    def decrypt_json(self, token: str):
        return json.loads(self.decrypt(token))

    def is_current(self, token: str) -> bool:
        """Whether the value is already encrypted under the current key (then rotation skips it)."""
        try:
            self._current.decrypt(token.encode())
            return True
        except InvalidToken:
            return False

    def rotate(self, token: str) -> str:
        """The same plain value, encrypted under the current key; UnreadableValue if no key opens it."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise UnreadableValue("cannot decrypt with SECRET_KEY or any key in SECRET_KEY_PREVIOUS") from None

    # ---- keyed hashes --------------------------------------------------------------------------------

    def code_hash(self, scope: str, code: str) -> str:
        """`<key id>:<HMAC-SHA256 hex>`, under the current key."""
        return f"{self.key_id}:{self._mac(self._mac_keys[self.key_id], scope, code)}"

    def code_matches(self, scope: str, code: str, stored: str) -> bool:
        kid, sep, digest = stored.rpartition(":")
        if sep:
            key = self._mac_keys.get(kid)
            return key is not None and hmac.compare_digest(self._mac(key, scope, code), digest)
        # made before hashes named their key: any configured key may have made it
        return any(hmac.compare_digest(self._mac(key, scope, code), stored) for key in self._mac_keys.values())

    def hash_key_id(self, stored: str) -> str | None:
        """Which key made a stored keyed hash (None for one made before hashes named their key)."""
        kid, sep, _ = stored.rpartition(":")
        return kid if sep else None

    @staticmethod
    def _mac(key: bytes, scope: str, code: str) -> str:
        return hmac.new(key, f"{scope}\x00{code}".encode(), hashlib.sha256).hexdigest()


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


def hash_recovery_code(code: str) -> str:
    """An argon2id hash of one recovery code, for the account service to check at login."""
    return _code_hasher.hash(code)


def new_recovery_codes(count: int = 8) -> list[str]:
    """Codes of 80 bits, shown as groups of hex for easy typing."""
    out = []
    for _ in range(count):
        raw = secrets.token_hex(10)
        out.append("-".join(raw[i:i + 5] for i in range(0, 20, 5)))
    return out
