"""buildq-client: parsing and error mapping against a fake server (httpx.MockTransport),
then both clients against the real stack (API and worker processes)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from buildq_client import (
    AsyncBuildqClient,
    BuildqClient,
    BuildqError,
    Conflict,
    ErrorInfo,
    InvalidResponse,
    NotFound,
    Project,
    ProjectStatus,
    ServerError,
    StageStatus,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from buildq_client._core import parse_retry_after
from tests.harness import API_KEY, OTHER_API_KEY, Stack

Handler = Callable[[httpx.Request], httpx.Response]

BASE_URL = "https://buildq.test/api"
KEY = "secret-key"
PROJECT_ID = "01HXAMPLE0000000000000000A"
UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
DEMO_STAGES = ["plan", "generate", "build", "package"]


# -- a fake server -------------------------------------------------------------------


def project_json(status: str = "QUEUED", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": PROJECT_ID,
        "name": "p",
        "workflow": "demo",
        "parameters": {"stage_seconds": 0.2},
        "status": status,
        "attempt": 1,
        "releases": 0,
        "created_at": "2024-05-01T12:00:00.123Z",
        "updated_at": "2024-05-01T12:00:01.456Z",
        "started_at": "2024-05-01T12:00:00.500Z",
        "finished_at": None,
        "last_error": {"type": "TransientStageError", "message": "boom"},
        "worker_id": "w-1",
        "cancel_requested": False,
        "stages": [
            {
                "name": "plan",
                "status": "SUCCEEDED",
                "attempt": 1,
                "worker_id": "w-1",
                "started_at": "2024-05-01T12:00:00.600Z",
                "finished_at": "2024-05-01T12:00:00.800Z",
                "output": {"steps": 3},
                "error": None,
                "a_future_stage_field": 1,
            },
            {"name": "generate", "status": "PENDING"},  # the rest left out: defaults
        ],
        "a_future_field": {"nested": True},
    }
    body.update(overrides)
    return body


def problem(status: int, detail: str = "nope", **extra: Any) -> httpx.Response:
    body = {
        "type": f"urn:buildq:problem:{status}",
        "title": "Title",
        "status": status,
        "detail": detail,
        "instance": "/v1/projects",
        "request_id": "req-123",
        **extra,
    }
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


class Recorder:
    """A handler that answers with ``respond`` and keeps every request."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)


class LongPollServer:
    """Serves ``statuses`` one version at a time, each with its ETag: a poll whose
    If-None-Match is the current version sees the next one, or (after the last) waits
    ``wait`` seconds when ``sleeps`` and answers the same version (or 304)."""

    def __init__(
        self, statuses: list[str], *, sleeps: bool = True, not_modified: bool = False
    ) -> None:
        self.statuses = statuses
        self.sleeps = sleeps
        self.not_modified = not_modified
        self.version = 0
        self.requests: list[httpx.Request] = []

    def etag(self) -> str:
        return f'"v{self.version}"'

    def answer(self, request: httpx.Request) -> tuple[float, httpx.Response]:
        """(seconds to wait first, the answer)."""
        self.requests.append(request)
        wait = float(request.url.params.get("wait", "0"))
        pause = 0.0
        if request.headers.get("if-none-match") == self.etag():
            if self.version + 1 < len(self.statuses):
                self.version += 1
            else:
                pause = wait if self.sleeps else 0.0
                if self.not_modified:
                    return pause, httpx.Response(304, headers={"ETag": self.etag()})
        body = project_json(self.statuses[self.version])
        return pause, httpx.Response(200, json=body, headers={"ETag": self.etag()})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        pause, response = self.answer(request)
        time.sleep(pause)
        return response

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        pause, response = self.answer(request)
        await asyncio.sleep(pause)
        return response


@contextmanager
def fake_client(handler: Handler) -> Iterator[BuildqClient]:
    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as http,
        BuildqClient(BASE_URL, KEY, timeout=5, http_client=http) as client,
    ):
        yield client


