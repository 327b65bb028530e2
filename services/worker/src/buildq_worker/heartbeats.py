"""Heartbeats: every active run's message visibility and project lease are pushed out
well before either expires (invariant 4), a message held near SQS's 12 h cap is let go
to run on the lease alone, and a lease found lost stops its run at once.

Leases and visibilities are renewed by separate loops, at a fixed rate: one service
hanging or failing never holds back the other. A visibility round is cut at
``call_timeout`` (under the interval); a lease renewal is a task of its own, which
the round does not wait for, so a slow answer still renews its lease. Each run
also keeps the lease's end by this process's own monotonic clock (``lease_until``):
past it, the run stops as if the lease were lost, which covers an unreachable
DynamoDB and a process frozen past its lease alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from buildq.errors import LeaseLostError
from buildq.queue import BuildQueue
from buildq.settings import WorkerSettings
from buildq.store import ProjectStore
from buildq_worker import metrics
from buildq_worker.active import RENEWALS_IN_FLIGHT, ActiveRun
from buildq_worker.protection import TaskProtection

log = structlog.get_logger()

LEASE_WATCH_SECONDS = 0.25


def heartbeat_interval(settings: WorkerSettings) -> float:
    """How often leases and visibilities are pushed out: well before either runs out."""
    return max(0.2, min(settings.visibility_timeout, settings.lease_seconds) / 3)


async def renew_lease(run: ActiveRun, store: ProjectStore, lease_seconds: float) -> None:
    """Push ``run``'s lease out once (the heartbeat's, and a late claim's). A lease found
    taken stops the run; any other failure is raised, the lease watch covering it."""
    assert run.token is not None
    asked_at = time.monotonic()
    try:
        cancel = await store.extend_lease(run.token, lease_seconds)
    except LeaseLostError:
        # Another worker owns the project now: stop at once, write nothing more.
        run.lose_lease("project.lease_lost_seen")
        return
    # The new expiry was set after asked_at: the lease lasts at least this long.
    run.lease_until = max(run.lease_until, asked_at + lease_seconds)
    if cancel and not run.cancel_event.is_set():
        log.info("project.cancel_seen", project_id=run.token.project_id)
        run.cancel_event.set()


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
        return heartbeat_interval(self.settings)

    @property
    def call_timeout(self) -> float:
        """The longest one round of renewals may take: under the interval, so a hung
        call never delays the next round, and so well under a third of the lease."""
        return self.interval * 0.75

    async def run(self) -> None:
        """Renew leases, extend visibilities and keep the ECS protection, each on its
        own clock: a hung or failing SQS never holds back a lease (nor the reverse)."""
        await asyncio.gather(
            self._every(self.renew_leases, "lease"),
            self._every(self.extend_visibility, "visibility"),
            self._every(self.protect, "protection"),
            self._watch_leases(),
        )

    async def _every(self, job: Callable[[], Awaitable[None]], kind: str) -> None:
        """Run ``job`` at a fixed rate, each round cut at ``call_timeout``."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at = max(next_at + self.interval, loop.time())  # no burst after a freeze
            await asyncio.sleep(next_at - loop.time())
            try:
                async with asyncio.timeout(self.call_timeout):
                    await job()
            except Exception as exc:
                metrics.HEARTBEAT_FAILURES.labels(kind=kind).inc()
                log.warning(f"heartbeat.{kind}_failed", error=str(exc) or type(exc).__name__)

    async def protect(self) -> None:
        # Busy tasks are protected from ECS scale-in; idle ones are fair game.
        await self.protection.set(bool(self._runs()))

    async def extend_visibility(self) -> None:
        runs = self._runs()
        too_old = time.monotonic() - self.settings.max_message_hold
        held = [run for run in runs if not (run.message_deleted or run.message_settled)]
        for run in held:
            if run.token is not None and run.received_at < too_old:
                # SQS caps a message's total visibility at 12 h: let it go and carry
                # on under the lease alone (the sweeper covers a crash from here on).
                self._delete(run)
                log.info("message.released_to_lease", project_id=run.token.project_id)
        handles = [run.message.receipt_handle for run in held if not run.message_deleted]
        if not handles:
            return
        failed = set(
            await self.queue.change_visibility_batch(handles, self.settings.visibility_timeout)
        )
        # A run that ended meanwhile has deleted its message: that failure is expected.
        live = [
            run.message.message_id
            for run in self._runs()
            if run.message.receipt_handle in failed
            and not (run.message_deleted or run.message_settled)
        ]
        if live:
            metrics.HEARTBEAT_FAILURES.labels(kind="visibility").inc(len(live))
            log.warning("heartbeat.visibility_failed", message_ids=live)

    async def renew_leases(self) -> None:
        """Send a renewal for every claimed run, up to ``RENEWALS_IN_FLIGHT`` each. The
        round does not wait for them: a slow DynamoDB (answers in over the interval)
        still renews every lease, each when its answer comes; a hung call holds its
        place for the AWS retry budget at most."""
        for run in self._runs():
            if run.token is None or run.lease_lost:
                continue
            if len(run.renewals) >= RENEWALS_IN_FLIGHT:
                continue
            renewal = asyncio.create_task(self._renew(run))
            run.renewals.add(renewal)
            renewal.add_done_callback(run.renewals.discard)

    async def _renew(self, run: ActiveRun) -> None:
        try:
            await self._extend(run)
        except Exception as exc:
            metrics.HEARTBEAT_FAILURES.labels(kind="lease").inc()
            log.warning(
                "heartbeat.lease_failed",
                project_id=run.token and run.token.project_id,
                error=str(exc) or type(exc).__name__,
            )

    async def _extend(self, run: ActiveRun) -> None:
        await renew_lease(run, self.store, self.settings.lease_seconds)

    async def _watch_leases(self) -> None:
        """Stop a run whose lease may have run out by this process's own clock (no
        renewal has landed for a lease's length: DynamoDB unreachable, or the process
        frozen), before another worker can take the project over. Stage code that
        reaches a checkpoint first stops there (``ActiveRun.holds_lease``)."""
        while True:
            await asyncio.sleep(LEASE_WATCH_SECONDS)
            for run in self._runs():
                watched = run.token is not None and not (run.lease_lost or run.finishing)
                if watched and not run.holds_lease():
                    run.lose_lease("project.lease_expired_locally")
