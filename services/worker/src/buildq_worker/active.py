"""One received message and, once claimed, the run it drives: what the receive loop,
the run's lifecycle and the heartbeats share about it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from buildq.queue import ReceivedMessage
from buildq.store import RunToken
from buildq_worker.runner import RunResult
from buildq_worker.sync_stages import SyncStages

log = structlog.get_logger()

# A run stops this long before its lease could expire (at most a tenth of the lease):
# the stage's cancellation needs a moment. (A claimer waits the clock margin on top.)
LEASE_SAFETY_SECONDS = 1.0
RENEWALS_IN_FLIGHT = 2  # per run: a slow answer does not hold back the next renewal


@dataclass
class ActiveRun:
    message: ReceivedMessage
    received_at: float = field(default_factory=time.monotonic)
    token: RunToken | None = None
    attempts_used: int = 0  # of the budget, this run included (claims less releases)
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None  # handles the message, start to end
    workflow_task: asyncio.Task[RunResult] | None = None  # the workflow itself
    message_deleted: bool = False  # held past the 12 h cap: runs on its lease alone
    releasing: bool = False  # the worker is draining: hand the run back
    lease_lost: bool = False  # another worker owns the project now: write nothing
    finishing: bool = False  # its workflow has ended: only its final writes remain
    sync_stages: SyncStages | None = None  # its sync stage threads, once it runs
    lease_until: float = 0.0  # monotonic: the lease lasts at least until then
    lease_safety: float = LEASE_SAFETY_SECONDS  # stop this long before lease_until
    renewals: set[asyncio.Task[None]] = field(default_factory=set)  # in flight
    message_settled: bool = False  # the run's end has acted on the message: no heartbeats

    def adopt(self, message: ReceivedMessage) -> None:
        """The same message, received again while this run holds it (its visibility ran
        out): only the newest receipt handle is honoured from now on."""
        self.message = message
        self.received_at = time.monotonic()

    def holds_lease(self) -> bool:
        """Whether this run may still act as the project's owner: its lease is not
        lost, and by this process's own clock it cannot have run out. Thread-safe
        (a sync stage's checkpoint calls it from the stage's thread)."""
        return not self.lease_lost and time.monotonic() < self.lease_until - self.lease_safety

    def lose_lease(self, event: str) -> None:
        """Write nothing more, and stop the workflow: its project may be another
        worker's now. A sync stage still running ends the process (see sync_stages)."""
        self.lease_lost = True
        log.warning(event, project_id=self.token and self.token.project_id)
        if self.sync_stages is not None:
            self.sync_stages.lease_lost()
        self.stop_workflow()

    def stop_workflow(self) -> None:
        if self.workflow_task is not None and not self.workflow_task.done():
            self.workflow_task.cancel()
