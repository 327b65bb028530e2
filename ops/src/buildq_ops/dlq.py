"""The dead-letter queue, for on-call: peek, replay (safely, at a bounded rate), purge.

Peeking receives messages with a short visibility and hands them back at once;
it never changes a project. Replaying one message:

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
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime

import structlog

from buildq.clock import parse_iso
from buildq.errors import ConflictError, MessageError, NotFoundError
from buildq.faults import crash_point
from buildq.messages import BuildMessage, BuildReason, build_message, decode
from buildq.queue import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_TYPE,
    DLQ_FAILED_AT,
    DLQ_WORKER_ID,
    BuildQueue,
    ReceivedMessage,
)
from buildq.store import ProjectStore
from buildq.transitions import next_stage

log = structlog.get_logger()

MAX_SCAN = 10_000  # messages one command looks at, at most


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


async def _drain_dlq(
    queue: BuildQueue, limit: int, hold: int
) -> AsyncIterator[list[ReceivedMessage]]:
    """Receive DLQ messages in batches (each stays hidden until handed back, or for
    ``hold`` seconds if this process dies first)."""
    seen = 0
    empty = 0
    while seen < limit and empty < 2:  # moto and SQS may answer empty while some remain
        batch = await queue.receive(
            min(10, limit - seen), wait_seconds=0, visibility_timeout=hold, dlq=True
        )
        if not batch:
            empty += 1
            continue
        empty = 0
        seen += len(batch)
        yield batch


async def peek(queue: BuildQueue, *, limit: int, hold: int = 60) -> list[DeadLetterEntry]:
    """Look at up to ``limit`` DLQ messages without consuming them."""
    entries: list[DeadLetterEntry] = []
    try:
        async for batch in _drain_dlq(queue, limit, hold):
            entries += [DeadLetterEntry.of(message) for message in batch]
    finally:
        await queue.change_visibility_batch([e.receipt_handle for e in entries], 0, dlq=True)
    return entries


@dataclass
class ReplaySummary:
    replayed: list[str] = field(default_factory=list)  # project ids
    skipped: list[dict[str, str]] = field(default_factory=list)  # message, project, reason
    errors: list[dict[str, str]] = field(default_factory=list)
    matched: int = 0
    dry_run: bool = False


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
    on_entry: Callable[[str, DeadLetterEntry, str], None] | None = None,
) -> ReplaySummary:
    """Replay the matching DLQ messages; see the module docstring for the steps."""
    summary = ReplaySummary(dry_run=dry_run)
    pacer = _Pacer(rate)
    hand_back: list[str] = []

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

    try:
        async for batch in _drain_dlq(queue, limit, hold):
            for message in batch:
                entry = DeadLetterEntry.of(message)
                if not selection.matches(entry):
                    hand_back.append(entry.receipt_handle)
                    continue
                summary.matched += 1
                if entry.project_id is None or entry.tenant_id is None:
                    summary.skipped.append(_skip(entry, "not a build message (poison)"))
                    report("skipped", entry, "not a build message (poison)")
                    hand_back.append(entry.receipt_handle)
                    continue
                if dry_run:
                    report("would_replay", entry)
                    summary.replayed.append(entry.project_id)
                    hand_back.append(entry.receipt_handle)
                    continue
                await pacer.wait()
                try:
                    outcome = await _replay_one(queue, store, entry)
                except Exception as exc:  # one bad message must not stop the rest
                    summary.errors.append({**_skip(entry, str(exc)), "error": type(exc).__name__})
                    report("error", entry, f"{type(exc).__name__}: {exc}")
                    hand_back.append(entry.receipt_handle)
                    continue
                if outcome is None:
                    summary.replayed.append(entry.project_id)
                    report("replayed", entry)
                else:
                    summary.skipped.append(_skip(entry, outcome))
                    report("skipped", entry, outcome)
    finally:
        await queue.change_visibility_batch(hand_back, 0, dlq=True)
    return summary


def _skip(entry: DeadLetterEntry, reason: str) -> dict[str, str]:
    return {
        "message_id": entry.message_id,
        "project_id": entry.project_id or "",
        "reason": reason,
    }


async def _replay_one(queue: BuildQueue, store: ProjectStore, entry: DeadLetterEntry) -> str | None:
    """Replay one message; returns None, or why it was skipped (and deleted)."""
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
        await queue.delete(entry.receipt_handle, dlq=True)
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
    await queue.delete(entry.receipt_handle, dlq=True)
    return None


async def purge(
    queue: BuildQueue, selection: Filter, *, limit: int = MAX_SCAN, hold: int = 60
) -> list[DeadLetterEntry]:
    """Delete the matching DLQ messages; their projects stay FAILED."""
    deleted: list[DeadLetterEntry] = []
    hand_back: list[str] = []
    try:
        async for batch in _drain_dlq(queue, limit, hold):
            for message in batch:
                entry = DeadLetterEntry.of(message)
                if selection.matches(entry):
                    await queue.delete(entry.receipt_handle, dlq=True)
                    deleted.append(entry)
                    log.info("dlq.purged", message_id=entry.message_id, project_id=entry.project_id)
                else:
                    hand_back.append(entry.receipt_handle)
    finally:
        await queue.change_visibility_batch(hand_back, 0, dlq=True)
    return deleted
