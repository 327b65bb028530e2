"""The worker loop: poll → claim → run → settle, at most K workflows at once.

- Receives only while it has free slots, and asks for at most as many
  messages as it has free slots (invariant 6).
- Claims each project with a conditional write before running it (invariant 3).
- Heartbeats every active run: extends the message's visibility and the lease
  well before either expires (invariant 4).
- ``request_shutdown()`` drains: stop receiving, let runs finish within
  ``drain_seconds``, then release the rest so another worker takes them at once
  (invariant 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import structlog

from buildq.errors import (
    LeaseLostError,
    MessageError,
    UnavailableError,
    UnknownWorkflowError,
)
from buildq.messages import BuildMessage, decode
from buildq.models import ErrorInfo, ProjectStatus
from buildq.queue import BuildQueue, DeadLetter, ReceivedMessage
from buildq.settings import WorkerSettings
from buildq.store import ClaimRefusedError, ProjectStore, RunToken
from buildq.transitions import Backoff, ClaimRefusal, FailureOutcome, failure_outcome
from buildq.workflows.registry import WorkflowRegistry
from buildq_worker.runner import RunResult, RunStatus, run_workflow

log = structlog.get_logger()


@dataclass
class ActiveRun:
    """One received message and, once claimed, the run it drives."""

    message: ReceivedMessage
    token: RunToken | None = None
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


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
        self._runs: dict[str, ActiveRun] = {}  # by SQS message id
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._backoff = Backoff(settings.retry_base_seconds, settings.retry_cap_seconds)

    @property
    def active(self) -> int:
        return len(self._runs)

    def request_shutdown(self) -> None:
        """Stop receiving and start draining. Safe to call twice."""
        if not self._stopping.is_set():
            log.info("worker.draining", active=self.active)
        self._stopping.set()

    async def run(self) -> None:
        await self._wait_for_queue()
        log.info("worker.started", slots=self.capacity)
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        try:
            await self._receive_loop()
            await self._drain()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        log.info("worker.stopped")

    # -- receiving ---------------------------------------------------------

    async def _receive_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.capacity - self.active
            if free <= 0:
                self._slot_freed.clear()
                await self._until(self._slot_freed)
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
            receive.cancel()  # unreceived messages simply stay in the queue
            with contextlib.suppress(asyncio.CancelledError):
                await receive
            return []
        return receive.result()

    async def _until(
        self, waitable: asyncio.Event | asyncio.Task[Any] | None, limit: float | None = None
    ) -> None:
        """Wait for ``waitable`` (or ``limit`` seconds), but never past a shutdown request."""
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._stopping.wait())}
        owned = set(waiters)
        if isinstance(waitable, asyncio.Event):
            event_wait = asyncio.ensure_future(waitable.wait())
            waiters.add(event_wait)
            owned.add(event_wait)
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
        message = run.message
        structlog.contextvars.bind_contextvars(message_id=message.message_id)
        try:
            await self._process(run)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The message stays un-deleted: it reappears after the visibility timeout.
            log.exception("message.unhandled_error")
        finally:
            self._runs.pop(message.message_id, None)
            self._slot_freed.set()

    async def _process(self, run: ActiveRun) -> None:
        message = run.message
        try:
            build = decode(message.body)
        except MessageError as exc:
            await self._dead_letter(run, ErrorInfo(type="PoisonMessage", message=str(exc)), 0)
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
            )
        except ClaimRefusedError as exc:
            await self._refused(run, build, exc)
            return
        run.token = RunToken(
            build.tenant_id, build.project_id, self.settings.worker_id, project.attempt
        )
        structlog.contextvars.bind_contextvars(attempt=project.attempt)
        log.info("project.claimed", reason=build.reason.value, receive_count=message.receive_count)
        try:
            workflow = self.registry.get(project.workflow)
        except UnknownWorkflowError as exc:
            result = RunResult(
                RunStatus.FAILED,
                [],
                error=ErrorInfo(type="UnknownWorkflowError", message=str(exc)),
                permanent=True,
            )
        else:
            if project.cancel_requested:
                run.cancel_event.set()
            try:
                result = await run_workflow(
                    project=project,
                    workflow=workflow,
                    store=self.store,
                    token=run.token,
                    log=log.bind(),
                    default_stage_timeout=self.settings.stage_timeout,
                    cancel_event=run.cancel_event,
                )
            except LeaseLostError:
                log.warning("project.lease_lost")
                return
        try:
            await self._settle(run, result)
        except LeaseLostError:
            log.warning("project.lease_lost")

    async def _refused(self, run: ActiveRun, build: BuildMessage, exc: ClaimRefusedError) -> None:
        message = run.message
        if exc.refusal is ClaimRefusal.MISSING:
            if message.receive_count <= self.settings.missing_project_retries:
                # The API's PutItem may still be landing (or eventually consistent):
                # look again shortly.
                delay = 2 * message.receive_count
                log.info("message.project_missing", retry_in=delay)
                await self.queue.change_visibility(message.receipt_handle, delay)
                return
            error = ErrorInfo(
                type="ProjectNotFound", message=f"project {build.project_id} does not exist"
            )
            await self._dead_letter(run, error, 0)
            return
        # Terminal, leased by another live worker, or waiting for a replay: this
        # message is a duplicate or stale, and the record already says what to do.
        log.info("message.dropped", refusal=exc.refusal.value)
        await self.queue.delete(message.receipt_handle)

    async def _settle(self, run: ActiveRun, result: RunResult) -> None:
        """Write the run's final state, then act on the message."""
        token = run.token
        assert token is not None
        handle = run.message.receipt_handle
        if result.status is RunStatus.SUCCEEDED:
            await self.store.finish(token, ProjectStatus.SUCCEEDED, stages=result.stages)
            await self.queue.delete(handle)
            log.info("project.succeeded")
            return
        if result.status is RunStatus.CANCELLED:
            await self.store.finish(token, ProjectStatus.CANCELLED, stages=result.stages)
            await self.queue.delete(handle)
            log.info("project.cancelled")
            return
        outcome = failure_outcome(
            attempt=token.attempt,
            max_attempts=self.settings.max_attempts,
            permanent=result.permanent,
        )
        if outcome is FailureOutcome.RETRY:
            delay = result.retry_delay
            if delay is None:
                delay = self._backoff.delay(token.attempt)
            await self.store.requeue(token, error=result.error, stages=result.stages)
            await self.queue.change_visibility(handle, int(min(delay, 43_000)))
            log.info("project.retry_scheduled", retry_in=round(delay, 2))
            return
        await self.store.finish(
            token, ProjectStatus.FAILED, error=result.error, stages=result.stages
        )
        assert result.error is not None
        await self._dead_letter(run, result.error, token.attempt)
        log.warning("project.failed", error_type=result.error.type, error=result.error.message)

    async def _dead_letter(self, run: ActiveRun, error: ErrorInfo, attempts: int) -> None:
        """Send the message to the DLQ with its reason, then delete it here.

        A crash between the two leaves a duplicate in the DLQ, never a lost one.
        """
        await self.queue.dead_letter(
            run.message.body,
            DeadLetter(error=error, attempts=attempts, worker_id=self.settings.worker_id),
        )
        await self.queue.delete(run.message.receipt_handle)
        log.warning("message.dead_lettered", error_type=error.type, error=error.message)

    # -- heartbeats --------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(self.settings.visibility_timeout, self.settings.lease_seconds) / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat()
            except Exception:
                log.exception("heartbeat.failed")

    async def _heartbeat(self) -> None:
        runs = list(self._runs.values())
        if not runs:
            return
        failed = await self.queue.change_visibility_batch(
            [run.message.receipt_handle for run in runs], self.settings.visibility_timeout
        )
        if failed:
            log.warning("heartbeat.visibility_failed", count=len(failed))
        claimed = [run for run in runs if run.token is not None]
        results = await asyncio.gather(
            *(
                self.store.extend_lease(run.token, self.settings.lease_seconds)
                for run in claimed
                if run.token is not None
            ),
            return_exceptions=True,
        )
        for run, outcome in zip(claimed, results, strict=True):
            if isinstance(outcome, LeaseLostError) and run.task is not None:
                # Another worker owns the project now: stop at once, write nothing more.
                log.warning("project.lease_lost", project_id=run.token and run.token.project_id)
                run.task.cancel()
            elif isinstance(outcome, Exception):
                log.warning("heartbeat.lease_failed", error=str(outcome))

    # -- shutdown ----------------------------------------------------------

    async def _drain(self) -> None:
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if not tasks:
            return
        log.info("worker.drain_waiting", active=len(tasks), seconds=self.settings.drain_seconds)
        _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_seconds)
        if not pending:
            return
        releasing = [run for run in self._runs.values() if run.task in pending]
        for run in releasing:
            assert run.task is not None
            run.task.cancel()
        await asyncio.gather(*(run.task for run in releasing if run.task), return_exceptions=True)
        await asyncio.gather(*(self._release(run) for run in releasing), return_exceptions=True)

    async def _release(self, run: ActiveRun) -> None:
        """Hand a run back: project to QUEUED, lease cleared, message visible at once."""
        if run.token is not None:
            with contextlib.suppress(LeaseLostError):
                await self.store.requeue(run.token, error=None)
        await self.queue.change_visibility(run.message.receipt_handle, 0)
        log.info("project.released", project_id=run.token and run.token.project_id)

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