@asynccontextmanager
async def fake_async_client(
    handler: Handler | Callable[[httpx.Request], Coroutine[None, None, httpx.Response]],
) -> AsyncIterator[AsyncBuildqClient]:
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http,
        AsyncBuildqClient(BASE_URL, KEY, timeout=5, http_client=http) as client,
    ):
        yield client


# -- parsing ---------------------------------------------------------------------------


def test_create_sends_auth_key_and_body_and_parses_the_project() -> None:
    server = Recorder(lambda request: httpx.Response(202, json=project_json()))
    with fake_client(server) as client:
        project = client.create_project(
            "p", "demo", {"stage_seconds": 0.2}, idempotency_key="key-1"
        )
    (request,) = server.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/v1/projects"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["idempotency-key"] == "key-1"
    assert json.loads(request.content) == {
        "name": "p",
        "workflow": "demo",
        "parameters": {"stage_seconds": 0.2},
    }
    assert project.id == PROJECT_ID
    assert project.status is ProjectStatus.QUEUED
    assert not project.terminal
    assert project.parameters == {"stage_seconds": 0.2}
    assert project.created_at == datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert project.finished_at is None
    assert project.last_error == ErrorInfo(type="TransientStageError", message="boom")
    plan, generate = project.stages
    assert plan.status is StageStatus.SUCCEEDED
    assert plan.output == {"steps": 3}
    assert plan.finished_at is not None
    assert project.stage("generate") == generate
    assert generate.status is StageStatus.PENDING
    assert generate.attempt == 0
    assert generate.started_at is None
    with pytest.raises(KeyError):
        project.stage("nope")


def test_create_without_idempotency_key_sends_no_header_and_empty_parameters() -> None:
    server = Recorder(lambda request: httpx.Response(202, json=project_json()))
    with fake_client(server) as client:
        client.create_project("p", "demo")
    (request,) = server.requests
    assert "idempotency-key" not in request.headers
    assert json.loads(request.content)["parameters"] == {}


def test_get_and_cancel_address_the_project() -> None:
    server = Recorder(lambda request: httpx.Response(200, json=project_json("CANCELLED")))
    with fake_client(server) as client:
        assert client.get_project(PROJECT_ID).status is ProjectStatus.CANCELLED
        assert client.cancel(PROJECT_ID).terminal
    get, cancel = server.requests
    assert (get.method, get.url.path) == ("GET", f"/api/v1/projects/{PROJECT_ID}")
    assert (cancel.method, cancel.url.path) == ("POST", f"/api/v1/projects/{PROJECT_ID}/cancel")
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)


def test_a_project_id_cannot_escape_its_path() -> None:
    server = Recorder(lambda request: problem(422))
    with fake_client(server) as client, pytest.raises(ValidationFailed):
        client.get_project("../../admin?x=1")
    assert server.requests[0].url.raw_path == b"/api/v1/projects/..%2F..%2Fadmin%3Fx%3D1"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**project_json(), "status": "PAUSED"}, "ProjectStatus"),
        ({**project_json(), "created_at": "yesterday"}, "created_at"),
        ({k: v for k, v in project_json().items() if k != "id"}, "'id'"),
        ({**project_json(), "attempt": "1"}, "attempt"),
        ([project_json()], "not a JSON object"),
    ],
)
def test_a_body_that_breaks_the_contract_is_invalid_response(body: Any, message: str) -> None:
    with (
        fake_client(lambda request: httpx.Response(200, json=body)) as client,
        pytest.raises(InvalidResponse, match=message),
    ):
        client.get_project(PROJECT_ID)


def test_a_non_json_success_is_invalid_response() -> None:
    with (
        fake_client(lambda request: httpx.Response(200, text="<html>")) as client,
        pytest.raises(InvalidResponse),
    ):
        client.get_project(PROJECT_ID)


