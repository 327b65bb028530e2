"""A worker's entry in the fleet list (``buildq workers``): who it is, how many slots it
uses, and what it runs. Refreshed on a timer with a TTL, so a worker that dies
drops out by itself; a worker that stops cleanly removes its entry at once."""

from __future__ import annotations

import socket
from collections.abc import Callable
from importlib.metadata import version

from buildq.clock import now_iso
from buildq.models import WorkerInfo
from buildq.store import ProjectStore


class Presence:
    def __init__(
        self,
        store: ProjectStore,
        *,
        worker_id: str,
        slots: int,
        interval: float,
        running: Callable[[], list[str]],
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.slots = slots
        self.interval = interval
        self.running = running
        self.host = socket.gethostname()
        self.version = version("buildq-worker")
        self.started_at = now_iso()

    async def beat(self) -> None:
        running = self.running()
        info = WorkerInfo(
            worker_id=self.worker_id,
            host=self.host,
            version=self.version,
            slots_used=len(running),
            slots_total=self.slots,
            started_at=self.started_at,
            last_seen=now_iso(),
            running=tuple(running),
        )
        # Alive for three beats: one missed refresh does not make it vanish.
        await self.store.put_worker(info, ttl_seconds=3 * self.interval)

    async def leave(self) -> None:
        await self.store.delete_worker(self.worker_id)
