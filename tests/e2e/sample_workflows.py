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


# -- ledgered workflows (the fault campaign, tests/faults/test_campaign.py) -------------------
#
# Every execution of a stage writes a "start" line to the ledger, and an "end" line once
# it has done its work (before its injected failure, if any). An async stage stopped
# mid-work (cancelled by request, or its task stopped: a lost lease, a drain) writes
# "stop" instead. Only a process that died mid-stage leaves a start with neither. The
# same failure injection as ``demo``.

from typing import Literal  # noqa: E402 - appended section

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from buildq.workflows.demo import inject_failure  # noqa: E402


class LedgeredParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ledger: str = Field(description="The ledger file every stage execution appends to")
    stage_seconds: float = Field(0.2, ge=0, le=60)
    fail_at_stage: str | None = None
    fail_times: int | None = Field(None, ge=0)
    fail_mode: Literal["transient", "permanent"] = "transient"


def _ended(ctx: StageContext) -> JsonObject:
    """The stage's work is done: its "end" line, then its injected failure, if any."""
    record(ctx, "end")
    params = LedgeredParameters.model_validate(ctx.parameters)
    inject_failure(
        ctx, at_stage=params.fail_at_stage, times=params.fail_times, mode=params.fail_mode
    )
    return {"stage": ctx.stage, "attempt": ctx.attempt}


async def ledgered_async(ctx: StageContext) -> JsonObject:
    """An async stage: a cancellable sleep between its ledger lines."""
    record(ctx, "start")
    try:
        await ctx.sleep(float(ctx.parameters.get("stage_seconds", 0.2)))
    except BaseException:  # stopped mid-work: "stop" instead of "end"
        record(ctx, "stop")
        raise
    return _ended(ctx)


def ledgered_sync(ctx: StageContext) -> JsonObject:
    """A sync stage (run in a thread): a blocking sleep between its ledger lines, and
    a checkpoint before its "end" (the effect), as a sync stage should have."""
    record(ctx, "start")
    time.sleep(float(ctx.parameters.get("stage_seconds", 0.2)))
    try:
        ctx.raise_if_cancelled()
    except BaseException:  # stopped mid-work: "stop" instead of "end"
        record(ctx, "stop")
        raise
    return _ended(ctx)


WORKFLOWS += [
    # ``demo``'s four async stages, with a ledger.
    Workflow(
        name="ledgered-demo",
        stages=tuple(
            Stage(name, ledgered_async) for name in ("plan", "generate", "build", "package")
        ),
        parameters=LedgeredParameters,
    ),
    # Sync and async stages in turn.
    Workflow(
        name="ledgered",
        stages=(
            Stage("fetch", ledgered_async),
            Stage("compile", ledgered_sync),
            Stage("link", ledgered_async),
            Stage("verify", ledgered_sync),
        ),
        parameters=LedgeredParameters,
    ),
]
