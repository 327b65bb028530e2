"""The stage runner (buildq_worker.runner.run_workflow) against an in-memory store."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest

from buildq.errors import LeaseLostError
from buildq.models import ErrorInfo, Project, StageSnapshot, StageStatus
from buildq.store import RunToken
from buildq.transitions import claimed, new_project, stage_started
from buildq.workflows.base import (
    CancelledByRequestError,
    JsonObject,
    PermanentError,
    RetryableError,
    RunStoppedError,
    Stage,
    StageContext,
    StageFn,
    Workflow,
)
from buildq_worker.runner import MAX_OUTPUT_BYTES, RunResult, RunStatus, run_workflow
from buildq_worker.sync_stages import SyncStages

TENANT = "tenant-a"
PROJECT_ID = "01HZXRUNNER"
WORKER = "worker-1"
NAMES = ("plan", "generate", "build", "package")
NOW_MS = 1_714_564_800_000


class FakeStore:
    """An in-memory StageWriter: records ``save_stages`` calls.

    ``fail_save_at``: the save with that index raises LeaseLostError.
    ``cancel_after``: saves after that many are refused for a cancel request (True,
    nothing recorded), as ``DynamoProjectStore.save_stages`` refuses them.
    """

    def __init__(self, fail_save_at: int | None = None, cancel_after: int | None = None) -> None:
        self.saves: list[tuple[RunToken, tuple[StageSnapshot, ...]]] = []
        self.fail_save_at = fail_save_at
        self.cancel_after = cancel_after

    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool:
        if self.fail_save_at is not None and len(self.saves) == self.fail_save_at:
            raise LeaseLostError("save_stages: lease lost")
        if self.cancel_after is not None and len(self.saves) >= self.cancel_after:
            return True
        self.saves.append((token, stages))
        return False

    def record(self, result: RunResult) -> dict[str, StageSnapshot]:
        """The stages as the table ends up: every save, then the final write's."""
        stages = {stage.name: stage for _, saved in self.saves for stage in saved}
        return stages | {stage.name: stage for stage in result.stages}

    @property
    def saved(self) -> list[list[tuple[str, StageStatus]]]:
        """Each save_stages call as (stage, status) pairs."""
        return [[(stage.name, stage.status) for stage in stages] for _, stages in self.saves]


