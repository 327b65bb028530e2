"""Typed errors: every failure the client raises is a ``BuildqError``.

An error answer of the API (RFC 9457 ``application/problem+json``) becomes the subclass
for its status, carrying the parsed problem and its ``request_id`` (quote it when
reporting a problem: the API logs every request under it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from buildq_client.models import Project


class BuildqError(Exception):
    """Base of every client error.

    ``status`` is the HTTP status (None when no answer came back), ``problem`` the
    problem+json body as a dict (empty when there was none) and ``request_id`` the
    API's id of the request, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.problem: dict[str, Any] = problem or {}
        self.request_id = request_id

    @property
    def type(self) -> str | None:
        """The problem's ``type`` URI, e.g. ``urn:buildq:problem:unknown-workflow``."""
        value = self.problem.get("type")
        return value if isinstance(value, str) else None

    @property
    def title(self) -> str | None:
        value = self.problem.get("title")
        return value if isinstance(value, str) else None

    @property
    def detail(self) -> str | None:
        value = self.problem.get("detail")
        return value if isinstance(value, str) else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Per-field validation errors (``loc``, ``msg``, ``type``), if the API sent any."""
        value = self.problem.get("errors")
        return [err for err in value if isinstance(err, dict)] if isinstance(value, list) else []

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.insert(0, f"HTTP {self.status}:")
        if self.request_id:
            parts.append(f"(request_id={self.request_id})")
        return " ".join(parts)


class Unauthorized(BuildqError):  # noqa: N818 (public names)
    """401: the API key is missing, unknown or revoked."""


class NotFound(BuildqError):  # noqa: N818 (public names)
    """404: no such project (for this API key's tenant)."""


class Conflict(BuildqError):  # noqa: N818 (public names)
    """409: the request conflicts with the project's state (e.g. it has already ended)."""


class ValidationFailed(BuildqError):  # noqa: N818 (public names)
    """400, 413 or 422: the request was refused as it stands; see ``errors``."""


class Unavailable(BuildqError):  # noqa: N818 (public names)
    """503, or the API could not be reached at all (connection error, timeout).

    Safe to retry after ``retry_after`` seconds (the API's ``Retry-After``, if any); a
    create is safe to retry with the same ``idempotency_key``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, problem=problem, request_id=request_id)
        self.retry_after = retry_after


class ServerError(BuildqError):
    """A 5xx other than 503: the API failed; its ``request_id`` finds it in the logs."""


class InvalidResponse(BuildqError):  # noqa: N818 (public names)
    """A successful answer whose body is not what the API contract promises."""


class WaitTimeout(BuildqError, TimeoutError):  # noqa: N818
    """``wait()`` ran out of time; ``project`` is the last state it saw."""

    def __init__(self, message: str, *, project: Project) -> None:
        super().__init__(message)
        self.project = project