def test_project_parses_leniently() -> None:
    minimal = {
        "id": PROJECT_ID,
        "name": "p",
        "workflow": "demo",
        "status": "BUILDING",
        "created_at": "2024-05-01T12:00:00.123Z",
        "updated_at": "2024-05-01T12:00:00.123Z",
        "unknown": [1, 2],
    }
    project = Project.from_json(minimal)
    assert project.status is ProjectStatus.BUILDING
    assert project.parameters == {}
    assert project.stages == ()
    assert project.last_error is None
    assert project.cancel_requested is False


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, ValidationFailed),
        (401, Unauthorized),
        (404, NotFound),
        (409, Conflict),
        (413, ValidationFailed),
        (422, ValidationFailed),
        (503, Unavailable),
        (500, ServerError),
        (502, ServerError),
        (418, BuildqError),
    ],
)
def test_a_problem_becomes_its_typed_error(status: int, error_type: type[BuildqError]) -> None:
    errors = [{"loc": ["body", "name"], "msg": "Field required", "type": "missing"}]

    def respond(request: httpx.Request) -> httpx.Response:
        response = problem(status, "what went wrong", errors=errors)
        response.headers["Retry-After"] = "2"
        return response

    with fake_client(respond) as client, pytest.raises(BuildqError) as caught:
        client.get_project(PROJECT_ID)
    error = caught.value
    assert type(error) is error_type
    assert error.status == status
    assert error.request_id == "req-123"
    assert error.problem["detail"] == "what went wrong"
    assert error.detail == "what went wrong"
    assert error.type == f"urn:buildq:problem:{status}"
    assert error.errors == errors
    assert "what went wrong" in str(error)
    assert "req-123" in str(error)
    if isinstance(error, Unavailable):
        assert error.retry_after == 2.0


def test_503_without_retry_after_and_an_html_502() -> None:
    answers = iter(
        [
            problem(503),
            httpx.Response(
                502, text="<html>bad gateway</html>", headers={"X-Request-ID": "edge-1"}
            ),
        ]
    )
    with fake_client(lambda request: next(answers)) as client:
        with pytest.raises(Unavailable) as unavailable:
            client.get_project(PROJECT_ID)
        assert unavailable.value.retry_after is None
        with pytest.raises(ServerError) as server_error:
            client.get_project(PROJECT_ID)
    assert server_error.value.status == 502
    assert server_error.value.request_id == "edge-1"
    assert server_error.value.problem["detail"] == "<html>bad gateway</html>"


def test_a_connection_error_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with fake_client(refuse) as client, pytest.raises(Unavailable) as caught:
        client.create_project("p", "demo")
    assert caught.value.status is None
    assert caught.value.retry_after is None
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:26:00 GMT", now=now) == 0.0
    assert parse_retry_after("-4") == 0.0
    for bad in (None, "", "soon", "nan"):
        assert parse_retry_after(bad) is None


# -- listing ---------------------------------------------------------------------------


def paged_server(pages: int, per_page: int) -> Recorder:
    def respond(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        page = int(cursor.removeprefix("c")) if cursor else 0
        items = [
            project_json("SUCCEEDED", id=f"{page}-{i}", name=f"p{page}-{i}")
            for i in range(per_page)
        ]
        next_cursor = f"c{page + 1}" if page + 1 < pages else None
        return httpx.Response(200, json={"items": items, "next_cursor": next_cursor})

    return Recorder(respond)


def test_iter_projects_follows_next_cursor() -> None:
    server = paged_server(pages=3, per_page=2)
    with fake_client(server) as client:
        ids = [project.id for project in client.iter_projects(status="SUCCEEDED", page_size=2)]
    assert ids == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]
    params = [dict(request.url.params) for request in server.requests]
    assert params == [
        {"limit": "2", "status": "SUCCEEDED"},
        {"limit": "2", "status": "SUCCEEDED", "cursor": "c1"},
        {"limit": "2", "status": "SUCCEEDED", "cursor": "c2"},
    ]


def test_iter_projects_is_lazy_and_rejects_an_unknown_status() -> None:
    server = paged_server(pages=5, per_page=2)
    with fake_client(server) as client:
        first = next(client.iter_projects())
        assert first.id == "0-0"
        assert len(server.requests) == 1
        with pytest.raises(ValueError, match="PAUSED"):
            list(client.iter_projects(status="PAUSED"))