@dataclass
class FakeLog:
    """A structlog-like logger recording (event, fields)."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    bound: dict[str, Any] = field(default_factory=dict)

    def bind(self, **fields: Any) -> FakeLog:
        return FakeLog(events=self.events, bound={**self.bound, **fields})

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, {**self.bound, **fields}))

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, {**self.bound, **fields}))


@dataclass
class Recorder:
    """Stage functions that record which stages ran, with which context.

    Each takes a millisecond, as any stage doing I/O does, so (with the writer's
    linger at 0, see ``run``) the write queued before it goes out while it runs.
    """

    ran: list[str] = field(default_factory=list)
    contexts: list[StageContext] = field(default_factory=list)

    def ok(self, output: JsonObject | None = None) -> StageFn:
        async def fn(ctx: StageContext) -> JsonObject | None:
            self.ran.append(ctx.stage)
            self.contexts.append(ctx)
            await asyncio.sleep(0.001)
            return {"stage": ctx.stage} if output is None else output

        return fn

    def raising(self, exc: Exception) -> StageFn:
        async def fn(ctx: StageContext) -> JsonObject:
            self.ran.append(ctx.stage)
            await asyncio.sleep(0.001)
            raise exc

        return fn

    def returning(self, value: Any) -> StageFn:
        async def fn(ctx: StageContext) -> Any:
            self.ran.append(ctx.stage)
            await asyncio.sleep(0.001)
            return value

        return fn


def workflow(*stages: Stage) -> Workflow:
    return Workflow(name="test", stages=stages)


def simple_workflow(recorder: Recorder, overrides: dict[str, StageFn] | None = None) -> Workflow:
    overrides = overrides or {}
    return workflow(*(Stage(name, overrides.get(name, recorder.ok())) for name in NAMES))


def claimed_project(
    stage_names: Sequence[str] = NAMES,
    done: Sequence[str] = (),
    status: StageStatus = StageStatus.SUCCEEDED,
) -> Project:
    project = new_project(
        tenant_id=TENANT,
        project_id=PROJECT_ID,
        name="runner test",
        workflow="test",
        stage_names=stage_names,
        parameters={"p": 1},
        now="2024-05-01T12:00:00.000Z",
    )
    stages = tuple(
        stage.model_copy(update={"status": status, "attempt": 1}) if stage.name in done else stage
        for stage in project.stages
    )
    project = project.model_copy(update={"stages": stages})
    return claimed(
        project,
        worker_id=WORKER,
        now="2024-05-01T12:00:01.000Z",
        now_ms=NOW_MS,
        lease_expires_at=NOW_MS + 60_000,
    )


def token_for(project: Project) -> RunToken:
    return RunToken(TENANT, PROJECT_ID, WORKER, project.attempt)


def run(
    wf: Workflow,
    project: Project | None = None,
    *,
    store: FakeStore | None = None,
    log: FakeLog | None = None,
    default_stage_timeout: float = 5.0,
    workflow_timeout: float = 60.0,
    cancel_before: bool = False,
    cancel_hook: Callable[[asyncio.Event], None] | None = None,
    linger: float = 0.0,
    sync_stages: SyncStages | None = None,
    owner: FakeOwner | None = None,
) -> tuple[RunResult, FakeStore]:
    project = project or claimed_project()
    store = store or FakeStore()

    async def scenario() -> RunResult:
        cancel_event = asyncio.Event()
        if cancel_before:
            cancel_event.set()
        if cancel_hook is not None:
            cancel_hook(cancel_event)
        if owner is not None:
            owner.task = asyncio.current_task()
        return await run_workflow(
            project=project,
            workflow=wf,
            store=store,
            token=token_for(project),
            log=log or FakeLog(),
            default_stage_timeout=default_stage_timeout,
            workflow_timeout=workflow_timeout,
            cancel_event=cancel_event,
            sync_stages=sync_stages,
            owner=owner,
            checkpoint_linger=linger,
        )

    return asyncio.run(scenario()), store


@dataclass
class FakeOwner:
    """The run's hold on its lease (``ActiveRun``): held until ``until`` (monotonic);
    losing it cancels the run's task, as ``ActiveRun.stop_workflow`` does."""

    until: float = float("inf")
    lost: list[str] = field(default_factory=list)
    task: asyncio.Task[Any] | None = None

    def holds_lease(self) -> bool:
        return not self.lost and time.monotonic() < self.until

    def lose_lease(self, event: str) -> None:
        self.lost.append(event)
        assert self.task is not None
        self.task.cancel()


RUNNING, SUCCEEDED, FAILED = StageStatus.RUNNING, StageStatus.SUCCEEDED, StageStatus.FAILED


# -- the happy path ----------------------------------------------------------------------


def test_all_stages_run_in_order_and_succeed() -> None:
    recorder = Recorder()
    result, _ = run(simple_workflow(recorder))
    assert recorder.ran == list(NAMES)
    assert result.status is RunStatus.SUCCEEDED
    assert result.error is None
    assert result.permanent is False
    assert result.retry_delay is None
    # The last stage's finished snapshot is left for the final write.
    assert len(result.stages) == 1
    last = result.stages[0]
    assert last.name == "package"
    assert last.status is SUCCEEDED
    assert last.output == {"stage": "package"}
    assert last.attempt == 1
    assert last.worker_id == WORKER
    assert last.started_at is not None
    assert last.finished_at is not None
    assert last.error is None


def test_each_save_carries_the_previous_finished_and_the_next_running_snapshot() -> None:
    recorder = Recorder()
    _, store = run(simple_workflow(recorder))
    assert store.saved == [
        [("plan", RUNNING)],
        [("plan", SUCCEEDED), ("generate", RUNNING)],
        [("generate", SUCCEEDED), ("build", RUNNING)],
        [("build", SUCCEEDED), ("package", RUNNING)],
    ]
    for token, _stages in store.saves:
        assert token == RunToken(TENANT, PROJECT_ID, WORKER, 1)
    for _, stages in store.saves[1:]:
        finished, running = stages
        assert finished.output == {"stage": finished.name}
        assert finished.finished_at is not None
        assert running.attempt == 1
        assert running.worker_id == WORKER
        assert running.finished_at is None
        assert running.output is None


