"""Deletes finished messages in the background, up to ten per DeleteMessageBatch.

A run frees its slot as soon as its final write lands, without waiting for its
delete: the record already says the project is done, so the message is only a
duplicate from then on. A delete that never happens (a crash, an outage) costs one
redelivery, which the claim refuses and drops (invariant: the record is the truth).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import structlog

from buildq.errors import UnavailableError
from buildq.queue import SQS_BATCH

log = structlog.get_logger()

# How long a delete waits for others to share its call. It is off every run's
# critical path; SQS only counts the message in flight a little longer.
LINGER_SECONDS = 0.2
RETRY_SECONDS = 1.0
FLUSH_SECONDS = 10.0  # at shutdown: what is still unsent after this is redelivered later


class BatchDelete(Protocol):
    """What the deleter needs of the queue (``BuildQueue.delete_batch``)."""

    async def delete_batch(
        self, receipt_handles: Sequence[str], *, dlq: bool = False
    ) -> list[str]: ...


class Deleter:
    def __init__(self, queue: BatchDelete, *, linger: float = LINGER_SECONDS) -> None:
        self._queue = queue
        self._linger = linger
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def delete(self, receipt_handle: str) -> None:
        """Queue one message for deletion; returns at once."""
        self._pending.append(receipt_handle)
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """Send the queued deletes until cancelled."""
        while True:
            await self._wake.wait()
            if len(self._pending) < SQS_BATCH:
                await asyncio.sleep(self._linger)
            await self._send(self._pending[:SQS_BATCH])

    async def _send(self, batch: list[str]) -> None:
        try:
            failed = await self._queue.delete_batch(batch)
        except UnavailableError as exc:
            log.warning("message.delete_failed", count=len(batch), error=str(exc))
            await asyncio.sleep(RETRY_SECONDS)  # the batch stays pending
            return
        except Exception:
            # Never let this task die: every later delete would wait on it.
            log.exception("message.delete_failed", count=len(batch))
            await asyncio.sleep(RETRY_SECONDS)
            return
        del self._pending[: len(batch)]
        if failed:
            # Expired handles (held past the visibility timeout): those messages come
            # back, and their claim is refused and dropped.
            log.warning("message.delete_failed", count=len(failed))
        if not self._pending:
            self._wake.clear()
            self._idle.set()

    async def flush(self) -> None:
        """Wait (at most ``FLUSH_SECONDS``) until every queued delete has been sent."""
        try:
            async with asyncio.timeout(FLUSH_SECONDS):
                await self._idle.wait()
        except TimeoutError:
            log.warning("message.deletes_unsent", count=len(self._pending))