def test_async_iter_projects_follows_next_cursor() -> None:
    server = paged_server(pages=3, per_page=1)

    async def main() -> list[str]:
        async with fake_async_client(server) as client:
            return [p.id async for p in client.iter_projects(status=ProjectStatus.QUEUED)]

    assert asyncio.run(main()) == ["0-0", "1-0", "2-0"]
    assert [r.url.params.get("cursor") for r in server.requests] == [None, "c1", "c2"]
    assert all(r.url.params["status"] == "QUEUED" for r in server.requests)


# -- wait ------------------------------------------------------------------------------


def test_wait_long_polls_with_if_none_match_until_terminal() -> None:
    server = LongPollServer(["QUEUED", "BUILDING", "BUILDING", "SUCCEEDED"])
    with fake_client(server) as client:
        project = client.wait(PROJECT_ID, timeout=60)
    assert project.status is ProjectStatus.SUCCEEDED
    first, *polls = server.requests
    assert first.url.params["wait"] == "0"
    assert "if-none-match" not in first.headers
    assert [r.headers["if-none-match"] for r in polls] == ['"v0"', '"v1"', '"v2"']
    assert all(0 < float(r.url.params["wait"]) <= 20 for r in polls)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)


def test_wait_returns_at_a_status_of_until() -> None:
    server = LongPollServer(["QUEUED", "BUILDING", "SUCCEEDED"])
    with fake_client(server) as client:
        project = client.wait(PROJECT_ID, timeout=60, until={ProjectStatus.BUILDING, "FAILED"})
    assert project.status is ProjectStatus.BUILDING
    assert len(server.requests) == 2
    server = LongPollServer(["QUEUED", "SUCCEEDED"])
    with fake_client(server) as client:
        assert client.wait(PROJECT_ID, timeout=60, until="SUCCEEDED").terminal


def test_wait_returns_at_once_for_an_ended_project_even_with_no_time() -> None:
    server = LongPollServer(["FAILED"])
    with fake_client(server) as client:
        assert client.wait(PROJECT_ID, timeout=0).status is ProjectStatus.FAILED
    assert len(server.requests) == 1


