"""The worker: its receive loop, its background jobs and its drain; one message's
lifecycle lives in ``lifecycle``, heartbeats in ``heartbeats``.

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
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from buildq.errors import LeaseLostError, UnavailableError
from buildq.queue import BuildQueue, ReceivedMessage
from buildq.settings import WorkerSettings
from buildq.store import ProjectStore
from buildq.workflows.registry import WorkflowRegistry
from buildq_worker import metrics
from buildq_worker.active import ActiveRun
from buildq_worker.deleter import Deleter
from buildq_worker.heartbeats import Heartbeats
from buildq_worker.lifecycle import RunLifecycle
from buildq_worker.presence import Presence
from buildq_worker.protection import TaskProtection
from buildq_worker.sweeper import Sweeper

__all__ = ["ActiveRun", "Worker"]

log = structlog.get_logger()


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
        self.lifecycle = RunLifecycle(
            settings, store, queue, registry, self.deleter, slot_freed=self._free_slot
        )
        self.heartbeats = Heartbeats(
            settings,
            store,
            queue,
            self.protection,
            runs=lambda: list(self._runs.values()),
            delete=self.lifecycle.delete,
        )
        self._runs: dict[str, ActiveRun] = {}  # by SQS message id
        self._stopping = asyncio.Event()
        self._release_now = asyncio.Event()
        self._slot_freed = asyncio.Event()
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

    def _free_slot(self) -> None:
        self._slot_freed.set()

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
            asyncio.create_task(self.heartbeats.run()),
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
        held = self._runs.get(message.message_id)
        if held is not None:
            # Its visibility ran out while this worker runs it: keep the one run, on
            # the newest receipt handle (SQS honours only the latest).
            held.adopt(message)
            log.warning(
                "message.redelivered_while_running",
                message_id=message.message_id,
                receive_count=message.receive_count,
            )
            if held.message_deleted:  # done with it already: this copy goes too
                held.message_deleted = False
                self.lifecycle.delete(held)
            return
        run = ActiveRun(message=message)
        self._runs[message.message_id] = run
        run.task = asyncio.create_task(self._handle(run), name=f"message-{message.message_id}")

    # -- one message -------------------------------------------------------

    async def _handle(self, run: ActiveRun) -> None:
        structlog.contextvars.bind_contextvars(message_id=run.message.message_id)
        try:
            await self.lifecycle.handle(run)
        except LeaseLostError:
            self.lifecycle.lease_lost()
        except Exception:
            # The message stays un-deleted: it reappears after the visibility timeout.
            log.exception("message.unhandled_error")
        finally:
            self._runs.pop(run.message.message_id, None)
            for renewal in run.renewals:
                renewal.cancel()  # the run is over: its lease is settled
            self._slot_freed.set()

    # -- background --------------------------------------------------------

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
