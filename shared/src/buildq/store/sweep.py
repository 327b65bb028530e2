"""The sweeper index: active projects by the time they become suspicious.

Every active project carries ``sweep_at`` in the sweeper index: when it was queued,
or when its lease expires. The sweeper alone decides how old is too old, so the API
and the workers need not agree on any threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from buildq.clock import epoch_ms
from buildq.errors import ConflictError
from buildq.items import SWEEP_INDEX, SWEEP_SHARDS, project_key, shard_key
from buildq.models import ProjectStatus
from buildq.store.base import DynamoTable, Update


@dataclass(frozen=True)
class SweepCandidate:
    """An active project in the sweeper index: QUEUED since, or BUILDING with a lease
    that expires (expired) at, ``sweep_at``."""

    tenant_id: str
    project_id: str
    status: ProjectStatus
    sweep_at: int
    lease_expires_at: int | None


class SweepIndex(Protocol):
    """The sparse, sharded index of active projects."""

    async def oldest_queued_since(self) -> int | None: ...
    async def due_for_sweep(
        self, shard: int, *, before: int, limit: int
    ) -> list[SweepCandidate]: ...
    async def mark_swept(self, candidate: SweepCandidate) -> bool: ...


class DynamoSweepIndex(DynamoTable):
    """``SweepIndex`` on the projects table."""

    async def oldest_queued_since(self) -> int | None:
        """When the longest-waiting QUEUED project was queued (epoch ms), from the
        sweeper index: the age of the backlog without reading the queue."""
        oldest: int | None = None
        for shard in range(SWEEP_SHARDS):
            response = await self._retry.call(
                "Query(oldest)",
                self._client.query,
                TableName=self._table,
                IndexName=SWEEP_INDEX,
                KeyConditionExpression="sweep_shard = :shard",
                FilterExpression="#status = :queued",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={
                    ":shard": {"S": shard_key(shard)},
                    ":queued": {"S": ProjectStatus.QUEUED.value},
                },
                ScanIndexForward=True,
                Limit=100,
            )
            for item in response.get("Items", [])[:1]:
                since = int(item["sweep_at"]["N"])
                oldest = since if oldest is None else min(oldest, since)
        return oldest

    async def due_for_sweep(self, shard: int, *, before: int, limit: int) -> list[SweepCandidate]:
        """Active projects of one index shard with ``sweep_at`` before ``before``, oldest
        first."""
        response = await self._retry.call(
            "Query(sweep)",
            self._client.query,
            TableName=self._table,
            IndexName=SWEEP_INDEX,
            KeyConditionExpression="sweep_shard = :shard AND sweep_at <= :before",
            ExpressionAttributeValues={
                ":shard": {"S": shard_key(shard)},
                ":before": {"N": str(before)},
            },
            Limit=limit,
        )
        candidates = []
        for item in response.get("Items", []):
            lease = item.get("lease_expires_at", {}).get("N")
            candidates.append(
                SweepCandidate(
                    tenant_id=item["tenant_id"]["S"],
                    project_id=item["project_id"]["S"],
                    status=ProjectStatus(item["status"]["S"]),
                    sweep_at=int(item["sweep_at"]["N"]),
                    lease_expires_at=int(lease) if lease else None,
                )
            )
        return candidates

    async def mark_swept(self, candidate: SweepCandidate) -> bool:
        """Restart the candidate's clock (``sweep_at`` = now), if nothing changed it
        meanwhile; False if something did (another sweeper, or the project moved on)."""
        update = Update().set("sweep_at", epoch_ms())
        condition = (
            f"{update.name('sweep_at')} = {update.value(candidate.sweep_at)}"
            f" AND {update.name('status')} = {update.value(candidate.status.value)}"
        )
        key = project_key(candidate.tenant_id, candidate.project_id)
        try:
            await self._update(key, update, condition, what="sweep", returns="NONE")
        except ConflictError:
            return False
        return True
