"""Runs one claimed project's workflow, stage by stage, writing each snapshot.

Snapshots are written behind the stages (``checkpoints``), every write fenced by
the run's token (owner + attempt). The runner never decides the project's final
state in the table; it returns a ``RunResult`` and the worker settles it (finish,
requeue or dead-letter) together with the message.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

from buildq import limits
from buildq.clock import now_iso
from buildq.models import ErrorInfo, Project, StageSnapshot
from buildq.store import RunToken
from buildq.transitions import (
    pending_stages,
    stage_finished,
    stage_started,
    stage_unstarted,
    started_by_claim,
)
from buildq.workflows.base import (
    CancelledByRequestError,
    JsonObject,
    PermanentError,
    RetryableError,
    RunStoppedError,
    Stage,
    StageContext,
    Workflow,
)
from buildq_worker.checkpoints import LINGER_SECONDS, CheckpointWriter, StageWriter
from buildq_worker.metrics import STAGE_SECONDS
from buildq_worker.sync_stages import SyncStages

MAX_OUTPUT_BYTES = limits.MAX_STAGE_OUTPUT_BYTES  # the item stays under DynamoDB's 400 KB
SYNC_STAGE_GRACE_SECONDS = 30.0  # the worker passes its own (sync_stage_grace_seconds)


class RunStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # retryable unless ``permanent``
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the worker stopped the run (draining, or lease lost)


@dataclass(frozen=True)
class RunResult:
    status: RunStatus
    stages: Sequence[StageSnapshot]  # snapshots still to write with the final state
    error: ErrorInfo | None = None
    permanent: bool = False
    retry_delay: float | None = None  # a RetryableError's own delay, if it gave one


class Owner(Protocol):
    """The run's hold on its project (``ActiveRun``): stage checkpoints ask it."""

    def holds_lease(self) -> bool: ...

    def lose_lease(self, event: str) -> None: ...


class _Unleased:
    """A run with no lease to watch (the runner on its own, in tests)."""

    def holds_lease(self) -> bool:
        return True

    def lose_lease(self, event: str) -> None:  # pragma: no cover: never lost
        raise AssertionError(event)


class StageOutputError(PermanentError):
    """A stage returned something that is not a small JSON object."""


def _error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo.of(exc)  # bounded: a 600 KB compiler stderr is cut, with a marker


def _checked_output(stage: str, output: Any, budget: int) -> JsonObject | None:
    """``output`` if it is a small JSON object within ``budget`` bytes (what the
    project's other stage outputs leave of ``limits.MAX_TOTAL_OUTPUT_BYTES``)."""
    if output is None:
        return None
    if not isinstance(output, dict):
        raise StageOutputError(f"stage {stage!r} returned {type(output).__name__}, not a dict")
    try:
        size = len(json.dumps(output, separators=(",", ":")))
    except (TypeError, ValueError) as exc:
        raise StageOutputError(f"stage {stage!r} output is not JSON: {exc}") from None
    if size > MAX_OUTPUT_BYTES:
        raise StageOutputError(f"stage {stage!r} output is {size} bytes; max {MAX_OUTPUT_BYTES}")
    if size > budget:
        raise StageOutputError(
            f"stage {stage!r} output is {size} bytes; the project's stage outputs may "
            f"total {limits.MAX_TOTAL_OUTPUT_BYTES}, and {max(budget, 0)} are left"
        )
    return output