def test_stage_context_is_built_for_the_run() -> None:
    recorder = Recorder()
    project = claimed_project()
    run(simple_workflow(recorder), project)
    ctx = recorder.contexts[2]
    assert ctx.stage == "build"
    assert ctx.attempt == 1
    assert ctx.project == project
    assert ctx.parameters == {"p": 1}
    assert ctx.idempotency_key == f"{PROJECT_ID}:build"


def test_stage_returning_none_records_no_output() -> None:
    wf = workflow(Stage("only", Recorder().returning(None)))
    result, _ = run(wf, claimed_project(["only"]))
    assert result.status is RunStatus.SUCCEEDED
    assert result.stages[0].output is None
    assert result.stages[0].status is SUCCEEDED


def test_output_of_exactly_the_maximum_size_is_accepted() -> None:
    output = {"x": "a" * (MAX_OUTPUT_BYTES - len('{"x":""}'))}
    wf = workflow(Stage("only", Recorder().returning(output)))
    result, _ = run(wf, claimed_project(["only"]))
    assert result.status is RunStatus.SUCCEEDED
    assert result.stages[0].output == output


def test_stages_log_started_and_finished() -> None:
    log = FakeLog()
    run(simple_workflow(Recorder()), log=log)
    assert [(event, fields.get("stage")) for event, fields in log.events] == [
        (event, name) for name in NAMES for event in ("stage.started", "stage.finished")
    ]


# -- resuming ------------------------------------------------------------------------------


def test_resumed_project_runs_only_the_unfinished_stages() -> None:
    recorder = Recorder()
    project = claimed_project(done=("plan", "generate"))
    result, store = run(simple_workflow(recorder), project)
    assert recorder.ran == ["build", "package"]
    assert result.status is RunStatus.SUCCEEDED
    assert store.saved == [
        [("build", RUNNING)],
        [("build", SUCCEEDED), ("package", RUNNING)],
    ]
    assert [stage.name for stage in result.stages] == ["package"]


def test_resumed_project_skips_skipped_stages_and_reruns_a_failed_one() -> None:
    recorder = Recorder()
    project = claimed_project(done=("plan",), status=StageStatus.SKIPPED)
    failed = project.stage("generate").model_copy(
        update={
            "status": FAILED,
            "attempt": 1,
            "error": ErrorInfo(type="RetryableError", message="x"),
        }
    )
    project = project.model_copy(
        update={"stages": tuple(failed if s.name == "generate" else s for s in project.stages)}
    )
    _, store = run(simple_workflow(recorder), project)
    assert recorder.ran == ["generate", "build", "package"]
    rerun = store.saves[0][1][0]
    assert (rerun.name, rerun.status, rerun.error) == ("generate", RUNNING, None)


def test_fully_finished_project_runs_nothing() -> None:
    recorder = Recorder()
    result, store = run(simple_workflow(recorder), claimed_project(done=NAMES))
    assert recorder.ran == []
    assert store.saves == []
    assert result.status is RunStatus.SUCCEEDED
    assert list(result.stages) == []


# -- failures ---------------------------------------------------------------------------------


def test_retryable_error_fails_the_run_not_permanently() -> None:
    recorder = Recorder()
    wf = simple_workflow(recorder, {"build": recorder.raising(RetryableError("flaky"))})
    log = FakeLog()
    result, store = run(wf, log=log)
    assert recorder.ran == ["plan", "generate", "build"]
    assert result.status is RunStatus.FAILED
    assert result.permanent is False
    assert result.retry_delay is None
    assert result.error == ErrorInfo(type="RetryableError", message="flaky")
    assert len(result.stages) == 1
    failed = result.stages[0]
    assert (failed.name, failed.status, failed.error) == ("build", FAILED, result.error)
    assert failed.finished_at is not None
    # The previous stage's success was already written together with build's start.
    assert store.saved[-1] == [("generate", SUCCEEDED), ("build", RUNNING)]
    warning = ("stage.failed", {"stage": "build", "error_type": "RetryableError", "error": "flaky"})
    assert warning in log.events


def test_retryable_error_carries_its_own_delay() -> None:
    recorder = Recorder()
    wf = simple_workflow(recorder, {"plan": recorder.raising(RetryableError("x", delay=7.5))})
    result, _ = run(wf)
    assert result.status is RunStatus.FAILED
    assert result.retry_delay == 7.5
    assert result.permanent is False