@pytest.mark.parametrize("not_modified", [False, True], ids=["200-same", "304"])
def test_wait_honours_its_timeout(not_modified: bool) -> None:
    server = LongPollServer(["QUEUED"], not_modified=not_modified)
    started = time.monotonic()
    with fake_client(server) as client, pytest.raises(WaitTimeout) as caught:
        client.wait(PROJECT_ID, timeout=1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0
    assert caught.value.project.status is ProjectStatus.QUEUED
    assert isinstance(caught.value, TimeoutError)
    polls = server.requests[1:]
    assert polls
    assert all(r.headers["if-none-match"] == '"v0"' for r in polls)
    assert sum(float(r.url.params["wait"]) for r in server.requests) <= 1.01


def test_wait_does_not_spin_when_the_server_does_not_wait() -> None:
    server = LongPollServer(["QUEUED"], sleeps=False)
    started = time.monotonic()
    with fake_client(server) as client, pytest.raises(WaitTimeout):
        client.wait(PROJECT_ID, timeout=2.0)
    assert time.monotonic() - started >= 2.0
    assert len(server.requests) <= 4


def test_wait_rejects_nonsense() -> None:
    with fake_client(LongPollServer(["QUEUED"])) as client:
        with pytest.raises(ValueError, match="timeout"):
            client.wait(PROJECT_ID, timeout=-1)
        with pytest.raises(ValueError, match="until"):
            client.wait(PROJECT_ID, timeout=1, until=())


def test_async_wait_long_polls_and_honours_its_timeout() -> None:
    async def main() -> None:
        done = LongPollServer(["QUEUED", "BUILDING", "SUCCEEDED"])
        async with fake_async_client(done.handle_async) as client:
            assert (await client.wait(PROJECT_ID, timeout=60)).status is ProjectStatus.SUCCEEDED
        assert [r.headers.get("if-none-match") for r in done.requests] == [None, '"v0"', '"v1"']

        stuck = LongPollServer(["BUILDING"])
        started = time.monotonic()
        async with fake_async_client(stuck.handle_async) as client:
            with pytest.raises(WaitTimeout) as caught:
                await client.wait(PROJECT_ID, timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 2.0
        assert caught.value.project.status is ProjectStatus.BUILDING

    asyncio.run(main())


def test_async_errors_are_typed_too() -> None:
    answers = iter([problem(401), problem(409), problem(503, **{"request_id": "r-9"})])

    async def main() -> None:
        async with fake_async_client(lambda request: next(answers)) as client:
            with pytest.raises(Unauthorized):
                await client.get_project(PROJECT_ID)
            with pytest.raises(Conflict):
                await client.cancel(PROJECT_ID)
            with pytest.raises(Unavailable) as caught:
                await client.create_project("p", "demo", idempotency_key="k")
            assert caught.value.request_id == "r-9"

    asyncio.run(main())


# -- lifecycle -------------------------------------------------------------------------


def test_the_client_closes_only_the_http_client_it_owns() -> None:
    with BuildqClient("http://x", KEY) as owner:
        owned = owner._http
    assert owned.is_closed
    with httpx.Client() as http:
        with BuildqClient("http://x", KEY, http_client=http):
            pass
        assert not http.is_closed

    async def main() -> None:
        async with AsyncBuildqClient("http://x", KEY) as owner:
            owned = owner._http
        assert owned.is_closed
        async with httpx.AsyncClient() as http:
            async with AsyncBuildqClient("http://x", KEY, http_client=http):
                pass
            assert not http.is_closed

    asyncio.run(main())


def test_construction_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="api_key"):
        BuildqClient("http://x", "")
    with pytest.raises(ValueError, match="timeout"):
        AsyncBuildqClient("http://x", KEY, timeout=0)


# -- end to end: the real API and worker -----------------------------------------------


def started(stack: Stack) -> str:
    stack.start_api()
    # Short heartbeats: a BUILDING project's worker learns of a cancel within ~1 s.
    stack.start_worker(visibility_timeout=3, lease_seconds=2)
    assert stack.api_url
    return stack.api_url


def assert_succeeded(project: Project) -> None:
    assert project.status is ProjectStatus.SUCCEEDED
    # A replayed create of a still-QUEUED project sends a second message; the claim
    # makes it harmless: one attempt.
    assert project.attempt == 1
    assert project.finished_at is not None
    assert project.last_error is None
    assert [stage.name for stage in project.stages] == DEMO_STAGES
    for stage in project.stages:
        assert stage.status is StageStatus.SUCCEEDED
        assert stage.output == {"stage": stage.name, "attempt": project.attempt, "seconds": 0.2}


@pytest.mark.e2e
def test_sync_client_against_the_real_stack(stack: Stack) -> None:
    url = started(stack)
    key = f"e2e-{uuid.uuid4()}"
    with BuildqClient(url, API_KEY, timeout=10) as client:
        created = client.create_project("sync", "demo", {"stage_seconds": 0.2}, idempotency_key=key)
        assert created.status is ProjectStatus.QUEUED
        replayed = client.create_project(
            "sync", "demo", {"stage_seconds": 0.2}, idempotency_key=key
        )
        assert replayed.id == created.id

        # Long-poll to BUILDING, then to the end.
        building = client.wait(created.id, timeout=30, until={"BUILDING", "SUCCEEDED"})
        assert building.status in {ProjectStatus.BUILDING, ProjectStatus.SUCCEEDED}
        done = client.wait(created.id, timeout=60)
        assert_succeeded(done)
        assert client.get_project(created.id) == done

        with pytest.raises(Conflict) as conflict:
            client.cancel(created.id)
        assert conflict.value.status == 409
        assert conflict.value.request_id

        with pytest.raises(NotFound):
            client.get_project(UNKNOWN_ID)
        with pytest.raises(ValidationFailed) as invalid:
            client.create_project("x", "no-such-workflow")
        assert invalid.value.errors

        # Cancel: a long project is stopped, and wait() sees it end CANCELLED.
        slow = client.create_project("slow", "demo", {"stage_seconds": 30})
        client.wait(slow.id, timeout=30, until={"BUILDING"})
        flagged = client.cancel(slow.id)
        assert flagged.cancel_requested
        assert flagged.status is ProjectStatus.BUILDING
        cancelled = client.wait(slow.id, timeout=30)
        assert cancelled.status is ProjectStatus.CANCELLED

        # A wait that runs out of time says so, with the project as last seen.
        stuck = client.create_project("stuck", "demo", {"stage_seconds": 30})
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout) as timed_out:
            client.wait(stuck.id, timeout=1.5, until={"SUCCEEDED"})
        assert 1.5 <= time.monotonic() - t0 < 5
        assert timed_out.value.project.id == stuck.id
        assert timed_out.value.project.status in {ProjectStatus.QUEUED, ProjectStatus.BUILDING}
        client.cancel(stuck.id)
        assert client.wait(stuck.id, timeout=30).status is ProjectStatus.CANCELLED

        # Listing: newest first, across pages, filtered by status.
        ids = [project.id for project in client.iter_projects(page_size=1)]
        assert ids == [stuck.id, slow.id, created.id]
        succeeded = [p.id for p in client.iter_projects(status="SUCCEEDED", page_size=1)]
        assert succeeded == [created.id]
        cancelled_ids = [p.id for p in client.iter_projects(status=ProjectStatus.CANCELLED)]
        assert cancelled_ids == [stuck.id, slow.id]

    # Another tenant's key sees none of it; a wrong key is refused.
    with BuildqClient(url, OTHER_API_KEY) as other:
        with pytest.raises(NotFound):
            other.get_project(created.id)
        assert list(other.iter_projects()) == []
    with BuildqClient(url, "wrong-key") as wrong:
        with pytest.raises(Unauthorized) as unauthorized:
            wrong.get_project(created.id)
        with pytest.raises(Unauthorized):
            wrong.create_project("x", "demo")
    assert unauthorized.value.status == 401
    assert unauthorized.value.request_id


