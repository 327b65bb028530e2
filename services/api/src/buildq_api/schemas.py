"""The API's shapes: what clients send (ProjectCreate) and get back (ProjectPublic)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot

MAX_PARAMETERS_BYTES = 16 * 1024
MAX_PARAMETERS_DEPTH = 8


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


class ProjectCreate(BaseModel):
    """A request to create a project and run its build workflow."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "my-agent", "workflow": "demo", "parameters": {"stage_seconds": 0.5}}
            ]
        },
    )

    name: str = Field(min_length=1, max_length=200, description="A human-readable name")
    workflow: str = Field(
        min_length=1, max_length=100, description="Registered workflow to run, e.g. `demo`"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Workflow parameters: a JSON object of at most {MAX_PARAMETERS_BYTES} "
        f"bytes, nested at most {MAX_PARAMETERS_DEPTH} deep",
    )

    @field_validator("name")
    @classmethod
    def _name_is_printable(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("name must be printable and not blank")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, separators=(",", ":"))) > MAX_PARAMETERS_BYTES:
            raise ValueError(f"parameters must be at most {MAX_PARAMETERS_BYTES} bytes of JSON")
        if _depth(value) > MAX_PARAMETERS_DEPTH:
            raise ValueError(f"parameters must be nested at most {MAX_PARAMETERS_DEPTH} deep")
        return value


_STAGE_EXAMPLE: dict[str, Any] = {
    "name": "plan",
    "status": "SUCCEEDED",
    "attempt": 1,
    "worker_id": "ip-10-0-1-23-7-a1b2c3",
    "started_at": "2026-11-23T10:00:00.120Z",
    "finished_at": "2026-11-23T10:00:00.640Z",
    "output": {"stage": "plan", "attempt": 1, "seconds": 0.5},
    "error": None,
}
_PROJECT_EXAMPLE: dict[str, Any] = {
    "id": "01JDQ8Z5W3K7N2P4R6T8V0X2Y4",
    "name": "my-agent",
    "workflow": "demo",
    "parameters": {"stage_seconds": 0.5, "fail_at_stage": None, "fail_times": None},
    "status": "BUILDING",
    "attempt": 1,
    "releases": 0,
    "created_at": "2026-11-23T10:00:00.010Z",
    "updated_at": "2026-11-23T10:00:00.650Z",
    "started_at": "2026-11-23T10:00:00.100Z",
    "finished_at": None,
    "last_error": None,
    "worker_id": "ip-10-0-1-23-7-a1b2c3",
    "cancel_requested": False,
    "stages": [
        _STAGE_EXAMPLE,
        {
            **_STAGE_EXAMPLE,
            "name": "generate",
            "status": "RUNNING",
            "finished_at": None,
            "output": None,
        },
        {
            "name": "build",
            "status": "PENDING",
            "attempt": 0,
            "worker_id": None,
            "started_at": None,
            "finished_at": None,
            "output": None,
            "error": None,
        },
    ],
}


class ProjectPublic(BaseModel):
    """A project as clients see it: status, attempt, timestamps and per-stage snapshots."""

    model_config = ConfigDict(json_schema_extra={"examples": [_PROJECT_EXAMPLE]})

    id: str = Field(description="The project id (a ULID: sorts by creation time)")
    name: str
    workflow: str
    parameters: dict[str, Any]
    status: ProjectStatus
    attempt: int = Field(description="How many times a worker has started this project")
    releases: int = Field(
        description="How many of those runs a draining worker handed back (they cost no attempt)"
    )
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    last_error: ErrorInfo | None
    worker_id: str | None = Field(description="The worker that last ran the project")
    cancel_requested: bool
    stages: list[StageSnapshot]

    @classmethod
    def of(cls, project: Project) -> ProjectPublic:
        return cls(
            id=project.project_id,
            name=project.name,
            workflow=project.workflow,
            parameters=project.parameters,
            status=project.status,
            attempt=project.attempt,
            releases=project.releases,
            created_at=project.created_at,
            updated_at=project.updated_at,
            started_at=project.started_at,
            finished_at=project.finished_at,
            last_error=project.last_error,
            worker_id=project.worker_id,
            cancel_requested=project.cancel_requested,
            stages=list(project.stages),
        )


class ProjectPage(BaseModel):
    """One page of a tenant's projects, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_PROJECT_EXAMPLE], "next_cursor": "eyJ2IjoxfQ.c2ln"}]
        }
    )

    items: list[ProjectPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end"
    )


class Problem(BaseModel):
    """An RFC 9457 problem detail: every 4xx and 5xx answer has this body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:buildq:problem:validation-error",
                    "title": "Request validation failed",
                    "status": 422,
                    "detail": "body.name: Field required",
                    "instance": "/v1/projects",
                    "request_id": "4f7c0c2a9d3e4b7f",
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = None
