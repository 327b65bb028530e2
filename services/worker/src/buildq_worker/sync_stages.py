"""Sync stage code, run in threads that nobody can stop: the run outlives its thread.

A thread cannot be stopped from outside. So a sync stage that must stop (its timeout,
a cancel, a drain) is waited for: the run keeps its lease and its slot until the
thread returns, heartbeats going on, and only then settles, so the retry (or the
next owner) never starts the stage while it still runs (invariant 13). A thread that
has not returned within ``grace`` seconds, or that is still running when the lease
is lost (another worker may take the project now), ends the whole worker process
at once (crash-only): the process exits, the thread with it, and its other runs come
back through their leases and messages, as after any crash.

Each stage gets its own daemon thread, not a pool's: a stage that outlives its
timeout must never queue the next run's stages behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import structlog

log = structlog.get_logger()

CRASH_EXIT_CODE = 70  # EX_SOFTWARE: what the orchestrator sees of a crash-only exit


def crash_only(reason: str, **fields: Any) -> NoReturn:
    """End the process now, without cleanup: the only way to stop a thread."""
    log.critical("worker.crash_only", reason=reason, **fields)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(CRASH_EXIT_CODE)


class SyncStages:
    """The sync stage threads of one run."""

    def __init__(self, grace: float, *, exit: Callable[..., NoReturn] = crash_only) -> None:
        self.grace = grace
        self._exit = exit
        # by stage name: set once the stage's code has returned (its thread then only
        # hands the result over, which never runs stage code)
        self._running: dict[str, threading.Event] = {}

    @property
    def busy(self) -> bool:
        """Whether stage code of this run is still running in a thread."""
        return any(not done.is_set() for done in self._running.values())

    def lease_lost(self) -> None:
        """The run lost its lease: a stage thread still running would run beside the
        next owner's, so it must die with this process."""
        alive = [name for name, done in self._running.items() if not done.is_set()]
        if alive:
            self._exit("lease lost while a sync stage runs", stages=alive)

    async def call(self, name: str, fn: Callable[[Any], Any], ctx: Any) -> Any:
        """Run ``fn(ctx)`` in a thread of its own; if this is cancelled, wait for the
        thread to return (up to ``grace``) before the cancellation goes on."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()
        returned = asyncio.Event()

        def deliver(value: Any, error: BaseException | None) -> None:
            returned.set()
            if result.done():
                return
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(value)

        done = threading.Event()

        def target() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (fn(ctx), None)
            except BaseException as exc:  # delivered to the run, which reports it
                outcome = (None, exc)
            done.set()
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody left to tell
                loop.call_soon_threadsafe(deliver, *outcome)

        thread = threading.Thread(target=target, name=f"stage-{name}", daemon=True)
        self._running[name] = done
        thread.start()
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            await self._outlive(name, returned, ctx.log)
            raise
        finally:
            if done.is_set():
                self._running.pop(name, None)

    async def _outlive(self, name: str, returned: asyncio.Event, stage_log: Any) -> None:
        """Hold the run (its lease, its slot) until the stopped thread returns."""
        if returned.is_set():
            return
        stage_log.warning("stage.sync_waiting", grace_seconds=self.grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while not returned.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._exit("a sync stage did not return after it was stopped", stage=name)
            try:
                await asyncio.wait_for(asyncio.shield(returned.wait()), remaining)
            except TimeoutError:
                continue  # the deadline check above ends the process
            except asyncio.CancelledError:
                continue  # stopped again (a drain, say): the thread still runs
        stage_log.info("stage.sync_returned")
