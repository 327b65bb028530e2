"""API keys, stored by their SHA-256 only."""

from __future__ import annotations

from typing import Protocol

from buildq.clock import iso, utcnow
from buildq.items import api_key_key
from buildq.store.base import DynamoTable


class ApiKeys(Protocol):
    """Hashed API keys and their tenants."""

    async def tenant_for_key(self, key_hash: str) -> str | None: ...
    async def put_api_key(self, key_hash: str, tenant_id: str, *, label: str) -> None: ...
    async def delete_api_key(self, key_hash: str) -> bool: ...


class DynamoApiKeys(DynamoTable):
    """``ApiKeys`` on the projects table."""

    async def tenant_for_key(self, key_hash: str) -> str | None:
        """The tenant of a hashed API key, or None."""
        response = await self._retry.call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key=api_key_key(key_hash),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return item["tenant_id"]["S"] if item else None

    async def put_api_key(self, key_hash: str, tenant_id: str, *, label: str) -> None:
        await self._retry.call(
            "PutItem",
            self._client.put_item,
            TableName=self._table,
            Item={
                **api_key_key(key_hash),
                "tenant_id": {"S": tenant_id},
                "label": {"S": label},
                "created_at": {"S": iso(utcnow())},
            },
        )

    async def delete_api_key(self, key_hash: str) -> bool:
        response = await self._retry.call(
            "DeleteItem",
            self._client.delete_item,
            TableName=self._table,
            Key=api_key_key(key_hash),
            ReturnValues="ALL_OLD",
        )
        return bool(response.get("Attributes"))
