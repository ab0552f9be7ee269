"""User keys: made, hashed, and who a request's key names.

A user's key is ``kraken_`` and 43 characters of ``secrets.token_urlsafe(32)`` (256 random bits).
It is answered once (when the user is created, and on each rotation) and stored only as its
SHA-256 (``kraken_users.api_key_hash``, unique): a key is found by its hash, so no comparison
runs over the secret itself, and a database leak gives no usable key. A plain hash is enough for
a random key of that length (no dictionary to try); a slow password hash would cost every request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

# What tells a user's key from anything else a client may send, before any database work.
USER_KEY_PREFIX = "kraken_"


def new_key() -> str:
    return USER_KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# The whole shape of a key new_key() makes: anything else is refused before any database work, so a
# client without a key cannot make the service look one up (or send an append's body to the
# database first) by sending the prefix alone.
_USER_KEY = re.compile(re.escape(USER_KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")


def is_user_key(given: str) -> bool:
    return _USER_KEY.fullmatch(given) is not None


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the operator (``key_hash`` None: ``KRAKEN_API_KEY``, or no key where none
    is configured) or the holder of a user key, not yet checked: the statement that serves the
    request checks it (an active user with this hash), so checking costs no round trip of its own."""

    key_hash: bytes | None = None

    @property
    def is_operator(self) -> bool:
        return self.key_hash is None

    @classmethod
    def user(cls, key: str) -> Caller:
        return cls(key_hash(key))


OPERATOR = Caller()
