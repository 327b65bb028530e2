"""One message's lifecycle: decode → claim → run → settle (finish, retry, dead-letter or
release), each step's writes fenced by the run's token, and what becomes of the
message decided with them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import structlog

from buildq.errors import MessageError, UnknownWorkflowError
from buildq.messages import BuildMessage, BuildReason, build_message, decode
from buildq.models import ErrorInfo, Project, ProjectStatus
from buildq.queue import BuildQueue, DeadLetter
from buildq.settings import WorkerSettings
from buildq.store import ClaimRefusedError, ProjectStore, RunToken
from buildq.transitions import (
    Backoff,
    ClaimRefusal,
    FailureOutcome,
    failure_outcome,
    stage_unstarted,
    started_by_claim,
)
from buildq.workflows.registry import WorkflowRegistry
from buildq_worker import metrics
from buildq_worker.active import ActiveRun
from buildq_worker.deleter import Deleter
from buildq_worker.runner import RunResult, RunStatus, run_workflow
from buildq_worker.timing import queue_lag

log = structlog.get_logger()

SQS_MAX_DELAY = 900  # seconds: the longest DelaySeconds a new message can have
SQS_MAX_VISIBILITY = 43_200  # seconds: 12 h


class RunLifecycle:
    def __init__(
        self,
        settings: WorkerSettings,
        store: ProjectStore,
        queue: BuildQueue,
        registry: WorkflowRegistry,
        deleter: Deleter,
        *,
        slot_freed: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.registry = registry
        self._deleter = deleter
        self._slot_freed = slot_freed
        self._backoff = Backoff(settings.retry_base_seconds, settings.retry_cap_seconds)

    async def handle(self, run: ActiveRun) -> None:
        """Claim, run and settle one message's project; raises LeaseLostError if another
        worker took the project over meanwhile."""
        try:
            build = decode(run.message.body)
        except MessageError as exc:
            error = ErrorInfo(type="PoisonMessage", message=str(exc))
            await self._dead_letter(run, error, 0, reason="poison")
            return
        structlog.contextvars.bind_contextvars(
            project_id=build.project_id, tenant_id=build.tenant_id
        )
        try:
            project = await self.store.claim(
                build.tenant_id,
                build.project_id,
                worker_id=self.settings.worker_id,
                lease_seconds=self.settings.lease_seconds,
                start=build.next_stage,
                seen_attempt=build.attempt or 0,
            )
        except ClaimRefusedError as exc:
            await self._refused(run, build, exc)
            return
        run.token = RunToken(
            build.tenant_id, build.project_id, self.settings.worker_id, project.attempt
        )
        run.attempts_used = project.attempts_used
        structlog.contextvars.bind_contextvars(attempt=project.attempt)
        lag = queue_lag(build, run.message)
        metrics.QUEUE_LAG_SECONDS.labels(
            delivery="first" if run.message.receive_count <= 1 else "redelivery"
        ).observe(lag)
        log.info(
            "project.claimed",
            reason=build.reason.value,
            receive_count=run.message.receive_count,
            queue_lag_ms=int(lag * 1000),
        )
        result = await self._run(run, project)
        run.finishing = True
        self._slot_freed()  # the next run starts while this one settles
        if result.status is RunStatus.INTERRUPTED:
            if run.lease_lost:
                self.lease_lost()
            else:
                await self._release(run, result)
            return
        await self._settle(run, result)

    async def _run(self, run: ActiveRun, project: Project) -> RunResult:
        assert run.token is not None
        # Ending before the workflow starts: the stage the claim marked RUNNING never ran.
        first = started_by_claim(project)
        unstarted = [stage_unstarted(first)] if first else []
        if project.attempts_used > self.settings.max_attempts:
            # Earlier attempts ended with no result at all: their workers died,
            # maybe because of this very project. Do not try again.
            error = ErrorInfo(
                type="AttemptsExhausted",
                message=f"{project.attempts_used - 1} attempts ended without a result",
            )
            return RunResult(RunStatus.FAILED, unstarted, error=error, permanent=True)
        try:
            workflow = self.registry.get(project.workflow)
        except UnknownWorkflowError as exc:
            error = ErrorInfo(type="UnknownWorkflowError", message=str(exc))
            return RunResult(RunStatus.FAILED, unstarted, error=error, permanent=True)
        if project.cancel_requested:
            run.cancel_event.set()
        run.workflow_task = asyncio.create_task(
            run_workflow(
                project=project,
                workflow=workflow,
                store=self.store,
                token=run.token,
                log=log.bind(),
                default_stage_timeout=self.settings.stage_timeout,
                workflow_timeout=workflow.timeout or self.settings.workflow_timeout,
                cancel_event=run.cancel_event,
            )
        )
        if run.releasing:  # the drain deadline passed while this run was being claimed
            run.stop_workflow()
        try:
            return await run.workflow_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this handler itself is being cancelled
            # Stopped before its first step: nothing ran, nothing else to checkpoint.
            return RunResult(RunStatus.INTERRUPTED, unstarted)

    async def _refused(self, run: ActiveRun, build: BuildMessage, exc: ClaimRefusedError) -> None:
        message = run.message
        # Every branch below logs what it does with the message.
        metrics.CLAIM_REFUSALS.labels(reason=exc.refusal.value).inc()
        if exc.refusal is ClaimRefusal.MISSING:
            if message.receive_count <= self.settings.missing_project_retries:
                # The API's PutItem may still be landing: look again shortly.
                delay = 2 * message.receive_count
                log.info("message.project_missing", retry_in=delay)
                await self.queue.change_visibility(message.receipt_handle, delay)
                return
            error = ErrorInfo(
                type="ProjectNotFound", message=f"project {build.project_id} does not exist"
            )
            await self._dead_letter(run, error, 0, reason="missing")
            return
        lease = exc.current.lease_expires_at if exc.current else None
        if exc.refusal is ClaimRefusal.LEASED and lease is not None:
            left = lease - int(time.time() * 1000)
            if left < 10_000:
                # The holder's lease is about to run out: it may have died with
                # this very message. Look again just after the lease expires.
                delay = max(1, left // 1000 + 2)
                log.info("message.lease_expiring", retry_in=delay)
                await self.queue.change_visibility(message.receipt_handle, delay)
                return
        # Terminal, leased by a live worker, or FAILED awaiting a replay: this message
        # is a duplicate or stale, and the record already says what happens next.
        log.info("message.dropped", refusal=exc.refusal.value)
        self.delete(run)

    async def _settle(self, run: ActiveRun, result: RunResult) -> None:
        """Write the run's final state, then act on the message."""
        token = run.token
        assert token is not None
        if result.status in (RunStatus.SUCCEEDED, RunStatus.CANCELLED):
            status = (
                ProjectStatus.SUCCEEDED
                if result.status is RunStatus.SUCCEEDED
                else ProjectStatus.CANCELLED
            )
            await self.store.finish(token, status, stages=result.stages)
            self.delete(run)
            log.info(f"project.{status.value.lower()}")
            return
        assert result.error is not None
        outcome = failure_outcome(
            attempt=run.attempts_used,
            max_attempts=self.settings.max_attempts,
            permanent=result.permanent,
        )
        if outcome is FailureOutcome.RETRY:
            delay = result.retry_delay
            if delay is None:
                delay = self._backoff.delay(run.attempts_used)
            await self.store.requeue(token, error=result.error, stages=result.stages)
            if run.message_deleted:
                await self.queue.send(
                    build_message(
                        token.tenant_id, token.project_id, BuildReason.RETRY, attempt=token.attempt
                    ),
                    delay_seconds=math.ceil(min(delay, SQS_MAX_DELAY)),
                )
            else:
                await self.queue.change_visibility(
                    run.message.receipt_handle, math.ceil(min(delay, SQS_MAX_VISIBILITY - 60))
                )
            metrics.RETRIES_SCHEDULED.inc()
            log.info(
                "project.retry_scheduled",
                retry_in=round(delay, 2),
                error_type=result.error.type,
                error=result.error.message,
            )
            return
        await self.store.finish(
            token, ProjectStatus.FAILED, error=result.error, stages=result.stages
        )
        await self._dead_letter(run, result.error, run.attempts_used, reason="failed")
        log.warning("project.failed", error_type=result.error.type, error=result.error.message)

    async def _dead_letter(
        self, run: ActiveRun, error: ErrorInfo, attempts: int, *, reason: str
    ) -> None:
        """Send the message to the DLQ with its reason, then delete it here. ``reason``
        (poison, missing or failed) labels the metric.

        A crash between the two leaves a duplicate in the DLQ, never a lost one.
        """
        await self.queue.dead_letter(
            run.message.body,
            DeadLetter(error=error, attempts=attempts, worker_id=self.settings.worker_id),
        )
        self.delete(run)
        metrics.MESSAGES_DEAD_LETTERED.labels(reason=reason).inc()
        log.warning("message.dead_lettered", error_type=error.type, error=error.message)

    async def _release(self, run: ActiveRun, result: RunResult) -> None:
        """Hand a run back: project QUEUED with its checkpoint, lease cleared, and a
        fresh message, so a release neither uses an attempt nor counts toward the
        queue's redrive limit. A crash before the delete leaves a harmless duplicate."""
        token = run.token
        assert token is not None
        await self.store.release(token, stages=result.stages)
        await self.queue.send(
            build_message(
                token.tenant_id, token.project_id, BuildReason.RELEASE, attempt=token.attempt
            )
        )
        self.delete(run)
        metrics.MESSAGES_RELEASED.inc()
        log.info("project.released")

    def delete(self, run: ActiveRun) -> None:
        if not run.message_deleted:
            self._deleter.delete(run.message.receipt_handle)
            run.message_deleted = True
            metrics.MESSAGES_DELETED.inc()

    @staticmethod
    def lease_lost() -> None:
        metrics.LEASE_LOSSES.inc()
        log.warning("project.lease_lost")