def test_permanent_error_fails_the_run_permanently() -> None:
    recorder = Recorder()
    wf = simple_workflow(recorder, {"generate": recorder.raising(PermanentError("bad spec"))})
    result, _ = run(wf)
    assert recorder.ran == ["plan", "generate"]
    assert result.status is RunStatus.FAILED
    assert result.permanent is True
    assert result.retry_delay is None
    assert result.error == ErrorInfo(type="PermanentError", message="bad spec")


def test_permanent_error_subclass_is_permanent() -> None:
    class BadInputError(PermanentError):
        pass

    recorder = Recorder()
    wf = simple_workflow(recorder, {"plan": recorder.raising(BadInputError("no"))})
    result, _ = run(wf)
    assert result.permanent is True
    assert result.error is not None
    assert result.error.type == "BadInputError"


def test_unexpected_exception_is_a_retryable_failure() -> None:
    async def divide(ctx: StageContext) -> JsonObject:
        return {"x": 1 / 0}

    wf = simple_workflow(Recorder(), {"build": divide})
    result, _ = run(wf)
    assert result.status is RunStatus.FAILED
    assert result.permanent is False
    assert result.error is not None
    assert result.error.type == "ZeroDivisionError"
    assert result.error.message == "division by zero"
    # "build" failed before its start went out: its start goes with the final write.
    assert [(s.name, s.status) for s in result.stages] == [
        ("generate", SUCCEEDED),
        ("build", FAILED),
    ]


def test_exception_without_message_is_described_by_its_repr() -> None:
    recorder = Recorder()
    wf = simple_workflow(recorder, {"plan": recorder.raising(KeyError())})
    result, _ = run(wf)
    assert result.error == ErrorInfo(type="KeyError", message="KeyError()")


def test_stage_exceeding_its_timeout() -> None:
    async def slow(ctx: StageContext) -> JsonObject:
        await asyncio.sleep(30)
        return {}

    wf = workflow(Stage("plan", Recorder().ok()), Stage("slow", slow, timeout=0.02))
    result, _ = run(wf, claimed_project(["plan", "slow"]), default_stage_timeout=30)
    assert result.status is RunStatus.FAILED
    assert result.permanent is False
    assert result.error == ErrorInfo(
        type="StageTimeoutError", message="stage 'slow' exceeded 0.02s"
    )
    assert result.stages[0].error == result.error


def test_stage_without_timeout_uses_the_default() -> None:
    async def slow(ctx: StageContext) -> JsonObject:
        await asyncio.sleep(30)
        return {}

    wf = workflow(Stage("slow", slow))
    result, _ = run(wf, claimed_project(["slow"]), default_stage_timeout=0.02)
    assert result.error == ErrorInfo(
        type="StageTimeoutError", message="stage 'slow' exceeded 0.02s"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["not", "a", "dict"], "stage 'only' returned list, not a dict"),
        ("text", "stage 'only' returned str, not a dict"),
        (42, "stage 'only' returned int, not a dict"),
        (
            {"blob": "x" * MAX_OUTPUT_BYTES},
            f"stage 'only' output is {MAX_OUTPUT_BYTES + 11} bytes; max {MAX_OUTPUT_BYTES}",
        ),
        ({"when": object()}, "stage 'only' output is not JSON: "),
    ],
    ids=["list", "str", "int", "too-big", "not-json"],
)
def test_bad_output_fails_permanently(value: Any, message: str) -> None:
    wf = workflow(Stage("only", Recorder().returning(value)))
    result, _ = run(wf, claimed_project(["only"]))
    assert result.status is RunStatus.FAILED
    assert result.permanent is True
    assert result.error is not None
    assert result.error.type == "StageOutputError"
    assert result.error.message.startswith(message)
    assert result.stages[0].status is FAILED
    assert result.stages[0].output is None


def test_a_lease_lost_in_a_write_stops_the_running_stage_and_escapes_the_runner() -> None:
    recorder = Recorder()
    stopped: list[str] = []

    async def slow(ctx: StageContext) -> JsonObject:
        recorder.ran.append(ctx.stage)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            stopped.append(ctx.stage)
            raise
        return {}

    wf = simple_workflow(recorder, {"build": slow})
    # The third write (generate SUCCEEDED, build RUNNING) finds the lease gone.
    with pytest.raises(LeaseLostError):
        run(wf, store=FakeStore(fail_save_at=2))
    assert recorder.ran == ["plan", "generate", "build"]
    assert stopped == ["build"]


