"""The worker loop: poll → claim → run → settle, at most K workflows at once.

- Receives only while it has free slots, and asks for at most as many
  messages as it has free slots (invariant 6). A slot is free once its workflow has
  ended: the next message is received and claimed while the run's final write goes
  out, so no slot waits on that round trip, and at most K workflows ever run.
- Claims each project with a conditional write before running it (invariant 3).
- Heartbeats every active run: extends the message's visibility and the lease
  well before either expires (invariant 4).
- ``request_shutdown()`` drains: stop receiving, let runs finish within
  ``drain_seconds``, then release the rest so another worker takes them at once
  (invariant 7). A second call releases at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import structlog

from buildq.clock import parse_iso
from buildq.errors import LeaseLostError, MessageError, UnavailableError, UnknownWorkflowError
from buildq.messages import BuildMessage, BuildReason, build_message, decode
from buildq.models import ErrorInfo, Project, ProjectStatus
from buildq.queue import BuildQueue, DeadLetter, ReceivedMessage
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
from buildq_worker.deleter import Deleter
from buildq_worker.presence import Presence
from buildq_worker.protection import TaskProtection
from buildq_worker.runner import RunResult, RunStatus, run_workflow
from buildq_worker.sweeper import Sweeper

log = structlog.get_logger()

SQS_MAX_DELAY = 900  # seconds: the longest DelaySeconds a new message can have
SQS_MAX_VISIBILITY = 43_200  # seconds: 12 h


@dataclass
class ActiveRun:
    """One received message and, once claimed, the run it drives."""

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

    def stop_workflow(self) -> None:
        if self.workflow_task is not None and not self.workflow_task.done():
            self.workflow_task.cancel()


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        store: ProjectStore,
        queue: BuildQueue,
        registry: WorkflowRegistry,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.registry = registry
        self.capacity = settings.max_workflow_workers
        self.sweeper = Sweeper(
            store,
            queue,
            owner=settings.worker_id,
            queue_name=settings.queue_name,
            interval=settings.sweep_interval,
            queued_after=settings.sweep_queued_after,
            building_after=settings.sweep_building_after,
        )
        self.presence = Presence(
            store,
            worker_id=settings.worker_id,
            slots=settings.max_workflow_workers,
            interval=settings.presence_interval,
            running=self._running_projects,
        )
        self.protection = TaskProtection.from_env()
        self.deleter = Deleter(queue)
        self._runs: dict[str, ActiveRun] = {}  # by SQS message id
        self._stopping = asyncio.Event()
        self._release_now = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._backoff = Backoff(settings.retry_base_seconds, settings.retry_cap_seconds)
        self._hand_back: asyncio.Task[None] | None = None
        # /healthz: when the receive loop last went round, and whether it is waiting
        # for a slot (all busy: not a stall).
        self._receive_progress = time.monotonic()
        self._waiting_for_slot = False

    @property
    def active(self) -> int:
        return len(self._runs)

    @property
    def busy(self) -> int:
        """Slots taken: every run whose workflow has not ended yet."""
        return sum(1 for run in self._runs.values() if not run.finishing)

    @property
    def stall_after(self) -> float:
        """Longest an iteration of the receive loop may take: one long poll that hits
        the read timeout, plus slack."""
        return self.settings.receive_wait_seconds + self.settings.aws_read_timeout + 10.0

    def receive_stalled_for(self) -> float | None:
        """Seconds since the receive loop last went round, if that is longer than
        ``stall_after`` although it has free slots; else None (healthy). A worker whose
        slots are all busy, or that is draining, is not receiving by design."""
        if self._stopping.is_set() or self._waiting_for_slot or self.busy >= self.capacity:
            return None
        since = time.monotonic() - self._receive_progress
        return since if since > self.stall_after else None

    def _running_workflows(self) -> int:
        return sum(1 for run in self._runs.values() if run.token is not None)

    def _running_projects(self) -> list[str]:
        return sorted(
            f"{run.token.tenant_id}/{run.token.project_id}"
            for run in self._runs.values()
            if run.token is not None
        )

    def request_shutdown(self) -> None:
        """First call: stop receiving and drain. Second call: release at once."""
        if self._stopping.is_set():
            log.info("worker.release_now", active=self.active)
            self._release_now.set()
            return
        log.info("worker.draining", active=self.active)
        self._stopping.set()

    async def run(self) -> None:
        metrics.track_slots(self._running_workflows, lambda: self.capacity - self.busy)
        await self._wait_for_queue()
        log.info("worker.started", slots=self.capacity)
        await self._best_effort(self.presence.beat)
        background = [
            asyncio.create_task(self._every(self.settings.presence_interval, self.presence.beat)),
            asyncio.create_task(self._every(self._heartbeat_interval(), self._heartbeat)),
            asyncio.create_task(self._every(self.settings.sweep_interval, self.sweeper.tick)),
            asyncio.create_task(self._watch_loop_lag()),
            asyncio.create_task(self.deleter.run()),
        ]
        try:
            await self._receive_loop()
            await self._drain()
            if self._hand_back is not None:
                await self._hand_back
        finally:
            await self.deleter.flush()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._best_effort(self.presence.leave)
        log.info("worker.stopped")

    async def _best_effort(self, job: Callable[[], Awaitable[object]]) -> None:
        try:
            await job()
        except Exception:
            metrics.BACKGROUND_JOB_FAILURES.labels(job=job.__name__.lstrip("_")).inc()
            log.exception("worker.background_job_failed", job=job.__name__)

    # -- receiving ---------------------------------------------------------

    async def _receive_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._receive_progress = time.monotonic()
            free = self.capacity - self.busy
            if free <= 0:
                self._slot_freed.clear()
                self._waiting_for_slot = True
                try:
                    await self._until(self._slot_freed)
                finally:
                    self._waiting_for_slot = False
                continue
            try:
                messages = await self._receive(free)
            except UnavailableError as exc:
                failures += 1
                delay = min(20.0, 0.5 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("queue.receive_failed", error=str(exc), retry_in=round(delay, 2))
                await self._until(None, limit=delay)
                continue
            failures = 0
            metrics.MESSAGES_RECEIVED.inc(len(messages))
            for message in messages:
                self._start(message)

    async def _receive(self, free: int) -> list[ReceivedMessage]:
        """Long-poll for up to ``free`` messages; a shutdown request cuts the poll short."""
        receive = asyncio.create_task(
            self.queue.receive(
                free,
                wait_seconds=self.settings.receive_wait_seconds,
                visibility_timeout=self.settings.visibility_timeout,
            )
        )
        await self._until(receive)
        if not receive.done():
            # Shutting down mid-poll. Cancelling the call would not stop SQS from
            # handing it messages (they would stay hidden for the visibility
            # timeout), so let it finish and hand back whatever it got at once.
            self._hand_back = asyncio.create_task(self._return_unstarted(receive))
            return []
        return receive.result()

    async def _return_unstarted(self, receive: asyncio.Task[list[ReceivedMessage]]) -> None:
        try:
            messages = await receive
        except UnavailableError:
            return
        metrics.MESSAGES_RECEIVED.inc(len(messages))
        if messages:
            await self.queue.change_visibility_batch([m.receipt_handle for m in messages], 0)
            log.info("worker.returned_unstarted", count=len(messages))

    async def _until(
        self, waitable: asyncio.Event | asyncio.Task[Any] | None, limit: float | None = None
    ) -> None:
        """Wait for ``waitable`` (or ``limit`` seconds), but never past a shutdown request."""
        stop = asyncio.ensure_future(self._stopping.wait())
        owned: list[asyncio.Future[Any]] = [stop]
        waiters: set[asyncio.Future[Any]] = {stop}
        if isinstance(waitable, asyncio.Event):
            event_wait = asyncio.ensure_future(waitable.wait())
            owned.append(event_wait)
            waiters.add(event_wait)
        elif waitable is not None:
            waiters.add(waitable)
        try:
            await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in owned:
                waiter.cancel()

    def _start(self, message: ReceivedMessage) -> None:
        run = ActiveRun(message=message)
        self._runs[message.message_id] = run
        run.task = asyncio.create_task(self._handle(run), name=f"message-{message.message_id}")

    # -- one message -------------------------------------------------------

    async def _handle(self, run: ActiveRun) -> None:
        structlog.contextvars.bind_contextvars(message_id=run.message.message_id)
        try:
            await self._process(run)
        except LeaseLostError:
            self._lease_lost()
        except Exception:
            # The message stays un-deleted: it reappears after the visibility timeout.
            log.exception("message.unhandled_error")
        finally:
            self._runs.pop(run.message.message_id, None)
            self._slot_freed.set()

    async def _process(self, run: ActiveRun) -> None:
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
        lag = _queue_lag(build, run.message)
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
        self._slot_freed.set()  # the next run starts while this one settles
        if result.status is RunStatus.INTERRUPTED:
            if run.lease_lost:
                self._lease_lost()
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
        self._delete(run)

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
            self._delete(run)
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
        self._delete(run)
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
        self._delete(run)
        metrics.MESSAGES_RELEASED.inc()
        log.info("project.released")

    def _delete(self, run: ActiveRun) -> None:
        if not run.message_deleted:
            self.deleter.delete(run.message.receipt_handle)
            run.message_deleted = True
            metrics.MESSAGES_DELETED.inc()

    def _lease_lost(self) -> None:
        metrics.LEASE_LOSSES.inc()
        log.warning("project.lease_lost")

    # -- heartbeats --------------------------------------------------------

    def _heartbeat_interval(self) -> float:
        # Well before either the visibility timeout or the lease runs out.
        shortest = min(self.settings.visibility_timeout, self.settings.lease_seconds)
        return max(0.2, shortest / 3)

    async def _heartbeat(self) -> None:
        runs = list(self._runs.values())
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
                for run in self._runs.values()
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

    async def _every(self, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._best_effort(job)

    async def _watch_loop_lag(self) -> None:
        """Log when the event loop is blocked (a sync stage not in a thread, say)."""
        loop = asyncio.get_running_loop()
        period = 0.25
        while True:
            before = loop.time()
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - before - period)
            metrics.EVENT_LOOP_LAG_SECONDS.observe(lag)
            if lag > self.settings.loop_lag_warning:
                log.warning("worker.event_loop_lag", lag_ms=round(lag * 1000))

    # -- shutdown ----------------------------------------------------------

    async def _drain(self) -> None:
        if not self._runs:
            return
        log.info("worker.drain_waiting", active=self.active, seconds=self.settings.drain_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_seconds
        while self._runs and not self._release_now.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._slot_freed.clear()
            waiters = [
                asyncio.ensure_future(self._slot_freed.wait()),
                asyncio.ensure_future(self._release_now.wait()),
            ]
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        # Whatever still runs is handed back: each run's own task writes its
        # checkpoint and releases it (see _process), so nothing races its writes.
        for run in list(self._runs.values()):
            run.releasing = True
            run.stop_workflow()
        handlers = [run.task for run in self._runs.values() if run.task is not None]
        if handlers:
            await asyncio.wait(handlers, timeout=30)

    async def _wait_for_queue(self) -> None:
        """At start-up the emulator or bootstrap may not be ready yet: wait for the queue."""
        delay = 0.2
        while not self._stopping.is_set():
            try:
                await self.queue.ping()
                return
            except UnavailableError as exc:
                log.info("worker.waiting_for_queue", error=str(exc))
                await self._until(None, limit=delay)
                delay = min(delay * 2, 5.0)


def _queue_lag(build: BuildMessage, message: ReceivedMessage) -> float:
    """Seconds from the message's ``enqueued_at`` (its producer's clock) to now; from
    SQS's SentTimestamp if ``enqueued_at`` is not a timestamp."""
    try:
        enqueued = parse_iso(build.enqueued_at)
        if enqueued.tzinfo is None:
            enqueued = enqueued.replace(tzinfo=UTC)
        sent = enqueued.timestamp()
    except ValueError:
        sent = message.sent_at_ms / 1000
    return max(0.0, time.time() - sent)
