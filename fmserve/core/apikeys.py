"""API keys themselves: making one, reading its parts, and its salted hash.

A key is `fms_<key_id>_<secret>`: key_id is 16 hex characters (public: it names the key in
records, jobs and logs), secret 43 urlsafe characters (32 random bytes from `secrets`). Only
`pbkdf2_hmac(sha256, key, salt)` is stored. The secret has 256 bits of entropy, so a slow hash
would add no strength against guessing; a few hundred iterations keep a check well under a
millisecond, and the gateway caches verified keys briefly anyway (its keyring). Digests are
compared with `hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "fms"
ITERATIONS = 200
SALT_BYTES = 16


@dataclass(frozen=True)
class NewKey:
    key_id: str
    api_key: str
    salt: bytes
    digest: bytes


def generate() -> NewKey:
    key_id = secrets.token_hex(8)
    api_key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    salt = secrets.token_bytes(SALT_BYTES)
    return NewKey(key_id, api_key, salt, digest(api_key, salt))


def key_id_of(api_key: str) -> str | None:
    """The key id a presented key claims, or None when it is not shaped like a key."""
    prefix, key_id, secret = [*api_key.split("_", 2), "", ""][:3]
    if prefix != PREFIX or len(key_id) != 16 or len(secret) < 32:
        return None
    return key_id


def digest(api_key: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", api_key.encode(), salt, ITERATIONS)


def verify(api_key: str, salt: bytes, expected: bytes) -> bool:
    """Whether `api_key` hashes to `expected`, compared in constant time."""
    return hmac.compare_digest(digest(api_key, salt), expected)
