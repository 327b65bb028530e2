"""The API's results as frozen dataclasses, parsed leniently: fields the client does not
know are ignored, so a newer server does not break an older client."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from buildq_client.errors import InvalidResponse

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


class ProjectStatus(StrEnum):
    QUEUED = "QUEUED"
    BUILDING = "BUILDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True once the project has ended: it will not change again."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[ProjectStatus] = frozenset(
    {ProjectStatus.SUCCEEDED, ProjectStatus.FAILED, ProjectStatus.CANCELLED}
)


class StageStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why something failed: the exception type and its message."""

    type: str
    message: str

    @classmethod
    def from_json(cls, data: object) -> ErrorInfo:
        obj = _object(data, "error")
        return cls(type=_str(obj, "type"), message=_str(obj, "message"))


@dataclass(frozen=True, slots=True)
class Stage:
    """The last known state of one stage of a project's workflow."""

    name: str
    status: StageStatus
    attempt: int
    worker_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    output: dict[str, Any] | None
    error: ErrorInfo | None

    @classmethod
    def from_json(cls, data: object) -> Stage:
        obj = _object(data, "stage")
        return cls(
            name=_str(obj, "name"),
            status=_enum(StageStatus, obj, "status", default=StageStatus.PENDING),
            attempt=_int(obj, "attempt", default=0),
            worker_id=_opt_str(obj, "worker_id"),
            started_at=_opt_time(obj, "started_at"),
            finished_at=_opt_time(obj, "finished_at"),
            output=_opt_object(obj, "output"),
            error=_opt(obj, "error", ErrorInfo.from_json),
        )


@dataclass(frozen=True, slots=True)
class Project:
    """A project as the API reports it: status, attempts, timestamps and stages."""

    id: str
    name: str
    workflow: str
    parameters: dict[str, Any]
    status: ProjectStatus
    attempt: int
    releases: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: ErrorInfo | None
    worker_id: str | None
    cancel_requested: bool
    stages: tuple[Stage, ...] = field(default=())

    @property
    def terminal(self) -> bool:
        """True once the project has ended (SUCCEEDED, FAILED or CANCELLED)."""
        return self.status.terminal

    def stage(self, name: str) -> Stage:
        """The stage called ``name``; KeyError if the workflow has none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @classmethod
    def from_json(cls, data: object) -> Project:
        obj = _object(data, "project")
        stages = obj.get("stages") or []
        if not isinstance(stages, list):
            raise InvalidResponse("project.stages is not a list")
        return cls(
            id=_str(obj, "id"),
            name=_str(obj, "name"),
            workflow=_str(obj, "workflow"),
            parameters=_opt_object(obj, "parameters") or {},
            status=_enum(ProjectStatus, obj, "status"),
            attempt=_int(obj, "attempt", default=0),
            releases=_int(obj, "releases", default=0),
            created_at=_time(obj, "created_at"),
            updated_at=_time(obj, "updated_at"),
            started_at=_opt_time(obj, "started_at"),
            finished_at=_opt_time(obj, "finished_at"),
            last_error=_opt(obj, "last_error", ErrorInfo.from_json),
            worker_id=_opt_str(obj, "worker_id"),
            cancel_requested=bool(obj.get("cancel_requested", False)),
            stages=tuple(Stage.from_json(stage) for stage in stages),
        )


@dataclass(frozen=True, slots=True)
class ProjectPage:
    """One page of ``GET /v1/projects``: pass ``next_cursor`` back for the next one."""

    items: tuple[Project, ...]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: object) -> ProjectPage:
        obj = _object(data, "page")
        items = obj.get("items")
        if not isinstance(items, list):
            raise InvalidResponse("page.items is not a list")
        return cls(
            items=tuple(Project.from_json(item) for item in items),
            next_cursor=_opt_str(obj, "next_cursor") or None,
        )


# -- lenient field readers: unknown keys are ignored, wrong types are InvalidResponse --


def _object(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidResponse(f"{what} is not a JSON object: {type(data).__name__}")
    return data


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidResponse(f"{key!r} is missing or not a string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidResponse(f"{key!r} is not a string")
    return value


def _int(obj: Mapping[str, Any], key: str, *, default: int) -> int:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidResponse(f"{key!r} is not an integer")
    return value


def _opt_object(obj: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise InvalidResponse(f"{key!r} is not a JSON object")
    return value


def _time(obj: Mapping[str, Any], key: str) -> datetime:
    raw = _str(obj, key)
    try:
        # Python 3.11 reads the API's "2024-05-01T12:00:00.123Z" as an aware UTC time.
        return datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidResponse(f"{key!r} is not an ISO-8601 time: {raw!r}") from None


def _opt_time(obj: Mapping[str, Any], key: str) -> datetime | None:
    return None if obj.get(key) is None else _time(obj, key)


def _enum(enum: type[E], obj: Mapping[str, Any], key: str, *, default: E | None = None) -> E:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise InvalidResponse(f"{key!r} is missing or not a string")
    try:
        return enum(value)
    except ValueError:
        raise InvalidResponse(f"{key!r} is not a known {enum.__name__}: {value!r}") from None


def _opt(obj: Mapping[str, Any], key: str, parse: Callable[[object], T]) -> T | None:
    value = obj.get(key)
    return None if value is None else parse(value)
