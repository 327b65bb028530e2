"""Bad input gets a clear 4xx problem+json answer and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.harness import Stack

pytestmark = pytest.mark.e2e

VALID: dict[str, Any] = {"name": "ok", "workflow": "demo", "parameters": {}}


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


CASES: dict[str, tuple[Any, int, str]] = {
    # case: (body, status, problem type slug)
    "unknown workflow": ({**VALID, "workflow": "nope"}, 422, "unknown-workflow"),
    "missing name": ({"workflow": "demo"}, 422, "validation-error"),
    "missing workflow": ({"name": "x"}, 422, "validation-error"),
    "name not a string": ({**VALID, "name": 123}, 422, "validation-error"),
    "blank name": ({**VALID, "name": "   "}, 422, "validation-error"),
    "name too long": ({**VALID, "name": "x" * 201}, 422, "validation-error"),
    "parameters not an object": ({**VALID, "parameters": [1, 2]}, 422, "validation-error"),
    "workflow null": ({**VALID, "workflow": None}, 422, "validation-error"),
    "unknown field": ({**VALID, "colour": "red"}, 422, "validation-error"),
    "body is a list": ([VALID], 422, "validation-error"),
    "bad demo parameter type": (
        {**VALID, "parameters": {"stage_seconds": "slow"}},
        422,
        "validation-error",
    ),
    "negative stage_seconds": (
        {**VALID, "parameters": {"stage_seconds": -1}},
        422,
        "validation-error",
    ),
    "unknown demo parameter": (
        {**VALID, "parameters": {"stage_secs": 1}},
        422,
        "validation-error",
    ),
    "parameters too deep": ({**VALID, "parameters": _deep(12)}, 422, "validation-error"),
    "parameters too large": (
        {**VALID, "parameters": {"blob": "x" * 20_000}},
        422,
        "validation-error",
    ),
}


@pytest.fixture(scope="module")
def api(make_module_stack: Stack) -> Stack:
    return make_module_stack


def _assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:buildq:problem:{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def _assert_nothing_changed(stack: Stack) -> None:
    assert stack.table_items() == []
    assert stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_body_is_rejected_and_nothing_is_written(api: Stack, case: str) -> None:
    body, status, slug = CASES[case]
    with api.http() as http:
        response = http.post("/v1/projects", json=body)
    problem = _assert_problem(response, status, slug)
    if status == 422:
        assert problem["errors"], problem
    _assert_nothing_changed(api)


def test_invalid_json_is_a_400(api: Stack) -> None:
    with api.http() as http:
        response = http.post(
            "/v1/projects", content=b'{"name": ', headers={"content-type": "application/json"}
        )
    _assert_problem(response, 400, "invalid-json")
    _assert_nothing_changed(api)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_a_413(api: Stack, chunked: bool) -> None:
    payload = json.dumps({**VALID, "parameters": {"blob": "x" * 70_000}}).encode()
    with api.http() as http:
        if chunked:
            response = http.post(
                "/v1/projects",
                content=iter([payload[:40_000], payload[40_000:]]),
                headers={"content-type": "application/json"},
            )
        else:
            response = http.post(
                "/v1/projects", content=payload, headers={"content-type": "application/json"}
            )
    _assert_problem(response, 413, "payload-too-large")
    _assert_nothing_changed(api)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"cursor": "bm9wZQ"}, "cursor"),
        ({"stauts": "QUEUED"}, "stauts"),  # a misspelt parameter is not silently ignored
    ],
)
def test_bad_list_query_is_a_422(api: Stack, params: dict[str, Any], field: str) -> None:
    with api.http() as http:
        response = http.get("/v1/projects", params=params)
    problem = _assert_problem(response, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["query", field]


def test_unknown_route_and_method_are_problems(api: Stack) -> None:
    with api.http() as http:
        _assert_problem(http.get("/v1/nothing-here"), 404, "not-found")
        _assert_problem(http.delete("/v1/projects"), 405, "method-not-allowed")