# -- sync stages ---------------------------------------------------------------------------------


def test_sync_stage_runs_in_a_thread_and_its_output_is_recorded() -> None:
    threads: list[int] = []

    def blocking(ctx: StageContext) -> JsonObject:
        threads.append(threading.get_ident())
        return {"sync": True, "stage": ctx.stage}

    main_thread = threading.get_ident()
    wf = workflow(Stage("plan", Recorder().ok()), Stage("sync", blocking))
    result, store = run(wf, claimed_project(["plan", "sync"]))
    assert result.status is RunStatus.SUCCEEDED
    assert threads
    assert threads[0] != main_thread
    sync = store.record(result)["sync"]
    assert (sync.status, sync.output) == (SUCCEEDED, {"sync": True, "stage": "sync"})


def test_sync_stage_errors_are_reported() -> None:
    def blocking(ctx: StageContext) -> JsonObject:
        raise PermanentError("sync says no")

    wf = workflow(Stage("sync", blocking))
    result, _ = run(wf, claimed_project(["sync"]))
    assert result.status is RunStatus.FAILED
    assert result.permanent is True
    assert result.error == ErrorInfo(type="PermanentError", message="sync says no")


def test_sync_callable_returning_an_awaitable_is_awaited() -> None:
    class AsyncCallable:
        async def __call__(self, ctx: StageContext) -> JsonObject:
            return {"from": "callable"}

    wf = workflow(Stage("only", AsyncCallable()))
    result, _ = run(wf, claimed_project(["only"]))
    assert result.status is RunStatus.SUCCEEDED
    assert result.stages[0].output == {"from": "callable"}


class CrashOnlyError(BaseException):  # like SystemExit: no stage handler catches it
    """Raised by a test's stand-in for the crash-only exit (the real one ends the process)."""


def _crash(reason: str, **fields: Any) -> NoReturn:
    raise CrashOnlyError(reason)


def test_a_sync_stage_past_its_timeout_is_waited_for_before_the_run_ends() -> None:
    """The thread cannot be stopped: the run (its lease, its slot) outlives it, so a
    retry never starts the stage while it still runs."""
    returned: list[float] = []

    def stubborn(ctx: StageContext) -> JsonObject:
        time.sleep(0.3)
        returned.append(time.monotonic())
        return {}

    wf = workflow(Stage("sync", stubborn, timeout=0.05))
    result, _ = run(wf, claimed_project(["sync"]), sync_stages=SyncStages(5.0, exit=_crash))
    ended = time.monotonic()
    assert result.error == ErrorInfo(
        type="StageTimeoutError", message="stage 'sync' exceeded 0.05s"
    )
    assert returned
    assert returned[0] <= ended


def test_a_sync_stage_that_never_returns_ends_the_process() -> None:
    release = threading.Event()

    def stuck(ctx: StageContext) -> JsonObject:
        release.wait(10)
        return {}

    wf = workflow(Stage("sync", stuck, timeout=0.05))
    try:
        with pytest.raises(CrashOnlyError, match="did not return"):
            run(wf, claimed_project(["sync"]), sync_stages=SyncStages(0.2, exit=_crash))
    finally:
        release.set()


def test_a_lease_lost_while_a_sync_stage_runs_ends_the_process() -> None:
    release = threading.Event()
    crashed: list[str] = []

    def stuck(ctx: StageContext) -> JsonObject:
        release.wait(10)
        return {}

    def crash(reason: str, **fields: Any) -> NoReturn:
        crashed.append(reason)
        release.set()  # the real exit ends the thread with the process
        raise CrashOnlyError(reason)

    wf = simple_workflow(Recorder(), {"build": stuck})
    # The third write (generate SUCCEEDED, build RUNNING) finds the lease gone while
    # build's thread runs: another worker may run build now, so this process must go.
    with pytest.raises(LeaseLostError):
        run(wf, store=FakeStore(fail_save_at=2), sync_stages=SyncStages(5.0, exit=crash))
    assert crashed == ["lease lost while a sync stage runs"]


