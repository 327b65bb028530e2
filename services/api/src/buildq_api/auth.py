"""API keys: ``Authorization: Bearer <key>`` maps a caller to a tenant.

Keys are hashed (SHA-256) as soon as they arrive and only hashes are kept,
compared or stored: static keys from settings for local runs, and hashed-key
items in the table in production. A short cache keeps a DynamoDB read off
most requests; revoking a key takes effect within ``api_key_cache_seconds``.
"""

from __future__ import annotations

import time

from buildq.settings import hash_api_key
from buildq.store import ProjectStore

NEGATIVE_CACHE_SECONDS = 5.0  # unknown keys are looked up again this soon at most
CACHE_MAX_ENTRIES = 10_000


class UnauthorizedError(Exception):
    """No API key, or one that maps to no tenant."""


class ApiKeyAuthenticator:
    def __init__(
        self, static_keys: dict[str, str], store: ProjectStore, cache_seconds: float
    ) -> None:
        self._static = static_keys
        self._store = store
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def tenant_for(self, authorization: str | None) -> str:
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise UnauthorizedError("send an API key as 'Authorization: Bearer <key>'")
        digest = hash_api_key(key)
        tenant = self._static.get(digest)
        if tenant is None:
            tenant = await self._lookup(digest)
        if tenant is None:
            raise UnauthorizedError("the API key is not valid")
        return tenant

    async def _lookup(self, digest: str) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        tenant = await self._store.tenant_for_key(digest)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        ttl = self._cache_seconds if tenant is not None else NEGATIVE_CACHE_SECONDS
        self._cache[digest] = (tenant, now + ttl)
        return tenant
