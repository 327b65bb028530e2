"""Heartbeats: every active run's message visibility and project lease are pushed out
well before either expires (invariant 4), a message held near SQS's 12 h cap is let go
to run on the lease alone, and a lease found lost stops its run at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from buildq.errors import LeaseLostError
from buildq.queue import BuildQueue
from buildq.settings import WorkerSettings
from buildq.store import ProjectStore
from buildq_worker import metrics
from buildq_worker.active import ActiveRun
from buildq_worker.protection import TaskProtection

log = structlog.get_logger()


class Heartbeats:
    def __init__(
        self,
        settings: WorkerSettings,
        store: ProjectStore,
        queue: BuildQueue,
        protection: TaskProtection,
        *,
        runs: Callable[[], list[ActiveRun]],
        delete: Callable[[ActiveRun], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.protection = protection
        self._runs = runs
        self._delete = delete

    @property
    def interval(self) -> float:
        # Well before either the visibility timeout or the lease runs out.
        shortest = min(self.settings.visibility_timeout, self.settings.lease_seconds)
        return max(0.2, shortest / 3)

    async def beat(self) -> None:
        runs = self._runs()
        # Busy tasks are protected from ECS scale-in; idle ones are fair game.
        await self.protection.set(bool(runs))
        if not runs:
            return
        too_old = time.monotonic() - self.settings.max_message_hold
        held = [run for run in runs if not run.message_deleted]
        for run in held:
            if run.token is not None and run.received_at < too_old:
                # SQS caps a message's total visibility at 12 h: let it go and carry
                # on under the lease alone (the sweeper covers a crash from here on).
                self._delete(run)
                log.info("message.released_to_lease", project_id=run.token.project_id)
        handles = [run.message.receipt_handle for run in held if not run.message_deleted]
        if handles:
            failed = set(
                await self.queue.change_visibility_batch(handles, self.settings.visibility_timeout)
            )
            # A run that ended meanwhile has deleted its message: that failure is expected.
            live = [
                run.message.message_id
                for run in self._runs()
                if run.message.receipt_handle in failed and not run.message_deleted
            ]
            if live:
                metrics.HEARTBEAT_FAILURES.labels(kind="visibility").inc(len(live))
                log.warning("heartbeat.visibility_failed", message_ids=live)
        claimed = [run for run in runs if run.token is not None]
        outcomes = await asyncio.gather(
            *(self._extend(run) for run in claimed), return_exceptions=True
        )
        for run, outcome in zip(claimed, outcomes, strict=True):
            if isinstance(outcome, Exception):
                metrics.HEARTBEAT_FAILURES.labels(kind="lease").inc()
                log.warning(
                    "heartbeat.lease_failed",
                    project_id=run.token and run.token.project_id,
                    error=str(outcome),
                )

    async def _extend(self, run: ActiveRun) -> None:
        assert run.token is not None
        try:
            cancel = await self.store.extend_lease(run.token, self.settings.lease_seconds)
        except LeaseLostError:
            # Another worker owns the project now: stop at once, write nothing more.
            run.lease_lost = True
            run.stop_workflow()
            return
        if cancel and not run.cancel_event.is_set():
            log.info("project.cancel_seen", project_id=run.token.project_id)
            run.cancel_event.set()
