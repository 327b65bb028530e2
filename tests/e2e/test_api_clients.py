"""The API as real clients use it: keys and tenants, idempotency, long-poll, cancel,
lists, request ids, and outages of AWS itself."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    OTHER_API_KEY,
    Stack,
    create_demo,
    free_port,
    running_emulator,
    wait_until,
)

pytestmark = pytest.mark.e2e

BODY = {"name": "p", "workflow": "demo", "parameters": {"stage_seconds": 0.05}}


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:buildq:problem:{slug}"
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def _projects_in_table(stack: Stack) -> list[dict[str, Any]]:
    return [item for item in stack.table_items() if item["sk"]["S"].startswith("PROJECT#")]


# -- keys and tenants ---------------------------------------------------------------


def test_requests_without_a_valid_key_are_401_and_probes_stay_open(stack: Stack) -> None:
    url = stack.start_api()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dGVzdA=="}):
        for method, path in (("GET", "/v1/projects"), ("POST", "/v1/projects")):
            response = httpx.request(method, f"{url}{path}", headers=headers, json=BODY)
            _problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
    assert _projects_in_table(stack) == []
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_key_from_the_table_works_and_keys_are_never_logged(stack: Stack) -> None:
    result = stack.cli("api-key", "create", "--tenant", "acme", "--label", "ci")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("bq_")
    stored = [item for item in stack.table_items() if item["pk"]["S"].startswith("APIKEY#")]
    assert len(stored) == 1
    assert key not in json.dumps(stored)  # only its hash is stored
    stack.start_api()
    with stack.http(api_key=key) as http:
        project_id = create_demo(http)
        assert http.get(f"/v1/projects/{project_id}").status_code == 200
    with stack.http() as demo:  # tenant "demo" cannot see acme's project
        assert demo.get(f"/v1/projects/{project_id}").status_code == 404
    assert all(key not in proc.log() for proc in stack.procs)
    revoked = stack.cli("api-key", "revoke", key)
    assert revoked.returncode == 0, revoked.stderr


def test_tenants_are_isolated(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as demo, stack.http(api_key=OTHER_API_KEY) as other:
        project_id = create_demo(demo)
        missing = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        for path in (f"/v1/projects/{project_id}", f"/v1/projects/{missing}"):
            body = _problem(other.get(path), 404, "not-found")
            assert body["title"] == "Not found"
        _problem(other.post(f"/v1/projects/{project_id}/cancel"), 404, "not-found")
        assert other.get("/v1/projects").json() == {"items": [], "next_cursor": None}
        assert [p["id"] for p in demo.get("/v1/projects").json()["items"]] == [project_id]
        assert demo.get(f"/v1/projects/{project_id}").json()["status"] == "QUEUED"


# -- idempotent create ----------------------------------------------------------------


def test_twenty_concurrent_posts_with_one_key_create_one_project(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http, ThreadPoolExecutor(20) as pool:
        responses = list(
            pool.map(
                lambda _: http.post(
                    "/v1/projects", json=BODY, headers={"Idempotency-Key": "order-42"}
                ),
                range(20),
            )
        )
    assert [r.status_code for r in responses] == [202] * 20
    assert len({r.json()["id"] for r in responses}) == 1
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert len(replayed) == 19
    assert len(_projects_in_table(stack)) == 1
    depth = stack.queue_depth()
    assert 1 <= depth["visible"] <= 20  # replays of a still-QUEUED project re-send: harmless


def test_same_key_other_body_is_rejected_and_other_tenants_keys_are_their_own(
    stack: Stack,
) -> None:
    stack.start_api()
    headers = {"Idempotency-Key": "k-1"}
    with stack.http() as http, stack.http(api_key=OTHER_API_KEY) as other:
        first = http.post("/v1/projects", json=BODY, headers=headers)
        assert first.status_code == 202
        changed = {**BODY, "name": "another"}
        _problem(
            http.post("/v1/projects", json=changed, headers=headers),
            422,
            "idempotency-key-reused",
        )
        again = http.post("/v1/projects", json=BODY, headers=headers)
        assert again.json()["id"] == first.json()["id"]
        theirs = other.post("/v1/projects", json=BODY, headers=headers)
        assert theirs.status_code == 202
        assert theirs.json()["id"] != first.json()["id"]
        assert "idempotent-replayed" not in theirs.headers
        for bad in ("x" * 256, "has space"):
            _problem(
                http.post("/v1/projects", json=BODY, headers={"Idempotency-Key": bad}),
                422,
                "validation-error",
            )
    assert len(_projects_in_table(stack)) == 2


# -- cancel in every state -----------------------------------------------------------


def test_cancel_in_every_state(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        queued = create_demo(http, "queued")
        response = http.post(f"/v1/projects/{queued}/cancel")
        assert response.status_code == 202
        assert response.json()["status"] == "CANCELLED"
        _problem(http.post(f"/v1/projects/{queued}/cancel"), 409, "conflict")  # CANCELLED

        stack.start_worker(visibility_timeout=3, lease_seconds=2, max_attempts=1)
        done = create_demo(http, "done", stage_seconds=0.05)
        failed = create_demo(http, "failed", stage_seconds=0.05, fail_at_stage="plan")
        building = create_demo(http, "building", stage_seconds=5)
        stack.wait_for_status(http, done, {"SUCCEEDED"})
        stack.wait_for_status(http, failed, {"FAILED"})
        stack.wait_for_status(http, building, {"BUILDING"})
        _problem(http.post(f"/v1/projects/{done}/cancel"), 409, "conflict")
        _problem(http.post(f"/v1/projects/{failed}/cancel"), 409, "conflict")
        flagged = http.post(f"/v1/projects/{building}/cancel")
        assert flagged.status_code == 202
        assert flagged.json()["status"] == "BUILDING"
        assert flagged.json()["cancel_requested"] is True
        stopped = stack.wait_for_status(http, building, {"CANCELLED"}, timeout=5)
        assert stopped["stages"][0]["error"]["type"] == "CancelledByRequestError"
        _problem(http.post(f"/v1/projects/{building}/cancel"), 409, "conflict")


# -- long-poll ----------------------------------------------------------------------


def test_long_poll_returns_within_a_second_of_a_change(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=2)
        first = http.get(f"/v1/projects/{project_id}")
        tag = first.headers["etag"]
        stack.start_worker()
        # Each answer comes when the project changes: claimed, then each stage.
        seen: list[tuple[float, dict[str, Any]]] = []
        while len(seen) < 3:
            response = http.get(
                f"/v1/projects/{project_id}",
                params={"wait": 10},
                headers={"If-None-Match": tag},
            )
            assert response.status_code == 200
            assert response.headers["etag"] != tag
            tag = response.headers["etag"]
            seen.append((time.time(), response.json()))
    for answered_at, project in seen:
        changed_at = max(
            [project["updated_at"]] + [s["started_at"] or "" for s in project["stages"]]
        )
        lag = answered_at - _epoch(changed_at)
        assert lag < 1.0, (lag, project["status"])


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def test_long_poll_answers_after_wait_when_nothing_changes(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        project_id = create_demo(http)
        before = http.get(f"/v1/projects/{project_id}")
        started = time.monotonic()
        after = http.get(f"/v1/projects/{project_id}", params={"wait": 2})
        took = time.monotonic() - started
    assert 1.9 <= took < 3.5, took
    assert after.status_code == 200
    assert after.headers["etag"] == before.headers["etag"]
    assert after.json()["status"] == "QUEUED"


def test_many_long_polls_hold_no_thread_each(stack: Stack) -> None:
    url = stack.start_api()
    api = stack.procs[-1]
    with stack.http() as http:
        project_id = create_demo(http)

    async def poll_all() -> list[int]:
        async with httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": "Bearer test-key"},
            timeout=30,
            limits=httpx.Limits(max_connections=200),
        ) as client:
            waiters = [
                asyncio.create_task(client.get(f"/v1/projects/{project_id}?wait=4"))
                for _ in range(150)
            ]
            await asyncio.sleep(2)
            threads.append(_threads(api.popen.pid))
            return [response.status_code for response in await asyncio.gather(*waiters)]

    threads: list[int] = []
    statuses = asyncio.run(poll_all())
    assert statuses == [200] * 150
    assert threads[0] < 20, f"{threads[0]} threads for 150 waiters"


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


# -- lists ----------------------------------------------------------------------------


def test_list_filters_by_status_and_rejects_foreign_cursors(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        ids = [create_demo(http, f"p{i}") for i in range(6)]
        cancelled = ids[1::2]
        for project_id in cancelled:
            assert http.post(f"/v1/projects/{project_id}/cancel").status_code == 202
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"status": "CANCELLED", "limit": 1}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/v1/projects", params=params).json()
            seen += [p["id"] for p in page["items"]]
            assert all(p["status"] == "CANCELLED" for p in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(cancelled))
        first = http.get("/v1/projects", params={"status": "CANCELLED", "limit": 1}).json()
        token = first["next_cursor"]
        _problem(
            http.get("/v1/projects", params={"status": "QUEUED", "cursor": token}),
            422,
            "validation-error",
        )
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        _problem(http.get("/v1/projects", params={"cursor": tampered}), 422, "validation-error")
        _problem(http.get("/v1/projects", params={"status": "DONE"}), 422, "validation-error")


# -- request ids, OpenAPI ---------------------------------------------------------------


def test_request_ids_are_echoed_or_made(stack: Stack) -> None:
    url = stack.start_api()
    given = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "bad id\twith junk"})
    assert made.headers["x-request-id"] != "bad id\twith junk"
    assert len(made.headers["x-request-id"]) == 32
    logged = [e for e in stack.events("request.finished") if e["request_id"] == "abc-123"]
    assert logged


def test_openapi_documents_auth_errors_and_examples(stack: Stack) -> None:
    url = stack.start_api()
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "ApiKey" in spec["components"]["securitySchemes"]
    assert {tag["name"] for tag in spec["tags"]} == {"projects", "health"}
    create = spec["paths"]["/v1/projects"]["post"]
    assert {"202", "401", "422", "503"} <= set(create["responses"])
    assert create["responses"]["422"]["content"]["application/problem+json"]
    schemas = spec["components"]["schemas"]
    for model in ("ProjectCreate", "ProjectPublic", "Problem"):
        assert schemas[model].get("examples") or schemas[model].get("example"), model
    assert httpx.get(f"{url}/docs").status_code == 200


# -- AWS outages ------------------------------------------------------------------------


def test_an_aws_outage_is_a_fast_503_and_the_api_recovers_by_itself(
    tmp_path: Path, emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own emulator, so that it can be stopped and started again on one port.
    port = free_port()
    stack = Stack(endpoint=f"http://127.0.0.1:{port}", log_dir=tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack.endpoint)
    try:
        with running_emulator(tmp_path / "before", port=port):
            stack.bootstrap()
            stack.start_api()
            with stack.http() as http:
                assert http.post("/v1/projects", json=BODY).status_code == 202
        with stack.http() as http:  # AWS is gone
            for method, path in (("POST", "/v1/projects"), ("GET", "/v1/projects")):
                started = time.monotonic()
                response = http.request(method, path, json=BODY if method == "POST" else None)
                took = time.monotonic() - started
                _problem(response, 503, "unavailable")
                assert response.headers["retry-after"] == "2"
                assert took <= 3.0, took
            assert httpx.get(f"{stack.api_url}/readyz").status_code == 503
        with running_emulator(tmp_path / "after", port=port):
            stack.bootstrap()  # the emulator keeps nothing: make the resources again
            with stack.http() as http:
                wait_until(
                    lambda: http.post("/v1/projects", json=BODY).status_code == 202,
                    timeout=10,
                    what="the API to recover",
                )
            assert httpx.get(f"{stack.api_url}/readyz").status_code == 200
        assert len([p for p in stack.procs if p.alive()]) == 1  # the same API process
    finally:
        stack.stop()
