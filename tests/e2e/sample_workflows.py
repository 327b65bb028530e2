"""Workflows registered by import path (BUILDQ_WORKFLOWS) in the tests, as a
deployment would register its own."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from buildq.workflows.base import JsonObject, PermanentError, Stage, StageContext, Workflow


def record(ctx: StageContext, event: str) -> None:
    """Append one line to the ledger file named by the ``ledger`` parameter (if any):
    which process ran which stage of which attempt, and when. One short write with
    O_APPEND, so lines of concurrent processes never interleave."""
    path = ctx.parameters.get("ledger")
    if not path:
        return
    line = {
        "project_id": ctx.project.project_id,
        "stage": ctx.stage,
        "attempt": ctx.attempt,
        "pid": os.getpid(),
        "event": event,
        # The machine's monotonic clock: one for every process here, whatever their
        # wall clocks say (a test may skew those).
        "t": time.monotonic(),
    }
    with open(path, "a") as ledger:
        ledger.write(json.dumps(line) + "\n")


def blocking_stage(ctx: StageContext) -> JsonObject:
    """Plain sync code: the worker must run it in a thread."""
    time.sleep(float(ctx.parameters.get("seconds", 2.5)))
    return {"thread": threading.current_thread().name, "main": threading.main_thread().name}


async def loop_blocker(ctx: StageContext) -> JsonObject:
    """A badly behaved async stage that blocks the event loop."""
    time.sleep(float(ctx.parameters.get("seconds", 1.0)))  # noqa: ASYNC251 - on purpose
    return {}


async def slow(ctx: StageContext) -> JsonObject:
    await asyncio.sleep(float(ctx.parameters.get("seconds", 3.0)))
    return {}


def stubborn(ctx: StageContext) -> JsonObject:
    """Sync code that ignores its timeout: a thread nobody can stop."""
    record(ctx, "start")
    time.sleep(float(ctx.parameters.get("seconds", 2.0)))
    record(ctx, "end")
    return {}


async def self_cancelling(ctx: StageContext) -> JsonObject:
    """Raises CancelledError itself, as a stage does whose library future was cancelled
    under it; nobody cancelled the stage."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()
    await future
    return {}


async def loud_failure(ctx: StageContext) -> JsonObject:
    """Fails for good with a 600 KB message, as a compiler's stderr can be."""
    raise PermanentError("error: " + "x" * 600_000)


WORKFLOWS = [
    Workflow(name="blocking", stages=(Stage("work", blocking_stage),)),
    Workflow(name="loop-blocker", stages=(Stage("work", loop_blocker),)),
    Workflow(name="short-fuse", stages=(Stage("a", slow), Stage("b", slow)), timeout=1.0),
    Workflow(name="stubborn", stages=(Stage("work", stubborn, timeout=0.5),)),
    Workflow(name="self-cancelling", stages=(Stage("work", self_cancelling),)),
    Workflow(name="loud", stages=(Stage("work", loud_failure),)),
]
