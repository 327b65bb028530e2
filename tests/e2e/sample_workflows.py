"""Workflows registered by import path (BUILDQ_WORKFLOWS) in the tests, as a
deployment would register its own."""

from __future__ import annotations

import asyncio
import threading
import time

from buildq.workflows.base import JsonObject, Stage, StageContext, Workflow


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


WORKFLOWS = [
    Workflow(name="blocking", stages=(Stage("work", blocking_stage),)),
    Workflow(name="loop-blocker", stages=(Stage("work", loop_blocker),)),
    Workflow(name="short-fuse", stages=(Stage("a", slow), Stage("b", slow)), timeout=1.0),
]
