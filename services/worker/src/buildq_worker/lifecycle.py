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

from buildq import limits
from buildq.clock import epoch_ms
from buildq.errors import MessageError, UnknownWorkflowError, WriteTooLargeError
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
from buildq_worker.active import LEASE_SAFETY_SECONDS, ActiveRun
from buildq_worker.dead_letters import dead_letter, failure_of, needs_dead_letter
from buildq_worker.deleter import Deleter
from buildq_worker.heartbeats import heartbeat_interval, renew_lease
from buildq_worker.runner import RunResult, RunStatus, run_workflow
from buildq_worker.sync_stages import SyncStages
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
            letter = DeadLetter(error=error, attempts=0, worker_id=self.settings.worker_id)
            await self._dead_letter(run, letter, reason="poison")
            return
        structlog.contextvars.bind_contextvars(
            project_id=build.project_id, tenant_id=build.tenant_id
        )
        asked_at = time.monotonic()
        try:
            project = await self.store.claim(
                build.tenant_id,
                build.project_id,
                worker_id=self.settings.worker_id,
                lease_seconds=self.settings.lease_seconds,
                margin_seconds=self.settings.clock_margin_seconds,
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
        run.lease_until = asked_at + self.settings.lease_seconds
        run.lease_safety = min(LEASE_SAFETY_SECONDS, self.settings.lease_seconds / 10)
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
                return
            if not run.releasing:
                # Nothing here stopped it: a failure, which uses an attempt (a release
                # would not, and the run could come back for ever).
                error = ErrorInfo(
                    type="InterruptedError", message="the run stopped with no drain or lease loss"
                )
                result = RunResult(RunStatus.FAILED, result.stages, error=error)
        try:
            if result.status is RunStatus.INTERRUPTED:
                await self._release(run, result)
            else:
                await self._settle(run, result)
        except WriteTooLargeError as exc:
            # DynamoDB would refuse this write whatever the retry: end FAILED with a
            # small error instead, never a loop of attempts.
            await self._fail_too_large(run, result, exc)

    async def _fail_too_large(
        self, run: ActiveRun, result: RunResult, exc: WriteTooLargeError
    ) -> None:
        token = run.token
        assert token is not None
        why = (
            f"; the run's error: {result.error.type}: {result.error.message}"
            if result.error
            else ""
        )
        error = ErrorInfo(type="WriteTooLargeError", message=f"{exc}{why}")
        try:
            await self.store.finish(
                token,
                ProjectStatus.FAILED,
                error=error,
                stages=limits.without_outputs(result.stages),
            )
        except WriteTooLargeError:
            await self.store.finish(token, ProjectStatus.FAILED, error=error)
        letter = DeadLetter(
            error=error,
            attempts=run.attempts_used,
            worker_id=self.settings.worker_id,
            project_attempt=token.attempt,
        )
        await self._dead_letter(run, letter, reason="failed")
        log.warning("project.failed", error_type=error.type, error=error.message)

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
        if not await self._lease_for_first_stage(run):
            return RunResult(RunStatus.INTERRUPTED, unstarted)
        run.sync_stages = SyncStages(self.settings.sync_stage_grace_seconds)
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
                sync_stages=run.sync_stages,
                owner=run,
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

    async def _lease_for_first_stage(self, run: ActiveRun) -> bool:
        """Whether the run holds enough lease to start. A claim that came back late (a
        slow or retried call: over a quarter of the heartbeat interval) may leave less
        than the next round's renewal needs to land in time: renew it now, before a
        stage starts, rather than lose it mid-stage."""
        assert run.token is not None
        lease = self.settings.lease_seconds
        if run.lease_until - time.monotonic() >= lease - heartbeat_interval(self.settings) / 4:
            return True
        try:
            await renew_lease(run, self.store, lease)
        except Exception as exc:  # the lease check below decides
            log.warning("project.late_claim_renewal_failed", error=str(exc) or type(exc).__name__)
        else:
            if run.lease_lost:
                return False
            log.info("project.late_claim_renewed")
        if not run.holds_lease():
            run.lose_lease("project.lease_expired_locally")
            return False
        return True

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
            letter = DeadLetter(error=error, attempts=0, worker_id=self.settings.worker_id)
            await self._dead_letter(run, letter, reason="missing")
            return
        current = exc.current
        if needs_dead_letter(current):
            # FAILED, and its failure never reached the DLQ (the send failed, or the
            # worker died first): send it now, from the record, then drop this.
            assert current is not None
            letter = failure_of(current, self.settings.worker_id)
            await self._dead_letter(run, letter, reason="forwarded")
            return
        if exc.refusal is ClaimRefusal.NOT_YET and current is not None and current.retry_at:
            # A retry's backoff is not over (an early copy, or a heartbeat's visibility
            # change landed after the retry's own): back on the queue until it is.
            wait = (current.retry_at - epoch_ms()) / 1000
            delay = math.ceil(min(max(wait, 1), SQS_MAX_VISIBILITY - 60))
            log.info("message.retry_not_due", retry_in=delay)
            await self.queue.change_visibility(message.receipt_handle, delay)
            return
        lease = current.lease_expires_at if current else None
        if exc.refusal is ClaimRefusal.LEASED and lease is not None:
            left = lease - epoch_ms()
            if left < 10_000:
                # The holder's lease is about to run out: it may have died with
                # this very message. Look again just after it can be taken over (the
                # clock margin past its expiry).
                margin_ms = int(self.settings.clock_margin_seconds * 1000)
                delay = max(1, (left + margin_ms) // 1000 + 2)
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
            retry_at = epoch_ms() + int(delay * 1000)
            await self.store.requeue(
                token, error=result.error, stages=result.stages, retry_at=retry_at
            )
            await self._come_back(run, token, delay)
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
        letter = DeadLetter(
            error=result.error,
            attempts=run.attempts_used,
            worker_id=self.settings.worker_id,
            project_attempt=token.attempt,
        )
        await self._dead_letter(run, letter, reason="failed")
        log.warning("project.failed", error_type=result.error.type, error=result.error.message)

    async def _come_back(self, run: ActiveRun, token: RunToken, delay: float) -> None:
        """Make the message of a retry come back after ``delay``: its own, hidden for
        that long, or else a fresh one. The record's ``retry_at`` holds off anything
        that comes sooner."""
        run.message_settled = True  # heartbeats leave its visibility alone from now on
        seconds = math.ceil(delay)
        held = time.monotonic() - run.received_at
        if not run.message_deleted and held + seconds < SQS_MAX_VISIBILITY - 60:
            try:
                await self.queue.change_visibility(run.message.receipt_handle, seconds)
                return
            except Exception as exc:
                # Deleted as a duplicate, a stale receipt handle, SQS failing: the
                # retry must still come back.
                log.warning("message.retry_visibility_failed", error=str(exc))
        # DelaySeconds stops at 15 min: a longer backoff is the claim's to keep.
        await self.queue.send(
            build_message(
                token.tenant_id, token.project_id, BuildReason.RETRY, attempt=token.attempt
            ),
            delay_seconds=min(seconds, SQS_MAX_DELAY),
        )
        self.delete(run)

    async def _dead_letter(self, run: ActiveRun, letter: DeadLetter, *, reason: str) -> None:
        """Send the message to the DLQ with its reason (recorded on its project, if it
        has one), then delete it here. ``reason`` (poison, missing, failed or forwarded)
        labels the metric.

        The build message goes only once the DLQ holds its copy: a failed send leaves it
        to come back, and a crash between the two a duplicate, never a lost one.
        """
        run.message_settled = True
        build = run.token
        await dead_letter(
            self.queue,
            self.store,
            run.message.body,
            letter,
            tenant_id=build.tenant_id if build else _field(run, "tenant_id"),
            project_id=build.project_id if build else _field(run, "project_id"),
        )
        self.delete(run)
        metrics.MESSAGES_DEAD_LETTERED.labels(reason=reason).inc()
        log.warning(
            "message.dead_lettered", error_type=letter.error.type, error=letter.error.message
        )

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


def _field(run: ActiveRun, name: str) -> str | None:
    """``tenant_id`` or ``project_id`` of a message whose claim was refused (no token)."""
    try:
        return str(getattr(decode(run.message.body), name))
    except MessageError:
        return None