@pytest.mark.e2e
def test_async_client_against_the_real_stack(stack: Stack) -> None:
    url = started(stack)

    async def main() -> None:
        async with AsyncBuildqClient(url, API_KEY, timeout=10) as client:
            projects = [
                await client.create_project(f"async-{i}", "demo", {"stage_seconds": 0.2})
                for i in range(3)
            ]
            done = await asyncio.gather(*(client.wait(p.id, timeout=60) for p in projects))
            for project in done:
                assert_succeeded(project)
            assert await client.get_project(projects[0].id) == done[0]

            listed = [p.id async for p in client.iter_projects(page_size=2)]
            assert listed == [p.id for p in reversed(projects)]
            filtered = [p.id async for p in client.iter_projects(status="QUEUED")]
            assert filtered == []

            with pytest.raises(Conflict):
                await client.cancel(projects[0].id)
            queued = await client.create_project("cancel-me", "demo", {"stage_seconds": 30})
            await client.cancel(queued.id)
            assert (await client.wait(queued.id, timeout=30)).status is ProjectStatus.CANCELLED
            with pytest.raises(NotFound):
                await client.cancel(UNKNOWN_ID)

        async with AsyncBuildqClient(url, "wrong-key") as wrong:
            with pytest.raises(Unauthorized):
                await wrong.get_project(projects[0].id)
            with pytest.raises(Unauthorized):
                _ = [p async for p in wrong.iter_projects()]

    asyncio.run(main())


def test_an_unreachable_api_is_unavailable() -> None:
    with (
        BuildqClient("http://127.0.0.1:9", API_KEY, timeout=2) as client,
        pytest.raises(Unavailable) as caught,
    ):
        client.get_project(UNKNOWN_ID)
    assert caught.value.status is None
