"""Writes a run's stage snapshots behind it, so no stage waits on DynamoDB.

A stage starts as soon as the one before it finishes; the snapshots recording that
(stage N SUCCEEDED, stage N+1 RUNNING) go out in the background. At most one write
is in flight per run, so writes land in order, and whatever piles up behind it goes
out together in the next one (group commit). A write from an idle writer waits
``LINGER_SECONDS`` for company first, so stages shorter than that cost no write of
their own. What is still unwritten when the run ends goes with its final write: a
run whose stages all finish within the linger writes only its claim and its end.
Every write stays fenced by the run's token (invariant 3).

A crash loses at most the snapshots of the linger and one round trip: their stages
run again on the next attempt, as they would have had the crash come a moment earlier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from buildq.errors import LeaseLostError
from buildq.models import StageSnapshot
from buildq.store import RunToken

# Far below any stage worth recording as RUNNING on its own; long enough for stages
# that do nothing (or only check a cache) to share one write.
LINGER_SECONDS = 0.01


class StageWriter(Protocol):
    """What the writer needs of the store (``ProjectStore.save_stages``)."""

    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool:
        """Write them; True (and nothing written) if a cancel has been requested."""
        ...


def merged(*groups: Iterable[StageSnapshot]) -> list[StageSnapshot]:
    """One snapshot per stage, the latest winning, in first-seen order."""
    latest: dict[str, StageSnapshot] = {}
    for group in groups:
        for stage in group:
            latest[stage.name] = stage
    return list(latest.values())


class CheckpointWriter:
    def __init__(
        self,
        store: StageWriter,
        token: RunToken,
        log: Any,
        *,
        on_cancel: Callable[[], object],
        on_lease_lost: Callable[[], object],
        linger: float = LINGER_SECONDS,
    ) -> None:
        self._store = store
        self._linger = linger
        self._token = token
        self._log = log
        self._on_cancel = on_cancel
        self._on_lease_lost = on_lease_lost
        self._unwritten: list[StageSnapshot] = []
        self._writing: asyncio.Task[None] | None = None
        self._lingering: asyncio.TimerHandle | None = None
        self._lost: LeaseLostError | None = None
        self._settling = False
        self._cancelled = False  # a write was refused for a cancel: send no more

    def write(self, *stages: StageSnapshot) -> None:
        """Queue snapshots; returns at once. With no write in flight, one starts after
        the linger; otherwise they go out right after the one in flight."""
        if self._lost is not None:
            return  # another worker owns the project: write nothing more
        self._unwritten = merged(self._unwritten, stages)
        idle = self._writing is None or self._writing.done()
        if idle and self._lingering is None and not self._cancelled:
            loop = asyncio.get_running_loop()
            self._lingering = loop.call_later(self._linger, self._start)

    def _start(self) -> None:
        self._lingering = None
        self._writing = asyncio.create_task(self._write_all())

    async def _write_all(self) -> None:
        # Once the run has ended (or is cancelled), what is left goes with its final
        # write instead.
        while self._unwritten and not self._settling and not self._cancelled:
            batch, self._unwritten = self._unwritten, []
            try:
                cancel = await self._store.save_stages(self._token, *batch)
            except LeaseLostError as exc:
                self._lost = exc
                self._unwritten = []
                if not self._settling:
                    self._on_lease_lost()
                return
            except Exception as exc:
                # Keep them (under anything newer): the next write, or the final
                # one, carries them. The run itself goes on.
                self._unwritten = merged(batch, self._unwritten)
                self._log.warning("checkpoint.write_failed", error=str(exc))
                return
            if cancel:
                # Refused: nothing landed. The run stops, and its final write carries
                # these (and whatever follows) instead.
                self._cancelled = True
                self._unwritten = merged(batch, self._unwritten)
                self._on_cancel()
                return

    async def settle(self, final: Sequence[StageSnapshot] = ()) -> list[StageSnapshot]:
        """Wait for the write in flight, then return what is still unwritten, with
        ``final`` on top, for the run's final write. Raises LeaseLostError if a write
        found the lease gone."""
        self._settling = True
        if self._lingering is not None:
            self._lingering.cancel()  # not sent yet: it goes with the final write
            self._lingering = None
        while self._writing is not None and not self._writing.done():
            try:
                await asyncio.wait({self._writing})
            except asyncio.CancelledError:
                # The run has ended: a stop request now changes nothing, and the
                # caller still needs what the write in flight did not carry.
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
        if self._lost is not None:
            raise self._lost
        unwritten, self._unwritten = self._unwritten, []
        return merged(unwritten, final)
