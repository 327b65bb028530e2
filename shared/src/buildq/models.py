"""The domain model: a project, its status and one snapshot per stage."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from buildq.limits import MAX_ERROR_MESSAGE_BYTES, MAX_ERROR_TYPE_BYTES, truncated


class ProjectStatus(StrEnum):
    QUEUED = "QUEUED"
    BUILDING = "BUILDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {ProjectStatus.SUCCEEDED, ProjectStatus.FAILED, ProjectStatus.CANCELLED}
)
ACTIVE_STATUSES = frozenset({ProjectStatus.QUEUED, ProjectStatus.BUILDING})


class StageStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


class ErrorInfo(BaseModel):
    """Why something failed: the exception type and its message.

    Bounded whatever it is built from: a longer ``message`` is cut to
    ``MAX_ERROR_MESSAGE_BYTES`` (its head and tail around a marker saying how much was
    cut), a longer ``type`` to ``MAX_ERROR_TYPE_BYTES``; so no stage snapshot,
    ``last_error`` or dead letter ever carries an unbounded error.
    """

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [{"type": "RetryableError", "message": "model call timed out"}]
        },
    )

    type: str = Field(examples=["RetryableError"])
    message: str = Field(examples=["stage 'build' failed (attempt 1 of 2 injected failures)"])

    @field_validator("type")
    @classmethod
    def _type_bounded(cls, value: str) -> str:
        return truncated(value, MAX_ERROR_TYPE_BYTES)

    @field_validator("message")
    @classmethod
    def _message_bounded(cls, value: str) -> str:
        return truncated(value, MAX_ERROR_MESSAGE_BYTES)

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """An exception as an ErrorInfo: its class name and its message (its repr if
        the message is empty), both bounded."""
        return cls(type=type(exc).__name__, message=str(exc) or repr(exc))


class StageSnapshot(BaseModel):
    """The last known state of one stage of a project's workflow."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "build",
                    "status": "FAILED",
                    "attempt": 2,
                    "worker_id": "ip-10-0-1-23-7-a1b2c3",
                    "started_at": "2026-11-23T10:00:01.000Z",
                    "finished_at": "2026-11-23T10:00:03.500Z",
                    "output": None,
                    "error": {"type": "RetryableError", "message": "model call timed out"},
                }
            ]
        },
    )

    name: str
    status: StageStatus = StageStatus.PENDING
    attempt: int = Field(0, description="The project attempt that last ran this stage")
    worker_id: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class WorkerInfo(BaseModel):
    """A live worker, as it announces itself in the table (refreshed, with a TTL)."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    host: str
    version: str
    slots_used: int
    slots_total: int
    started_at: str
    last_seen: str
    running: tuple[str, ...] = ()  # "tenant/project" of the runs it holds


class Project(BaseModel):
    """A project as stored: the record of truth for its build."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    project_id: str
    name: str
    workflow: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    status: ProjectStatus = ProjectStatus.QUEUED
    attempt: int = Field(0, description="Incremented by every claim: the fencing token")
    releases: int = Field(
        0, description="Runs handed back by draining workers: claims that used no attempt"
    )
    attempt_base: int = Field(
        0, description="Attempts used before the last replay: a replay grants a fresh budget"
    )
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    last_error: ErrorInfo | None = None
    worker_id: str | None = Field(None, description="The worker that last claimed the project")
    lease_owner: str | None = None
    lease_expires_at: int | None = Field(None, description="Lease expiry, epoch milliseconds")
    cancel_requested: bool = False
    retry_at: int | None = Field(
        None, description="A retry's backoff: not claimed before then, epoch milliseconds"
    )
    dead_lettered_attempt: int | None = Field(
        None, description="The attempt whose failure the DLQ holds (FAILED ⇔ one DLQ entry)"
    )
    stages: tuple[StageSnapshot, ...] = ()

    @property
    def attempts_used(self) -> int:
        """Attempts that count against the budget: claims since the last replay, less
        releases."""
        return self.attempt - self.releases - self.attempt_base

    def stage(self, name: str) -> StageSnapshot:
        for snapshot in self.stages:
            if snapshot.name == name:
                return snapshot
        raise KeyError(name)