async def _call(stage: Stage, ctx: StageContext, sync_stages: SyncStages) -> Any:
    if inspect.iscoroutinefunction(stage.fn):
        return await stage.fn(ctx)
    # Sync stage code runs in a thread so it never stalls heartbeats; a stopped one
    # is waited for (see sync_stages).
    result = await sync_stages.call(stage.name, stage.fn, ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


async def run_workflow(
    *,
    project: Project,
    workflow: Workflow,
    store: StageWriter,
    token: RunToken,
    log: Any,
    default_stage_timeout: float,
    workflow_timeout: float,
    cancel_event: asyncio.Event,
    sync_stages: SyncStages | None = None,
    owner: Owner | None = None,
    checkpoint_linger: float = LINGER_SECONDS,
) -> RunResult:
    """Run the stages still pending, in order; resumed projects skip finished ones.

    Cancelling the task that runs this returns an INTERRUPTED result carrying the
    checkpoint to write (the last finished stage, the interrupted one PENDING again).
    The result's ``stages`` include every snapshot not yet written. Raises
    LeaseLostError if a write finds that another worker owns the project: the stage
    then running is stopped at once. A stage checkpoint that finds ``owner``'s lease
    run out stops the run as the worker's lease watch would.
    """
    task = asyncio.current_task()
    assert task is not None
    threads = sync_stages or SyncStages(SYNC_STAGE_GRACE_SECONDS)

    def lease_lost() -> None:
        threads.lease_lost()  # a sync stage still running ends the process
        task.cancel()

    writer = CheckpointWriter(
        store,
        token,
        log,
        on_cancel=cancel_event.set,
        on_lease_lost=lease_lost,
        linger=checkpoint_linger,
    )
    result = await _run_stages(
        project,
        workflow,
        writer,
        token,
        log,
        cancel_event,
        threads,
        owner or _Unleased(),
        default_stage_timeout=default_stage_timeout,
        workflow_timeout=workflow_timeout,
    )
    return replace(result, stages=await writer.settle(result.stages))


async def _run_stages(
    project: Project,
    workflow: Workflow,
    writer: CheckpointWriter,
    token: RunToken,
    log: Any,
    cancel_event: asyncio.Event,
    sync_stages: SyncStages,
    owner: Owner,
    *,
    default_stage_timeout: float,
    workflow_timeout: float,
) -> RunResult:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + workflow_timeout
    snapshots = {stage.name: stage for stage in project.stages}
    finished: StageSnapshot | None = None  # written together with the next start
    # The claim may have marked the first stage RUNNING already: no write for it.
    started: StageSnapshot | None = started_by_claim(project)
    try:
        for name in pending_stages(project):
            if cancel_event.is_set():
                return RunResult(RunStatus.CANCELLED, _present(finished, _unstarted(started)))
            remaining = deadline - loop.time()
            if remaining <= 0:
                return _timed_out(finished, None, workflow_timeout)  # never the first stage
            stage = workflow.stage(name)
            if started is None:
                started = stage_started(
                    snapshots[name], attempt=token.attempt, worker_id=token.worker_id, now=now_iso()
                )
                writer.write(*_present(finished, started))
                finished = None
            others = (snapshot for other, snapshot in snapshots.items() if other != name)
            result = await _run_stage(
                project,
                stage,
                started,
                token,
                log,
                cancel_event,
                sync_stages,
                owner,
                stage_limit=stage.timeout if stage.timeout is not None else default_stage_timeout,
                workflow_remaining=remaining,
                workflow_timeout=workflow_timeout,
                output_budget=limits.MAX_TOTAL_OUTPUT_BYTES - limits.total_output_bytes(others),
            )
            if isinstance(result, RunResult):
                return result
            finished, started = result, None
            snapshots[name] = result
    except asyncio.CancelledError:
        return RunResult(RunStatus.INTERRUPTED, _present(finished, _unstarted(started)))
    return RunResult(RunStatus.SUCCEEDED, _present(finished))


def _unstarted(stage: StageSnapshot | None) -> StageSnapshot | None:
    return stage and stage_unstarted(stage)


def _present(*stages: StageSnapshot | None) -> list[StageSnapshot]:
    return [stage for stage in stages if stage is not None]


def _timed_out(
    finished: StageSnapshot | None, started: StageSnapshot | None, limit: float
) -> RunResult:
    error = ErrorInfo(type="WorkflowTimeoutError", message=f"workflow exceeded {limit}s")
    failed = started and stage_finished(started, now=now_iso(), error=error)
    return RunResult(RunStatus.FAILED, _present(finished, failed), error=error)


async def _run_stage(
    project: Project,
    stage: Stage,
    started: StageSnapshot,
    token: RunToken,
    log: Any,
    cancel_event: asyncio.Event,
    sync_stages: SyncStages,
    owner: Owner,
    *,
    stage_limit: float,
    workflow_remaining: float,
    workflow_timeout: float,
    output_budget: int,
) -> StageSnapshot | RunResult:
    """Run one stage: its finished snapshot, or the RunResult that ends the run."""
    name = stage.name
    stage_log = log.bind(stage=name)
    stage_log.info("stage.started")
    ctx = StageContext(
        project=project,
        stage=name,
        attempt=token.attempt,
        idempotency_key=f"{project.project_id}:{name}",
        log=stage_log,
        cancel_event=cancel_event,
        holds_run=owner.holds_lease,
    )
    deadline = asyncio.timeout(min(stage_limit, workflow_remaining))
    began = time.monotonic()

    def observe(outcome: str) -> None:
        STAGE_SECONDS.labels(workflow=project.workflow, stage=name, outcome=outcome).observe(
            time.monotonic() - began
        )

    try:
        async with deadline:
            output = _checked_output(name, await _call(stage, ctx, sync_stages), output_budget)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the run is being stopped: a drain, a lease loss, the stage timeout
        # The stage raised CancelledError itself (a library future cancelled under it,
        # a cancelled gather child): a failure of the stage, not a stop of the run.
        observe("failed")
        error = ErrorInfo(
            type="StageCancelledError",
            message=f"stage {name!r} raised CancelledError without being cancelled",
        )
        stage_log.warning("stage.failed", error_type=error.type, error=error.message)
        return RunResult(
            RunStatus.FAILED, [stage_finished(started, now=now_iso(), error=error)], error=error
        )
    except CancelledByRequestError as exc:
        observe("cancelled")
        stopped = stage_finished(started, now=now_iso(), error=_error_info(exc))
        return RunResult(RunStatus.CANCELLED, [stopped])
    except Exception as exc:  # every failure of user code is reported, none escapes
        if isinstance(exc, RunStoppedError) and not owner.holds_lease():
            # A checkpoint found the lease run out before the lease watch did: stop the
            # run as the watch would (nothing more is written), as if it were cancelled.
            observe("stopped")
            owner.lose_lease("project.lease_expired_locally")  # cancels this task
            await asyncio.sleep(0)  # where that cancellation arrives
            raise asyncio.CancelledError from None  # pragma: no cover: in case it did not
        if isinstance(exc, TimeoutError) and deadline.expired():
            observe("timed_out")
            if workflow_remaining < stage_limit:
                stage_log.warning("workflow.timed_out")
                return _timed_out(None, started, workflow_timeout)
            error = ErrorInfo(
                type="StageTimeoutError", message=f"stage {name!r} exceeded {stage_limit}s"
            )
        else:
            observe("failed")
            error = _error_info(exc)
        stage_log.warning("stage.failed", error_type=error.type, error=error.message)
        return RunResult(
            RunStatus.FAILED,
            [stage_finished(started, now=now_iso(), error=error)],
            error=error,
            permanent=isinstance(exc, PermanentError),
            retry_delay=exc.delay if isinstance(exc, RetryableError) else None,
        )
    observe("succeeded")
    stage_log.info("stage.finished")
    return stage_finished(started, now=now_iso(), output=output)
