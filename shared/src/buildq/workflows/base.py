"""The workflow interface: an ordered list of named stages.

A stage is a callable taking a ``StageContext`` and returning a small JSON
object (its output). Async stages run on the worker's event loop; plain
functions run in a thread, so a blocking stage never stalls heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from buildq.limits import MAX_STAGES, stage_names_problem
from buildq.models import Project

JsonObject = dict[str, Any]
StageFn = Callable[["StageContext"], Awaitable[JsonObject | None] | JsonObject | None]


class RetryableError(Exception):
    """A failure worth another attempt (the default for any unexpected exception).

    ``delay`` overrides the backoff before the next attempt, in seconds.
    """

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(Exception):
    """A failure no retry can fix: the project fails at once and goes to the DLQ."""


class CancelledByRequestError(Exception):
    """Raised inside a stage when the project's cancellation was requested."""


class RunStoppedError(Exception):
    """Raised inside a stage at a checkpoint once this worker may no longer own the
    run: its lease ran out by the worker's own clock (the process was frozen, or
    DynamoDB unreachable), so another worker may be running the project now. The
    stage must stop; the project goes on elsewhere, and nothing of this run is
    written."""


def _always() -> bool:
    return True


@dataclass
class StageContext:
    """What a stage sees of its run.

    Its checkpoints, ``raise_if_cancelled()`` and ``sleep()``, raise when the stage
    must stop: ``CancelledByRequestError`` when the project was cancelled,
    ``RunStoppedError`` when this worker's lease may have run out. Code between two
    checkpoints runs on, even past the lease (a process frozen mid-stage resumes
    where it was), so a stage calls a checkpoint right before an effect that must
    not happen twice at once, and makes that effect idempotent with
    ``idempotency_key``. Both are safe to call from a sync stage's thread.
    """

    project: Project
    stage: str
    attempt: int
    idempotency_key: str  # stable across attempts: project id + stage name
    log: Any  # a structlog logger bound with project, tenant, attempt, worker and stage
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    holds_run: Callable[[], bool] = _always  # the worker's check of its lease

    @property
    def parameters(self) -> JsonObject:
        return self.project.parameters

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        """A checkpoint: raise if the project was cancelled or this worker may no
        longer own the run."""
        if self.cancel_event.is_set():
            raise CancelledByRequestError(f"project {self.project.project_id} was cancelled")
        if not self.holds_run():
            raise RunStoppedError(
                f"this worker's lease on project {self.project.project_id} may have run out"
            )

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up (and raise) at once if the project is cancelled; a
        checkpoint before and after."""
        self.raise_if_cancelled()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.cancel_event.wait(), timeout=seconds)
        self.raise_if_cancelled()


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    timeout: float | None = None  # seconds; None = the worker's default


@dataclass(frozen=True)
class Workflow:
    name: str
    stages: tuple[Stage, ...]
    parameters: type[BaseModel] | None = None  # validates parameters at the API
    timeout: float | None = None  # whole-workflow timeout; None = the worker's default

    def __post_init__(self) -> None:
        """Refuse a workflow a project item could not hold (``buildq.limits``): more
        than MAX_STAGES stages, or empty, overlong or repeated stage names."""
        problem = stage_names_problem(self.stage_names)
        if problem is not None:
            raise ValueError(
                f"workflow {self.name!r}: {problem} (at most {MAX_STAGES} distinct stage "
                "names, so that a project item fits in DynamoDB's 400 KB; see buildq.limits)"
            )

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def validate_parameters(self, parameters: JsonObject) -> JsonObject:
        """The parameters as the workflow will see them; raises pydantic's ValidationError."""
        if self.parameters is None:
            return parameters
        return self.parameters.model_validate(parameters).model_dump(mode="json")
