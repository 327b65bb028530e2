"""One received message and, once claimed, the run it drives: what the receive loop,
the run's lifecycle and the heartbeats share about it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from buildq.queue import ReceivedMessage
from buildq.store import RunToken
from buildq_worker.runner import RunResult
from buildq_worker.sync_stages import SyncStages


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
    message_settled: bool = False  # the run's end has acted on the message: no heartbeats

    def adopt(self, message: ReceivedMessage) -> None:
        """The same message, received again while this run holds it (its visibility ran
        out): only the newest receipt handle is honoured from now on."""
        self.message = message
        self.received_at = time.monotonic()

    def stop_workflow(self) -> None:
        if self.workflow_task is not None and not self.workflow_task.done():
            self.workflow_task.cancel()
