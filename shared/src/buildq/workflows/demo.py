"""The built-in ``demo`` workflow: four stages that sleep, with failure injection.

For local runs, tests, chaos runs and benchmarks:
``{"stage_seconds": 0.5, "fail_at_stage": "build", "fail_times": 2, "fail_mode": "transient"}``
fails ``build`` on attempts 1 and 2 and succeeds on attempt 3.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from buildq.workflows.base import (
    JsonObject,
    PermanentError,
    RetryableError,
    Stage,
    StageContext,
    Workflow,
)

DEMO_STAGES = ("plan", "generate", "build", "package")


class DemoParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage_seconds: float = Field(1.0, ge=0, le=24 * 3600, description="How long each stage takes")
    fail_at_stage: Literal["plan", "generate", "build", "package"] | None = Field(
        None, description="Stage that fails (failure injection)"
    )
    fail_times: int | None = Field(
        None, ge=0, description="How many attempts fail there; omitted = every attempt"
    )
    fail_mode: Literal["transient", "permanent"] = "transient"


def inject_failure(
    ctx: StageContext,
    *,
    at_stage: str | None,
    times: int | None,
    mode: Literal["transient", "permanent"],
) -> None:
    """Raise the injected failure if this stage and attempt are the ones asked for."""
    if at_stage == ctx.stage and (times is None or ctx.attempt <= times):
        message = f"injected {mode} failure in {ctx.stage!r} on attempt {ctx.attempt}"
        if mode == "permanent":
            raise PermanentError(message)
        raise RetryableError(message)


async def _run_stage(ctx: StageContext) -> JsonObject:
    params = DemoParameters.model_validate(ctx.parameters)
    await ctx.sleep(params.stage_seconds)
    inject_failure(
        ctx, at_stage=params.fail_at_stage, times=params.fail_times, mode=params.fail_mode
    )
    return {"stage": ctx.stage, "attempt": ctx.attempt, "seconds": params.stage_seconds}


DEMO = Workflow(
    name="demo",
    stages=tuple(Stage(name=name, fn=_run_stage) for name in DEMO_STAGES),
    parameters=DemoParameters,
)
