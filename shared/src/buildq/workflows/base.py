"""The workflow interface: an ordered list of named stages.

A stage is a callable taking a ``StageContext`` and returning a small JSON
object (its output). Async stages run on the worker's event loop; plain
functions run in a thread, so a blocking stage never stalls heartbeats.
"""

from __future__ import annotations

import asyncio
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


@dataclass
class StageContext:
    """What a stage sees of its run."""

    project: Project
    stage: str
    attempt: int
    idempotency_key: str  # stable across attempts: project id + stage name
    log: Any  # a structlog logger bound with project, tenant, attempt, worker and stage
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def parameters(self) -> JsonObject:
        return self.project.parameters

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise CancelledByRequestError(f"project {self.project.project_id} was cancelled")

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up (and raise) at once if the project is cancelled."""
        self.raise_if_cancelled()
        try:
            await asyncio.wait_for(self.cancel_event.wait(), timeout=seconds)
        except TimeoutError:
            return
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
