"""Long-poll support: wait for a project to change without a thread per waiter.

Every waiter on the same project in this API process shares one poll loop
(one GetItem per ``interval``), and waits on an asyncio event: a thousand
clients long-polling one project cost one read per interval, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field

import structlog

from buildq.models import Project
from buildq.store import ProjectStore

log = structlog.get_logger()


def etag(project: Project) -> str:
    """Changes whenever the status or a stage does (heartbeats leave it alone)."""
    version = f"{project.updated_at}|{project.status}|{project.attempt}|{project.cancel_requested}"
    return '"' + hashlib.sha256(version.encode()).hexdigest()[:20] + '"'


@dataclass
class _Poll:
    latest: Project
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0
    task: asyncio.Task[None] | None = None


class ProjectWatch:
    def __init__(self, store: ProjectStore, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._polls: dict[tuple[str, str], _Poll] = {}

    async def wait_for_change(self, project: Project, since: str, seconds: float) -> Project:
        """The project once its ETag differs from ``since``, or as it is after ``seconds``."""
        key = (project.tenant_id, project.project_id)
        poll = self._polls.get(key)
        if poll is None:
            poll = self._polls[key] = _Poll(latest=project)
            poll.task = asyncio.create_task(self._run(key, poll))
        elif project.updated_at > poll.latest.updated_at:
            poll.latest = project  # this caller read a newer version than the poll has
        poll.waiters += 1
        try:
            async with asyncio.timeout(seconds):
                while etag(poll.latest) == since:
                    changed = poll.changed
                    await changed.wait()
        except TimeoutError:
            pass
        finally:
            poll.waiters -= 1
        return poll.latest

    async def _run(self, key: tuple[str, str], poll: _Poll) -> None:
        try:
            while poll.waiters > 0:
                await asyncio.sleep(self._interval)
                try:
                    current = await self._store.get(*key)
                except Exception as exc:  # keep polling: waiters time out on their own
                    log.warning("long_poll.read_failed", error=str(exc))
                    continue
                if current is not None and etag(current) != etag(poll.latest):
                    poll.latest = current
                    changed, poll.changed = poll.changed, asyncio.Event()
                    changed.set()
        finally:
            self._polls.pop(key, None)

    async def close(self) -> None:
        for poll in list(self._polls.values()):
            if poll.task is not None:
                poll.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll.task
