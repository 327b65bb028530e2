"""Opaque, tamper-checked list cursors.

A cursor names where the previous page stopped (a project id) and the filter it
was made for, signed with HMAC-SHA256. Tenant isolation does not depend on it:
the partition key always comes from the caller's API key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from ulid import ULID


class BadCursorError(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest()[:16])


def encode_cursor(secret: bytes, *, after: str, status: str | None) -> str:
    payload = _b64(json.dumps({"v": 1, "after": after, "status": status}).encode())
    return f"{payload}.{_sign(secret, payload)}"


def decode_cursor(secret: bytes, cursor: str, *, status: str | None) -> str:
    """The project id to continue after; raises ``BadCursorError`` if the cursor was
    not made by this API (with this secret) for this same filter."""
    payload, _, signature = cursor.partition(".")
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        raise BadCursorError("cursor is not one this API returned")
    try:
        data = json.loads(_unb64(payload))
        after = str(data["after"])
        ULID.from_str(after)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BadCursorError("cursor is not one this API returned") from exc
    if data.get("status") != status:
        raise BadCursorError("cursor was made for another status filter")
    return after
