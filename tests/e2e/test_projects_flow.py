"""The whole path: POST a project, workers build it, GET shows SUCCEEDED."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.harness import Stack, wait_until

pytestmark = pytest.mark.e2e

STAGES = ["plan", "generate", "build", "package"]


def create(http: httpx.Client, name: str, **parameters: Any) -> dict[str, Any]:
    response = http.post(
        "/v1/projects", json={"name": name, "workflow": "demo", "parameters": parameters}
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/v1/projects/{body['id']}"
    return body


def test_twenty_concurrent_projects_succeed_and_two_workers_share_them(stack: Stack) -> None:
    stack.start_api()
    workers = [stack.start_worker(), stack.start_worker()]
    with stack.http() as http, ThreadPoolExecutor(20) as pool:
        created = list(pool.map(lambda i: create(http, f"p{i}", stage_seconds=0.2), range(20)))
        assert all(project["status"] == "QUEUED" for project in created)
        done = [stack.wait_for_status(http, p["id"], {"SUCCEEDED"}) for p in created]
    for project in done:
        assert project["attempt"] == 1
        assert [stage["name"] for stage in project["stages"]] == STAGES
        for stage in project["stages"]:
            assert stage["status"] == "SUCCEEDED"
            assert stage["output"] == {"stage": stage["name"], "attempt": 1, "seconds": 0.2}
            assert stage["started_at"] <= stage["finished_at"]
        assert project["created_at"] <= project["started_at"] <= project["finished_at"]
    # Both worker processes built some of them (5 slots each, 20 projects).
    worker_ids = {project["worker_id"] for project in done}
    assert worker_ids == {f"worker-1-{stack.suffix}", f"worker-2-{stack.suffix}"}, worker_ids
    # Every message was deleted once its project SUCCEEDED.
    wait_until(lambda: stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0})
    assert stack.queue_depth(dlq=True)["visible"] == 0
    assert all(worker.alive() for worker in workers)


def test_post_answers_at_once_while_the_workflow_runs(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker()
    with stack.http() as http:
        http.get("/healthz")  # warm the connection: measure the request, not the TCP set-up
        started = time.perf_counter()
        project = create(http, "slow", stage_seconds=5)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"POST took {elapsed:.3f}s"
        assert project["status"] == "QUEUED"
        building = stack.wait_for_stage(http, project["id"], 0, "RUNNING", timeout=20)
        assert building["status"] == "BUILDING"
        assert building["stages"][1]["status"] == "PENDING"


def _max_overlap(intervals: list[tuple[str, str]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    # ISO timestamps sort as they compare; at a tie an end (-1) comes before a start.
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_a_worker_runs_at_most_max_workflow_workers_at_once(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(max_workflow_workers=2)
    with stack.http() as http:
        created = [create(http, f"p{i}", stage_seconds=0.15) for i in range(8)]
        done = [stack.wait_for_status(http, p["id"], {"SUCCEEDED"}) for p in created]
    intervals = [(p["stages"][0]["started_at"], p["stages"][-1]["finished_at"]) for p in done]
    assert _max_overlap(intervals) == 2, intervals


def test_list_is_newest_first_and_pages_with_a_cursor(stack: Stack) -> None:
    stack.start_api()  # no workers: the projects stay QUEUED
    with stack.http() as http:
        ids = [create(http, f"p{i}")["id"] for i in range(5)]
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/v1/projects", params=params).json()
            seen += [item["id"] for item in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(ids))
        assert pages == 3
        assert all(item["status"] == "QUEUED" for item in page["items"])


def test_get_unknown_project_is_a_404_problem(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        response = http.get("/v1/projects/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"] == "urn:buildq:problem:not-found"
        assert body["request_id"] == response.headers["x-request-id"]
        malformed = http.get("/v1/projects/not-a-ulid")
        assert malformed.status_code == 422
        assert malformed.headers["content-type"] == "application/problem+json"


def test_health_and_readiness(stack: Stack) -> None:
    url = stack.start_api()
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"dynamodb": "ok", "sqs": "ok"}
    # An API pointed at a table and queue that do not exist is alive but not ready.
    broken = stack.start_api(table_name="no-such-table", queue_name="no-such-queue")
    assert httpx.get(f"{broken}/healthz").status_code == 200
    not_ready = httpx.get(f"{broken}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.headers["content-type"] == "application/problem+json"
    assert set(not_ready.json()["checks"]) == {"dynamodb", "sqs"}
    assert "ok" not in not_ready.json()["checks"].values()