def test_a_stage_raising_cancelled_error_itself_is_a_retryable_failure() -> None:
    """A library future cancelled under the stage is the stage's failure, not a stop
    of the run: the run must not come back INTERRUPTED (which would use no attempt)."""

    async def inner_cancelled(ctx: StageContext) -> JsonObject:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future
        return {}

    wf = workflow(Stage("plan", Recorder().ok()), Stage("flaky", inner_cancelled))
    result, store = run(wf, claimed_project(["plan", "flaky"]))
    assert result.status is RunStatus.FAILED
    assert result.permanent is False
    assert result.error is not None
    assert result.error.type == "StageCancelledError"
    assert store.record(result)["flaky"].status is FAILED


# -- checkpoints past the lease --------------------------------------------------------------
#
# A process frozen mid-stage past its lease resumes where it was: its stage may reach
# its next checkpoint before the lease watch (every 0.25 s) notices. The checkpoint
# stops it there, and nothing after it runs.


def test_an_async_stage_waking_past_its_lease_stops_at_its_checkpoint() -> None:
    after: list[str] = []
    owner = FakeOwner()

    async def sleeper(ctx: StageContext) -> JsonObject:
        owner.until = time.monotonic() + 0.02  # the lease runs out while it sleeps
        await ctx.sleep(0.1)
        after.append(ctx.stage)  # an effect: must not happen past the lease
        return {}

    wf = simple_workflow(Recorder(), {"generate": sleeper})
    result, store = run(wf, owner=owner)
    assert result.status is RunStatus.INTERRUPTED
    assert after == []
    assert owner.lost == ["project.lease_expired_locally"]
    assert "build" not in store.record(result)


def test_a_sync_stage_checking_past_its_lease_stops_without_ending_the_process() -> None:
    """The thread stops at its checkpoint and returns: no stage code runs on, so the
    lease loss needs no crash-only exit."""
    after: list[str] = []
    crashed: list[str] = []
    owner = FakeOwner()

    def blocking(ctx: StageContext) -> JsonObject:
        owner.until = time.monotonic() + 0.02
        time.sleep(0.1)  # frozen, say: no checkpoint in here
        ctx.raise_if_cancelled()
        after.append(ctx.stage)
        return {}

    def crash(reason: str, **fields: Any) -> NoReturn:
        crashed.append(reason)
        raise CrashOnlyError(reason)

    wf = simple_workflow(Recorder(), {"build": blocking})
    result, store = run(wf, owner=owner, sync_stages=SyncStages(5.0, exit=crash))
    assert result.status is RunStatus.INTERRUPTED
    assert (after, crashed) == ([], [])
    assert owner.lost == ["project.lease_expired_locally"]
    assert "package" not in store.record(result)


def test_a_stage_raising_run_stopped_error_while_the_lease_holds_is_a_failure() -> None:
    wf = simple_workflow(Recorder(), {"build": Recorder().raising(RunStoppedError("mine"))})
    owner = FakeOwner()
    result, _ = run(wf, owner=owner)
    assert result.status is RunStatus.FAILED
    assert result.error is not None
    assert result.error.type == "RunStoppedError"
    assert owner.lost == []


# -- cancellation -------------------------------------------------------------------------------


def test_cancelled_before_start_runs_nothing() -> None:
    recorder = Recorder()
    result, store = run(simple_workflow(recorder), cancel_before=True)
    assert result.status is RunStatus.CANCELLED
    assert list(result.stages) == []
    assert result.error is None
    assert recorder.ran == []
    assert store.saves == []


def test_cancel_between_stages_stops_before_the_next_and_keeps_the_finished_snapshot() -> None:
    async def cancels(ctx: StageContext) -> JsonObject:
        ctx.cancel_event.set()
        return {"done": True}

    recorder = Recorder()
    wf = simple_workflow(recorder, {"generate": cancels})
    result, store = run(wf)
    assert recorder.ran == ["plan"]
    assert result.status is RunStatus.CANCELLED
    # "generate" ended before its start went out: all of it goes with the final write.
    assert store.saved == [[("plan", RUNNING)]]
    assert [(s.name, s.status, s.output) for s in result.stages] == [
        ("plan", SUCCEEDED, {"stage": "plan"}),
        ("generate", SUCCEEDED, {"done": True}),
    ]


