"""The sweeper: no accepted project is lost (invariant 2).

A project can be active with no message to wake it: the API died between its
DynamoDB write and its SQS send, a message was lost, or a worker died while
running a workflow longer than SQS's 12-hour visibility cap (after it had
deleted its message). Active projects carry ``sweep_at`` in a sparse, sharded
index; when that time passes (QUEUED too long, or BUILDING long past its
lease), the sweeper sends a fresh message. Duplicates are harmless: the claim
decides who runs. Workers take turns under a short DynamoDB lock, so only one
sweeps at a time, and it reads only the index, never the table.
"""

from __future__ import annotations

import structlog

from buildq.clock import epoch_ms
from buildq.items import SWEEP_SHARDS
from buildq.messages import BuildReason, build_message
from buildq.models import ProjectStatus
from buildq.queue import BuildQueue
from buildq.store import ProjectStore

log = structlog.get_logger()

LOCK_NAME = "sweeper"
BATCH = 100  # candidates per shard per pass


class Sweeper:
    def __init__(
        self,
        store: ProjectStore,
        queue: BuildQueue,
        *,
        owner: str,
        interval: float,
        queued_after: float,
        building_after: float,
    ) -> None:
        self.store = store
        self.queue = queue
        self.owner = owner
        self.interval = interval
        self._queued_after_ms = int(queued_after * 1000)
        self._building_after_ms = int(building_after * 1000)

    async def tick(self) -> int | None:
        """Sweep once if this worker holds the lock; returns how many were re-enqueued."""
        if not await self.store.acquire_lock(LOCK_NAME, self.owner, self.interval):
            return None
        return await self.sweep()

    async def sweep(self) -> int:
        enqueued = 0
        now = epoch_ms()
        cutoff = {
            ProjectStatus.QUEUED: now - self._queued_after_ms,
            ProjectStatus.BUILDING: now - self._building_after_ms,
        }
        earliest = max(cutoff.values())
        for shard in range(SWEEP_SHARDS):
            for candidate in await self.store.due_for_sweep(shard, before=earliest, limit=BATCH):
                if candidate.sweep_at > cutoff.get(candidate.status, earliest):
                    continue
                # Mark first: a concurrent sweeper (or the project moving on) makes
                # this a no-op; a crash before the send only delays it one period.
                if not await self.store.mark_swept(candidate):
                    continue
                await self.queue.send(
                    build_message(candidate.tenant_id, candidate.project_id, BuildReason.SWEEP)
                )
                enqueued += 1
                log.info(
                    "project.swept",
                    project_id=candidate.project_id,
                    tenant_id=candidate.tenant_id,
                    status=candidate.status.value,
                )
        return enqueued
