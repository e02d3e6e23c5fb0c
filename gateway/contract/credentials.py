"""Device tokens: high-entropy, shown once, stored only as a hash, compared in constant time.

A token is 32 random bytes (256 bits), so a fast hash is enough to store it (a slow password
hash protects low-entropy secrets; this one cannot be guessed). The hash is SHA-256 keyed by a
fixed context string, so a token is never stored, logged or sent anywhere but to its device.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_PREFIX = "gwd_"
_CONTEXT = b"heartbeat-gateway device token v1"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hmac.new(_CONTEXT, token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def token_matches(token: str, stored_hash: str | None) -> bool:
    """Constant time whatever the input; False when there is no stored hash."""
    presented = token_hash(token)
    expected = stored_hash if stored_hash is not None else "0" * len(presented)
    return hmac.compare_digest(presented, expected) and stored_hash is not None