def test_cancel_during_a_stage_stops_it() -> None:
    async def waits(ctx: StageContext) -> JsonObject:
        await ctx.sleep(30)
        return {}

    def cancel_soon(event: asyncio.Event) -> None:
        asyncio.get_running_loop().call_later(0.02, event.set)

    recorder = Recorder()
    wf = simple_workflow(recorder, {"build": waits})
    result, _ = run(wf, cancel_hook=cancel_soon)
    assert recorder.ran == ["plan", "generate"]
    assert result.status is RunStatus.CANCELLED
    assert len(result.stages) == 1
    stopped = result.stages[0]
    assert stopped.name == "build"
    assert stopped.status is FAILED
    assert stopped.error is not None
    assert stopped.error.type == "CancelledByRequestError"


def test_cancelled_by_request_error_raised_by_a_stage_cancels_the_run() -> None:
    recorder = Recorder()
    wf = simple_workflow(recorder, {"plan": recorder.raising(CancelledByRequestError("stop"))})
    result, _ = run(wf)
    assert result.status is RunStatus.CANCELLED
    assert result.permanent is False
    assert [s.name for s in result.stages] == ["plan"]


# -- issue 3: workflow timeout, cancels seen on writes, interruption ----------------------


def _sleeper(seconds: float) -> StageFn:
    async def stage(ctx: StageContext) -> JsonObject:
        await asyncio.sleep(seconds)
        return {"stage": ctx.stage}

    return stage


def test_workflow_timeout_fails_the_stage_that_was_running() -> None:
    wf = Workflow(name="slow", stages=tuple(Stage(n, _sleeper(0.2)) for n in NAMES))
    result, _ = run(wf, workflow_timeout=0.5)
    assert result.status is RunStatus.FAILED
    assert result.error is not None
    assert result.error.type == "WorkflowTimeoutError"
    assert result.permanent is False
    failed = [stage for stage in result.stages if stage.status is FAILED]
    assert [stage.name for stage in failed] == ["build"]  # 3rd stage, at 0.4 s..0.6 s


def test_a_cancel_reported_by_a_stage_write_stops_the_run() -> None:
    recorder = Recorder()
    store = FakeStore(cancel_after=2)  # the third save (start of "build") reports a cancel
    wf = Workflow(
        name="cancel-me",
        stages=tuple(Stage(n, _cancellable(recorder)) for n in NAMES),
    )
    result, _ = run(wf, store=store)
    assert result.status is RunStatus.CANCELLED
    assert recorder.ran == ["plan", "generate", "build"]  # build saw the cancel at once


def _cancellable(recorder: Recorder) -> StageFn:
    async def stage(ctx: StageContext) -> JsonObject:
        recorder.ran.append(ctx.stage)
        await ctx.sleep(0.05)
        return {}

    return stage


def test_cancelling_the_task_interrupts_with_a_checkpoint() -> None:
    project = claimed_project()
    store = FakeStore()

    async def scenario() -> RunResult:
        generating = asyncio.Event()

        async def long_stage(ctx: StageContext) -> JsonObject:
            generating.set()
            await asyncio.sleep(5)
            return {}

        stages = [Stage("plan", _sleeper(0.01)), Stage("generate", long_stage)]
        stages += [Stage(name, long_stage) for name in NAMES[2:]]
        task = asyncio.create_task(
            run_workflow(
                project=project,
                workflow=Workflow(name="long", stages=tuple(stages)),
                store=store,
                token=token_for(project),
                log=FakeLog(),
                default_stage_timeout=60,
                workflow_timeout=60,
                cancel_event=asyncio.Event(),
            )
        )
        await asyncio.wait_for(generating.wait(), 5)
        task.cancel()
        return await task

    result = asyncio.run(scenario())
    assert result.status is RunStatus.INTERRUPTED
    # The checkpoint: the last finished stage, and the interrupted one PENDING again
    # (written while "generate" ran, or with the final write).
    record = store.record(result)
    assert [(name, record[name].status) for name in ("plan", "generate")] == [
        ("plan", SUCCEEDED),
        ("generate", StageStatus.PENDING),
    ]
    assert {"build", "package"}.isdisjoint(record)


# -- a first stage the claim already started ------------------------------------------


