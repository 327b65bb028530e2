"""The dead-letter queue, for on-call: peek, replay (safely, at a bounded rate), purge.

Every command is one pass over the DLQ (``_Scan``): long polls only, each message
handled at most once (by message id), every message it does not consume kept hidden
while the pass runs (a keeper renews the holds) and handed back at its end; a command
that dies leaves them hidden for ``hold`` seconds at most.

Peeking never changes a project. Replaying one message:

1. the project must be FAILED: it becomes QUEUED with a fresh attempt budget, in
   one conditional write (of two replays running at once, one wins);
2. a new build message is sent;
3. the DLQ message is deleted.

A crash between 2 and 3 leaves the DLQ message behind; the next replay finds the
project no longer FAILED and only deletes it. The duplicate build message that
may result is harmless: the worker's claim decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from types import TracebackType

import structlog

from buildq.clock import parse_iso
from buildq.errors import BuildqError, ConflictError, MessageError, NotFoundError
from buildq.faults import crash_point
from buildq.messages import BuildMessage, BuildReason, build_message, decode
from buildq.queue import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_TYPE,
    DLQ_FAILED_AT,
    DLQ_WORKER_ID,
    SQS_BATCH,
    BuildQueue,
    ReceivedMessage,
)
from buildq.store import ProjectStore
from buildq.transitions import next_stage

log = structlog.get_logger()

MAX_SCAN = 10_000  # messages one command looks at, at most
WAIT_SECONDS = 1  # every DLQ receive is a long poll this long (a short poll can miss some)
QUIET_SECONDS = 5.0  # polls bring nothing new this long while the DLQ shows some: stop
QUIET_PAUSE = 0.2  # between polls that bring nothing new (while some show as visible), s
SCAN_SECONDS = 3600.0  # a command stops receiving after this long (``time_limit``)

# Why a pass over the DLQ ended (``ScanReport.stopped``).
DRAINED = "drained"  # a poll brought nothing new and the DLQ shows no visible message
LIMIT = "limit"  # it saw ``limit`` messages
TIME_LIMIT = "time_limit"  # it received for ``time_limit`` seconds
QUIET = "quiet"  # the DLQ shows visible messages that QUIET_SECONDS of polls did not bring


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead-lettered message and why it failed."""

    message_id: str
    receipt_handle: str
    body: str
    tenant_id: str | None
    project_id: str | None
    error_type: str
    error_message: str
    attempts: int | None
    worker_id: str | None
    failed_at: str | None

    @classmethod
    def of(cls, message: ReceivedMessage) -> DeadLetterEntry:
        build: BuildMessage | None
        try:
            build = decode(message.body)
        except MessageError:
            build = None
        attributes = message.attributes
        attempts = attributes.get(DLQ_ATTEMPTS)
        return cls(
            message_id=message.message_id,
            receipt_handle=message.receipt_handle,
            body=message.body,
            tenant_id=build.tenant_id if build else None,
            project_id=build.project_id if build else None,
            # A message the queue's redrive policy moved (it crashed workers) has no
            # attributes from buildq: say so rather than nothing.
            error_type=attributes.get(DLQ_ERROR_TYPE, "Redriven"),
            error_message=attributes.get(
                DLQ_ERROR_MESSAGE, "moved by the queue's redrive policy (maxReceiveCount)"
            ),
            attempts=int(attempts) if attempts else None,
            worker_id=attributes.get(DLQ_WORKER_ID),
            failed_at=attributes.get(DLQ_FAILED_AT),
        )

    def public(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("receipt_handle")
        return data


@dataclass(frozen=True)
class Filter:
    """Which dead-lettered messages a replay or purge touches."""

    all: bool = False
    projects: frozenset[str] = frozenset()
    tenant: str | None = None
    reason_contains: str | None = None
    failed_after: datetime | None = None
    failed_before: datetime | None = None

    def matches(self, entry: DeadLetterEntry) -> bool:
        if self.projects and entry.project_id not in self.projects:
            return False
        if self.tenant is not None and entry.tenant_id != self.tenant:
            return False
        if self.reason_contains is not None:
            reason = f"{entry.error_type}: {entry.error_message}".lower()
            if self.reason_contains.lower() not in reason:
                return False
        failed = parse_iso(entry.failed_at) if entry.failed_at else None
        if self.failed_after is not None and (failed is None or failed <= self.failed_after):
            return False
        return not (
            self.failed_before is not None and (failed is None or failed >= self.failed_before)
        )


@dataclass
class ScanReport:
    """How one pass over the DLQ went, and why it ended."""

    messages: int = 0  # distinct messages received (each handled once)
    redelivered: int = 0  # receives of a message already seen: held, not handled again
    polls: int = 0
    stopped: str = ""  # DRAINED, LIMIT, TIME_LIMIT or QUIET
    visible_left: int | None = None  # what the DLQ showed as visible when QUIET

    @property
    def complete(self) -> bool:
        """True if the pass saw every message it could (nothing visible was left)."""
        return self.stopped == DRAINED


@dataclass
class _Held:
    receipt_handle: str  # the latest receive's
    until: float  # monotonic time by which its hold runs out, at the latest


class _Scan:
    """One command's pass over the DLQ; each message is handled at most once.

    Every receive is a long poll (``WAIT_SECONDS``), never a short one: a short poll
    asks a sample of SQS's servers and may answer empty while messages wait.

    Every message received stays hidden until the command consumes it (``delete``) or
    the pass ends (then it is handed back: visibility 0). A keeper renews the holds
    while the command runs, so a slow, rate-limited replay never sees a hold run out,
    and a command that dies hides its messages for ``hold`` seconds at most. Held until
    the end, the messages already seen cannot crowd the polls either (SQS answers with
    the oldest visible first, moto strictly so): each poll brings messages not seen
    yet, and the pass ends when one brings nothing new.

    A message that comes back anyway (a renewal was late or failed, or SQS delivered it
    twice) is recognised by its id: held again under its new receipt, never handled
    again, and handed back with the rest.

    The pass ends (``ScanReport.stopped``) when a poll brings nothing new (empty, or
    only messages already seen) and the DLQ then shows no visible message (DRAINED: what
    the poll brought is held again, so the count is of messages not seen, or come back
    since); after ``limit`` messages (LIMIT); after ``time_limit`` seconds (TIME_LIMIT);
    or when polls bring nothing new for ``QUIET_SECONDS`` while the DLQ does show
    visible messages (QUIET: false empty answers, SQS's lagging count, messages that
    keep coming back faster than their hold).
    """

    def __init__(self, queue: BuildQueue, *, limit: int, hold: int, time_limit: float) -> None:
        self.report = ScanReport()
        self._queue = queue
        self._limit = limit
        self._hold = hold
        self._time_limit = time_limit
        self._seen: set[str] = set()
        self._held: dict[str, _Held] = {}
        self._keeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Scan:
        self._keeper = asyncio.create_task(self._keep(), name="dlq-hold-keeper")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.wait([self._keeper])  # no renewal may land after the hand-back
        handles = [held.receipt_handle for held in self._held.values()]
        self._held.clear()
        try:
            failed = len(await self._queue.change_visibility_batch(handles, 0, dlq=True))
        except BuildqError as exc:  # they come back when their hold runs out
            log.warning("dlq.hand_back_failed", error=str(exc), hold_seconds=self._hold)
            return
        if failed:
            log.warning("dlq.hand_back_failed", count=failed, hold_seconds=self._hold)

    async def batches(self) -> AsyncGenerator[list[ReceivedMessage], None]:
        """Batches of messages this pass has not seen before, until it ends."""
        report = self.report
        deadline = time.monotonic() + self._time_limit
        quiet_since: float | None = None
        while True:
            if len(self._seen) >= self._limit:
                report.stopped = LIMIT
                return
            started = time.monotonic()
            if started >= deadline:
                report.stopped = TIME_LIMIT
                return
            batch = await self._queue.receive(
                min(SQS_BATCH, self._limit - len(self._seen)),
                wait_seconds=WAIT_SECONDS,
                visibility_timeout=self._hold,
                dlq=True,
            )
            report.polls += 1
            fresh: list[ReceivedMessage] = []
            for message in batch:
                self._held[message.message_id] = _Held(message.receipt_handle, started + self._hold)
                if message.message_id in self._seen:
                    report.redelivered += 1
                    log.info("dlq.seen_again", message_id=message.message_id)
                else:
                    self._seen.add(message.message_id)
                    fresh.append(message)
            if fresh:
                report.messages += len(fresh)
                quiet_since = None
                yield fresh
                continue
            visible = (await self._queue.depth()).dlq_visible
            if visible == 0:
                report.stopped = DRAINED
                return
            quiet_since = started if quiet_since is None else quiet_since
            now = time.monotonic()
            if now - quiet_since >= QUIET_SECONDS:
                report.stopped, report.visible_left = QUIET, visible
                return
            # An answer of messages already seen, or a false empty one, can come at once:
            # no hot loop.
            await asyncio.sleep(QUIET_PAUSE)

    async def delete(self, message_id: str) -> None:
        """Consume a message of this pass (its latest receipt): it is not handed back."""
        await self._queue.delete(self._held[message_id].receipt_handle, dlq=True)
        del self._held[message_id]

    async def _keep(self) -> None:
        """Renew the holds before they run out, while the command works."""
        tick = min(max(self._hold / 4, 0.25), 10.0)
        while True:
            await asyncio.sleep(tick)
            sent = time.monotonic()
            due = [held for held in self._held.values() if held.until - sent < self._hold / 2]
            if not due:
                continue
            try:
                failed = set(
                    await self._queue.change_visibility_batch(
                        [held.receipt_handle for held in due], self._hold, dlq=True
                    )
                )
            except Exception as exc:  # they may come back: the ids keep them apart
                log.warning("dlq.hold_renewal_failed", count=len(due), error=repr(exc))
                continue
            for held in due:
                if held.receipt_handle not in failed:
                    held.until = sent + self._hold
            if failed:
                log.warning("dlq.hold_renewal_failed", count=len(failed), error="refused")


@dataclass
class Peek:
    entries: list[DeadLetterEntry]
    scan: ScanReport


async def peek(
    queue: BuildQueue, *, limit: int, hold: int = 60, time_limit: float = SCAN_SECONDS
) -> Peek:
    """Look at up to ``limit`` DLQ messages without consuming them."""
    entries: list[DeadLetterEntry] = []
    scan = _Scan(queue, limit=limit, hold=hold, time_limit=time_limit)
    async with scan, aclosing(scan.batches()) as batches:
        async for batch in batches:
            entries += [DeadLetterEntry.of(message) for message in batch]
    return Peek(entries, scan.report)


@dataclass
class ReplaySummary:
    replayed: list[str] = field(default_factory=list)  # project ids
    skipped: list[dict[str, str]] = field(default_factory=list)  # message, project, reason
    errors: list[dict[str, str]] = field(default_factory=list)
    matched: int = 0
    dry_run: bool = False
    scan: ScanReport = field(default_factory=ScanReport)


class _Pacer:
    """At most ``rate`` operations a second (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self.next_at > now:
            await asyncio.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.interval


async def replay(
    queue: BuildQueue,
    store: ProjectStore,
    selection: Filter,
    *,
    dry_run: bool,
    rate: float | None,
    limit: int = MAX_SCAN,
    hold: int = 60,
    time_limit: float = SCAN_SECONDS,
    on_entry: Callable[[str, DeadLetterEntry, str], None] | None = None,
) -> ReplaySummary:
    """Replay the matching DLQ messages; see the module docstring for the steps."""
    summary = ReplaySummary(dry_run=dry_run)
    pacer = _Pacer(rate)

    def report(action: str, entry: DeadLetterEntry, reason: str = "") -> None:
        log.info(
            f"dlq.{action}",
            message_id=entry.message_id,
            project_id=entry.project_id,
            tenant_id=entry.tenant_id,
            reason=reason or None,
            dry_run=dry_run,
        )
        if on_entry is not None:
            on_entry(action, entry, reason)

    # What is not deleted (not matching, poison, dry run, errors) is handed back at the end.
    scan = _Scan(queue, limit=limit, hold=hold, time_limit=time_limit)
    async with scan, aclosing(scan.batches()) as batches:
        async for batch in batches:
            for message in batch:
                entry = DeadLetterEntry.of(message)
                if not selection.matches(entry):
                    continue
                summary.matched += 1
                if entry.project_id is None or entry.tenant_id is None:
                    summary.skipped.append(_skip(entry, "not a build message (poison)"))
                    report("skipped", entry, "not a build message (poison)")
                    continue
                if dry_run:
                    report("would_replay", entry)
                    summary.replayed.append(entry.project_id)
                    continue
                await pacer.wait()
                try:
                    outcome = await _replay_one(
                        queue, store, entry, partial(scan.delete, entry.message_id)
                    )
                except Exception as exc:  # one bad message must not stop the rest
                    summary.errors.append({**_skip(entry, str(exc)), "error": type(exc).__name__})
                    report("error", entry, f"{type(exc).__name__}: {exc}")
                    continue
                if outcome is None:
                    summary.replayed.append(entry.project_id)
                    report("replayed", entry)
                else:
                    summary.skipped.append(_skip(entry, outcome))
                    report("skipped", entry, outcome)
    summary.scan = scan.report
    return summary


def _skip(entry: DeadLetterEntry, reason: str) -> dict[str, str]:
    return {
        "message_id": entry.message_id,
        "project_id": entry.project_id or "",
        "reason": reason,
    }


async def _replay_one(
    queue: BuildQueue,
    store: ProjectStore,
    entry: DeadLetterEntry,
    delete: Callable[[], Awaitable[None]],
) -> str | None:
    """Replay one message (``delete`` deletes it from the DLQ); returns None, or why
    it was skipped (and deleted)."""
    assert entry.tenant_id is not None
    assert entry.project_id is not None
    try:
        replayed = await store.replay(entry.tenant_id, entry.project_id)
    except NotFoundError:
        return "project not found"  # kept in the DLQ: nothing to replay it into
    except ConflictError:
        # Not FAILED (any more): replayed by someone else, or it moved on. The
        # message is stale either way.
        current = await store.get(entry.tenant_id, entry.project_id)
        status = current.status.value if current else "gone"
        await delete()
        return f"project is {status}, not FAILED"
    await queue.send(
        build_message(
            entry.tenant_id,
            entry.project_id,
            BuildReason.REPLAY,
            next_stage=next_stage(replayed),
            attempt=replayed.attempt,
        )
    )
    crash_point("dlq.replay.after_send")
    await delete()
    return None


@dataclass
class PurgeSummary:
    deleted: list[DeadLetterEntry]
    scan: ScanReport


async def purge(
    queue: BuildQueue,
    selection: Filter,
    *,
    limit: int = MAX_SCAN,
    hold: int = 60,
    time_limit: float = SCAN_SECONDS,
) -> PurgeSummary:
    """Delete the matching DLQ messages; their projects stay FAILED."""
    deleted: list[DeadLetterEntry] = []
    scan = _Scan(queue, limit=limit, hold=hold, time_limit=time_limit)
    async with scan, aclosing(scan.batches()) as batches:
        async for batch in batches:
            for message in batch:
                entry = DeadLetterEntry.of(message)
                if selection.matches(entry):
                    await scan.delete(entry.message_id)
                    deleted.append(entry)
                    log.info("dlq.purged", message_id=entry.message_id, project_id=entry.project_id)
    return PurgeSummary(deleted, scan.report)
