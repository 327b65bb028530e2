"""The sweeper: no accepted project is lost (invariant 2).

A FAILED project stays in the index until the DLQ holds its failure; one found
there past ``building_after`` is sent to the DLQ (FAILED ⇔ one DLQ entry).

A project can be active with no message to wake it: the API died between its
DynamoDB write and its SQS send, a message was lost, or a worker died while
running a workflow longer than SQS's 12-hour visibility cap (after it had
deleted its message). Active projects carry ``sweep_at`` in a sparse, sharded
index; when that time passes (QUEUED too long, or BUILDING long past its
lease), the sweeper sends a fresh message. Duplicates are harmless: the claim
decides who runs. Workers take turns under a short DynamoDB lock, so only one
sweeps at a time, and it reads only the index, never the table.

The lock holder also writes the fleet's autoscaling signal, backlog per worker
slot, once per interval as a CloudWatch Embedded Metric Format line on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import structlog

from buildq.clock import epoch_ms
from buildq.errors import UnavailableError
from buildq.items import SWEEP_SHARDS
from buildq.messages import BuildReason, build_message
from buildq.models import ProjectStatus
from buildq.queue import BuildQueue
from buildq.store import ProjectStore, SweepCandidate
from buildq_worker.dead_letters import dead_letter, failure_of, needs_dead_letter

log = structlog.get_logger()

LOCK_NAME = "sweeper"
BATCH = 100  # candidates per index read
MAX_PER_PASS = 2_000  # projects one pass wakes at most; the rest are still due next pass
EMF_NAMESPACE = "buildq"


def backlog_emf(
    queue_name: str, *, visible: int, worker_slots: int, timestamp_ms: int
) -> dict[str, Any]:
    """One CloudWatch Embedded Metric Format record: the build queue's visible
    messages per live worker slot (a scale-out target), and the two raw numbers. With
    no live slot at all the ratio is the visible count (as if there were one)."""
    return {
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": EMF_NAMESPACE,
                    "Dimensions": [["QueueName"]],
                    "Metrics": [
                        {"Name": "BacklogPerWorkerSlot", "Unit": "None"},
                        {"Name": "VisibleMessages", "Unit": "Count"},
                        {"Name": "WorkerSlots", "Unit": "Count"},
                    ],
                }
            ],
        },
        "event": "queue.backlog",
        "QueueName": queue_name,
        "BacklogPerWorkerSlot": round(visible / max(worker_slots, 1), 4),
        "VisibleMessages": visible,
        "WorkerSlots": worker_slots,
    }


class Sweeper:
    def __init__(
        self,
        store: ProjectStore,
        queue: BuildQueue,
        *,
        owner: str,
        queue_name: str,
        interval: float,
        queued_after: float,
        building_after: float,
        out: TextIO | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.owner = owner
        self.queue_name = queue_name
        self.interval = interval
        self._out = out  # None: sys.stdout at the time of writing
        self._queued_after_ms = int(queued_after * 1000)
        self._building_after_ms = int(building_after * 1000)

    async def tick(self) -> int | None:
        """Sweep once, and report the backlog, if this worker holds the lock; returns
        how many were re-enqueued."""
        if not await self.store.acquire_lock(LOCK_NAME, self.owner, self.interval):
            return None
        enqueued = await self.sweep()
        try:
            await self.report_backlog()
        except UnavailableError as exc:  # a missed value, not a failed sweep
            log.warning("queue.backlog_failed", error=str(exc))
        return enqueued

    async def report_backlog(self) -> None:
        """Write one EMF line: the build queue's visible messages per live worker slot."""
        depth = await self.queue.depth()
        slots = sum(worker.slots_total for worker in await self.store.list_workers())
        record = backlog_emf(
            self.queue_name, visible=depth.visible, worker_slots=slots, timestamp_ms=epoch_ms()
        )
        record["worker_id"] = self.owner  # which worker wrote it: a plain property
        out = self._out or sys.stdout
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        out.flush()

    async def sweep(self) -> int:
        """One pass: every status's shards, each read with its own cutoff, so only what
        is due is read (O(due), not O(backlog)); at most ``MAX_PER_PASS`` projects."""
        enqueued = 0
        handled = 0
        now = epoch_ms()
        cutoffs = {
            ProjectStatus.QUEUED: now - self._queued_after_ms,
            ProjectStatus.BUILDING: now - self._building_after_ms,
            # Indexed only until its failure is on the DLQ, which takes a moment.
            ProjectStatus.FAILED: now - self._building_after_ms,
        }
        for status, before in cutoffs.items():
            for shard in range(SWEEP_SHARDS):
                # A marked project's clock moves past ``before``: each read brings
                # the next ones due, until none is left.
                while handled < MAX_PER_PASS:
                    due = await self.store.due_for_sweep(shard, status, before=before, limit=BATCH)
                    for candidate in due:
                        handled += 1
                        enqueued += await self._sweep_one(candidate)
                    if len(due) < BATCH:
                        break
        return enqueued

    async def _sweep_one(self, candidate: SweepCandidate) -> int:
        """Wake one due project; returns how many build messages that sent (0 or 1)."""
        # Mark first: a concurrent sweeper (or the project moving on) makes this a
        # no-op; a crash before the send only delays it one period.
        if not await self.store.mark_swept(candidate, base_ms=self._queued_after_ms):
            return 0
        message = build_message(candidate.tenant_id, candidate.project_id, BuildReason.SWEEP)
        if candidate.status is ProjectStatus.FAILED:
            await self._dead_letter(candidate, message.encode())
            return 0
        await self.queue.send(message)
        log.info(
            "project.swept",
            project_id=candidate.project_id,
            tenant_id=candidate.tenant_id,
            status=candidate.status.value,
        )
        return 1

    async def _dead_letter(self, candidate: SweepCandidate, body: str) -> None:
        """A FAILED project whose failure never reached the DLQ: send it there."""
        project = await self.store.get(candidate.tenant_id, candidate.project_id)
        if project is None or not needs_dead_letter(project):
            return
        await dead_letter(
            self.queue,
            self.store,
            body,
            failure_of(project, self.owner),
            tenant_id=project.tenant_id,
            project_id=project.project_id,
        )
        log.warning(
            "project.dead_lettered_by_sweeper",
            project_id=project.project_id,
            tenant_id=project.tenant_id,
            attempt=project.attempt,
        )