def started_by_its_claim(project: Project, name: str = "plan") -> Project:
    """The project as ``claim(start=name)`` returns it: that stage RUNNING already."""
    stages = tuple(
        stage_started(stage, attempt=project.attempt, worker_id=WORKER, now="2024-05-01T12:00:01Z")
        if stage.name == name
        else stage
        for stage in project.stages
    )
    return project.model_copy(update={"stages": stages})


def test_a_stage_the_claim_started_runs_without_a_write_of_its_own() -> None:
    recorder = Recorder()
    result, store = run(simple_workflow(recorder), started_by_its_claim(claimed_project()))
    assert recorder.ran == list(NAMES)
    assert result.status is RunStatus.SUCCEEDED
    # Three writes instead of four: each carries a finish and the next start.
    assert store.saved == [
        [("plan", SUCCEEDED), ("generate", RUNNING)],
        [("generate", SUCCEEDED), ("build", RUNNING)],
        [("build", SUCCEEDED), ("package", RUNNING)],
    ]
    assert [(s.name, s.status) for s in result.stages] == [("package", SUCCEEDED)]


def test_a_stage_left_running_by_an_earlier_attempt_is_started_again() -> None:
    project = claimed_project()
    crashed = stage_started(
        project.stages[0], attempt=project.attempt - 1, worker_id="worker-0", now="2024-05-01T11Z"
    )
    project = project.model_copy(update={"stages": (crashed, *project.stages[1:])})
    _, store = run(simple_workflow(Recorder()), project)
    assert store.saved[0] == [("plan", RUNNING)]
    assert store.saves[0][1][0].attempt == project.attempt


def test_a_cancel_before_the_first_step_puts_the_claimed_stage_back() -> None:
    recorder = Recorder()
    result, store = run(
        simple_workflow(recorder), started_by_its_claim(claimed_project()), cancel_before=True
    )
    assert recorder.ran == []
    assert store.saves == []
    assert result.status is RunStatus.CANCELLED
    [plan] = result.stages
    assert (plan.name, plan.status, plan.started_at, plan.worker_id) == (
        "plan",
        StageStatus.PENDING,
        None,
        None,
    )


# -- writes behind the stages -------------------------------------------------------------


def test_stages_shorter_than_a_write_cost_no_write_of_their_own() -> None:
    async def instant(ctx: StageContext) -> JsonObject:
        return {"stage": ctx.stage}

    wf = workflow(*(Stage(name, instant) for name in NAMES))
    result, store = run(wf, started_by_its_claim(claimed_project()))
    assert result.status is RunStatus.SUCCEEDED
    assert store.saves == []  # the claim and the final write say it all
    assert [(s.name, s.status) for s in result.stages] == [(n, SUCCEEDED) for n in NAMES]


def test_stages_within_the_linger_share_one_write_even_when_they_wait() -> None:
    recorder = Recorder()  # each stage waits a millisecond
    result, store = run(
        simple_workflow(recorder), started_by_its_claim(claimed_project()), linger=0.5
    )
    assert recorder.ran == list(NAMES)
    assert store.saves == []
    assert [(s.name, s.status) for s in result.stages] == [(n, SUCCEEDED) for n in NAMES]


def test_a_stage_starts_without_waiting_for_the_write_that_records_the_one_before() -> None:
    held = asyncio.Event()  # created in the test's loop below

    class HeldStore(FakeStore):
        async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool:
            await held.wait()  # until the last stage runs: a runner waiting would hang
            return await super().save_stages(token, *stages)

    async def quick(ctx: StageContext) -> JsonObject:
        if ctx.stage == NAMES[-1]:
            held.set()
        await asyncio.sleep(0.01)
        return {}

    wf = workflow(*(Stage(name, quick) for name in NAMES))
    result, store = run(
        wf, started_by_its_claim(claimed_project()), store=HeldStore(), workflow_timeout=5
    )
    assert result.status is RunStatus.SUCCEEDED
    # What piled up behind the held write went out together in the next one.
    assert store.saved == [
        [("plan", SUCCEEDED), ("generate", RUNNING)],
        [("generate", SUCCEEDED), ("build", SUCCEEDED), ("package", RUNNING)],
    ]
    assert [(s.name, s.status) for s in result.stages] == [("package", SUCCEEDED)]
