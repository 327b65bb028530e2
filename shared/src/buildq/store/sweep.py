"""The sweeper index: active projects by the time they become suspicious.

Every active project carries ``sweep_at`` in the sweeper index: when it was queued,
or when its lease expires. The sweeper alone decides how old is too old, so the API
and the workers need not agree on any threshold.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

from buildq.clock import epoch_ms
from buildq.errors import ConflictError
from buildq.items import SWEEP_INDEX, SWEEP_SHARDS, project_key, shard_key
from buildq.models import ProjectStatus
from buildq.store.base import DynamoTable, Update

SWEEP_BACKOFF_CAP_MS = 3_600_000  # a long wait is swept at least hourly


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
        self, shard: int, status: ProjectStatus, *, before: int, limit: int
    ) -> list[SweepCandidate]: ...
    async def mark_swept(self, candidate: SweepCandidate, *, base_ms: int) -> bool: ...


class DynamoSweepIndex(DynamoTable):
    """``SweepIndex`` on the projects table."""

    async def oldest_queued_since(self) -> int | None:
        """When the longest-waiting QUEUED project was queued (epoch ms; a retry: when
        it became due), from the QUEUED shards of the sweeper index: the age of the
        backlog without reading the queue."""
        oldest: int | None = None
        for shard in range(SWEEP_SHARDS):
            response = await self._retry.call(
                "Query(oldest)",
                self._client.query,
                TableName=self._table,
                IndexName=SWEEP_INDEX,
                KeyConditionExpression="sweep_shard = :shard",
                ExpressionAttributeValues={":shard": {"S": shard_key(shard, ProjectStatus.QUEUED)}},
                ScanIndexForward=True,
                Limit=1,
            )
            for item in response.get("Items", []):
                since = int(item["sweep_at"]["N"])
                oldest = since if oldest is None else min(oldest, since)
        return oldest

    async def due_for_sweep(
        self, shard: int, status: ProjectStatus, *, before: int, limit: int
    ) -> list[SweepCandidate]:
        """Projects in ``status`` of one index shard with ``sweep_at`` at or before
        ``before``, oldest first: only what is due is read."""
        response = await self._retry.call(
            "Query(sweep)",
            self._client.query,
            TableName=self._table,
            IndexName=SWEEP_INDEX,
            KeyConditionExpression="sweep_shard = :shard AND sweep_at <= :before",
            ExpressionAttributeValues={
                ":shard": {"S": shard_key(shard, status)},
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

    async def mark_swept(self, candidate: SweepCandidate, *, base_ms: int) -> bool:
        """Restart the candidate's clock, if nothing changed it meanwhile; False if
        something did (another sweeper, or the project moved on).

        Each sweep of the same wait pushes the next one out further: the clock restarts
        ``sweep_backoff`` ahead of now, and that doubles (from ``base_ms``, up to
        ``SWEEP_BACKOFF_CAP_MS``), all in the one write. A project that waits in a long
        backlog gets a duplicate message after 1, 2, 3, 5, 9… periods, not every
        period, so duplicates do not swell the backlog. Back on the queue, the project
        starts again from no backoff (``runs``).
        """
        update = Update()
        clock, backoff = update.name("sweep_at"), update.name("sweep_backoff")
        zero, half = update.value(0), update.value(max(base_ms // 2, 1))
        update.sets.append(
            f"{clock} = {update.value(epoch_ms())} + if_not_exists({backoff}, {zero})"
        )
        update.sets.append(
            f"{backoff} = if_not_exists({backoff}, {half}) + if_not_exists({backoff}, {half})"
        )
        condition = (
            f"{clock} = {update.value(candidate.sweep_at)}"
            f" AND {update.name('status')} = {update.value(candidate.status.value)}"
        )
        key = project_key(candidate.tenant_id, candidate.project_id)
        try:
            new = await self._update(key, update, condition, what="sweep", returns="UPDATED_NEW")
        except ConflictError:
            return False
        if int(new.get("sweep_backoff", {}).get("N", "0")) > SWEEP_BACKOFF_CAP_MS:
            # Doubling past the cap: hold it there (a rare second write).
            capped = Update().set("sweep_backoff", SWEEP_BACKOFF_CAP_MS)
            with contextlib.suppress(ConflictError):
                await self._update(
                    key, capped, "attribute_exists(pk)", what="sweep", returns="NONE"
                )
        return True
