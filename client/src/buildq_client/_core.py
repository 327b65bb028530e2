"""Everything the sync and async clients share, with no I/O of its own.

Each operation is a *flow*: a generator that yields the next step (an HTTP ``Call`` to
make, or a ``Pause`` to sleep), is sent the ``httpx.Response`` of each call, parses it,
raises the typed error of an error answer, and finally returns its result. The sync
and async clients only drive flows (``_sync.py``, ``_async.py``): the one thing that
differs between them is how a request is sent and how a pause is slept.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar
from urllib.parse import quote

import httpx

from buildq_client.errors import (
    BuildqError,
    Conflict,
    InvalidResponse,
    NotFound,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from buildq_client.models import TERMINAL_STATUSES, Project, ProjectPage, ProjectStatus

__version__ = "0.1.0"

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
MAX_LONG_POLL = 20.0  # the API's largest ``wait``, s
# A long poll that comes back unchanged well before its time means the server did not
# wait (an old API, a proxy): pause this long before asking again instead of spinning.
MIN_POLL_INTERVAL = 1.0

_STATUS_ERRORS: dict[int, type[BuildqError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: ValidationFailed,
    422: ValidationFailed,
    503: Unavailable,
}


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request to make, relative to the client's base URL."""

    method: str
    path: str
    params: Mapping[str, str | int | float] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    extra_read_timeout: float = 0.0  # added to the read timeout: a long poll's wait


@dataclass(frozen=True, slots=True)
class Pause:
    """Sleep this many seconds before the flow goes on."""

    seconds: float


Step: TypeAlias = Call | Pause
Flow: TypeAlias = Generator[Step, httpx.Response | None, T]


@dataclass(frozen=True, slots=True)
class Config:
    """What both clients are constructed with."""

    base_url: str
    api_key: str
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key is required")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    def request_kwargs(self, call: Call) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.build_request`` (and the async one's)."""
        return {
            "method": call.method,
            "url": self.base_url + call.path,
            "params": dict(call.params) or None,
            "headers": {
                "Authorization": f"Bearer {self.api_key}",
                "Accept": "application/json",
                "User-Agent": f"buildq-client/{__version__}",
                **call.headers,
            },
            "json": call.json,
            "timeout": httpx.Timeout(self.timeout, read=self.timeout + call.extra_read_timeout),
        }


# -- responses ---------------------------------------------------------------------


def transport_error(exc: httpx.TransportError) -> Unavailable:
    """A request that got no answer (connect error, timeout, broken connection)."""
    return Unavailable(f"could not reach the buildq API: {type(exc).__name__}: {exc}")


def check(response: httpx.Response) -> httpx.Response:
    """Raise the typed error of a 4xx/5xx answer; return any other response."""
    if response.status_code < 400:
        return response
    problem = _problem(response)
    status = response.status_code
    request_id = problem.get("request_id") or response.headers.get("x-request-id")
    request_id = request_id if isinstance(request_id, str) else None
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    message = str(detail)
    error_type = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else BuildqError)
    if error_type is Unavailable:
        raise Unavailable(
            message,
            status=status,
            problem=problem,
            request_id=request_id,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    raise error_type(message, status=status, problem=problem, request_id=request_id)


def _problem(response: httpx.Response) -> dict[str, Any]:
    """The problem+json body; a minimal one when the body is not JSON (a proxy's page)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {
        "title": response.reason_phrase,
        "status": response.status_code,
        "detail": response.text[:500] or response.reason_phrase,
    }


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise InvalidResponse(
            f"expected a JSON body, got {response.headers.get('content-type')!r}",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        ) from None


def _project(response: httpx.Response) -> Project:
    return Project.from_json(_json(check(response)))


def _response(sent: httpx.Response | None) -> httpx.Response:
    if sent is None:  # only a Pause is answered with None
        raise RuntimeError("a Call was answered with None")
    return sent


def _project_path(project_id: str) -> str:
    if not project_id:
        raise ValueError("project_id is required")
    return f"/v1/projects/{quote(project_id, safe='')}"


# -- flows -------------------------------------------------------------------------


def create_project(
    name: str,
    workflow: str,
    parameters: Mapping[str, Any] | None,
    idempotency_key: str | None,
) -> Flow[Project]:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
    body = {"name": name, "workflow": workflow, "parameters": dict(parameters or {})}
    sent = yield Call("POST", "/v1/projects", headers=headers, json=body)
    return _project(_response(sent))


def get_project(project_id: str) -> Flow[Project]:
    sent = yield Call("GET", _project_path(project_id))
    return _project(_response(sent))


def cancel(project_id: str) -> Flow[Project]:
    sent = yield Call("POST", f"{_project_path(project_id)}/cancel")
    return _project(_response(sent))


def list_projects(
    status: ProjectStatus | str | None, limit: int, cursor: str | None
) -> Flow[ProjectPage]:
    params: dict[str, str | int | float] = {"limit": limit}
    if status is not None:
        params["status"] = ProjectStatus(status).value
    if cursor is not None:
        params["cursor"] = cursor
    sent = yield Call("GET", "/v1/projects", params=params)
    return ProjectPage.from_json(_json(check(_response(sent))))


def wait(
    project_id: str,
    timeout: float,
    until: Iterable[ProjectStatus | str] = TERMINAL_STATUSES,
    clock: Callable[[], float] = time.monotonic,
) -> Flow[Project]:
    """Long-poll the project until its status is in ``until``.

    The first request (``wait=0``) reads the current state and its ETag; each next one
    waits up to ``min(20, remaining)`` seconds for a change *relative to that ETag*
    (``If-None-Match``), so no change between two polls is missed. A ``304`` means
    unchanged. Raises ``WaitTimeout`` with the last project seen once ``timeout`` passed.
    """
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    if isinstance(until, str):  # one status, not its letters
        until = (until,)
    wanted = frozenset(ProjectStatus(status) for status in until)
    if not wanted:
        raise ValueError("until must name at least one status")
    path = _project_path(project_id)
    deadline = clock() + timeout
    project: Project | None = None
    etag: str | None = None
    wait_for: float = 0
    while True:
        headers = {"If-None-Match": etag} if etag else {}
        asked = clock()
        sent = yield Call(
            "GET", path, params={"wait": wait_for}, headers=headers, extra_read_timeout=wait_for
        )
        response = _response(sent)
        if response.status_code == 304 and project is not None:
            changed = False
        else:
            latest = _project(response)
            changed = latest != project
            project = latest
        new_etag = response.headers.get("etag")
        if new_etag:  # the server's version, when it gives one, decides
            changed = new_etag != etag
            etag = new_etag
        if project.status in wanted:
            return project
        if not changed and wait_for > 0 and clock() - asked < wait_for / 2:
            yield Pause(min(MIN_POLL_INTERVAL, max(0.0, deadline - clock())))
        remaining = deadline - clock()
        if remaining <= 0:
            raise WaitTimeout(
                f"project {project_id} still {project.status.value} after {timeout:g}s "
                f"(waiting for {', '.join(sorted(wanted))})",
                project=project,
            )
        # Milliseconds, rounded up so the last poll covers the end of the timeout.
        wait_for = min(MAX_LONG_POLL, math.ceil(remaining * 1000) / 1000)
