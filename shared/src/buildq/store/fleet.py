"""The worker fleet's presence entries, and short named locks (the sweeper's turn)."""

from __future__ import annotations

from typing import Protocol

from buildq.clock import epoch_ms
from buildq.errors import ConflictError
from buildq.items import TTL_ATTRIBUTE, from_attr, to_attr
from buildq.models import WorkerInfo
from buildq.store.base import DynamoTable

WORKERS_PK = "WORKERS"  # one partition: a Query lists the fleet


class Fleet(Protocol):
    """Live workers and named locks."""

    async def put_worker(self, worker: WorkerInfo, *, ttl_seconds: float) -> None: ...
    async def delete_worker(self, worker_id: str) -> None: ...
    async def list_workers(self) -> list[WorkerInfo]: ...
    async def acquire_lock(self, name: str, owner: str, seconds: float) -> bool: ...


class DynamoFleet(DynamoTable):
    """``Fleet`` on the projects table."""

    async def put_worker(self, worker: WorkerInfo, *, ttl_seconds: float) -> None:
        """Announce (or refresh) a live worker; the item expires if it stops refreshing."""
        plain = worker.model_dump()
        plain["running"] = list(worker.running)
        item = {key: to_attr(value) for key, value in plain.items()}
        await self._retry.call(
            "PutItem(worker)",
            self._client.put_item,
            TableName=self._table,
            Item={
                **item,
                "pk": {"S": WORKERS_PK},
                "sk": {"S": f"WORKER#{worker.worker_id}"},
                "seen_ms": {"N": str(epoch_ms())},
                "alive_until_ms": {"N": str(epoch_ms() + int(ttl_seconds * 1000))},
                TTL_ATTRIBUTE: {"N": str(epoch_ms() // 1000 + int(ttl_seconds))},
            },
        )

    async def delete_worker(self, worker_id: str) -> None:
        await self._retry.call(
            "DeleteItem(worker)",
            self._client.delete_item,
            TableName=self._table,
            Key={"pk": {"S": WORKERS_PK}, "sk": {"S": f"WORKER#{worker_id}"}},
        )

    async def list_workers(self) -> list[WorkerInfo]:
        """Workers that refreshed their entry recently (expired entries are skipped even
        where TTL deletion lags, as in moto, which never deletes)."""
        response = await self._retry.call(
            "Query(workers)",
            self._client.query,
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            FilterExpression="alive_until_ms > :now",
            ExpressionAttributeValues={
                ":pk": {"S": WORKERS_PK},
                ":now": {"N": str(epoch_ms())},
            },
            ConsistentRead=True,
        )
        workers = []
        for item in response.get("Items", []):
            plain = {k: v for k, v in item.items() if k in WorkerInfo.model_fields}
            workers.append(WorkerInfo.model_validate({k: from_attr(v) for k, v in plain.items()}))
        return sorted(workers, key=lambda worker: worker.worker_id)

    async def acquire_lock(self, name: str, owner: str, seconds: float) -> bool:
        """Take (or renew) a short named lock; False if someone else holds it."""
        now_ms = epoch_ms()
        until = now_ms + int(seconds * 1000)
        try:
            await self._retry.call(
                "PutItem(lock)",
                self._client.put_item,
                TableName=self._table,
                Item={
                    "pk": {"S": f"LOCK#{name}"},
                    "sk": {"S": "LOCK"},
                    "owner": {"S": owner},
                    "lock_until": {"N": str(until)},
                    # TTL (seconds) tidies up locks nobody renews.
                    TTL_ATTRIBUTE: {"N": str(until // 1000 + 3600)},
                },
                ConditionExpression=(
                    "attribute_not_exists(pk) OR lock_until < :now OR #owner = :owner"
                ),
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={
                    ":now": {"N": str(now_ms)},
                    ":owner": {"S": owner},
                },
            )
        except ConflictError:
            return False
        return True
