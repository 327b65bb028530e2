"""The synchronous client: drives the shared flows of ``_core`` with ``httpx.Client``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from buildq_client import _core
from buildq_client._core import DEFAULT_TIMEOUT, Call, Config, Flow
from buildq_client.models import TERMINAL_STATUSES, Project, ProjectPage, ProjectStatus

T = TypeVar("T")


class BuildqClient:
    """A client of the buildq API.

    ``BuildqClient(base_url, api_key)`` owns its ``httpx.Client`` (close it, or use the
    client as a context manager); pass ``http_client`` to share one you own instead.
    ``timeout`` (seconds) bounds each request; a long poll's read timeout gets its
    wait on top. Every method raises a ``BuildqError`` subclass on failure.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._config = Config(base_url=base_url, api_key=api_key, timeout=timeout)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client, if this client created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> BuildqClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the API -------------------------------------------------------------------

    def create_project(
        self,
        name: str,
        workflow: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Project:
        """Create a project and queue its build; returns it (QUEUED).

        With ``idempotency_key``, a retry of the same create returns the same project
        instead of creating another.
        """
        return self._run(_core.create_project(name, workflow, parameters, idempotency_key))

    def get_project(self, project_id: str) -> Project:
        """The project's current state."""
        return self._run(_core.get_project(project_id))

    def wait(
        self,
        project_id: str,
        *,
        timeout: float,
        until: Iterable[ProjectStatus | str] = TERMINAL_STATUSES,
    ) -> Project:
        """Long-poll until the project's status is in ``until`` (default: it has ended).

        Raises ``WaitTimeout`` (with the last ``Project`` seen) after ``timeout`` seconds.
        """
        return self._run(_core.wait(project_id, timeout, until))

    def cancel(self, project_id: str) -> Project:
        """Cancel the project (``Conflict`` if it has already ended)."""
        return self._run(_core.cancel(project_id))

    def list_projects(
        self,
        *,
        status: ProjectStatus | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ProjectPage:
        """One page of projects, newest first."""
        return self._run(_core.list_projects(status, limit, cursor))

    def iter_projects(
        self, *, status: ProjectStatus | str | None = None, page_size: int = 50
    ) -> Iterator[Project]:
        """Every project (optionally of one status), newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.list_projects(status=status, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- I/O -----------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Call):
                    step = flow.send(self._send(step))
                else:
                    time.sleep(step.seconds)
                    step = flow.send(None)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            flow.close()

    def _send(self, call: Call) -> httpx.Response:
        request = self._http.build_request(**self._config.request_kwargs(call))
        try:
            return self._http.send(request)
        except httpx.TransportError as exc:
            raise _core.transport_error(exc) from exc
